"""Human output of each command's result, on stderr: Rich tables and footers built from the
result's summary (the same dict ``--json`` prints), so what people read is what machines parse."""

from __future__ import annotations

import math

import numpy as np
from rich.console import Console
from rich.table import Table

from hesscli.algorithms.density import text_histogram
from hesscli.cli.console import fmt_num, summary_footer, summary_table
from hesscli.runtime.memory import fmt_bytes

__all__ = ["render_compute", "render_spectrum", "render_trace", "render_density", "render_inspect", "RENDERERS"]


def _notes(con: Console, summary: dict) -> None:
    for n in summary.get("notes") or []:
        if not n.startswith("warning: "):  # the warnings follow
            con.print(f"note: {n}", markup=False)
    for w in summary.get("warnings") or []:
        con.print(f"[yellow]warning:[/yellow] {w}")


def _wrote(con: Console, summary: dict) -> None:
    if summary.get("out") and summary.get("command") != "show":
        con.print(f"wrote {summary['out']}")


def render_compute(con: Console, summary: dict, title: str = "Hessian") -> None:
    """compute, merge and show of a compute result: per block trace, λmax, λmin, negatives."""
    con.print(summary_table(summary, title=title))
    con.print(summary_footer(summary))
    _notes(con, summary)


def _footer(summary: dict) -> str:
    parts = [f"P = {fmt_num(summary.get('n_params'))}"]
    src = summary.get("source") or {}
    parts.append(f"source: {src.get('kind')} {src.get('path')}")
    if summary.get("dtype"):
        parts.append(f"{summary['dtype']} on {summary.get('device')}")
    if summary.get("symmetry_probe") is not None:
        cost = summary.get("symmetry_probe_hvps")
        parts.append(f"symmetry probe {summary['symmetry_probe']:.1e}" + (f" ({cost} HVPs)" if cost is not None else ""))
    if summary.get("hvps"):
        parts.append(f"{fmt_num(summary['hvps'])} HVPs")
    if summary.get("seconds") is not None:
        parts.append(f"{summary['seconds']:.2f} s")
    if summary.get("approximation"):
        parts.append(f"approximation: {summary['approximation']} (one answer per diagonal block, not H's)")
    return " · ".join(parts)


def _residual(x) -> str:
    vals = [v for v in np.atleast_1d(np.asarray(x, dtype=object)) if v is not None]
    worst = float(np.max(np.asarray(vals, dtype=float))) if vals else math.nan
    return f"{worst:.1e}" if math.isfinite(worst) else "—"  # NaN/None: not measured


def render_spectrum(con: Console, summary: dict) -> None:
    """The wanted eigenvalues with residuals; per block, one row per block first."""
    which, top_k, tol = summary.get("which"), summary.get("top_k"), summary.get("tol")
    blocks = summary.get("blocks") or []
    approx = summary.get("approximation")
    if blocks:
        tb = Table(title=f"spectrum per block ({which}, top {top_k})", title_justify="left")
        for c in ("block", "size", "λmax found", "λmin found", "worst residual", "converged", "matvecs"):
            tb.add_column(c, justify="left" if c == "block" else "right")
        for b in blocks:
            ev, conv = [x for x in b["eigenvalues"] if x is not None], b["converged"]  # None: not computed
            tb.add_row(b["name"], fmt_num(b["size"]), fmt_num(max(ev) if ev else None), fmt_num(min(ev) if ev else None),
                       _residual(b["residuals"]),
                       f"{sum(bool(c) for c in conv)}/{len(conv)}", fmt_num(b["matvecs"]))
        con.print(tb)
    if approx:
        con.print("block-diagonal part: eigenvalues of the diagonal blocks, not of H", markup=False)
    tb = Table(title=f"spectrum ({which}, top {top_k}{', block-diagonal part' if approx else ''})", title_justify="left")
    for c in ("#", "eigenvalue", "residual", "converged"):
        tb.add_column(c, justify="right")
    evs = summary["eigenvalues"]
    for i in sorted(range(len(evs)), key=lambda j: -evs[j]):
        tb.add_row(str(len(tb.rows) + 1), f"{evs[i]:.10g}", _residual(summary["residuals"][i]),
                   "yes" if summary["converged"][i] else "[red]no[/red]")
    con.print(tb)
    norm = summary.get("norm_estimate")
    con.print(_footer(summary) + f" · {fmt_num(summary['matvecs'])} products · tol {tol:g}·‖H‖₂"
              + (f" (‖H‖₂ ≈ {norm:.6g})" if norm is not None else ""))
    _notes(con, summary)
    if summary.get("status") == "not_converged":
        con.print(f"[yellow]warning:[/yellow] not every pair converged to {tol:g}·‖H‖₂; raise --max-matvecs or --tol "
                  "(exit code 4; the result was written)")


