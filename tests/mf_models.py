"""Models and references shared by the matrix-free tests (spectrum, trace, density).

- ``LeastSquares``: a linear model y = Wx + b. With PyTorch's mean mse over N samples and k outputs
  its Hessian is 2/(N·k)·[X 1]ᵀ[X 1] ⊗ I_k: every eigenvalue repeated k times (closed form).
  ``least_squares_case`` writes it on real data (scikit-learn's diabetes, standardized, with its
  degree-2 polynomial features: 65 inputs) as a state_dict and a data shard.
- ``digits_truth``: the digits MLP sample's dense float64 Hessian (``hesscli.algorithms.dense``), computed once
  per process.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hesscli.algorithms.operators import SymOperator

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"
DIGITS_MLP = SAMPLES / "digits_mlp.pt"
DIGITS = SAMPLES / "digits.pt"
DIGITS_CNN = SAMPLES / "digits_cnn.pt"
DIGITS_IMAGES = SAMPLES / "digits_images.pt"
THIS = Path(__file__).resolve()


class LeastSquares(nn.Module):
    def __init__(self, n_in: int = 65, n_out: int = 4):
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)

    def forward(self, x):
        return self.fc(x)


def least_squares_case(tmp: Path, k: int = 4, seed: int = 0):
    """(model path, data path, arch spec, closed-form eigenvalues ascending) of the least-squares case."""
    from sklearn.datasets import load_diabetes
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    X = StandardScaler().fit_transform(load_diabetes().data)
    X = PolynomialFeatures(2, include_bias=False).fit_transform(X)
    N, d = X.shape
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(X, dtype=torch.float32)
    y = torch.randn(N, k, generator=g)
    torch.manual_seed(seed)
    model = LeastSquares(d, k)
    model_path, data_path = tmp / "ls_state_dict.pt", tmp / "ls_data.pt"
    torch.save(model.state_dict(), model_path)
    torch.save({"inputs": x, "targets": y}, data_path)
    A = np.hstack([x.double().numpy(), np.ones((N, 1))])  # the stored (float32) inputs
    w = np.linalg.eigvalsh(2.0 / (N * k) * A.T @ A)
    return model_path, data_path, f"{THIS}:LeastSquares", np.sort(np.repeat(w, k))


@functools.cache
def digits_truth():
    """(H float64 (P, P), eigenvalues ascending) of the digits MLP sample, from the dense float64 Hessian."""
    from hesscli.algorithms.dense import dense_hessian
    from hesscli.api import ModelSpec, open_session

    s = open_session(ModelSpec(str(DIGITS_MLP), data=[str(DIGITS)], dtype="float64"))
    r = dense_hessian(s.objective, mode="full")
    b = r.blocks[0]
    return b.hessian.numpy().astype(np.float64), np.asarray(b.eigenvalues, dtype=np.float64)


def wasserstein(nodes: np.ndarray, weights: np.ndarray, values: np.ndarray) -> float:
    """W1 between a weighted discrete distribution and the uniform one on ``values``."""
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(nodes, values, u_weights=weights))


def cli(capsys, *args) -> tuple[int, dict | None, str]:
    """Run ``hesscli ARGS --json`` in-process: (exit code, the JSON object or None, stderr)."""
    import json

    from hesscli.cli import main

    code = main([str(a) for a in args] + ["--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err



@contextlib.contextmanager
def one_thread():
    """Pin torch to one thread (restored afterwards): on a loaded 2-core machine the batched products
    were 10-60x slower with two competing OpenMP threads than with one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class MatOp(SymOperator):
    """A dense matrix behind the matrix-free interface, so that Lanczos, Hutch++ and SLQ run on it
    (a ``DenseOperator`` would be answered by dense linear algebra instead)."""

    def __init__(self, H):
        super().__init__()
        self.H = torch.as_tensor(H, dtype=torch.float64)
        self.n = self.H.shape[0]

    def _apply(self, V):
        return V @ self.H
