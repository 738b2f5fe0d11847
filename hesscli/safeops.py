"""Second-order-safe replacements for ops whose second derivatives torch gets wrong.

torch 2.13's double backward (and forward-over-reverse) of ``layer_norm`` with an affine weight and
of ``instance_norm`` with a weight is wrong: the mixed block d²L/d(weight) d(input) is off by O(1)
(NOTES.md; pytorch#196700). Writing the normalisation from primitive ops (mean, centring,
``rsqrt(var + eps)``, scale, shift) gives derivatives of every order that autograd gets right.

:class:`SecondOrderSafe` is a ``TorchFunctionMode`` that swaps those ops for the primitive versions
wherever they are called: from eager modules (``F.layer_norm``), and from the ATen overloads that
``torch.export`` graphs (and TorchScript converted to them) call (``aten.layer_norm``,
``aten.native_layer_norm``, ``aten.instance_norm``). It also routes scaled-dot-product attention
to the math kernel, the only one with double backward and forward-mode derivatives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["SecondOrderSafe", "layer_norm", "instance_norm", "second_order_safe"]


def _norm_dims(x: torch.Tensor, normalized_shape: Sequence[int]) -> tuple[int, ...]:
    k = len(tuple(normalized_shape))
    return tuple(range(x.dim() - k, x.dim()))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``F.layer_norm`` from primitives: (x − mean) · rsqrt(var + eps) · weight + bias."""
    dims = _norm_dims(x, normalized_shape)
    mean = x.mean(dims, keepdim=True)
    xc = x - mean
    var = (xc * xc).mean(dims, keepdim=True)
    out = xc * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def _native_layer_norm(x, normalized_shape, weight, bias, eps):
    dims = _norm_dims(x, normalized_shape)
    mean = x.mean(dims, keepdim=True)
    xc = x - mean
    var = (xc * xc).mean(dims, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    out = xc * rstd
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out, mean, rstd


def instance_norm(
    x,
    running_mean=None,
    running_var=None,
    weight=None,
    bias=None,
    use_input_stats=True,
    momentum=0.1,
    eps=1e-5,
):
    """``F.instance_norm`` from primitives: per (sample, channel) over the spatial dimensions."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if use_input_stats:
        dims = tuple(range(2, x.dim()))
        mean = x.mean(dims, keepdim=True)
        xc = x - mean
        var = (xc * xc).mean(dims, keepdim=True)
        out = xc * torch.rsqrt(var + eps)
    else:
        out = (x - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def _aten_instance_norm(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, *_):
    return instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


def _f_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    return layer_norm(x, normalized_shape, weight, bias, eps)


def _aten_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *_):
    return layer_norm(x, normalized_shape, weight, bias, eps)


def _replacements() -> dict:
    aten = torch.ops.aten
    return {
        F.layer_norm: _f_layer_norm,
        torch.layer_norm: _aten_layer_norm,
        aten.layer_norm.default: _aten_layer_norm,
        aten.native_layer_norm.default: _native_layer_norm,
        F.instance_norm: instance_norm,
        torch.instance_norm: _aten_instance_norm,
        aten.instance_norm.default: _aten_instance_norm,
    }


class SecondOrderSafe(TorchFunctionMode):
    """Calls the primitive versions of ``layer_norm`` and ``instance_norm``; counts each swap."""

    def __init__(self):
        super().__init__()
        self._table = _replacements()
        self.swapped: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        repl = self._table.get(func)
        if repl is None:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        self.swapped[name] = self.swapped.get(name, 0) + 1
        return repl(*args, **kwargs)


@contextlib.contextmanager
def second_order_safe():
    """Context for every second-order evaluation: primitive norms, math attention kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]), SecondOrderSafe() as mode:
        yield mode
