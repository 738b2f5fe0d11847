"""The library: one function per command, each returning its typed result (:mod:`hesscli.results`).

Every function takes what its command takes — a model file (any format hesscli reads), a
:class:`~hesscli.session.ModelSpec`, an open :class:`~hesscli.session.Session`, or an in-memory
``nn.Module``; data files, a :class:`~hesscli.io.data.Dataset` or an ``(inputs, targets)`` pair of
tensors — and the command's options as keyword arguments (``loss=``, ``dtype=``, ``params=``, ...:
the fields of :class:`ModelSpec`). Nothing is written until ``result.save(path)``; a call leaves
the caller's process as it found it: global flags and the seed are restored on exit, and an
in-memory module is copied before it is cast, moved or frozen (the copy costs one more set of
weights in memory).

    >>> import hesscli
    >>> r = hesscli.spectrum(model, (X, y), top_k=1, loss="cross_entropy")
    >>> r.eigenvalues, r.residuals           # (1,), (1,)
    >>> r.save("spectrum.npz")
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hesscli.algorithms import density as density_alg
from hesscli.algorithms import trace as trace_alg
from hesscli.algorithms.dense import DenseResult, dense_hessian, plan_dense
from hesscli.algorithms.lanczos import EigResult, lanczos, select, stored_eigs
from hesscli.algorithms.mfplan import MatrixFreePlan, plan_matrix_free, work_bytes
from hesscli.algorithms.operators import HessianOperator
from hesscli.errors import HesscliError, MemoryBudgetError, UsageError
from hesscli.io.data import Dataset
from hesscli.meta import build_meta
from hesscli.objective.core import Objective
from hesscli.results import (
    ComputeResult,
    DensityResult,
    InspectResult,
    MergeResult,
    SpectrumResult,
    TraceResult,
    load,
)
from hesscli.runtime.memory import default_budget, fmt_bytes, parse_size
from hesscli.runtime.progress import NullProgress, Progress
from hesscli.session import ModelSpec, Session, data_argument, in_memory_model, open_session, stage
from hesscli.sources import Source, is_result_file, model_source, result_source

__all__ = ["compute", "spectrum", "trace", "density", "inspect", "merge", "load", "ModelSpec", "Session", "open_session"]

ModelLike = str | os.PathLike | ModelSpec | Session | nn.Module
DataLike = str | os.PathLike | Sequence[str | os.PathLike] | Dataset | tuple | None
_SPEC_FIELDS = {f.name for f in dataclasses.fields(ModelSpec)} - {"model", "data"}


# ---------------------------------------------------------------------------------------------
# opening what a call is given


def _spec(model: str | ModelSpec, files: list[str], options: dict) -> ModelSpec:
    unknown = set(options) - _SPEC_FIELDS
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(sorted(unknown))}: choose from {', '.join(sorted(_SPEC_FIELDS))}")
    if isinstance(model, ModelSpec):
        spec = dataclasses.replace(model, **options)
        if files:
            spec.data = files
        return spec
    return ModelSpec(model=str(model), data=files, **options)


def session_for(model: ModelLike, data: DataLike = None, comm=None, split: str = "data", **options: Any) -> Session:
    """An open :class:`Session` for ``model`` on ``data`` (see the module docstring for the kinds of
    each); a Session is returned as it is. Raises :class:`UsageError` when data is missing or an
    option is unknown, :class:`HesscliError` for unreadable input."""
    if isinstance(model, Session):
        if data is not None or options:
            raise UsageError("an open Session already has its data and options")
        return model
    files, ds = data_argument(data)
    if isinstance(model, nn.Module):
        spec = _spec(f"<{type(model).__qualname__}>", files, options)
        return open_session(spec, comm, split, module=model, dataset=ds)
    spec = _spec(model, files, options)
    return open_session(spec, comm, split, dataset=ds)


def _plan_micro_batched(session: Session, budget: int, make) -> MatrixFreePlan:
    """``make(graph_bytes)`` on one piece's measured gradient graph; when the whole batch's graph and
    product do not fit (``make`` raises :class:`MemoryBudgetError`) and the user set no
    ``--batch-size``, the data is cut into micro-batches half as large, the graph measured again,
    until the plan fits (then a note says so) or single samples do not (their refusal is raised: the
    least budget that would do). Each halving costs one forward and backward pass of one piece."""
    obj = session.objective
    try:
        return make(obj.measure_linearization())
    except MemoryBudgetError as first:
        if session.spec.batch_size is not None or not obj.can_rebatch():
            raise
        size, last, before = obj.largest_piece(), first, obj.batch_size
        while size > 1:
            size = (size + 1) // 2
            obj.rebatch(size)
            try:
                plan = make(obj.measure_linearization())
            except MemoryBudgetError as e:
                last = e
                continue
            note = (f"micro-batches of {size} samples ({obj.n_pieces()} pieces): the whole batch's gradient graph and "
                    f"product do not fit the budget of {fmt_bytes(budget)} (--max-memory); the loss is the same")
            plan.notes.append(note)
            obj.info.notes.append(note)
            plan.micro_batch = size
            return plan
        obj.rebatch(before)  # a reused session keeps its own pieces
        raise last from None  # what the smallest micro-batches would need


def _plan(session: Session, max_memory, comm, what: str, k: int = 1, block_size: int | None = None,
          ncv: int | None = None, float64_only: str | None = None, ncv_name: str = "--ncv",
          eigenvectors: bool = False) -> MatrixFreePlan:
    """The memory plan of a matrix-free command on an open model, before any product: one data
    piece's gradient graph is measured (a forward and backward pass), the solver's vectors are
    sized to ``max_memory``, and whatever is left decides whether every piece's graph is kept
    between products or rebuilt for each. ``float64_only``: the algorithm keeps float64 vectors
    only; the reason is the refusal's advice when they do not fit."""
    obj = session.objective
    with stage(comm):
        budget = parse_size(max_memory) if isinstance(max_memory, str) else max_memory
        budget = int(budget) if budget is not None else default_budget(obj.device)
    if comm is not None:
        budget = int(comm.minimum(budget))
    with stage(comm):
        itemsize = torch.empty((), dtype=obj.dtype).element_size()

        def make(graph: int) -> MatrixFreePlan:
            plan = plan_matrix_free(obj.P, itemsize, graph, budget, k, block_size, ncv, 1, what, ncv_name, eigenvectors)
            if float64_only and plan.basis_dtype != "float64":
                need = (plan.total - plan.bytes["basis"] - plan.bytes["work"] + plan.ncv * obj.P * 8
                        + work_bytes(plan.block_size, obj.P, 8))
                raise MemoryBudgetError(
                    f"{what} of P = {obj.P:,} parameters keeps {plan.ncv} float64 vectors "
                    f"({fmt_bytes(plan.ncv * obj.P * 8)}) and needs about {fmt_bytes(need)}, over the budget of "
                    f"{fmt_bytes(budget)} (--max-memory); {float64_only}"
                )
            return plan

        plan = _plan_micro_batched(session, budget, make)
        graph = obj.linearization_bytes
        graphs = obj.plan_graphs(max(budget - (plan.total - plan.bytes["graphs"]), 0))
        if graphs["graph_policy"] == "kept" and obj.n_pieces() > 1:
            first = plan
            plan = plan_matrix_free(obj.P, itemsize, graph, budget, k, block_size, ncv, obj.n_pieces(), what, ncv_name,
                                    eigenvectors)
            plan.micro_batch = first.micro_batch
            plan.notes[:0] = [n for n in first.notes if n.startswith("micro-batches")]
    return plan


