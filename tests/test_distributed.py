"""hesscli under torchrun (SPEC.md, Distributed): real processes, gloo, 2 ranks.

Every distributed result is compared with an independent float64 reference (``torch.func`` on the
eager model, tests/reference.py) and with the one-process result on all the data: to 1e-10 of
max|H| in float64 and 1e-5 in float32. Failures must end every rank with a clear message; the
subprocess timeout is far below HESSCLI_TIMEOUT, so a passing failure test shows that the error was
propagated, not waited out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLES, load_result
from reference import assert_close_matrix, reference

from hesscli.api import ModelSpec, compute

pytestmark = pytest.mark.slow  # real torchrun processes: tens of seconds each

CNN = ("sample_checkpoints/archs.py:DigitsCNN", SAMPLES / "digits_cnn_state_dict.pt")
MLP = ("sample_checkpoints/archs.py:DiabetesMLP", SAMPLES / "diabetes_mlp_state_dict.pt")
LONG = "300"  # HESSCLI_TIMEOUT for runs that must end by propagation, well before it


def torchrun(*argv, script: Path | None = None, env: dict | None = None, timeout: float = 150):
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 -m hesscli ARGV`` (or a
    script); returns (torchrun's exit code, stdout, stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(script)] if script is not None else ["-m", "hesscli"]
    cmd += [str(a) for a in argv]
    full_env = {**os.environ, "HESSCLI_TIMEOUT": LONG, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", **(env or {})}
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=full_env)
    return p.returncode, p.stdout, p.stderr


def one_json(stdout: str) -> dict:
    """Rank 0's one JSON object: other ranks print nothing on stdout."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got {stdout!r}"
    return json.loads(lines[0])


def model_args(case) -> list[str]:
    arch, sd = case
    return [str(sd), "--arch", arch]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process references and runs on one thread: on a shared 2-core machine, OpenMP threads
    that wait for a busy core cost more than they bring."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, list[Path]]:
    """Uneven shards: diabetes 200/150/92 (rank 0 gets files 0 and 2: 292 samples, rank 1: 150),
    digits images 45/35/20, one digits sample alone (split by range: rank 0 gets none), and a
    digits shard with a class index out of range (fails on the rank that holds it)."""
    d = tmp_path_factory.mktemp("dist")
    out: dict[str, list[Path]] = {}
    diab = torch.load(SAMPLES / "diabetes.pt", weights_only=True)
    img = torch.load(SAMPLES / "digits_images.pt", weights_only=True)

    def save(name, data, lo, hi, targets=None):
        p = d / f"{name}.pt"
        torch.save(
            {
                "inputs": data["inputs"][lo:hi].clone(),
                "targets": (targets if targets is not None else data["targets"][lo:hi]).clone(),
            },
            p,
        )
        return p

    out["diabetes"] = [save("diab0", diab, 0, 200), save("diab1", diab, 200, 350), save("diab2", diab, 350, 442)]
    out["cnn"] = [save("img0", img, 0, 45), save("img1", img, 45, 80), save("img2", img, 80, 100)]
    out["single"] = [save("img_one", img, 0, 1)]
    bad = img["targets"][45:80].clone()
    bad[5] = 10
    out["bad"] = [out["cnn"][0], save("img_bad", img, 45, 80, targets=bad), out["cnn"][2]]
    out["dir"] = [d]
    return out


_REFS: dict = {}


def cnn_reference(shards):
    """The float64 reference of the CNN on its three shards (computed once)."""
    if "cnn" not in _REFS:
        _REFS["cnn"] = reference(CNN[0], CNN[1], shards["cnn"], "cross_entropy")
    return _REFS["cnn"]


def data_args(paths) -> list[str]:
    return [a for p in paths for a in ("--data", str(p))]


def one_process(case, paths, out: Path, **kw) -> tuple[dict, dict]:
    arch, sd = case
    compute(ModelSpec(str(sd), data=[str(p) for p in paths], arch=arch, dtype=kw.pop("dtype", None)), **kw).save(out)
    return load_result(out)


