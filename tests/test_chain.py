"""The closed-form products of affine chains (hesscli/chain.py) against the float64 reference.

Every chain variant hesscli recognises (activations, no bias, hand-written ``x @ w.t() + b``,
scaled activations, flattened image inputs, a squeezed regression output, each loss, ``--params``
subsets, micro-batches, every file format) gives the reference Hessian to 1e-10·max|H| in float64;
models that are not chains (skip connection, shared weights, an activation on the output, a CNN,
LayerNorm) fall back to autograd, and ``--engine chain`` refuses them with a message.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLES, load_result
from models import ChainMLP, HandAffine, ResidualMLP, SharedMLP, SigmoidHead, randomize_, save_shard, save_state_dict
from reference import assert_close_matrix, reference_hessian

from hesscli.algorithms.dense import dense_hessian
from hesscli.api import ModelSpec, open_session
from hesscli.errors import HesscliError

MODELS_PY = str(ROOT / "tests" / "models.py")


def _digits(n: int, images: bool = False):
    d = torch.load(SAMPLES / ("digits_images.pt" if images else "digits.pt"), weights_only=True)
    return d["inputs"][:n], d["targets"][:n]


def _diabetes():
    d = torch.load(SAMPLES / "diabetes.pt", weights_only=True)
    x, y = d["inputs"], d["targets"]
    return (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()


def _case(name: str):
    """(model, arch name, kwargs, inputs, targets, loss)."""
    if name.startswith("ce_"):
        act = name[3:]
        x, y = _digits(240)
        y = y.clone()
        y[::17] = -100  # ignored targets
        kw = {"widths": [64, 7, 5, 10], "act": act}
        return ChainMLP(**kw), "ChainMLP", kw, x, y, "cross_entropy"
    if name == "nobias":
        x, y = _digits(200)
        kw = {"widths": [64, 6, 10], "act": "tanh", "bias": False}
        return ChainMLP(**kw), "ChainMLP", kw, x, y, "cross_entropy"
    if name == "hand":
        x, y = _digits(200, images=True)
        y = y % 4
        return HandAffine(), "HandAffine", {}, x, y, "cross_entropy"
    if name == "mse_squeeze":
        x, y = _diabetes()
        kw = {"widths": [10, 6, 4, 1], "act": "softplus", "squeeze": True}
        return ChainMLP(**kw), "ChainMLP", kw, x, y.reshape(-1), "mse"
    if name == "mse_linear_stack":
        x, y = _diabetes()
        kw = {"widths": [10, 5, 3], "act": "none"}
        return ChainMLP(**kw), "ChainMLP", kw, x, y.repeat(1, 3), "mse"
    if name == "bce":
        x, y = _digits(200)
        kw = {"widths": [64, 5, 1], "act": "sigmoid"}
        return ChainMLP(**kw), "ChainMLP", kw, x, (y < 5).to(torch.float32).reshape(-1, 1), "bce_with_logits"
    if name == "nll":
        x, y = _digits(150)
        kw = {"widths": [64, 5, 10], "act": "tanh"}
        return ChainMLP(**kw), "ChainMLP", kw, x, y, "nll"
    raise KeyError(name)


CHAIN_CASES = ["ce_tanh", "ce_relu", "ce_gelu", "ce_silu", "ce_relu_", "ce_leaky_relu", "nobias", "hand", "mse_squeeze", "mse_linear_stack", "bce", "nll"]


def _files(tmp_path, name: str, seed: int = 0):
    model, arch, kw, x, y, loss = _case(name)
    randomize_(model, seed=seed)
    save_state_dict(model, tmp_path / "w.pt")
    save_shard(tmp_path / "d.pt", x, y)
    spec = dict(model=str(tmp_path / "w.pt"), data=[str(tmp_path / "d.pt")], arch=f"{MODELS_PY}:{arch}",
                arch_kwargs=kw, loss=loss, dtype="float64")
    return model, x, y, loss, spec


@pytest.mark.parametrize("name", CHAIN_CASES)
def test_chain_dense_matches_reference(tmp_path, name):
    model, x, y, loss, spec = _files(tmp_path, name)
    obj = open_session(ModelSpec(**spec, engine="chain")).objective
    assert obj.chain is not None
    H = dense_hessian(obj, mode="full").blocks[0].hessian.numpy()
    ref = reference_hessian(model, x, y, loss)
    assert_close_matrix(H, ref.hessian, 1e-10, ref)


@pytest.mark.parametrize("name", ["ce_tanh", "mse_squeeze"])
def test_chain_products_match_autograd_batched_and_single(tmp_path, name):
    _, _, _, _, spec = _files(tmp_path, name, seed=3)
    chain = open_session(ModelSpec(**spec, batch_size=37)).objective
    auto = open_session(ModelSpec(**spec, engine="autograd")).objective
    assert chain.chain is not None and auto.chain is None and chain.n_pieces() > 1
    V = torch.randn(5, chain.P, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = chain.hvp(V)
    b = auto.hvp(V)
    single = torch.stack([chain.hvp(v) for v in V])
    scale = b.abs().max()
    assert (a - b).abs().max() <= 1e-12 * scale
    assert (single - b).abs().max() <= 1e-12 * scale


def test_chain_params_subset(tmp_path):
    model, x, y, loss, spec = _files(tmp_path, "ce_tanh", seed=1)
    for regex in (r"layers\.1\.", r"layers\.(0\.weight|2\.bias)"):
        obj = open_session(ModelSpec(**spec, params=regex, engine="chain")).objective
        H = dense_hessian(obj, mode="full").blocks[0].hessian.numpy()
        ref = reference_hessian(model, x, y, loss, params_regex=regex)
        assert_close_matrix(H, ref.hessian, 1e-10, ref)


def test_chain_block_mode_and_no_symmetry(tmp_path):
    model, x, y, loss, spec = _files(tmp_path, "ce_tanh", seed=2)
    ref = reference_hessian(model, x, y, loss)
    obj = open_session(ModelSpec(**spec)).objective
    full = dense_hessian(obj, mode="full", symmetric=False).blocks[0].hessian.numpy()
    assert_close_matrix(full, ref.hessian, 1e-10, ref)
    for b in dense_hessian(obj, mode="block").blocks:
        assert_close_matrix(b.hessian.numpy(), ref.hessian[b.start:b.stop, b.start:b.stop], 1e-10, ref)


@pytest.mark.parametrize("cls", [ResidualMLP, SharedMLP, SigmoidHead])
def test_not_a_chain_falls_back(tmp_path, cls):
    model = randomize_(cls())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 6, generator=g)
    out_dim = model(x).shape[1]
    y = torch.randn(60, out_dim, generator=g)
    save_state_dict(model, tmp_path / "w.pt")
    save_shard(tmp_path / "d.pt", x, y)
    spec = dict(model=str(tmp_path / "w.pt"), data=[str(tmp_path / "d.pt")], arch=f"{MODELS_PY}:{cls.__name__}",
                loss="mse", dtype="float64")
    obj = open_session(ModelSpec(**spec)).objective
    assert obj.chain is None
    H = dense_hessian(obj, mode="full").blocks[0].hessian.numpy()
    ref = reference_hessian(model, x, y, "mse")
    assert_close_matrix(H, ref.hessian, 1e-10, ref)
    with pytest.raises(HesscliError, match="not an affine chain"):
        open_session(ModelSpec(**spec, engine="chain"))


@pytest.mark.parametrize("fmt", ["digits_mlp.pt", "digits_mlp.pt2", "digits_mlp.safetensors"])
def test_sample_formats_use_the_chain(cli, tmp_path, fmt):
    r = cli("compute", str(SAMPLES / fmt), "--data", str(SAMPLES / "digits.pt"), "--trust-code",
            "--params", "fc3", "-o", str(tmp_path / "h.npz"), "--json")
    assert r.code == 0, r.err
    meta, arrays = load_result(tmp_path / "h.npz")
    assert meta["engine"] == "chain"
    assert any("closed form" in n for n in meta["notes"])
    r2 = cli("compute", str(SAMPLES / fmt), "--data", str(SAMPLES / "digits.pt"), "--trust-code",
             "--params", "fc3", "-o", str(tmp_path / "h2.npz"), "--engine", "autograd")
    assert r2.code == 0, r2.err
    meta2, arrays2 = load_result(tmp_path / "h2.npz")
    assert meta2["engine"] == "autograd"
    H, H2 = arrays["hessian"], arrays2["hessian"]
    assert np.abs(H - H2).max() <= 1e-5 * np.abs(H2).max()


@pytest.mark.slow
@pytest.mark.parametrize("sample,data,params", [("digits_cnn.pt", "digits_images.pt", "conv2|fc"),
                                                ("diabetes_mlp.pt", "diabetes.pt", ".")])
def test_non_chain_samples(cli, tmp_path, sample, data, params):
    r = cli("compute", str(SAMPLES / sample), "--data", str(SAMPLES / data), "--mode", "block",
            "--params", params, "-o", str(tmp_path / "h.npz"))
    assert r.code == 0, r.err
    assert load_result(tmp_path / "h.npz")[0]["engine"] == "autograd"
    r = cli("spectrum", str(SAMPLES / sample), "--data", str(SAMPLES / data), "--engine", "chain",
            "--params", params, "--top-k", "2", "-o", str(tmp_path / "s.npz"))
    assert r.code == 1 and "not an affine chain" in r.err and r.err.count("\n") == 1
    assert not (tmp_path / "s.npz").exists()


def test_engine_option_is_checked(cli, tmp_path):
    r = cli("compute", str(SAMPLES / "digits_mlp.pt"), "--data", str(SAMPLES / "digits.pt"), "--engine", "fast",
            "-o", str(tmp_path / "h.npz"))
    assert r.code == 2 and "'--engine'" in r.err and "'fast'" in r.err and "'autograd'" in r.err


def test_layers_after_constant_ones_are_a_chain(tmp_path):
    """With only the CNN's last layer selected, the convolutions are a fixed function of the
    inputs and the rest is an affine chain: closed-form products, the reference Hessian."""
    from reference import SAMPLE_CASES, reference

    arch, sd, data, loss = SAMPLE_CASES["digits_cnn"]
    spec = ModelSpec(str(SAMPLES / "digits_cnn.pt"), data=[str(SAMPLES / data)], params="^fc", dtype="float64")
    obj = open_session(spec).objective
    assert obj.chain is not None
    H = dense_hessian(obj, mode="full").blocks[0].hessian.numpy()
    ref = reference(arch, SAMPLES / sd, [SAMPLES / data], loss,
                    params_regex="^fc")
    assert_close_matrix(H, ref.hessian, 1e-10, ref)


def test_a_piece_that_runs_another_forward_is_refused():
    """Each piece's recording must repeat the first one: the same ops, the same data flow and the
    same weights, else that piece is not a chain product (the objective then uses autograd)."""
    from torch.func import functional_call

    from hesscli.objective.chain import ChainLinearization, ChainProgram, NotAChain, record_chain
    from hesscli.objective.losses import Loss

    x, y = _digits(50)
    model = randomize_(ChainMLP(widths=[64, 5, 10], act="tanh"))
    names = [n for n, _ in model.named_parameters()]
    theta = [p.detach().clone() for p in model.parameters()]
    run = lambda ts, m=model: functional_call(m, dict(zip(names, ts)), (x,))  # noqa: E731
    out, ops = record_chain(lambda: run(theta))
    program = ChainProgram.parse(ops, theta, x, out)
    loss = Loss("cross_entropy")
    ChainLinearization(program, ops, theta, out, y, loss)  # the same recording: accepted
    other = [t.clone() for t in theta]
    out2, ops2 = record_chain(lambda: run(other))
    with pytest.raises(NotAChain, match="another weight"):
        ChainLinearization(program, ops2, theta, out2, y, loss)
    relu = randomize_(ChainMLP(widths=[64, 5, 10], act="relu"))
    out3, ops3 = record_chain(lambda: run(theta, relu))
    with pytest.raises(NotAChain, match="different ops"):
        ChainLinearization(program, ops3, theta, out3, y, loss)
