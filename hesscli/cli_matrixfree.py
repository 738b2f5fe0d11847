"""``hesscli spectrum``, ``trace`` and ``density``: on a model (matrix-free, Hessian-vector products)
or on a ``compute`` result file (dense linear algebra on the stored matrices).

A source resolves to one or more named symmetric operators (:mod:`hesscli.operators`): the whole
Hessian, or with ``--per-block`` (and always for a block-mode result file) one diagonal block per
module. The algorithms (:mod:`hesscli.lanczos`, :mod:`hesscli.trace`, :mod:`hesscli.density`)
consume those; this module resolves the source, runs them, writes the result and formats it.
"""


import math
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from .api import _stage
from .cli import Common, _comm, app, emit, model_spec, with_options
from .errors import HesscliError, UsageError
from .operators import DenseOperator, HessianOperator, SymOperator

SOURCE_HELP = "A result file from 'hesscli compute' (default: hessian.npz) or a model file (then --data is needed)."


@dataclass
class Target:
    name: str
    start: int
    stop: int
    op: SymOperator | None
    eigenvalues: np.ndarray | None = None  # stored (a result file without matrices)
    trace: float | None = None


@dataclass
class Source:
    kind: str  # model | result
    path: str
    targets: list[Target]
    meta: dict
    per_block: bool
    approximation: str | None
    index: dict = field(default_factory=dict)  # param_names / param_offsets / block_names / block_offsets
    seconds: float = 0.0
    objective: object | None = None  # the Objective of a model source


