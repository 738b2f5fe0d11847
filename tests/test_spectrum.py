"""``hesscli spectrum``: block Lanczos on Hessian-vector products and eigh on result files, against
the dense float64 Hessian (``hesscli.algorithms.dense`` on the eager model) and closed forms."""

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
)

from hesscli.algorithms.lanczos import lanczos, select
from hesscli.algorithms.operators import DenseOperator


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def truth():
    return digits_truth()



def _spectrum_with_multiplicities(n=400, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = rng.standard_normal(n) * 0.3
    lam[:4], lam[4:8], lam[8:12] = 5.0, 4.5, -6.0
    return (Q * lam) @ Q.T, np.sort(lam)


@pytest.mark.parametrize("which", ["largest", "smallest", "both", "magnitude"])
def test_lanczos_finds_multiplicities(which):
    H, lam = _spectrum_with_multiplicities()
    r = lanczos(MatOp(H), k=10, which=which, tol=1e-10)
    want = np.sort(lam[select(lam, 10, which)])
    assert r.method == "block-lanczos" and r.converged.all()
    np.testing.assert_allclose(r.eigenvalues, want, atol=1e-9 * 6)
    # the reported residuals are measured: recompute them from the vectors
    r = lanczos(MatOp(H), k=10, which=which, tol=1e-10, eigenvectors=True)
    res = np.linalg.norm(H @ r.eigenvectors - r.eigenvectors * r.eigenvalues, axis=0)
    np.testing.assert_allclose(r.residuals, res, atol=1e-12)


def test_dense_operator_uses_eigh():
    H, lam = _spectrum_with_multiplicities(60)
    r = lanczos(DenseOperator(H), k=5, which="smallest")
    assert r.method == "dense" and r.matvecs == 0
    np.testing.assert_allclose(r.eigenvalues, lam[:5], atol=1e-12)


def _rel_err(found, ref, norm):
    return np.abs(np.asarray(found) - ref).max() / norm


@pytest.mark.slow  # whole sample checkpoints (the digits MLP's dense truth, the CNN per block): make test
def test_digits_float64_top20_and_bottom5(truth, tmp_path, capsys):
    H, ev = truth
    norm = np.abs(ev).max()
    code, js, err = cli(capsys, "spectrum", DIGITS_MLP, "--data", DIGITS, "--dtype", "float64", "--top-k", 20,
                        "--eigenvectors", "-o", tmp_path / "top.npz")
    assert code == 0, err
    assert js["status"] == "ok" and js["command"] == "spectrum" and all(js["converged"])
    assert _rel_err(js["eigenvalues"], ev[-20:], norm) <= 1e-8
    assert abs(js["norm_estimate"] - norm) <= 1e-8 * norm
    # residuals are what they say: ‖Hv − λv‖ against the dense truth
    with np.load(tmp_path / "top.npz", allow_pickle=False) as z:
        V, lam, res = z["eigenvectors"], z["eigenvalues"], z["residuals"]
        assert V.shape == (H.shape[0], 20) and z["converged"].all() and int(z["matvecs"]) == js["matvecs"]
    np.testing.assert_allclose(np.linalg.norm(H @ V - V * lam, axis=0), res, atol=1e-9 * norm)
    assert (res <= 1e-6 * norm).all()
    assert js["symmetry_probe"] < 1e-8 and js["symmetry_probe_hvps"] > 0
    code, js, err = cli(capsys, "spectrum", DIGITS_MLP, "--data", DIGITS, "--dtype", "float64", "--top-k", 5,
                        "--which", "smallest", "-o", tmp_path / "bottom.npz")
    assert code == 0, err
    assert _rel_err(js["eigenvalues"], ev[:5], norm) <= 1e-8


@pytest.mark.slow  # whole sample checkpoints (the digits MLP's dense truth, the CNN per block): make test
def test_digits_float32_within_1e5(truth, tmp_path, capsys):
    _, ev = truth
    norm = np.abs(ev).max()
    code, js, err = cli(capsys, "spectrum", DIGITS_MLP, "--data", DIGITS, "--which", "both", "--top-k", 10,
                        "-o", tmp_path / "s.npz")
    assert code == 0, err
    assert js["dtype"] == "float32"
    assert _rel_err(js["eigenvalues"], np.concatenate([ev[:5], ev[-5:]]), norm) <= 1e-5
    code, js, err = cli(capsys, "spectrum", DIGITS_MLP, "--data", DIGITS, "--top-k", 20, "-o", tmp_path / "t.npz")
    assert code == 0, err
    assert _rel_err(js["eigenvalues"], ev[-20:], norm) <= 1e-5
    assert "spectrum (largest, top 20)" in err and "wrote" in err


def test_least_squares_multiplicity_four(tmp_path, capsys):
    model, data, arch, lam = least_squares_case(tmp_path)
    code, js, err = cli(capsys, "spectrum", model, "--arch", arch, "--data", data, "--dtype", "float64", "--top-k", 8,
                        "-o", tmp_path / "s.npz")
    assert code == 0, err
    assert js["method"] == "block-lanczos"
    top2 = np.unique(np.round(lam[-8:], 8))
    assert len(top2) == 2  # the closed form: the top two eigenvalues, four times each
    np.testing.assert_allclose(js["eigenvalues"], np.repeat(lam[-8:][::4], 4), rtol=1e-9)


@pytest.mark.slow  # whole sample checkpoints (the digits MLP's dense truth, the CNN per block): make test
def test_result_file_full_and_block(tmp_path, capsys, monkeypatch):
    model, data, arch, lam = least_squares_case(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "compute", model, "--arch", arch, "--data", data, "--dtype", "float64")
    assert code == 0, err
    code, js, err = cli(capsys, "spectrum", "--top-k", 6, "--which", "magnitude")  # SOURCE = ./hessian.npz
    assert code == 0, err
    # the stored eigenvalues, no eigendecomposition (tests/test_issue13_bugs.py counts the calls)
    assert js["source"]["kind"] == "result" and js["method"] == "stored" and js["matvecs"] == 0
    np.testing.assert_allclose(js["eigenvalues"], lam[-6:], rtol=1e-10)
    assert js["residuals"] == [None] * 6 and all(js["converged"])  # not measured without stored eigenvectors
    # with --eigenvectors the matrix is decomposed and the residuals are measured against it
    code, js, err = cli(capsys, "spectrum", "--top-k", 6, "--which", "magnitude", "--eigenvectors", "-o", "sv.npz")
    assert code == 0, err
    assert js["method"] == "dense"
    np.testing.assert_allclose(js["eigenvalues"], lam[-6:], rtol=1e-10)
    assert (np.array(js["residuals"]) <= 1e-12 * lam[-1]).all()
    # a block-mode file answers per block and says so
    code, _, err = cli(capsys, "compute", DIGITS_CNN, "--data", DIGITS_IMAGES, "--dtype", "float64", "--mode", "block",
                       "-o", "blocks.npz")
    assert code == 0, err
    code, js, err = cli(capsys, "spectrum", "blocks.npz", "--top-k", 3, "-o", "sb.npz")
    assert code == 0, err
    assert js["approximation"] == "block-diagonal" and len(js["blocks"]) == 3
    with np.load("blocks.npz") as z, np.load("sb.npz") as s:
        for b in js["blocks"]:
            np.testing.assert_allclose(s[f"blocks/{b['name']}/eigenvalues"], z[f"blocks/{b['name']}/eigenvalues"][-3:], rtol=1e-12)
        allev = np.sort(np.concatenate([z[f"blocks/{b['name']}/eigenvalues"] for b in js["blocks"]]))
        np.testing.assert_allclose(s["eigenvalues"], allev[-3:], rtol=1e-12)


@pytest.mark.slow  # whole sample checkpoints (the digits MLP's dense truth, the CNN per block): make test
def test_per_block_equals_dense_blocks(tmp_path, capsys):
    """--per-block on the model (Lanczos on each module's diagonal block) = eigh of compute --mode block."""
    code, _, err = cli(capsys, "compute", DIGITS_CNN, "--data", DIGITS_IMAGES, "--dtype", "float64", "--mode", "block",
                       "-o", tmp_path / "blocks.npz")
    assert code == 0, err
    code, js, err = cli(capsys, "spectrum", DIGITS_CNN, "--data", DIGITS_IMAGES, "--dtype", "float64", "--per-block",
                        "--which", "both", "--top-k", 4, "-o", tmp_path / "pb.npz")
    assert code == 0, err
    assert [b["name"] for b in js["blocks"]] == ["conv1", "conv2", "fc"]
    assert {b["method"] for b in js["blocks"]} == {"dense", "block-lanczos"}  # conv1 (40) is assembled
    with np.load(tmp_path / "blocks.npz") as z, np.load(tmp_path / "pb.npz") as s:
        for b in js["blocks"]:
            ev = z[f"blocks/{b['name']}/eigenvalues"]
            norm = np.abs(ev).max()
            want = np.concatenate([ev[:2], ev[-2:]])
            assert np.abs(s[f"blocks/{b['name']}/eigenvalues"] - want).max() <= 1e-8 * norm
    assert "spectrum per block" in err


def test_not_converged_exit_4_and_usage_errors(tmp_path, capsys, monkeypatch):
    out = tmp_path / "s.npz"
    code, js, err = cli(capsys, "spectrum", DIGITS_MLP, "--data", DIGITS, "--top-k", 10, "--max-matvecs", 16,
                        "-o", out)
    assert code == 4 and js["status"] == "not_converged" and not all(js["converged"])
    with np.load(out) as z:
        assert not z["converged"].all()
    code, _, err = cli(capsys, "spectrum", DIGITS_MLP, "--data", DIGITS, "-o", out)
    assert code == 1 and "exists" in err  # never overwritten without --force
    code, _, err = cli(capsys, "spectrum", "--data", DIGITS)
    assert code == 2 and "--data without SOURCE" in err
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "spectrum")
    assert code == 1 and "no hessian.npz" in err
    code, _, err = cli(capsys, "spectrum", DIGITS_MLP)
    assert code == 2 and "--data" in err
    code, _, err = cli(capsys, "spectrum", DIGITS_MLP, "--data", DIGITS, "--which", "middle")
    assert code == 2


