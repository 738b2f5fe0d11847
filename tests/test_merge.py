"""``hesscli merge``: results of ``compute`` on disjoint shards combine into the one-run result.

Checked against an independent float64 reference (``torch.func`` on the eager model over all the
shards, tests/reference.py) and against ``compute`` on all the shards at once; then every mismatch
``merge`` must refuse.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLES, load_result
from reference import assert_close_matrix, reference

from hesscli.api import ModelSpec, compute

MLP = ("sample_checkpoints/archs.py:DiabetesMLP", SAMPLES / "diabetes_mlp_state_dict.pt")
CNN = ("sample_checkpoints/archs.py:DigitsCNN", SAMPLES / "digits_cnn_state_dict.pt")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process references and runs on one thread: on a shared 2-core machine, OpenMP threads
    that wait for a busy core cost more than they bring."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("merge")


@pytest.fixture(scope="module")
def shards(work) -> list[Path]:
    """Diabetes in three uneven shards: 200, 150 and 92 samples."""
    d = torch.load(SAMPLES / "diabetes.pt", weights_only=True)
    out = []
    for i, (lo, hi) in enumerate(((0, 200), (200, 350), (350, 442))):
        p = work / f"diab{i}.pt"
        torch.save({"inputs": d["inputs"][lo:hi].clone(), "targets": d["targets"][lo:hi].clone()}, p)
        out.append(p)
    return out


def run_compute(case, data, out: Path, **kw) -> Path:
    arch, sd = case
    spec = {k: kw.pop(k) for k in ("dtype", "loss", "reduction", "params") if k in kw}
    compute(ModelSpec(str(kw.pop("model", sd)), data=[str(p) for p in data], arch=arch, **spec), **kw).save(out, force=True)
    return out


@pytest.fixture(scope="module")
def per_shard(shards, work) -> list[Path]:
    return [run_compute(MLP, [s], work / f"r{i}.npz", dtype="float64") for i, s in enumerate(shards)]


def test_merge_equals_one_run_and_reference(cli, shards, per_shard, work, tmp_path):
    out = tmp_path / "merged.npz"
    r = cli("merge", *per_shard, "-o", out, "--json")
    assert r.code == 0, r.err
    summary = r.json
    meta, arr = load_result(out)
    ref = reference(MLP[0], MLP[1], shards, "mse")
    assert_close_matrix(arr["hessian"], ref.hessian, 1e-10, "merge vs torch.func", ref)
    np.testing.assert_allclose(arr["eigenvalues"], ref.eigenvalues, rtol=0, atol=1e-10 * ref.norm2)
    assert abs(float(arr["trace"]) - np.trace(ref.hessian)) <= 1e-10 * ref.abs_sum
    assert summary["lambda_max"] == pytest.approx(ref.eigenvalues[-1], abs=1e-10 * ref.norm2)
    assert summary["trace"] == pytest.approx(np.trace(ref.hessian), abs=1e-10 * ref.abs_sum)
    assert meta["loss_value"] == pytest.approx(ref.loss_value, rel=1e-12)
    one = run_compute(MLP, shards, work / "all.npz", dtype="float64")
    _, all_arr = load_result(one)
    assert_close_matrix(arr["hessian"], all_arr["hessian"], 1e-10, "merge vs one run", ref)
    assert meta["command"] == "merge" and meta["n_samples"] == 442 and meta["n_loss_terms"] == 442
    assert [i["weight"] for i in meta["inputs"]] == pytest.approx([200 / 442, 150 / 442, 92 / 442])
    assert [d["n_samples"] for d in meta["data"]] == [200, 150, 92]
    tau = ref.norm2 * np.sqrt(ref.P) * np.finfo(np.float64).eps
    assert meta["negative_threshold"] == pytest.approx(tau, rel=1e-9)
    assert summary["n_negative"] == int((ref.eigenvalues < -tau).sum())

    # a merged result merges again, and 'show' reads it
    part = tmp_path / "part.npz"
    assert cli("merge", per_shard[0], per_shard[1], "-o", part, "-q").code == 0
    again = tmp_path / "again.npz"
    assert cli("merge", part, per_shard[2], "-o", again, "-q").code == 0
    assert_close_matrix(load_result(again)[1]["hessian"], ref.hessian, 1e-10, "merge of a merge", ref)
    assert cli("show", out).code == 0


def test_merge_sum_reduction(cli, shards, tmp_path):
    parts = [
        run_compute(MLP, [s], tmp_path / f"s{i}.npz", dtype="float64", reduction="sum")
        for i, s in enumerate(shards[:2])
    ]
    out = tmp_path / "sum.npz"
    assert cli("merge", *parts, "-o", out, "-q").code == 0
    meta, arr = load_result(out)
    ref = reference(MLP[0], MLP[1], shards[:2], "mse", reduction="sum")
    assert_close_matrix(arr["hessian"], ref.hessian, 1e-10, "merge (sum) vs torch.func", ref)
    assert meta["reduction"] == "sum" and meta["n_loss_terms"] == 350
    assert [i["weight"] for i in meta["inputs"]] == [1.0, 1.0]


def test_merge_block_mode_float32(cli, tmp_path):
    img = torch.load(SAMPLES / "digits_images.pt", weights_only=True)
    data = []
    for i, (lo, hi) in enumerate(((0, 40), (40, 65))):
        p = tmp_path / f"img{i}.pt"
        torch.save({"inputs": img["inputs"][lo:hi].clone(), "targets": img["targets"][lo:hi].clone()}, p)
        data.append(p)
    parts = [run_compute(CNN, [p], tmp_path / f"b{i}.npz", mode="block") for i, p in enumerate(data)]
    out = tmp_path / "blocks.npz"
    r = cli("merge", *parts, "-o", out, "--json")
    assert r.code == 0, r.err
    assert r.json["approximation"] == "block-diagonal"
    meta, arr = load_result(out)
    _, one = load_result(run_compute(CNN, data, tmp_path / "one.npz", mode="block"))
    ref = reference(CNN[0], CNN[1], data, "cross_entropy")
    assert meta["mode"] == "block" and meta["dtype"] == "float32"
    total = 0.0
    for name, a, b in zip(arr["block_names"], arr["block_offsets"][:-1], arr["block_offsets"][1:], strict=True):
        H = arr[f"blocks/{name}/hessian"]
        assert H.dtype == np.float32
        assert_close_matrix(H, one[f"blocks/{name}/hessian"], 1e-5, f"merge vs one run, block {name}")
        assert_close_matrix(H, ref.hessian[a:b, a:b], 1e-5, f"merge vs torch.func, block {name}")
        ev = np.linalg.eigvalsh(ref.hessian[a:b, a:b])
        np.testing.assert_allclose(arr[f"blocks/{name}/eigenvalues"], ev, rtol=0, atol=1e-5 * np.abs(ev).max())
        total += float(arr[f"blocks/{name}/trace"])
    assert float(arr["trace"]) == pytest.approx(np.trace(ref.hessian), rel=1e-5)
    assert total == pytest.approx(float(arr["trace"]), rel=1e-12)


@pytest.fixture(scope="module")
def other_model(work) -> Path:
    sd = torch.load(MLP[1], weights_only=True)
    sd["fc2.bias"] = sd["fc2.bias"] + 0.01
    p = work / "other_weights.pt"
    torch.save(sd, p)
    return p


@pytest.fixture(scope="module")
def unit_shard(work) -> Path:
    """Diabetes samples with targets squashed into [0, 1], as bce_with_logits needs."""
    d = torch.load(SAMPLES / "diabetes.pt", weights_only=True)
    p = work / "unit.pt"
    torch.save({"inputs": d["inputs"][200:260].clone(), "targets": torch.sigmoid(d["targets"][200:260])}, p)
    return p


VARIANTS = {
    "model": ({"model": "OTHER"}, "different models (sha256"),
    "params": ({"params": "fc1"}, "different parameters"),
    "loss": ({"loss": "bce_with_logits", "shard": "unit"}, "different losses (mse vs bce_with_logits)"),
    "reduction": ({"reduction": "sum"}, "different reductions (mean vs sum)"),
    "dtype": ({"dtype": "float32"}, "different dtypes (float64 vs float32)"),
    "mode": ({"mode": "block"}, "different modes (full vs block)"),
    "no_dense": ({"no_dense": True}, "no dense matrices (computed with --no-dense)"),
    "same_data": ({"shard": 0}, "its samples would count twice"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_refuses_mismatches(cli, variant, shards, per_shard, other_model, unit_shard, tmp_path):
    kw, message = VARIANTS[variant]
    kw = dict(kw)
    which = kw.pop("shard", 1)
    shard = unit_shard if which == "unit" else shards[which]
    kw.setdefault("dtype", "float64")
    if kw.get("model") == "OTHER":
        kw["model"] = other_model
    other = run_compute(MLP, [shard], tmp_path / "other.npz", **kw)
    out = tmp_path / "merged.npz"
    r = cli("merge", per_shard[0], other, "-o", out)
    assert r.code == 1, r.err
    assert message in r.err
    assert r.err.count("Error:") == 1 and "Traceback" not in r.err
    assert not out.exists()


def test_merge_usage(cli, per_shard, tmp_path):
    out = tmp_path / "m.npz"
    r = cli("merge", per_shard[0], "-o", out)
    assert r.code == 2 and "at least two result files" in r.err
    r = cli("merge", per_shard[0], per_shard[1])
    assert r.code == 2 and "needs -o" in r.err
    r = cli("merge", per_shard[0], per_shard[0], "-o", out)
    assert r.code == 2 and "given twice" in r.err
    out.write_bytes(b"keep")
    r = cli("merge", per_shard[0], per_shard[1], "-o", out)
    assert r.code == 1 and "exists; pass --force" in r.err
    assert out.read_bytes() == b"keep"
    r = cli("merge", per_shard[0], per_shard[1], "-o", out, "--force", "-q")
    assert r.code == 0 and load_result(out)[0]["command"] == "merge"
    spec = tmp_path / "spectrum.npz"
    assert cli("spectrum", per_shard[1], "-o", spec, "-q", "--top-k", "2").code == 0
    r = cli("merge", per_shard[0], spec, "-o", tmp_path / "z.npz")
    assert r.code == 1 and "written by 'spectrum', not by 'compute'" in r.err
    not_result = tmp_path / "x.npz"
    np.savez(not_result, a=np.zeros(2))
    r = cli("merge", per_shard[0], not_result, "-o", tmp_path / "y.npz")
    assert r.code == 1 and "not a hesscli result" in r.err
