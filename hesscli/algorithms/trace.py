"""The trace of a symmetric operator: exact, or estimated with a standard error.

- ``exact``: Σ_i e_iᵀ H e_i, the basis vectors in batches (n products), or the stored matrix.
- ``hutchinson`` (Hutchinson 1989): tr(H) ≈ (1/m) Σ z_iᵀ H z_i with Rademacher z_i; standard error
  std(z_iᵀ H z_i)/√m.
- ``hutchpp`` (Meyer, Musco, Musco & Woodruff 2021, "Hutch++"): m/3 products sketch the range,
  Q = orth(H S); tr(QᵀHQ) is taken exactly (m/3 products) and the remainder
  tr((I−QQᵀ)H(I−QQᵀ)) by Hutchinson with the last m/3 Rademacher vectors. Given Q the first part is
  exact, so the standard error is that of the Hutchinson part: std/√(m/3). Memory: two blocks of
  m/3 vectors (the sketch and its basis); the rest is streamed.
- ``xtrace`` (Epperly, Tropp & Webber 2024, "XTrace"): m/2 test vectors ω_i (Gaussian, scaled to
  norm √n), Y = HΩ = QR, Z = HQ. For each i the Hutch++-like estimate that uses every other test
  vector to sketch, T_i = tr(Q_iᵀHQ_i) + ω_iᵀ(I−Q_iQ_iᵀ)H(I−Q_iQ_iᵀ)ω_i with Q_i = orth(Y without
  column i), follows in closed form from downdating Q by s_i ∝ R⁻ᵀe_i: with H_Q = QᵀZ,
  w = Qᵀω_i, a = w − s_i(s_iᵀw): T_i = tr H_Q − s_iᵀH_Q s_i + ω_iᵀy_i − 2 (Zᵀω_i)ᵀa + aᵀH_Q a.
  The estimate is mean_i T_i; its standard error the paper's, std(T_i)/√(m/2). Memory: four
  blocks of m/2 vectors (Ω, Y, Q, Z).
  A rank-deficient sketch (H of rank r < m/2, a zero block: R singular, R⁻ᵀ undefined) is handled by
  rank truncation: Yᵀ = Q₀R₀, R₀ = UΣVᵀ, Q = Q₀U_r spans range(Y) with r = #{σ > max(n, s)·ε·σ₁}
  (ε of float64), and R = Σ_r V_rᵀ (r × s). Dropping column i lowers the rank only when e_i lies in
  R's row space; then s_i ∝ (R⁺)ᵀe_i = Σ_r⁻¹V_rᵀe_i (R⁻ᵀe_i when r = s), else Q_i = Q and s_i = 0.
  Z = HQ keeps r of its m/2 products. A zero operator gives 0 ± 0.

Per-block traces (:func:`estimate_block_traces`): tr(H_bb) of every diagonal block of a partition of
the coordinates, all from one stream of full products (derivations in its docstring).

The random vectors come from a seeded generator on the CPU (the same on every rank).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from hesscli.algorithms.operators import DenseOperator, SymOperator
from hesscli.errors import UsageError
from hesscli.runtime.progress import NullProgress, Progress

__all__ = [
    "TraceResult",
    "BlockTraceResult",
    "estimate_trace",
    "estimate_block_traces",
    "METHODS",
    "BLOCK_METHODS",
    "choose_method",
]

METHODS = ("auto", "exact", "hutchinson", "hutchpp", "xtrace")
BLOCK_METHODS = ("auto", "exact", "hutchinson", "hutchpp")  # per-block traces from shared products


@dataclass
class TraceResult:
    """tr(H) (units of H) with its standard error (0 for ``exact``), the method used, the products
    taken and the seconds spent; ``samples``: the random vectors of the part that carries the error."""

    trace: float
    stderr: float
    method: str
    matvecs: int
    seconds: float
    samples: int = 0  # random vectors in the part that carries the error


def choose_method(method: str, n: int, matvecs: int, dense: bool) -> str:
    """``auto``: exact when the matrix is stored or n ≤ matvecs, else hutchpp."""
    if method not in METHODS:
        raise UsageError(f"--method '{method}': choose {', '.join(METHODS)}")
    if method != "auto":
        return method
    return "exact" if dense or n <= matvecs else "hutchpp"


def _rademacher(k: int, n: int, gen: torch.Generator, device) -> torch.Tensor:
    return (torch.randint(0, 2, (k, n), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1).to(device)


def _products(op: SymOperator, V: torch.Tensor, progress: Progress) -> torch.Tensor:
    out = []
    for i in range(0, V.shape[0], op.chunk):
        out.append(op.matmat(V[i : i + op.chunk]))
        progress.advance(out[-1].shape[0])
    return torch.cat(out) if out else V.new_zeros(V.shape)


def exact_trace(op: SymOperator, progress: Progress) -> float:
    if isinstance(op, DenseOperator):
        return float(torch.diagonal(op.H).sum())
    total = 0.0
    step = op.chunk
    for s in range(0, op.n, step):
        e = min(s + step, op.n)
        E = torch.zeros(e - s, op.n, dtype=torch.float64, device=op.device)
        E[torch.arange(e - s), torch.arange(s, e)] = 1
        HE = op.matmat(E)
        total += float(HE[torch.arange(e - s), torch.arange(s, e)].sum())
        progress.advance(e - s)
    return total


def _orthonormalize_rows_(Y: torch.Tensor, cols: int = 1 << 16) -> torch.Tensor:
    """Make the rows of Y (s, n) orthonormal in place, spanning the same space: Cholesky QR twice,
    applied by column slabs so that no second s×n array is ever held; when Y is too ill-conditioned
    for that (a sketch H·S whose top eigenvalue dominates: the MiniLM classifier's), classical
    Gram–Schmidt twice, row by row in place, dropping rows that depend on the ones before (a
    Householder QR of Yᵀ would hold s·n more numbers). Nothing of Y's size is allocated: at s = 30,
    n = 22.7M a ``torch.isfinite(Y)`` check alone held 7.4 GB for ten seconds (peak 15.8 GB against a
    plan of 8.3)."""
    s, n = Y.shape
    eye = torch.eye(s, dtype=Y.dtype, device=Y.device)
    try:
        for _ in range(2):
            L = torch.linalg.cholesky(Y @ Y.T)
            Linv = torch.linalg.solve_triangular(L, eye, upper=False)
            for j in range(0, n, cols):
                Y[:, j : j + cols] = Linv @ Y[:, j : j + cols]
        G = Y @ Y.T  # finite exactly when Y is (torch.isfinite(Y) held an s×n float temporary: 7.4 GB at 22.7M)
        if bool(torch.isfinite(G).all()) and float((G - eye).abs().max()) < 1e-10:
            return Y
    except RuntimeError:  # torch.linalg.LinAlgError: not positive definite
        pass
    return _gram_schmidt_rows_(Y)


def _gram_schmidt_rows_(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning the rows of Y (s, n), in place: each row orthogonalised twice
    against the kept ones before it (one n-vector temporary), kept when it does not vanish
    (‖r‖ > 1e-12 of its norm before); returns the kept rows Y[:r]."""
    kept = 0
    for i in range(Y.shape[0]):
        v = Y[i]
        before = float(v.norm())
        for _ in range(2):
            if kept:
                v -= (Y[:kept] @ v) @ Y[:kept]
        after = float(v.norm())
        if math.isfinite(after) and after > 1e-12 * before and after > 0:
            Y[kept] = v / after
            kept += 1
    return Y[:kept]


def _block_sums(A: torch.Tensor, offsets: np.ndarray) -> np.ndarray:
    """Row sums of A (k, n) over each block's columns [offsets[b], offsets[b+1]): (k, B) float64."""
    cols = [A[:, a:b].sum(1) for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    return torch.stack(cols, 1).to(torch.float64).cpu().numpy()


def _quadratic_forms(op, m, gen, progress, Q=None, offsets=None) -> np.ndarray:
    """Per block b, z_bᵀ(Hz)_b for m Rademacher z (projected to z − Qᵀ(Qz) when Q, orthonormal rows,
    is given), streamed in chunks: (m, B), B = 1 (the whole vector) without ``offsets``."""
    offsets = np.array([0, op.n]) if offsets is None else offsets
    vals = []
    for i in range(0, m, op.chunk):
        Z = _rademacher(min(op.chunk, m - i), op.n, gen, op.device)
        if Q is not None:
            Z = Z - (Z @ Q.T) @ Q
        vals.append(_block_sums(Z * op.matmat(Z), offsets))
        progress.advance(Z.shape[0])
    return np.concatenate(vals) if vals else np.zeros((0, len(offsets) - 1))


def _mean_se(vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means of the samples (m, B) and their standard errors std(ddof=1)/√m (inf for m < 2)."""
    m = vals.shape[0]
    if m < 2:
        return vals.mean(0), np.full(vals.shape[1], math.inf)
    return vals.mean(0), vals.std(0, ddof=1) / math.sqrt(m)


def _hutchinson_blocks(op, m, gen, progress, offsets):
    """(per-block estimates, their samples (m, B)): Hutchinson per block, module docstring and
    :func:`estimate_block_traces`."""
    vals = _quadratic_forms(op, m, gen, progress, offsets=offsets)
    return vals.mean(0), vals


def _hutchpp_blocks(op, m, gen, progress, offsets):
    """(per-block estimates, the samples (g, B) that carry their error): Hutch++ per block from one
    global sketch, :func:`estimate_block_traces`."""
    if m < 3:
        raise UsageError(f"hutchpp needs at least 3 products (got --matvecs {m})")
    s = m // 3
    g = m - 2 * s  # any leftover goes to the Hutchinson part
    Q = torch.empty(s, op.n, dtype=torch.float64, device=op.device)  # H·S, then its orthonormal basis (rows)
    for i in range(0, s, op.chunk):
        c = min(op.chunk, s - i)
        Q[i : i + c] = op.matmat(_rademacher(c, op.n, gen, op.device))
        progress.advance(c)
    Q = _orthonormalize_rows_(Q)
    low = np.zeros(len(offsets) - 1)
    for i in range(0, Q.shape[0], op.chunk):  # per block Σ_j (q_j)_bᵀ(H q_j)_b, without storing HQ
        Qc = Q[i : i + op.chunk]
        low += _block_sums(Qc * op.matmat(Qc), offsets).sum(0)
        progress.advance(Qc.shape[0])
    vals = _quadratic_forms(op, g, gen, progress, Q, offsets)
    return low + vals.mean(0), vals


def _hutchinson(op, m, gen, progress):
    est, vals = _hutchinson_blocks(op, m, gen, progress, np.array([0, op.n]))
    return float(est[0]), float(_mean_se(vals)[1][0]), m


def _hutchpp(op, m, gen, progress):
    est, vals = _hutchpp_blocks(op, m, gen, progress, np.array([0, op.n]))
    return float(est[0]), float(_mean_se(vals)[1][0]), vals.shape[0]


def _xtrace(op, m, gen, progress):
    s = m // 2
    if s < 2:
        raise UsageError(f"xtrace needs at least 4 products (got --matvecs {m})")
    n = op.n
    Om = torch.randn(s, n, generator=gen, dtype=torch.float64)
    Om = (Om * (math.sqrt(n) / Om.norm(dim=1, keepdim=True))).to(op.device)  # rows on the sphere of radius √n
    Y = _products(op, Om, progress)  # rows y_i = H ω_i
    Q0, R0 = torch.linalg.qr(Y.T)  # Y.T = Q0 R0, Q0 (n, s)
    if not bool(torch.isfinite(R0).all()):  # NaN or Inf products: no estimate (the SVD would refuse them)
        return math.nan, math.nan, s
    U, sv, Vh = torch.linalg.svd(R0.cpu())  # R0 = U diag(sv) Vh
    eps = torch.finfo(torch.float64).eps
    r = int((sv > max(n, s) * eps * sv[0]).sum()) if float(sv[0]) > 0 else 0  # numerical rank of the sketch
    Qs = (Q0 @ U.to(Q0.device)).T.contiguous()  # (s, n): orthonormal rows, the first r spanning range(Y)
    # all s products, whatever r: every rank of a torchrun takes the same number of collectives
    Z = _products(op, Qs, progress)[:r]  # rows (H q_j)
    Qr = Qs[:r]
    HQ = (Qr @ Z.T).cpu()
    HQ = (HQ + HQ.T) / 2
    W = (Qr @ Om.T).cpu()  # (r, s): column i = Qᵀω_i
    Tz = (Z @ Om.T).cpu()  # (r, s): row j, col i = (H q_j)·ω_i, so column i = Zᵀω_i
    Sm = Vh[:r] / sv[:r, None]  # (r, s): column i = Σ_r⁻¹ V_rᵀ e_i = (R⁺)ᵀ e_i with R = Σ_r V_rᵀ
    Sm = Sm / Sm.norm(dim=0, keepdim=True).clamp_min(1e-300)
    off_rowspace = Vh[r:].norm(dim=0)  # distance of e_i from R's row space (0 for every i when r = s)
    Sm = Sm * (off_rowspace <= math.sqrt(eps))  # column i: s_i, or 0 when dropping y_i keeps the span
    diag_y = (Om * Y).sum(1).cpu()  # ω_iᵀ H ω_i
    trHQ = float(torch.diagonal(HQ).sum())
    sHs = (Sm * (HQ @ Sm)).sum(0)
    A = W - Sm * (Sm * W).sum(0, keepdim=True)  # column i: a_i
    ests = trHQ - sHs + diag_y - 2 * (Tz * A).sum(0) + (A * (HQ @ A)).sum(0)
    ests = ests.numpy()
    return float(ests.mean()), float(ests.std(ddof=1) / math.sqrt(s)), s


def estimate_trace(
    op: SymOperator,
    method: str = "auto",
    matvecs: int = 300,
    seed: int = 0,
    progress: Progress | None = None,
) -> TraceResult:
    """tr(H) with ``method`` (see the module docstring) in at most ``matvecs`` products."""
    t0 = time.perf_counter()
    progress = progress or NullProgress()
    if matvecs < 1:
        raise UsageError(f"--matvecs must be at least 1 (got {matvecs})")
    method = choose_method(method, op.n, matvecs, isinstance(op, DenseOperator))
    mv0 = op.matvecs
    gen = torch.Generator().manual_seed(seed)
    total = 0 if isinstance(op, DenseOperator) and method == "exact" else (op.n if method == "exact" else matvecs)
    progress.start(total, f"trace ({method})")
    try:
        if method == "exact":
            tr, se, samples = exact_trace(op, progress), 0.0, 0
        elif method == "hutchinson":
            tr, se, samples = _hutchinson(op, matvecs, gen, progress)
        elif method == "hutchpp":
            tr, se, samples = _hutchpp(op, matvecs, gen, progress)
        else:
            tr, se, samples = _xtrace(op, matvecs, gen, progress)
    finally:
        progress.stop()
    return TraceResult(tr, se, method, op.matvecs - mv0, time.perf_counter() - t0, samples)


@dataclass
class BlockTraceResult:
    """tr(H_bb) of every block b of a partition of the coordinates, with tr(H), from shared products.

    ``traces``, ``stderrs`` (B,) float64, in the units of H (e.g. loss per parameter²); ``offsets``
    (B+1,) int64 with block b = coordinates [offsets[b], offsets[b+1]). ``trace``/``stderr``: the
    total tr(H) = Σ_b tr(H_bb) from the same products, its standard error taken from the summed
    samples (the block estimates share their random vectors, so their errors are correlated and
    √Σ se_b² is not the total's error). ``covariance`` (B, B): the estimated covariance of the block
    estimates (zeros for ``exact``), so a sum of blocks ``w`` (e.g. a layer's modules) has standard
    error √(wᵀCw). ``matvecs``: the products taken in all (shared by every block); ``samples``: the
    random vectors of the part that carries the error (0 for ``exact``)."""

    names: list[str]
    offsets: np.ndarray
    traces: np.ndarray
    stderrs: np.ndarray
    trace: float
    stderr: float
    method: str
    matvecs: int
    seconds: float
    samples: int = 0
    covariance: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))

    def results(self) -> list[TraceResult]:
        """One :class:`TraceResult` per block (``matvecs`` is the shared count, the same for each)."""
        return [
            TraceResult(float(t), float(e), self.method, self.matvecs, self.seconds, self.samples)
            for t, e in zip(self.traces, self.stderrs)
        ]

    @property
    def total(self) -> TraceResult:
        """tr(H) as a :class:`TraceResult`."""
        return TraceResult(self.trace, self.stderr, self.method, self.matvecs, self.seconds, self.samples)


def _block_offsets(blocks: Sequence, n: int) -> tuple[list[str], np.ndarray]:
    """Names and offsets of ``blocks`` (objects with ``name``, ``start``, ``stop``, e.g.
    :class:`~hesscli.objective.core.ParamBlock`, or (name, start, stop) tuples), which must be
    contiguous, in order, and cover 0..n exactly."""
    names, offsets = [], [0]
    for b in blocks:
        name, start, stop = (b.name, b.start, b.stop) if hasattr(b, "start") else b
        if int(start) != offsets[-1] or int(stop) < int(start):
            raise ValueError(
                f"block '{name}' covers [{start}, {stop}); blocks must be contiguous ranges, in order, from 0 "
                f"(the previous one ends at {offsets[-1]})"
            )
        names.append(str(name))
        offsets.append(int(stop))
    if not names or offsets[-1] != n:
        raise ValueError(f"the blocks cover [0, {offsets[-1]}), not the operator's n = {n} coordinates")
    return names, np.array(offsets, dtype=np.int64)


def _exact_diagonal(op: SymOperator, progress: Progress) -> torch.Tensor:
    """diag(H) (n,) float64 on the CPU: the stored matrix's, or e_iᵀHe_i by n products in batches."""
    if isinstance(op, DenseOperator):
        return torch.diagonal(op.H).cpu()
    diag = torch.empty(op.n, dtype=torch.float64)
    for s in range(0, op.n, op.chunk):
        e = min(s + op.chunk, op.n)
        E = torch.zeros(e - s, op.n, dtype=torch.float64, device=op.device)
        E[torch.arange(e - s), torch.arange(s, e)] = 1
        HE = op.matmat(E)
        diag[s:e] = HE[torch.arange(e - s), torch.arange(s, e)].cpu()
        progress.advance(e - s)
    return diag


def estimate_block_traces(
    op: SymOperator,
    blocks: Sequence,
    method: str = "auto",
    matvecs: int = 300,
    seed: int = 0,
    progress: Progress | None = None,
) -> BlockTraceResult:
    """tr(H_bb) for every diagonal block H_bb of the full operator ``op`` (n×n), and tr(H), each with
    its standard error, all from ONE stream of ``matvecs`` products with the full H.

    ``blocks``: B contiguous ranges covering 0..n in order, as objects with ``name``/``start``/
    ``stop`` (``Objective.blocks("module")`` gives them) or (name, start, stop) tuples.
    ``method``: ``exact`` (n products, or the stored diagonal of a :class:`DenseOperator`;
    standard errors 0), ``hutchinson``, ``hutchpp``, or ``auto`` (exact when the matrix is stored or
    n ≤ ``matvecs``, else hutchpp). Products: exactly ``matvecs`` for the random methods (Hutch++:
    fewer only when n < matvecs/3, the sketch then spanning everything). The random vectors come from
    a CPU generator seeded with ``seed``: the total equals :func:`estimate_trace`'s with the same
    method, products and seed. Raises :class:`UsageError` for an unknown method (``xtrace`` has no
    per-block form here), ``matvecs`` < 1, or hutchpp with fewer than 3 products; ``ValueError`` when
    the blocks do not partition 0..n.

    Notation: E_b is the diagonal 0/1 matrix selecting block b, so tr(H_bb) = tr(E_b H) and
    x_b = E_b x; z are Rademacher vectors (E[zzᵀ] = I).

    **Hutchinson per block** (Hutchinson 1989, "A stochastic estimator of the trace of the influence
    matrix for Laplacian smoothing splines"). For each of the m vectors z_i take one full product
    w_i = H z_i and, for every block, c_{b,i} = z_{i,b}ᵀ w_{i,b} = zᵀE_bHz. Then
    E[c_{b,i}] = tr(E_b H E[zzᵀ]) = tr(H_bb): the cross-block terms z_bᵀH_bc z_c (c ≠ b) have mean
    zero because z_b and z_c are independent. The estimate is mean_i c_{b,i}; the c_{b,i} are i.i.d.,
    so its standard error is std_i(c_{b,i})/√m (ddof 1). Σ_b c_{b,i} = z_iᵀHz_i: the total is plain
    Hutchinson.

    **Hutch++ per block** (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: Optimal stochastic trace
    estimation", SOSA), with s = ⌊m/3⌋ and g = m − 2s:

    1. sketch: Y = H S for s Rademacher vectors (s products); Q (s×n, orthonormal rows) spans the
       rows of Y, and Π = QᵀQ is the orthogonal projector onto that span. Q depends on S only.
    2. low-rank part, exact given Q: with the s products H q_j,
       T_b = Σ_j (q_j)_bᵀ (H q_j)_b = tr(E_b H Π).
    3. remainder, by Hutchinson on the deflated vectors z' = (I − Π) z (g products):
       c_{b,i} = z'_{i,b}ᵀ (H z'_i)_b = zᵀ(I − Π)E_b H(I − Π)z, whose mean given Q is
       tr((I − Π)E_b H(I − Π)) = tr(E_b H (I − Π)²) = tr(E_b H (I − Π)).

    Since tr(E_b H Π) + tr(E_b H (I − Π)) = tr(E_b H) = tr(H_bb), the estimate T_b + mean_i c_{b,i}
    is unbiased for every block given any Q, hence unconditionally. No product is spent per block and
    no block-restricted product is needed: the same full products serve every block, and the exact
    part carries no cross-block noise (a per-block sketch Q_b would need tr(Q_bᵀH_bbQ_b), i.e. either
    products restricted to each block — B times the cost — or randomly signed combinations of the
    blocks' bases, whose cross-block terms q_bᵀH_bc q_c add noise of the size of the coupling between
    the blocks' top directions). Summed over blocks, T = tr(QHQᵀ) and Σ_b c_{b,i} = z'ᵀHz': the total
    is exactly the standard Hutch++ estimate. Standard error: given Q, T_b is a constant and the
    c_{b,i} are i.i.d., so Var(estimate | Q) = Var(c_b | Q)/g, estimated without bias by
    std_i(c_{b,i})²/g; it is honest for the conditional error, and the conditional mean does not
    depend on Q, so it is the error of the estimate. How much Hutch++ gains on block b depends on how
    much of block b's rows of H the global sketch captures (‖E_b H(I − Π)‖_F): blocks whose curvature
    lies outside the top directions of H get Hutchinson-like errors, which their standard errors show.

    Memory: the sketch/basis Q (s×n float64) plus one chunk of vectors; nothing per block beyond B
    numbers per vector. ``progress`` advances by one per product.
    """
    t0 = time.perf_counter()
    progress = progress or NullProgress()
    if method not in BLOCK_METHODS:
        raise UsageError(f"--method '{method}' per block: choose {', '.join(BLOCK_METHODS)}")
    if matvecs < 1:
        raise UsageError(f"--matvecs must be at least 1 (got {matvecs})")
    names, offsets = _block_offsets(blocks, op.n)
    dense = isinstance(op, DenseOperator)
    method = choose_method(method, op.n, matvecs, dense)
    mv0 = op.matvecs
    gen = torch.Generator().manual_seed(seed)
    B = len(names)
    total = 0 if dense and method == "exact" else (op.n if method == "exact" else matvecs)
    progress.start(total, f"trace per block ({method}, {B} blocks)")
    try:
        if method == "exact":
            diag = _exact_diagonal(op, progress)
            est = _block_sums(diag[None, :], offsets)[0]
            vals = None
        elif method == "hutchinson":
            est, vals = _hutchinson_blocks(op, matvecs, gen, progress, offsets)
        else:
            est, vals = _hutchpp_blocks(op, matvecs, gen, progress, offsets)
    finally:
        progress.stop()
    if vals is None:
        ses, cov, tr, se, samples = np.zeros(B), np.zeros((B, B)), float(est.sum()), 0.0, 0
    else:
        samples = vals.shape[0]
        ses = _mean_se(vals)[1]
        cov = np.cov(vals, rowvar=False, ddof=1).reshape(B, B) / samples if samples > 1 else np.full((B, B), math.inf)
        tr = float(est.sum())
        se = float(_mean_se(vals.sum(1, keepdims=True))[1][0])
    return BlockTraceResult(
        names=names,
        offsets=offsets,
        traces=np.asarray(est, dtype=np.float64),
        stderrs=np.asarray(ses, dtype=np.float64),
        trace=tr,
        stderr=se,
        method=method,
        matvecs=op.matvecs - mv0,
        seconds=time.perf_counter() - t0,
        samples=samples,
        covariance=cov,
    )


def combine(results: list[TraceResult]) -> tuple[float, float]:
    """The sum of independent block estimates and its standard error √Σse²."""
    return float(sum(r.trace for r in results)), float(np.sqrt(sum(r.stderr**2 for r in results)))
