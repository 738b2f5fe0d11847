"""An independent float64 reference for the Hessians hesscli computes.

The reference rebuilds the *eager* model from its architecture (``sample_checkpoints/archs.py`` or
``tests/models.py``) and its state_dict, casts it to float64, swaps every ``nn.LayerNorm`` and
``nn.InstanceNorm*d`` for a module written here from primitive ops (torch's own second derivatives
of these two ops are wrong: NOTES.md, pytorch#196700), and differentiates PyTorch's own *mean*
loss over the whole data set in one batch:

    H = ∇²_θ L(θ),   L(θ) = loss(model_θ(X), Y)   (``reduction="mean"`` or ``"sum"``)

with ``torch.func`` on the params dict (``functional_call``): ``torch.func.hessian`` (forward over
reverse) for small models, and for larger ones the same matrix column-chunked as
``jacrev(grad(L), chunk_size=...)`` (reverse over reverse), so memory stays bounded. Nothing here
imports hesscli.

:func:`fd_check` validates the reference itself against 4-point central finite differences of the
loss, and :func:`assert_close_matrix` reports the worst entries (row, column, parameter names) when
two matrices differ.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"

__all__ = [
    "SAMPLES",
    "SAMPLE_CASES",
    "Reference",
    "PrimLayerNorm",
    "PrimInstanceNorm",
    "primitive_norms",
    "load_arch",
    "load_data",
    "mean_loss",
    "reference",
    "reference_hessian",
    "sample_reference",
    "fd_check",
    "assert_close_matrix",
    "flat_names",
]


# ---------------------------------------------------------------------------------------------
# normalization layers from primitive ops


def prim_layer_norm(x, normalized_shape, weight, bias, eps):
    """(x − mean) / sqrt(var + eps) · weight + bias over the last len(normalized_shape) dims."""
    dims = tuple(range(x.dim() - len(tuple(normalized_shape)), x.dim()))
    mu = x.sum(dims, keepdim=True) / math.prod(x.shape[d] for d in dims)
    c = x - mu
    var = (c**2).sum(dims, keepdim=True) / math.prod(x.shape[d] for d in dims)
    y = c / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def prim_instance_norm(x, weight, bias, eps):
    """Per (sample, channel): (x − mean) / sqrt(var + eps) over the spatial dims, then the
    channel's affine weight and bias."""
    dims = tuple(range(2, x.dim()))
    n = math.prod(x.shape[2:])
    mu = x.sum(dims, keepdim=True) / n
    c = x - mu
    var = (c**2).sum(dims, keepdim=True) / n
    y = c / torch.sqrt(var + eps)
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


class PrimLayerNorm(nn.Module):
    """``nn.LayerNorm`` with the same parameter names, computed from primitive ops."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.normalized_shape = tuple(ln.normalized_shape)
        self.eps = ln.eps
        self.weight = ln.weight
        self.bias = ln.bias

    def forward(self, x):
        return prim_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class PrimInstanceNorm(nn.Module):
    """``nn.InstanceNorm{1,2,3}d`` (instance statistics) with the same parameter names."""

    def __init__(self, m: nn.modules.instancenorm._InstanceNorm):
        super().__init__()
        if m.track_running_stats:
            raise NotImplementedError("reference: InstanceNorm with running statistics")
        self.eps = m.eps
        self.weight = m.weight
        self.bias = m.bias

    def forward(self, x):
        return prim_instance_norm(x, self.weight, self.bias, self.eps)


def primitive_norms(model: nn.Module) -> nn.Module:
    """Replace (in place) every LayerNorm / InstanceNorm submodule by its primitive version; the
    parameter names and their order in ``named_parameters()`` stay the same."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.LayerNorm):
            setattr(model, name, PrimLayerNorm(child))
        elif isinstance(child, nn.modules.instancenorm._InstanceNorm):
            setattr(model, name, PrimInstanceNorm(child))
        else:
            primitive_norms(child)
    return model


# ---------------------------------------------------------------------------------------------
# models, data, loss


def load_arch(spec: str, **kwargs) -> nn.Module:
    """``path/to/file.py:NAME`` → ``NAME(**kwargs)``, the file imported by path."""
    path, _, name = spec.rpartition(":")
    path = Path(path)
    if not path.is_absolute():
        path = ROOT / path
    mod_name = f"_hesscli_ref_{path.stem}"
    if mod_name not in sys.modules:
        s = importlib.util.spec_from_file_location(mod_name, path)
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
        sys.modules[mod_name] = mod
    return getattr(sys.modules[mod_name], name)(**kwargs)


def load_data(*paths: str | Path, input_key: str = "inputs", target_key: str = "targets"):
    """Concatenate the shards' (inputs, targets) (``torch.load(weights_only=True)`` dicts)."""
    xs, ys = [], []
    for p in paths:
        d = torch.load(p, weights_only=True)
        if isinstance(d, dict):
            xs.append(d[input_key])
            ys.append(d[target_key])
        else:
            xs.append(d[0])
            ys.append(d[1])
    return torch.cat(xs), torch.cat(ys)


