"""``hesscli track`` (issue 14): sharpness across the checkpoints of a gradient-descent run.

The run is ``sample_checkpoints/gd_run/`` (``make_gd_run.py``: the digits MLP with 16 hidden units,
full-batch gradient descent at η = 0.6, TorchScript every 10 steps). The reference for every number
is a dense float64 Hessian of the eager model (``archs.py``'s ``DigitsMLP``, the checkpoint's
weights) by plain autograd double backward, one row per ``torch.autograd.grad`` call. The quick
tests use the first 300 samples (a dense Hessian costs ~1 s); the acceptance test (slow) uses all
of ``digits.pt`` on ten consecutive checkpoints, in TorchScript and in state_dict + ``--arch``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import load_arch

from hesscli.errors import HesscliError, UsageError
from hesscli.io.checkpoints import discover, load_learning_rates, parse_step

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"
GD = SAMPLES / "gd_run"
DIGITS = SAMPLES / "digits.pt"
ARCH = str(SAMPLES / "archs.py") + ":DigitsMLP"
ARCH_KW = '{"hidden": 16}'


def ckpt(step: int) -> Path:
    return GD / f"step_{step:04d}.pt"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """The first 300 digits: dense references in about a second."""
    d = torch.load(DIGITS, weights_only=True)
    p = tmp_path_factory.mktemp("data") / "digits300.pt"
    torch.save({"inputs": d["inputs"][:300].clone(), "targets": d["targets"][:300].clone()}, p)
    return p


_TRUTH: dict = {}


def truth(path: Path, data: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(H, θ, loss) in float64 for the checkpoint at ``path`` on ``data``: H row by row by plain
    autograd double backward of the eager model's mean cross-entropy."""
    key = (str(path), str(data))
    if key not in _TRUTH:
        sd = torch.jit.load(str(path)).state_dict() if zipfile_is_script(path) else torch.load(path, weights_only=True)
        model = load_arch(ARCH, hidden=16).double()
        model.load_state_dict({k: v.double() for k, v in sd.items()})
        params = list(model.parameters())
        d = torch.load(data, weights_only=True)
        loss = F.cross_entropy(model(d["inputs"].double()), d["targets"])
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, create_graph=True)])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small products: one thread is several times faster on a busy machine
        try:
            rows = [torch.cat([t.reshape(-1) for t in torch.autograd.grad(g[i], params, retain_graph=True)])
                    for i in range(g.numel())]
        finally:
            torch.set_num_threads(threads)
        H = torch.stack(rows).detach()
        theta = torch.cat([p.detach().reshape(-1) for p in params])
        _TRUTH[key] = (H, theta, float(loss.detach()))
    return _TRUTH[key]


def zipfile_is_script(path: Path) -> bool:
    import zipfile

    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def lines(out: str) -> list[dict]:
    return [json.loads(s) for s in out.splitlines() if s.strip()]


def check_rows(rows: list[dict], paths: list[Path], data: Path, which_both: bool = False) -> None:
    """Every row against the dense float64 truth of its checkpoint: λmax (and λmin) within
    1e-5·‖H‖₂, the update curvature dᵀHd/‖d‖² within 1e-5·‖H‖₂, the loss to float32 rounding."""
    prev_theta = None
    for row, p in zip(rows, paths, strict=True):
        H, theta, loss = truth(p, data)
        w = torch.linalg.eigvalsh(H)
        norm = float(w.abs().max())
        assert abs(row["lambda_max"] - float(w[-1])) <= 1e-5 * norm, (p.name, row["lambda_max"], float(w[-1]))
        if which_both:
            assert abs(row["lambda_min"] - float(w[0])) <= 1e-5 * norm, (p.name, row["lambda_min"], float(w[0]))
        assert abs(row["loss"] - loss) <= 1e-5 * abs(loss)
        if prev_theta is None:
            assert row["update_curvature"] is None  # NaN in the file, null in JSON
        else:
            d = theta - prev_theta
            want = float(d @ H @ d / (d @ d))
            assert abs(row["update_curvature"] - want) <= 1e-5 * norm, (p.name, row["update_curvature"], want)
        prev_theta = theta


# ---------------------------------------------------------------------------------------------
# checkpoints: names, steps, learning rates