def _source(source, data: DataLike, per_block: bool, blocks: str, command: str, comm, options: dict,
            planner=None) -> Source:
    """A result file (no data), or a model on its data, as the operators to answer for; on a model,
    ``planner(session)`` makes the memory plan before the symmetry probe's products."""
    if source is None:
        if data is not None:
            raise UsageError("--data without SOURCE is ambiguous: name the model file (or a result file without --data)")
        source = "hessian.npz"
        if not Path(source).exists():
            raise HesscliError("no SOURCE given and no hessian.npz in the current directory: name a result file, "
                               "or a model file with --data")
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).exists():
            raise HesscliError(f"SOURCE '{source}' does not exist")
        if is_result_file(str(source)):
            if data is not None:
                raise UsageError(f"'{source}' is a result file: --data applies to a model SOURCE only")
            return result_source(str(source), per_block, command, blocks)
        if data is None or (isinstance(data, (list, tuple)) and not data):
            raise UsageError(f"'{source}' is a model file: pass --data FILE (or give a result file from compute)")
    session = session_for(source, data, comm, **options)
    plan = planner(session) if planner is not None else None
    return model_source(session, per_block, command, blocks, comm, plan)


def _finish_meta(src: Source, t0: float, **fields) -> dict:
    meta = dict(src.meta)
    meta.update(fields)
    meta.update(hvps=src.hvps, per_block=src.per_block, approximation=src.approximation, seconds=time.perf_counter() - t0)
    return meta


