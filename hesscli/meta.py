"""The one builder of a result's ``meta`` (SPEC.md, Result files): every command's file carries the
same stamp (schema, versions, command line, time) and, from an open model, the same description of
the model, data, loss and parameters."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from hesscli import __version__
from hesscli.io.resultfile import SCHEMA, command_line, utc_now

__all__ = ["build_meta", "RUN_KEYS"]

# what describes one run's work, not the Hessian it describes: a result derived from another
# result (spectrum of a compute file, merge) drops these from the inherited meta
RUN_KEYS = ("max_memory", "chunk_size", "symmetric", "hessian_seconds", "seconds", "hvps")


def _model_fields(session) -> dict:
    obj, lm, spec = session.objective, session.model, session.spec
    fields = {
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
        fields["rank_samples"] = session.comm.rank_samples
        fields["split"] = "data" if obj.comm is not None else "columns"
    return fields


def build_meta(
    command: str,
    *,
    session=None,
    inherited: Mapping[str, Any] | None = None,
    drop: Iterable[str] = (),
    **fields: Any,
) -> dict:
    """``meta`` for a ``command`` result: the stamp, then what describes the model and data — from
    an open :class:`~hesscli.session.Session` (``session``) or from the result the answer was
    derived from (``inherited``, less :data:`RUN_KEYS` and ``drop``) — then ``fields``.

    Returns a JSON-ready dict (numbers, strings, lists, dicts)."""
    meta: dict[str, Any] = {}
    if inherited is not None:
        meta.update({k: v for k, v in inherited.items() if k not in RUN_KEYS and k not in set(drop)})
    if session is not None:
        meta.update(_model_fields(session))
    meta.update(
        schema=SCHEMA,
        hesscli_version=__version__,
        torch_version=torch.__version__,
        command=command,
        command_line=command_line(),
        created=utc_now(),
    )
    meta.update(fields)
    return meta
