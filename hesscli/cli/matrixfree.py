"""``hesscli spectrum``, ``trace`` and ``density``: on a model (matrix-free, Hessian-vector products)
or on a ``compute`` result file (dense linear algebra on the stored matrices).

A source resolves to one or more named symmetric operators (:mod:`hesscli.algorithms.operators`): the whole
Hessian, or with ``--per-block`` (and always for a block-mode result file) one diagonal block per
module. The algorithms (:mod:`hesscli.algorithms.lanczos`, :mod:`hesscli.algorithms.trace`, :mod:`hesscli.algorithms.density`)
consume those; this module resolves the source, runs them, writes the result and formats it.

Per-block answers (``--per-block``, or a block-mode result file) describe the block-diagonal part
of H, not H: their ``meta`` and JSON say ``"approximation": "block-diagonal"`` and their tables say so.

A result file's stored eigenvalues are answers, not work to redo: ``spectrum`` on a full- or
block-mode file selects the wanted pairs from the stored ``eigenvalues`` without any
eigendecomposition (the matrix is read only when it is needed). Their residuals are measured
against the stored matrix when the file also holds the eigenvectors (``compute --eigenvectors``);
without stored eigenvectors they are not measured (NaN in the file, null in the JSON) and the pairs
count as converged: they come from ``compute``'s ``eigh``, a direct method, whose accuracy is
``meta.negative_threshold``'s rounding level, not ``--tol``'s. Only ``--eigenvectors`` on a file
without stored eigenvectors needs an ``eigh`` of the stored matrix.
"""


import enum
import functools
import math
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from hesscli.algorithms.operators import DenseOperator, HessianOperator, SymOperator
from hesscli.cli.base import Common, _comm, app, emit, model_spec, with_options
from hesscli.errors import HesscliError, UsageError
from hesscli.session import stage

SOURCE_HELP = "A result file from 'hesscli compute' (default: hessian.npz) or a model file (then --data is needed)."


BLOCK_DIAGONAL = "block-diagonal"


class Which(str, enum.Enum):
    largest = "largest"
    smallest = "smallest"
    both = "both"
    magnitude = "magnitude"


class TraceMethod(str, enum.Enum):
    auto = "auto"
    exact = "exact"
    hutchinson = "hutchinson"
    hutchpp = "hutchpp"
    xtrace = "xtrace"


@dataclass
class Target:
    """One operator to answer for: the whole Hessian or one diagonal block (columns start:stop).

    A model's target has its operator ``op``; a result file's target reads its arrays on first use:
    ``matrix()`` (the stored Hessian, or None) and ``vectors()`` (the stored eigenvectors, or None)."""

    name: str
    start: int
    stop: int
    op: SymOperator | None = None
    eigenvalues: np.ndarray | None = None  # stored (ascending)
    trace: float | None = None  # stored
    matrix: Callable[[], np.ndarray | None] | None = None  # reads the stored matrix (None: not stored)
    vectors: Callable[[], np.ndarray | None] | None = None  # reads the stored eigenvectors (columns)

    @property
    def has_matrix(self) -> bool:
        return self.op is not None or self.matrix is not None

    def operator(self) -> SymOperator | None:
        """The operator, a stored matrix read (and wrapped) on first use; None when there is none."""
        if self.op is None and self.matrix is not None:
            H = self.matrix()
            self.matrix = None
            self.op = DenseOperator(H) if H is not None else None
        return self.op


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


def _reader(rf, key: str) -> Callable[[], np.ndarray | None] | None:
    """A function that reads ``key`` from the result file when called (None when it is not stored)."""
    return (lambda: rf[key]) if key in rf else None


