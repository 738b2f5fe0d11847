"""``hesscli track``: sharpness across a training run's checkpoints (the library is
:mod:`hesscli.tracking`; this module parses options, iterates its rows and renders them).

On a terminal a Rich table grows by one row per checkpoint (with the eigensolver's progress under
it); otherwise, unless ``--quiet``, each row is one line on stderr as it is done. ``--json`` prints
each row as one JSON object on one line of stdout (JSON Lines, flushed), in step order. SIGINT stops
the run with exit 130; the output file then holds every finished row.
"""


import enum
import json
import math
import sys
from typing import Annotated, Optional

import typer

from hesscli.cli.base import Common, Interrupted, app, with_options
from hesscli.errors import UsageError
from hesscli.runtime.progress import Progress

__all__ = ["track", "TrackDisplay"]


class TrackWhich(str, enum.Enum):
    largest = "largest"
    both = "both"


def _options(spec_kw: dict) -> dict:
    """The model options as the library's keyword arguments (enums as their values, no data)."""
    return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in spec_kw.items() if k != "data"}


class TrackDisplay(Progress):
    """The rows on stderr: a live Rich table on a terminal (the eigensolver's progress under it),
    else one line per row; nothing with ``quiet``. Also the library's :class:`Progress`."""

    def __init__(self, console, quiet: bool, interactive: bool, which: str, trace: bool, lr_known: bool, rule: str):
        from rich.table import Table

        self.con, self.quiet, self.interactive = console, quiet, interactive and not quiet
        self.both, self.trace, self.lr_known = which == "both", trace, lr_known
        self.table = Table(title="sharpness across checkpoints", title_justify="left")
        cols = ["step", "λmax"] + (["λmin"] if self.both else []) + ["residual", "matvecs", "dᵀHd/‖d‖²", "loss"]
        cols += (["trace", "± stderr"] if trace else []) + ([rule.split(" ")[0]] if lr_known else []) + ["start"]
        for c in cols:
            self.table.add_column(c, justify="left" if c == "start" else "right")
        self.status = ""
        self._live = None
        self._total = self._done = 0
        self._info = ""

    # Progress (the eigensolver's, per checkpoint)
    def start(self, total: int, description: str = "") -> None:
        """A checkpoint's eigensolver (or trace) starts."""
        self.status, self._total, self._done, self._info = description, total, 0, ""

    def advance(self, n: int = 1, **fields) -> None:
        """``n`` more products."""
        self._done += n
        self._info = " ".join(f"{k}={v}" for k, v in fields.items())

    def stop(self) -> None:
        """The eigensolver (or trace) is done."""
        self.status = ""

    def __rich__(self):
        from rich.text import Text

        if not self.status:
            return Text("")
        return Text(f"{self.status}: {self._done} products {self._info}", style="dim")

    def __enter__(self) -> "TrackDisplay":
        if self.interactive:
            from rich.console import Group
            from rich.live import Live

            self._live = Live(Group(self.table, self), console=self.con, refresh_per_second=4, transient=False)
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        self.status = ""
        if self._live is not None:
            self._live.stop()
            self._live = None

    def add(self, row) -> None:
        """Show a finished row: a new table row on a terminal, else one line."""
        from hesscli.cli.console import fmt_num

        def num(x):
            return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt_num(float(x))

        res = row.residual
        cells = [str(row.step), f"{row.lambda_max:.6g}"] + ([num(row.lambda_min)] if self.both else [])
        cells += [f"{res:.1e}" + ("" if row.all_converged else " (not converged)") if math.isfinite(res) else "—",
                  fmt_num(int(row.matvecs)), num(row.update_curvature), num(row.loss)]
        if self.trace:
            cells += [num(row.trace), num(row.trace_stderr)]
        if self.lr_known:
            cells.append(num(row.threshold))
        cells.append("kept" if row.kept else ("warm" if row.warm else "cold"))
        self.table.add_row(*cells)
        if self.quiet or self.interactive:
            return
        head = [c.header for c in self.table.columns]
        self.con.print("  ".join(f"{h} {v}" for h, v in zip(head, cells)), markup=False, highlight=False, soft_wrap=True)


