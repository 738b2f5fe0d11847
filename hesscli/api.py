"""The library entry points the commands call: open a model and its data as an :class:`Objective`,
and ``compute`` the dense Hessian into a result file. Notebooks can call these directly."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from hesscli import __version__
from hesscli.algorithms.dense import DenseResult, dense_hessian, plan_dense
from hesscli.errors import UsageError
from hesscli.io.resultfile import check_output, command_line, summarize, utc_now, write_result
from hesscli.objective.core import Objective
from hesscli.runtime.memory import default_budget, parse_size
from hesscli.runtime.progress import Progress
from hesscli.session import ModelSpec, Session, open_session, stage

__all__ = ["ModelSpec", "Session", "open_session", "compute", "base_meta"]


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
        "data": (session.all_data or session.data).describe(),
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
        "engine": "chain" if obj.chain is not None else "autograd",
        "world_size": 1 if session.comm is None else session.comm.world,
        "notes": list(obj.info.notes) + [f"warning: {w}" for w in obj.info.warnings],
        "warnings": list(obj.info.warnings),
        "unused_params": list(obj.info.unused),
        "tied": list(obj.tied),
        "frozen": list(obj.frozen),
        "derivative_check": dict(obj.derivative_check),
    }
    if session.comm is not None:
        meta["rank_samples"] = session.comm.rank_samples
        meta["split"] = "data" if obj.comm is not None else "columns"
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
    """``hesscli compute``: the dense Hessian into ``out``; returns the summary (``--json``).

    Under torchrun (``comm`` from :func:`hesscli.runtime.distributed.from_env`), ``split="data"`` divides
    the data over the ranks and ``split="columns"`` the Hessian's columns; rank 0 alone writes.
    """
    t0 = time.perf_counter()
    if split not in ("data", "columns"):
        raise UsageError(f"--split '{split}': choose data or columns")
    writer = comm is None or comm.rank == 0
    with stage(comm):
        if writer:
            check_output(out, force)
        budget = parse_size(max_memory) if isinstance(max_memory, str) else max_memory
    session = open_session(spec, comm, split=split)
    obj = session.objective
    if comm is not None:
        budget = _agree_on_plan(obj, comm, budget)
    with stage(comm):
        plan = plan_dense(obj, mode, blocks, budget, eigenvectors)
    column_comm = comm if comm is not None and split == "columns" else None
    res = dense_hessian(
        obj, eigenvectors=eigenvectors, symmetric=symmetric, progress=progress, plan=plan, column_comm=column_comm
    )
    hvps, asymmetry = res.hvps, res.asymmetry
    if comm is not None:  # the products every rank computed (its pieces, or its columns); the worst asymmetry
        n = torch.tensor([float(hvps)], dtype=torch.float64)
        comm.all_reduce(n)
        hvps = int(n.item())
        a = torch.tensor([asymmetry], dtype=torch.float64)
        comm.all_reduce(a, op="max")
        asymmetry = a.item()
    meta = base_meta(
        "compute",
        session,
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
    arrays = dense_arrays(obj, res, no_dense)
    summary = summarize(arrays, meta, out=str(out))
    if writer:
        write_result(out, arrays, meta, force)
    summary["seconds"] = time.perf_counter() - t0
    summary["notes"] = meta["notes"]
    summary["warnings"] = meta["warnings"]
    return summary


def _agree_on_plan(obj: Objective, comm, budget: int | None) -> int:
    """The same dense plan on every rank: the smallest memory budget (``open_session`` already
    agreed on the largest gradient graph; a rank without data measures none)."""
    return int(comm.minimum(budget if budget is not None else default_budget(obj.device)))


def output_path(out: str | None, default: str) -> Path:
    return Path(out if out else default)
