"""Regressions found in review of the one-route change (issue 10): each built small, in the test."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from case_models import ok, runner
from safetensors.torch import save_file
from torch import nn

HERE = __file__


class HiddenAtMin(nn.Module):
    """Linear regression whose bias is read through .detach(), at an exact fit (gradient 0)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        return x @ self.lin.weight.t() + self.lin.bias.detach()


class LossAndPrediction(nn.Module):
    """--loss model returning (mean loss, prediction), as Hugging Face's return_dict=False does."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x, y):
        pred = self.lin(x)
        return F.mse_loss(pred, y), pred


class FreqScaled(nn.Module):
    def __init__(self, scale: bool = True):
        super().__init__()
        self.emb = nn.Embedding(9, 3, scale_grad_by_freq=scale)
        self.fc = nn.Linear(3, 4)

    def forward(self, ids):
        return self.fc(torch.tanh(self.emb(ids).mean(1)))


class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(9, 3, mode="sum")
        self.fc = nn.Linear(3, 4)

    def forward(self, ids):
        return self.fc(torch.tanh(self.bag(ids)))


def _arch(name: str) -> str:
    return f"{HERE}:{name}"


def _save(tmp_path, model, **data):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    torch.save(data, tmp_path / "d.pt")
    return tmp_path / "m.safetensors", tmp_path / "d.pt"


def test_hidden_weight_at_a_stationary_point_is_refused(tmp_path, capfd, caplog):
    """A first-derivative check is blind where the gradient is zero; a tensor with no gradient at
    all must still not move the loss."""
    torch.manual_seed(0)
    m = HiddenAtMin()
    x = torch.randn(20, 3)
    y = (x @ m.lin.weight.t() + m.lin.bias).detach()  # an exact fit: loss 0, gradient 0
    w, d = _save(tmp_path, m, inputs=x, targets=y)
    r = runner(capfd, caplog)("compute", w, "--arch", _arch("HiddenAtMin"), "--data", d, "-o", tmp_path / "h.npz")
    assert "lin.bias" in r.error_line()


def test_mean_and_prediction_read_alike_in_every_piece(tmp_path, capfd, caplog):
    """--batch-size 4 on 9 samples leaves a piece of one sample, whose (mean, prediction) tuple looks
    like a (sum, count) pair; it must be read as the first piece was."""
    torch.manual_seed(1)
    w, d = _save(tmp_path, LossAndPrediction(), inputs=torch.randn(9, 4), targets=torch.randn(9, 1))
    run = runner(capfd, caplog)
    base = ["compute", w, "--arch", _arch("LossAndPrediction"), "--loss", "model", "--data", d, "--dtype", "float64"]
    one = ok(run(*base, "-o", tmp_path / "one.npz"))
    four = ok(run(*base, "--batch-size", "4", "-o", tmp_path / "four.npz"))
    assert one["n_loss_terms"] == four["n_loss_terms"] == 9
    a, b = (np.load(tmp_path / f, allow_pickle=False)["hessian"] for f in ("one.npz", "four.npz"))
    assert np.abs(a - b).max() <= 1e-12 * np.abs(a).max()


def test_scale_grad_by_freq_embedding_is_the_plain_function(tmp_path, capfd, caplog):
    torch.manual_seed(2)
    m = FreqScaled()
    ids, labels = torch.randint(0, 9, (30, 5)), torch.randint(0, 4, (30,))
    w, d = _save(tmp_path, m, input_ids=ids, labels=labels)
    run = runner(capfd, caplog)
    ok(run("compute", w, "--arch", _arch("FreqScaled"), "--data", d, "--dtype", "float64", "-o", tmp_path / "a.npz"))
    ok(run("compute", w, "--arch", _arch("FreqScaled"), "--arch-kwargs", '{"scale": false}', "--data", d,
           "--dtype", "float64", "-o", tmp_path / "b.npz"))
    a, b = (np.load(tmp_path / f, allow_pickle=False)["hessian"] for f in ("a.npz", "b.npz"))
    assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max()


def test_scripted_embedding_bag_is_one_line_naming_the_op(tmp_path, capfd, caplog):
    torch.manual_seed(3)
    torch.jit.save(torch.jit.script(Bag().eval()), str(tmp_path / "bag.ts.pt"))
    torch.save({"input_ids": torch.randint(0, 9, (12, 4)), "labels": torch.randint(0, 4, (12,))}, tmp_path / "d.pt")
    r = runner(capfd, caplog)("compute", tmp_path / "bag.ts.pt", "--data", tmp_path / "d.pt", "-o", tmp_path / "h.npz")
    assert "embedding_bag" in r.error_line(max_len=300)