def _result_source(path: str, per_block: bool, command: str) -> Source:
    from hesscli.io.resultfile import command_line, read_result, utc_now
    from hesscli.objective.core import param_blocks

    rf = read_result(path)
    meta = dict(rf.meta)
    mode = meta.get("mode")
    index = {k: rf[k] for k in ("param_names", "param_offsets") if k in rf}
    targets: list[Target] = []
    if mode == "full":
        if per_block:
            names = [str(s) for s in rf["param_names"]]
            offs = [int(o) for o in rf["param_offsets"]]
            full = functools.cache(_reader(rf, "hessian")) if "hessian" in rf else None  # read once for every block
            for b in param_blocks(names, offs, "module"):
                sub = (lambda b=b: full()[b.start : b.stop, b.start : b.stop]) if full is not None else None
                targets.append(Target(b.name, b.start, b.stop, matrix=sub))
        else:
            P = int(rf["param_offsets"][-1]) if "param_offsets" in rf else len(rf["eigenvalues"])
            targets.append(Target("all", 0, P, None, rf.get("eigenvalues"), float(rf["trace"]) if "trace" in rf else None,
                                  matrix=_reader(rf, "hessian"), vectors=_reader(rf, "eigenvectors")))
    elif mode == "block":
        offs = [int(o) for o in rf["block_offsets"]]
        for i, name in enumerate(rf.block_names):
            p = f"blocks/{name}/"
            tr = rf.get(p + "trace")
            targets.append(Target(name, offs[i], offs[i + 1], None, rf.get(p + "eigenvalues"),
                                  float(tr) if tr is not None else None,
                                  matrix=_reader(rf, p + "hessian"), vectors=_reader(rf, p + "eigenvectors")))
        per_block = True
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
    return Source("result", path, targets, meta, per_block, BLOCK_DIAGONAL if per_block else None, index)


def _model_source(path: str, spec_kw: dict, per_block: bool, command: str, comm=None) -> Source:
    from hesscli.algorithms.dense import asymmetry_tolerance
    from hesscli.api import base_meta
    from hesscli.session import open_session

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
    return Source("model", path, targets, meta, per_block, BLOCK_DIAGONAL if per_block else None, index, objective=obj)


def _start(common: Common, default_out: str):
    """The output path, the torchrun communicator (or None) and whether this rank writes; the
    output is checked before any work, on the writing rank, and every rank learns of a refusal."""
    from hesscli.io.resultfile import check_output

    out = common.out or default_out
    comm = _comm()
    writer = comm is None or comm.rank == 0
    with stage(comm):
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


def _finish(src: Source, arrays: dict, meta_extra: dict, out: str, force: bool, t0: float, writer: bool = True,
            notes: list[str] | None = None) -> dict:
    from hesscli.io.resultfile import write_result

    meta = dict(src.meta)
    meta.update(meta_extra)
    if notes:
        meta["notes"] = list(meta.get("notes") or []) + list(notes)
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
    from hesscli.cli.console import fmt_num

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
        parts.append(f"approximation: {summary['approximation']} (one answer per diagonal block, not H's)")
    return " · ".join(parts)


# ---------------------------------------------------------------------------------------------
# spectrum


