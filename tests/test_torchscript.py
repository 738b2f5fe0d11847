"""TorchScript models on the one product route: the ScriptModule's own parameters are the leaves.

The graph executor is run unoptimised while hesscli evaluates a script (its profiling executor
specialises graphs after warm-up, NOTES.md), so products are pinned by repeating many of them
against an independent computation on the eager model — not by one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import SAMPLES
from reference import load_arch, load_data

from hesscli.io.data import load_dataset
from hesscli.io.loading import load_model
from hesscli.objective.core import Objective


def _eager_products(V: torch.Tensor, x, y) -> torch.Tensor:
    """H·V of the mean cross-entropy of the eager DigitsCNN in float64, by plain double backward."""
    model = load_arch(f"{SAMPLES / 'archs.py'}:DigitsCNN")
    model.load_state_dict(torch.load(SAMPLES / "digits_cnn_state_dict.pt", weights_only=True))
    model = model.double().eval()
    ps = list(model.parameters())
    g = torch.autograd.grad(F.cross_entropy(model(x.double()), y), ps, create_graph=True)
    out = []
    for v in V.reshape(-1, V.shape[-1]):
        parts, o = [], 0
        for p in ps:
            parts.append(v[o : o + p.numel()].reshape(p.shape))
            o += p.numel()
        out.append(torch.cat([h.reshape(-1) for h in torch.autograd.grad(g, ps, parts, retain_graph=True)]))
    return torch.stack(out).reshape(V.shape)


@pytest.mark.slow
def test_script_products_stay_right_after_warm_up():
    lm = load_model(SAMPLES / "digits_cnn.pt")
    assert isinstance(lm.module, torch.jit.ScriptModule)
    ds = load_dataset([SAMPLES / "digits_images.pt"])
    obj = Objective(lm.module, ds, dtype="float64", batch_size=300)
    x, y = load_data(SAMPLES / "digits_images.pt")
    gen = torch.Generator().manual_seed(0)
    for i in range(12):  # well past the executor's warm-up; single and batched products
        v = torch.randn((3, obj.P) if i % 2 else (obj.P,), generator=gen, dtype=torch.float64)
        got = obj.hvp(v)
        want = _eager_products(v, x, y)
        assert (got - want).abs().max() <= 1e-10 * want.abs().max(), i


def test_checks_leave_the_weights_bit_identical_and_the_executor_flag_as_it_was():
    """The derivative self-check perturbs the weights the model reads: they must come back exactly,
    and the caller's graph-executor setting must be untouched."""
    before = torch._C._get_graph_executor_optimize()
    lm = load_model(SAMPLES / "digits_cnn.pt")
    fresh = dict(load_model(SAMPLES / "digits_cnn.pt").module.named_parameters())
    obj = Objective(lm.module, load_dataset([SAMPLES / "digits_images.pt"]), dtype="float32", copy=False)
    obj.hvp(torch.ones(obj.P))
    assert obj.derivative_check["forwards"] > 0
    for name, p in lm.module.named_parameters():
        assert torch.equal(p.detach(), fresh[name].detach()), name
    assert torch._C._get_graph_executor_optimize() == before


def test_float64_on_a_float32_script_is_cast_in_place_without_losing_references():
    """``--dtype float64``: the script's parameters are re-typed in place, so the model computes in
    float64 (its outputs differ from the float32 ones below float32 rounding) and the leaves are
    still the tensors it reads (the derivative check passes)."""
    lm = load_model(SAMPLES / "digits_cnn.pt")
    obj = Objective(lm.module, load_dataset([SAMPLES / "digits_images.pt"]), dtype="float64", copy=False)
    assert all(p.dtype == torch.float64 for p in lm.module.parameters())
    assert obj.derivative_check["forwards"] > 0


def test_the_callers_module_is_left_as_it_was():
    """A library call on an in-memory module works on a copy (the default): dtype, values and
    requires_grad of the caller's parameters are unchanged."""
    lm = load_model(SAMPLES / "digits_cnn.pt")
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in lm.module.named_parameters()}
    obj = Objective(lm.module, load_dataset([SAMPLES / "digits_images.pt"]), dtype="float64", params="^fc")
    obj.hvp(torch.ones(obj.P, dtype=torch.float64))
    for n, p in lm.module.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), before[n][0]) and p.requires_grad == before[n][1], n
