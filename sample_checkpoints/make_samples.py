"""Regenerate every file in ``sample_checkpoints/`` deterministically.

Usage (from the repo root or from anywhere)::

    python sample_checkpoints/make_samples.py

Needs torch, numpy, safetensors and scikit-learn (a dev-only dependency, used
here for the ``load_digits`` / ``load_diabetes`` data sets). Takes a few
seconds on a laptop CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from archs import DiabetesMLP, DigitsCNN, DigitsMLP  # noqa: E402 - archs.py sits beside this script

SEED = 0
MAX_BYTES = 1_000_000


class quiet:
    """Context manager that hides TorchScript / export deprecation noise."""

    def __enter__(self):
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# --------------------------------------------------------------------------- data


def load_data() -> dict[str, dict[str, torch.Tensor]]:
    from sklearn.datasets import load_diabetes, load_digits  # dev-only dependency

    digits = load_digits()
    x_digits = torch.from_numpy((digits.data / 16.0).astype(np.float32))  # (1797, 64)
    y_digits = torch.from_numpy(digits.target.astype(np.int64))  # (1797,)

    diabetes = load_diabetes()  # features are already mean-centred and scaled
    x_diab = torch.from_numpy(diabetes.data.astype(np.float32))  # (442, 10)
    y = diabetes.target.astype(np.float64)
    y = (y - y.mean()) / y.std()
    y_diab = torch.from_numpy(y.astype(np.float32)).reshape(-1, 1)  # (442, 1)

    return {
        "digits": {"inputs": x_digits.contiguous(), "targets": y_digits.contiguous()},
        "digits_images": {
            "inputs": x_digits.reshape(-1, 1, 8, 8).contiguous(),
            "targets": y_digits.clone(),
        },
        "diabetes": {"inputs": x_diab.contiguous(), "targets": y_diab.contiguous()},
    }


# --------------------------------------------------------------------------- models

# name -> (class, kwargs, data shard, task, Adam steps, Adam lr)
# Training is deliberately moderate (not driven to ~zero loss) so that the
# Hessians have non-degenerate magnitudes: a fully saturated softmax would make
# the curvature vanish.
MODELS = {
    "digits_mlp": (DigitsMLP, {"hidden": 32}, "digits", "classification", 200, 3e-3),
    "digits_cnn": (DigitsCNN, {}, "digits_images", "classification", 200, 1e-2),
    "diabetes_mlp": (DiabetesMLP, {"hidden": 16}, "diabetes", "regression", 100, 1e-2),
}


def loss_fn(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(out, y)
    return F.mse_loss(out, y)


def metric(task: str, out: torch.Tensor, y: torch.Tensor) -> tuple[str, float]:
    if task == "classification":
        return "accuracy", (out.argmax(1) == y).double().mean().item()
    ss_res = ((out.double() - y.double()) ** 2).sum()
    ss_tot = ((y.double() - y.double().mean()) ** 2).sum()
    return "R2", (1.0 - ss_res / ss_tot).item()


def train(name: str, data: dict[str, torch.Tensor]) -> torch.nn.Module:
    cls, kwargs, _, task, steps, lr = MODELS[name]
    torch.manual_seed(SEED)
    model = cls(**kwargs)
    x, y = data["inputs"], data["targets"]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(task, model(x), y)
        loss.backward()
        opt.step()
    return model.eval()


# --------------------------------------------------------------------------- writing


def export_program(model: torch.nn.Module, x: torch.Tensor):
    batch = torch.export.Dim("batch", min=1)
    dyn = ({0: batch},)
    with quiet():
        return torch.export.export(model, (x,), dynamic_shapes=dyn)


def _sort_safetensors_metadata(path: Path) -> None:
    """Make a .safetensors file byte-reproducible.

    The Rust writer keeps ``__metadata__`` in a hash map, so its key order (and
    hence the file bytes) changes from run to run. Rewrite the JSON header in
    place with the metadata keys sorted; the header keeps its exact length
    (padded with spaces, as the format allows), so the tensor data is untouched.
    """
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > n:  # cannot happen: same content, compact separators
        raise AssertionError(f"{path.name}: canonical header longer than original")
    raw[8 : 8 + n] = text + b" " * (n - len(text))
    path.write_bytes(bytes(raw))


def write_model(
    name: str, model: torch.nn.Module, data: dict[str, torch.Tensor]
) -> list[Path]:
    cls, kwargs, _, _, _, _ = MODELS[name]
    x = data["inputs"]
    paths = []

    # TorchScript
    p = HERE / f"{name}.pt"
    with quiet():
        torch.jit.save(torch.jit.script(model.eval()), str(p))
    paths.append(p)

    # torch.export
    p = HERE / f"{name}.pt2"
    # A small example batch: torch.export.save stores the example inputs in the
    # archive, and the batch dimension is dynamic anyway.
    ep = export_program(model.eval(), x[:8].clone())
    with quiet():
        torch.export.save(ep, str(p))
    paths.append(p)

    # safetensors + architecture metadata
    p = HERE / f"{name}.safetensors"
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(
        sd,
        str(p),
        metadata={
            "hesscli.arch": f"archs.py:{cls.__name__}",
            "hesscli.arch_kwargs": json.dumps(kwargs),
        },
    )
    _sort_safetensors_metadata(p)
    paths.append(p)

    # plain state_dict
    p = HERE / f"{name}_state_dict.pt"
    torch.save(sd, p)
    paths.append(p)
    return paths


def write_data(data: dict[str, dict[str, torch.Tensor]]) -> list[Path]:
    paths = []
    for shard, tensors in data.items():
        p = HERE / f"{shard}.pt"
        torch.save(tensors, p)
        paths.append(p)
    x, y = data["digits"]["inputs"], data["digits"]["targets"]
    p = HERE / "digits.npz"
    np.savez(p, x=x.numpy(), y=y.numpy())
    paths.append(p)
    p = HERE / "digits.safetensors"
    save_file({"input": x, "target": y}, str(p))
    paths.append(p)
    return paths


# --------------------------------------------------------------------------- checks


def check_model(
    name: str, model: torch.nn.Module, data: dict[str, torch.Tensor]
) -> None:
    cls, kwargs, _, _, _, _ = MODELS[name]
    x = data["inputs"]
    with torch.no_grad():
        ref = model(x)

    def same(out: torch.Tensor, what: str, n: int | None = None) -> None:
        # compare with eager on the same batch: conv kernels may sum in a
        # batch-size-dependent order, so model(x)[:n] != model(x[:n]) bitwise
        if n is None:
            r = ref
        else:
            with torch.no_grad():
                r = model(x[:n])
        diff = (out - r).abs().max().item()
        if out.shape != r.shape or diff >= 1e-6:
            raise AssertionError(
                f"{name}: {what} differs from eager (max abs diff {diff})"
            )

    with quiet(), torch.no_grad():
        ts = torch.jit.load(str(HERE / f"{name}.pt"))
        same(ts(x), "TorchScript")
        ep = torch.export.load(str(HERE / f"{name}.pt2")).module()
        for n in (1, 7, x.shape[0]):
            same(ep(x[:n]), f"exported program (batch {n})", n)

    sd = torch.load(HERE / f"{name}_state_dict.pt", weights_only=True)
    m2 = cls(**kwargs).eval()
    m2.load_state_dict(sd)
    with torch.no_grad():
        same(m2(x), "state_dict")

    with safe_open(str(HERE / f"{name}.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["hesscli.arch"] == f"archs.py:{cls.__name__}", meta
    m3 = cls(**json.loads(meta["hesscli.arch_kwargs"])).eval()
    m3.load_state_dict(load_file(str(HERE / f"{name}.safetensors")))
    with torch.no_grad():
        same(m3(x), "safetensors")


def check_data(data: dict[str, dict[str, torch.Tensor]]) -> None:
    for shard, tensors in data.items():
        loaded = torch.load(HERE / f"{shard}.pt", weights_only=True)
        for k, v in tensors.items():
            assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), (shard, k)
    x, y = data["digits"]["inputs"], data["digits"]["targets"]
    with np.load(HERE / "digits.npz") as z:
        assert np.array_equal(z["x"], x.numpy()) and z["x"].dtype == np.float32
        assert np.array_equal(z["y"], y.numpy()) and z["y"].dtype == np.int64
    st = load_file(str(HERE / "digits.safetensors"))
    assert torch.equal(st["input"], x) and torch.equal(st["target"], y)


# --------------------------------------------------------------------------- main


def main() -> None:
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.set_num_threads(1)  # bitwise-reproducible training across machines
    torch.use_deterministic_algorithms(True)

    data = load_data()
    written = write_data(data)
    check_data(data)

    rows = []
    for name, (cls, _kwargs, shard, task, _, _) in MODELS.items():
        model = train(name, data[shard])
        written += write_model(name, model, data[shard])
        check_model(name, model, data[shard])
        with torch.no_grad():
            out = model(data[shard]["inputs"])
            loss = loss_fn(task, out, data[shard]["targets"]).item()
            mname, mval = metric(task, out, data[shard]["targets"])
        n_params = sum(p.numel() for p in model.parameters())
        rows.append((name, cls.__name__, n_params, loss, mname, mval))

    print(f"{'file':<32}{'bytes':>10}")
    for p in written:
        size = p.stat().st_size
        if size >= MAX_BYTES:
            raise AssertionError(f"{p.name} is {size} bytes (limit {MAX_BYTES})")
        print(f"{p.name:<32}{size:>10}")
    print()
    print(f"{'model':<14}{'arch':<13}{'P':>6}{'loss':>10}  metric")
    for name, arch, n_params, loss, mname, mval in rows:
        print(f"{name:<14}{arch:<13}{n_params:>6}{loss:>10.4f}  {mname}={mval:.4f}")
    print("\nall files written to", HERE, "and verified")


if __name__ == "__main__":
    # TorchScript serializes module constants in set order, which depends on
    # Python's per-process string hash seed; pin it so the .pt files are
    # byte-for-byte reproducible.
    if os.environ.get("PYTHONHASHSEED") != "0":
        env = dict(os.environ, PYTHONHASHSEED="0")
        sys.exit(
            subprocess.call(
                [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], env=env
            )
        )
    main()
