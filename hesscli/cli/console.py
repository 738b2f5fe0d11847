"""Human output on stderr (Rich tables, progress bars); stdout is reserved for ``--json``."""

from __future__ import annotations

import math
import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from hesscli.runtime.progress import NullProgress, Progress

__all__ = ["err_console", "make_progress", "summary_table", "fmt_num"]


def err_console() -> Console:
    """The Rich console on stderr (stdout is kept for --json); honours NO_COLOR."""
    return Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")), highlight=False, soft_wrap=False)


class RichBar(Progress):
    def __init__(self, console: Console):
        self.console = console
        self._p: RichProgress | None = None
        self._task = None

    def start(self, total: int, description: str = "") -> None:
        self.stop()
        self._p = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._p.start()
        self._task = self._p.add_task(description, total=total, info="")

    def advance(self, n: int = 1, **fields) -> None:
        """Advance the bar; ``expected_total`` (the solver's estimate of the products it needs) sets
        the total the remaining time is estimated from; other fields are shown beside the bar."""
        if self._p is not None:
            expected = fields.pop("expected_total", None)
            info = " ".join(f"{k}={v}" for k, v in fields.items())
            self._p.update(self._task, advance=n, info=info, **({"total": expected} if expected else {}))

    def stop(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None


class LineProgress(Progress):
    """Progress for a log (stderr not a terminal): one plain line every ``every`` seconds with the
    work done, the fields (residual, ...), the time elapsed and an estimate of the time left."""

    def __init__(self, every: float = 30.0):
        self.every = every
        self._t0 = self._last = 0.0
        self._done = 0
        self._total = 0
        self._what = ""

    def start(self, total: int, description: str = "") -> None:
        """Begin a task of ``total`` steps (a line only once ``every`` seconds have passed)."""
        import time

        self._t0 = self._last = time.monotonic()
        self._done, self._total, self._what = 0, total, description

    def advance(self, n: int = 1, **fields) -> None:
        """Count ``n`` steps; print a line when ``every`` seconds passed since the last one."""
        import time

        self._done += n
        self._total = fields.pop("expected_total", None) or self._total
        now = time.monotonic()
        if now - self._last < self.every:
            return
        self._last = now
        elapsed = now - self._t0
        left = elapsed / self._done * max(self._total - self._done, 0) if self._done else math.nan
        info = " ".join(f"{k}={v}" for k, v in fields.items())
        eta = f", ~{left:.0f} s left" if math.isfinite(left) else ""
        sys.stderr.write(f"{self._what}: {self._done}/{self._total} {info} ({elapsed:.0f} s elapsed{eta})\n")
        sys.stderr.flush()

    def stop(self) -> None:
        """Nothing to clean up."""


def make_progress(console: Console, quiet: bool) -> Progress:
    """A Rich bar when stderr is a terminal, a line every 30 s when it is a log (a training job's),
    nothing with ``--quiet``."""
    if quiet:
        return NullProgress()
    if not sys.stderr.isatty():
        return LineProgress()
    return RichBar(console)


def fmt_num(x, digits: int = 5) -> str:
    """A number for a table: thousands separators for integers, digits significant figures otherwise, em dash for None."""
    if x is None:
        return "—"
    if isinstance(x, int):
        return f"{x:,}"
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e5:
        return f"{x:.{digits}g}"
    return f"{x:.{max(digits - 1, 1)}e}"


def summary_table(summary: dict, title: str = "Hessian") -> Table:
    """Per block: name, shape, size, trace, λmax, λmin, negative eigenvalues; then the totals."""
    approx = summary.get("approximation")
    t = Table(title=f"{title} ({summary.get('mode')}{', block-diagonal' if approx else ''})", title_justify="left")
    for col, just in (("block", "left"), ("shape", "left"), ("size", "right"), ("trace", "right"),
                      ("λmax", "right"), ("λmin", "right"), ("negative", "right")):
        t.add_column(col, justify=just)
    for b in summary.get("blocks", []):
        shapes = ", ".join("×".join(str(d) for d in s) if s else "scalar" for s in (b.get("shapes") or []) if s is not None)
        t.add_row(b["name"], shapes, fmt_num(b.get("size")), fmt_num(b.get("trace")), fmt_num(b.get("lambda_max")),
                  fmt_num(b.get("lambda_min")), fmt_num(b.get("n_negative")))
    if len(summary.get("blocks", [])) != 1:
        t.add_section()
        t.add_row("total", "", fmt_num(summary.get("n_params")), fmt_num(summary.get("trace")),
                  fmt_num(summary.get("lambda_max")), fmt_num(summary.get("lambda_min")), fmt_num(summary.get("n_negative")))
    return t


def summary_footer(summary: dict) -> str:
    parts = [
        f"P = {fmt_num(summary.get('n_params'))}",
        f"samples = {fmt_num(summary.get('n_samples'))}",
        f"loss = {summary.get('loss')} ({summary.get('reduction')})",
        f"{summary.get('dtype')} on {summary.get('device')}",
    ]
    if summary.get("hvps") is not None:
        parts.append(f"{fmt_num(summary.get('hvps'))} HVPs")
    if summary.get("seconds") is not None:
        parts.append(f"{summary['seconds']:.2f} s")
    if summary.get("asymmetry") is not None:
        parts.append(f"asymmetry {summary['asymmetry']:.1e}")
    if summary.get("negative_threshold"):
        parts.append(f"negative below −{summary['negative_threshold']:.1e}")
    return " · ".join(parts)
