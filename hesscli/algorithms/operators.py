"""Symmetric linear operators for the matrix-free algorithms (Lanczos, trace, density).

One interface, :class:`SymOperator`: ``matmat(V)`` maps a block of row vectors V (k, n) to H·V
(k, n), float64 (or the narrower dtype a caller that stores its vectors in float32 asks for). Two kinds plug into it:

- :class:`HessianOperator`: the Hessian of an :class:`~hesscli.objective.core.Objective` through its
  batched Hessian-vector products, or its diagonal block on one parameter group (vectors restricted
  to the group's coordinates, differentiation restricted to the group's tensors, so the block costs
  less than a full product). Vectors are cast to the objective's dtype for the product and back to
  float64, so every recurrence runs in float64 whatever the model's dtype.
- :class:`DenseOperator`: a stored matrix (a full Hessian or a block of a ``compute`` result file).

Products are taken in chunks of at most ``chunk`` vectors, so a caller may pass any number.
"""

from __future__ import annotations

import numpy as np
import torch

from hesscli.objective.core import Objective, ParamBlock

__all__ = ["SymOperator", "HessianOperator", "DenseOperator", "default_chunk"]

CHUNK_CAP = 64  # vectors per batched product (the dense Hessian's choice too)


def default_chunk(n: int, itemsize: int, linearization_bytes: int = 0, budget: int = 1 << 28) -> int:
    """Vectors per batched product: at most 64, and about ``budget`` bytes of work per batch."""
    per_vector = max(linearization_bytes, 1) + 4 * n * max(itemsize, 8)
    return int(max(1, min(CHUNK_CAP, budget // per_vector)))


class SymOperator:
    """A symmetric n×n operator on float64 row vectors."""

    n: int
    dtype: torch.dtype = torch.float64  # the dtype the products are computed in
    device: torch.device = torch.device("cpu")
    chunk: int = CHUNK_CAP

    def __init__(self) -> None:
        self.matvecs = 0

    def _apply(self, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def matmat(self, V: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """H·V for the rows of V, shape (k, n) or (n,), returned in ``dtype`` (float64 unless the
        caller stores its vectors narrower) on ``self.device``.

        Memory: V is handed to the products in the operator's own dtype (no copy when it already is,
        e.g. rows of a float32 Lanczos basis for float32 products), and each chunk's products are
        written into one preallocated (k, n) result — no float64 copy of the input and no list of
        chunks concatenated at the end."""
        single = V.dim() == 1
        Vb = V.reshape(1, -1) if single else V
        if Vb.shape[-1] != self.n:
            raise ValueError(f"matmat: vectors of length {Vb.shape[-1]}, expected n = {self.n}")
        out = torch.empty(Vb.shape[0], self.n, dtype=dtype, device=self.device)
        for i in range(0, Vb.shape[0], self.chunk):  # converted a chunk at a time: no copy of the whole block
            out[i : i + self.chunk] = self._apply(Vb[i : i + self.chunk].to(self.device, self.product_dtype))
        self.matvecs += Vb.shape[0]
        return out[0] if single else out

    @property
    def product_dtype(self) -> torch.dtype:
        """The dtype the vectors are handed to the products in: the products' own."""
        return self.dtype

    @property
    def eps(self) -> float:
        """The rounding unit of the operator's dtype."""
        return float(torch.finfo(self.dtype).eps)


class HessianOperator(SymOperator):
    """H (or its diagonal block H_bb on ``block``) of ``obj``, by Hessian-vector products."""

    def __init__(self, obj: Objective, block: ParamBlock | None = None, chunk: int | None = None):
        super().__init__()
        self.obj = obj
        self.block = block
        self.n = obj.P if block is None else block.size
        self.dtype = obj.dtype
        self.device = obj.device
        item = torch.empty((), dtype=obj.dtype).element_size()
        self.chunk = chunk or default_chunk(obj.P, item, getattr(obj, "linearization_bytes", 0))

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        obj = self.obj
        Vd = V.to(obj.dtype)
        if self.block is None:
            return obj.hvp(Vd)
        # the diagonal block: vectors on the block's tensors, products differentiated w.r.t. them only
        return obj.products(Vd, self.block.tensors)


class DenseOperator(SymOperator):
    """A stored symmetric matrix (float64 copy); H·V = V·H for row vectors."""

    def __init__(self, H: np.ndarray | torch.Tensor):
        super().__init__()
        src = H if isinstance(H, torch.Tensor) else torch.from_numpy(np.asarray(H))
        if src.dim() != 2 or src.shape[0] != src.shape[1]:
            raise ValueError(f"DenseOperator: expected a square matrix, got shape {tuple(src.shape)}")
        self.dtype = src.dtype  # the stored precision (its rounding level is what eps reports)
        self.H = src.to(torch.float64)
        self.n = self.H.shape[0]
        self.chunk = 1 << 20

    @property
    def product_dtype(self) -> torch.dtype:
        """float64: the stored matrix is multiplied in float64 whatever precision it was stored in."""
        return torch.float64

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        return V @ self.H
