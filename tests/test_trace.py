"""``hesscli trace``: exact, Hutchinson, Hutch++ and XTrace, against the dense float64 Hessian and
brute-force definitions; the standard errors are checked by covering the truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch
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

from hesscli.algorithms.operators import HessianOperator
from hesscli.algorithms.trace import _xtrace, choose_method, estimate_trace
from hesscli.api import ModelSpec, open_session
from hesscli.runtime.progress import NullProgress


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def truth():
    return digits_truth()



def _decaying(n=300, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = 1.0 / np.arange(1, n + 1) * rng.choice([-1.0, 1.0], n) + 0.01
    return (Q * lam) @ Q.T, lam.sum()


def test_xtrace_closed_form_equals_leave_one_out_definition():
    """XTrace's downdating formula = the definition: Q_i = orth(HΩ without column i)."""
    H, _ = _decaying(80)
    gen = torch.Generator().manual_seed(3)
    est, se, s = _xtrace(MatOp(H), 20, gen, NullProgress())
    gen = torch.Generator().manual_seed(3)
    Om = torch.randn(10, 80, generator=gen, dtype=torch.float64)
    Om = Om * (np.sqrt(80) / Om.norm(dim=1, keepdim=True))
    Ht = torch.as_tensor(H)
    Y = (Om @ Ht).T
    ests = []
    for i in range(10):
        Qi, _ = torch.linalg.qr(torch.cat([Y[:, :i], Y[:, i + 1 :]], 1))
        r = Om[i] - Qi @ (Qi.T @ Om[i])
        ests.append(float(torch.trace(Qi.T @ Ht @ Qi) + r @ Ht @ r))
    assert s == 10
    assert est == pytest.approx(np.mean(ests), rel=1e-10)
    assert se == pytest.approx(np.std(ests, ddof=1) / np.sqrt(10), rel=1e-8)


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp", "xtrace"])
def test_estimators_unbiased_and_stderr_covers(method):
    H, tr = _decaying()
    ests, covered = [], 0
    for seed in range(40):
        r = estimate_trace(MatOp(H), method, 60, seed)
        assert r.matvecs == 60 and r.method == method
        ests.append(r.trace)
        covered += abs(r.trace - tr) <= 2 * r.stderr
    ests = np.array(ests)
    # unbiased: the mean over seeds is within 4 standard errors of the mean
    assert abs(ests.mean() - tr) <= 4 * ests.std(ddof=1) / np.sqrt(len(ests))
    assert covered >= 32  # about 95% expected


@pytest.mark.slow  # whole sample checkpoints (the digits MLP's dense truth, the CNN per block): make test
def test_exact_float64_matches_dense(truth, tmp_path, capsys):
    """--params fc2|fc3 selects the last 1,386 parameters: H restricted to them is the dense truth's
    trailing principal submatrix."""
    H, _ = truth
    sub = H[-1386:, -1386:]
    ev = np.linalg.eigvalsh(sub)
    code, js, err = cli(capsys, "trace", DIGITS_MLP, "--data", DIGITS, "--dtype", "float64", "--method", "exact",
                        "--params", "fc2|fc3", "-o", tmp_path / "t.npz")
    assert code == 0, err
    assert js["method"] == "exact" and js["matvecs"] == 1386 and js["trace_stderr"] == 0
    assert abs(js["trace"] - np.trace(sub)) <= 1e-10 * np.abs(ev).sum()
    with np.load(tmp_path / "t.npz") as z:
        assert float(z["trace"]) == js["trace"] and int(z["matvecs"]) == 1386


@pytest.mark.slow  # whole sample checkpoints (the digits MLP's dense truth, the CNN per block): make test
def test_hutchpp_digits_10_seeds(truth, tmp_path, capsys):
    """Hutch++ at 300 products: mean relative error ≤ 2e-3, |est − truth| ≤ 2·stderr in ≥ 8 of 10 seeds."""
    _, ev = truth
    tr = ev.sum()
    obj = open_session(ModelSpec(str(DIGITS_MLP), data=[str(DIGITS)])).objective
    errs, covered = [], 0
    for seed in range(10):
        r = estimate_trace(HessianOperator(obj), "hutchpp", 300, seed)
        assert r.matvecs == 300
        errs.append(abs(r.trace - tr) / abs(tr))
        covered += abs(r.trace - tr) <= 2 * r.stderr
    assert np.mean(errs) <= 2e-3
    assert covered >= 8
    # the CLI reports the same estimator, chosen by auto since P > --matvecs
    code, js, err = cli(capsys, "trace", DIGITS_MLP, "--data", DIGITS, "--seed", 3, "-o", tmp_path / "t.npz")
    assert code == 0, err
    assert js["method"] == "hutchpp" and js["method_requested"] == "auto" and "auto chose hutchpp" in err
    assert js["matvecs"] == 300 and abs(js["trace"] - tr) <= 5 * js["trace_stderr"]


@pytest.mark.slow  # whole sample checkpoints (the digits MLP's dense truth, the CNN per block): make test
def test_xtrace_and_hutchinson_on_digits(truth, tmp_path, capsys):
    _, ev = truth
    tr = ev.sum()
    for method in ("xtrace", "hutchinson"):
        code, js, err = cli(capsys, "trace", DIGITS_MLP, "--data", DIGITS, "--method", method, "--matvecs", 200,
                            "-o", tmp_path / f"{method}.npz")
        assert code == 0, err
        assert js["method"] == method and js["matvecs"] == 200
        assert 0 < js["trace_stderr"] and abs(js["trace"] - tr) <= 5 * js["trace_stderr"]