@app.command()
@with_options()
def spectrum(
    source: Annotated[Optional[str], typer.Argument(help=SOURCE_HELP)] = None,
    *,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Number of eigenpairs.")] = 20,
    which: Annotated[Which, typer.Option("--which", help="largest, smallest, both (half each end) or magnitude.")] = Which.largest,
    tol: Annotated[float, typer.Option("--tol", help="Converged when ‖Hv − λv‖ ≤ tol·‖H‖₂.")] = 1e-6,
    max_matvecs: Annotated[Optional[int], typer.Option("--max-matvecs", min=1, help="Budget of products per operator (default max(1000, 50·k)).")] = None,
    block_size: Annotated[Optional[int], typer.Option("--block-size", min=1, help="Vectors per Lanczos block (default min(4, k)); at least the multiplicity you expect.")] = None,
    per_block: Annotated[bool, typer.Option("--per-block", help="The same for each module's diagonal block (the block-diagonal part of H).")] = False,
    eigenvectors: Annotated[bool, typer.Option("--eigenvectors", help="Store the eigenvectors (P, k).")] = False,
    spec_kw: dict,
    common: Common,
) -> int:
    """Extreme eigenvalues with residuals: block Lanczos on a model, the stored eigenvalues (or eigh) of a result file."""
    from hesscli.algorithms.lanczos import lanczos, select, stored_eigs
    from hesscli.cli.console import err_console, make_progress

    which = Which(which).value
    if not (tol > 0):  # click has no open interval bound that typer exposes
        raise UsageError(f"--tol must be positive (got {tol})")
    t0 = time.perf_counter()
    out, comm, writer = _start(common, "spectrum.npz")
    con = err_console()
    src = open_source(source, spec_kw, per_block, "spectrum", comm)
    seed = spec_kw.get("seed", 0)
    results = []
    for t in src.targets:
        r = None
        if t.eigenvalues is not None:  # a result file's answer: no eigendecomposition
            vecs = t.vectors() if t.vectors is not None else None
            if vecs is not None or not eigenvectors:
                op = t.operator() if vecs is not None else None  # the matrix, only to measure residuals
                r = stored_eigs(t.eigenvalues, top_k, which, tol, vectors=vecs, op=op, eigenvectors=eigenvectors)
        if r is None:
            op = t.operator()
            if op is None:
                raise HesscliError(f"'{src.path}' stores no Hessian for '{t.name}' (written with --no-dense): spectrum "
                                   + ("--eigenvectors " if t.eigenvalues is not None else "") + "needs the matrix")
            progress = make_progress(con, common.quiet)
            r = lanczos(op, top_k, which, tol, max_matvecs, block_size, seed=seed, eigenvectors=eigenvectors, progress=progress)
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
    notes = [f"{t.name}: {n}" if multi else n for t, r in zip(src.targets, results, strict=True) for n in r.notes]
    if any(r.method == "stored" and np.isnan(r.residuals).any() for r in results):
        notes.append("eigenvalues read from the result file (compute's eigh, a direct method), no eigendecomposition: "
                     "their residuals are not measured without stored eigenvectors (null) and --tol does not apply; "
                     "compute --eigenvectors stores the vectors that measure them")
    methods = sorted({r.method for r in results})
    meta = _finish(src, arrays, {
        "top_k": top_k, "which": which, "tol": tol, "max_matvecs": max_matvecs, "block_size": results[0].block_size,
        "matvecs": int(arrays["matvecs"]), "method": methods[0] if len(methods) == 1 else methods,
        "norm_estimate": norm, "converged": all_conv,
    }, out, common.force, t0, writer, notes)
    status = "ok" if all_conv else "not_converged"
    summary = _summary_head(src, "spectrum", out, meta, status)
    summary.update(
        which=which, top_k=top_k, tol=tol, norm_estimate=norm, method=meta["method"],
        eigenvalues=arrays["eigenvalues"], residuals=arrays["residuals"], converged=arrays["converged"],
        matvecs=int(arrays["matvecs"]), blocks=blocks if multi else [],
    )
    summary["notes"] = list(meta.get("notes") or [])
    if not multi:
        summary.update(restarts=results[0].restarts, block_size=results[0].block_size)

    def render():
        from rich.table import Table

        from hesscli.cli.console import fmt_num

        def residual(x) -> str:
            x = float(np.max(x)) if np.size(x) else math.nan
            return f"{x:.1e}" if math.isfinite(x) else "—"  # NaN: not measured

        if multi:
            tb = Table(title=f"spectrum per block ({which}, top {top_k})", title_justify="left")
            for c in ("block", "size", "λmax found", "λmin found", "worst residual", "converged", "matvecs"):
                tb.add_column(c, justify="left" if c == "block" else "right")
            for b in blocks:
                tb.add_row(b["name"], fmt_num(b["size"]), fmt_num(float(b["eigenvalues"][-1])), fmt_num(float(b["eigenvalues"][0])),
                           residual(b["residuals"]), f"{int(np.sum(b['converged']))}/{len(b['converged'])}",
                           fmt_num(b["matvecs"]))
            con.print(tb)
        if src.approximation:
            con.print("block-diagonal part: eigenvalues of the diagonal blocks, not of H", markup=False)
        tb = Table(title=f"spectrum ({which}, top {top_k}{', block-diagonal part' if src.approximation else ''})",
                   title_justify="left")
        for c in ("#", "eigenvalue", "residual", "converged"):
            tb.add_column(c, justify="right")
        evs = arrays["eigenvalues"]
        for i in np.argsort(-evs, kind="stable"):
            tb.add_row(str(len(tb.rows) + 1), f"{evs[i]:.10g}", residual(arrays["residuals"][i]),
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
    method: Annotated[TraceMethod, typer.Option("--method", help="auto, exact, hutchinson, hutchpp or xtrace.")] = TraceMethod.auto,
    matvecs: Annotated[int, typer.Option("--matvecs", min=1, help="Products per estimate (per block with --per-block).")] = 300,
    per_block: Annotated[bool, typer.Option("--per-block", help="The same for each module's diagonal block (the block-diagonal part of H).")] = False,
    spec_kw: dict,
    common: Common,
) -> int:
    """The trace of the Hessian: exact, or estimated (Hutchinson, Hutch++, XTrace) with a standard error."""
    from hesscli.algorithms.trace import TraceResult, combine, estimate_trace
    from hesscli.cli.console import err_console, make_progress

    method = TraceMethod(method).value
    t0 = time.perf_counter()
    out, comm, writer = _start(common, "trace.npz")
    con = err_console()
    src = open_source(source, spec_kw, per_block, "trace", comm)
    seed = spec_kw.get("seed", 0)
    results = []
    for i, t in enumerate(src.targets):
        op = t.operator()
        if op is None:
            if t.trace is None:
                raise HesscliError(f"'{src.path}' stores neither a Hessian nor a trace for '{t.name}'")
            results.append(TraceResult(t.trace, 0.0, "exact", 0, 0.0))
            continue
        results.append(estimate_trace(op, method, matvecs, seed + i, make_progress(con, common.quiet)))
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

        from hesscli.cli.console import fmt_num

        title = "trace" + (" per block" if multi else "")
        if src.approximation:  # the blocks' traces add up to tr H: the diagonal blocks hold the whole diagonal
            title += " (diagonal blocks of H; their total is tr H)"
        tb = Table(title=title, title_justify="left")
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
    runs: Annotated[int, typer.Option("--runs", min=1, help="Random start vectors (SLQ; not used for a result file).")] = 10,
    steps: Annotated[int, typer.Option("--steps", min=2, help="Lanczos steps per run (SLQ; not used for a result file).")] = 80,
    plot: Annotated[Optional[str], typer.Option("--plot", help="Save a PNG of the density (log scale); needs matplotlib.")] = None,
    per_block: Annotated[bool, typer.Option("--per-block", help="The same for each module's diagonal block (the block-diagonal part of H).")] = False,
    spec_kw: dict,
    common: Common,
) -> int:
    """The eigenvalue density by stochastic Lanczos quadrature (exact eigenvalues for a result file)."""
    from hesscli.algorithms.density import DENSE_RESOLUTION, smooth, smoothing_sigma, spectral_density, text_histogram
    from hesscli.cli.console import err_console, make_progress
    from hesscli.io.resultfile import check_output

    t0 = time.perf_counter()
    out, comm, writer = _start(common, "density.npz")
    if plot and writer:
        check_output(plot, common.force)
    con = err_console()
    src = open_source(source, spec_kw, per_block, "density", comm)
    seed = spec_kw.get("seed", 0)
    results = []
    for i, t in enumerate(src.targets):
        op = t.operator() if t.eigenvalues is None else None  # stored eigenvalues: the matrix is not read
        if op is None and t.eigenvalues is None:
            raise HesscliError(f"'{src.path}' stores neither a Hessian nor eigenvalues for '{t.name}'")
        results.append(spectral_density(op, runs, steps, seed + i, make_progress(con, common.quiet), eigenvalues=t.eigenvalues))
    slq_used = any(r.method == "slq" for r in results)
    resolution = steps if slq_used else DENSE_RESOLUTION
    notes = [] if slq_used else [
        f"--runs and --steps do not apply to exact eigenvalues (a result file): the density is theirs, smoothed with "
        f"σ = (λmax − λmin)/{2 * DENSE_RESOLUTION} whatever --steps says"]
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
        sigma = smoothing_sigma(lo, hi, resolution)
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
    meta = _finish(src, arrays, {
        "runs": runs if slq_used else None, "steps": steps if slq_used else None, "sigma": sigma,
        "method": method_name[0] if len(method_name) == 1 else method_name, "matvecs": int(arrays["matvecs"]),
        "seeds": [seed + i for i in range(len(src.targets))] if slq_used else None,
        "smoothing": f"gaussian, sigma = (lambda_max - lambda_min) / (2 * {'steps' if slq_used else DENSE_RESOLUTION})",
    }, out, common.force, t0, writer, notes)
    if plot and writer:
        from hesscli.algorithms.density import plot_density

        plot_density(plot, grid, dens, title=f"Hessian eigenvalue density ({Path(src.path).name})")
    summary = _summary_head(src, "density", out, meta)
    summary.update(method=method_name[0] if len(method_name) == 1 else method_name, runs=meta["runs"], steps=meta["steps"],
                   sigma=sigma, lambda_min=lo, lambda_max=hi, matvecs=int(arrays["matvecs"]), plot=plot,
                   blocks=blocks if multi else [], notes=list(meta.get("notes") or []))

    def render():
        from rich.table import Table

        from hesscli.cli.console import fmt_num

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
        for n in notes:
            con.print(f"note: {n}", markup=False)
        if plot:
            con.print(f"plot: {plot}")
        con.print(f"wrote {out}")

    if writer:
        emit(summary, common, render)
    return 0