@app.command()
@with_options()
def track(
    checkpoints: Annotated[Optional[list[str]], typer.Argument(
        help="Checkpoint files or directories of any format hesscli reads, or quoted globs (expanded by hesscli), "
             "sorted by step.")] = None,
    *,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Largest eigenvalues per checkpoint.")] = 1,
    which: Annotated[TrackWhich, typer.Option("--which", help="largest, or both (also the top-k smallest).")] = TrackWhich.largest,
    tol: Annotated[Optional[float], typer.Option("--tol", help="Converged when ‖Hv − λv‖ ≤ tol·‖H‖₂ (default 1e-5; 1e-6 with --dtype float64).")] = None,
    max_matvecs: Annotated[Optional[int], typer.Option("--max-matvecs", min=1, help="Budget of eigensolver products per checkpoint (default max(1000, 50·k)).")] = None,
    block_size: Annotated[Optional[int], typer.Option("--block-size", min=1, help="Vectors per Lanczos block (default min(4, k)).")] = None,
    trace: Annotated[bool, typer.Option("--trace", help="Also tr H ± stderr per checkpoint (Hutch++; exact when P ≤ --trace-matvecs).")] = False,
    trace_matvecs: Annotated[int, typer.Option("--trace-matvecs", min=1, help="Products per trace estimate.")] = 300,
    lr: Annotated[Optional[float], typer.Option("--lr", help="The step size η: the threshold 2/η is drawn and stored.")] = None,
    momentum: Annotated[Optional[float], typer.Option("--momentum", help="Heavy-ball momentum β: the threshold becomes (2 + 2β)/η.")] = None,
    lr_from: Annotated[Optional[str], typer.Option("--lr-from", help="η per step from a trainer_state.json (log_history) or a CSV with step,lr columns.")] = None,
    follow: Annotated[Optional[str], typer.Option("--follow", help="Watch this directory for new checkpoints until SIGINT or --until.")] = None,
    until: Annotated[Optional[int], typer.Option("--until", help="With --follow: stop once a checkpoint at or past this step is done.")] = None,
    poll: Annotated[float, typer.Option("--poll", min=0.01, help="With --follow: seconds between looks at the directory.")] = 1.0,
    no_warm_start: Annotated[bool, typer.Option("--no-warm-start", help="Start each eigensolver from a seeded random block (as spectrum) instead of the previous checkpoint's Ritz vectors.")] = False,
    plot: Annotated[Optional[str], typer.Option("--plot", help="Save a PNG of λmax (and λmin, the update curvature) against the step, with the stability threshold; needs matplotlib.")] = None,
    spec_kw: dict,
    common: Common,
) -> int:
    """Sharpness (top Hessian eigenvalues) across a training run's checkpoints: warm-started, resumable, plotted against 2/η."""
    from pathlib import Path

    from hesscli import tracking
    from hesscli.cli.console import err_console, fmt_num
    from hesscli.io.resultfile import check_output
    from hesscli.runtime import distributed

    if distributed.from_env() is not None:
        raise UsageError("track runs in one process: start it without torchrun")
    if not spec_kw.get("data"):
        raise UsageError("track needs --data FILE")
    if not checkpoints and follow is None:
        raise UsageError("name the checkpoints (files, directories or a quoted glob), or --follow DIR")
    out = common.out or "track.npz"
    which = TrackWhich(which).value
    con = err_console()
    resuming = Path(out).exists() and not common.force
    if plot:
        if Path(plot).resolve() == Path(out).resolve():
            raise UsageError(f"--plot '{plot}' is the output file")
        check_output(plot, common.force or resuming)
    lr_known = lr is not None or lr_from is not None
    display = TrackDisplay(con, common.quiet, sys.stderr.isatty(), which, trace, lr_known,
                           tracking.threshold_rule(momentum))
    run = tracking.track(
        checkpoints or [], list(spec_kw["data"]), out=out, force=common.force, top_k=top_k, which=which, tol=tol,
        max_matvecs=max_matvecs, block_size=block_size, warm_start=not no_warm_start, trace=trace,
        trace_matvecs=trace_matvecs, lr=lr, momentum=momentum, lr_from=lr_from, follow=follow, until=until,
        poll_seconds=poll, progress=display if display.interactive else None, **_options(spec_kw),
    )
    shown = set()
    if not common.quiet:
        for n in run.notes:
            con.print(f"note: {n}", markup=False, soft_wrap=True)
            shown.add(n)
        if follow is not None:
            con.print(f"watching {follow} for new checkpoints" + (f" until step {until}" if until is not None else "")
                      + " (Ctrl-C stops)", markup=False)
    done = 0
    try:
        with display:
            for row in run:
                done += 1
                if common.json:
                    sys.stdout.write(json.dumps(row.summary(), allow_nan=False) + "\n")
                    sys.stdout.flush()
                display.add(row)
                if plot:
                    tracking.plot_sharpness(plot, run.result)
    except (Interrupted, KeyboardInterrupt):
        if not common.quiet:
            sys.stderr.write(f"track: stopped after {done} checkpoint(s); {out} holds the {len(run.finished)} "
                             "finished row(s)\n")
        raise
    result = run.result
    if plot:
        tracking.plot_sharpness(plot, result)
    if common.quiet:
        return result.exit_code
    s = result.summary()
    parts = [f"{s['n_checkpoints']} checkpoint(s)", f"{fmt_num(s['matvecs'])} eigensolver products",
             "warm starts" if not no_warm_start else "random starts"]
    if s.get("n_params"):
        parts.append(f"P = {fmt_num(s['n_params'])}")
    if s.get("dtype"):
        parts.append(f"{s['dtype']} on {s.get('device')}")
    tol = s.get("tol") or tol
    parts.append(f"tol {tol:g}·‖H‖₂")
    if s.get("seconds") is not None:
        parts.append(f"{s['seconds']:.2f} s")
    con.print(" · ".join(parts), markup=False, soft_wrap=True)
    for n in result.notes:
        if n in shown:
            continue
        if n.startswith("warning: "):
            con.print(f"[yellow]warning:[/yellow] {n[len('warning: '):]}", highlight=False)
        else:
            con.print(f"note: {n}", markup=False, soft_wrap=True)
    bad = [str(r["step"]) for r in s["rows"] if not r.get("converged")]
    if bad:
        con.print(f"[yellow]warning:[/yellow] not every pair converged to {tol:g}·‖H‖₂ at step(s) {', '.join(bad[:10])}"
                  f"{' …' if len(bad) > 10 else ''}; raise --max-matvecs or --tol (the rows are written, "
                  "'converged' says which)", highlight=False)
    if plot:
        con.print(f"plot: {plot}", markup=False)
    con.print(f"wrote {out}", markup=False)
    return result.exit_code
