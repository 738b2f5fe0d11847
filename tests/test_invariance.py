"""The Hessian does not depend on how the data is cut (SPEC.md, Loss): each micro-batch and shard
contributes the sum of its loss terms and the mean divides once by the total count. Checked on the
digits MLP sample (``--params`` keeps the matrices small; the weighting is the same for every
parameter), in float64, for uneven ``--batch-size`` (on the first 150 digits, so that batches of 7
stay cheap), uneven shards of all 1,797 digits in three file formats, shards and micro-batches whose
targets are all ignored, and ``--reduction sum`` = mean × n_loss_terms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SAMPLES, load_result
from reference import assert_close_matrix

MODEL = SAMPLES / "digits_mlp_state_dict.pt"
ARCH = f"{SAMPLES / 'archs.py'}:DigitsMLP"
PARAMS = "fc2.bias|fc3"  # 362 parameters, two layers deep
TOL = 1e-11  # float64, relative to max|H|: only the summation order differs


def compute(tmp, name: str, *args) -> tuple[dict, dict]:
    from hesscli.cli import main

    out = tmp / f"{name}.npz"
    code = main(["compute", str(MODEL), "--arch", ARCH, "--params", PARAMS, "--dtype", "float64", "--mode", "full", "--quiet",
                 "-o", str(out), *[str(a) for a in args]])
    assert code == 0, f"hesscli compute {name} exited {code}"
    return load_result(out)


@pytest.fixture(scope="module")
def digits():
    d = torch.load(SAMPLES / "digits.pt", weights_only=True)
    return d["inputs"], d["targets"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One piece: all 1,797 samples in one file, no --batch-size."""
    meta, arrays = compute(tmp_path_factory.mktemp("base"), "base", "--data", SAMPLES / "digits.pt")
    assert meta["n_samples"] == meta["n_loss_terms"] == 1797
    return meta, arrays


def same(arrays, base, label):
    assert_close_matrix(arrays["hessian"], base["hessian"], TOL, label)
    scale = np.abs(base["eigenvalues"]).max()
    assert np.abs(arrays["eigenvalues"] - base["eigenvalues"]).max() <= TOL * scale, label


@pytest.fixture(scope="module")
def digits150(tmp_path_factory, digits):
    """The first 150 digits as one shard, and its one-piece Hessian."""
    tmp = tmp_path_factory.mktemp("d150")
    p = tmp / "digits150.pt"
    torch.save({"inputs": digits[0][:150].clone(), "targets": digits[1][:150].clone()}, p)
    return p, compute(tmp, "base150", "--data", p)


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [7, 100, 150, 1000])
def test_batch_size(tmp_path, digits150, batch_size):
    shard, (base_meta, base) = digits150
    meta, arrays = compute(tmp_path, "b", "--data", shard, "--batch-size", batch_size)
    assert meta["n_loss_terms"] == 150 and meta["batch_size"] == batch_size
    same(arrays, base, f"--batch-size {batch_size}")
    assert meta["loss_value"] == pytest.approx(base_meta["loss_value"], rel=1e-12)


def write_shards(tmp, x, y, sizes):
    """Consecutive shards of these sizes, in .pt, .npz and .safetensors (each with its own keys)."""
    from safetensors.torch import save_file

    paths, start = [], 0
    for i, n in enumerate(sizes):
        xs, ys = x[start : start + n].contiguous(), y[start : start + n].contiguous()
        start += n
        kind = i % 3
        if kind == 0:
            p = tmp / f"shard{i}.pt"
            torch.save({"inputs": xs, "targets": ys}, p)
        elif kind == 1:
            p = tmp / f"shard{i}.npz"
            np.savez(p, x=xs.numpy(), y=ys.numpy())
        else:
            p = tmp / f"shard{i}.safetensors"
            save_file({"input": xs, "target": ys}, str(p))
        paths.append(p)
    return paths


@pytest.mark.parametrize("batch_size", [None, 600])
def test_uneven_shards(tmp_path, baseline, digits, batch_size):
    paths = write_shards(tmp_path, *digits, [500, 1000, 297])
    extra = ["--batch-size", batch_size] if batch_size else []
    meta, arrays = compute(tmp_path, "s", *[a for p in paths for a in ("--data", p)], *extra)
    assert [d["n_samples"] for d in meta["data"]] == [500, 1000, 297]
    assert meta["n_samples"] == meta["n_loss_terms"] == 1797
    same(arrays, baseline[1], f"shards 500/1000/297, --batch-size {batch_size}")


