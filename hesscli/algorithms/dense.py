"""The dense Hessian, full or block-diagonal, from batched Hessian-vector products.

Rows of H are reverse-over-reverse products (Pearlmutter 1994) from the objective's one product
route: per piece, the gradient g(θ) with its graph (:class:`~hesscli.objective.core.Linearization`, the
model's own parameters as leaves), and a chunk of k unit vectors e_r goes through one batched
backward (``is_grads_batched``), giving the rows H[r, :] = ∂(g_j·e_r)/∂θ; or the closed-form
products of an affine chain (:mod:`hesscli.objective.chain`).

The Hessian's symmetry is used at the level of parameter tensors: for tensor j, only the blocks
H[j, i] with i ≤ j are computed, with differentiation restricted to those tensors (autograd prunes
the rest of the graph), and the upper triangle is mirrored. With the closed-form products of an
affine chain (:mod:`hesscli.objective.chain`) it is the other triangle, i ≥ j: rows of layer l then need the
R-forward pass from layer l up and the backward pass down to layer l only. Diagonal tensor blocks are computed
whole, so their asymmetry is measured; cross-tensor symmetry is checked by
:meth:`Objective.symmetry_probe`.

The chunk size k is tuned on the run: per-vector cost is not monotone in k (large k pays off with
few samples, where per-op overhead dominates, and loses with many, where the batched operands
leave the cache), so the first rows are computed with k = 1, 8, 16, 32, … up to the memory cap and
the fastest k is kept. Every tuning chunk is a real part of H; nothing is computed twice.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from hesscli.errors import HesscliError, MemoryBudgetError, UsageError
from hesscli.objective.core import Objective, ParamBlock, asymmetry_tolerance
from hesscli.runtime.devices import tf32_off
from hesscli.runtime.memory import default_budget, fmt_bytes
from hesscli.runtime.progress import NullProgress, Progress

__all__ = ["DenseBlock", "DenseResult", "DensePlan", "plan_dense", "dense_hessian", "asymmetry_tolerance"]

CHUNK_CAP = 512  # most vectors per batched product; the tuner picks k ≤ this (few samples want large k)
WORK_BYTES = 128 << 20  # and k·(bytes per vector) stays under this: the chunk's transient memory (which the
# tuner reaches whichever k it keeps; measured peaks run 1.5× this estimate on the digits CNN)


@dataclass
class DenseBlock:
    """One dense diagonal block of H: columns start:stop of the flat parameter vector, its matrix (n, n) and eigenvalues (n,) ascending."""
    name: str
    start: int
    stop: int
    hessian: torch.Tensor  # (n, n), symmetrised, on the CPU
    eigenvalues: np.ndarray  # ascending, float64
    eigenvectors: np.ndarray | None
    trace: float

    @property
    def size(self) -> int:
        """Columns in the block (n)."""
        return self.stop - self.start


@dataclass
class DensePlan:
    """What dense_hessian will do before it allocates: mode, blocks, chunk size and the bytes it needs against the budget."""
    mode: str  # full | block
    blocks: list[ParamBlock]
    budget: int
    chunk_size: int
    need_full: int
    need_block: int
    tune: bool = True  # choose the chunk size by timing (≤ chunk_size); False when the user fixed it


@dataclass
class DenseResult:
    """The dense Hessian (full mode: one block 'all') or its diagonal blocks, with the products it took and the measured asymmetry."""
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
    eig_seconds: float = 0.0  # of ``seconds``: the eigendecompositions

    @property
    def trace(self) -> float:
        """tr H: the sum of the blocks' traces (the diagonal blocks hold the whole diagonal)."""
        return float(sum(b.trace for b in self.blocks))

    @property
    def lambda_max(self) -> float:
        """The largest eigenvalue over the blocks (of H in full mode)."""
        return float(max(b.eigenvalues[-1] for b in self.blocks if b.size))

    @property
    def lambda_min(self) -> float:
        """The smallest eigenvalue over the blocks (of H in full mode)."""
        return float(min(b.eigenvalues[0] for b in self.blocks if b.size))

    @property
    def n_negative(self) -> int:
        """Eigenvalues below -negative_threshold (smaller magnitudes are rounding)."""
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
    tune = chunk_size is None
    if chunk_size is None:
        room = budget - need - base
        chunk_size = max(1, min(CHUNK_CAP, room // per_vector, WORK_BYTES // per_vector))
    blocks_ = obj.blocks("all") if chosen == "full" else groups
    return DensePlan(chosen, blocks_, budget, int(chunk_size), need_full, need_block, tune)


def _localize(diff: torch.Tensor, obj: Objective, block: ParamBlock) -> str:
    r, c = divmod(int(diff.argmax()), diff.shape[1])
    def name(i):
        flat = block.start + i
        for t in range(len(obj.names)):
            if obj.offsets[t] <= flat < obj.offsets[t + 1]:
                return obj.names[t]
        return "?"
    return f"{name(r)} / {name(c)}"


@tf32_off
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
    second derivative somewhere), naming the parameters where the asymmetry is largest. TF32 is off
    meanwhile on CUDA, the caller's settings restored.
    """
    t0 = time.perf_counter()
    progress = progress or NullProgress()
    plan = plan or plan_dense(obj, mode, blocks, max_memory, eigenvectors, chunk_size)
    hvps0 = obj.hvps
    mats = {b.name: torch.zeros(b.size, b.size, dtype=obj.dtype, device=obj.device) for b in plan.blocks}
    rank, world = (column_comm.rank, column_comm.world) if column_comm is not None else (0, 1)
    # (block, position of tensor j in it); the tensor with the most rows first, where k is tuned
    tasks = [(b, pos) for b in plan.blocks for pos in range(len(b.tensors))]
    tasks.sort(key=lambda t: -obj.sizes[t[0].tensors[t[1]]])
    # ranks share the chunks by number (column split): they must all cut the same chunks, so no tuning
    tuner = _ChunkTuner(plan.chunk_size, plan.tune and world == 1, obj.device)
    progress.start(_my_rows(tasks, obj, plan.chunk_size, rank, world) * obj.n_pieces(), "Hessian")
    upper = obj.chain is not None
    for piece in obj.linearizations():
        chunk_no = -1
        for b, pos in tasks:
            H = mats[b.name]
            j = b.tensors[pos]
            if not symmetric:
                wrt = list(b.tensors)
            else:  # one triangle of tensor blocks: the cheaper one for the engine (module docstring)
                wrt = list(b.tensors[pos:]) if upper else list(b.tensors[: pos + 1])
            c0 = obj.offsets[wrt[0]] - b.start
            r0 = obj.offsets[j] - b.start
            n_j, shape_j = obj.sizes[j], obj.shapes[j]
            pullback = None
            s = 0
            while s < n_j:
                k = tuner.next()
                e = min(s + k, n_j)
                chunk_no += 1
                if chunk_no % world != rank:
                    s = e
                    continue
                if pullback is None:
                    pullback = _linearization_rows(piece, j, wrt)
                tuner.tic()
                basis = torch.zeros(e - s, n_j, dtype=obj.dtype, device=obj.device)
                basis[torch.arange(e - s), torch.arange(s, e)] = 1
                rows = pullback(basis.reshape((e - s,) + shape_j))
                col = c0
                for i, r in zip(wrt, rows, strict=True):
                    H[r0 + s : r0 + e, col : col + obj.sizes[i]] += r.reshape(e - s, -1)
                    col += obj.sizes[i]
                tuner.toc(e - s)
                obj.hvps += e - s
                progress.advance(e - s)
                s = e
            tuner.done_tensor()
        piece = pullback = None  # one piece's graph alive at a time: not the previous one while the next is built
    progress.stop()
    k = tuner.best

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
            # mirror the computed triangle (one P×P temporary)
            part = torch.triu(H, 1) if upper else torch.tril(H, -1)
            H.triu_() if upper else H.tril_()
            H.add_(part.T)
            del part
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
    t_eig = 0.0
    # under torchrun every rank holds the same H now: rank 0 alone decomposes it, with the cores of
    # all the local ranks, and sends the eigenvalues (only rank 0 writes, so only it keeps vectors)
    group = column_comm if column_comm is not None else obj.comm
    for b in plan.blocks:
        H = mats.pop(b.name)
        H.mul_(obj.scale)
        if obj.comm is not None:
            obj.comm.all_reduce(H)
        if b.size == 0:
            continue
        if not torch.isfinite(H).all():
            raise HesscliError(f"the Hessian block '{b.name}' contains NaN or Inf")
        t1 = time.perf_counter()
        if group is None:
            w, vecs = _eig(H, eigenvectors)
        else:
            w = torch.zeros(b.size, dtype=torch.float64)
            vecs = None
            with group.stage():
                if group.rank == 0:
                    with _local_cores(H.device):
                        w0, vecs = _eig(H, eigenvectors)
                    w.copy_(w0.to(torch.float64).cpu())
            group.all_reduce(w)  # zeros from the other ranks: rank 0's eigenvalues, bit for bit
        t_eig += time.perf_counter() - t1
        trace = float(torch.diagonal(H).to(torch.float64).sum().item())
        out_blocks.append(DenseBlock(b.name, b.start, b.stop, H.cpu(), w.to(torch.float64).cpu().numpy(), vecs, trace))
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
        eig_seconds=t_eig,
    )


def _eig(H: torch.Tensor, eigenvectors: bool) -> tuple[torch.Tensor, np.ndarray | None]:
    """Ascending eigenvalues of the symmetric H, and its eigenvectors (float64) when asked."""
    if eigenvectors:
        w, V = torch.linalg.eigh(H.to(torch.float64))
        return w, V.cpu().numpy()
    # eigenvalues in H's own dtype: a float32 matrix already carries its entries' rounding, and
    # LAPACK's backward-stable eigvalsh adds about eps·‖H‖₂ more (7.6e-7·‖H‖₂ on the digits MLP,
    # against SPEC.md's 1e-5), for 0.7× the time and no float64 copy
    return torch.linalg.eigvalsh(H), None


@contextlib.contextmanager
def _local_cores(device: torch.device):
    """On the CPU, the threads of every rank on this machine for one rank (torchrun gives each
    rank ``OMP_NUM_THREADS=1``; the others wait in a collective meanwhile)."""
    n = torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    want = max(n, min(cores, n * local))
    if device.type != "cpu" or want == n:
        yield
        return
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _my_rows(tasks, obj: Objective, k: int, rank: int, world: int) -> int:
    """Rows this rank computes per piece (chunks numbered in task order, dealt round-robin)."""
    if world == 1:
        return sum(obj.sizes[b.tensors[p]] for b, p in tasks)
    rows, no = 0, -1
    for b, p in tasks:
        n = obj.sizes[b.tensors[p]]
        for s in range(0, n, k):
            no += 1
            if no % world == rank:
                rows += min(k, n - s)
    return rows


def _linearization_rows(lin, j: int, wrt: list[int]):
    """v ↦ ∂(g_j·v)/∂θ_wrt on one piece (unscaled), for a chunk of basis vectors: rows of H, from
    the piece's :class:`Linearization` (autograd, ``is_grads_batched``) or its closed-form chain."""

    def rows(basis: torch.Tensor) -> list[torch.Tensor]:
        if basis.shape[0] == 1:
            return [r.unsqueeze(0) for r in lin.apply([basis[0]], [j], wrt, batched=False)]
        return lin.apply([basis], [j], wrt, batched=True)

    return rows


class _ChunkTuner:
    """Picks the chunk size k by timing real chunks: k = 8, 16, 32, … ≤ ``cap``, in two
    interleaved rounds (so a burst of load on a shared machine hits both measurements of one k
    less often), keeping the k with the lowest per-vector time. Tuning runs on the first (largest)
    tensor only, since chunks of other tensors cost differently; if its rows run out first, the
    best k measured so far is kept. k = 1 is not a candidate: a single product rounds differently
    from a batched one (up to 1e-9 relative), and the result must not depend on timing (the same
    command twice gives bit-identical arrays; batched chunks of any size ≥ 2 agree to the bit). It
    would win only in the many-samples regime, by ~15% (bench/RESULTS.md)."""

    def __init__(self, cap: int, tune: bool, device: torch.device):
        cap = max(1, int(cap))
        sizes = [1 << i for i in range(3, cap.bit_length()) if (1 << i) < cap] + [cap]
        self.schedule = sizes * 2 if tune and cap > 1 else []
        self.best = cap
        self.device = device
        self.rates: dict[int, float] = {}
        self.t = 0.0

    @property
    def active(self) -> bool:
        return bool(self.schedule)

    def next(self) -> int:
        return self.schedule[0] if self.schedule else self.best

    def _now(self) -> float:
        # CPU: process time, which a busy shared machine distorts far less than wall time (a
        # descheduled process accrues none); CUDA: wall time after a synchronisation
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.process_time()

    def tic(self) -> None:
        if self.schedule:
            self.t = self._now()

    def toc(self, n: int) -> None:
        if not self.schedule:
            return
        k = self.schedule.pop(0)
        if n == k:  # a chunk cut short at the end of a tensor is not a measurement of k
            self.rates[k] = min((self._now() - self.t) / n, self.rates.get(k, math.inf))
        if not self.schedule:
            self._finish()

    def done_tensor(self) -> None:
        if self.schedule:
            self.schedule = []
            self._finish()

    def _finish(self) -> None:
        batched = {k: r for k, r in self.rates.items() if k > 1}
        if batched:
            self.best = min(batched, key=batched.get)
        if 1 in self.rates and (not batched or self.rates[1] < 0.85 * batched[self.best]):
            self.best = 1
