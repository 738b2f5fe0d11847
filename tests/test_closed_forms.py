"""``hesscli compute`` against closed forms, on real data that ships with scikit-learn.

Parameters of ``nn.Linear(d, k)`` in hesscli's order: the weight W (k, d) row-major (flat index
c·d + j), then the bias b (flat index k·d + c). Writing θ_{c,j} for j < d and θ_{c,d} = b_c, with
x̃_n = [x_n; 1]:

* least squares, PyTorch's mean mse over N samples and k outputs:
  ∂²L/∂θ_{c,j}∂θ_{c',j'} = 2/(N·k) · δ_{cc'} · Σ_n x̃_nj x̃_nj', i.e. H = 2/(N·k)·[X 1]ᵀ[X 1] ⊗ I_k up to
  the ordering, so every eigenvalue of 2/(N·k)·[X 1]ᵀ[X 1] appears exactly k times;
* softmax regression (cross entropy, mean over N), p_n = softmax(W x_n + b):
  ∂²L/∂θ_{c,j}∂θ_{c',j'} = (1/N) Σ_n (diag(p_n) − p_n p_nᵀ)_{cc'} · x̃_nj x̃_nj'.

Both in float64, to 1e-10 of max|H| (and of ‖H‖₂ for the eigenvalues).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ROOT, load_result
from models import Linear, save_state_dict
from reference import assert_close_matrix

sklearn_datasets = pytest.importorskip("sklearn.datasets")

ARCH = f"{ROOT / 'tests' / 'models.py'}:Linear"


def flat_index(c: int, j: int, d: int, k: int) -> int:
    """Position of θ_{c,j} (j = d: the bias b_c) in hesscli's flat vector."""
    return c * d + j if j < d else k * d + c


def to_flat(blocks: np.ndarray, d: int, k: int) -> np.ndarray:
    """blocks[c, j, c', j'] (j, j' ≤ d) → the P×P matrix in hesscli's order."""
    P = k * (d + 1)
    idx = np.array([[flat_index(c, j, d, k) for j in range(d + 1)] for c in range(k)])
    H = np.zeros((P, P))
    H[np.ix_(idx.reshape(-1), idx.reshape(-1))] = blocks.reshape(P, P)
    return H


def write_case(tmp_path, X: np.ndarray, Y: np.ndarray, k: int, seed: int = 0):
    """A Linear(d, k) with seeded weights (float64) and the data as one float64 shard."""
    torch.manual_seed(seed)
    model = Linear(X.shape[1], k).to(torch.float64)
    weights, shard = tmp_path / "linear.pt", tmp_path / "data.pt"
    save_state_dict(model, weights)
    torch.save({"inputs": torch.from_numpy(X), "targets": torch.from_numpy(Y)}, shard)
    W = model.lin.weight.detach().numpy()
    b = model.lin.bias.detach().numpy()
    return weights, shard, W, b


def run_compute(cli, tmp_path, weights, shard, d: int, k: int, *extra) -> tuple[dict, dict, dict]:
    out = tmp_path / "h.npz"
    r = cli("compute", weights, "--arch", ARCH, "--arch-kwargs", json.dumps({"d_in": d, "d_out": k}), "--data", shard,
            "-o", out, "--mode", "full", "--dtype", "float64", "--json", "--quiet", *extra)
    assert r.code == 0, r.err
    meta, arrays = load_result(out)
    return r.json, meta, arrays


def least_squares_data():
    X, y = sklearn_datasets.load_diabetes(return_X_y=True)
    y = (y - y.mean()) / y.std()
    # three real outputs: the disease progression, its square, and the (held-out) BMI feature
    Y = np.stack([y, y**2, X[:, 2] / X[:, 2].std()], axis=1)
    return np.ascontiguousarray(np.delete(X, 2, axis=1) / X.std(axis=0).mean()), np.ascontiguousarray(Y)