def render_trace(con: Console, summary: dict) -> None:
    """The trace ± standard error; per block, one row per block and the total."""
    blocks = summary.get("blocks") or []
    multi = bool(blocks)
    title = "trace" + (" per block" if multi else "")
    if summary.get("approximation"):  # the blocks' traces add up to tr H: the diagonal blocks hold the whole diagonal
        title += " (diagonal blocks of H; their total is tr H)"
    tb = Table(title=title, title_justify="left")
    for c in ("block", "size", "trace", "± stderr", "method", "matvecs"):
        tb.add_column(c, justify="left" if c in ("block", "method") else "right")
    rows = blocks if multi else [{"name": "all", "size": summary.get("n_params"), "trace": summary["trace"],
                                  "stderr": summary["stderr"], "method": summary["method"], "matvecs": summary["matvecs"]}]
    for b in rows:
        tb.add_row(b["name"], fmt_num(b["size"]), f"{b['trace']:.8g}", f"{b['stderr']:.2g}", str(b["method"]),
                   fmt_num(b["matvecs"]))
    if multi:
        tb.add_section()
        tb.add_row("total", fmt_num(summary["n_params"]), f"{summary['trace']:.8g}", f"{summary['stderr']:.2g}", "",
                   fmt_num(summary["matvecs"]))
    con.print(tb)
    con.print(_footer(summary))
    if summary.get("note"):
        chosen = summary["method"] if isinstance(summary["method"], list) else [summary["method"]]
        con.print(f"note: --method auto chose {', '.join(chosen)}" + (" (P ≤ --matvecs or a stored matrix)"
                  if chosen == ["exact"] else " (P > --matvecs)"))
    _notes(con, summary)


def render_density(con: Console, summary: dict, grid=None, density=None) -> None:
    """A per-block table, a text histogram of the density (log-scale bars) and the footer."""
    blocks = summary.get("blocks") or []
    if blocks:
        tb = Table(title="density per block", title_justify="left")
        for c in ("block", "size", "λmin", "λmax", "σ", "method", "matvecs"):
            tb.add_column(c, justify="left" if c in ("block", "method") else "right")
        for b in blocks:
            tb.add_row(b["name"], fmt_num(b["size"]), fmt_num(b["lambda_min"]), fmt_num(b["lambda_max"]),
                       f"{b['sigma']:.2g}", b["method"], fmt_num(b["matvecs"]))
        con.print(tb)
    if grid is not None:
        con.print(f"eigenvalue density{' (block-diagonal part)' if blocks else ''}, mass per bin, log-scale bars:")
        con.print(text_histogram(np.asarray(grid), np.asarray(density)), markup=False, highlight=False)
    con.print(_footer(summary) + f" · {summary['method']} · σ = {summary['sigma']:.2g}")
    _notes(con, summary)
    if summary.get("plot"):
        con.print(f"plot: {summary['plot']}")


def render_inspect(con: Console, s: dict) -> None:
    """Parameters (frozen, tied), blocks with their dense memory, and what fits."""
    t = Table(title=f"{s['model']['path']} ({s['model']['format']}, {s['dtype']})", title_justify="left")
    for c, j in (("parameter", "left"), ("shape", "left"), ("size", "right"), ("", "left")):
        t.add_column(c, justify=j)
    alias_of: dict[str, list[str]] = {}
    for d in s.get("tied") or []:
        alias_of.setdefault(d["tied_to"], []).append(d["name"])
    frozen = 0
    for p in s["params"]:
        mark = ["frozen (requires_grad=False)"] if p["frozen"] else []
        mark += [f"tied: {', '.join(alias_of[p['name']])}"] if p["name"] in alias_of else []
        frozen += bool(p["frozen"])
        t.add_row(p["name"], "×".join(map(str, p["shape"])) or "scalar", fmt_num(p["size"]), "; ".join(mark))
    con.print(t)
    if frozen:
        con.print(f"{frozen} frozen tensor(s) included; --trainable-only leaves them out")
    bt = Table(title="blocks (--blocks module)", title_justify="left")
    for c, j in (("block", "left"), ("size", "right"), ("dense memory", "right")):
        bt.add_column(c, justify=j)
    for b in s["blocks"]:
        bt.add_row(b["name"], fmt_num(b["size"]), fmt_bytes(b["dense_bytes"]))
    con.print(bt)
    con.print(f"P = {s['n_params']:,} · full mode needs about {fmt_bytes(s['full_bytes'])} · block mode "
              f"{fmt_bytes(s['block_bytes'])} · default budget {fmt_bytes(s['default_budget'])} → {s['fits']}")
    if s.get("n_samples") is not None:
        con.print(f"{s['n_samples']:,} samples · loss {s['loss']} ({s['reduction']}) = {s['loss_value']:.6g}")


def render_track(con: Console, s: dict) -> None:
    """One row per checkpoint: step, λmax (λmin), residual, products, curvature along the update, loss."""
    tb = Table(title=f"sharpness across {s['n_checkpoints']} checkpoints ({s.get('which')}, top {s.get('top_k')})",
               title_justify="left")
    for c in ("step", "λmax", "λmin", "residual", "matvecs", "dᵀHd/‖d‖²", "loss", "lr", "2/η rule"):
        tb.add_column(c, justify="right")
    for r in s["rows"]:
        tb.add_row(str(r.get("step")), fmt_num(r.get("lambda_max")), fmt_num(r.get("lambda_min")),
                   _residual(r.get("residual")), fmt_num(r.get("matvecs")), fmt_num(r.get("update_curvature")),
                   fmt_num(r.get("loss")), fmt_num(r.get("lr")), fmt_num(r.get("threshold")))
    con.print(tb)
    con.print(f"{fmt_num(s.get('matvecs'))} eigensolver products · tol {s.get('tol')}·‖H‖₂ · warm start "
              f"{'on' if s.get('warm_start') else 'off'}" + (f" · threshold: {s['threshold_rule']}" if s.get("threshold_rule") else ""))
    _notes(con, s)


RENDERERS = {
    "track": render_track,
    "compute": render_compute,
    "merge": render_compute,
    "spectrum": render_spectrum,
    "trace": render_trace,
    "density": render_density,
    "inspect": render_inspect,
}
