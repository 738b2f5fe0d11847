"""Issue 10: the cases from public reports (``tests/cases/``, copies of ``../shared/cases/``), each
run as its README says, against an independent float64 reference, plus the variants of each case.

The cases' ``make.py`` scripts train small models on scikit-learn data; a session fixture runs them
once into a temporary folder (nothing generated is committed). Every command runs in-process in
the case's folder (``--arch archs.py:...`` is relative to it) with ``--json --quiet``: on success
stderr must be empty (SPEC.md, fd-level, so C++ warnings count) and stdout one strict JSON object.

The reference (``case_models.plain_hessian``) is the eager model of the case's ``archs.py`` cast to
float64, the loss over the whole data set, differentiated by plain autograd double backward (one
``autograd.grad`` per row of the gradient). SPEC.md's float32 promise is asserted: max|ΔH| ≤
1e-5·max|H|, eigenvalues within 1e-5·‖H‖₂, the trace within 1e-5·Σ|λ|. The READMEs' 6-digit λmax
figures are checked loosely (relative 1e-4), as an anchor that the case built as documented.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from case_models import (
    CustomHparams,
    Ref,
    Run,
    check_full,
    check_top,
    load_npz,
    model_ref,
    notes_text,
    ok,
    plain_hessian,
    rel_close,
    runner,
    to64,
)

HERE = Path(__file__).resolve().parent
CASES_SRC = HERE / "cases"
CASE_MODELS = HERE / "case_models.py"

# λmax of the READMEs' float64 references, 6 significant digits
README_LMAX = {
    "rnn": 11.3243,
    "tied": 4.83261,
    "w235": 0.301902,
    "inverse": 0.286737,
    "pieces50": 0.286751,
    "structured": 0.874725,
    "dp": 0.677749,
    "export": 0.961652,
    "frozen": 105.626,
    "frozen_head": 0.149415,
    "embedding": 0.863142,
}
RNN_TOP3 = (2.20079, 3.58311, 11.3243)


# ---------------------------------------------------------------------------------------------
# building the cases, running the CLI


@pytest.fixture(scope="session")
def cases(tmp_path_factory) -> Path:
    """Every case's make.py run once, in one process, into a temporary folder."""
    pytest.importorskip("sklearn", reason="the cases' make.py need scikit-learn (the dev extra)")
    out = tmp_path_factory.mktemp("cases")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, "-W", "ignore", str(CASES_SRC / "build.py"), str(out)],
                       capture_output=True, text=True, env=env, timeout=900)
    if p.returncode != 0:
        pytest.fail(f"building the cases failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    return out


@pytest.fixture
def hess(cases, capfd, caplog, monkeypatch):
    """``hess(case, *argv)``: ``hesscli.cli.main(argv + ['--json', '--quiet'])`` in the case's folder;
    stdout/stderr captured at the file-descriptor level, torch's log records collected."""
    run = runner(capfd, caplog)

    def in_case(case: str, *argv, **kw) -> Run:
        monkeypatch.chdir(cases / case)
        return run(*argv, **kw)

    return in_case


# ---------------------------------------------------------------------------------------------
# references (computed once per session)


def _archs(cases: Path, case: str):
    name = f"_issue10_archs_{case.replace('-', '_')}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, cases / case / "archs.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _data(path: Path, x="inputs", y="targets"):
    d = torch.load(path, weights_only=True)
    return d[x], d[y]


def _weighted_ref(cases: Path, weights: str, pieces: int | None) -> Ref:
    from safetensors.torch import load_file

    c = cases / "weighted-loss-model"
    arch = _archs(cases, "weighted-loss-model")
    m = arch.WeightedWine()
    m.load_state_dict(load_file(c / weights))
    m.eval()
    x, y = _data(c / "wine.pt")
    x = to64(x)

    def loss(mm):
        z = mm.logits(x)
        cw = mm.class_weights
        if pieces is None:  # the model's own loss on the whole data set
            return F.cross_entropy(z, y, weight=cw, label_smoothing=0.1)
        # SPEC.md for a mean-returning model in pieces: each piece's mean weighted by its sample count
        return sum(F.cross_entropy(z[i:i + pieces], y[i:i + pieces], weight=cw, label_smoothing=0.1) * len(y[i:i + pieces])
                   for i in range(0, len(y), pieces)) / len(y)

    return plain_hessian(m, loss, ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"])


def _build_ref(cases: Path, key: str) -> Ref:
    from safetensors.torch import load_file, load_model

    if key == "rnn":
        m = _archs(cases, "rnn").DigitsGRU()
        m.load_state_dict(load_file(cases / "rnn" / "gru.safetensors"))
        return model_ref(m.eval(), *_data(cases / "rnn" / "rows.pt"))
    if key == "tied":
        m = _archs(cases, "tied-weights").TiedLM()
        load_model(m, cases / "tied-weights" / "tied_save_model.safetensors")  # restores the tie
        assert m.head.weight is m.emb.weight
        return model_ref(m.eval(), *_data(cases / "tied-weights" / "seq.pt", "input_ids", "labels"))
    if key == "w235":
        return _weighted_ref(cases, "weighted_w235.safetensors", None)
    if key == "inverse":
        return _weighted_ref(cases, "weighted.safetensors", None)
    if key == "pieces50":
        return _weighted_ref(cases, "weighted.safetensors", 50)
    if key == "structured":
        m = _archs(cases, "structured-outputs").DataclassOut()
        m.load_state_dict(load_file(cases / "structured-outputs" / "iris.safetensors"))
        x, y = _data(cases / "structured-outputs" / "iris.pt")
        return plain_hessian(m.eval(), lambda mm: mm(to64(x), y).loss)
    if key == "dp":
        m = _archs(cases, "dataparallel-prefix").WineMLP()
        sd = torch.load(cases / "dataparallel-prefix" / "dp_state_dict.pt", weights_only=True)
        assert all(k.startswith("module.") for k in sd)
        m.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})
        return model_ref(m.eval(), *_data(cases / "dataparallel-prefix" / "wine.pt"))
    if key == "export":
        m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        m.load_state_dict(torch.load(cases / "export-static-batch" / "mlp_state_dict.pt", weights_only=True))
        return model_ref(m.eval(), *_data(cases / "export-static-batch" / "iris.pt"))
    if key in ("frozen", "frozen_head"):
        m = _archs(cases, "frozen-params").FrozenBackbone()
        m.load_state_dict(load_file(cases / "frozen-params" / "frozen.safetensors"))
        select = ["head.weight", "head.bias"] if key == "frozen_head" else [n for n, _ in m.named_parameters()]
        return model_ref(m.eval(), *_data(cases / "frozen-params" / "digits.pt"), select=select)
    if key == "embedding":
        m = _archs(cases, "embedding").EmbBoW()  # dense: the same function as sparse=True
        m.load_state_dict(load_file(cases / "embedding" / "emb.safetensors"))
        return model_ref(m.eval(), *_data(cases / "embedding" / "tokens.pt", "input_ids", "labels"))
    raise KeyError(key)