# ---------------------------------------------------------------------------------------------
# compute


def _index_arrays(obj: Objective, names: list[str], offsets: list[int]) -> dict:
    return {
        "param_names": np.array(obj.names, dtype=str),
        "param_offsets": np.array(obj.offsets, dtype=np.int64),
        "block_names": np.array(names, dtype=str),
        "block_offsets": np.array(offsets, dtype=np.int64),
    }


def _dense_arrays(obj: Objective, res: DenseResult, no_dense: bool) -> dict:
    """SPEC.md's arrays of a compute result."""
    blocks = res.blocks
    arrays = _index_arrays(obj, [b.name for b in blocks], [b.start for b in blocks] + [blocks[-1].stop])
    arrays["trace"] = np.float64(res.trace)
    if res.mode == "full":
        b = blocks[0]
        arrays["eigenvalues"] = b.eigenvalues.astype(np.float64)
        if not no_dense:
            arrays["hessian"] = b.hessian.numpy()
        if b.eigenvectors is not None:
            arrays["eigenvectors"] = b.eigenvectors
    else:
        for b in blocks:
            p = f"blocks/{b.name}/"
            arrays[p + "eigenvalues"] = b.eigenvalues.astype(np.float64)
            arrays[p + "trace"] = np.float64(b.trace)
            if not no_dense:
                arrays[p + "hessian"] = b.hessian.numpy()
            if b.eigenvectors is not None:
                arrays[p + "eigenvectors"] = b.eigenvectors
    return arrays


