"""The library is the product (issue 13): every command is a function returning a typed result;
the CLI's ``--json`` is that result's summary; ``hesscli.load`` reads any result file back into its
type; a call on an in-memory module leaves the caller's process as it found it."""

from __future__ import annotations

import copy
import importlib
import sys

import numpy as np
import pytest
import torch

import hesscli
from hesscli.results import ComputeResult, DensityResult, MergeResult, SpectrumResult, TraceResult

ARCH = "sample_checkpoints/archs.py:DiabetesMLP"
VOLATILE = {"seconds", "created", "command_line"}


def _strip(x):
    """A summary without its timings (they differ between two runs of the same work)."""
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


@pytest.fixture(scope="module")
def diabetes(samples):
    return str(samples / "diabetes_mlp.pt"), str(samples / "diabetes.pt")


@pytest.fixture(scope="module")
def halves(samples, tmp_path_factory):
    """The diabetes data in two disjoint shards."""
    d = torch.load(samples / "diabetes.pt")
    tmp = tmp_path_factory.mktemp("halves")
    paths = []
    for i, sl in enumerate((slice(0, 200), slice(200, None))):
        p = tmp / f"half{i}.pt"
        torch.save({k: v[sl] for k, v in d.items()}, p)
        paths.append(str(p))
    return paths


def _same(cli_json: dict, result) -> None:
    assert _strip(cli_json) == _strip(result.summary())


