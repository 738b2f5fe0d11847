"""Tied weights: parameters that are one tensor under several names (an embedding shared with the
output head). A tie is one parameter, under the first name ``named_parameters()`` gives (SPEC.md).

Ties are found by storage — (data pointer, offset, shape, strides, device) — not by object identity,
since a TorchScript module or a torch.export program may hand out distinct Python objects (even
distinct Parameter objects) over one storage."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["storage_key", "unique_parameters", "tied_parameters", "tie_groups"]


def storage_key(t: torch.Tensor) -> tuple:
    """What makes two tensors the same memory."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.device.type)


def unique_parameters(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``named_parameters()`` with each tensor once, under its first name."""
    seen: set = set()
    out = []
    for n, p in module.named_parameters():
        key = storage_key(p)
        if key not in seen:
            seen.add(key)
            out.append((n, p))
    return out


def tied_parameters(module: nn.Module) -> list[dict]:
    """Every name that aliases an earlier parameter: ``[{"name": alias, "tied_to": first name}]``."""
    first: dict = {}
    out = []
    for n, p in module.named_parameters(remove_duplicate=False):
        key = storage_key(p)
        if key in first:
            out.append({"name": n, "tied_to": first[key]})
        else:
            first[key] = n
    return out


def tie_groups(module: nn.Module) -> dict[str, list[str]]:
    """For each name of a tied tensor, every name of that tensor (in named order)."""
    names: dict[tuple, list[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(storage_key(p), []).append(n)
    return {n: group for group in names.values() if len(group) > 1 for n in group}