def compute(
    model: ModelLike,
    data: DataLike = None,
    *,
    mode: str = "auto",
    blocks: str = "module",
    max_memory: str | int | None = None,
    eigenvectors: bool = False,
    no_dense: bool = False,
    symmetric: bool = True,
    progress: Progress | None = None,
    comm=None,
    split: str = "data",
    **options: Any,
) -> ComputeResult:
    """``hesscli compute``: the dense Hessian H (P, P) of the loss, full or block-diagonal
    (``mode``: auto, full, block; ``blocks``: module, layer, tensor), inside ``max_memory`` bytes
    (or a size such as ``"4GB"``; default half of what the process may use).

    Returns a :class:`ComputeResult`: eigenvalues (P,) ascending and the matrix in full mode, per
    block in block mode, tr H, ``meta``. Under torchrun (``comm`` from
    :func:`hesscli.runtime.distributed.from_env`), ``split="data"`` divides the data over the ranks
    and ``split="columns"`` the Hessian's columns. Raises :class:`~hesscli.errors.MemoryBudgetError`
    (exit 3) when the plan does not fit, :class:`HesscliError` for bad input."""
    t0 = time.perf_counter()
    if split not in ("data", "columns"):
        raise UsageError(f"--split '{split}': choose data or columns")
    with stage(comm):
        budget = parse_size(max_memory) if isinstance(max_memory, str) else max_memory
    session = session_for(model, data, comm, split, **options)
    obj = session.objective
    if comm is not None:  # the same dense plan on every rank: the smallest memory budget
        budget = int(comm.minimum(budget if budget is not None else default_budget(obj.device)))
    with stage(comm):
        plan = plan_dense(obj, mode, blocks, budget, eigenvectors)
    column_comm = comm if comm is not None and split == "columns" else None
    res = dense_hessian(obj, eigenvectors=eigenvectors, symmetric=symmetric, progress=progress, plan=plan,
                        column_comm=column_comm)
    hvps, asymmetry = res.hvps, res.asymmetry
    if comm is not None:  # the products every rank computed (its pieces, or its columns); the worst asymmetry
        n = torch.tensor([float(hvps)], dtype=torch.float64)
        comm.all_reduce(n)
        hvps = int(n.item())
        a = torch.tensor([asymmetry], dtype=torch.float64)
        comm.all_reduce(a, op="max")
        asymmetry = a.item()
    meta = build_meta(
        "compute",
        session=session,
        mode=res.mode,
        blocks=blocks if res.mode == "block" else "all",
        max_memory=res.budget,
        chunk_size=res.chunk_size,
        symmetric=symmetric,
        hvps=hvps,
        asymmetry=asymmetry,
        symmetry_probe=res.symmetry_probe,
        negative_threshold=res.negative_threshold,
        approximation=res.approximation,
        seconds=time.perf_counter() - t0,
        hessian_seconds=res.seconds,
    )
    return ComputeResult(_dense_arrays(obj, res, no_dense), meta)


# ---------------------------------------------------------------------------------------------
# spectrum

DEFAULT_TOL = {"float64": 1e-6, "float32": 1e-5}


def default_tol(src: Source) -> tuple[float, str]:
    """The default ``--tol`` and the rule that set it: 1e-6 in float64; in float32 1e-5 for a result
    file (its stored eigenvalues need no iterations) and, on a model, the larger of 1e-5 and 50× the
    relative asymmetry the symmetry probe measured — the
    products' own rounding noise, below which a measured residual cannot go (a default that ends in
    exit 4 on a well-posed problem would be a bug)."""
    dtype = str(src.meta.get("dtype") or "float64")
    if src.session is None or dtype != "float32":
        return DEFAULT_TOL.get(dtype, 1e-6), f"default for {dtype}"
    noise = 50 * float(src.meta.get("symmetry_probe") or 0.0)
    if noise > DEFAULT_TOL["float32"]:
        return noise, f"float32: 50 x the measured product asymmetry {noise / 50:.1e}"
    return DEFAULT_TOL["float32"], "default for float32 (above 50 x the measured product asymmetry)"