def test_every_command_json_is_the_library_summary(cli, diabetes, halves, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, data = diabetes
    opts = {"dtype": "float64"}
    cases = [
        ("compute", [model, "--data", data, "--dtype", "float64"], lambda: hesscli.compute(model, data, **opts)),
        ("spectrum", [model, "--data", data, "--dtype", "float64", "--top-k", "3"],
         lambda: hesscli.spectrum(model, data, top_k=3, **opts)),
        ("spectrum", [model, "--data", data, "--dtype", "float64", "--top-k", "1", "--per-block"],
         lambda: hesscli.spectrum(model, data, top_k=1, per_block=True, **opts)),
        ("trace", [model, "--data", data, "--dtype", "float64", "--matvecs", "30", "--method", "hutchpp"],
         lambda: hesscli.trace(model, data, matvecs=30, method="hutchpp", **opts)),
        ("density", [model, "--data", data, "--dtype", "float64", "--runs", "2", "--steps", "10"],
         lambda: hesscli.density(model, data, runs=2, steps=10, **opts)),
    ]
    for i, (command, argv, call) in enumerate(cases):
        out = tmp_path / f"{command}{i}.npz"
        r = cli(command, *argv, "-o", out, "--json", "--quiet")
        assert r.code == 0, r.err
        result = call()
        result.save(tmp_path / f"lib{i}.npz")
        result.out = str(out)  # the summary names the file written
        _same(r.json, result)
        loaded = hesscli.load(out)
        assert type(loaded) is type(result)
        _same(r.json, loaded)

    # a result file as the source of spectrum, trace and density
    stored = tmp_path / "compute0.npz"
    for command, argv, call in (
        ("spectrum", ["--top-k", "4"], lambda: hesscli.spectrum(str(stored), top_k=4)),
        ("trace", [], lambda: hesscli.trace(str(stored))),
        ("density", [], lambda: hesscli.density(str(stored))),
    ):
        out = tmp_path / f"{command}-file.npz"
        r = cli(command, stored, *argv, "-o", out, "--json", "--quiet")
        assert r.code == 0, r.err
        result = call()
        result.out = str(out)
        _same(r.json, result)

    # inspect writes no file; merge combines compute results on disjoint shards
    r = cli("inspect", model, "--json", "--quiet")
    assert r.code == 0, r.err
    _same(r.json, hesscli.inspect(model))
    parts = []
    for j, h in enumerate(halves):
        parts.append(tmp_path / f"part{j}.npz")
        hesscli.compute(model, h, **opts).save(parts[-1])
    r = cli("merge", *parts, "-o", tmp_path / "merged.npz", "--json", "--quiet")
    assert r.code == 0, r.err
    merged = hesscli.merge(parts)
    merged.out = str(tmp_path / "merged.npz")
    _same(r.json, merged)
    assert isinstance(hesscli.load(tmp_path / "merged.npz"), MergeResult)


def test_typed_results_carry_shapes(diabetes):
    model, data = diabetes
    h = hesscli.compute(model, data, dtype="float64")
    assert isinstance(h, ComputeResult)
    P = h.summary()["n_params"]
    assert h.eigenvalues.shape == (P,) and h.hessian.shape == (P, P)
    assert h.trace == pytest.approx(float(np.trace(h.hessian)), rel=1e-10)
    s = hesscli.spectrum(model, data, top_k=2, dtype="float64")
    assert isinstance(s, SpectrumResult) and s.eigenvalues.shape == (2,) and s.converged.all()
    assert s.lambda_max == pytest.approx(h.eigenvalues[-1], rel=1e-8)
    t = hesscli.trace(model, data, method="exact", dtype="float64")
    assert isinstance(t, TraceResult) and t.stderr == 0 and t.trace == pytest.approx(h.trace, rel=1e-9)
    d = hesscli.density(model, data, runs=2, steps=8, dtype="float64")
    assert isinstance(d, DensityResult) and d.grid.shape == d.density.shape


def test_unknown_option_is_refused(diabetes):
    model, data = diabetes
    with pytest.raises(hesscli.UsageError, match="unknown option"):
        hesscli.spectrum(model, data, top_k=1, temperature=2)


def test_in_memory_module_matches_the_cli_and_is_left_alone(cli, samples, tmp_path):
    """The notebook example of docs/library.md: an in-memory nn.Module and an (inputs, targets)
    batch give the numbers the CLI gives on the saved checkpoint; the caller's module, the global
    flags, the TorchScript executor and the RNG are as they were."""
    sys.path.insert(0, str(samples))
    archs = importlib.import_module("archs")
    model = archs.DiabetesMLP()
    model.load_state_dict(torch.load(samples / "diabetes_mlp_state_dict.pt"))
    batch = torch.load(samples / "diabetes.pt")
    X, y = batch["inputs"], batch["targets"]
    before = copy.deepcopy(model.state_dict())
    training = model.training
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    executor = torch._C._get_graph_executor_optimize()
    rng = torch.get_rng_state()

    r = hesscli.spectrum(model, (X, y), top_k=1, loss="mse")

    assert r.out is None  # nothing written
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters()) and model.training == training
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
    assert torch._C._get_graph_executor_optimize() == executor
    assert torch.equal(torch.get_rng_state(), rng)

    out = tmp_path / "s.npz"
    c = cli("spectrum", samples / "diabetes_mlp_state_dict.pt", "--arch", ARCH, "--data", samples / "diabetes.pt",
            "--loss", "mse", "--top-k", "1", "-o", out, "--json", "--quiet")
    assert c.code == 0, c.err
    assert c.json["eigenvalues"][0] == pytest.approx(float(r.eigenvalues[0]), rel=1e-6)
    assert r.meta["model"]["format"] == "module"


def test_docs_library_training_loop_runs_and_matches_the_cli(cli, tmp_path, monkeypatch):
    """docs/library.md's training script, run as written (from the repository root's files), and
    the CLI on the checkpoint it saves."""
    from conftest import ROOT

    doc = (ROOT / "docs" / "library.md").read_text()
    code = doc.split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sample_checkpoints").symlink_to(ROOT / "sample_checkpoints")
    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.modules.pop("archs", None)
    scope: dict = {"__name__": "__doc__"}
    exec(compile(code, "docs/library.md", "exec"), scope)
    log = scope["log"]
    assert [s for s, _, _ in log] == [10, 20, 30]
    assert all(res <= 1e-4 * abs(lam) for _, lam, res in log)  # the float32 default tol is 1e-5 or above
    c = cli("spectrum", "diabetes_mlp_step30.pt", "--arch", ARCH, "--data", "sample_checkpoints/diabetes.pt",
            "--loss", "mse", "--top-k", "1", "--json", "--quiet", "-o", "s.npz")
    assert c.code == 0, c.err
    assert c.json["eigenvalues"][0] == pytest.approx(log[-1][1], rel=1e-6)


