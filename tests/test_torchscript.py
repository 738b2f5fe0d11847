"""The two TorchScript routes (hesscli.loading): parameters swapped into the script module
(``ScriptAdapter``, graphs without ops that need a rewrite) and conversion to an ExportedProgram
(graphs with layer_norm/instance_norm). Both use private torch API, so the behaviour is pinned by
repeating many products, not one (NOTES.md: the profiling executor went wrong after warm-up)."""

from __future__ import annotations

import torch
from conftest import SAMPLES

from hesscli.data import load_dataset
from hesscli.loading import ScriptAdapter, load_model
from hesscli.objective import Objective


def _objective(path, data, dtype="float64"):
    lm = load_model(SAMPLES / path)
    ds = load_dataset([SAMPLES / data])
    lm.materialize(ds.first(4)[0])
    return lm, Objective(lm.module, ds, dtype=dtype, batch_size=300)


def test_adapter_products_stay_right_after_warm_up():
    lm, ts = _objective("digits_cnn.pt", "digits_images.pt")
    assert isinstance(lm.module, ScriptAdapter)
    _, ex = _objective("digits_cnn.pt2", "digits_images.pt")
    gen = torch.Generator().manual_seed(0)
    for i in range(12):  # well past the executor's warm-up; single and batched products
        v = torch.randn(3 if i % 2 else ts.P, generator=gen, dtype=torch.float64)
        v = v.reshape(3, -1) if i % 2 else v
        if i % 2:
            v = torch.randn(3, ts.P, generator=gen, dtype=torch.float64)
        a, b = ts.hvp(v), ex.hvp(v)
        assert torch.allclose(a, b, rtol=0, atol=1e-12 * b.abs().max()), (i, (a - b).abs().max())


def test_layer_norm_graph_is_converted():
    lm, ts = _objective("diabetes_mlp.pt", "diabetes.pt")
    assert not isinstance(lm.module, ScriptAdapter)
    assert any("converted" in n for n in lm.notes)
    _, ex = _objective("diabetes_mlp.pt2", "diabetes.pt")
    v = torch.randn(4, ts.P, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(ts.hvp(v), ex.hvp(v), rtol=0, atol=1e-12)


def test_adapter_restores_the_archive_weights():
    lm, ts = _objective("digits_mlp.pt", "digits.pt")
    before = {n: p.detach().clone() for n, p in lm.script.named_parameters()}
    ts.hvp(torch.ones(ts.P, dtype=torch.float64))
    for n, p in lm.script.named_parameters():
        assert torch.equal(p.detach().to(before[n].dtype), before[n]) or p.dtype != before[n].dtype, n
