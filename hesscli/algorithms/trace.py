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

The random vectors come from a seeded generator on the CPU (the same on every rank).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from hesscli.algorithms.operators import DenseOperator, SymOperator
from hesscli.errors import UsageError
from hesscli.runtime.progress import NullProgress, Progress

__all__ = ["TraceResult", "estimate_trace", "METHODS", "choose_method"]

METHODS = ("auto", "exact", "hutchinson", "hutchpp", "xtrace")


@dataclass
class TraceResult:
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
    applied by column slabs so that no second s×n array is ever held; Householder QR when Y is
    (numerically) rank-deficient."""
    s, n = Y.shape
    eye = torch.eye(s, dtype=Y.dtype, device=Y.device)
    try:
        for _ in range(2):
            L = torch.linalg.cholesky(Y @ Y.T)
            Linv = torch.linalg.solve_triangular(L, eye, upper=False)
            for j in range(0, n, cols):
                Y[:, j : j + cols] = Linv @ Y[:, j : j + cols]
        if torch.isfinite(Y).all() and float((Y @ Y.T - eye).abs().max()) < 1e-10:
            return Y
    except RuntimeError:  # torch.linalg.LinAlgError: not positive definite
        pass
    Q = torch.linalg.qr(Y.T)[0]
    Y[: Q.shape[1]] = Q.T
    return Y[: Q.shape[1]]


def _quadratic_forms(op, m, gen, progress, Q=None) -> np.ndarray:
    """zᵀHz for m Rademacher z (projected to z − Q(Qᵀz) when Q is given), streamed in chunks."""
    vals = []
    for i in range(0, m, op.chunk):
        Z = _rademacher(min(op.chunk, m - i), op.n, gen, op.device)
        if Q is not None:
            Z = Z - (Z @ Q.T) @ Q  # Q: orthonormal rows
        vals.append((Z * op.matmat(Z)).sum(1).cpu().numpy())
        progress.advance(Z.shape[0])
    return np.concatenate(vals)


def _hutchinson(op, m, gen, progress):
    vals = _quadratic_forms(op, m, gen, progress)
    se = float(vals.std(ddof=1) / math.sqrt(m)) if m > 1 else math.inf
    return float(vals.mean()), se, m


def _hutchpp(op, m, gen, progress):
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
    t_low = 0.0
    for i in range(0, Q.shape[0], op.chunk):  # tr(QᵀHQ), without storing HQ
        Qc = Q[i : i + op.chunk]
        t_low += float((Qc * op.matmat(Qc)).sum())
        progress.advance(Qc.shape[0])
    vals = _quadratic_forms(op, g, gen, progress, Q)
    se = float(vals.std(ddof=1) / math.sqrt(g)) if g > 1 else math.inf
    return t_low + float(vals.mean()), se, g


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


def combine(results: list[TraceResult]) -> tuple[float, float]:
    """The sum of independent block estimates and its standard error √Σse²."""
    return float(sum(r.trace for r in results)), float(np.sqrt(sum(r.stderr**2 for r in results)))
