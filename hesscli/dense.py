"""The dense Hessian, full or block-diagonal, from batched Hessian-vector products.

Column chunks of the identity go through one batched backward each (:class:`Linearization`), so
the P products of a P×P Hessian cost P/k batched passes. The Hessian's symmetry is used at the
level of parameter tensors: for tensor j, only the rows of H against tensors i ≤ j are computed,
with differentiation restricted to those tensors (autograd then prunes the rest of the graph), and
the upper triangle is mirrored. Diagonal tensor blocks are computed whole, so their asymmetry is
measured; cross-tensor symmetry is checked by :meth:`Objective.symmetry_probe`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import HesscliError, MemoryBudgetError, UsageError
from .memory import default_budget, fmt_bytes
from .objective import Objective, ParamBlock
from .progress import NullProgress, Progress

__all__ = ["DenseBlock", "DenseResult", "DensePlan", "plan_dense", "dense_hessian", "asymmetry_tolerance"]

CHUNK_CAP = 64  # vectors per batched backward; larger chunks rarely pay on CPU (bench/)


def asymmetry_tolerance(dtype: torch.dtype) -> float:
    """Relative asymmetry above which a Hessian is wrong, not rounded: 1e-3 (float32), 1e-8 (float64)."""
    return 1e-3 if dtype == torch.float32 else 1e-8


@dataclass
class DenseBlock:
    name: str
    start: int
    stop: int
    hessian: torch.Tensor  # (n, n), symmetrised, on the CPU
    eigenvalues: np.ndarray  # ascending, float64
    eigenvectors: np.ndarray | None
    trace: float

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class DensePlan:
    mode: str  # full | block
    blocks: list[ParamBlock]
    budget: int
    chunk_size: int
    need_full: int
    need_block: int


@dataclass
class DenseResult:
    mode: str
    blocks: list[DenseBlock]
    asymmetry: float
    symmetry_probe: float
    chunk_size: int
    budget: int
    hvps: int
    seconds: float
    negative_threshold: float
    approximation: str | None
    notes: list[str] = field(default_factory=list)

    @property
    def trace(self) -> float:
        return float(sum(b.trace for b in self.blocks))

    @property
    def lambda_max(self) -> float:
        return float(max(b.eigenvalues[-1] for b in self.blocks if b.size))

    @property
    def lambda_min(self) -> float:
        return float(min(b.eigenvalues[0] for b in self.blocks if b.size))

    @property
    def n_negative(self) -> int:
        return int(sum((b.eigenvalues < -self.negative_threshold).sum() for b in self.blocks))


def dense_bytes(sizes: list[int], itemsize: int, eigenvectors: bool) -> int:
    """Peak bytes of the dense work for blocks of these sizes: every block stored in the compute
    dtype, plus the float64 copy and workspace of the largest eigendecomposition."""
    stored = sum(n * n for n in sizes) * itemsize
    if eigenvectors:
        stored += sum(n * n for n in sizes) * 8
    largest = max(sizes) ** 2
    return int(stored + largest * 8 * 2)


def plan_dense(
    obj: Objective,
    mode: str = "auto",
    blocks: str = "module",
    max_memory: int | None = None,
    eigenvectors: bool = False,
    chunk_size: int | None = None,
) -> DensePlan:
    """Choose full or block mode and the chunk size within the memory budget (SPEC.md, Hessian modes)."""
    if mode not in ("auto", "full", "block"):
        raise UsageError(f"--mode '{mode}': choose auto, full or block")
    budget = max_memory if max_memory is not None else default_budget(obj.device)
    item = torch.empty((), dtype=obj.dtype).element_size()
    groups = obj.blocks(blocks)
    obj.measure_linearization()
    need_full = dense_bytes([obj.P], item, eigenvectors)
    need_block = dense_bytes([b.size for b in groups], item, eigenvectors)
    per_vector = max(obj.linearization_bytes, 1) + 4 * obj.P * item
    base = obj.linearization_bytes
    if mode == "auto":
        chosen = "full" if need_full + base + per_vector <= budget else "block"
    else:
        chosen = mode
    need = need_full if chosen == "full" else need_block
    if need + base + per_vector > budget:
        biggest = max(groups, key=lambda b: b.size)
        fit = int(math.sqrt(max(budget - base - per_vector, 0) / (item + 16 + (8 if eigenvectors else 0))))
        what = "a full Hessian" if chosen == "full" else f"block mode (largest block '{biggest.name}', {biggest.size} parameters)"
        raise MemoryBudgetError(
            f"{what} of P = {obj.P:,} parameters needs about {fmt_bytes(need + base + per_vector)}, over the budget "
            f"of {fmt_bytes(budget)} (--max-memory); the budget fits a dense matrix of about {fit:,} parameters. "
            "Use 'hesscli spectrum', 'trace' or 'density' (matrix-free), select fewer parameters with --params, "
            "or raise --max-memory"
        )
    if chunk_size is None:
        room = budget - need - base
        chunk_size = max(1, min(CHUNK_CAP, room // per_vector))
    return DensePlan(chosen, obj.blocks("all") if chosen == "full" else groups, budget, int(chunk_size), need_full, need_block)


def _localize(diff: torch.Tensor, obj: Objective, block: ParamBlock) -> str:
    r, c = divmod(int(diff.argmax()), diff.shape[1])
    def name(i):
        flat = block.start + i
        for t in range(len(obj.names)):
            if obj.offsets[t] <= flat < obj.offsets[t + 1]:
                return obj.names[t]
        return "?"
    return f"{name(r)} / {name(c)}"


def dense_hessian(
    obj: Objective,
    mode: str = "auto",
    blocks: str = "module",
    max_memory: int | None = None,
    eigenvectors: bool = False,
    symmetric: bool = True,
    chunk_size: int | None = None,
    progress: Progress | None = None,
    plan: DensePlan | None = None,
    column_comm=None,
) -> DenseResult:
    """The Hessian of ``obj`` (full, or its block-diagonal part), symmetrised, with eigenvalues.

    With ``column_comm`` (``--split columns`` under torchrun: every rank holds all the data), rank r
    computes the chunks c with c % world == r and the blocks are summed over the ranks.

    Raises :class:`MemoryBudgetError` before allocating anything that would not fit, and
    :class:`HesscliError` when the computed matrix is not symmetric to float tolerance (a wrong
    second derivative somewhere), naming the parameters where the asymmetry is largest.
    """
    t0 = time.perf_counter()
    progress = progress or NullProgress()
    plan = plan or plan_dense(obj, mode, blocks, max_memory, eigenvectors, chunk_size)
    k = plan.chunk_size
    hvps0 = obj.hvps
    mats = {b.name: torch.zeros(b.size, b.size, dtype=obj.dtype, device=obj.device) for b in plan.blocks}
    n_chunks = sum(math.ceil(obj.sizes[t] / k) for b in plan.blocks for t in b.tensors)
    rank, world = (column_comm.rank, column_comm.world) if column_comm is not None else (0, 1)
    mine = math.ceil(max(n_chunks - rank, 0) / world)
    progress.start(mine * obj.n_pieces(), "Hessian")
    for lin in obj.linearizations():
        chunk_no = -1
        for b in plan.blocks:
            H = mats[b.name]
            for pos, j in enumerate(b.tensors):
                wrt = list(b.tensors[: pos + 1]) if symmetric else list(b.tensors)
                c0 = obj.offsets[wrt[0]] - b.start
                c1 = obj.offsets[wrt[-1] + 1] - b.start
                r0 = obj.offsets[j] - b.start
                n_j, shape_j = obj.sizes[j], obj.shapes[j]
                for s in range(0, n_j, k):
                    chunk_no += 1
                    if chunk_no % world != rank:
                        continue
                    e = min(s + k, n_j)
                    basis = torch.zeros(e - s, n_j, dtype=obj.dtype, device=obj.device)
                    basis[torch.arange(e - s), torch.arange(s, e)] = 1
                    res = lin.apply([basis.reshape((e - s,) + shape_j)], [j], wrt, batched=True)
                    H[r0 + s : r0 + e, c0:c1] += torch.cat([r.reshape(e - s, -1) for r in res], dim=1)
                    obj.hvps += e - s
                    progress.advance(1)
    progress.stop()

    out_blocks: list[DenseBlock] = []
    asym = 0.0
    worst_at = ""
    if column_comm is not None:  # every rank holds some rows of every block: assemble them first
        for b in plan.blocks:
            column_comm.all_reduce(mats[b.name])
    hmax = max((mats[b.name].abs().max().item() for b in plan.blocks if b.size), default=0.0)
    if obj.comm is not None:
        hmax_t = torch.tensor([hmax], dtype=torch.float64)
        obj.comm.all_reduce(hmax_t, op="max")
        hmax = hmax_t.item()
    for b in plan.blocks:
        H = mats[b.name]
        if symmetric:
            # the diagonal tensor blocks were computed whole: their asymmetry is a measurement
            for j in b.tensors:
                a0, a1 = obj.offsets[j] - b.start, obj.offsets[j + 1] - b.start
                D = H[a0:a1, a0:a1]
                d = (D - D.T).abs()
                if d.numel() and hmax > 0 and d.max().item() / hmax > asym:
                    asym = d.max().item() / hmax
                    worst_at = f"{obj.names[j]} / {obj.names[j]}"
            low = torch.tril(H, -1)
            H.copy_(low + low.T + torch.diag_embed(torch.diagonal(H)))
            # within a diagonal tensor block, average the two computed halves
        else:
            d = (H - H.T).abs()
            if hmax > 0 and d.numel() and d.max().item() / hmax > asym:
                asym = d.max().item() / hmax
                worst_at = _localize(d, obj, b)
            H.copy_((H + H.T) / 2)
    tol = asymmetry_tolerance(obj.dtype)
    probe, probe_at = (0.0, "")
    if symmetric and len(obj.names) > 1:
        probe, probe_at = obj.symmetry_probe()
    if asym > tol or probe > tol:
        where = worst_at if asym > tol else probe_at
        raise HesscliError(
            f"the computed Hessian is not symmetric: relative asymmetry {max(asym, probe):.2e} > {tol:.0e}, "
            f"largest between parameters {where}; some op in the model has a wrong second derivative in torch"
        )
    for b in plan.blocks:
        H = mats.pop(b.name)
        H.mul_(obj.scale)
        if obj.comm is not None:
            obj.comm.all_reduce(H)
        if b.size == 0:
            continue
        H64 = H.to(torch.float64)
        if not torch.isfinite(H64).all():
            raise HesscliError(f"the Hessian block '{b.name}' contains NaN or Inf")
        if eigenvectors:
            w, V = torch.linalg.eigh(H64)
            vecs = V.cpu().numpy()
        else:
            w = torch.linalg.eigvalsh(H64)
            vecs = None
        trace = float(torch.diagonal(H64).sum().item())
        del H64
        out_blocks.append(DenseBlock(b.name, b.start, b.stop, H.cpu(), w.cpu().numpy(), vecs, trace))
    norm2 = max((float(np.abs(b.eigenvalues).max()) for b in out_blocks), default=0.0)
    tau = norm2 * math.sqrt(obj.P) * float(torch.finfo(obj.dtype).eps)
    return DenseResult(
        mode=plan.mode,
        blocks=out_blocks,
        asymmetry=asym,
        symmetry_probe=probe,
        chunk_size=k,
        budget=plan.budget,
        hvps=obj.hvps - hvps0,
        seconds=time.perf_counter() - t0,
        negative_threshold=tau,
        approximation="block-diagonal" if plan.mode == "block" else None,
    )
