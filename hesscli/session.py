"""A model and its data, opened once: :class:`ModelSpec` (the options every model command shares),
:func:`open_session` (load, check, build the :class:`~hesscli.objective.core.Objective`) and
:class:`Session` (what it returns)."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from hesscli.errors import UsageError
from hesscli.io.data import Dataset, load_dataset
from hesscli.io.loading import LoadedModel, load_model, parse_arch_kwargs
from hesscli.objective.core import Objective

__all__ = ["ModelSpec", "Session", "open_session", "in_memory_model", "data_argument", "stage"]


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
    engine: str = "auto"
    output_key: str | None = None
    trainable_only: bool = False


@dataclass
class Session:
    """An open model and its data: the ModelSpec, the loaded model, the data (this rank's part under torchrun) and the Objective."""
    spec: ModelSpec
    model: LoadedModel
    data: Dataset
    objective: Objective
    setup_seconds: float
    comm: object | None = None
    all_data: Dataset | None = None  # the whole data set when ``data`` is this rank's part
    probe: tuple[float, str, int] | None = None  # the symmetry probe (value, where, products), once per session


def open_session(
    spec: ModelSpec,
    comm=None,
    split: str = "data",
    *,
    module: nn.Module | None = None,
    dataset: Dataset | None = None,
) -> Session:
    """Load the model and data, check them, and build the objective.

    ``module``: an in-memory model instead of the file ``spec.model`` (a notebook's ``nn.Module``;
    the objective works on a copy, the caller's module is left as it is). ``dataset``: in-memory
    data (:meth:`Dataset.from_tensors`) instead of the files ``spec.data``.

    Under torchrun (``comm``), ``split="data"`` gives this rank its part of the data
    (:meth:`Dataset.split`) and an objective whose products are summed over the ranks;
    ``split="columns"`` keeps all the data on every rank and a rank-local objective.
    """
    t0 = time.perf_counter()
    if not spec.data and dataset is None:
        raise UsageError("no data: pass --data FILE (one or more)")
    if split not in ("data", "columns"):
        raise UsageError(f"--split '{split}': choose data or columns")
    device = comm.device_for(spec.device) if comm is not None else spec.device
    with stage(comm):  # errors here may hit some ranks only: all ranks agree before going on
        kwargs = spec.arch_kwargs if isinstance(spec.arch_kwargs, dict) else parse_arch_kwargs(spec.arch_kwargs)
        if module is not None:
            lm = in_memory_model(module)
        else:
            lm = load_model(spec.model, spec.arch, kwargs if spec.arch_kwargs is not None else None, spec.trust_code)
        causal = lm.hf is not None and lm.hf.head == "causal_lm"
        if dataset is not None:
            full = dataset
        else:
            full = load_dataset(spec.data, spec.input_key, spec.target_key, accepts=lm.forward_arguments(), derive_labels=causal)
        ds = full.split(comm.rank, comm.world) if comm is not None and split == "data" else full
        first = ds.first(4)
        example = full.first(8) if first is None else None  # this rank has no data
    obj = Objective(
        lm.module,
        ds,
        loss=spec.loss,
        reduction=spec.reduction,
        params=spec.params,
        batch_size=spec.batch_size,
        device=device,
        dtype=spec.dtype,
        comm=comm if split == "data" else None,
        engine=spec.engine,
        output_key=spec.output_key,
        trainable_only=spec.trainable_only,
        static_batch=lm.static_batch,
        head=lm.hf,
        copy=module is not None,  # a file's module was loaded for this session; the caller's is copied
        **({"example": example} if example is not None else {}),
    )
    obj.info.notes[:0] = lm.notes + full.notes
    if comm is not None:
        comm.check_setup(obj, ds.n_samples)
        _merge_unused(obj, comm, has_data=first is not None)
        with stage(comm):
            obj.measure_linearization()
        # sizes derived from it (dense chunks, operator chunks) must match on every rank: they set
        # how many collectives run
        obj.linearization_bytes = int(comm.maximum(obj.linearization_bytes))
    return Session(spec, lm, ds, obj, time.perf_counter() - t0, comm, full)


def data_argument(data) -> tuple[list[str], Dataset | None]:
    """What a library call was given as data: file paths (a path or a sequence of them), or an
    in-memory data set (a :class:`Dataset`, or an ``(inputs, targets)`` pair of tensors, inputs
    possibly a dict of tensors). Returns (paths, None) or ([], dataset)."""
    if data is None:
        return [], None
    if isinstance(data, Dataset):
        return [], data
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], (str, os.PathLike)):
        return [], Dataset.from_tensors(data[0], data[1])
    if isinstance(data, (str, os.PathLike)):
        return [str(data)], None
    return [str(d) for d in data], None


def in_memory_model(module: nn.Module) -> LoadedModel:
    """A caller's module described as a model source (``meta.model``: format ``module``, no file)."""
    if not isinstance(module, nn.Module):
        raise UsageError(f"the model must be an nn.Module or a path, not {type(module).__name__}")
    hf = None
    config = getattr(module, "config", None)
    if config is not None and type(module).__module__.startswith("transformers."):
        from hesscli.io.hf import head_of

        hf = head_of(type(module).__name__, config)
    name = type(module).__qualname__
    return LoadedModel(path=f"<{name}>", format="module", sha256=None, module=module, arch=name, hf=hf)


def stage(comm):
    """A block whose errors may hit some ranks only: under torchrun every rank learns of a refusal."""
    return comm.stage() if comm is not None else contextlib.nullcontext()


def _merge_unused(obj: Objective, comm, has_data: bool) -> None:
    """Parameters that get no gradient on any rank (a rank without data cannot tell on its own)."""
    used = torch.tensor([0.0 if (n in obj.info.unused or not has_data) else 1.0 for n in obj.names], dtype=torch.float64)
    comm.all_reduce(used, op="max")
    unused = [n for n, u in zip(obj.names, used.tolist(), strict=True) if u == 0.0]
    if unused != obj.info.unused:
        obj.info.notes = [s for s in obj.info.notes if not s.startswith(_UNUSED_NOTE)]
        obj.info.unused = unused
        if unused:
            obj.info.notes.append(_UNUSED_NOTE + ", ".join(unused))


_UNUSED_NOTE = "parameters that get no gradient (their Hessian rows are zero): "
