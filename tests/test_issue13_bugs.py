"""Issue 13, the bugs: per-block answers labelled block-diagonal, XTrace on a singular sketch,
``density`` of a result file independent of ``--steps``, ``spectrum`` of a stored full-mode result
answered from its stored eigenvalues without any eigendecomposition."""

from __future__ import annotations

import json
import math
from pathlib import Path

import bad_models as bm
import numpy as np
import pytest
import torch
from mf_models import MatOp, cli, least_squares_case, one_thread

from hesscli.algorithms.trace import estimate_trace

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"
DIABETES_MLP = SAMPLES / "diabetes_mlp.pt2"
DIABETES = SAMPLES / "diabetes.pt"
BAD = Path(bm.__file__).resolve()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _meta(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["meta"][()]))


def _arrays(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k != "meta"}


# ---------------------------------------------------------------------------------------------
# 1. per-block answers say they are the block-diagonal part's


def test_spectrum_per_block_on_model_is_labelled_block_diagonal(tmp_path, capsys):
    out = tmp_path / "pb.npz"
    code, js, err = cli(capsys, "spectrum", DIABETES_MLP, "--data", DIABETES, "--per-block", "--top-k", 2, "-o", out)
    assert code == 0, err
    assert js["approximation"] == "block-diagonal" and js["per_block"] is True
    assert _meta(out)["approximation"] == "block-diagonal"
    # the human table says whose eigenvalues these are
    text = " ".join(err.split())  # Rich wraps long lines
    assert "eigenvalues of the diagonal blocks, not of H" in text and "approximation: block-diagonal" in text
    # ... and the whole Hessian's answer is not labelled
    code, js, err = cli(capsys, "spectrum", DIABETES_MLP, "--data", DIABETES, "--top-k", 2, "-o", tmp_path / "all.npz")
    assert code == 0, err
    assert js["approximation"] is None and _meta(tmp_path / "all.npz")["approximation"] is None
    assert "block-diagonal" not in err


@pytest.mark.parametrize("command,extra", [("trace", ["--method", "exact"]), ("density", ["--runs", "2", "--steps", "10"])])
def test_trace_and_density_per_block_are_labelled(tmp_path, capsys, command, extra):
    out = tmp_path / "pb.npz"
    code, js, err = cli(capsys, command, DIABETES_MLP, "--data", DIABETES, "--per-block", *extra, "-o", out)
    assert code == 0, err
    assert js["approximation"] == "block-diagonal" and _meta(out)["approximation"] == "block-diagonal"
    assert "block-diagonal" in err


def test_per_block_of_a_full_result_file_is_labelled(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "compute", DIABETES_MLP, "--data", DIABETES, "--dtype", "float64")
    assert code == 0, err
    code, js, err = cli(capsys, "spectrum", "--per-block", "--top-k", 2, "-o", "pb.npz")
    assert code == 0, err
    assert js["approximation"] == "block-diagonal" and _meta("pb.npz")["approximation"] == "block-diagonal"
    code, js, err = cli(capsys, "show", "pb.npz")
    assert code == 0, err
    assert js["approximation"] == "block-diagonal"


# ---------------------------------------------------------------------------------------------
# 2. XTrace on an exactly singular sketch


def test_xtrace_zero_operator_is_zero():
    r = estimate_trace(MatOp(np.zeros((40, 40))), "xtrace", 20, 0)
    assert r.trace == 0.0 and r.stderr == 0.0


def test_xtrace_rank_deficient_operator_is_exact():
    """H of rank 5 < m/2 = 10 test vectors: the sketch spans range(H), so every leave-one-out
    estimate is tr H (the sketch is exactly singular; R⁻ᵀ does not exist)."""
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((60, 60)))
    lam = np.zeros(60)
    lam[:5] = [3.0, 2.0, 1.0, -1.0, 0.5]
    H = (Q * lam) @ Q.T
    r = estimate_trace(MatOp(H), "xtrace", 20, 1)
    assert math.isfinite(r.trace) and math.isfinite(r.stderr)
    assert abs(r.trace - lam.sum()) <= 1e-10 * np.abs(lam).sum()
    assert r.stderr <= 1e-10 * np.abs(lam).sum()
    assert r.matvecs == 20  # all m products, whatever the rank (torchrun ranks stay in step)