def test_data_split_uneven_shards_float64(shards, tmp_path):
    paths = shards["diabetes"]
    out = tmp_path / "two.npz"
    code, stdout, stderr = torchrun(
        "compute", *model_args(MLP), *data_args(paths), "--dtype", "float64", "--batch-size", "64", "-o", out, "--json"
    )
    assert code == 0, stderr
    summary = one_json(stdout)
    assert summary["status"] == "ok" and summary["n_samples"] == 442
    meta, arr = load_result(out)
    assert meta["world_size"] == 2 and meta["split"] == "data"
    assert meta["rank_samples"] == [292, 150]
    assert [d["n_samples"] for d in meta["data"]] == [200, 150, 92]
    assert meta["n_loss_terms"] == 442
    ref = reference(MLP[0], MLP[1], paths, "mse")
    assert_close_matrix(arr["hessian"], ref.hessian, 1e-10, "2 ranks vs torch.func", ref)
    np.testing.assert_allclose(arr["eigenvalues"], ref.eigenvalues, rtol=0, atol=1e-10 * ref.norm2)
    _, one = one_process(MLP, paths, tmp_path / "one.npz", dtype="float64")
    assert_close_matrix(arr["hessian"], one["hessian"], 1e-10, "2 ranks vs 1 process", ref)
    assert abs(float(arr["trace"]) - float(one["trace"])) <= 1e-10 * ref.abs_sum


def test_data_split_float32_cnn(shards, tmp_path):
    paths = shards["cnn"]
    out = tmp_path / "two.npz"
    code, stdout, stderr = torchrun("compute", *model_args(CNN), *data_args(paths), "-o", out, "--json", "--quiet")
    assert code == 0, stderr
    assert one_json(stdout)["status"] == "ok"
    meta, arr = load_result(out)
    assert meta["rank_samples"] == [65, 35] and meta["dtype"] == "float32"
    _, one = one_process(CNN, paths, tmp_path / "one.npz")
    ref = cnn_reference(shards)
    assert_close_matrix(arr["hessian"], one["hessian"], 1e-5, "2 ranks vs 1 process (float32)", ref)
    assert_close_matrix(arr["hessian"], ref.hessian, 1e-5, "2 ranks (float32) vs torch.func", ref)


def test_rank_without_data(shards, tmp_path):
    """One sample over two ranks: rank 0, the one that writes, holds no data at all."""
    out = tmp_path / "two.npz"
    code, _, stderr = torchrun(
        "compute", *model_args(CNN), *data_args(shards["single"]), "--dtype", "float64", "-o", out, "-q"
    )
    assert code == 0, stderr
    meta, arr = load_result(out)
    assert meta["rank_samples"] == [0, 1]
    assert meta["loss"] == "cross_entropy" and meta["n_samples"] == 1
    ref = reference(CNN[0], CNN[1], shards["single"], "cross_entropy")
    assert_close_matrix(arr["hessian"], ref.hessian, 1e-10, "empty rank 0 vs torch.func", ref)
    _, one = one_process(CNN, shards["single"], tmp_path / "one.npz", dtype="float64")
    assert_close_matrix(arr["hessian"], one["hessian"], 1e-10, "empty rank 0 vs 1 process", ref)


def test_column_split_block_mode(shards, tmp_path):
    paths = shards["cnn"]
    out = tmp_path / "cols.npz"
    code, stdout, stderr = torchrun(
        "compute",
        *model_args(CNN),
        *data_args(paths),
        "--split",
        "columns",
        "--mode",
        "block",
        "--dtype",
        "float64",
        "-o",
        out,
        "--json",
        "-q",
    )
    assert code == 0, stderr
    assert one_json(stdout)["mode"] == "block"
    meta, arr = load_result(out)
    assert meta["split"] == "columns" and meta["rank_samples"] == [100, 100] and meta["n_samples"] == 100
    ref = cnn_reference(shards)
    _, one = one_process(CNN, paths, tmp_path / "one.npz", dtype="float64", mode="block")
    for name, a, b in zip(arr["block_names"], arr["block_offsets"][:-1], arr["block_offsets"][1:], strict=True):
        H = arr[f"blocks/{name}/hessian"]
        assert_close_matrix(H, one[f"blocks/{name}/hessian"], 1e-10, f"columns vs 1 process, block {name}")
        assert_close_matrix(H, ref.hessian[a:b, a:b], 1e-10, f"columns, block {name} vs torch.func")
        np.testing.assert_allclose(
            arr[f"blocks/{name}/eigenvalues"], np.linalg.eigvalsh(ref.hessian[a:b, a:b]), rtol=0, atol=1e-10 * ref.norm2
        )


