"""``hesscli inspect``: a model's parameters and blocks, and what dense work on it would cost."""

from __future__ import annotations

import re

from hesscli.algorithms.dense import dense_bytes
from hesscli.errors import UsageError
from hesscli.io.loading import LoadedModel, load_model, parse_arch_kwargs
from hesscli.objective.core import param_blocks
from hesscli.objective.ties import tied_parameters
from hesscli.runtime.memory import default_budget
from hesscli.session import ModelSpec, Session

__all__ = ["inspect_model"]



def inspect_model(spec: ModelSpec | Session, loaded: LoadedModel | None = None) -> dict:
    """The facts ``hesscli inspect`` shows, as a JSON-ready dict: parameters, blocks, dense bytes
    (full and block mode) against the default budget, and with data (an open ``Session``) the loss.
    ``loaded``: an already loaded model (a caller's module) instead of the file ``spec.model``."""
    import torch

    session = spec if isinstance(spec, Session) else None
    if session is not None:
        obj = session.objective
        names, shapes, lm = obj.names, obj.shapes, session.model
        frozen, tied = set(obj.frozen), obj.tied
        itemsize = torch.empty((), dtype=obj.dtype).element_size()
        dtype = str(obj.dtype).replace("torch.", "")
        device = obj.device
    else:
        kwargs = parse_arch_kwargs(spec.arch_kwargs) if isinstance(spec.arch_kwargs, str) else spec.arch_kwargs
        lm = loaded if loaded is not None else load_model(spec.model, spec.arch, kwargs, spec.trust_code)
        named = lm.named_parameters()
        frozen = {n for n, p in named if not p.requires_grad}
        tied = tied_parameters(lm.module)
        if spec.trainable_only:
            named = [(n, p) for n, p in named if n not in frozen]
        if spec.params:
            try:
                rx = re.compile(spec.params)
            except re.error as e:
                raise UsageError(f"--params '{spec.params}' is not a regular expression: {e}") from None
            named = [(n, p) for n, p in named if rx.search(n)]
            if not named:
                raise UsageError(f"--params '{spec.params}' selects no parameter")
        names = [n for n, _ in named]
        shapes = [tuple(p.shape) for _, p in named]
        dt = spec.dtype or ("float64" if any(p.dtype == torch.float64 for _, p in named) else "float32")
        itemsize = 8 if dt == "float64" else 4
        dtype = dt
        device = torch.device("cpu")
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    P = offsets[-1]
    blocks = param_blocks(names, offsets, "module")
    full_bytes = dense_bytes([P], itemsize, False) if P else 0
    block_bytes = dense_bytes([b.size for b in blocks], itemsize, False) if P else 0
    budget = default_budget(device)
    summary = {
        "status": "ok",
        "command": "inspect",
        "model": {"path": lm.path, "format": lm.format, "sha256": lm.sha256},
        "device": str(device),
        "n_params": P,
        "dtype": dtype,
        "params": [{"name": n, "shape": list(s), "size": z, "frozen": n in frozen} for n, s, z in zip(names, shapes, sizes)],
        "tied": tied,
        "blocks": [{"name": b.name, "size": b.size, "params": [names[i] for i in b.tensors],
                    "dense_bytes": dense_bytes([b.size], itemsize, False)} for b in blocks],
        "full_bytes": full_bytes,
        "block_bytes": block_bytes,
        "default_budget": budget,
        "fits": "full" if full_bytes <= budget else ("block" if block_bytes <= budget else "matrix-free only"),
    }
    if session is not None:
        obj = session.objective
        summary.update(n_samples=obj.n_samples, n_loss_terms=obj.n_loss_terms, loss=obj.loss.name,
                       reduction=obj.reduction, loss_value=obj.loss_value, notes=obj.info.notes)

    return summary
