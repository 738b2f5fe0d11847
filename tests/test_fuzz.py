"""Fuzzing the loaders with damaged copies of valid files (issue 5).

Bytes of the bundled diabetes sample (every model format, and its data shard as .pt, .npz and
.safetensors) and of a small result file (read as ``hesscli show`` reads it) are flipped,
overwritten, cut off or inserted. Every outcome must be either a loaded
model or data set that still makes sense, or a :class:`HesscliError` whose message is one printable
line naming the file — never another exception (a traceback for the user), never a hang (an alarm
fails an example that takes more than 30 s).
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hesscli.errors import HesscliError
from hesscli.io.data import load_dataset
from hesscli.io.loading import FORMATS, detect_format, load_model
from hesscli.io.resultfile import read_result, summarize

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
ARCH = f"{SAMPLES / 'archs.py'}:DiabetesMLP"


class Originals(dict):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"<{len(self)} sample files>"


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Originals:
    """name -> (kind, bytes): the valid files the mutations start from."""
    d = tmp_path_factory.mktemp("fuzz_src")
    data = torch.load(SAMPLES / "diabetes.pt", weights_only=True)
    x, y = (data["inputs"], data["targets"]) if isinstance(data, dict) else data
    x, y = x[:64].contiguous(), y[:64].contiguous()
    np.savez(d / "diabetes.npz", inputs=x.numpy(), targets=y.numpy())
    from safetensors.torch import save_file

    save_file({"inputs": x, "targets": y}, str(d / "diabetes.safetensors"))
    torch.save({"inputs": x, "targets": y}, d / "diabetes_small.pt")
    import bad_models as bm

    from hesscli.cli import main

    torch.manual_seed(0)
    bm.save_state(bm.Tiny(), d / "tiny.pt")
    g = torch.Generator().manual_seed(0)
    torch.save(
        {"inputs": torch.randn(16, 3, generator=g), "targets": torch.randint(0, 2, (16,), generator=g)},
        d / "tiny_data.pt",
    )
    code = main(["compute", str(d / "tiny.pt"), "--arch", f"{bm.__file__}:Tiny", "--data", str(d / "tiny_data.pt"),
                 "-o", str(d / "result.npz"), "--quiet", "--mode", "block"])  # fmt: skip
    assert code == 0
    files = {
        "diabetes_mlp.pt": ("model", SAMPLES / "diabetes_mlp.pt"),
        "diabetes_mlp.pt2": ("model", SAMPLES / "diabetes_mlp.pt2"),
        "diabetes_mlp.safetensors": ("model", SAMPLES / "diabetes_mlp.safetensors"),
        "diabetes_mlp_state_dict.pt": ("model", SAMPLES / "diabetes_mlp_state_dict.pt"),
        "diabetes_small.pt": ("data", d / "diabetes_small.pt"),
        "diabetes.npz": ("data", d / "diabetes.npz"),
        "diabetes.safetensors": ("data", d / "diabetes.safetensors"),
        "result.npz": ("result", d / "result.npz"),
    }
    return Originals({name: (kind, path.read_bytes()) for name, (kind, path) in files.items()})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@st.composite
def mutations(draw, names: list[str]):
    """(file name, operation, position, bytes): positions favour the first and last 512 bytes,
    where the headers, pickles and zip directories are."""
    name = draw(st.sampled_from(names))
    op = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert"]))
    where = draw(st.sampled_from(["head", "tail", "anywhere"]))
    frac = draw(st.floats(0.0, 1.0, exclude_max=True))
    payload = draw(st.binary(min_size=1, max_size=16))
    return name, op, where, frac, payload


def mutate(raw: bytes, op: str, where: str, frac: float, payload: bytes) -> bytes:
    n = len(raw)
    span = min(n, 512)
    pos = {"head": int(frac * span), "tail": n - span + int(frac * span), "anywhere": int(frac * n)}[where]
    if op == "flip":
        b = bytearray(raw)
        b[pos] ^= payload[0] or 0xFF
        return bytes(b)
    if op == "overwrite":
        return raw[:pos] + payload + raw[pos + len(payload) :]
    if op == "truncate":
        return raw[:pos]
    return raw[:pos] + payload + raw[pos:]


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang("a loader took more than 30 s")


NAMES = [
    "diabetes_mlp.pt",
    "diabetes_mlp.pt2",
    "diabetes_mlp.safetensors",
    "diabetes_mlp_state_dict.pt",
    "diabetes_small.pt",
    "diabetes.npz",
    "diabetes.safetensors",
    "result.npz",
]


@settings(
    max_examples=500,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(m=mutations(NAMES))
def test_damaged_files_load_or_fail_with_one_error_line(originals, workdir, m):
    name, op, where, frac, payload = m
    kind, raw = originals[name]
    path = workdir / name
    path.write_bytes(mutate(raw, op, where, frac, payload))
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(30)
    try:
        if kind == "model":
            needs_arch = name.endswith(".safetensors") or "state_dict" in name
            try:
                fmt = detect_format(path)
                lm = load_model(path, arch=ARCH if needs_arch else None, arch_kwargs={"hidden": 16})
            except HesscliError as e:
                check_error(e, path)
                return
            assert fmt in FORMATS and lm.format == fmt
            params = lm.named_parameters()
            assert params and all(isinstance(p, torch.Tensor) for _, p in params)
        elif kind == "result":
            try:
                rf = read_result(path)
            except HesscliError as e:
                check_error(e, path)
                return
            try:
                summary = summarize(rf)
            except HesscliError as e:
                check_error(e, path)
                return
            finally:
                rf.close()
            assert summary["command"] is None or isinstance(summary["command"], str)
        else:
            try:
                ds = load_dataset([path])
            except HesscliError as e:
                check_error(e, path)
                return
            assert ds.n_samples > 0
            x, y = ds.first(4)
            assert x.shape[0] == y.shape[0] > 0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_error(e: HesscliError, path: Path) -> None:
    msg = e.message
    assert e.exit_code == 1, f"exit code {e.exit_code} for a damaged file: {msg}"
    assert msg and "\n" not in msg and "\x1b" not in msg, repr(msg)
    assert str(path) in msg, f"the message does not name the file: {msg}"
    assert len(msg) < 600, f"message too long ({len(msg)} characters): {msg[:200]}..."