_REFS: dict[tuple[str, str], Ref] = {}


@pytest.fixture
def ref(cases):
    def get(key: str) -> Ref:
        k = (str(cases), key)
        if k not in _REFS:
            r = _build_ref(cases, key)
            assert rel_close(r.eig[-1], README_LMAX[key]), f"{key}: reference λmax {r.eig[-1]:.6g}, README {README_LMAX[key]}"
            _REFS[k] = r
        return _REFS[k]

    return get


def check_compute(r: Run, path: Path, reference: Ref, key: str, label: str = "") -> tuple[dict, dict]:
    doc = ok(r)
    meta = check_full(path, reference, label=label or key)
    assert rel_close(doc["lambda_max"], README_LMAX[key]), (label, doc["lambda_max"], README_LMAX[key])
    return doc, meta


# ---------------------------------------------------------------------------------------------
# every README command as written: right figures, quiet stderr, strict JSON

W = "weighted-loss-model"
README_COMMANDS = [
    pytest.param("rnn", ["compute", "gru.ts.pt", "--data", "rows.pt"], "rnn", id="rnn-compute", marks=pytest.mark.slow),
    pytest.param("rnn", ["spectrum", "gru.ts.pt", "--data", "rows.pt", "--top-k", "3"], "rnn", id="rnn-spectrum",
                 marks=pytest.mark.slow),
    pytest.param("tied-weights", ["compute", "tied.ts.pt", "--data", "seq.pt"], "tied", id="tied-torchscript"),
    pytest.param("tied-weights", ["compute", "tied_save_model.safetensors", "--arch", "archs.py:TiedLM", "--data", "seq.pt"],
                 "tied", id="tied-save_model"),
    pytest.param(W, ["compute", "weighted_w235.safetensors", "--arch", "archs.py:WeightedWine", "--arch-kwargs",
                     '{"returns": "pair"}', "--loss", "model", "--data", "wine.pt", "--batch-size", "10"],
                 "w235", id="weighted-pair-b10"),
    pytest.param(W, ["compute", "weighted.safetensors", "--arch", "archs.py:WeightedWine", "--loss", "model", "--data",
                     "wine.pt", "--batch-size", "50"], "pieces50", id="weighted-mean-b50"),
    pytest.param("structured-outputs", ["compute", "iris.safetensors", "--arch", "archs.py:DataclassOut", "--loss", "model",
                                        "--data", "iris.pt"], "structured", id="structured-loss-model"),
    *[pytest.param("dataparallel-prefix", ["compute", f, "--arch", "archs.py:WineMLP", "--data", "wine.pt"], "dp",
                   id=f"dp-{f}") for f in ("dp_state_dict.pt", "dp_checkpoint.pt", "dp.safetensors")],
    pytest.param("export-static-batch", ["compute", "mlp_static16.pt2", "--data", "iris.pt"], "export", id="export-16"),
    pytest.param("export-static-batch", ["compute", "mlp_static16.pt2", "--data", "iris.pt", "--batch-size", "16"], "export",
                 id="export-16-b16"),
    pytest.param("export-static-batch", ["compute", "mlp_static1.pt2", "--data", "iris.pt", "--batch-size", "1"], "export",
                 id="export-1-b1"),
    pytest.param("frozen-params", ["compute", "frozen.ts.pt", "--data", "digits.pt"], "frozen", id="frozen-compute",
                 marks=pytest.mark.slow),
    pytest.param("frozen-params", ["inspect", "frozen.ts.pt", "--data", "digits.pt"], None, id="frozen-inspect"),
    pytest.param("embedding", ["compute", "emb.safetensors", "--arch", "archs.py:EmbBoW", "--arch-kwargs", '{"sparse": true}',
                               "--data", "tokens.pt"], "embedding", id="embedding-sparse-arch"),
    pytest.param("embedding", ["compute", "emb_sparse.ts.pt", "--data", "tokens.pt"], "embedding",
                 id="embedding-sparse-torchscript"),
]