def test_auto_exact_when_small_and_result_files(tmp_path, capsys, monkeypatch):
    model, data, arch, lam = least_squares_case(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, js, err = cli(capsys, "trace", model, "--arch", arch, "--data", data, "--dtype", "float64")
    assert code == 0, err
    assert js["method"] == "exact" and js["matvecs"] == len(lam)  # P = 264 ≤ 300
    assert abs(js["trace"] - lam.sum()) <= 1e-10 * np.abs(lam).sum()
    assert choose_method("auto", 1000, 300, False) == "hutchpp"
    code, _, err = cli(capsys, "compute", model, "--arch", arch, "--data", data, "--dtype", "float64")
    assert code == 0, err
    code, js, err = cli(capsys, "trace", "--method", "hutchpp", "-o", "tr2.npz")  # the stored matrix
    assert code == 0, err
    assert js["source"]["kind"] == "result" and js["matvecs"] == 300
    code, js, err = cli(capsys, "trace", "-o", "tr3.npz")  # auto on a stored matrix: exact, no products
    assert code == 0, err
    assert js["method"] == "exact" and js["matvecs"] == 0
    assert abs(js["trace"] - lam.sum()) <= 1e-10 * np.abs(lam).sum()
    code, _, err = cli(capsys, "trace", "--method", "nope", "-o", "x.npz")
    assert code == 2


@pytest.mark.slow  # whole sample checkpoints (the digits MLP's dense truth, the CNN per block): make test
def test_per_block_equals_dense_blocks(tmp_path, capsys):
    code, _, err = cli(capsys, "compute", DIGITS_CNN, "--data", DIGITS_IMAGES, "--dtype", "float64", "--mode", "block",
                       "-o", tmp_path / "blocks.npz")
    assert code == 0, err
    code, js, err = cli(capsys, "trace", DIGITS_CNN, "--data", DIGITS_IMAGES, "--dtype", "float64", "--per-block",
                        "--method", "exact", "-o", tmp_path / "pb.npz")
    assert code == 0, err
    with np.load(tmp_path / "blocks.npz") as z, np.load(tmp_path / "pb.npz") as s:
        names = [str(n) for n in z["block_names"]]
        assert [b["name"] for b in js["blocks"]] == names
        for n in names:
            t = float(z[f"blocks/{n}/trace"])
            assert abs(float(s[f"blocks/{n}/trace"]) - t) <= 1e-10 * np.abs(z[f"blocks/{n}/eigenvalues"]).sum()
        assert abs(float(s["trace"]) - float(z["trace"])) <= 1e-10 * sum(
            np.abs(z[f"blocks/{n}/eigenvalues"]).sum() for n in names)
        assert int(s["matvecs"]) == int(z["block_offsets"][-1])
    assert "trace per block" in err


def test_ill_conditioned_sketch_is_orthonormalised_in_place(monkeypatch):
    """A Hutch++ sketch whose rows differ in scale by 1e12 is made orthonormal in place — no
    Householder QR (s·n more numbers) — spanning the same rows; Gram–Schmidt drops a dependent row."""
    import torch

    from hesscli.algorithms.trace import _gram_schmidt_rows_, _orthonormalize_rows_

    def no_qr(*a, **k):
        raise AssertionError("Householder QR of the sketch")

    monkeypatch.setattr(torch.linalg, "qr", no_qr)
    gen = torch.Generator().manual_seed(0)
    Y = torch.randn(12, 4000, generator=gen, dtype=torch.float64) * torch.logspace(0, -12, 12, dtype=torch.float64)[:, None]
    Y[7] = 3 * Y[2] - Y[5]
    Y0 = Y.clone()
    for Q in (_orthonormalize_rows_(Y), _gram_schmidt_rows_(Y0.clone())):
        s = Q.shape[0]
        assert s in (11, 12)  # Cholesky QR may keep a rounding-level twelfth direction, orthonormal too
        assert float((Q @ Q.T - torch.eye(s, dtype=torch.float64)).abs().max()) < 1e-10
        for i in range(12):  # every row of the sketch lies in the span
            r = Y0[i] - (Q @ Y0[i]) @ Q
            assert float(r.norm()) <= 1e-9 * float(Y0[i].norm())
    assert _gram_schmidt_rows_(Y0.clone()).shape[0] == 11  # the dependent row is dropped


def test_orthonormalising_the_sketch_allocates_nothing_of_its_size():
    """The sketch (s, n) is orthonormalised without any s×n temporary: the process's peak resident
    set grows by well under one copy of it (``torch.isfinite(Y)`` on the sketch held 1.4 copies: a
    7.4 GB spike on the MiniLM classifier)."""
    import torch

    from hesscli.algorithms.trace import _orthonormalize_rows_

    def hwm() -> int:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024

    Y = torch.randn(30, 1_000_000, dtype=torch.float64)
    Y[0] *= 1e6
    size = Y.numel() * 8
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak to the current resident set
    except OSError:
        pytest.skip("no /proc/self/clear_refs")
    before = hwm()
    Q = _orthonormalize_rows_(Y)
    assert Q.shape[0] == 30
    assert hwm() - before < 0.3 * size