def is_result_file(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return "meta.npy" in z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def open_source(source: str | None, spec_kw: dict, per_block: bool, command: str, comm=None) -> Source:
    """Resolve SOURCE (SPEC.md): a result file, or a model file with --data; probe a model's symmetry."""
    t0 = time.perf_counter()
    if source is None:
        if spec_kw.get("data"):
            raise UsageError("--data without SOURCE is ambiguous: name the model file (or a result file without --data)")
        source = "hessian.npz"
        if not Path(source).exists():
            raise HesscliError("no SOURCE given and no hessian.npz in the current directory: name a result file, "
                               "or a model file with --data")
    if not Path(source).exists():
        raise HesscliError(f"SOURCE '{source}' does not exist")
    if is_result_file(source):
        if spec_kw.get("data"):
            raise UsageError(f"'{source}' is a result file: --data applies to a model SOURCE only")
        src = _result_source(source, per_block, command)
    else:
        if not spec_kw.get("data"):
            raise UsageError(f"'{source}' is a model file: pass --data FILE (or give a result file from compute)")
        src = _model_source(source, spec_kw, per_block, command, comm)
    src.seconds = time.perf_counter() - t0
    return src


def _result_source(path: str, per_block: bool, command: str) -> Source:
    from .objective import param_blocks
    from .results import command_line, read_result, utc_now

    rf = read_result(path)
    meta = dict(rf.meta)
    mode = meta.get("mode")
    index = {k: rf[k] for k in ("param_names", "param_offsets") if k in rf}
    targets: list[Target] = []
    if mode == "full":
        H = rf.get("hessian")
        if per_block:
            names = [str(s) for s in rf["param_names"]]
            offs = [int(o) for o in rf["param_offsets"]]
            for b in param_blocks(names, offs, "module"):
                op = DenseOperator(H[b.start : b.stop, b.start : b.stop]) if H is not None else None
                targets.append(Target(b.name, b.start, b.stop, op))
        else:
            P = int(rf["param_offsets"][-1]) if "param_offsets" in rf else len(rf["eigenvalues"])
            targets.append(Target("all", 0, P, DenseOperator(H) if H is not None else None,
                                  rf.get("eigenvalues"), float(rf["trace"]) if "trace" in rf else None))
        approximation = None
    elif mode == "block":
        offs = [int(o) for o in rf["block_offsets"]]
        for i, name in enumerate(rf.block_names):
            H = rf.get(f"blocks/{name}/hessian")
            tr = rf.get(f"blocks/{name}/trace")
            targets.append(Target(name, offs[i], offs[i + 1], DenseOperator(H) if H is not None else None,
                                  rf.get(f"blocks/{name}/eigenvalues"), float(tr) if tr is not None else None))
        per_block = True
        approximation = "block-diagonal"
    else:
        raise HesscliError(f"'{path}' is a '{meta.get('command')}' result; {command} reads compute results (full or block mode)")
    meta.update(
        command=command,
        command_line=command_line(),
        created=utc_now(),
        source={"kind": "result", "path": str(path), "mode": mode},
        hvps=0,
    )
    for k in ("max_memory", "chunk_size", "symmetric", "hessian_seconds"):
        meta.pop(k, None)
    return Source("result", path, targets, meta, per_block, approximation, index)


def _model_source(path: str, spec_kw: dict, per_block: bool, command: str, comm=None) -> Source:
    from .api import base_meta, open_session
    from .dense import asymmetry_tolerance

    session = open_session(model_spec(path, spec_kw), comm)
    obj = session.objective
    h0 = obj.hvps
    probe, where = obj.symmetry_probe(spec_kw.get("seed", 0))
    tol = asymmetry_tolerance(obj.dtype)
    if not math.isfinite(probe):
        raise HesscliError(
            f"the Hessian-vector products contain NaN or Inf (largest trouble between parameters {where}); "
            "check the weights, the inputs and the loss"
        )
    if probe > tol:
        raise HesscliError(
            f"the Hessian-vector products are not symmetric: relative asymmetry {probe:.2e} > {tol:.0e}, largest "
            f"between parameters {where}; some op in the model has a wrong second derivative in torch"
        )
    meta = base_meta(command, session, source={"kind": "model", "path": str(path)}, symmetry_probe=probe,
                     symmetry_probe_at=where, symmetry_probe_hvps=obj.hvps - h0, mode="matrix-free")
    blocks = obj.blocks("module") if per_block else obj.blocks("all")
    targets = [Target(b.name, b.start, b.stop, HessianOperator(obj, None if not per_block else b)) for b in blocks]
    if comm is not None:  # every rank must cut its products into the same chunks (one collective each)
        for t in targets:
            t.op.chunk = int(comm.minimum(t.op.chunk))
    index = {"param_names": np.array(obj.names, dtype=str), "param_offsets": np.array(obj.offsets, dtype=np.int64)}
    return Source("model", path, targets, meta, per_block, None, index, objective=obj)


def _start(common: Common, default_out: str):
    """The output path, the torchrun communicator (or None) and whether this rank writes; the
    output is checked before any work, on the writing rank, and every rank learns of a refusal."""
    from .results import check_output

    out = common.out or default_out
    comm = _comm()
    writer = comm is None or comm.rank == 0
    with _stage(comm):
        if writer:
            check_output(out, common.force)
    return out, comm, writer


def _block_index(src: Source) -> dict:
    arrays = dict(src.index)
    arrays["block_names"] = np.array([t.name for t in src.targets], dtype=str)
    arrays["block_offsets"] = np.array([t.start for t in src.targets] + [src.targets[-1].stop], dtype=np.int64)
    return arrays


def _hvps(src: Source) -> int:
    return int(src.objective.hvps) if src.objective is not None else 0


def _finish(src: Source, arrays: dict, meta_extra: dict, out: str, force: bool, t0: float, writer: bool = True) -> dict:
    from .results import write_result

    meta = dict(src.meta)
    meta.update(meta_extra)
    meta["hvps"] = _hvps(src)
    meta["per_block"] = src.per_block
    meta["approximation"] = src.approximation
    meta["seconds"] = time.perf_counter() - t0
    if writer:
        write_result(out, arrays, meta, force)
    return meta


def _summary_head(src: Source, command: str, out: str, meta: dict, status: str = "ok") -> dict:
    return {
        "status": status,
        "command": command,
        "out": out,
        "source": {"kind": src.kind, "path": src.path},
        "approximation": src.approximation,
        "per_block": src.per_block,
        "n_params": int(src.targets[-1].stop),
        "dtype": meta.get("dtype"),
        "device": meta.get("device"),
        "symmetry_probe": meta.get("symmetry_probe"),
        "symmetry_probe_hvps": meta.get("symmetry_probe_hvps"),
        "hvps": meta.get("hvps"),
        "seconds": meta.get("seconds"),
    }


def _footer(summary: dict) -> str:
    from .console import fmt_num

    parts = [f"P = {fmt_num(summary.get('n_params'))}", f"source: {summary['source']['kind']} {summary['source']['path']}"]
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
        parts.append(f"approximation: {summary['approximation']} (one answer per block)")
    return " · ".join(parts)


# ---------------------------------------------------------------------------------------------
# spectrum


@app.command()
@with_options()
def spectrum(
    source: Annotated[Optional[str], typer.Argument(help=SOURCE_HELP)] = None,
    *,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Number of eigenpairs.")] = 20,
    which: Annotated[str, typer.Option("--which", help="largest, smallest, both (half each end) or magnitude.")] = "largest",
    tol: Annotated[float, typer.Option("--tol", help="Converged when ‖Hv − λv‖ ≤ tol·‖H‖₂.")] = 1e-6,
    max_matvecs: Annotated[Optional[int], typer.Option("--max-matvecs", help="Budget of products per operator (default max(1000, 50·k)).")] = None,
    block_size: Annotated[Optional[int], typer.Option("--block-size", help="Vectors per Lanczos block (default min(4, k)); at least the multiplicity you expect.")] = None,
    per_block: Annotated[bool, typer.Option("--per-block", help="The same for each module's diagonal block.")] = False,
    eigenvectors: Annotated[bool, typer.Option("--eigenvectors", help="Store the eigenvectors (P, k).")] = False,
    spec_kw: dict,
    common: Common,
) -> int:
    """Extreme eigenvalues with residuals: block Lanczos on a model, eigh on a result file."""
    from .console import err_console, make_progress
    from .lanczos import WHICH, lanczos, select

    if which not in WHICH:
        raise UsageError(f"--which '{which}': choose {', '.join(WHICH)}")
    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1 (got {top_k})")
    if not (tol > 0):
        raise UsageError(f"--tol must be positive (got {tol})")
    t0 = time.perf_counter()
    out, comm, writer = _start(common, "spectrum.npz")
    con = err_console()
    src = open_source(source, spec_kw, per_block, "spectrum", comm)
    seed = spec_kw.get("seed", 0)
    results = []
    for t in src.targets:
        if t.op is None:
            raise HesscliError(f"'{src.path}' stores no Hessian for '{t.name}' (written with --no-dense): spectrum needs the matrix")
        progress = make_progress(con, common.quiet)
        r = lanczos(t.op, top_k, which, tol, max_matvecs, block_size, seed=seed, eigenvectors=eigenvectors, progress=progress)
        results.append(r)
    arrays: dict = {}
    blocks = []
    multi = len(src.targets) > 1 or src.per_block
    for t, r in zip(src.targets, results, strict=True):
        if multi:
            p = f"blocks/{t.name}/"
            arrays[p + "eigenvalues"] = r.eigenvalues
            arrays[p + "residuals"] = r.residuals
            arrays[p + "converged"] = r.converged
            arrays[p + "matvecs"] = np.int64(r.matvecs)
            if r.eigenvectors is not None:
                arrays[p + "eigenvectors"] = r.eigenvectors
        blocks.append({
            "name": t.name, "size": t.stop - t.start, "eigenvalues": r.eigenvalues, "residuals": r.residuals,
            "converged": r.converged, "norm": r.norm, "matvecs": r.matvecs, "restarts": r.restarts,
            "method": r.method, "block_size": r.block_size, "seconds": r.seconds, "notes": r.notes,
        })
    # the whole operator's answer (per block: the extreme pairs of the block-diagonal part)
    ev = np.concatenate([r.eigenvalues for r in results])
    res = np.concatenate([r.residuals for r in results])
    conv = np.concatenate([r.converged for r in results])
    order = np.argsort(ev, kind="stable")
    pick = order[select(ev[order], top_k, which)]
    arrays.update(eigenvalues=ev[pick], residuals=res[pick], converged=conv[pick])
    if eigenvectors and not multi:
        arrays["eigenvectors"] = results[0].eigenvectors
    arrays["matvecs"] = np.int64(sum(r.matvecs for r in results))
    arrays.update(_block_index(src))
    all_conv = bool(all(r.converged.all() for r in results))
    norm = max(r.norm for r in results)
    meta = _finish(src, arrays, {
        "top_k": top_k, "which": which, "tol": tol, "max_matvecs": max_matvecs, "block_size": results[0].block_size,
        "matvecs": int(arrays["matvecs"]), "method": results[0].method, "norm_estimate": norm, "converged": all_conv,
    }, out, common.force, t0, writer)
    status = "ok" if all_conv else "not_converged"
    summary = _summary_head(src, "spectrum", out, meta, status)
    summary.update(
        which=which, top_k=top_k, tol=tol, norm_estimate=norm, method=results[0].method,
        eigenvalues=arrays["eigenvalues"], residuals=arrays["residuals"], converged=arrays["converged"],
        matvecs=int(arrays["matvecs"]), blocks=blocks if multi else [],
    )
    notes = [f"{t.name}: {n}" if multi else n for t, r in zip(src.targets, results, strict=True) for n in r.notes]
    summary["notes"] = list(meta.get("notes") or []) + notes
    if not multi:
        summary.update(restarts=results[0].restarts, block_size=results[0].block_size)

    def render():
        from rich.table import Table

        from .console import fmt_num

        if multi:
            tb = Table(title=f"spectrum per block ({which}, top {top_k})", title_justify="left")
            for c in ("block", "size", "λmax found", "λmin found", "worst residual", "converged", "matvecs"):
                tb.add_column(c, justify="left" if c == "block" else "right")
            for b in blocks:
                tb.add_row(b["name"], fmt_num(b["size"]), fmt_num(float(b["eigenvalues"][-1])), fmt_num(float(b["eigenvalues"][0])),
                           f"{float(np.max(b['residuals'])):.1e}", f"{int(np.sum(b['converged']))}/{len(b['converged'])}",
                           fmt_num(b["matvecs"]))
            con.print(tb)
        tb = Table(title=f"spectrum ({which}, top {top_k}{', block-diagonal part' if src.approximation else ''})",
                   title_justify="left")
        for c in ("#", "eigenvalue", "residual", "converged"):
            tb.add_column(c, justify="right")
        evs = arrays["eigenvalues"]
        for i in np.argsort(-evs, kind="stable"):
            tb.add_row(str(len(tb.rows) + 1), f"{evs[i]:.10g}", f"{arrays['residuals'][i]:.1e}",
                       "yes" if arrays["converged"][i] else "[red]no[/red]")
        con.print(tb)
        con.print(_footer(summary) + f" · {fmt_num(summary['matvecs'])} products · tol {tol:g}·‖H‖₂ (‖H‖₂ ≈ {norm:.6g})")
        for n in notes:
            con.print(f"note: {n}", markup=False)
        if not all_conv:
            con.print(f"[yellow]warning:[/yellow] not every pair converged to {tol:g}·‖H‖₂; raise --max-matvecs or --tol "
                      "(exit code 4; the result was written)")
        con.print(f"wrote {out}")

    if writer:
        emit(summary, common, render)
    return 0 if all_conv else 4


# ---------------------------------------------------------------------------------------------
# trace


@app.command()
@with_options()
def trace(
    source: Annotated[Optional[str], typer.Argument(help=SOURCE_HELP)] = None,
    *,
    method: Annotated[str, typer.Option("--method", help="auto, exact, hutchinson, hutchpp or xtrace.")] = "auto",
    matvecs: Annotated[int, typer.Option("--matvecs", help="Products per estimate (per block with --per-block).")] = 300,
    per_block: Annotated[bool, typer.Option("--per-block", help="The same for each module's diagonal block.")] = False,
    spec_kw: dict,
    common: Common,
) -> int:
    """The trace of the Hessian: exact, or estimated (Hutchinson, Hutch++, XTrace) with a standard error."""
    from .console import err_console, make_progress
    from .trace import METHODS, TraceResult, combine, estimate_trace

    if method not in METHODS:
        raise UsageError(f"--method '{method}': choose {', '.join(METHODS)}")
    if matvecs < 1:
        raise UsageError(f"--matvecs must be at least 1 (got {matvecs})")
    t0 = time.perf_counter()
    out, comm, writer = _start(common, "trace.npz")
    con = err_console()
    src = open_source(source, spec_kw, per_block, "trace", comm)
    seed = spec_kw.get("seed", 0)
    results = []
    for i, t in enumerate(src.targets):
        if t.op is None:
            if t.trace is None:
                raise HesscliError(f"'{src.path}' stores neither a Hessian nor a trace for '{t.name}'")
            results.append(TraceResult(t.trace, 0.0, "exact", 0, 0.0))
            continue
        results.append(estimate_trace(t.op, method, matvecs, seed + i, make_progress(con, common.quiet)))
    total, stderr = combine(results)
    chosen = sorted({r.method for r in results})
    auto_note = f"auto chose {', '.join(chosen)}" if method == "auto" else None
    arrays: dict = {"trace": np.float64(total), "trace_stderr": np.float64(stderr),
                    "matvecs": np.int64(sum(r.matvecs for r in results))}
    multi = len(src.targets) > 1 or src.per_block
    blocks = []
    for t, r in zip(src.targets, results, strict=True):
        if multi:
            p = f"blocks/{t.name}/"
            arrays[p + "trace"] = np.float64(r.trace)
            arrays[p + "trace_stderr"] = np.float64(r.stderr)
            arrays[p + "matvecs"] = np.int64(r.matvecs)
        blocks.append({"name": t.name, "size": t.stop - t.start, "trace": r.trace, "stderr": r.stderr,
                       "method": r.method, "matvecs": r.matvecs, "seconds": r.seconds})
    arrays.update(_block_index(src))
    meta = _finish(src, arrays, {"method": chosen[0] if len(chosen) == 1 else chosen, "method_requested": method,
                                 "matvecs": int(arrays["matvecs"]), "matvecs_per_estimate": matvecs, "trace": total,
                                 "seeds": [seed + i for i in range(len(src.targets))],
                                 "trace_stderr": stderr}, out, common.force, t0, writer)
    summary = _summary_head(src, "trace", out, meta)
    summary.update(trace=total, stderr=stderr, trace_stderr=stderr, method=chosen[0] if len(chosen) == 1 else chosen,
                   method_requested=method, matvecs=int(arrays["matvecs"]), blocks=blocks if multi else [])
    if auto_note:
        summary["note"] = auto_note

    def render():
        from rich.table import Table

        from .console import fmt_num

        tb = Table(title="trace" + (" per block" if multi else ""), title_justify="left")
        for c in ("block", "size", "trace", "± stderr", "method", "matvecs"):
            tb.add_column(c, justify="left" if c in ("block", "method") else "right")
        for b in blocks:
            tb.add_row(b["name"], fmt_num(b["size"]), f"{b['trace']:.8g}", f"{b['stderr']:.2g}", b["method"], fmt_num(b["matvecs"]))
        if multi:
            tb.add_section()
            tb.add_row("total", fmt_num(summary["n_params"]), f"{total:.8g}", f"{stderr:.2g}", "", fmt_num(summary["matvecs"]))
        con.print(tb)
        con.print(_footer(summary))
        if auto_note:
            con.print(f"note: --method auto chose {', '.join(chosen)}"
                      + (" (P ≤ --matvecs or a stored matrix)" if chosen == ["exact"] else f" (P > --matvecs = {matvecs})"))
        con.print(f"wrote {out}")

    if writer:
        emit(summary, common, render)
    return 0


# ---------------------------------------------------------------------------------------------
# density


@app.command()
@with_options()
def density(
    source: Annotated[Optional[str], typer.Argument(help=SOURCE_HELP)] = None,
    *,
    runs: Annotated[int, typer.Option("--runs", help="Random start vectors (SLQ).")] = 10,
    steps: Annotated[int, typer.Option("--steps", help="Lanczos steps per run.")] = 80,
    plot: Annotated[Optional[str], typer.Option("--plot", help="Save a PNG of the density (log scale); needs matplotlib.")] = None,
    per_block: Annotated[bool, typer.Option("--per-block", help="The same for each module's diagonal block.")] = False,
    spec_kw: dict,
    common: Common,
) -> int:
    """The eigenvalue density by stochastic Lanczos quadrature (exact eigenvalues for a result file)."""
    from .console import err_console, make_progress
    from .density import smooth, spectral_density, text_histogram
    from .results import check_output

    if runs < 1 or steps < 2:
        raise UsageError(f"--runs must be at least 1 and --steps at least 2 (got {runs}, {steps})")
    t0 = time.perf_counter()
    out, comm, writer = _start(common, "density.npz")
    if plot and writer:
        check_output(plot, common.force)
    con = err_console()
    src = open_source(source, spec_kw, per_block, "density", comm)
    seed = spec_kw.get("seed", 0)
    results = []
    for i, t in enumerate(src.targets):
        if t.op is None and t.eigenvalues is None:
            raise HesscliError(f"'{src.path}' stores neither a Hessian nor eigenvalues for '{t.name}'")
        ev = t.eigenvalues if t.op is None or isinstance(t.op, DenseOperator) and t.eigenvalues is not None else None
        results.append(spectral_density(t.op, runs, steps, seed + i, make_progress(con, common.quiet), eigenvalues=ev))
    multi = len(src.targets) > 1 or src.per_block
    arrays: dict = {}
    blocks = []
    for t, r in zip(src.targets, results, strict=True):
        if multi:
            p = f"blocks/{t.name}/"
            arrays[p + "density_grid"] = r.grid
            arrays[p + "density"] = r.density
            arrays[p + "sigma"] = np.float64(r.sigma)
        blocks.append({"name": t.name, "size": t.stop - t.start, "lambda_min": r.lambda_min, "lambda_max": r.lambda_max,
                       "sigma": r.sigma, "method": r.method, "matvecs": r.matvecs, "seconds": r.seconds})
    if multi:  # the block-diagonal part's density: the blocks' densities weighted by their sizes
        P = sum(t.stop - t.start for t in src.targets)
        nodes = np.concatenate([r.nodes.ravel() for r in results])
        weights = np.concatenate([r.weights.ravel() * (t.stop - t.start) / P for t, r in zip(src.targets, results, strict=True)])
        lo, hi = float(np.nanmin(nodes)), float(np.nanmax(nodes))
        sigma = (hi - lo) / (2 * steps) if hi > lo else max(abs(hi), 1.0) * 1e-3
        grid = np.linspace(lo - 4 * sigma, hi + 4 * sigma, len(results[0].grid))
        dens = smooth(nodes, weights, sigma, grid)
        method_name = sorted({r.method for r in results})
    else:
        r = results[0]
        grid, dens, sigma, lo, hi = r.grid, r.density, r.sigma, r.lambda_min, r.lambda_max
        method_name = [r.method]
        if r.method == "slq":
            arrays["slq_nodes"] = r.nodes
            arrays["slq_weights"] = r.weights
    arrays.update(density_grid=grid, density=dens, sigma=np.float64(sigma),
                  matvecs=np.int64(sum(r.matvecs for r in results)))
    arrays.update(_block_index(src))
    meta = _finish(src, arrays, {"runs": runs, "steps": steps, "sigma": sigma, "method": method_name[0] if len(method_name) == 1 else method_name,
                                 "matvecs": int(arrays["matvecs"]), "seeds": [seed + i for i in range(len(src.targets))], "smoothing": "gaussian, sigma = (lambda_max - lambda_min) / (2 * steps)"},
                   out, common.force, t0, writer)
    if plot and writer:
        from .density import plot_density

        plot_density(plot, grid, dens, title=f"Hessian eigenvalue density ({Path(src.path).name})")
    summary = _summary_head(src, "density", out, meta)
    summary.update(method=method_name[0] if len(method_name) == 1 else method_name, runs=runs, steps=steps, sigma=sigma,
                   lambda_min=lo, lambda_max=hi, matvecs=int(arrays["matvecs"]), plot=plot, blocks=blocks if multi else [])

    def render():
        from rich.table import Table

        from .console import fmt_num

        if multi:
            tb = Table(title="density per block", title_justify="left")
            for c in ("block", "size", "λmin", "λmax", "σ", "method", "matvecs"):
                tb.add_column(c, justify="left" if c in ("block", "method") else "right")
            for b in blocks:
                tb.add_row(b["name"], fmt_num(b["size"]), fmt_num(b["lambda_min"]), fmt_num(b["lambda_max"]),
                           f"{b['sigma']:.2g}", b["method"], fmt_num(b["matvecs"]))
            con.print(tb)
        con.print(f"eigenvalue density{' (block-diagonal part)' if multi else ''}, mass per bin, log-scale bars:")
        con.print(text_histogram(grid, dens), markup=False, highlight=False)
        con.print(_footer(summary) + f" · {summary['method']} · σ = {sigma:.2g}")
        if plot:
            con.print(f"plot: {plot}")
        con.print(f"wrote {out}")

    if writer:
        emit(summary, common, render)
    return 0