def test_steps_from_names(tmp_path):
    assert parse_step("runs/step_0100.pt") == 100
    assert parse_step("epoch3_step1200.pt") == 1200  # 'step' is preferred to 'epoch'
    assert parse_step("model-ckpt-7.safetensors") == 7
    assert parse_step("iteration_42.pth") == 42
    assert parse_step("weights5.pt2") == 5  # the only integer; '.pt2' is an extension, not a number
    with pytest.raises(HesscliError, match="model.pt2.*no integer"):
        parse_step("model.pt2")
    with pytest.raises(HesscliError, match=r"a1_b2.pt.*several integers \(1, 2\)"):
        parse_step("a1_b2.pt")
    d = tmp_path / "checkpoint-500"
    d.mkdir()
    (d / "trainer_state.json").write_text(json.dumps({"global_step": 512, "log_history": []}))
    assert parse_step(d) == 512  # global_step wins over the name
    found = discover([str(GD)])
    assert [c.step for c in found] == list(range(0, 200, 10))
    found = discover([str(GD / "step_01[5-9]0.pt"), str(ckpt(20))])  # a quoted glob, expanded here
    assert [c.step for c in found] == [20, 150, 160, 170, 180, 190]
    shutil.copy(ckpt(10), tmp_path / "iter10.pt")
    with pytest.raises(HesscliError, match="both step 10"):
        discover([str(ckpt(10)), str(tmp_path / "iter10.pt")])
    with pytest.raises(HesscliError, match="no checkpoint matches"):
        discover([str(tmp_path / "nothing_*.pt")])


def test_lr_from_trainer_state_and_csv(tmp_path):
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"global_step": 30, "log_history": [
        {"step": 10, "learning_rate": 0.1, "loss": 1.0}, {"step": 20, "learning_rate": 0.05}, {"step": 20, "eval_loss": 2}]}))
    rates = load_learning_rates(state)
    assert np.isnan(rates.at(5)) and rates.at(10) == 0.1 and rates.at(19) == 0.1 and rates.at(25) == 0.05
    csv = tmp_path / "lr.csv"
    csv.write_text("step,lr\n0,0.6\n100,0.3\n")
    rates = load_learning_rates(csv)
    assert rates.at(0) == 0.6 and rates.at(99) == 0.6 and rates.at(150) == 0.3
    csv.write_text("step,lr\n0,0.6\nten,0.3\n")
    with pytest.raises(HesscliError, match="lr.csv', line 3"):
        load_learning_rates(csv)
    csv.write_text("when,rate\n0,0.6\n")
    with pytest.raises(HesscliError, match="'step' and 'lr'"):
        load_learning_rates(csv)


