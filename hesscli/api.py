"""The library entry points the commands call: open a model and its data as an :class:`Objective`,
and ``compute`` the dense Hessian into a result file. Notebooks can call these directly."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .data import Dataset, load_dataset
from .dense import DenseResult, dense_hessian, plan_dense
from .errors import UsageError
from .loading import LoadedModel, load_model, parse_arch_kwargs
from .memory import parse_size
from .objective import Objective
from .progress import Progress
from .results import check_output, command_line, summarize, utc_now, write_result

__all__ = ["ModelSpec", "Session", "open_session", "compute", "base_meta"]


@dataclass
class ModelSpec:
    """The options every model-evaluating command shares (SPEC.md, Commands)."""

    model: str
    data: list[str] = field(default_factory=list)
    arch: str | None = None
    arch_kwargs: str | dict | None = None
    trust_code: bool = False
    loss: str = "auto"
    reduction: str = "mean"
    input_key: str | None = None
    target_key: str | None = None
    params: str | None = None
    batch_size: int | None = None
    device: str = "auto"
    dtype: str | None = None
    seed: int = 0


@dataclass
class Session:
    spec: ModelSpec
    model: LoadedModel
    data: Dataset
    objective: Objective
    setup_seconds: float
    comm: object | None = None


def open_session(spec: ModelSpec, comm=None) -> Session:
    """Load the model and data, check them, and build the objective."""
    t0 = time.perf_counter()
    if not spec.data:
        raise UsageError("no data: pass --data FILE (one or more)")
    kwargs = spec.arch_kwargs if isinstance(spec.arch_kwargs, dict) else parse_arch_kwargs(spec.arch_kwargs)
    lm = load_model(spec.model, spec.arch, kwargs if spec.arch_kwargs is not None else None, spec.trust_code)
    ds = load_dataset(spec.data, spec.input_key, spec.target_key)
    if comm is not None:
        ds = ds.split(comm.rank, comm.world)
    first = ds.first(4)
    if lm.module is None:
        if first is None:
            # this rank has no data; any example will do for the conversion
            full = load_dataset(spec.data, spec.input_key, spec.target_key)
            first = full.first(4)
        x = first[0]
        lm.materialize(x.to(torch.float32) if x.is_floating_point() else x)
    torch.manual_seed(spec.seed)
    obj = Objective(
        lm.module,
        ds,
        loss=spec.loss,
        reduction=spec.reduction,
        params=spec.params,
        batch_size=spec.batch_size,
        device=spec.device,
        dtype=spec.dtype,
        comm=comm,
    )
    obj.info.notes[:0] = lm.notes
    return Session(spec, lm, ds, obj, time.perf_counter() - t0, comm)


def base_meta(command: str, session: Session, **extra) -> dict:
    """SPEC.md's ``meta`` fields that every result shares."""
    obj, lm, spec = session.objective, session.model, session.spec
    meta = {
        "schema": "hesscli/1",
        "hesscli_version": __version__,
        "torch_version": torch.__version__,
        "command": command,
        "command_line": command_line(),
        "created": utc_now(),
        "model": {"path": lm.path, "format": lm.format, "sha256": lm.sha256, "arch": lm.arch},
        "data": session.data.describe(),
        "loss": obj.loss.name,
        "reduction": obj.reduction,
        "n_samples": obj.n_samples,
        "n_loss_terms": obj.n_loss_terms,
        "loss_value": obj.loss_value,
        "params": obj.describe_params(),
        "params_regex": spec.params,
        "batch_size": spec.batch_size,
        "dtype": str(obj.dtype).replace("torch.", ""),
        "device": str(obj.device),
        "seed": spec.seed,
        "world_size": 1 if session.comm is None else session.comm.world,
        "notes": list(obj.info.notes),
        "unused_params": list(obj.info.unused),
    }
    if session.comm is not None:
        meta["rank_samples"] = session.comm.rank_samples
    meta.update(extra)
    return meta


def _index_arrays(obj: Objective, names: list[str], offsets: list[int]) -> dict:
    return {
        "param_names": np.array(obj.names, dtype=str),
        "param_offsets": np.array(obj.offsets, dtype=np.int64),
        "block_names": np.array(names, dtype=str),
        "block_offsets": np.array(offsets, dtype=np.int64),
    }


def dense_arrays(obj: Objective, res: DenseResult, no_dense: bool) -> dict:
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
    spec: ModelSpec,
    out: str | os.PathLike = "hessian.npz",
    *,
    mode: str = "auto",
    blocks: str = "module",
    max_memory: str | int | None = None,
    eigenvectors: bool = False,
    no_dense: bool = False,
    symmetric: bool = True,
    force: bool = False,
    progress: Progress | None = None,
    comm=None,
    split: str = "data",
) -> dict:
    """``hesscli compute``: the dense Hessian into ``out``; returns the summary (``--json``)."""
    t0 = time.perf_counter()
    writer = comm is None or comm.rank == 0
    if writer:
        check_output(out, force)
    budget = parse_size(max_memory) if isinstance(max_memory, str) else max_memory
    session = open_session(spec, comm)
    obj = session.objective
    plan = plan_dense(obj, mode, blocks, budget, eigenvectors)
    res = dense_hessian(obj, eigenvectors=eigenvectors, symmetric=symmetric, progress=progress, plan=plan)
    meta = base_meta(
        "compute",
        session,
        mode=res.mode,
        blocks=blocks if res.mode == "block" else "all",
        max_memory=res.budget,
        chunk_size=res.chunk_size,
        symmetric=symmetric,
        hvps=res.hvps,
        asymmetry=res.asymmetry,
        symmetry_probe=res.symmetry_probe,
        negative_threshold=res.negative_threshold,
        approximation=res.approximation,
        seconds=time.perf_counter() - t0,
        hessian_seconds=res.seconds,
    )
    arrays = dense_arrays(obj, res, no_dense)
    summary = summarize(arrays, meta, out=str(out))
    if writer:
        write_result(out, arrays, meta, force)
    summary["seconds"] = time.perf_counter() - t0
    summary["notes"] = meta["notes"]
    return summary


def output_path(out: str | None, default: str) -> Path:
    return Path(out if out else default)