@pytest.mark.parametrize("case,argv,key", README_COMMANDS)
def test_readme_command(hess, ref, tmp_path, case, argv, key):
    """The README's command, with --json --quiet: exit 0, empty stderr, strict JSON, and the figures
    of the float64 reference (or, for the scripted sparse embedding only, one short refusal that
    names the embedding)."""
    out = tmp_path / "result.npz"
    if argv[0] == "inspect":
        ok(hess(case, *argv))
        return
    r = hess(case, *argv, "-o", out)
    if case == "embedding" and argv[1] == "emb_sparse.ts.pt" and r.code != 0:
        line = r.error_line(max_len=300)  # README: a layer that cannot be differentiated twice is named
        assert "emb" in line.lower(), line
        return
    if argv[0] == "spectrum":
        doc = ok(r)
        meta, a = load_npz(out)
        check_top(a["eigenvalues"], ref(key), label=" ".join(argv))
        assert bool(np.all(a["converged"])), a["converged"]
        for got, want in zip(sorted(a["eigenvalues"]), RNN_TOP3):
            assert rel_close(got, want), (sorted(a["eigenvalues"]), RNN_TOP3)
        return
    doc, meta = check_compute(r, out, ref(key), key, label=" ".join(argv))
    notes = notes_text(doc, meta)
    if key == "tied":
        assert "tied" in meta, sorted(meta)
        assert "head.weight" in json.dumps(meta["tied"]), meta["tied"]
    if key == "dp":
        assert "module." in notes, notes
    if key == "frozen":
        assert doc["n_params"] == 1210
        assert "requires_grad" in notes, notes
    if key == "pieces50":
        assert "(sum, count)" in notes, notes
    if key == "rnn":  # the recurrent weights do get gradients
        assert "no gradient" not in notes, notes