def test_symmetry_probe_stops_matrix_free_work(tmp_path, capsys, monkeypatch):
    from hesscli.objective.core import Objective

    monkeypatch.setattr(Objective, "symmetry_probe", lambda self, seed=0, **kw: (0.5, "fc1.weight / fc2.weight"))
    code, js, err = cli(capsys, "trace", DIGITS_MLP, "--data", DIGITS, "-o", tmp_path / "t.npz")
    assert code == 1 and "fc1.weight / fc2.weight" in err and "not symmetric" in err
    assert not (tmp_path / "t.npz").exists()


@pytest.mark.slow  # the digits MLP's dense truth: make test
@pytest.mark.parametrize(
    "model,extra",
    [
        ("digits_mlp.pt2", []),
        ("digits_mlp.safetensors", ["--trust-code"]),
        ("digits_mlp_state_dict.pt", ["--arch", "sample_checkpoints/archs.py:DigitsMLP"]),
    ],
)
def test_every_model_format(truth, tmp_path, capsys, monkeypatch, model, extra):
    from mf_models import ROOT, SAMPLES

    _, ev = truth
    monkeypatch.chdir(ROOT)
    code, js, err = cli(capsys, "spectrum", SAMPLES / model, *extra, "--data", DIGITS, "--dtype", "float64",
                        "--top-k", 3, "-o", tmp_path / "s.npz")
    assert code == 0, err
    assert _rel_err(js["eigenvalues"], ev[-3:], np.abs(ev).max()) <= 1e-8