def test_least_squares_several_outputs(cli, tmp_path):
    X, Y = least_squares_data()
    N, d = X.shape
    k = Y.shape[1]
    weights, shard, _, _ = write_case(tmp_path, X, Y, k)
    summary, meta, arrays = run_compute(cli, tmp_path, weights, shard, d, k)
    assert meta["loss"] == "mse" and meta["n_loss_terms"] == N * k

    Xt = np.hstack([X, np.ones((N, 1))])
    A = 2.0 / (N * k) * Xt.T @ Xt  # (d+1, d+1)
    blocks = np.einsum("ab,ij->aibj", np.eye(k), A)  # δ_cc' A_jj'
    H = to_flat(blocks, d, k)
    assert_close_matrix(arrays["hessian"], H, 1e-10, "least squares hessian")

    # every eigenvalue of A exactly k times
    mu = np.linalg.eigvalsh(A)
    expected = np.sort(np.repeat(mu, k))
    ev = arrays["eigenvalues"]
    norm2 = float(np.abs(mu).max())
    assert np.abs(ev - expected).max() <= 1e-10 * norm2
    groups = ev.reshape(d + 1, k)
    assert np.ptp(groups, axis=1).max() <= 1e-10 * norm2  # each repeated k times ...
    gaps = np.diff(groups[:, 0])
    assert gaps.min() > 1e-6 * norm2  # ... and not more (the distinct values stay apart)
    assert float(arrays["trace"]) == pytest.approx(k * np.trace(A), rel=1e-10)
    assert summary["lambda_max"] == pytest.approx(mu[-1], rel=1e-10)
    assert summary["lambda_min"] == pytest.approx(mu[0], rel=1e-10)
    assert summary["n_negative"] == 0


def softmax_regression_hessian(X: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    N, d = X.shape
    k = W.shape[0]
    Z = X @ W.T + b
    Z -= Z.max(axis=1, keepdims=True)
    Pr = np.exp(Z)
    Pr /= Pr.sum(axis=1, keepdims=True)
    Xt = np.hstack([X, np.ones((N, 1))])
    S = np.einsum("na,ab->nab", Pr, np.eye(k)) - np.einsum("na,nb->nab", Pr, Pr)  # diag(p) − ppᵀ
    blocks = np.einsum("nab,ni,nj->aibj", S, Xt, Xt) / N
    return to_flat(blocks, d, k)


@pytest.mark.parametrize("name", ["iris", "wine"])
def test_softmax_regression(cli, tmp_path, name):
    X, y = getattr(sklearn_datasets, f"load_{name}")(return_X_y=True)
    X = np.ascontiguousarray((X - X.mean(axis=0)) / X.std(axis=0))
    k = int(y.max()) + 1
    weights, shard, W, b = write_case(tmp_path, X, y.astype(np.int64), k, seed=1)
    summary, meta, arrays = run_compute(cli, tmp_path, weights, shard, X.shape[1], k)
    assert meta["loss"] == "cross_entropy" and meta["n_loss_terms"] == len(y)

    H = softmax_regression_hessian(X, W, b)
    assert_close_matrix(arrays["hessian"], H, 1e-10, f"softmax regression ({name}) hessian")
    lam = np.linalg.eigvalsh(H)
    norm2 = float(np.abs(lam).max())
    assert np.abs(arrays["eigenvalues"] - lam).max() <= 1e-10 * norm2
    assert float(arrays["trace"]) == pytest.approx(np.trace(H), abs=1e-10 * np.abs(lam).sum())
    # H is positive semidefinite with the null space of the softmax's shift invariance: each
    # column of the weight and the bias can move together across classes (d + 1 zero eigenvalues)
    assert (np.abs(arrays["eigenvalues"]) <= 1e-10 * norm2).sum() == X.shape[1] + 1
    assert summary["n_negative"] == 0
    assert summary["lambda_max"] == pytest.approx(lam[-1], rel=1e-10)