# ---------------------------------------------------------------------------------------------
# tied-weights


def test_tied_export_pt2(hess, ref, cases, tmp_path):
    """A torch.export archive of the tied model (dynamic batch): the Hessian over the deduplicated
    parameters, every use of the shared matrix varied together."""
    from safetensors.torch import load_model

    c = cases / "tied-weights"
    m = _archs(cases, "tied-weights").TiedLM()
    load_model(m, c / "tied_save_model.safetensors")
    m.eval()
    ids = torch.load(c / "seq.pt", weights_only=True)["input_ids"]
    ep = torch.export.export(m, (ids[:8],), dynamic_shapes={"ids": {0: torch.export.Dim("batch")}})
    torch.export.save(ep, tmp_path / "tied.pt2")
    out = tmp_path / "h.npz"
    doc, meta = check_compute(hess("tied-weights", "compute", tmp_path / "tied.pt2", "--data", "seq.pt", "-o", out), out,
                              ref("tied"), "tied", label="tied.pt2")
    assert "head.weight" in json.dumps(meta.get("tied")), meta.get("tied")
    assert "no gradient" not in notes_text(doc, meta)


# ---------------------------------------------------------------------------------------------
# weighted-loss-model

PAIR = ["--arch", "archs.py:WeightedWine", "--arch-kwargs", '{"returns": "pair"}', "--loss", "model", "--data", "wine.pt"]
MEAN = ["--arch", "archs.py:WeightedWine", "--loss", "model", "--data", "wine.pt"]


@pytest.mark.parametrize("batch", [pytest.param(1, marks=pytest.mark.slow), 178])
def test_weighted_pair_any_batch_size(hess, ref, tmp_path, batch):
    """(sum, count) with a real count is exact at every batch size (1: one sample per piece)."""
    out = tmp_path / "h.npz"
    doc, meta = check_compute(hess(W, "compute", "weighted_w235.safetensors", *PAIR, "--batch-size", batch, "-o", out),
                              out, ref("w235"), "w235", label=f"pair, --batch-size {batch}")
    assert doc["n_loss_terms"] == pytest.approx(57.1, rel=1e-6)


def test_weighted_pair_inverse_weights(hess, ref, tmp_path):
    out = tmp_path / "h.npz"
    check_compute(hess(W, "compute", "weighted.safetensors", *PAIR, "--batch-size", 50, "-o", out), out, ref("inverse"),
                  "inverse")


def test_weighted_mean_in_one_piece(hess, ref, tmp_path):
    """In one piece the mean-returning model gives its own loss's Hessian, and nothing to warn about."""
    out = tmp_path / "h.npz"
    doc, meta = check_compute(hess(W, "compute", "weighted.safetensors", *MEAN, "-o", out), out, ref("inverse"), "inverse")
    assert "(sum, count)" not in notes_text(doc, meta)


def test_weighted_mean_in_pieces_warns_on_stderr(hess, tmp_path):
    """Without --quiet the user is told, on stderr, how the pieces are weighted and what is exact."""
    r = hess(W, "compute", "weighted.safetensors", *MEAN, "--batch-size", 50, "-o", tmp_path / "h.npz", quiet=False,
             as_json=False)
    assert r.code == 0, r.err[-2000:]
    assert r.out == ""
    assert "(sum, count)" in " ".join(r.err.split()), r.err


# ---------------------------------------------------------------------------------------------
# structured-outputs

IRIS = ["iris.safetensors", "--data", "iris.pt"]


