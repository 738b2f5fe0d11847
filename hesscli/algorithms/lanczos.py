"""Extreme eigenpairs of a symmetric operator: thick-restart block Lanczos.

Block Lanczos (Golub & Underwood 1977) grows an orthonormal basis V of the block Krylov space
span{X, HX, H²X, ...} from a random block X of ``b`` vectors, b Hessian-vector products at a time
(one batched product). Every new block is orthogonalized twice against the whole basis (full
reorthogonalization, classical Gram-Schmidt applied twice), and the projection T = V H Vᵀ is
filled from the products themselves: T[:, j] = V (H v_j), so T is exact even after a restart.
The Ritz pairs (θ, u = Vᵀs) of T approximate eigenpairs; with H V_j = Σ T_ij v_i + Lᵀ X_next for
the last block, the residual of a Ritz pair is ‖H u − θ u‖ = ‖Lᵀ s_last‖ without another product.
When the basis reaches ``ncv`` vectors it restarts thickly (Wu & Simon 2000; Stathopoulos, Saad &
Wu 1998): the basis becomes the wanted Ritz vectors (plus as many more from the same end) and the
pending block, and T becomes diag(θ), which keeps the converged directions (implicit deflation).

A block of b vectors sees an eigenvalue of multiplicity up to b at once; rounding and restarts
bring the remaining copies in, and the random start gives every eigenvector a component. A
single-vector Krylov space holds one vector per distinct eigenvalue, which is why single-vector
Lanczos misses multiplicities (../shared/NOTES.md). At the end the residuals are measured again with
one more batched product (k products): ``residuals`` are ‖Hu − θu‖ of the returned pairs, not the
recurrence's estimates. All arithmetic is float64; the products are in the operator's dtype.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from hesscli.algorithms.operators import DenseOperator, SymOperator
from hesscli.errors import Interrupted, UsageError, interrupt_handled
from hesscli.runtime.progress import NullProgress, Progress

__all__ = ["EigResult", "lanczos", "dense_eigs", "stored_eigs", "select", "WHICH", "basis_coefficients", "basis_combination"]

WHICH = ("largest", "smallest", "both", "magnitude")
BASIS_BUDGET = 1 << 30  # bytes of basis vectors (float64) held at once


@dataclass
class EigResult:
    """Eigenpairs of a symmetric operator with their measured residuals and the work they took."""

    eigenvalues: np.ndarray  # (k,) ascending
    residuals: np.ndarray  # (k,) ‖Hu − λu‖, measured
    converged: np.ndarray  # (k,) bool: residual ≤ tol·norm
    eigenvectors: np.ndarray | None  # (n, k) columns, or None
    norm: float  # ‖H‖₂ estimate: the largest |λ| found
    tol: float
    matvecs: int
    restarts: int
    method: str  # block-lanczos | dense | stored (a result file's eigenvalues)
    block_size: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False  # stopped by KeyboardInterrupt (SIGINT): residuals are the recurrence's estimates


def select(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the ``k`` wanted values of ascending ``theta``: the k largest, the k smallest,
    both ends (⌈k/2⌉ largest and ⌊k/2⌋ smallest, as scipy's ``eigsh(which="BE")``), or the k of
    largest magnitude."""
    m = len(theta)
    k = min(k, m)
    if which == "largest":
        return np.arange(m - k, m)
    if which == "smallest":
        return np.arange(k)
    if which == "both":
        hi = math.ceil(k / 2)
        return np.unique(np.concatenate([np.arange(k - hi), np.arange(m - hi, m)]))
    if which == "magnitude":
        return np.sort(np.argsort(-np.abs(theta), kind="stable")[:k])
    raise UsageError(f"--which '{which}': choose {', '.join(WHICH)}")


def first_block_size(k: int, max_block: int | None = None) -> int:
    """The block Lanczos starts with when no block size is given: min(2, k, ``max_block``). Two
    vectors see a double eigenvalue at once; a cluster of as many coincident Ritz values as the
    block has vectors then grows the block (up to ``max_block``, default :func:`default_block_size`)
    to look for more copies. Measured (``bench/mlp1m_spectrum.py``, the 1.1M MLP, top 5 at 1e-4):
    30, 37, 41, 49 products for blocks of 1, 2, 3, 4 (scipy ``eigsh``: 35); batching 2 or 4 vectors
    saves 10–15 % per vector there, nothing at 22.7M (one vector per batched product fits)."""
    cap = default_block_size(k) if max_block is None else max(1, int(max_block))
    return int(max(1, min(2, k, cap)))