def test_failing_rank_ends_all_ranks(shards, tmp_path):
    """Rank 1's shard has a class index out of range: it fails while rank 0 waits in a collective."""
    out = tmp_path / "never.npz"
    code, stdout, stderr = torchrun("compute", *model_args(CNN), *data_args(shards["bad"]), "-o", out, "--json")
    assert code != 0
    assert "class index 10" in stderr
    assert "rank 1 failed: class index 10" in stderr  # rank 0's own line names the culprit
    status = one_json(stdout)
    assert status["status"] == "error" and status["exit_code"] == 1 and "rank 1 failed" in status["error"]
    assert not out.exists()


def test_existing_output_refused_on_every_rank(shards, tmp_path):
    """Only rank 0 writes, so only rank 0 can see the existing file: the others hear of it."""
    out = tmp_path / "exists.npz"
    out.write_bytes(b"keep")
    code, _, stderr = torchrun("compute", *model_args(MLP), *data_args(shards["diabetes"][:1]), "-o", out)
    assert code != 0
    assert "exists; pass --force" in stderr
    assert "rank 0 failed: output" in stderr
    assert out.read_bytes() == b"keep"


def test_different_weights_refused(shards, tmp_path):
    """Each rank loads its own weights file (as on machines with different copies): refused on every rank."""
    sd = torch.load(CNN[1], weights_only=True)
    sd["fc.bias"] = sd["fc.bias"] + 1e-3
    torch.save(sd, tmp_path / "w1.pt")
    script = tmp_path / "per_rank.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys
            from hesscli.cli import main
            weights = {str(CNN[1])!r} if os.environ["RANK"] == "0" else {str(tmp_path / "w1.pt")!r}
            sys.exit(main(["compute", weights, *sys.argv[1:]]))
            """
        )
    )
    code, _, stderr = torchrun("--arch", CNN[0], *data_args(shards["cnn"]), "-o", tmp_path / "x.npz", script=script)
    assert code != 0
    assert stderr.count("the ranks hold different weights") == 2, stderr
    assert not (tmp_path / "x.npz").exists()


def test_stuck_rank_times_out(shards, tmp_path):
    """A rank that never reaches the next collective: the others stop after HESSCLI_TIMEOUT."""
    script = tmp_path / "stuck.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            from hesscli.runtime import distributed
            if distributed.from_env().rank == 1:
                time.sleep(600)
            from hesscli.cli import main
            sys.exit(main(sys.argv[1:]))
            """
        )
    )
    argv = ["compute", *model_args(MLP), *data_args(shards["diabetes"][:1]), "-o", tmp_path / "x.npz"]
    code, _, stderr = torchrun(*argv, script=script, env={"HESSCLI_TIMEOUT": "3"})
    assert code != 0
    assert "did not answer within 3 s (HESSCLI_TIMEOUT)" in stderr


def test_matrix_free_commands_split_the_data(shards, tmp_path):
    """trace (exact: P products) and spectrum (Lanczos from seeded start vectors) on 2 ranks."""
    paths = shards["diabetes"]
    ref = reference(MLP[0], MLP[1], paths, "mse")
    common = [*model_args(MLP), *data_args(paths), "--dtype", "float64", "--json", "-q"]
    code, stdout, stderr = torchrun("trace", *common, "--method", "exact", "-o", tmp_path / "t.npz")
    assert code == 0, stderr
    assert one_json(stdout)["trace"] == pytest.approx(np.trace(ref.hessian), abs=1e-10 * ref.abs_sum)
    meta, _ = load_result(tmp_path / "t.npz")
    assert meta["world_size"] == 2 and meta["rank_samples"] == [292, 150]
    code, stdout, stderr = torchrun("spectrum", *common, "--top-k", "3", "-o", tmp_path / "s.npz")
    assert code == 0, stderr
    ev = np.sort(np.asarray(one_json(stdout)["eigenvalues"], dtype=float))
    np.testing.assert_allclose(ev, ref.eigenvalues[-3:], rtol=0, atol=1e-8 * ref.norm2)
    assert load_result(tmp_path / "s.npz")[0]["world_size"] == 2


def test_environment_checks(monkeypatch):
    """One process is not distributed; a bad HESSCLI_TIMEOUT is refused before joining anyone."""
    from hesscli.errors import HesscliError
    from hesscli.runtime import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    for bad, message in (("soon", "not a number of seconds"), ("0", "must be positive")):
        monkeypatch.setenv("HESSCLI_TIMEOUT", bad)
        with pytest.raises(HesscliError, match=message):
            distributed.from_env()