def mean_loss(name: str, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """PyTorch's own loss over the whole batch."""
    if name == "cross_entropy":
        return F.cross_entropy(out, y, reduction=reduction, ignore_index=-100)
    if name == "mse":
        return F.mse_loss(out, y, reduction=reduction)
    if name == "bce_with_logits":
        return F.binary_cross_entropy_with_logits(out, y, reduction=reduction)
    if name == "nll":
        return F.nll_loss(out, y, reduction=reduction, ignore_index=-100)
    raise ValueError(name)


def flat_names(model: nn.Module, params_regex: str | None = None) -> list[tuple[str, tuple[int, ...]]]:
    import re

    rx = re.compile(params_regex) if params_regex else None
    return [(n, tuple(p.shape)) for n, p in model.named_parameters() if rx is None or rx.search(n)]


@dataclass
class Reference:
    """A float64 reference: the Hessian, its eigenvalues, and the flat parameter layout."""

    hessian: np.ndarray  # (P, P) float64
    names: list[str]
    shapes: list[tuple[int, ...]]
    offsets: list[int]
    loss_value: float
    theta: torch.Tensor  # flat float64 parameters
    loss_fn: Callable[[torch.Tensor], torch.Tensor]  # flat θ ↦ L(θ)
    _eig: np.ndarray | None = None

    @property
    def P(self) -> int:
        return self.offsets[-1]

    @property
    def eigenvalues(self) -> np.ndarray:
        if self._eig is None:
            self._eig = np.linalg.eigvalsh(self.hessian)
        return self._eig

    @property
    def norm2(self) -> float:
        return float(np.abs(self.eigenvalues).max())

    @property
    def abs_sum(self) -> float:
        return float(np.abs(self.eigenvalues).sum())

    def span(self, name: str) -> slice:
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i + 1])

    def index(self, names: Sequence[str]) -> np.ndarray:
        """Flat indices of these parameter tensors (in the order given)."""
        return np.concatenate([np.arange(self.span(n).start, self.span(n).stop) for n in names])

    def name_of(self, flat: int) -> str:
        for n, a, b in zip(self.names, self.offsets[:-1], self.offsets[1:]):
            if a <= flat < b:
                return f"{n}[{flat - a}]"
        return "?"


def reference_hessian(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str,
    *,
    reduction: str = "mean",
    params_regex: str | None = None,
    primitive: bool = True,
    method: str = "auto",
    chunk_size: int = 128,
) -> Reference:
    """The float64 Hessian of ``loss(model(x), y)`` w.r.t. the (selected) parameters.

    ``method``: ``hessian`` (``torch.func.hessian`` on the params dict), ``jacrev`` (column chunks
    of ``jacrev(grad)``), or ``auto`` (``hessian`` up to 400 parameters). ``primitive=False`` keeps
    torch's own norm layers (to show that they give a wrong Hessian).
    """
    model = model.to(torch.float64).eval()
    if primitive:
        primitive_norms(model)
    for p in model.parameters():
        p.requires_grad_(False)
    x = x.to(torch.float64) if x.is_floating_point() else x
    y = y.to(torch.float64) if y.is_floating_point() else y
    layout = flat_names(model, params_regex)
    names = [n for n, _ in layout]
    shapes = [s for _, s in layout]
    sizes = [math.prod(s) for s in shapes]
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    all_params = dict(model.named_parameters())
    theta0 = {n: all_params[n].detach().clone() for n in names}

    def loss_dict(params: dict) -> torch.Tensor:
        return mean_loss(loss, functional_call(model, params, (x,)), y, reduction)

    def unflatten(theta: torch.Tensor) -> dict:
        return {n: theta[a:b].reshape(s) for n, s, a, b in zip(names, shapes, offsets[:-1], offsets[1:])}

    def loss_flat(theta: torch.Tensor) -> torch.Tensor:
        return loss_dict(unflatten(theta))

    theta_flat = torch.cat([theta0[n].reshape(-1) for n in names])
    P = offsets[-1]
    if method == "auto":
        method = "hessian" if P <= 400 else "jacrev"
    if method == "hessian":
        nested = torch.func.hessian(loss_dict)(theta0)
        rows = [torch.cat([nested[a][b].reshape(sa, sb) for b, sb in zip(names, sizes)], dim=1) for a, sa in zip(names, sizes)]
        H = torch.cat(rows, dim=0)
    elif method == "jacrev":
        H = torch.func.jacrev(torch.func.grad(loss_flat), chunk_size=chunk_size)(theta_flat)
    else:
        raise ValueError(method)
    with torch.no_grad():
        value = float(loss_flat(theta_flat))
    return Reference(H.detach().numpy().astype(np.float64), names, shapes, offsets, value, theta_flat, loss_flat)