@pytest.mark.parametrize("loss", [[], ["--loss", "cross_entropy"]], ids=["auto", "cross_entropy"])
def test_structured_logits_field(hess, ref, tmp_path, loss):
    """Without --loss model the prediction is the output's ``logits`` field; its mean cross-entropy
    is the model's own loss, so the figures are the same."""
    out = tmp_path / "h.npz"
    check_compute(hess("structured-outputs", "compute", IRIS[0], "--arch", "archs.py:DataclassOut", *IRIS[1:], *loss, "-o",
                       out), out, ref("structured"), "structured")


VARIANTS = [
    pytest.param("DictLogits", [], id="dict-logits"),
    pytest.param("DictLogits", ["--loss", "cross_entropy"], id="dict-logits-ce"),
    pytest.param("TupleLossLogits", ["--loss", "model"], id="tuple-loss-logits-model"),
    pytest.param("TupleLossLogits", [], id="tuple-one-tensor"),
    pytest.param("NamedTupleOut", [], id="namedtuple-logits"),
    pytest.param("NamedTupleOut", ["--loss", "model"], id="namedtuple-loss-entry"),
    pytest.param("TwoTensorDict", ["--output-key", "scores"], id="dict-output-key"),
    pytest.param("TwoTensorTuple", ["--output-key", "1"], id="tuple-output-index"),
]


@pytest.mark.parametrize("cls,extra", VARIANTS)
def test_structured_output_variants(hess, ref, tmp_path, cls, extra):
    """dict / tuple / named tuple outputs by SPEC.md's rules: all give the mean cross-entropy of the
    iris logits, i.e. the case's reference."""
    out = tmp_path / "h.npz"
    check_compute(hess("structured-outputs", "compute", IRIS[0], "--arch", f"{CASE_MODELS}:{cls}", *IRIS[1:], *extra, "-o",
                       out), out, ref("structured"), "structured", label=f"{cls} {extra}")


def test_structured_ambiguous_output_names_its_entries(hess, tmp_path):
    r = hess("structured-outputs", "compute", IRIS[0], "--arch", f"{CASE_MODELS}:TwoTensorDict", *IRIS[1:], "-o",
             tmp_path / "h.npz")
    line = r.error_line()
    assert "scores" in line and "features" in line, line
    assert not (tmp_path / "h.npz").exists()


def test_structured_unknown_output_key(hess, tmp_path):
    r = hess("structured-outputs", "compute", IRIS[0], "--arch", f"{CASE_MODELS}:TwoTensorDict", *IRIS[1:],
             "--output-key", "nope", "-o", tmp_path / "h.npz")
    assert "nope" in r.error_line()


def test_structured_no_loss_with_loss_model(hess, tmp_path):
    """An output object that holds no loss under --loss model: one line that says so."""
    r = hess("structured-outputs", "compute", IRIS[0], "--arch", f"{CASE_MODELS}:NoLossOut", *IRIS[1:], "--loss", "model",
             "-o", tmp_path / "h.npz")
    assert "loss" in r.error_line(max_len=500)


# ---------------------------------------------------------------------------------------------
# dataparallel-prefix and other checkpoint layouts

DP = ["--arch", "archs.py:WineMLP", "--data", "wine.pt"]


def _plain_state_dict(cases: Path) -> dict:
    sd = torch.load(cases / "dataparallel-prefix" / "dp_state_dict.pt", weights_only=True)
    return {k.removeprefix("module."): v for k, v in sd.items()}


def test_prefix_that_does_not_fit_is_named(hess, cases, tmp_path):
    sd = {f"module.{k}": v for k, v in _plain_state_dict(cases).items() if k != "fc2.bias"}
    torch.save(sd, tmp_path / "bad.pt")
    line = hess("dataparallel-prefix", "compute", tmp_path / "bad.pt", *DP, "-o", tmp_path / "h.npz").error_line()
    assert "module." in line, line


