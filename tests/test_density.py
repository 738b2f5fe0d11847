"""``hesscli density``: stochastic Lanczos quadrature against the dense float64 eigenvalues."""

from __future__ import annotations

import numpy as np
import pytest
from mf_models import (
    DIGITS,
    DIGITS_CNN,
    DIGITS_IMAGES,
    DIGITS_MLP,
    MatOp,
    cli,
    digits_truth,
    least_squares_case,
    one_thread,
    wasserstein,
)

from hesscli.algorithms.density import slq, smooth, text_histogram


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def truth():
    return digits_truth()



def test_quadrature_is_exact_with_n_steps():
    """With as many steps as dimensions, the Gauss quadrature reproduces vᵀf(H)v: its nodes are the
    eigenvalues and its moments those of the start vector, here the trace for every polynomial."""
    rng = np.random.default_rng(0)
    n = 24
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.linspace(-1, 3, n)
    H = (Q * lam) @ Q.T
    nodes, weights = slq(MatOp(H), runs=3, steps=n, seed=1)
    for r in range(3):
        ok = weights[r] > 1e-14
        assert np.abs(nodes[r][ok][:, None] - lam[None, :]).min(1).max() < 1e-9
        assert weights[r].sum() == pytest.approx(1.0, abs=1e-12)
    # Σ τ θ^p = vᵀH^p v: E over Rademacher v/√n is tr(H^p)/n; with 3 runs check p = 1 against Hutchinson's bound
    m1 = (nodes * np.nan_to_num(weights)).sum(1)
    assert abs(m1.mean() - lam.mean()) < 4 * np.abs(lam).max() / np.sqrt(3 * n)


def test_smooth_integrates_to_one_and_histogram():
    grid = np.linspace(-1.25, 1, 2251)
    d = smooth(np.array([[-0.75, 0.2]]), np.array([[0.25, 0.75]]), 0.05, grid)
    assert np.trapezoid(d, grid) == pytest.approx(1.0, abs=1e-9)
    assert np.trapezoid(d * grid, grid) == pytest.approx(-0.75 * 0.25 + 0.2 * 0.75, abs=1e-9)
    text = text_histogram(grid[250:], d[250:], bins=4)
    lines = text.splitlines()
    assert len(lines) == 4 and "75.00%" in lines[2] and "25.00%" in lines[0]


@pytest.mark.slow  # whole sample checkpoints (the digits MLP's dense truth, the CNN per block): make test
def test_digits_wasserstein(truth, tmp_path, capsys):
    _, ev = truth
    code, js, err = cli(capsys, "density", DIGITS_MLP, "--data", DIGITS, "--plot", tmp_path / "esd.png",
                        "-o", tmp_path / "d.npz")
    assert code == 0, err
    assert js["method"] == "slq" and js["matvecs"] == 10 * 80 and js["runs"] == 10 and js["steps"] == 80
    with np.load(tmp_path / "d.npz") as z:
        grid, dens = z["density_grid"], z["density"]
        nodes, weights = z["slq_nodes"], z["slq_weights"]
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=1e-4)  # tails beyond ±4σ of the extremes
    span = ev[-1] - ev[0]
    w_grid = wasserstein(grid, dens, ev)
    assert w_grid <= 0.02 * span
    ok = np.isfinite(nodes)
    assert wasserstein(nodes[ok], weights[ok], ev) <= 0.02 * span
    assert abs(js["lambda_max"] - ev[-1]) <= 1e-4 * span and abs(js["lambda_min"] - ev[0]) <= 1e-2 * span
    assert (tmp_path / "esd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mass per bin" in err and "│" in err


@pytest.mark.slow  # whole sample checkpoints (the digits MLP's dense truth, the CNN per block): make test
def test_result_file_is_exact_and_per_block(tmp_path, capsys, monkeypatch):
    model, data, arch, lam = least_squares_case(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "compute", model, "--arch", arch, "--data", data, "--dtype", "float64")
    assert code == 0, err
    code, js, err = cli(capsys, "density", "--steps", 40)
    assert code == 0, err
    assert js["method"] == "dense" and js["matvecs"] == 0 and js["steps"] is None  # --steps does not apply
    with np.load("density.npz") as z:
        sigma = float(z["sigma"])
        assert sigma == pytest.approx((lam[-1] - lam[0]) / 160)  # the default resolution, whatever --steps says
        np.testing.assert_allclose(z["density"], smooth(lam[None], np.full((1, len(lam)), 1 / len(lam)), sigma,
                                                         z["density_grid"]), rtol=1e-10, atol=1e-12)
    # per block on a model = the blocks' eigenvalue distributions (compute --mode block)
    code, _, err = cli(capsys, "compute", DIGITS_CNN, "--data", DIGITS_IMAGES, "--mode", "block", "-o", "blocks.npz")
    assert code == 0, err
    code, js, err = cli(capsys, "density", DIGITS_CNN, "--data", DIGITS_IMAGES, "--per-block", "-o", "pb.npz")
    assert code == 0, err
    with np.load("blocks.npz") as z, np.load("pb.npz") as s:
        for b in js["blocks"]:
            ev = z[f"blocks/{b['name']}/eigenvalues"]
            g, d = s[f"blocks/{b['name']}/density_grid"], s[f"blocks/{b['name']}/density"]
            assert wasserstein(g, d, ev) <= 0.02 * (ev[-1] - ev[0])
    assert "density per block" in err
    code, _, err = cli(capsys, "density", "--runs", 0, "-o", "x.npz")
    assert code == 2