def test_xtrace_per_block_with_a_block_without_gradient(tmp_path, capsys):
    """``extra`` gets no gradient: its diagonal block is zero, XTrace says 0 ± 0 (not NaN)."""
    torch.manual_seed(0)
    model = tmp_path / "unused.pt"
    bm.save_state(bm.Unused(), model)
    g = torch.Generator().manual_seed(0)
    data = tmp_path / "data.pt"
    torch.save({"inputs": torch.randn(16, 3, generator=g), "targets": torch.randint(0, 2, (16,), generator=g)}, data)
    out = tmp_path / "t.npz"
    code, js, err = cli(capsys, "trace", model, "--arch", f"{BAD}:Unused", "--data", data, "--dtype", "float64",
                        "--per-block", "--method", "xtrace", "--matvecs", 8, "-o", out)
    assert code == 0, err
    extra = next(b for b in js["blocks"] if b["name"] == "extra")
    assert extra["trace"] == 0.0 and extra["stderr"] == 0.0
    assert js["trace"] is not None and js["trace_stderr"] is not None  # JSON null would mean NaN
    a = _arrays(out)
    assert np.isfinite(a["trace"]) and np.isfinite(a["trace_stderr"])
    assert float(a["blocks/extra/trace"]) == 0.0


# ---------------------------------------------------------------------------------------------
# 3. density of a result file does not depend on --steps


def _timeless(x):
    """meta without what differs between two runs of the same work (times, the command line)."""
    if isinstance(x, dict):
        return {k: _timeless(v) for k, v in x.items() if k not in ("command_line", "created", "seconds")}
    if isinstance(x, list):
        return [_timeless(v) for v in x]
    return x


def test_density_of_result_file_ignores_steps(tmp_path, capsys, monkeypatch):
    model, data, arch, lam = least_squares_case(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "compute", model, "--arch", arch, "--data", data, "--dtype", "float64")
    assert code == 0, err
    runs = {}
    for steps in (5, 40, 200):
        code, js, err = cli(capsys, "density", "--steps", steps, "-o", f"d{steps}.npz")
        assert code == 0, err
        assert js["method"] == "dense" and js["steps"] is None and js["runs"] is None
        assert any("--steps" in n and "do not apply" in n for n in js["notes"])
        runs[steps] = (_arrays(f"d{steps}.npz"), _meta(f"d{steps}.npz"), js)
    first, meta, _ = runs[5]
    assert meta["steps"] is None and any("do not apply" in n for n in meta["notes"])
    for steps in (40, 200):
        a, m, _ = runs[steps]
        assert sorted(a) == sorted(first)
        for k in first:
            assert a[k].tobytes() == first[k].tobytes(), f"'{k}' depends on --steps"
        assert _timeless(m) == _timeless(meta)
    # the exact eigenvalues smoothed at the default resolution (σ = range / 160)
    assert float(first["sigma"]) == pytest.approx((lam[-1] - lam[0]) / 160)


def test_density_per_block_of_result_file_ignores_steps(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "compute", DIABETES_MLP, "--data", DIABETES, "--mode", "block", "-o", "b.npz")
    assert code == 0, err
    dens = []
    for steps in (5, 80):
        code, js, err = cli(capsys, "density", "b.npz", "--steps", steps, "-o", f"d{steps}.npz")
        assert code == 0, err
        assert js["approximation"] == "block-diagonal"
        dens.append(_arrays(f"d{steps}.npz"))
    for k in dens[0]:
        assert dens[0][k].tobytes() == dens[1][k].tobytes(), k


# ---------------------------------------------------------------------------------------------
# 4. spectrum of a stored result answers from the stored eigenvalues


def _refuse_eigensolvers(m: pytest.MonkeyPatch) -> None:
    """Every eigensolver that could be reached raises: a call fails the test (counted, not timed)."""
    import scipy.linalg
    import scipy.sparse.linalg

    import hesscli.algorithms.lanczos

    def refuse(*a, **k):
        raise AssertionError("an eigendecomposition was computed")

    for mod, names in ((torch.linalg, ("eigh", "eigvalsh", "eig", "eigvals")),
                       (torch, ("lobpcg",)),
                       (np.linalg, ("eigh", "eigvalsh", "eig", "eigvals")),
                       (scipy.linalg, ("eigh", "eigvalsh", "eig")),
                       (scipy.sparse.linalg, ("eigsh", "eigs", "lobpcg")),
                       (hesscli.algorithms.lanczos, ("dense_eigs", "lanczos"))):
        for name in names:
            m.setattr(mod, name, refuse)


def _compute_full(out: Path, *extra) -> tuple[Path, np.ndarray]:
    from hesscli.cli import main

    argv = ["compute", DIABETES_MLP, "--data", DIABETES, "--dtype", "float64", "--mode", "full", *extra, "-q", "-o", out]
    assert main([str(a) for a in argv]) == 0
    return out, _arrays(out)["eigenvalues"]