def test_torch_compile_prefix(hess, ref, cases, tmp_path):
    """A state_dict of a ``torch.compile`` module: keys ``_orig_mod.*``."""
    torch.save({f"_orig_mod.{k}": v for k, v in _plain_state_dict(cases).items()}, tmp_path / "compiled.pt")
    out = tmp_path / "h.npz"
    doc, meta = check_compute(hess("dataparallel-prefix", "compute", tmp_path / "compiled.pt", *DP, "-o", out), out,
                              ref("dp"), "dp")
    assert "_orig_mod." in notes_text(doc, meta)


def _lightning(cases: Path, hparams) -> dict:
    return {"epoch": 3, "global_step": 300, "pytorch-lightning_version": "2.4.0", "state_dict": _plain_state_dict(cases),
            "hyper_parameters": hparams, "optimizer_states": [], "lr_schedulers": []}


def test_lightning_checkpoint(hess, ref, cases, tmp_path):
    """A Lightning ``.ckpt``: weights under ``state_dict``, hyper-parameters an argparse.Namespace
    (a harmless global that ``weights_only`` loading may allow)."""
    torch.save(_lightning(cases, argparse.Namespace(lr=0.1, hidden=8)), tmp_path / "model.ckpt")
    out = tmp_path / "h.npz"
    check_compute(hess("dataparallel-prefix", "compute", tmp_path / "model.ckpt", *DP, "-o", out), out, ref("dp"), "dp")


def test_lightning_checkpoint_with_other_global_is_refused(hess, cases, tmp_path):
    torch.save(_lightning(cases, CustomHparams(0.1)), tmp_path / "model.ckpt")
    line = hess("dataparallel-prefix", "compute", tmp_path / "model.ckpt", *DP, "-o", tmp_path / "h.npz").error_line()
    assert "CustomHparams" in line, line


# ---------------------------------------------------------------------------------------------
# export-static-batch


def test_static_export_with_another_batch_size(hess, ref, tmp_path):
    """--batch-size 7 for an archive that accepts exactly 16: either the batch size follows the
    export (same figures, with a note that says 16) or one Error line that says 16."""
    out = tmp_path / "h.npz"
    r = hess("export-static-batch", "compute", "mlp_static16.pt2", "--data", "iris.pt", "--batch-size", 7, "-o", out)
    if r.code == 0:
        doc, meta = check_compute(r, out, ref("export"), "export")
        assert "16" in notes_text(doc, meta), notes_text(doc, meta)
    else:
        assert "16" in r.error_line(), r.err


# ---------------------------------------------------------------------------------------------
# frozen-params


@pytest.mark.parametrize("model", [["frozen.ts.pt"], ["frozen.pt2"], ["frozen.safetensors", "--arch",
                                                                     "archs.py:FrozenBackbone"]],
                         ids=["torchscript", "export", "safetensors"])
def test_trainable_only(hess, ref, tmp_path, model):
    out = tmp_path / "h.npz"
    doc, _ = check_compute(hess("frozen-params", "compute", *model, "--data", "digits.pt", "--trainable-only", "-o", out),
                           out, ref("frozen_head"), "frozen_head")
    assert doc["n_params"] == 170


def test_inspect_marks_frozen_tensors(hess):
    r = hess("frozen-params", "inspect", "frozen.ts.pt", "--data", "digits.pt", quiet=False, as_json=False)
    assert r.code == 0, r.err[-2000:]
    assert "frozen" in (r.out + r.err).lower(), r.out + r.err


# ---------------------------------------------------------------------------------------------
# embedding


@pytest.mark.parametrize("mode,offsets", [("mean", False), ("sum", True)], ids=["mean-2d", "sum-offsets"])
def test_embedding_bag(hess, ref, tmp_path, mode, offsets):
    """nn.EmbeddingBag (2-D bags or flat tokens with offsets; sum divided by the bag length) is the
    case's embedding + mean: the same Hessian."""
    out = tmp_path / "h.npz"
    kwargs = json.dumps({"mode": mode, "offsets": offsets})
    check_compute(hess("embedding", "compute", "emb.safetensors", "--arch", f"{CASE_MODELS}:BagBoW", "--arch-kwargs",
                       kwargs, "--data", "tokens.pt", "-o", out), out, ref("embedding"), "embedding",
                  label=f"EmbeddingBag {mode} offsets={offsets}")