@pytest.mark.slow
def test_ignored_targets(tmp_path, digits150, digits):
    """An extra shard whose targets are all -100, and micro-batches (samples 50-99 under
    --batch-size 50, several under --batch-size 7) whose targets are all -100: the Hessian is that
    of the remaining samples."""
    x, y = digits[0][:150], digits[1][:150]
    kept = torch.ones(len(y), dtype=torch.bool)
    kept[50:100] = False
    y_masked = y.clone()
    y_masked[~kept] = -100
    main = tmp_path / "masked.pt"
    torch.save({"inputs": x, "targets": y_masked}, main)
    ignored = tmp_path / "ignored.pt"
    torch.save({"inputs": x[:50].clone(), "targets": torch.full((50,), -100, dtype=torch.int64)}, ignored)
    reduced = tmp_path / "reduced.pt"
    torch.save({"inputs": x[kept].clone(), "targets": y[kept].clone()}, reduced)

    ref_meta, ref = compute(tmp_path, "reduced", "--data", reduced)
    assert ref_meta["n_loss_terms"] == 100
    # sanity: dropping 50 samples changes the Hessian, so the comparisons below can fail
    base = digits150[1][1]
    assert np.abs(ref["hessian"] - base["hessian"]).max() > 1e-6 * np.abs(ref["hessian"]).max()

    for args in (["--data", main, "--data", ignored, "--batch-size", 50],
                 ["--data", ignored, "--data", main],
                 ["--data", main, "--batch-size", 7]):
        meta, arrays = compute(tmp_path, "m", *args, "--force")
        assert meta["n_loss_terms"] == 100
        assert meta["n_samples"] == sum(d["n_samples"] for d in meta["data"])
        same(arrays, ref, " ".join(map(str, args)))


def test_reduction_sum_is_mean_times_terms(tmp_path, baseline, digits):
    meta, arrays = compute(tmp_path, "sum", "--data", SAMPLES / "digits.pt", "--reduction", "sum", "--batch-size", 900)
    n = meta["n_loss_terms"]
    assert meta["reduction"] == "sum" and n == 1797
    assert_close_matrix(arrays["hessian"], n * baseline[1]["hessian"], TOL, "sum vs mean·n")
    assert float(arrays["trace"]) == pytest.approx(n * float(baseline[1]["trace"]), rel=1e-11)
    assert meta["loss_value"] == pytest.approx(n * baseline[0]["loss_value"], rel=1e-12)


def test_reduction_sum_mse_counts_elements(tmp_path):
    """mse: n_loss_terms counts elements (samples × outputs), also across uneven shards."""
    from hesscli.cli import main

    d = torch.load(SAMPLES / "diabetes.pt", weights_only=True)
    x, y = d["inputs"], d["targets"]
    y2 = torch.cat([y, -y], dim=1)  # two outputs per sample
    # a model with two outputs: the diabetes MLP's safetensors weights don't fit, so use TinyMLP
    from models import TinyMLP, save_state_dict

    torch.manual_seed(0)
    model = TinyMLP(d_in=10, hidden=6, d_out=2)
    weights = tmp_path / "tiny.pt"
    save_state_dict(model, weights)
    paths = []
    for i, (a, b) in enumerate([(0, 100), (100, 442)]):
        p = tmp_path / f"d{i}.pt"
        torch.save({"inputs": x[a:b].clone(), "targets": y2[a:b].clone()}, p)
        paths.append(p)
    res = {}
    for red, data in (("mean", [paths[0], paths[1]]), ("sum", [paths[1], paths[0]])):
        out = tmp_path / f"{red}.npz"
        code = main(["compute", str(weights), "--arch", f"{SAMPLES.parent / 'tests' / 'models.py'}:TinyMLP",
                     "--arch-kwargs", '{"d_in": 10, "hidden": 6, "d_out": 2}', *[a for p in data for a in ("--data", str(p))],
                     "--reduction", red, "--dtype", "float64", "--batch-size", "33", "--quiet", "-o", str(out)])
        assert code == 0
        res[red] = load_result(out)
    assert res["mean"][0]["n_loss_terms"] == res["sum"][0]["n_loss_terms"] == 884
    assert_close_matrix(res["sum"][1]["hessian"], 884 * res["mean"][1]["hessian"], TOL, "mse sum vs mean·n")