def spectrum(
    source: ModelLike | None = None,
    data: DataLike = None,
    *,
    top_k: int = 20,
    which: str = "largest",
    tol: float | None = None,
    max_matvecs: int | None = None,
    block_size: int | None = None,
    per_block: bool = False,
    blocks: str = "module",
    eigenvectors: bool = False,
    max_memory: str | int | None = None,
    progress: Progress | None = None,
    comm=None,
    **options: Any,
) -> SpectrumResult:
    """``hesscli spectrum``: the ``top_k`` extreme eigenpairs of H (``which``: largest, smallest,
    both — half at each end — or magnitude), each with its residual ‖Hv − λv‖₂; converged when
    ≤ ``tol``·‖H‖₂ (default: :func:`default_tol`, from the dtype and the products' measured noise).

    On a model: block Lanczos with thick restarts on Hessian-vector products (after a symmetry
    probe), at most ``max_matvecs`` products per operator for the iterations (whole blocks), plus
    ``top_k`` to measure the returned pairs' residuals. On a ``compute`` result file: its stored
    eigenvalues, with no eigendecomposition (an ``eigh`` of the stored matrix only when
    ``eigenvectors`` are wanted and not stored). ``per_block``: the same for each diagonal block
    (``blocks``: module, layer, tensor), labelled block-diagonal.

    Returns a :class:`SpectrumResult` (``exit_code`` 4 when a pair did not converge). A
    KeyboardInterrupt (SIGINT) during the eigensolver returns the pairs found so far instead,
    ``converged`` saying which, ``meta.interrupted`` true and ``exit_code`` 130."""
    t0 = time.perf_counter()
    if not (top_k >= 1):
        raise UsageError(f"--top-k must be at least 1 (got {top_k})")
    if which not in ("largest", "smallest", "both", "magnitude"):
        raise UsageError(f"--which '{which}': choose largest, smallest, both or magnitude")
    if tol is not None and not (tol > 0):
        raise UsageError(f"--tol must be positive (got {tol})")
    src = _source(source, data, per_block, blocks, "spectrum", comm, options,
                  lambda s: _plan(s, max_memory, comm, "spectrum", top_k, block_size, eigenvectors=eigenvectors))
    tol_rule = "given"
    if tol is None:
        tol, tol_rule = default_tol(src)
    plan = src.plan
    lanczos_kw = {} if plan is None else {"ncv": plan.ncv, "basis_dtype": getattr(torch, plan.basis_dtype),
                                          "max_block": plan.block_size}
    progress = progress or NullProgress()
    seed = int(options.get("seed", 0)) if src.session is None else src.session.spec.seed
    results = []
    interrupted = False
    for t in src.targets:
        if interrupted:  # SIGINT during an earlier block: the rest were not computed
            nan = np.full(min(top_k, t.size), np.nan)
            results.append(EigResult(nan, nan.copy(), np.zeros(len(nan), dtype=bool), None, 0.0, tol, 0, 0,
                                     "not computed", 0, 0.0, ["not computed: interrupted (SIGINT) before this block"]))
            continue
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
            r = lanczos(op, top_k, which, tol, max_matvecs, block_size, seed=seed, eigenvectors=eigenvectors,
                        progress=progress, **lanczos_kw)
            interrupted = r.interrupted
        results.append(r)
    multi = len(src.targets) > 1 or src.per_block
    arrays: dict = {}
    targets = []
    for t, r in zip(src.targets, results, strict=True):
        if multi:
            p = f"blocks/{t.name}/"
            arrays[p + "eigenvalues"] = r.eigenvalues
            arrays[p + "residuals"] = r.residuals
            arrays[p + "converged"] = r.converged
            arrays[p + "matvecs"] = np.int64(r.matvecs)
            if r.eigenvectors is not None:
                arrays[p + "eigenvectors"] = r.eigenvectors
        targets.append({"name": t.name, "size": t.size, "norm": r.norm, "restarts": r.restarts, "method": r.method,
                        "block_size": r.block_size, "seconds": r.seconds, "notes": list(r.notes)})
    # the whole operator's answer (per block: the extreme pairs of the block-diagonal part)
    ev = np.concatenate([r.eigenvalues for r in results])
    res = np.concatenate([r.residuals for r in results])
    conv = np.concatenate([r.converged for r in results])
    found = np.flatnonzero(~np.isnan(ev))
    order = found[np.argsort(ev[found], kind="stable")]
    pick = order[select(ev[order], top_k, which)]
    arrays.update(eigenvalues=ev[pick], residuals=res[pick], converged=conv[pick])
    if eigenvectors and not multi:
        arrays["eigenvectors"] = results[0].eigenvectors
    arrays["matvecs"] = np.int64(sum(r.matvecs for r in results))
    arrays.update(src.block_index())
    notes = [f"{t.name}: {n}" if multi else n for t, r in zip(src.targets, results, strict=True) for n in r.notes]
    if any(r.method == "stored" and np.isnan(r.residuals).any() for r in results):
        notes.append("eigenvalues read from the result file (compute's eigh, a direct method), no eigendecomposition: "
                     "their residuals are not measured without stored eigenvectors (null) and --tol does not apply; "
                     "compute --eigenvectors stores the vectors that measure them")
    methods = sorted({r.method for r in results})
    meta = _finish_meta(
        src, t0, top_k=top_k, which=which, tol=tol, max_matvecs=max_matvecs, block_size=results[0].block_size,
        matvecs=int(arrays["matvecs"]), method=methods[0] if len(methods) == 1 else methods,
        norm_estimate=max(r.norm for r in results), converged=bool(all(r.converged.all() for r in results)),
        tol_rule=tol_rule, interrupted=interrupted,
        targets=targets, notes=list(src.meta.get("notes") or []) + notes,
    )
    return SpectrumResult(arrays, meta)


