"""Ops that torch cannot differentiate twice, computed by equivalent ops that it can.

Plain autograd double backward is right for every op hesscli has met, ``layer_norm`` and
``instance_norm`` included (NOTES.md: only torch.func transforms wrapped around a first
derivative get those wrong, and hesscli uses none). What remains are ops whose *second* derivative
torch does not implement at all, all with an exact equivalent:

- scaled-dot-product attention: the flash and memory-efficient kernels have no double backward;
  the math kernel is chosen (``sdpa_kernel``; this also reaches TorchScript code, which reads the
  same global flags);
- ``embedding(..., sparse=True)``: a sparse gradient cannot be differentiated again; the same
  function with a dense gradient is used (sparsity changes how the gradient is stored, not the
  function); likewise ``scale_grad_by_freq=True``, which rescales the gradient so that it is not the
  loss's gradient;
- ``embedding_bag``: its backward has no derivative; it is rewritten as an embedding lookup and a
  masked reduction over each bag (sum, mean or max, ``per_sample_weights``, ``padding_idx``,
  offsets or 2-D input, ``include_last_offset``).

:class:`SecondOrderSafe` is a ``TorchFunctionMode`` that swaps the Python-level calls
(``F.embedding``, ``F.embedding_bag``, modules that call them) for the versions above. TorchScript
graphs do not go through Python: their sparse embedding gradients are densified by the product code
(:class:`hesscli.objective.core.Linearization`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["SecondOrderSafe", "Float64Everywhere", "embedding_bag", "float64_everywhere", "second_order_safe"]

_MODES = {0: "sum", 1: "mean", 2: "max"}


def embedding_bag(
    input,
    weight,
    offsets=None,
    max_norm=None,
    norm_type=2.0,
    scale_grad_by_freq=False,
    mode="mean",
    sparse=False,
    per_sample_weights=None,
    include_last_offset=False,
    padding_idx=None,
):
    """``F.embedding_bag`` as an embedding lookup and a masked reduction per bag (twice
    differentiable). Shapes as in torch: ``input`` (B, L) without offsets, or (n,) with ``offsets``
    (B,) (or (B+1,) with ``include_last_offset``); returns (B, embedding_dim). An empty bag gives
    zeros, as torch does."""
    if max_norm is not None:
        raise NotImplementedError("embedding_bag with max_norm renormalises the weight in place")
    if isinstance(mode, int):
        mode = _MODES[mode]
    if per_sample_weights is not None and mode != "sum":
        raise NotImplementedError("embedding_bag: per_sample_weights only work with mode='sum'")
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    if input.dim() == 2:
        idx = input
        mask = torch.ones_like(idx, dtype=torch.bool)
        psw = per_sample_weights
    else:
        if offsets is None:
            raise ValueError("embedding_bag: 1-D input needs offsets")
        n = input.shape[0]
        starts = offsets[:-1] if include_last_offset else offsets
        ends = torch.cat([starts[1:], starts.new_tensor([n])])  # the last bag ends at n, as in torch
        lengths = ends - starts
        width = int(lengths.max()) if lengths.numel() else 0
        pos = torch.arange(width, device=input.device)
        mask = pos[None, :] < lengths[:, None]
        gather = (starts[:, None] + pos[None, :]).clamp(max=max(n - 1, 0))
        idx = input[gather] if n else input.new_zeros(gather.shape)
        psw = per_sample_weights[gather] if per_sample_weights is not None else None
    if padding_idx is not None:
        mask = mask & (idx != padding_idx)
    emb = F.embedding(idx, weight)  # (B, L, D)
    m = mask.unsqueeze(-1).to(emb.dtype)
    if mode == "max":
        if emb.shape[1] == 0:  # every bag empty
            return emb.new_zeros(emb.shape[0], emb.shape[2])
        filled = emb.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        out = filled.amax(1)
        return torch.where(mask.any(1, keepdim=True), out, torch.zeros_like(out))
    if psw is not None:
        m = m * psw.unsqueeze(-1).to(emb.dtype)
    out = (emb * m).sum(1)
    if mode == "mean":
        out = out / mask.sum(1, keepdim=True).clamp_min(1).to(emb.dtype)
    return out


def _dense_embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False):
    """The same lookup with a plain dense gradient: ``sparse`` and ``scale_grad_by_freq`` change
    the gradient torch returns, not the function (``scale_grad_by_freq`` makes it no gradient of the
    loss at all)."""
    return F.embedding(input, weight, padding_idx, max_norm, norm_type, False, False)


class SecondOrderSafe(TorchFunctionMode):
    """Swaps sparse embeddings and ``embedding_bag`` for twice-differentiable equivalents."""

    def __init__(self):
        super().__init__()
        self.swapped: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding_bag:
            self.swapped["embedding_bag"] = self.swapped.get("embedding_bag", 0) + 1
            return embedding_bag(*args, **kwargs)
        if func is F.embedding and (kwargs.get("sparse") or (len(args) > 6 and args[6])
                                    or kwargs.get("scale_grad_by_freq") or (len(args) > 5 and args[5])):
            self.swapped["embedding(sparse=True)"] = self.swapped.get("embedding(sparse=True)", 0) + 1
            return _dense_embedding(*args, **kwargs)
        return func(*args, **kwargs)


_LOW_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _up(a):
    return torch.float64 if isinstance(a, torch.dtype) and a in _LOW_FLOATS else a


class Float64Everywhere(TorchFunctionMode):
    """Under ``--dtype float64``: no part of the model computes in a lower precision. Casts that a
    model makes whatever its own dtype (``x.float()``, ``.to(torch.float32)``,
    ``softmax(..., dtype=torch.float32)``, ``arange(..., dtype=torch.float32)``: transformers'
    RMSNorm, eager softmax and rotary angles do) are computed in float64 instead — found by the
    dtype they ask for, not from a list of models."""

    _CASTS = (torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._CASTS:
            return args[0].double()
        return func(*[_up(a) for a in args], **{k: _up(v) for k, v in kwargs.items()})


@contextlib.contextmanager
def float64_everywhere(on: bool = True):
    """:class:`Float64Everywhere` when ``on``; nothing otherwise."""
    if not on:
        yield
        return
    with Float64Everywhere():
        yield


@contextlib.contextmanager
def second_order_safe():
    """Context for every evaluation of the loss: the math attention kernel, and the swaps of
    :class:`SecondOrderSafe`."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]), SecondOrderSafe() as mode:
        yield mode