def test_trace_per_block_shares_its_products(diabetes):
    """trace --per-block on a model: every block's trace from the same --matvecs full products,
    each within 3 standard errors of the dense block's trace."""
    model, data = diabetes
    h = hesscli.compute(model, data, dtype="float64", mode="block")
    t = hesscli.trace(model, data, dtype="float64", per_block=True, method="hutchinson", matvecs=60)
    assert t.matvecs == 60 and t.meta["shared_products"]
    blocks = {b["name"]: b for b in t.summary()["blocks"]}
    assert set(blocks) == set(h.arrays["block_names"])
    for name, b in blocks.items():
        exact = float(h.block(name)["trace"])
        assert abs(b["trace"] - exact) <= 3 * b["stderr"] + 1e-9 * abs(exact), name
    assert abs(t.trace - h.trace) <= 3 * t.stderr


@pytest.mark.slow
def test_track_json_lines_are_the_library_rows(cli, samples, tmp_path):
    """track: each --json line is the library's TrackRow.summary() for that checkpoint."""
    ckpts = [str(samples / "gd_run" / f"step_{s:04d}.pt") for s in (100, 110)]
    data = str(samples / "digits.pt")
    r = cli("track", *ckpts, "--data", data, "-o", tmp_path / "t.npz", "--json", "--quiet")
    assert r.code == 0, r.err
    import json as _json

    lines = [_json.loads(s) for s in r.out.splitlines() if s.strip()]
    rows = list(hesscli.track(ckpts, data))
    assert [row.step for row in rows] == [100, 110]
    assert [_strip(x) for x in lines] == [_strip(row.summary()) for row in rows]


def test_a_reused_session_counts_each_calls_products_and_probes_once(samples):
    s = hesscli.open_session(hesscli.ModelSpec(str(samples / "diabetes_mlp.pt"), data=[str(samples / "diabetes.pt")],
                                               loss="mse"))
    a = hesscli.spectrum(s, top_k=2)
    t = hesscli.trace(s, method="hutchinson", matvecs=10)
    b = hesscli.spectrum(s, top_k=2)
    probe = a.meta["symmetry_probe_hvps"]
    assert probe > 0 and a.meta["hvps"] == a.matvecs + probe
    assert t.meta["hvps"] == 10 and t.meta["symmetry_probe_hvps"] == 0  # checked by the first call
    assert b.meta["hvps"] == b.matvecs and b.meta["symmetry_probe"] == a.meta["symmetry_probe"]


def test_inspect_an_in_memory_module_without_data(samples):
    sys.path.insert(0, str(samples))
    archs = importlib.import_module("archs")
    r = hesscli.inspect(archs.DiabetesMLP())
    assert r.n_params == sum(p.numel() for p in archs.DiabetesMLP().parameters())
    assert r.summary()["model"]["format"] == "module"


def test_a_budget_too_small_for_the_estimators_vectors_names_their_option(samples):
    model, data = str(samples / "digits_mlp.pt"), str(samples / "digits.pt")
    with pytest.raises(hesscli.MemoryBudgetError, match="--matvecs"):
        hesscli.trace(model, data, matvecs=30000, max_memory="40MB")
    with pytest.raises(hesscli.MemoryBudgetError, match="--steps"):
        hesscli.density(model, data, steps=20000, max_memory="40MB")