def reference(
    arch: str,
    state_dict: str | Path | dict,
    data: Sequence[str | Path],
    loss: str,
    *,
    arch_kwargs: dict | None = None,
    **kw,
) -> Reference:
    """The reference of ``arch`` with weights from ``state_dict`` (a file or a dict) on ``data``."""
    model = load_arch(arch, **(arch_kwargs or {}))
    sd = torch.load(state_dict, weights_only=True) if not isinstance(state_dict, dict) else state_dict
    model.load_state_dict(sd)
    x, y = load_data(*data)
    return reference_hessian(model, x, y, loss, **kw)


# name: (architecture, state_dict, data, loss, formats)
SAMPLE_CASES = {
    "diabetes_mlp": ("sample_checkpoints/archs.py:DiabetesMLP", "diabetes_mlp_state_dict.pt", "diabetes.pt", "mse"),
    "digits_cnn": ("sample_checkpoints/archs.py:DigitsCNN", "digits_cnn_state_dict.pt", "digits_images.pt", "cross_entropy"),
    "digits_mlp": ("sample_checkpoints/archs.py:DigitsMLP", "digits_mlp_state_dict.pt", "digits.pt", "cross_entropy"),
}

_SAMPLE_CACHE: dict[tuple, Reference] = {}


def sample_reference(name: str, params_regex: str | None = None, n_samples: int | None = None) -> Reference:
    """The reference of a bundled sample on its own data, or on its first ``n_samples`` samples
    (cached for the test session)."""
    key = (name, params_regex, n_samples)
    if key not in _SAMPLE_CACHE:
        arch, sd, data, loss = SAMPLE_CASES[name]
        model = load_arch(arch)
        model.load_state_dict(torch.load(SAMPLES / sd, weights_only=True))
        x, y = load_data(SAMPLES / data)
        if n_samples is not None:
            x, y = x[:n_samples], y[:n_samples]
        _SAMPLE_CACHE[key] = reference_hessian(model, x, y, loss, params_regex=params_regex)
    return _SAMPLE_CACHE[key]


# ---------------------------------------------------------------------------------------------
# checks


def fd_check(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    theta: torch.Tensor,
    entries: Sequence[tuple[int, int]],
    h: float = 1e-3,
) -> np.ndarray:
    """H_ij by 4-point central differences of the loss (float64):

        H_ij ≈ [L(θ+h e_i+h e_j) − L(θ+h e_i−h e_j) − L(θ−h e_i+h e_j) + L(θ−h e_i−h e_j)] / (4h²)

    (for i = j this is the 3-point second difference with step 2h). Truncation error O(h²)·|∂⁴L|,
    rounding O(ε·|L|/h²): with h = 1e-3 both are near 1e-8 on these losses."""
    theta = theta.detach().to(torch.float64)
    out = []
    with torch.no_grad():
        def at(i, j, si, sj):
            t = theta.clone()
            t[i] += si * h
            t[j] += sj * h
            return float(loss_fn(t))

        for i, j in entries:
            out.append((at(i, j, 1, 1) - at(i, j, 1, -1) - at(i, j, -1, 1) + at(i, j, -1, -1)) / (4 * h * h))
    return np.array(out)


def assert_close_matrix(
    A: np.ndarray,
    B: np.ndarray,
    rtol_of_max: float,
    label: str = "",
    names: Reference | None = None,
    worst: int = 5,
) -> float:
    """Assert max|A − B| ≤ rtol_of_max · max|B|; on failure, list the worst entries with their
    row/column and (given a :class:`Reference`) parameter names. Returns the relative error."""
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    assert A.shape == B.shape, f"{label}: shapes differ: {A.shape} vs {B.shape}"
    assert np.isfinite(A).all(), f"{label}: non-finite entries"
    scale = float(np.abs(B).max()) if B.size else 0.0
    diff = np.abs(A - B)
    err = float(diff.max()) if diff.size else 0.0
    rel = err / scale if scale > 0 else err
    if rel > rtol_of_max:
        flat = np.argsort(diff, axis=None)[::-1][:worst]
        lines = []
        for f in flat:
            idx = np.unravel_index(f, diff.shape)
            where = ", ".join(str(int(i)) for i in idx)
            if names is not None and len(idx) == 2:
                where += f" ({names.name_of(int(idx[0]))} / {names.name_of(int(idx[1]))})"
            lines.append(f"  [{where}]: got {A[idx]:.6e}, expected {B[idx]:.6e}, |diff| {diff[idx]:.3e}")
        raise AssertionError(
            f"{label}: max|A−B| = {err:.3e} = {rel:.3e}·max|B| > {rtol_of_max:.1e} (max|B| = {scale:.3e}); worst entries:\n"
            + "\n".join(lines)
        )
    return rel