def test_lanczos_warm_start():
    """A start block is used as given (completed with random directions to the block size, or
    widening the block); from an exact eigenvector the solve stops at once."""
    from hesscli.algorithms.lanczos import lanczos
    from hesscli.algorithms.operators import SymOperator

    class Mat(SymOperator):
        def __init__(self, H):
            super().__init__()
            self.H, self.n = H, H.shape[0]

        def _apply(self, V):
            return V @ self.H

    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(400, 400, generator=gen, dtype=torch.float64))
    lam = torch.linspace(0, 1, 400, dtype=torch.float64) ** 3
    op = Mat((Q * lam) @ Q.T)
    cold = lanczos(op, 1, tol=1e-8, seed=0)
    warm = lanczos(op, 1, tol=1e-8, seed=0, start=Q[:, -1:].T + 1e-9 * torch.randn(1, 400, generator=gen, dtype=torch.float64))
    assert abs(cold.eigenvalues[-1] - 1.0) < 1e-8 and abs(warm.eigenvalues[-1] - 1.0) < 1e-8
    assert warm.matvecs <= 4 < cold.matvecs
    wide = lanczos(op, 2, tol=1e-8, seed=0, block_size=1, start=Q[:, -3:].T)  # 3 vectors: the block widens
    assert wide.block_size == 3 and np.allclose(wide.eigenvalues, lam[-2:].numpy(), atol=1e-8)
    with pytest.raises(ValueError, match="start vectors"):
        lanczos(op, 1, start=torch.zeros(1, 5, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# numbers against the dense float64 truth (300 samples)


def test_rows_match_dense_truth(cli, tmp_path, small_data):
    """λmax, λmin, the update curvature, the loss and the trace of each row against the dense
    float64 Hessian; the steps from the names; one JSON line per checkpoint in step order, whatever
    order the checkpoints are given in; the file holds the same rows."""
    paths = [ckpt(20), ckpt(0), ckpt(10)]  # out of order on purpose
    out = tmp_path / "track.npz"
    code, stdout, err = cli("track", *paths, "--data", small_data, "--which", "both", "--trace", "--lr", "0.6",
                            "-o", out, "--json", "--quiet")
    assert code == 0, err
    assert err == ""
    rows = lines(stdout)
    assert [r["step"] for r in rows] == [0, 10, 20]
    check_rows(rows, [ckpt(0), ckpt(10), ckpt(20)], small_data, which_both=True)
    for r, p in zip(rows, [ckpt(0), ckpt(10), ckpt(20)]):
        H = truth(p, small_data)[0]
        assert abs(r["trace"] - float(H.trace())) <= 4 * r["trace_stderr"] + 1e-9
        assert r["converged"] and r["lr"] == 0.6 and abs(r["threshold"] - 2 / 0.6) < 1e-12
    assert [r["warm_start"] for r in rows] == [False, True, True]
    with np.load(out, allow_pickle=False) as z:
        assert z["steps"].tolist() == [0, 10, 20]
        assert z["eigenvalues"].shape == (3, 1) and z["eigenvalues_smallest"].shape == (3, 1)
        assert np.isnan(z["update_curvature"][0]) and np.allclose(z["update_curvature"][1:], [r["update_curvature"] for r in rows[1:]])
        assert z["matvecs"].tolist() == [r["matvecs"] for r in rows]
        assert z["paths"].tolist() == [str(p) for p in (ckpt(0), ckpt(10), ckpt(20))]
        assert set(z.files) >= {"sha256", "residuals", "converged", "lr", "loss", "trace", "trace_stderr", "meta"}
        meta = json.loads(str(z["meta"][()]))
    assert meta["command"] == "track" and meta["schema"] == "hesscli/1" and meta["settings"]["top_k"] == 1


def test_library_rows_and_load(tmp_path, small_data):
    """``hesscli.tracking.track`` yields typed rows; the file reads back into a TrackResult."""
    from hesscli.results import load
    from hesscli.tracking import TrackResult, TrackRow, track

    out = tmp_path / "t.npz"
    run = track([ckpt(0), ckpt(10)], small_data, out=out, top_k=2, lr=0.6, momentum=0.5, dtype="float64")
    rows = list(run)
    assert all(isinstance(r, TrackRow) for r in rows) and [r.step for r in rows] == [0, 10]
    assert rows[1].eigenvalues.shape == (2,) and rows[1].eigenvalues[0] >= rows[1].eigenvalues[1]
    assert rows[0].threshold == pytest.approx((2 + 2 * 0.5) / 0.6)
    H = truth(ckpt(10), small_data)[0]
    w = torch.linalg.eigvalsh(H)
    assert np.allclose(rows[1].eigenvalues, w[-2:].flip(0).numpy(), atol=1e-10 * float(w.abs().max()))  # float64
    back = load(out)
    assert isinstance(back, TrackResult) and back.steps.tolist() == [0, 10]
    assert np.allclose(back.lambda_max, [r.lambda_max for r in rows])
    assert back.summary()["rows"][1]["eigenvalues"] == pytest.approx(list(rows[1].eigenvalues))


# ---------------------------------------------------------------------------------------------
# resumption and SIGINT


def _launch(args: list, out: Path) -> subprocess.Popen:
    env = dict(os.environ, NO_COLOR="1")
    return subprocess.Popen([sys.executable, "-m", "hesscli", "track", *map(str, args), "-o", str(out), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=out.parent, text=True)


@pytest.mark.slow
def test_sigint_then_resume_matches_one_run(tmp_path, small_data):
    """SIGINT after the first rows: exit 130, the file holds the finished rows; the same command
    again keeps them and computes only the rest; the rows match one uninterrupted run."""
    from hesscli.tracking import track

    args = [str(GD / "step_00*.pt"), "--data", small_data, "--lr", "0.6"]  # ten checkpoints, steps 0..90
    out = tmp_path / "track.npz"
    p = _launch(args, out)
    try:
        first = [p.stdout.readline(), p.stdout.readline()]
        assert all(first), p.communicate(timeout=120)[1]
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert "Error: interrupted (SIGINT)" in err
    printed = lines("".join(first) + rest)
    with np.load(out, allow_pickle=False) as z:
        done = z["steps"].tolist()
    assert done == [r["step"] for r in printed] and 2 <= len(done) < 10
    assert not list(tmp_path.glob(".*.tmp"))

    p = _launch(args, out)
    stdout, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    rows = lines(stdout)
    assert [r["step"] for r in rows] == list(range(0, 100, 10))
    assert [r["kept"] for r in rows] == [s in done for s in range(0, 100, 10)]
    assert f"kept {len(done)} of {len(done)} row(s)" in err

    whole = [r.summary() for r in track(str(GD / "step_00*.pt"), small_data, lr=0.6)]
    for a, b in zip(rows, whole, strict=True):
        assert abs(a["lambda_max"] - b["lambda_max"]) <= 1e-5 * b["lambda_max"]
        if b["update_curvature"] is not None:
            assert abs(a["update_curvature"] - b["update_curvature"]) <= 1e-5 * b["lambda_max"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-7)
    # a third run computes nothing; --force starts over
    p = _launch(args, out)
    stdout, err = p.communicate(timeout=300)
    assert p.returncode == 0 and all(r["kept"] for r in lines(stdout)), err


def test_resume_refuses_other_settings(cli, tmp_path, small_data):
    out = tmp_path / "track.npz"
    code, _, err = cli("track", ckpt(0), ckpt(10), "--data", small_data, "-o", out, "--quiet")
    assert code == 0, err
    code, _, err = cli("track", ckpt(0), ckpt(10), "--data", small_data, "-o", out, "--top-k", "2", "--quiet")
    assert code == 1 and err.count("\n") == 1 and "other settings" in err and "--force" in err
    code, stdout, err = cli("track", ckpt(0), ckpt(10), ckpt(20), "--data", small_data, "-o", out, "--json")
    assert code == 0, err
    assert [r["kept"] for r in lines(stdout)] == [True, True, False] and "kept 2 of 2" in err
    code, stdout, err = cli("track", ckpt(0), ckpt(10), "--data", small_data, "-o", out, "--top-k", "2", "--force", "--json")
    assert code == 0 and not any(r["kept"] for r in lines(stdout)), err
    other = tmp_path / "spectrum.npz"
    other.write_bytes(b"not a result")
    code, _, err = cli("track", ckpt(0), "--data", small_data, "-o", other)
    assert code == 1 and "not a track result" in err and other.read_bytes() == b"not a result"


# ---------------------------------------------------------------------------------------------
# --follow


WRITER = """
import shutil, sys, time
src, dst = sys.argv[1], sys.argv[2]
for name in sys.argv[3:]:
    data = open(f"{src}/{name}", "rb").read()
    with open(f"{dst}/{name}", "wb") as f:  # written in two halves, a pause between: not stable yet
        f.write(data[: len(data) // 2]); f.flush()
        time.sleep(0.6)
        f.write(data[len(data) // 2 :])
    time.sleep(0.3)
"""


@pytest.mark.slow
def test_follow_picks_up_checkpoints_from_a_writer(cli, tmp_path, small_data):
    watch = tmp_path / "run"
    watch.mkdir()
    shutil.copy(ckpt(0), watch / ckpt(0).name)  # one there before the watch starts
    names = [ckpt(s).name for s in (10, 20, 30)]
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(GD), str(watch), *names])
    try:
        code, stdout, err = cli("track", "--follow", watch, "--until", "30", "--poll", "0.2", "--data", small_data,
                                "-o", tmp_path / "track.npz", "--json", "--quiet")
    finally:
        writer.wait(timeout=120)
    assert code == 0, err
    rows = lines(stdout)
    assert [r["step"] for r in rows] == [0, 10, 20, 30]
    check_rows(rows[:2], [ckpt(0), ckpt(10)], small_data)


# ---------------------------------------------------------------------------------------------
# bad input: one line, non-zero exit, no output


def test_bad_inputs(cli, tmp_path, small_data):
    out = tmp_path / "track.npz"
    odd = tmp_path / "step_0015.pt"  # another layout: 8 hidden units
    torch.jit.save(torch.jit.script(load_arch(ARCH, hidden=8)), str(odd))
    code, _, err = cli("track", ckpt(0), odd, ckpt(20), "--data", small_data, "-o", out)
    assert code == 1 and err.count("\n") == 1
    assert "step_0015.pt" in err and "'fc1.weight' has shape [8, 64]" in err
    sd = tmp_path / "step_0005.pt"  # a state_dict that does not fit --arch
    torch.save(load_arch(ARCH, hidden=8).state_dict(), sd)
    code, _, err = cli("track", sd, "--data", small_data, "--arch", ARCH, "--arch-kwargs", ARCH_KW, "-o", out)
    assert code == 1 and err.count("\n") == 1 and "step_0005.pt" in err and "fc1.weight" in err
    final = tmp_path / "final.pt"
    shutil.copy(ckpt(0), final)
    code, _, err = cli("track", ckpt(0), final, "--data", small_data, "-o", out)
    assert code == 1 and "final.pt" in err and "no integer" in err and err.count("\n") == 1
    code, _, err = cli("track", ckpt(0), tmp_path / "missing.pt", "--data", small_data, "-o", out)
    assert code == 1 and "missing.pt" in err
    code, _, err = cli("track", ckpt(0), "--data", tmp_path / "nodata.pt", "-o", out)
    assert code == 1 and "nodata.pt" in err
    code, _, err = cli("track", ckpt(0), "-o", out)
    assert code == 2 and "--data" in err
    code, _, err = cli("track", ckpt(0), "--data", small_data, "--lr", "0.1", "--lr-from", small_data, "-o", out)
    assert code == 2 and "exclude" in err
    code, _, err = cli("track", ckpt(0), "--data", small_data, "--momentum", "0.9", "-o", out)
    assert code == 2 and "--momentum needs --lr" in err
    code, _, err = cli("track", ckpt(0), "--data", small_data, "--until", "5", "-o", out)
    assert code == 2 and "--follow" in err
    code, _, err = cli("track", ckpt(0), "--data", small_data, "--lr-from", tmp_path / "lr.csv", "-o", out)
    assert code == 1 and "lr.csv" in err
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(UsageError):
        from hesscli.tracking import track

        track([ckpt(0)], small_data, which="smallest")


def test_plot(cli, tmp_path, small_data):
    from hesscli.tracking import threshold_rule

    plot = tmp_path / "sharpness.png"
    code, _, err = cli("track", ckpt(0), ckpt(10), "--data", small_data, "--lr", "0.6", "--momentum", "0.9",
                       "--which", "both", "--plot", plot, "-o", tmp_path / "t.npz")
    assert code == 0, err
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {plot}" in err and "wrote" in err
    assert threshold_rule(0.9) == "(2 + 2β)/η (momentum β = 0.9)" and threshold_rule(None) == "2/η (gradient descent)"


# ---------------------------------------------------------------------------------------------
# the acceptance run: ten checkpoints, all the data, TorchScript and state_dict + --arch


@pytest.mark.slow
def test_acceptance_gd_run(cli, tmp_path):
    """Ten consecutive checkpoints of the GD run (steps 100..190) on all 1,797 digits: every λmax
    and update curvature within 1e-5·‖H‖₂ (float32) of the dense float64 truth, in TorchScript
    (warm starts) and in state_dict + --arch (--no-warm-start); the steps from the names; warm
    starts use at most 0.9× the products of random starts (--top-k 1)."""
    steps = list(range(100, 200, 10))
    scripts = [ckpt(s) for s in steps]
    sd_dir = tmp_path / "sd"
    sd_dir.mkdir()
    for p in scripts:
        torch.save(torch.jit.load(str(p)).state_dict(), sd_dir / p.name)
    t0 = time.perf_counter()
    code, stdout, err = cli("track", str(GD / "step_01*.pt"), "--data", DIGITS, "-o", tmp_path / "warm.npz", "--json", "--quiet")
    assert code == 0, err
    warm = lines(stdout)
    code, stdout, err = cli("track", sd_dir, "--arch", ARCH, "--arch-kwargs", ARCH_KW, "--data", DIGITS, "--no-warm-start",
                            "-o", tmp_path / "cold.npz", "--json", "--quiet")
    assert code == 0, err
    cold = lines(stdout)
    seconds = time.perf_counter() - t0
    assert [r["step"] for r in warm] == steps and [r["step"] for r in cold] == steps
    check_rows(warm, scripts, DIGITS)
    check_rows(cold, scripts, DIGITS)
    total_warm, total_cold = sum(r["matvecs"] for r in warm), sum(r["matvecs"] for r in cold)
    assert total_warm <= 0.9 * total_cold, (total_warm, total_cold, seconds)