def _largest_cluster(theta: np.ndarray, gap: float) -> int:
    """The most values of sorted ``theta`` in one run whose neighbours are within ``gap``."""
    run = best = 1 if len(theta) else 0
    for d in np.diff(np.sort(theta)):
        run = run + 1 if d <= gap else 1
        best = max(best, run)
    return best


def default_block_size(k: int) -> int:
    """Vectors per block: min(4, k). Measured (``bench/large_model.py --compare-blocks``, 1 thread):
    on the digits MLP single vectors need the fewest products (top-20 largest, float64: 86, 98, 124,
    164 products for b = 1, 2, 4, 8; 0.92, 0.90, 1.12, 1.55 s), but on least squares with 4 outputs
    (every eigenvalue 4 times, float64) the top 8 came back with the two largest 3 + 2 times (b = 1)
    and 4 + 2 times (b = 2), the rest filled by smaller ones; b = 4 returned both four times."""
    return int(min(4, max(1, k)))


def default_ncv(n: int, k: int, b: int, budget: int = BASIS_BUDGET) -> int:
    """Basis size: max(2k + 2b, k + 6b, 128), and no more than ``budget`` bytes of float64 vectors.
    A large basis matters: on the digits MLP the 5 smallest (clustered) eigenvalues took 9,020
    products with 12 vectors and 177 with 200 (single-vector); the largest were insensitive."""
    want = max(2 * k + 2 * b, k + 6 * b, 128)
    cap = max(k + 3 * b, budget // (8 * max(n, 1)))
    return int(min(want, cap))


def _finish(op, theta, U, k_norm, tol, t0, mv0, restarts, method, b, eigenvectors) -> EigResult:
    """Measure ‖Hu − θu‖ for the returned pairs (rows of U, float64 or float32), sort ascending. The
    products are taken in the operator's chunks, in U's dtype, and each is reduced to its residual
    at once: no (k, n) product matrix, no (k, n) difference and no reordered copy of U next to it
    (3.6 GB at k = 5 and 22.7M parameters before)."""
    res = np.empty(len(theta))
    step = max(1, int(getattr(op, "chunk", 1) or 1))
    for i in range(0, len(theta), step):
        HU = op.matmat(U[i : i + step], dtype=U.dtype)
        HU -= torch.as_tensor(theta[i : i + step], device=HU.device, dtype=HU.dtype)[:, None] * U[i : i + step]
        res[i : i + step] = _row_norms(HU).cpu().numpy()
        del HU
    order = np.argsort(theta, kind="stable")
    theta, res = theta[order], res[order]
    conv = res <= tol * k_norm
    # in the basis dtype: a float32 basis's vectors are float32-accurate, and a float64 copy of k
    # vectors of 22.7M parameters put the 5 GB MiniLM run at 5.99 GB instead of 5.12
    vecs = U[torch.as_tensor(order, device=U.device)].T.cpu().numpy() if eigenvectors else None
    notes = []
    if method == "block-lanczos" and b > 0 and len(theta) >= b:
        close = np.abs(np.diff(theta)) <= max(tol, 1e3 * op.eps) * k_norm
        run = best = 0
        for c in close:
            run = run + 1 if c else 0
            best = max(best, run + 1)
        if best >= max(b, 2):
            notes.append(f"{best} returned eigenvalues coincide, as many as the block has vectors ({b}): the eigenvalue "
                         "may have more copies than were found; rerun with a larger --block-size to check")
    return EigResult(theta, res, conv, vecs, k_norm, tol, op.matvecs - mv0, restarts, method, b,
                     time.perf_counter() - t0, notes)


def dense_eigs(op: SymOperator, k: int, which: str = "largest", tol: float = 1e-6, eigenvectors: bool = False,
               progress: Progress | None = None) -> EigResult:
    """All eigenpairs by ``eigh`` of the matrix (stored, or assembled from n products when n is small)."""
    t0 = time.perf_counter()
    mv0 = op.matvecs
    if isinstance(op, DenseOperator):
        H = op.H.to(op.device)
    else:
        progress = progress or NullProgress()
        progress.start(op.n, "Hessian (small block)")
        H = op.matmat(torch.eye(op.n, dtype=torch.float64, device=op.device))
        progress.advance(op.n)
        progress.stop()
    w, S = torch.linalg.eigh((H + H.T) / 2)
    theta = w.cpu().numpy()
    norm = float(np.abs(theta).max()) if len(theta) else 0.0
    idx = select(theta, k, which)
    U = S[:, torch.as_tensor(idx, device=S.device)].T.contiguous()
    if isinstance(op, DenseOperator):  # residuals against the stored matrix, no products to count
        res = torch.linalg.norm(U @ H - torch.as_tensor(theta[idx], device=U.device)[:, None] * U, dim=1).cpu().numpy()
        vecs = U.T.cpu().numpy() if eigenvectors else None
        return EigResult(theta[idx], res, res <= tol * norm, vecs, norm, tol, 0, 0, "dense", 0, time.perf_counter() - t0)
    return _finish(op, theta[idx], U, norm, tol, t0, mv0, 0, "dense", 0, eigenvectors)


def stored_eigs(eigenvalues: np.ndarray, k: int, which: str = "largest", tol: float = 1e-6,
                vectors: np.ndarray | None = None, op: SymOperator | None = None,
                eigenvectors: bool = False) -> EigResult:
    """The ``k`` wanted pairs from stored eigenvalues (a ``compute`` result file), with no
    eigendecomposition and no product.

    ``eigenvalues`` (n,) ascending are all of the matrix's, so ‖H‖₂ = max |λ| exactly. With the
    stored eigenvectors ``vectors`` (n, n) columns and the stored matrix ``op``, each residual
    ‖Hu − λu‖ is measured against the matrix and ``converged`` is residual ≤ tol·‖H‖₂. Without them
    the residuals are NaN (not measured) and every pair counts as converged: the values come from
    ``eigh``, a direct method accurate to the rounding level of the dtype they were computed in, not
    from an iteration that ``tol`` would stop. Raises ValueError when ``eigenvectors`` is asked for
    and no vectors are given (that needs ``eigh`` of the matrix: :func:`dense_eigs`)."""
    t0 = time.perf_counter()
    if which not in WHICH:
        raise UsageError(f"--which '{which}': choose {', '.join(WHICH)}")
    if eigenvectors and vectors is None:
        raise ValueError("stored_eigs: eigenvectors asked for, none stored")
    ev = np.asarray(eigenvalues, dtype=np.float64)
    idx = select(ev, k, which)
    theta = ev[idx]
    norm = float(np.abs(ev).max()) if len(ev) else 0.0
    vecs = np.asarray(vectors[:, idx], dtype=np.float64) if vectors is not None else None
    if vecs is not None and op is not None:
        U = torch.from_numpy(np.ascontiguousarray(vecs.T))
        mv0 = op.matvecs
        HU = op.matmat(U).cpu()
        op.matvecs = mv0  # a stored matrix: no Hessian-vector products to count
        res = torch.linalg.norm(HU - torch.from_numpy(theta)[:, None] * U, dim=1).numpy()
        conv = res <= tol * norm
    else:
        res = np.full(len(theta), np.nan)
        conv = np.ones(len(theta), dtype=bool)
    return EigResult(theta, res, conv, vecs if eigenvectors else None, norm, tol, 0, 0, "stored", 0,
                     time.perf_counter() - t0)


SLAB_BYTES = 32 << 20  # float64 bytes of a widened basis slab (a float32 basis)


def _slabs(m: int, n: int):
    """Column ranges whose (m, cols) float64 copy stays within SLAB_BYTES."""
    cols = max(1, SLAB_BYTES // (8 * max(m, 1)))
    for c in range(0, n, cols):
        yield slice(c, min(c + cols, n))


def basis_coefficients(V: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """V Yᵀ in float64 (m, k) for a basis V (m, n) and vectors Y (k, n), each float64 or float32.
    Float32 operands are widened a column slab at a time (at most ``SLAB_BYTES`` of float64), never
    copied whole: the bench measured 1.46 GB of temporaries and 3 s per call at 22.7M parameters for
    8-row slabs, 0.07 GB and 1 s for 32 MB column slabs."""
    if V.dtype == torch.float64 and Y.dtype == torch.float64:
        return V @ Y.T
    out = torch.zeros(V.shape[0], Y.shape[0], dtype=torch.float64, device=V.device)
    if V.shape[0] == 0 or Y.shape[0] == 0:
        return out
    for c in _slabs(V.shape[0] + Y.shape[0], V.shape[1]):
        out += V[:, c].to(torch.float64) @ Y[:, c].to(torch.float64).T
    return out


def basis_combination(C: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Cᵀ V in float64 (k, n) for coefficients C (m, k) float64 and a basis V (m, n) of any dtype,
    a column slab at a time for a float32 basis."""
    if V.dtype == torch.float64:
        return C.T @ V
    out = torch.empty(C.shape[1], V.shape[1], dtype=torch.float64, device=V.device)
    for c in _slabs(V.shape[0], V.shape[1]):
        out[:, c] = C.T @ V[:, c].to(torch.float64)
    return out


def project_out_(R: torch.Tensor, C: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """R −= Cᵀ V in place, for R (k, n) and a basis V (m, n) (float64 or float32 storage) and
    coefficients C (m, k) float64. The arithmetic is float64 (a column slab at a time when either is
    float32, the result rounded to R's dtype once); no (k, n) temporary."""
    if V.shape[0] == 0 or R.shape[0] == 0:
        return R
    C = C.to(R.device)
    if R.dtype == torch.float64 and V.dtype == torch.float64:
        return R.addmm_(C.T, V, alpha=-1.0)
    for c in _slabs(V.shape[0] + R.shape[0], V.shape[1]):
        slab = R[:, c].to(torch.float64)
        slab.addmm_(C.T, V[:, c].to(torch.float64), alpha=-1.0)
        R[:, c] = slab
    return R


def _row_norms(R: torch.Tensor) -> torch.Tensor:
    """‖r_i‖ of the rows of R (k, n), accumulated in float64 a column slab at a time
    (``vector_norm(..., dtype=float64)`` would first copy all of R to float64: 0.9 GB for five
    vectors at 22.7M parameters)."""
    if R.dtype == torch.float64:
        return torch.linalg.vector_norm(R, dim=1)
    sq = torch.zeros(R.shape[0], dtype=torch.float64, device=R.device)
    for c in _slabs(R.shape[0], R.shape[1]):
        sq += R[:, c].to(torch.float64).square().sum(1)
    return sq.sqrt()


def _rotate_(buf: torch.Tensor, rows: int, St: torch.Tensor) -> None:
    """buf[:keep] = Stᵀ buf[:rows] in place, a slab of columns at a time (St: (rows, keep) float64):
    each slab of the new rows depends on the same slab of the old ones only, so no (keep, n) copy."""
    keep = St.shape[1]
    cols = max(1, (1 << 26) // (8 * max(rows, 1)))
    for c in range(0, buf.shape[1], cols):
        slab = St.T @ buf[:rows, c : c + cols].to(torch.float64)
        buf[:keep, c : c + cols] = slab.to(buf.dtype)


def _orth_block(R: torch.Tensor, V: torch.Tensor, gen: torch.Generator, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal rows X (⟂ V) and lower-triangular L (float64) with R = L X, for R (bx, n) already
    orthogonalised against V (twice). X overwrites R (same dtype) on the common path: Cholesky QR
    twice on the block's float64 Gram matrix (bx ≤ 4 rows: cheap), which keeps R's orthogonality
    to V because the block is well conditioned; a block with a near-dependent or vanishing row
    (an invariant subspace, fewer dimensions left than vectors, or a Gram matrix more than 1e4
    conditioned) goes to :func:`_orth_block_careful`, vector by vector in float64."""
    bx = R.shape[0]
    eye = torch.eye(bx, dtype=torch.float64)
    L = eye.clone()
    try:
        for _ in range(2):
            G = basis_coefficients(R, R).cpu()
            G = (G + G.T) / 2
            d = torch.sqrt(torch.clamp(torch.diagonal(G), min=0.0))
            if float(d.min()) <= 1e-12 * max(scale, 1e-300) or not bool(torch.isfinite(G).all()):
                raise torch.linalg.LinAlgError("a vanishing direction")
            Lk = torch.linalg.cholesky(G)
            # a row that mostly cancels against the rows before it (‖r_i‖ ≫ its own new direction)
            # would lose its orthogonality to V by that factor: the careful path instead
            if float((d / torch.diagonal(Lk)).max()) > 1e2:
                raise torch.linalg.LinAlgError("a near-dependent block")
            Linv = torch.linalg.solve_triangular(Lk, eye, upper=False)
            _rotate_(R, bx, Linv.T.to(R.device))  # R ← L_k⁻¹ R in place
            L = L @ Lk
            scale = 1.0  # the rows have unit norm now: a vanishing row is judged against that
        return R, L
    except torch.linalg.LinAlgError:
        X, L2 = _orth_block_careful(R, V, gen, scale)
        return X, L @ L2


def _orth_block_careful(R: torch.Tensor, V: torch.Tensor, gen: torch.Generator,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_orth_block` vector by vector, in place on the rows of R (any dtype; float64
    arithmetic a column slab at a time, no vector-sized temporary): each row orthogonalised twice
    against the rows before it and against V. A direction that vanishes is replaced by a random
    one with a zero coefficient in L."""
    bx, n = R.shape
    L = torch.zeros(bx, bx, dtype=torch.float64)
    floor = 1e-12 * max(scale, 1e-300)

    def against_previous(i: int, coef: torch.Tensor | None) -> float:
        r = R[i : i + 1]
        for _ in range(2):
            if i:
                c = basis_coefficients(R[:i], r).cpu()
                project_out_(r, c, R[:i])
                if coef is not None:
                    coef += c[:, 0]
            if V.shape[0]:
                project_out_(r, basis_coefficients(V, r).cpu(), V)
        return float(_row_norms(r)[0])

    for i in range(bx):
        beta = against_previous(i, L[i, :i])
        if beta > floor:
            L[i, i] = beta
            R[i] /= beta
            continue
        for _attempt in range(3):
            R[i] = torch.randn(n, generator=gen, dtype=R.dtype).to(R.device)
            beta = against_previous(i, None)
            if beta > 1e-8 * math.sqrt(n):
                break
        R[i] /= beta
    return R, L


def _expected(history: list[tuple[int, float]], tol: float, max_mv: int) -> int:
    """The products the run will need, extrapolating the worst residual's log-linear decrease over
    the last steps to ``tol`` (the total a progress bar's time estimate uses); ``max_mv`` when the
    residual does not decrease yet."""
    if len(history) < 3:
        return max_mv
    (m0, r0), (m1, r1) = history[max(0, len(history) - 6)], history[-1]
    rate = (r0 - r1) / max(m1 - m0, 1)
    if rate <= 0:
        return max_mv
    return int(min(max_mv, m1 + max(0.0, (r1 - math.log(tol)) / rate)))


def _interrupted(theta, S, V, est, want, hnorm, tol, t0, matvecs, restarts, b, eigenvectors) -> EigResult:
    """The wanted Ritz pairs at the moment of an interrupt, without another product: residuals are
    the recurrence's estimates ‖Lᵀs‖ (exact in exact arithmetic), converged where ≤ tol·‖H‖₂."""
    order = np.argsort(theta[want], kind="stable")
    idx = torch.as_tensor(want[order])
    vecs = None
    if eigenvectors:
        U = basis_combination(S[: V.shape[0], idx].to(V.device), V)
        vecs = (U / torch.linalg.norm(U, dim=1, keepdim=True)).T.cpu().numpy()
    res = np.asarray(est, dtype=np.float64)[want[order]]
    return EigResult(theta[want[order]], res, res <= tol * hnorm, vecs, hnorm, tol, matvecs, restarts, "block-lanczos", b,
                     time.perf_counter() - t0, ["interrupted (SIGINT): the pairs found so far; their residuals are "
                                                "the Lanczos recurrence's estimates, not measured"], interrupted=True)


def lanczos(
    op: SymOperator,
    k: int = 20,
    which: str = "largest",
    tol: float = 1e-6,
    max_matvecs: int | None = None,
    block_size: int | None = None,
    ncv: int | None = None,
    seed: int = 0,
    eigenvectors: bool = False,
    progress: Progress | None = None,
    start: torch.Tensor | None = None,
    basis_dtype: torch.dtype = torch.float64,
    max_block: int | None = None,
) -> EigResult:
    """The ``k`` wanted eigenpairs of ``op`` (``which``: largest, smallest, both, magnitude).

    Stops when every wanted Ritz pair's residual is ≤ ``tol``·‖H‖₂ (‖H‖₂: the largest |θ| found),
    or after ``max_matvecs`` products (default max(1000, 50k)). ``ncv`` caps the basis (default
    :func:`default_ncv`); when n is no larger than the basis would be, H is assembled from n
    products and solved densely instead. The basis is held on the operator's device.

    ``start`` (s, n), optional: the first block's vectors instead of random ones — a warm start,
    e.g. the Ritz vectors of a nearby operator (the previous checkpoint of a training run). They
    are orthonormalized (a vector that is zero or depends on the others is replaced by a random
    one) and, when s is smaller than the block size, completed with random directions from the
    ``seed`` generator; when s is larger, the block size becomes s. Without ``start`` the first
    block is ``seed``'s random block, as before.

    ``basis_dtype``: how the basis is stored — float64, or float32 where a float64 basis does not
    fit the memory plan (:mod:`hesscli.algorithms.mfplan`); every coefficient, the projection T and
    the reorthogonalisation still accumulate in float64 (the basis is widened a few rows at a
    time). A float32 basis is orthonormal to about 1e-7, which bounds how small a relative residual
    it can certify (a note says so when ``tol`` is below 1e-6).

    ``block_size``: vectors per block, fixed. Without it the block starts at
    :func:`first_block_size` and grows (to at most ``max_block``, default min(4, k): the memory
    plan's) whenever the wanted Ritz values converge with a cluster of as many coincident values as
    the block has vectors — a repeated eigenvalue may have more copies than the block can see; the
    grown block brings them in (a note says so).
    """
    if which not in WHICH:
        raise UsageError(f"--which '{which}': choose {', '.join(WHICH)}")
    if k < 1:
        raise UsageError(f"--top-k must be at least 1 (got {k})")
    if tol <= 0:
        raise UsageError(f"--tol must be positive (got {tol})")
    n = op.n
    k = min(k, n)
    adaptive = block_size is None
    bmax = max(1, min(int(max_block) if max_block else default_block_size(k), n))
    b = max(1, min(block_size if block_size else first_block_size(k, bmax), n))
    if start is not None:
        start = start.reshape(-1, n) if start.dim() == 1 else start
        if start.dim() != 2 or start.shape[1] != n:
            raise ValueError(f"lanczos: start vectors of shape {tuple(start.shape)}, expected (s, {n})")
        start = start[: n]
        b = max(b, start.shape[0])
    bmax = max(bmax, b) if adaptive else b
    m = ncv or default_ncv(n, k, bmax)
    if isinstance(op, DenseOperator) or n <= m + 2 * bmax:
        return dense_eigs(op, k, which, tol, eigenvectors, progress)
    max_mv = max_matvecs if max_matvecs is not None else max(1000, 50 * k)
    if max_mv < b:
        raise UsageError(f"--max-matvecs {max_mv} is less than one block of {b} products")
    n_keep = min(m - 2 * b, k + max(b, (m - 2 * b - k) // 2))
    if m < k + 2 * bmax:
        bmax = max(b, (m - k) // 2)  # a grown block must still fit the basis beside the wanted pairs
    t0 = time.perf_counter()
    mv0 = op.matvecs
    progress = progress or NullProgress()
    progress.start(max_mv, f"Lanczos (block {b})")
    gen = torch.Generator().manual_seed(seed)
    dev = op.device
    if start is None:
        X0 = torch.randn(b, n, generator=gen, dtype=torch.float64).to(dev)
    else:
        W = start.to(dev, torch.float64)
        W = W / torch.linalg.norm(W, dim=1, keepdim=True).clamp_min(1e-300)
        fill = torch.randn(b - W.shape[0], n, generator=gen, dtype=torch.float64).to(dev)
        X0 = torch.cat([W, fill])
    buf = torch.empty(m, n, dtype=basis_dtype, device=dev)  # the basis, rows 0..rows-1 (never more than m)
    X0, _ = _orth_block(X0, buf[:0], gen, 1.0)
    buf[:b] = X0
    V = buf[:b]
    T = torch.zeros(0, 0, dtype=torch.float64)
    nmult = 0
    restarts = 0
    theta = None
    history: list[tuple[int, float]] = []  # (products, log of the worst relative residual)
    grown: list[str] = []  # notes: when the block grew
    steps = grown_at = 0  # block steps taken; the step at which the block last grew
    try:
        while True:
            X = V[nmult:]
            bx = X.shape[0]
            Y = op.matmat(X, dtype=basis_dtype)  # stored like the basis: becomes the residual, then the next block
            C = basis_coefficients(V, Y).cpu()  # (rows, bx): T[:, new block]
            rows = V.shape[0]
            Tn = torch.zeros(rows, rows, dtype=torch.float64)
            Tn[:nmult, :nmult] = T
            Tn[:, nmult:] = C
            Tn[nmult:, :nmult] = C[:nmult].T
            Tn[nmult:, nmult:] = (C[nmult:] + C[nmult:].T) / 2
            T, nmult = Tn, rows
            R = project_out_(Y, C, V)  # in place: R = HX − V·C, then once more against V (CGS2)
            project_out_(R, basis_coefficients(V, R).cpu(), V)
            del Y
            theta_t, S = torch.linalg.eigh(T)
            theta = theta_t.numpy()
            hnorm = float(np.abs(theta).max())
            Xnew, L = _orth_block(R, V, gen, hnorm)
            del R
            est = torch.linalg.norm(L.T @ S[nmult - bx :, :], dim=0).numpy()
            want = select(theta, k, which)
            worst = float(est[want].max()) / max(hnorm, 1e-300)
            history.append((op.matvecs - mv0, math.log(max(worst, 1e-300))))
            progress.advance(bx, residual=f"{worst:.1e}", expected_total=_expected(history, tol, max_mv))
            steps += 1
            # after the block grew, its new directions get as many block steps as the first ones took
            done = nmult >= k + b and worst <= tol and steps >= 2 * grown_at
            grow = 0
            if done and adaptive and b < bmax:
                # converged with a cluster as large as the block: a repeated eigenvalue may have more
                # copies than this block can see — grow the block with random directions and go on
                near = select(theta, min(k + 1, len(theta)), which)
                c = _largest_cluster(theta[near], max(tol, 1e3 * op.eps) * hnorm)
                if c >= b:
                    grow = min(2 * b, bmax) - b
                    grown.append(f"block grown from {b} to {b + grow} vectors after {op.matvecs - mv0} products: "
                                 f"{c} Ritz values coincided (a repeated eigenvalue may have more copies)")
                    b += grow
                    grown_at = steps
                    n_keep = min(m - 2 * b, k + max(b, (m - 2 * b - k) // 2))
                    done = False
            if done or op.matvecs - mv0 + b > max_mv:
                break
            bx = Xnew.shape[0]
            if rows + bx + grow > m:  # thick restart: keep the wanted end of the spectrum
                keep = select(theta, n_keep, which)
                St = S[:, torch.as_tensor(keep)].to(dev)
                _rotate_(buf, rows, St)
                at = len(keep)
                T = torch.diag(theta_t[torch.as_tensor(keep)])
                nmult = len(keep)
                restarts += 1
                # what an interrupt before the next step reports refers to the rotated basis:
                # the kept Ritz pairs (want ⊂ keep for every `which`)
                want = np.searchsorted(keep, want)
                theta, est = theta[keep], est[keep]
                S = torch.eye(len(keep), dtype=torch.float64)
            else:
                at = rows
            buf[at : at + bx] = Xnew
            del Xnew
            if grow:  # random directions, orthogonal to all before them, in place in the basis
                buf[at + bx : at + bx + grow] = torch.randn(grow, n, generator=gen, dtype=buf.dtype).to(dev)
                _orth_block_careful(buf[at + bx : at + bx + grow], buf[: at + bx], gen, 1.0)
            V = buf[: at + bx + grow]
    except (KeyboardInterrupt, Interrupted):
        if theta is None:  # not one block done: nothing to keep
            raise
        interrupt_handled()  # the command line stops re-sending the signal while the pairs are kept
        return _interrupted(theta, S, V[:nmult], est, want, hnorm, tol, t0, op.matvecs - mv0, restarts, b,
                            eigenvectors)
    finally:
        progress.stop()
    # the Ritz vectors overwrite the basis (no (k, n) array beside it)
    _rotate_(buf, nmult, S[:, torch.as_tensor(want)].to(dev))
    U = buf[: len(want)]
    U /= _row_norms(U).to(U.dtype)[:, None]
    res = _finish(op, theta[want], U, hnorm, tol, t0, mv0, restarts, "block-lanczos", b, eigenvectors)
    res.notes[:0] = grown
    if basis_dtype != torch.float64:
        res.notes.append(f"basis of {m} vectors stored in {str(basis_dtype).replace('torch.', '')} (the memory plan)"
                         + ("; it is orthonormal to about 1e-7, so residuals below that are not certified"
                            if tol < 1e-6 else ""))
    return res
