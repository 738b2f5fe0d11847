"""``hesscli compute``, ``show`` and ``inspect`` as a user meets them: the JSON document, the result
file's schema (SPEC.md), block mode against full mode, ``--no-dense``, ``--eigenvectors``, the
memory budget of ``--mode auto``, ``--force``, the negative-eigenvalue threshold and
``--no-symmetry``. Numbers are checked against the float64 reference or against the full matrix."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re

import numpy as np
import pytest
import torch
from conftest import SAMPLES, load_result, run_subprocess
from reference import assert_close_matrix, sample_reference

MODEL = SAMPLES / "diabetes_mlp.pt2"
DATA = SAMPLES / "diabetes.pt"
REQUIRED_JSON = ("out", "mode", "n_params", "n_samples", "loss", "trace", "lambda_max", "lambda_min", "n_negative",
                 "blocks", "seconds")
META_FIELDS = ("schema", "hesscli_version", "torch_version", "command_line", "created", "model", "data", "loss",
               "reduction", "n_samples", "n_loss_terms", "params", "dtype", "device", "mode", "max_memory", "chunk_size",
               "seed", "seconds", "hvps", "asymmetry", "negative_threshold", "world_size")


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def full64(tmp_path_factory):
    """The diabetes sample, full mode, float64 (computed once for this module)."""
    from hesscli.cli import main

    out = tmp_path_factory.mktemp("full") / "full.npz"
    assert main(["compute", str(MODEL), "--data", str(DATA), "--mode", "full", "--dtype", "float64", "--quiet",
                 "-o", str(out)]) == 0
    return out


# ---------------------------------------------------------------------------------------------
# the JSON document and the human output


def test_json_document(cli, tmp_path):
    out = tmp_path / "h.npz"
    r = cli("compute", MODEL, "--data", DATA, "-o", out, "--json")
    assert r.code == 0, r.err
    assert r.out.count("\n") == 1 and r.out.endswith("\n")  # stdout holds exactly one JSON object
    doc = r.json  # strict: NaN or Infinity would raise
    for key in REQUIRED_JSON:
        assert key in doc, key
    assert doc["out"] == str(out) and doc["mode"] == "full" and doc["loss"] == "mse"
    assert doc["n_params"] == 225 and doc["n_samples"] == 442
    assert isinstance(doc["seconds"], float) and doc["seconds"] > 0
    assert [b["name"] for b in doc["blocks"]] == ["all"]
    # the human summary went to stderr: the table and where the file went
    assert "wrote" in r.err and str(out.name) in r.err and "λmax" in r.err
    ref = sample_reference("diabetes_mlp")
    assert doc["lambda_max"] == pytest.approx(ref.eigenvalues[-1], rel=1e-5)
    assert doc["trace"] == pytest.approx(np.trace(ref.hessian), abs=1e-5 * ref.abs_sum)


def test_quiet_prints_nothing_on_stderr(cli, tmp_path):
    r = cli("compute", MODEL, "--data", DATA, "-o", tmp_path / "h.npz", "--quiet")
    assert r.code == 0 and r.err == "" and r.out == ""
    r = cli("compute", MODEL, "--data", DATA, "-o", tmp_path / "h2.npz", "--quiet", "--json")
    assert r.code == 0 and r.err == ""
    assert r.json["n_params"] == 225


@pytest.mark.slow  # two processes, each importing torch: make test
def test_end_to_end_process(tmp_path):
    """``python -m hesscli`` as a real process: stdout is only JSON, ``--quiet`` keeps stderr empty."""
    out = tmp_path / "h.npz"
    r = run_subprocess("compute", MODEL, "--data", DATA, "-o", out, "--json", "--quiet", "--dtype", "float64")
    assert r.code == 0, r.err
    assert r.err == ""
    doc = r.json
    assert doc["out"] == str(out) and out.exists()
    meta, arrays = load_result(out)
    assert doc["trace"] == pytest.approx(float(arrays["trace"]), rel=1e-12)
    r = run_subprocess("show", out, "--json")
    assert r.code == 0, r.err
    assert r.json["trace"] == doc["trace"]


def test_json_has_no_nan(cli, tmp_path):
    """A non-finite number is null in JSON (SPEC.md): summarize a result whose meta holds NaN."""
    from hesscli.io.resultfile import json_safe, summarize

    doc = json_safe({"a": float("nan"), "b": [float("inf"), np.float32("-inf"), 1.5], "c": np.float64(2.0)})
    assert doc == {"a": None, "b": [None, None, 1.5], "c": 2.0}
    out = tmp_path / "h.npz"
    assert cli("compute", MODEL, "--data", DATA, "-o", out, "--quiet").code == 0
    meta, arrays = load_result(out)
    meta["asymmetry"] = float("nan")
    s = summarize(arrays, meta, out=str(out))
    json.dumps(s, allow_nan=False)
    assert s["asymmetry"] is None


# ---------------------------------------------------------------------------------------------
# the result file


def test_result_schema(cli, tmp_path):
    out = tmp_path / "h.npz"
    r = cli("compute", MODEL, "--data", DATA, "-o", out, "--json", "--quiet", "--seed", "3")
    assert r.code == 0, r.err
    with np.load(out, allow_pickle=False) as z:  # every array numeric or unicode
        keys = set(z.files)
        arrays = {k: z[k] for k in z.files}
    assert keys == {"meta", "param_names", "param_offsets", "block_names", "block_offsets", "trace", "eigenvalues",
                    "hessian"}
    for k, a in arrays.items():
        assert a.dtype.kind in "iufU", (k, a.dtype)
    P = 225
    names = ["fc1.weight", "fc1.bias", "norm.weight", "norm.bias", "fc2.weight", "fc2.bias"]
    assert arrays["meta"].shape == () and arrays["meta"].dtype.kind == "U"
    assert arrays["param_names"].tolist() == names and arrays["param_names"].dtype.kind == "U"
    assert arrays["param_offsets"].dtype == np.int64 and arrays["param_offsets"].tolist() == [0, 160, 176, 192, 208, 224, 225]
    assert arrays["block_names"].tolist() == ["all"] and arrays["block_offsets"].tolist() == [0, P]
    assert arrays["block_offsets"].dtype == np.int64
    assert arrays["trace"].shape == () and arrays["trace"].dtype == np.float64
    assert arrays["eigenvalues"].shape == (P,) and arrays["eigenvalues"].dtype == np.float64
    assert np.all(np.diff(arrays["eigenvalues"]) >= 0)
    assert arrays["hessian"].shape == (P, P) and arrays["hessian"].dtype == np.float32
    np.testing.assert_array_equal(arrays["hessian"], arrays["hessian"].T)

    meta = json.loads(str(arrays["meta"][()]))
    for key in META_FIELDS:
        assert key in meta, key
    assert meta["schema"] == "hesscli/1"
    assert meta["torch_version"] == torch.__version__
    import hesscli

    assert meta["hesscli_version"] == hesscli.__version__
    assert "compute" in meta["command_line"]
    created = dt.datetime.fromisoformat(meta["created"].replace("Z", "+00:00"))
    assert created.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.timezone.utc) - created).total_seconds()) < 3600
    assert meta["model"]["path"].endswith("diabetes_mlp.pt2") and meta["model"]["format"] == "export"
    assert meta["model"]["sha256"] == sha256(MODEL)
    assert meta["data"] == [{"path": meta["data"][0]["path"], "sha256": sha256(DATA), "n_samples": 442}]
    assert meta["loss"] == "mse" and meta["reduction"] == "mean"
    assert meta["n_samples"] == 442 and meta["n_loss_terms"] == 442
    assert meta["params"] == [{"name": n, "shape": list(s)} for n, s in
                              zip(names, [(16, 10), (16,), (16,), (16,), (1, 16), (1,)])]
    assert meta["dtype"] == "float32" and meta["device"] == "cpu" and meta["mode"] == "full"
    assert meta["seed"] == 3 and meta["world_size"] == 1
    assert isinstance(meta["max_memory"], int) and meta["max_memory"] > 0
    assert isinstance(meta["chunk_size"], int) and meta["chunk_size"] >= 1
    assert meta["hvps"] >= P
    assert 0 <= meta["asymmetry"] < 1e-3
    # summary in the JSON is the file's
    assert r.json["trace"] == pytest.approx(float(arrays["trace"]), rel=1e-12)


def test_negative_threshold(cli, tmp_path):
    """n_negative counts eigenvalues below −τ, τ = ‖H‖₂·√P·ε of the dtype used (recorded in meta)."""
    for dtype in ("float32", "float64"):
        out = tmp_path / f"h_{dtype}.npz"
        r = cli("compute", MODEL, "--data", DATA, "-o", out, "--json", "--quiet", "--dtype", dtype)
        assert r.code == 0, r.err
        meta, arrays = load_result(out)
        ev = arrays["eigenvalues"]
        tau = np.abs(ev).max() * np.sqrt(len(ev)) * np.finfo(np.dtype(dtype)).eps
        assert meta["negative_threshold"] == pytest.approx(tau, rel=1e-12)
        assert r.json["negative_threshold"] == pytest.approx(tau, rel=1e-12)
        assert r.json["n_negative"] == int((ev < -tau).sum())
        # the threshold matters here: some eigenvalues are negative only by rounding (in [−τ, 0)), and
        # n_negative does not count them (95 below zero, 81 below −τ on this sample in float32)
        if dtype == "float32":
            assert int(((ev >= -tau) & (ev < 0)).sum()) > 0
            assert int((ev < 0).sum()) > r.json["n_negative"]


def test_existing_output_needs_force(cli, tmp_path):
    out = tmp_path / "h.npz"
    out.write_bytes(b"precious")
    r = cli("compute", MODEL, "--data", DATA, "-o", out, "--quiet")
    assert r.code == 1
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "--force" in lines[0] and str(out) in lines[0]
    assert "Traceback" not in r.err
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.npz"]
    r = cli("compute", MODEL, "--data", DATA, "-o", out, "--quiet", "--force")
    assert r.code == 0, r.err
    load_result(out)


def test_no_symmetry_same_matrix(cli, tmp_path, full64):
    out = tmp_path / "h.npz"
    r = cli("compute", MODEL, "--data", DATA, "-o", out, "--mode", "full", "--dtype", "float64", "--no-symmetry",
            "--json", "--quiet")
    assert r.code == 0, r.err
    _, a = load_result(out)
    _, b = load_result(full64)
    assert_close_matrix(a["hessian"], b["hessian"], 1e-12, "--no-symmetry vs default")
    ref = sample_reference("diabetes_mlp")
    assert_close_matrix(a["hessian"], ref.hessian, 1e-10, "--no-symmetry vs reference", ref)


# ---------------------------------------------------------------------------------------------
# block mode, --no-dense, --eigenvectors


@pytest.mark.parametrize("by,expected", [
    ("module", ["fc1", "norm", "fc2"]),
    ("tensor", ["fc1.weight", "fc1.bias", "norm.weight", "norm.bias", "fc2.weight", "fc2.bias"]),
])
def test_block_mode_is_the_diagonal_blocks(cli, tmp_path, full64, by, expected):
    out = tmp_path / "b.npz"
    r = cli("compute", MODEL, "--data", DATA, "-o", out, "--mode", "block", "--blocks", by, "--dtype", "float64",
            "--json", "--quiet")
    assert r.code == 0, r.err
    meta, arrays = load_result(out)
    _, full = load_result(full64)
    H = full["hessian"]
    assert meta["mode"] == "block" and r.json["mode"] == "block"
    assert r.json["approximation"] == "block-diagonal"
    assert arrays["block_names"].tolist() == expected
    offs = arrays["block_offsets"].tolist()
    assert offs[0] == 0 and offs[-1] == 225 and len(offs) == len(expected) + 1
    assert "hessian" not in arrays and "eigenvalues" not in arrays
    lmax, lmin, traces = [], [], []
    for name, a, b in zip(expected, offs[:-1], offs[1:]):
        Hb = arrays[f"blocks/{name}/hessian"]
        assert_close_matrix(Hb, H[a:b, a:b], 1e-12, f"block {name}")
        ev = arrays[f"blocks/{name}/eigenvalues"]
        ev_ref = np.linalg.eigvalsh(H[a:b, a:b])
        assert np.abs(ev - ev_ref).max() <= 1e-10 * np.abs(ev_ref).max()
        assert float(arrays[f"blocks/{name}/trace"]) == pytest.approx(np.trace(H[a:b, a:b]), rel=1e-10, abs=1e-14)
        lmax.append(ev_ref[-1])
        lmin.append(ev_ref[0])
        traces.append(np.trace(H[a:b, a:b]))
    # the diagonal blocks hold the whole diagonal; λmax and λmin are those of the blocks
    assert float(arrays["trace"]) == pytest.approx(np.trace(H), rel=1e-10)
    assert r.json["trace"] == pytest.approx(np.trace(H), rel=1e-10)
    assert r.json["lambda_max"] == pytest.approx(max(lmax), rel=1e-10)
    assert r.json["lambda_min"] == pytest.approx(min(lmin), rel=1e-8, abs=1e-12)
    assert [b["name"] for b in r.json["blocks"]] == expected
    for b, t in zip(r.json["blocks"], traces):
        assert b["trace"] == pytest.approx(t, rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("mode", ["full", "block"])
def test_no_dense_and_eigenvectors(cli, tmp_path, full64, mode):
    _, full = load_result(full64)
    H = full["hessian"]
    out = tmp_path / "e.npz"
    r = cli("compute", MODEL, "--data", DATA, "-o", out, "--mode", mode, "--dtype", "float64", "--eigenvectors",
            "--no-dense", "--json", "--quiet")
    assert r.code == 0, r.err
    meta, arrays = load_result(out)
    assert not any(k == "hessian" or k.endswith("/hessian") for k in arrays)
    scale = np.abs(np.linalg.eigvalsh(H)).max()
    if mode == "full":
        pieces = [("", 0, 225)]
    else:
        offs = arrays["block_offsets"].tolist()
        pieces = [(f"blocks/{n}/", a, b) for n, a, b in zip(arrays["block_names"].tolist(), offs[:-1], offs[1:])]
    for prefix, a, b in pieces:
        w, V = arrays[prefix + "eigenvalues"], arrays[prefix + "eigenvectors"]
        Hb = H[a:b, a:b]
        assert V.shape == (b - a, b - a)
        assert np.abs(Hb @ V - V * w).max() <= 1e-10 * scale  # H v = λ v, column by column
        assert np.abs(V.T @ V - np.eye(b - a)).max() <= 1e-10
        assert np.abs(w - np.linalg.eigvalsh(Hb)).max() <= 1e-10 * scale
    assert r.json["trace"] == pytest.approx(np.trace(H), rel=1e-10)


# ---------------------------------------------------------------------------------------------
# the memory budget of --mode auto


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory):
    """200 digits: with --params 'fc2|fc3' (P = 1,386) the matrices, not the graph, fill the budget."""
    d = torch.load(SAMPLES / "digits.pt", weights_only=True)
    p = tmp_path_factory.mktemp("digits") / "digits200.pt"
    torch.save({"inputs": d["inputs"][:200].clone(), "targets": d["targets"][:200].clone()}, p)
    return p


def test_auto_mode_picks_block_under_a_small_budget(cli, tmp_path, small_digits):
    """Full needs P² = 1,386² entries (≈ 38 MB with its eigendecomposition), the largest block (fc2,
    1,056) about 23 MB: a 30 MB budget gets block mode (the default budget gets full mode:
    test_json_document)."""
    args = ["compute", SAMPLES / "digits_mlp.pt2", "--data", small_digits, "--params", "fc2|fc3", "--json", "--quiet"]
    r = cli(*args, "-o", tmp_path / "b.npz", "--max-memory", "30MB")
    assert r.code == 0, r.err
    assert r.json["mode"] == "block"
    meta, arrays = load_result(tmp_path / "b.npz")
    assert meta["mode"] == "block" and meta["max_memory"] == 30_000_000
    assert arrays["block_names"].tolist() == ["fc2", "fc3"]
    assert r.json["approximation"] == "block-diagonal"
    assert [b["name"] for b in r.json["blocks"]] == ["fc2", "fc3"]


def test_auto_mode_tiny_budget_exits_3(cli, tmp_path, small_digits):
    out = tmp_path / "h.npz"
    args = ["compute", SAMPLES / "digits_mlp.pt2", "--data", small_digits, "--params", "fc2|fc3", "-o", out]
    for extra in (["--max-memory", "1MB"], ["--max-memory", "1MB", "--mode", "full"], ["--max-memory", "30MB", "--mode", "full"]):
        r = cli(*args, *extra)
        assert r.code == 3, (extra, r.err)
        lines = [ln for ln in r.err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:"), r.err
        assert "--max-memory" in lines[0] and "spectrum" in lines[0]
        assert not out.exists()
        assert list(tmp_path.iterdir()) == []
    # an existing file stays as it was
    out.write_bytes(b"keep")
    r = cli(*args, "--max-memory", "1MB", "--force")
    assert r.code == 3 and out.read_bytes() == b"keep"


# ---------------------------------------------------------------------------------------------
# show and inspect


NUMERIC = ("trace", "lambda_max", "lambda_min", "n_negative", "n_params", "n_samples", "n_loss_terms",
           "negative_threshold", "asymmetry", "hvps")


@pytest.mark.parametrize("mode", ["full", "block"])
def test_show_prints_the_same_summary(cli, tmp_path, mode):
    out = tmp_path / "h.npz"
    r = cli("compute", MODEL, "--data", DATA, "-o", out, "--mode", mode, "--json", "--quiet")
    assert r.code == 0, r.err
    computed = r.json
    s = cli("show", out, "--json")
    assert s.code == 0, s.err
    shown = s.json
    for key in NUMERIC + ("mode", "loss", "reduction", "dtype", "approximation"):
        assert shown[key] == computed[key], key
    assert shown["blocks"] == computed["blocks"]
    # the human table on stderr names every block and the totals
    s = cli("show", out)
    assert s.code == 0 and s.out == ""
    for b in computed["blocks"]:
        assert b["name"] in s.err
    assert "λmax" in s.err


def test_inspect_lists_parameters_and_memory(cli):
    ref = sample_reference("diabetes_mlp")
    r = cli("inspect", MODEL, "--json")
    assert r.code == 0, r.err
    doc = r.json
    assert doc["n_params"] == ref.P
    assert [p["name"] for p in doc["params"]] == ref.names
    assert [tuple(p["shape"]) for p in doc["params"]] == ref.shapes
    assert [p["size"] for p in doc["params"]] == list(np.diff(ref.offsets))
    assert [b["name"] for b in doc["blocks"]] == ["fc1", "norm", "fc2"]
    assert [b["size"] for b in doc["blocks"]] == [176, 32, 17]
    # full mode stores a P×P float32 matrix at least; block mode at least its blocks
    assert doc["full_bytes"] >= ref.P**2 * 4
    assert doc["block_bytes"] >= (176**2 + 32**2 + 17**2) * 4
    assert doc["full_bytes"] > doc["block_bytes"]
    # with data: the loss and the sample count too
    r = cli("inspect", MODEL, "--data", DATA, "--json")
    assert r.code == 0, r.err
    assert r.json["n_samples"] == 442 and r.json["loss"] == "mse"
    assert r.json["loss_value"] == pytest.approx(ref.loss_value, rel=1e-5)
    # the table on stderr
    r = cli("inspect", MODEL)
    assert r.code == 0 and r.out == ""
    for name in ref.names:
        assert name in r.err
    assert re.search(r"full\s+mode\s+needs\s+about", r.err)