# ---------------------------------------------------------------------------------------------
# trace


def trace(
    source: ModelLike | None = None,
    data: DataLike = None,
    *,
    method: str = "auto",
    matvecs: int = 300,
    per_block: bool = False,
    blocks: str = "module",
    max_memory: str | int | None = None,
    progress: Progress | None = None,
    comm=None,
    **options: Any,
) -> TraceResult:
    """``hesscli trace``: tr H with its standard error — ``method`` exact (P products, or the
    stored matrix), hutchinson, hutchpp or xtrace with ``matvecs`` products; auto takes exact when
    P ≤ ``matvecs`` or the matrix is stored, else Hutch++. ``per_block``: each diagonal block's
    trace (they add up to tr H); on a model every block's estimate comes from the same ``matvecs``
    full products (:func:`~hesscli.algorithms.trace.estimate_block_traces`), xtrace excepted.

    Returns a :class:`TraceResult` (units: the loss's per parameter², summed over the diagonal)."""
    t0 = time.perf_counter()
    if method not in ("auto", "exact", "hutchinson", "hutchpp", "xtrace"):
        raise UsageError(f"--method '{method}': choose auto, exact, hutchinson, hutchpp or xtrace")
    if not (matvecs >= 1):
        raise UsageError(f"--matvecs must be at least 1 (got {matvecs})")
    kept = max(matvecs // 3, 2) if method in ("auto", "hutchpp", "xtrace") else 2  # vectors the estimator holds
    src = _source(source, data, per_block, blocks, "trace", comm, options,
                  lambda s: _plan(s, max_memory, comm, "trace", 1, 1, kept,
                                  float64_only="lower --matvecs, or use --method hutchinson (two vectors)",
                                  ncv_name="--matvecs (Hutch++ keeps a third of them)"))
    progress = progress or NullProgress()
    seed = int(options.get("seed", 0)) if src.session is None else src.session.spec.seed
    results = []
    shared = src.session is not None and src.per_block and method != "xtrace"
    notes: list[str] = []
    if shared:  # every block's trace from one stream of full products (and tr H from the same)
        full = HessianOperator(src.session.objective)
        if comm is not None:
            full.chunk = int(comm.minimum(full.chunk))
        est = trace_alg.estimate_block_traces(full, src.targets, method, matvecs, seed, progress)
        results = est.results()
        total, stderr, products = est.trace, est.stderr, est.matvecs
        notes.append(f"every block's trace from the same {est.matvecs} products with the whole H "
                     f"({est.method}; the blocks' errors are correlated, the total's is from the summed samples)")
    else:
        for i, t in enumerate(src.targets):
            op = t.operator()
            if op is None:
                if t.trace is None:
                    raise HesscliError(f"'{src.path}' stores neither a Hessian nor a trace for '{t.name}'")
                results.append(trace_alg.TraceResult(t.trace, 0.0, "exact", 0, 0.0))
                continue
            results.append(trace_alg.estimate_trace(op, method, matvecs, seed + i, progress))
        total, stderr = trace_alg.combine(results)
        products = sum(r.matvecs for r in results)
        if src.session is not None and src.per_block:
            notes.append("xtrace has no shared-product form: each block was estimated from its own products")
    chosen = sorted({r.method for r in results})
    arrays: dict = {"trace": np.float64(total), "trace_stderr": np.float64(stderr), "matvecs": np.int64(products)}
    multi = len(src.targets) > 1 or src.per_block
    targets = []
    for t, r in zip(src.targets, results, strict=True):
        if multi:
            p = f"blocks/{t.name}/"
            arrays[p + "trace"] = np.float64(r.trace)
            arrays[p + "trace_stderr"] = np.float64(r.stderr)
            arrays[p + "matvecs"] = np.int64(r.matvecs)
        targets.append({"name": t.name, "size": t.size, "trace": r.trace, "stderr": r.stderr, "method": r.method,
                        "matvecs": r.matvecs, "seconds": r.seconds})
    arrays.update(src.block_index())
    meta = _finish_meta(
        src, t0, method=chosen[0] if len(chosen) == 1 else chosen, method_requested=method,
        matvecs=int(arrays["matvecs"]), matvecs_per_estimate=matvecs, trace=total,
        seeds=[seed] if shared else [seed + i for i in range(len(src.targets))], trace_stderr=stderr,
        shared_products=shared, targets=targets, notes=list(src.meta.get("notes") or []) + notes,
    )
    return TraceResult(arrays, meta)


# ---------------------------------------------------------------------------------------------
# density


def density(
    source: ModelLike | None = None,
    data: DataLike = None,
    *,
    runs: int = 10,
    steps: int = 80,
    per_block: bool = False,
    blocks: str = "module",
    max_memory: str | int | None = None,
    progress: Progress | None = None,
    comm=None,
    **options: Any,
) -> DensityResult:
    """``hesscli density``: the eigenvalue density of H by stochastic Lanczos quadrature (``runs``
    random starts of ``steps`` Lanczos steps each), or from a result file's exact eigenvalues
    (then ``runs`` and ``steps`` do not apply). ``per_block``: each diagonal block's density, and
    the block-diagonal part's (the blocks' densities weighted by their sizes).

    Returns a :class:`DensityResult` (grid in eigenvalue units; :meth:`DensityResult.plot`)."""
    t0 = time.perf_counter()
    if runs < 1 or steps < 2:
        raise UsageError(f"--runs must be at least 1 and --steps at least 2 (got {runs}, {steps})")
    src = _source(source, data, per_block, blocks, "density", comm, options,
                  lambda s: _plan(s, max_memory, comm, "density", 1, 1, steps + 1, ncv_name="--steps (SLQ keeps one vector a step)"))
    slq_kw = {} if src.plan is None else {"budget": src.plan.bytes["basis"],
                                          "basis_dtype": getattr(torch, src.plan.basis_dtype)}
    progress = progress or NullProgress()
    seed = int(options.get("seed", 0)) if src.session is None else src.session.spec.seed
    results = []
    for i, t in enumerate(src.targets):
        op = t.operator() if t.eigenvalues is None else None  # stored eigenvalues: the matrix is not read
        if op is None and t.eigenvalues is None:
            raise HesscliError(f"'{src.path}' stores neither a Hessian nor eigenvalues for '{t.name}'")
        results.append(density_alg.spectral_density(op, runs, steps, seed + i, progress, eigenvalues=t.eigenvalues,
                                                    **slq_kw))
    slq_used = any(r.method == "slq" for r in results)
    resolution = steps if slq_used else density_alg.DENSE_RESOLUTION
    notes = [] if slq_used else [
        f"--runs and --steps do not apply to exact eigenvalues (a result file): the density is theirs, smoothed with "
        f"σ = (λmax − λmin)/{2 * density_alg.DENSE_RESOLUTION} whatever --steps says"]
    multi = len(src.targets) > 1 or src.per_block
    arrays: dict = {}
    targets = []
    for t, r in zip(src.targets, results, strict=True):
        if multi:
            p = f"blocks/{t.name}/"
            arrays[p + "density_grid"] = r.grid
            arrays[p + "density"] = r.density
            arrays[p + "sigma"] = np.float64(r.sigma)
        targets.append({"name": t.name, "size": t.size, "lambda_min": r.lambda_min, "lambda_max": r.lambda_max,
                        "sigma": r.sigma, "method": r.method, "matvecs": r.matvecs, "seconds": r.seconds})
    if multi:  # the block-diagonal part's density: the blocks' densities weighted by their sizes
        P = sum(t.size for t in src.targets)
        nodes = np.concatenate([r.nodes.ravel() for r in results])
        weights = np.concatenate([r.weights.ravel() * t.size / P for t, r in zip(src.targets, results, strict=True)])
        lo, hi = float(np.nanmin(nodes)), float(np.nanmax(nodes))
        sigma = density_alg.smoothing_sigma(lo, hi, resolution)
        grid = np.linspace(lo - 4 * sigma, hi + 4 * sigma, len(results[0].grid))
        dens = density_alg.smooth(nodes, weights, sigma, grid)
        method_name = sorted({r.method for r in results})
    else:
        r = results[0]
        grid, dens, sigma = r.grid, r.density, r.sigma
        method_name = [r.method]
        if r.method == "slq":
            arrays["slq_nodes"] = r.nodes
            arrays["slq_weights"] = r.weights
    arrays.update(density_grid=grid, density=dens, sigma=np.float64(sigma),
                  matvecs=np.int64(sum(r.matvecs for r in results)))
    arrays.update(src.block_index())
    meta = _finish_meta(
        src, t0, runs=runs if slq_used else None, steps=steps if slq_used else None, sigma=sigma,
        method=method_name[0] if len(method_name) == 1 else method_name, matvecs=int(arrays["matvecs"]),
        seeds=[seed + i for i in range(len(src.targets))] if slq_used else None,
        smoothing=f"gaussian, sigma = (lambda_max - lambda_min) / (2 * {'steps' if slq_used else density_alg.DENSE_RESOLUTION})",
        targets=targets, notes=list(src.meta.get("notes") or []) + notes,
    )
    return DensityResult(arrays, meta)


# ---------------------------------------------------------------------------------------------
# inspect, merge


def inspect(model: ModelLike, data: DataLike = None, **options: Any) -> InspectResult:
    """``hesscli inspect``: the model's parameters (names, shapes, frozen, tied), its blocks, and
    the bytes full and block mode would need against the default budget; with data, also the
    loss. Returns an :class:`InspectResult`."""
    from hesscli.inspection import inspect_model

    if isinstance(model, Session) or data is not None:
        return InspectResult(inspect_model(session_for(model, data, **options)))
    if isinstance(model, nn.Module):  # no data: the module's parameters only (nothing is run)
        return InspectResult(inspect_model(_spec(f"<{type(model).__qualname__}>", [], options), in_memory_model(model)))
    return InspectResult(inspect_model(_spec(model, [], options)))


def merge(paths: Sequence[str | os.PathLike]) -> MergeResult:
    """``hesscli merge``: one compute result from compute results on disjoint shards of the data,
    each weighted by its share of the loss terms (a mean loss) — the Hessian of the whole data.
    Raises :class:`HesscliError` naming the files when they are not compatible."""
    from hesscli.algorithms.merge import merge_results

    arrays, meta = merge_results(list(paths))
    return MergeResult(arrays, meta)

