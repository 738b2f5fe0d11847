"""Issue 10: each kind of model beyond the one example of a case, against the float64 reference of
the eager model (``case_models.plain_hessian``: plain autograd double backward, one row at a time).

Tiny models (P ≤ ~450, a few samples), saved as users save them: ``torch.jit.script``/``trace``,
``torch.export.save``, ``safetensors.torch.save_model``, ``torch.save`` of a state_dict. Covered:
scripted recurrent layers (LSTM, GRU, several layers, bidirectional, followed by LayerNorm), affine
InstanceNorm and attention inside scripted code, traced models, tied weights in every format, float64
(``--dtype float64``: 1e-10 of max|H|), the load-time derivative self-check (a parameter hidden from
autograd is named), and that the TorchScript path imports neither ``torch._dynamo`` nor
``torch._export.converter``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from case_models import (
    DataParam,
    DetachedParam,
    InstanceNorm1dNet,
    InstanceNorm2dNet,
    LayerNormMLP,
    MHANet,
    SDPANet,
    SeqClassifier,
    TinyTied,
    TinyTiedHeadFirst,
    check_full,
    model_ref,
    notes_text,
    ok,
    runner,
)

ROOT = Path(__file__).resolve().parents[1]
CASE_MODELS = Path(__file__).resolve().parent / "case_models.py"


@pytest.fixture
def run(capfd, caplog):
    return runner(capfd, caplog)


def _save_data(d: Path, x: torch.Tensor, y: torch.Tensor) -> Path:
    p = d / "data.pt"
    torch.save({"inputs": x, "targets": y}, p)
    return p


def _script(model: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(str(path))
    return path


def _trace(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarning
        torch.jit.trace(model, (example,)).save(str(path))
    return path


def _export(model: torch.nn.Module, example: torch.Tensor, path: Path, arg: str) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, (example,), dynamic_shapes={arg: {0: torch.export.Dim("batch")}})
        torch.export.save(ep, path)
    return path


def _compute(run, tmp_path, model_args, data, *extra, ref, tol=1e-5, label=""):
    out = tmp_path / "h.npz"
    doc = ok(run("compute", *model_args, "--data", data, *extra, "-o", out))
    meta = check_full(out, ref, tol=tol, label=label)
    return doc, meta


def _seq_data(n=8, t=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, 2, generator=g), torch.randint(0, 3, (n,), generator=g)


# ---------------------------------------------------------------------------------------------
# scripted recurrent layers


RECURRENT = [
    pytest.param(dict(kind="lstm"), id="lstm"),
    pytest.param(dict(kind="gru", layers=2, bidirectional=True), id="gru-2layers-bidirectional", marks=pytest.mark.slow),
    pytest.param(dict(kind="lstm", layers=2, bidirectional=True), id="lstm-2layers-bidirectional",
                 marks=pytest.mark.slow),
    pytest.param(dict(kind="rnn", norm=True), id="rnn-layernorm"),
    pytest.param(dict(kind="gru", norm=True), id="gru-layernorm"),
]


@pytest.mark.parametrize("cfg", RECURRENT)
def test_scripted_recurrent(run, tmp_path, cfg):
    """A scripted nn.LSTM/GRU/RNN reads its weights through the module's flat weight list: every
    recurrent weight must vary (no zero rows), with or without a LayerNorm after it."""
    torch.manual_seed(1)
    m = SeqClassifier(**cfg).eval()
    x, y = _seq_data(t=3 if cfg.get("layers", 1) > 1 else 4)
    doc, meta = _compute(run, tmp_path, [_script(m, tmp_path / "rnn.pt")], _save_data(tmp_path, x, y),
                         ref=model_ref(m, x, y), label=str(cfg))
    assert "no gradient" not in notes_text(doc, meta)


# ---------------------------------------------------------------------------------------------
# norms and attention inside scripted code; traced models


def _norm_attention_cases():
    g = torch.Generator().manual_seed(2)
    return {
        "instancenorm1d": (InstanceNorm1dNet, torch.randn(8, 2, 6, generator=g)),
        "instancenorm2d": (InstanceNorm2dNet, torch.randn(8, 1, 5, 5, generator=g)),
        "sdpa": (SDPANet, torch.randn(8, 5, 4, generator=g)),
        "multihead_attention": (MHANet, torch.randn(8, 5, 4, generator=g)),
        "layernorm_mlp": (LayerNormMLP, torch.randn(8, 5, generator=g)),
    }


@pytest.mark.parametrize("name", ["instancenorm1d", "instancenorm2d", "sdpa", "multihead_attention"])
def test_scripted_norms_and_attention(run, tmp_path, name):
    """Affine InstanceNorm1d/2d, F.scaled_dot_product_attention and nn.MultiheadAttention called
    from scripted code."""
    cls, x = _norm_attention_cases()[name]
    torch.manual_seed(3)
    m = cls().eval()
    y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(4))
    _compute(run, tmp_path, [_script(m, tmp_path / "m.pt")], _save_data(tmp_path, x, y), ref=model_ref(m, x, y), label=name)


@pytest.mark.parametrize("name", ["layernorm_mlp", "instancenorm2d", "sdpa", "gru"])
def test_traced(run, tmp_path, name):
    """torch.jit.trace archives (the graph recorded on an example batch of another size than the data)."""
    torch.manual_seed(5)
    if name == "gru":
        m = SeqClassifier(kind="gru").eval()
        x, y = _seq_data()
    else:
        cls, x = _norm_attention_cases()[name]
        m = cls().eval()
        y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(6))
    path = _trace(m, x[:3], tmp_path / "traced.pt")
    _compute(run, tmp_path, [path], _save_data(tmp_path, x, y), ref=model_ref(m, x, y), label=f"traced {name}")


def test_scripted_with_every_parameter_frozen(run, tmp_path):
    """A model saved after ``requires_grad_(False)`` (as for inference): by SPEC.md every parameter
    is still included, with a note."""
    torch.manual_seed(7)
    m = LayerNormMLP().eval()
    m.requires_grad_(False)
    _, x = _norm_attention_cases()["layernorm_mlp"]
    y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(8))
    doc, meta = _compute(run, tmp_path, [_script(m, tmp_path / "m.pt")], _save_data(tmp_path, x, y), ref=model_ref(m, x, y))
    assert "requires_grad" in notes_text(doc, meta)


# ---------------------------------------------------------------------------------------------
# tied weights in every format


def _tied_data():
    g = torch.Generator().manual_seed(9)
    return torch.randint(0, 7, (16, 5), generator=g), torch.randint(0, 7, (16, 5), generator=g)


def _tied_model(cls, tmp_path: Path, fmt: str, x: torch.Tensor) -> list:
    torch.manual_seed(10)
    m = cls().eval()
    if fmt == "torchscript":
        return m, [_script(m, tmp_path / "tied.pt")]
    if fmt == "export":
        return m, [_export(m, x[:4], tmp_path / "tied.pt2", "ids")]
    arch = ["--arch", f"{CASE_MODELS}:{cls.__name__}"]
    if fmt == "save_model":
        from safetensors.torch import save_model

        save_model(m, str(tmp_path / "tied.safetensors"))  # keeps one name of the shared tensor
        return m, [tmp_path / "tied.safetensors", *arch]
    if fmt == "state_dict":
        torch.save(m.state_dict(), tmp_path / "tied_sd.pt")  # both names, one storage
        return m, [tmp_path / "tied_sd.pt", *arch]
    raise ValueError(fmt)


@pytest.mark.parametrize("fmt", ["torchscript", "export", "save_model", "state_dict"])
@pytest.mark.parametrize("cls", [TinyTied, TinyTiedHeadFirst], ids=["emb-first", "head-first"])
def test_tied_weights(run, tmp_path, fmt, cls):
    """The shared matrix is one parameter, under the first name of named_parameters(); every use of
    it varies together; meta.tied names the alias."""
    x, y = _tied_data()
    m, model_args = _tied_model(cls, tmp_path, fmt, x)
    first, alias = ("emb.weight", "head.weight") if cls is TinyTied else ("head.weight", "emb.weight")
    ref = model_ref(m, x, y)
    assert ref.names[0] == first and alias not in ref.names
    _, meta = _compute(run, tmp_path, model_args, _save_data(tmp_path, x, y), ref=ref, label=f"{fmt} {cls.__name__}")
    assert alias in json.dumps(meta.get("tied")), meta.get("tied")


# ---------------------------------------------------------------------------------------------
# float64


@pytest.mark.parametrize("which", ["scripted-gru", "tied-torchscript", "tied-export"])
def test_float64(run, tmp_path, which):
    """--dtype float64 meets SPEC.md's float64 promise: 1e-10 of max|H| (and of ‖H‖₂, Σ|λ|)."""
    if which == "scripted-gru":
        torch.manual_seed(11)
        m = SeqClassifier(kind="gru", norm=True).eval()
        x, y = _seq_data()
        args = [_script(m, tmp_path / "gru.pt")]
    else:
        x, y = _tied_data()
        m, args = _tied_model(TinyTied, tmp_path, which.split("-")[1], x)
    _, meta = _compute(run, tmp_path, args, _save_data(tmp_path, x, y), "--dtype", "float64", ref=model_ref(m, x, y),
                       tol=1e-10, label=which)
    assert meta["dtype"] == "float64"