@pytest.fixture(scope="module")
def stored_full(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """The diabetes sample's full-mode float64 result (matrix and eigenvalues, no eigenvectors)."""
    return _compute_full(tmp_path_factory.mktemp("stored") / "h.npz")


def _stored(tmp_path, capsys, *extra) -> tuple[Path, np.ndarray]:
    return _compute_full(tmp_path / "h_vec.npz", *extra)


@pytest.mark.parametrize("which", ["largest", "smallest", "both", "magnitude"])
def test_spectrum_of_stored_full_result_does_no_eigendecomposition(tmp_path, capsys, monkeypatch, stored_full, which):
    from hesscli.algorithms.lanczos import select

    h, ev = stored_full
    with monkeypatch.context() as m:
        _refuse_eigensolvers(m)
        code, js, err = cli(capsys, "spectrum", h, "--top-k", 5, "--which", which, "-o", tmp_path / "s.npz")
    assert code == 0, err
    np.testing.assert_array_equal(js["eigenvalues"], ev[select(ev, 5, which)])
    assert js["method"] == "stored" and js["matvecs"] == 0 and all(js["converged"])
    assert js["residuals"] == [None] * 5  # not measured without stored eigenvectors: null, not a made-up number
    assert js["norm_estimate"] == float(np.abs(ev).max())
    assert any("read from the result file" in n for n in js["notes"])
    a = _arrays(tmp_path / "s.npz")
    assert np.isnan(a["residuals"]).all() and a["converged"].all()
    assert "read from the result file" in err and "nan" not in err


def test_spectrum_of_stored_block_result_does_no_eigendecomposition(tmp_path, capsys, monkeypatch):
    out = tmp_path / "b.npz"
    code, _, err = cli(capsys, "compute", DIABETES_MLP, "--data", DIABETES, "--mode", "block", "-o", out)
    assert code == 0, err
    stored = _arrays(out)
    with monkeypatch.context() as m:
        _refuse_eigensolvers(m)
        code, js, err = cli(capsys, "spectrum", out, "--top-k", 2, "-o", tmp_path / "s.npz")
    assert code == 0, err
    assert js["approximation"] == "block-diagonal"
    for b in js["blocks"]:
        np.testing.assert_array_equal(b["eigenvalues"], stored[f"blocks/{b['name']}/eigenvalues"][-2:])


def test_stored_eigenvectors_measure_residuals(tmp_path, capsys, monkeypatch):
    h, ev = _stored(tmp_path, capsys, "--eigenvectors")
    with monkeypatch.context() as m:
        m.setattr(torch.linalg, "eigh", lambda *a, **k: pytest.fail("eigh called"))
        m.setattr(torch.linalg, "eigvalsh", lambda *a, **k: pytest.fail("eigvalsh called"))
        code, js, err = cli(capsys, "spectrum", h, "--top-k", 3, "--eigenvectors", "-o", tmp_path / "s.npz")
    assert code == 0, err
    norm = np.abs(ev).max()
    np.testing.assert_array_equal(js["eigenvalues"], ev[-3:])
    res = np.array(js["residuals"], dtype=float)
    assert np.isfinite(res).all() and (res <= 1e-12 * norm).all()
    a, H = _arrays(tmp_path / "s.npz"), _arrays(h)["hessian"]
    V = a["eigenvectors"]
    np.testing.assert_allclose(np.linalg.norm(H @ V - V * a["eigenvalues"], axis=0), a["residuals"], atol=1e-13 * norm)


def test_eigenvectors_of_stored_result_without_vectors_still_work(tmp_path, capsys, stored_full):
    """--eigenvectors on a file that stores none needs the matrix: eigh, with measured residuals."""
    h, ev = stored_full
    code, js, err = cli(capsys, "spectrum", h, "--top-k", 3, "--eigenvectors", "-o", tmp_path / "s.npz")
    assert code == 0, err
    assert js["method"] == "dense"
    np.testing.assert_allclose(js["eigenvalues"], ev[-3:], rtol=1e-12)
    assert all(r is not None and r <= 1e-12 * np.abs(ev).max() for r in js["residuals"])


def test_no_dense_result_answers_from_stored_eigenvalues(tmp_path, capsys):
    out = tmp_path / "nd.npz"
    code, _, err = cli(capsys, "compute", DIABETES_MLP, "--data", DIABETES, "--dtype", "float64", "--mode", "full",
                       "--no-dense", "-o", out)
    assert code == 0, err
    ev = _arrays(out)["eigenvalues"]
    code, js, err = cli(capsys, "spectrum", out, "--top-k", 2, "-o", tmp_path / "s.npz")
    assert code == 0, err
    np.testing.assert_array_equal(js["eigenvalues"], ev[-2:])
    code, _, err = cli(capsys, "spectrum", out, "--top-k", 2, "--eigenvectors", "-o", tmp_path / "s2.npz")
    assert code == 1 and "needs the matrix" in err
