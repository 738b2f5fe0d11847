"""The spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

The eigenvalue distribution μ = (1/n) Σ_i δ(λ_i) satisfies ∫f dμ = tr f(H)/n = E[vᵀ f(H) v] for a
random unit vector v with E[vvᵀ] = I/n. For each of ``runs`` Rademacher vectors (normalized),
``steps`` Lanczos steps give a tridiagonal T = SΘSᵀ, and the Gauss quadrature
vᵀf(H)v ≈ Σ_j τ_j f(θ_j) with τ_j = S_1j² (Golub & Meurant; Lin, Saad & Yang 2016, "Approximating
spectral densities of large matrices"; Ghorbani, Krishnan & Xiao 2019, "An investigation into
neural net optimization via Hessian eigenvalue density"). The runs go through the batched product
together (one block of ``runs`` vectors per step), each with full reorthogonalization against its
own basis when that fits in memory (else the runs go in smaller groups), all in float64.

Smoothing: the density is Σ τ_j g_σ(t − θ_j) averaged over the runs, g_σ a Gaussian of width
σ = (λmax − λmin)/(2·steps), half the spacing of ``steps`` quadrature nodes spread over the range
(the resolution the quadrature has): smaller σ shows the nodes, not the density; larger blurs it.
It moves the distribution by about 0.8σ in Wasserstein-1 distance.

Exact eigenvalues (a ``compute`` result file) need no quadrature: the density is theirs, and
``runs`` and ``steps`` do not apply. They are smoothed at the resolution of a default SLQ run,
σ = (λmax − λmin)/(2·``DENSE_RESOLUTION``) with ``DENSE_RESOLUTION`` = 80 (the default ``--steps``),
so that the result does not depend on ``--steps`` and is drawn like a model's density at the defaults.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from hesscli.algorithms.lanczos import basis_coefficients, basis_combination
from hesscli.algorithms.operators import DenseOperator, SymOperator
from hesscli.errors import HesscliError, UsageError
from hesscli.runtime.progress import NullProgress, Progress

__all__ = ["DensityResult", "slq", "smooth", "smoothing_sigma", "spectral_density", "text_histogram", "plot_density",
           "DENSE_RESOLUTION"]

GRID_POINTS = 1024
DENSE_RESOLUTION = 80  # the smoothing of exact eigenvalues: that of SLQ with the default --steps
BASIS_BUDGET = 1 << 30  # bytes of Lanczos bases held at once


@dataclass
class DensityResult:
    """A spectral density on a grid (G,) with the quadrature nodes and weights it was smoothed from."""
    grid: np.ndarray  # (G,)
    density: np.ndarray  # (G,), integrates to 1
    nodes: np.ndarray  # (runs, steps) Ritz values (NaN past a breakdown)
    weights: np.ndarray  # (runs, steps) quadrature weights τ (0 past a breakdown)
    sigma: float
    matvecs: int
    seconds: float
    method: str  # slq | dense
    lambda_min: float
    lambda_max: float


def slq(op: SymOperator, runs: int = 10, steps: int = 80, seed: int = 0, progress: Progress | None = None,
        budget: int = BASIS_BUDGET, basis_dtype: torch.dtype = torch.float64) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes and weights, each (runs, steps), of ``runs`` Lanczos runs of ``steps`` steps.

    Each run keeps its Lanczos basis (steps, n) for full reorthogonalisation, in ``basis_dtype``
    (float32 where the memory plan cannot hold float64; coefficients accumulate in float64); runs
    are grouped so that their bases take at most ``budget`` bytes."""
    if runs < 1 or steps < 1:
        raise UsageError(f"--runs and --steps must be at least 1 (got {runs}, {steps})")
    n = op.n
    steps = min(steps, n)
    progress = progress or NullProgress()
    gen = torch.Generator().manual_seed(seed)
    nodes = np.full((runs, steps), np.nan)
    weights = np.zeros((runs, steps))
    size = torch.empty((), dtype=basis_dtype).element_size()
    group = max(1, min(runs, budget // max(1, (steps + 1) * n * size)))
    progress.start(runs * steps, "SLQ")
    try:
        for g0 in range(0, runs, group):
            g = min(group, runs - g0)
            V = (torch.randint(0, 2, (g, n), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1) / math.sqrt(n)
            V = V.to(op.device)
            Qbuf = torch.empty(steps, g, n, dtype=basis_dtype, device=op.device)  # each run's basis
            Qbuf[0] = V
            alpha = torch.zeros(g, steps, dtype=torch.float64)
            beta = torch.zeros(g, steps, dtype=torch.float64)
            length = np.full(g, steps)
            active = torch.ones(g, dtype=torch.bool)
            for j in range(steps):
                act = torch.nonzero(active).flatten().to(op.device)
                W = torch.zeros_like(V)
                W[act] = op.matmat(V[act])
                a = (W * V).sum(1)
                alpha[:, j] = a.cpu()
                W -= a[:, None] * V
                if j > 0:
                    W -= beta[:, j - 1].to(op.device)[:, None] * Qbuf[j - 1]
                Qs = Qbuf[: j + 1]  # (j+1, g, n)
                for r in range(g):  # full reorthogonalization (twice), each run against its own basis
                    for _ in range(2):
                        W[r] -= basis_combination(basis_coefficients(Qs[:, r], W[r][None]), Qs[:, r])[0]
                b = W.norm(dim=1)
                beta[:, j] = b.cpu()
                progress.advance(len(act))
                if j == steps - 1:
                    break
                scale = alpha[:, : j + 1].abs().max(1).values.clamp_min(1e-300)
                stop = active & (b.cpu() <= 1e-12 * scale)  # an invariant subspace: the quadrature is exact
                for r in torch.nonzero(stop).flatten().tolist():
                    length[r] = j + 1
                active &= ~stop
                if not bool(active.any()):
                    break
                keep = active.to(op.device)[:, None]
                V = torch.where(keep, W / b.clamp_min(1e-300)[:, None], torch.zeros_like(W))
                Qbuf[j + 1] = V
            for r in range(g):
                L = int(length[r])
                T = torch.diag(alpha[r, :L]) + torch.diag(beta[r, : L - 1], 1) + torch.diag(beta[r, : L - 1], -1)
                th, S = torch.linalg.eigh(T)
                nodes[g0 + r, :L] = th.numpy()
                weights[g0 + r, :L] = (S[0] ** 2).numpy()
    finally:
        progress.stop()
    return nodes, weights


def smoothing_sigma(lo: float, hi: float, resolution: int) -> float:
    """The Gaussian width for nodes spread over [lo, hi]: half the spacing of ``resolution`` nodes,
    (hi − lo)/(2·resolution); a range of zero width gets 1e-3·max(|hi|, 1)."""
    width = hi - lo
    return width / (2 * max(resolution, 1)) if width > 0 else max(abs(hi), 1.0) * 1e-3


def smooth(nodes: np.ndarray, weights: np.ndarray, sigma: float, grid: np.ndarray) -> np.ndarray:
    """Σ w_j g_σ(t − θ_j) on ``grid`` (weights summing to 1 give a density that integrates to 1)."""
    ok = np.isfinite(nodes) & (weights > 0)
    th, w = nodes[ok], weights[ok]
    out = np.zeros_like(grid)
    for s in range(0, len(th), 256):
        d = (grid[:, None] - th[None, s : s + 256]) / sigma
        out += (np.exp(-0.5 * d * d) * w[None, s : s + 256]).sum(1)
    return out / (sigma * math.sqrt(2 * math.pi))


def spectral_density(op: SymOperator, runs: int = 10, steps: int = 80, seed: int = 0,
                     progress: Progress | None = None, eigenvalues: np.ndarray | None = None,
                     budget: int = BASIS_BUDGET, basis_dtype: torch.dtype = torch.float64) -> DensityResult:
    """The smoothed eigenvalue density: exact from ``eigenvalues`` (or a stored matrix), else SLQ.

    ``runs`` and ``steps`` are SLQ's: the exact density does not depend on them (σ from
    ``DENSE_RESOLUTION``, see the module docstring). ``budget`` and ``basis_dtype``: SLQ's bases
    (:func:`slq`)."""
    t0 = time.perf_counter()
    mv0 = op.matvecs if op is not None else 0
    if eigenvalues is None and isinstance(op, DenseOperator):
        eigenvalues = torch.linalg.eigvalsh((op.H + op.H.T) / 2).cpu().numpy()
    if eigenvalues is not None:
        ev = np.asarray(eigenvalues, dtype=np.float64)
        nodes, weights, method = ev[None, :], np.full((1, len(ev)), 1.0 / max(len(ev), 1)), "dense"
    else:
        nodes, weights = slq(op, runs, steps, seed, progress, budget, basis_dtype)
        weights = weights / nodes.shape[0]
        method = "slq"
    lo, hi = float(np.nanmin(nodes)), float(np.nanmax(nodes))
    if not math.isfinite(hi - lo):
        raise HesscliError("the spectral density has non-finite nodes: the operator produced NaN or Inf")
    sigma = smoothing_sigma(lo, hi, steps if method == "slq" else DENSE_RESOLUTION)
    grid = np.linspace(lo - 4 * sigma, hi + 4 * sigma, GRID_POINTS)
    dens = smooth(nodes, weights, sigma, grid)
    matvecs = (op.matvecs - mv0) if op is not None else 0
    return DensityResult(grid, dens, nodes, weights, sigma, matvecs,
                         time.perf_counter() - t0, method, lo, hi)


def text_histogram(grid: np.ndarray, density: np.ndarray, bins: int = 12, width: int = 40, decades: int = 6) -> str:
    """A compact histogram of the density's mass per bin, bars on a log scale (``decades`` deep)."""
    edges = np.linspace(grid[0], grid[-1], bins + 1)
    dx = np.gradient(grid)
    idx = np.clip(np.searchsorted(edges, grid, side="right") - 1, 0, bins - 1)
    mass = np.bincount(idx, weights=density * dx, minlength=bins)
    mass = mass / max(mass.sum(), 1e-300)
    top = max(mass.max(), 1e-300)
    lines = []
    for i in range(bins):
        m = mass[i]
        frac = 0.0 if m <= 0 else max(0.0, 1 + math.log10(m / top) / decades)
        bar = "█" * int(round(frac * width))
        lines.append(f"{edges[i]:>11.4g} … {edges[i + 1]:<11.4g} │{bar:<{width}}│ {m:8.2%}")
    return "\n".join(lines)


def plot_density(path: str, grid: np.ndarray, density: np.ndarray, title: str = "Hessian eigenvalue density") -> None:
    """Save a PNG of the density on a log scale (matplotlib's Agg backend, from the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise HesscliError("--plot needs matplotlib: pip install 'hesscli[plot]'") from None
    floor = max(float(density.max()) * 1e-12, 1e-300)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    try:
        ax.semilogy(grid, np.maximum(density, floor))
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (log scale)")
        ax.set_title(title)
        ax.set_ylim(bottom=max(floor, float(density.max()) * 1e-8))
        fig.tight_layout()
        fig.savefig(path, format="png")
    except OSError as e:
        raise HesscliError(f"cannot write plot '{path}': {e.strerror or e}") from None
    finally:
        plt.close(fig)