# ---------------------------------------------------------------------------------------------
# the derivative self-check


@pytest.mark.parametrize("cls", [DetachedParam, DataParam], ids=["detach", "data"])
def test_parameter_hidden_from_autograd_is_refused(run, tmp_path, cls):
    """``secret`` is read through .detach() / .data: autograd sees a constant (its Hessian rows would
    be zero, silently). The load-time check compares autograd's directional derivative with finite
    differences of the loss and names the tensor at fault."""
    torch.manual_seed(12)
    m = cls().eval()
    g = torch.Generator().manual_seed(13)
    x, y = torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g)
    r = run("compute", _script(m, tmp_path / "hidden.pt"), "--data", _save_data(tmp_path, x, y), "-o", tmp_path / "h.npz")
    line = r.error_line(max_len=600)
    assert "secret" in line, line
    assert not (tmp_path / "h.npz").exists()


# ---------------------------------------------------------------------------------------------
# the TorchScript path imports no converter


@pytest.mark.slow
def test_torchscript_path_imports_no_dynamo(tmp_path):
    """TorchScript (here a LayerNorm model) is differentiated as it is: no TS2EPConverter, so neither
    torch._dynamo (seconds of start-up) nor torch._export.converter is imported."""
    samples = ROOT / "sample_checkpoints"
    code = (
        "import json, sys\n"
        "import hesscli.cli\n"
        f"rc = hesscli.cli.main(['compute', {str(samples / 'diabetes_mlp.pt')!r}, '--data', "
        f"{str(samples / 'diabetes.pt')!r}, '-o', {str(tmp_path / 'h.npz')!r}, '--quiet'])\n"
        "print(json.dumps({'rc': rc, 'loaded': [m for m in ('torch._dynamo', 'torch._export.converter') "
        "if m in sys.modules]}))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0, p.stderr[-3000:]
    assert res["loaded"] == [], f"imported on the TorchScript path: {res['loaded']}"
