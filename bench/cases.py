"""Benchmark cases: a model, its data and its loss, as files hesscli reads and as eager objects the
other methods use. The sample checkpoints are used as they ship; synthetic cases are generated
from a seed into ``bench/.cache`` (state dict + data shard, architecture :class:`SynthMLP` here).

This module is also the ``--arch`` file of the synthetic cases, so it must stay importable on its
own (no heavy top-level work).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_checkpoints"
CACHE = Path(__file__).resolve().parent / ".cache"


class SynthMLP(nn.Module):
    """widths[0] → … → widths[-1], tanh between layers."""

    def __init__(self, widths=(64, 32, 10)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


@dataclass
class Case:
    name: str
    what: str  # one line for the tables
    arch: str  # file.py:Class, for hesscli --arch
    weights: Path  # a state dict
    data: Path
    loss: str  # cross_entropy | mse
    arch_kwargs: dict = field(default_factory=dict)
    checkpoint: Path | None = None  # a TorchScript file, for the whole-process runs

    def spec_kwargs(self, device: str = "cpu", dtype: str | None = None) -> dict:
        kw = dict(model=str(self.weights), data=[str(self.data)], arch=self.arch, loss=self.loss, device=device)
        if self.arch_kwargs:
            kw["arch_kwargs"] = json.dumps(self.arch_kwargs)
        if dtype:
            kw["dtype"] = dtype
        return kw

    def load(self, device: str = "cpu", dtype: torch.dtype = torch.float32):
        """(model in eval mode, inputs, targets, mean-reduced loss module) on ``device``."""
        path, cls = self.arch.rsplit(":", 1)
        mod = _import_file(ROOT / path)
        model = getattr(mod, cls)(**self.arch_kwargs)
        model.load_state_dict(torch.load(self.weights, weights_only=True))
        model = model.to(device=device, dtype=dtype).eval()
        d = torch.load(self.data, weights_only=True)
        x, y = d["inputs"], d["targets"]
        x = x.to(device=device, dtype=dtype)
        y = y.to(device=device, dtype=dtype) if y.is_floating_point() else y.to(device)
        crit = nn.CrossEntropyLoss() if self.loss == "cross_entropy" else nn.MSELoss()
        return model, x, y, crit

    @property
    def n_params(self) -> int:
        sd = torch.load(self.weights, weights_only=True)
        return int(sum(v.numel() for v in sd.values()))


def _import_file(path: Path):
    name = "bench_arch_" + hashlib.sha1(str(path).encode()).hexdigest()[:8]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _synthetic(name: str, what: str, widths: list[int], n: int, seed: int, inputs_from_digits: bool = False) -> Case:
    """A seeded MLP and data: random init, inputs N(0, 1) (or the digits inputs), labels from a
    random teacher so the loss is not trivial."""
    tag = f"{name}-{'-'.join(map(str, widths))}-n{n}-s{seed}"
    weights, data = CACHE / f"{tag}.weights.pt", CACHE / f"{tag}.data.pt"
    if not (weights.exists() and data.exists()):
        CACHE.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = SynthMLP(widths)
        if inputs_from_digits:
            d = torch.load(SAMPLES / "digits.pt", weights_only=True)
            x, y = d["inputs"].float(), d["targets"]
        else:
            x = torch.randn(n, widths[0], generator=g)
            teacher = torch.randn(widths[0], widths[-1], generator=g)
            y = (x @ teacher + 0.5 * torch.randn(n, widths[-1], generator=g)).argmax(1)
        torch.save(model.state_dict(), weights)
        torch.save({"inputs": x, "targets": y}, data)
    return Case(name, what, "bench/cases.py:SynthMLP", weights, data, "cross_entropy", {"widths": list(widths)})


def sample(name: str) -> Case:
    table = {
        "digits_mlp": ("MLP 64-32-32-10 (tanh), digits, N = 1,797", "DigitsMLP", "digits.pt", "cross_entropy"),
        "digits_cnn": ("CNN 2 conv + linear (tanh), digits 8×8, N = 1,797", "DigitsCNN", "digits_images.pt", "cross_entropy"),
        "diabetes_mlp": ("MLP 10-16-LayerNorm-1, diabetes regression, N = 442", "DiabetesMLP", "diabetes.pt", "mse"),
    }
    what, cls, data, loss = table[name]
    return Case(name, what, "sample_checkpoints/archs.py:" + cls, SAMPLES / f"{name}_state_dict.pt", SAMPLES / data, loss,
                checkpoint=SAMPLES / f"{name}.pt")


def get(name: str, quick: bool = False) -> Case:
    """A case by name; ``quick`` gives the smaller synthetic shapes."""
    if name in ("digits_mlp", "digits_cnn", "diabetes_mlp"):
        return sample(name)
    if name == "few_samples":  # overhead-bound: each product is cheap, many of them
        w = [32, 32, 32, 10] if quick else [64, 64, 64, 10]
        return _synthetic(name, f"MLP {'-'.join(map(str, w))}, N = 32 (few samples, many parameters)", w, 32, 1)
    if name == "many_samples":  # bandwidth/compute-bound per product, few products
        n = 8_000 if quick else 30_000
        w = [16, 16, 10]
        return _synthetic(name, f"MLP {'-'.join(map(str, w))}, N = {n:,} (many samples, few parameters)", w, n, 2)
    if name == "mlp_1m":
        w = [64, 1024, 1024, 10]
        return _synthetic(name, "MLP 64-1024-1024-10 (tanh, random init), digits, N = 1,797", w, 1797, 3, inputs_from_digits=True)
    raise KeyError(name)


DENSE_CASES = ["digits_mlp", "digits_cnn", "diabetes_mlp", "few_samples", "many_samples"]
