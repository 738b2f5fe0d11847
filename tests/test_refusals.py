"""What hesscli refuses (issue 5, issue 2's error cases; SPEC.md, Exit codes and failure, Trust).

Each case of :data:`CASES` is a row of ``docs/refusals.md``. It runs the CLI in-process
(``hesscli.cli.main``) twice: once with a fresh output path, and once over an existing output file
with ``--force`` (so that the refusal is not just the exists-check). Both runs must give

- the case's exit code (1 error, 2 usage, 3 memory budget),
- exactly one line on stderr, ``Error: ...``, that contains the case's culprit (file, key,
  parameter, shape, expected and found), with no ANSI codes, no traceback, no "internal error",
  and no log record from torch's loggers (stderr is captured at the file-descriptor level, so
  torch's C++ warnings and its loggers' own handlers would show too),
- nothing on stdout, no new file in the output directory (no temporary file either), and the
  existing output's bytes unchanged.

Files that would run code if fully unpickled create a marker file from ``__reduce__``; the tests
prove that hesscli did not create it, and that a full unpickle would have.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import bad_models as bm
import numpy as np
import pytest
import torch

import hesscli.api
import hesscli.io.resultfile
from hesscli.cli import main

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_checkpoints"
BAD = Path(bm.__file__).resolve()
DIABETES_ARCH = f"{SAMPLES / 'archs.py'}:DiabetesMLP"
EXISTING = b"an earlier result that must survive\n"
ANSI = re.compile(r"\x1b\[")


# ---------------------------------------------------------------------------------------------
# running the CLI and checking a refusal


def run_cli(argv: list[str], capfd, caplog) -> tuple[int, str, str]:
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        code = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    torch_records = [r for r in caplog.records if r.name.startswith("torch") and r.levelno >= logging.WARNING]
    assert not torch_records, f"torch logged: {[r.getMessage()[:200] for r in torch_records]}"
    return code, out, err


def assert_error_line(err: str, needles: list[str]) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("Error: "), line
    assert not ANSI.search(line), repr(line)
    assert "Traceback" not in line and "internal error" not in line, line
    for n in needles:
        assert n in line, f"{n!r} not in the message: {line}"
    return line


def listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


@dataclass
class Setup:
    """What a case builds in its temporary directory."""

    argv: list[str]
    needles: list[str] = field(default_factory=list)
    marker: Path | None = None  # must not exist after the run


@dataclass
class Case:
    id: str
    build: Callable[[Path], Setup]
    code: int = 1
    patch: Callable[[pytest.MonkeyPatch, Path], None] | None = None
    existing: bool = True  # also run over an existing output with --force
    marks: tuple = ()


# ---------------------------------------------------------------------------------------------
# inputs


def tiny_data(d: Path, name: str = "data.pt", **overrides) -> Path:
    g = torch.Generator().manual_seed(0)
    content = {"inputs": torch.randn(16, 3, generator=g), "targets": torch.randint(0, 2, (16,), generator=g)}
    content.update(overrides)
    p = d / name
    torch.save(content, p)
    return p


def arch_model(d: Path, cls: str, name: str | None = None, build: Callable | None = None) -> list[str]:
    """A state_dict of ``bad_models.<cls>`` (or of ``build()``) plus the ``--arch`` that loads it."""
    torch.manual_seed(0)
    module = build() if build is not None else getattr(bm, cls)()
    p = d / (name or f"{cls}.pt")
    bm.save_state(module, p)
    return [p, "--arch", f"{BAD}:{cls}"]


def truncated(d: Path, sample: str) -> Path:
    raw = (SAMPLES / sample).read_bytes()
    p = d / f"truncated_{sample}"
    p.write_bytes(raw[: len(raw) // 2])
    return p


def random_bytes(d: Path, suffix: str) -> Path:
    p = d / f"random{suffix}"
    p.write_bytes(np.random.default_rng(5).bytes(4096))
    return p


class Payload:
    """Unpickling this creates the directory ``path`` (it stands for any code a pickle could run)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def safetensors_parts(d: Path) -> tuple[dict, bytes]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    p = d / "good.safetensors"
    save_file({"inputs": torch.randn(16, 3, generator=g), "targets": torch.randint(0, 2, (16,), generator=g)}, str(p))
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def safetensors_with_header(d: Path, name: str, header: bytes, body: bytes) -> Path:
    header += b" " * (-len(header) % 8)
    p = d / name
    p.write_bytes(struct.pack("<Q", len(header)) + header + body)
    return p


def corrupt_header(d: Path) -> Setup:
    hdr, body = safetensors_parts(d)
    text = json.dumps(hdr).encode()
    broken = b'{"inputs": {"dtype": "F32", "shape": [16, 3], "data_offsets": [0, 192' + b"!" * (len(text) - 70)
    p = safetensors_with_header(d, "corrupt_header.safetensors", broken[: len(text)], body)
    return Setup(["compute", SAMPLES / "diabetes_mlp.pt2", "--data", p], [str(p), "header is not valid JSON"])


def offsets(d: Path, name: str, new: list[int], needle: str) -> Setup:
    hdr, body = safetensors_parts(d)
    hdr["inputs"]["data_offsets"] = new
    p = safetensors_with_header(d, name, json.dumps(hdr).encode(), body)
    return Setup(["compute", *arch_model(d, "Tiny"), "--data", p], [str(p), "tensor 'inputs'", needle])


def with_weight(d: Path, value: float) -> list[str]:
    def build():
        m = bm.Tiny()
        with torch.no_grad():
            m.fc2.weight[1, 2] = value
        return m

    return arch_model(d, "Tiny", "weights.pt", build)


def rewrite_member(src: Path, dst: Path, member: str, change: Callable[[bytes], bytes]) -> Path:
    """A copy of the zip archive ``src`` whose member ending in ``member`` is changed: the archive
    is intact, its content is not."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, change(data) if info.filename.endswith(member) else data)
    return dst


def _export_damaged_inside(d: Path) -> Setup:
    p = rewrite_member(DIABETES_PT2, d / "short_weights.pt2", "weights/weight_0", lambda b: b[: len(b) // 2])
    return Setup(
        ["compute", p, "--data", DIABETES], [f"cannot load torch.export model '{p}'", "out of bounds for storage"]
    )


def _torchscript_damaged_code(d: Path) -> Setup:
    p = rewrite_member(
        SAMPLES / "diabetes_mlp.pt", d / "bad_code.pt", "__torch__/archs.py", lambda b: b"def forward(self x):\n"
    )
    return Setup(["compute", p, "--data", DIABETES], [f"cannot load TorchScript model '{p}'", "RuntimeError"])


def dropout_torchscript(d: Path) -> Setup:
    torch.manual_seed(0)
    x = torch.randn(16, 3)
    ts = torch.jit.trace(bm.TrainDropout().train(), x, check_trace=False)
    p = d / "traced_in_train_mode.pt"
    torch.jit.save(ts, str(p))
    return Setup(["compute", p, "--data", tiny_data(d)], ["change between two identical calls", "dropout"])


def dropout_export(d: Path) -> Setup:
    torch.manual_seed(0)
    x = torch.randn(16, 3)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(bm.TrainDropout().train(), (x,), dynamic_shapes={"x": {0: batch}})
    p = d / "exported_in_train_mode.pt2"
    torch.export.save(ep, str(p))
    return Setup(["compute", p, "--data", tiny_data(d)], ["change between two identical calls", "dropout"])


# ---------------------------------------------------------------------------------------------
# output faults (simulated: the tests run as root, which may write anywhere)


def deny_write_access(mp: pytest.MonkeyPatch, d: Path) -> None:
    """The output directory is not writable (as os.access reports it to a non-root user)."""
    real = os.access
    out_dir = str(d / "out")

    def access(path, mode, *a, **kw):
        if os.fspath(path) == out_dir and mode & os.W_OK:
            return False
        return real(path, mode, *a, **kw)

    mp.setattr(os, "access", access)


class _FailingFile:
    """A real file whose writes fail with ``err`` after ``allow`` bytes (part of it reaches disk)."""

    def __init__(self, f, err: int, allow: int):
        self._f, self._err, self._left = f, err, allow

    def write(self, b):
        if len(b) > self._left:
            self._f.write(bytes(b[: self._left]))
            self._f.flush()
            self._left = 0
            raise OSError(self._err, os.strerror(self._err))
        self._left -= len(b)
        return self._f.write(b)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def disk_full(mp: pytest.MonkeyPatch, d: Path) -> None:
    """Writing the result fails with ENOSPC after 1,000 bytes, as on a full disk."""

    def fake_open(path, mode="r", *a, **kw):
        f = open(path, mode, *a, **kw)
        return _FailingFile(f, errno.ENOSPC, 1000) if "w" in mode else f

    mp.setattr(hesscli.io.resultfile, "open", fake_open, raising=False)


def open_denied(mp: pytest.MonkeyPatch, d: Path) -> None:
    """The directory became unwritable while hesscli ran: creating the temporary file fails."""

    def fake_open(path, mode="r", *a, **kw):
        if "w" in mode:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return open(path, mode, *a, **kw)

    mp.setattr(hesscli.io.resultfile, "open", fake_open, raising=False)


def forbid_dense(mp: pytest.MonkeyPatch, d: Path) -> None:
    """Exit 3 must come before the dense work starts: calling it fails the test."""

    def dense_hessian(*a, **kw):
        raise AssertionError("dense_hessian ran although the plan exceeds --max-memory")

    mp.setattr(hesscli.api, "dense_hessian", dense_hessian)


# ---------------------------------------------------------------------------------------------
# the cases (one row of docs/refusals.md each)


def _compute_on(model_argv: list, data: Path, *extra) -> list:
    return ["compute", *model_argv, "--data", data, *extra]


DIABETES = SAMPLES / "diabetes.pt"
DIABETES_PT2 = SAMPLES / "diabetes_mlp.pt2"


def _missing_model(d):
    return Setup(["compute", d / "nope.pt", "--data", DIABETES], [f"'{d / 'nope.pt'}' does not exist"])


def _directory_model(d):
    (d / "folder.pt").mkdir()
    return Setup(["compute", d / "folder.pt", "--data", DIABETES], [str(d / "folder.pt"), "is a directory"])


def _empty_model(d):
    (d / "empty.pt2").write_bytes(b"")
    return Setup(["compute", d / "empty.pt2", "--data", DIABETES], [str(d / "empty.pt2"), "is empty"])


def _missing_data(d):
    return Setup(["compute", DIABETES_PT2, "--data", d / "nope.pt"], [f"data file '{d / 'nope.pt'}' does not exist"])


def _directory_data(d):
    (d / "shards").mkdir()
    return Setup(["compute", DIABETES_PT2, "--data", d / "shards"], [str(d / "shards"), "is a directory"])


def _empty_data(d):
    (d / "empty.npz").write_bytes(b"")
    return Setup(["compute", DIABETES_PT2, "--data", d / "empty.npz"], [str(d / "empty.npz"), "is empty"])


def _truncated_model(sample, *extra):
    def build(d):
        p = truncated(d, sample)
        return Setup(["compute", p, "--data", DIABETES, *extra], [str(p), "truncated or damaged"])

    return build


def _truncated_safetensors(d):
    p = truncated(d, "diabetes_mlp.safetensors")
    return Setup(
        ["compute", p, "--data", DIABETES, "--arch", DIABETES_ARCH], [str(p), "tensor 'fc1.weight'", "end past the"]
    )


def _truncated_data(d):
    p = truncated(d, "diabetes.pt")
    return Setup(["compute", DIABETES_PT2, "--data", p], [f"data file '{p}'", "truncated or damaged"])


def _random_model(suffix):
    def build(d):
        p = random_bytes(d, suffix)
        return Setup(
            ["compute", p, "--data", DIABETES, "--arch", DIABETES_ARCH],
            [f"model file '{p}'", "not a format hesscli knows"],
        )

    return build


def _random_data(suffix):
    def build(d):
        p = random_bytes(d, suffix)
        return Setup(["compute", DIABETES_PT2, "--data", p], [f"data file '{p}'", "not a format hesscli knows"])

    return build


def _pickle_state_dict(d):
    marker = d / "MARKER"
    p = d / "state_dict_with_payload.pt"
    torch.save({"fc1.weight": torch.zeros(4, 3), "hook": Payload(marker)}, p)
    return Setup(["compute", p, "--arch", f"{BAD}:Tiny", "--data", tiny_data(d)], [str(p), "weights_only=True"], marker)


def _pickle_data(d):
    marker = d / "MARKER"
    p = d / "data_with_payload.pt"
    torch.save({"inputs": torch.zeros(4, 3), "targets": torch.zeros(4, dtype=torch.long), "hook": Payload(marker)}, p)
    return Setup(["compute", *arch_model(d, "Tiny"), "--data", p], [str(p), "weights_only=True"], marker)


def _pickle_legacy(d):
    marker = d / "MARKER"
    p = d / "plain_pickle.pt"
    with open(p, "wb") as f:
        pickle.dump({"inputs": Payload(marker)}, f, protocol=2)
    return Setup(["compute", *arch_model(d, "Tiny"), "--data", p], [str(p), "weights_only=True"], marker)


def _npz_objects(d):
    marker = d / "MARKER"
    p = d / "objects.npz"
    np.savez(p, inputs=np.array([Payload(marker), 1.0], dtype=object), targets=np.zeros(2))
    return Setup(
        ["compute", *arch_model(d, "Tiny"), "--data", p], [str(p), "object arrays", "allow_pickle=False"], marker
    )


def _arch_in_metadata(d):
    return Setup(
        ["compute", SAMPLES / "diabetes_mlp.safetensors", "--data", DIABETES],
        ["--trust-code", f"--arch {SAMPLES / 'archs.py'}:DiabetesMLP", str(SAMPLES / "diabetes_mlp.safetensors")],
    )


def _state_dict_without_arch(d):
    p = SAMPLES / "diabetes_mlp_state_dict.pt"
    return Setup(["compute", p, "--data", DIABETES], [str(p), "pass --arch"])


def _missing_keys(d):
    p = d / "tiny.pt"
    bm.save_state(bm.Tiny(), p)
    return Setup(
        ["compute", p, "--arch", f"{BAD}:Unused", "--data", tiny_data(d)],
        [str(p), "missing keys: extra.weight, extra.bias"],
    )


def _extra_keys(d):
    p = d / "unused.pt"
    bm.save_state(bm.Unused(), p)
    return Setup(
        ["compute", p, "--arch", f"{BAD}:Tiny", "--data", tiny_data(d)],
        [str(p), "unexpected keys: extra.weight, extra.bias"],
    )


def _wrong_shapes(d):
    p = d / "wide.pt"
    bm.save_state(bm.Tiny(width=5), p)
    return Setup(
        ["compute", p, "--arch", f"{BAD}:Tiny", "--data", tiny_data(d)],
        [str(p), "fc1.weight (expected (4, 3), found (4, 5))"],
    )


def _arch_missing_file(d):
    return Setup(
        ["compute", SAMPLES / "diabetes_mlp.safetensors", "--data", DIABETES, "--arch", f"{d / 'nowhere.py'}:Net"],
        [f"--arch file '{d / 'nowhere.py'}' does not exist"],
    )


def _arch_missing_name(d):
    return Setup(
        ["compute", SAMPLES / "diabetes_mlp.safetensors", "--data", DIABETES, "--arch", f"{SAMPLES / 'archs.py'}:Nope"],
        ["no callable named 'Nope'", "DiabetesMLP"],
    )


def _arch_missing_module(d):
    return Setup(
        ["compute", SAMPLES / "diabetes_mlp.safetensors", "--data", DIABETES, "--arch", "no_such_package.models:Net"],
        ["--arch module 'no_such_package.models' cannot be imported"],
    )


def _data_unknown_keys(d):
    p = d / "renamed.pt"
    torch.save({"feats": torch.zeros(16, 3), "labels": torch.zeros(16, dtype=torch.long)}, p)
    return Setup(_compute_on(arch_model(d, "Tiny"), p), [str(p), "its keys: feats, labels", "--input-key"])


def _data_missing_key_flag(d):
    p = tiny_data(d)
    return Setup(
        _compute_on(arch_model(d, "Tiny"), p, "--input-key", "feats"),
        [str(p), "no key 'feats' (--input-key)", "its keys: inputs, targets"],
    )


def _data_lengths(d):
    p = tiny_data(d, targets=torch.zeros(10, dtype=torch.long))
    return Setup(_compute_on(arch_model(d, "Tiny"), p), [str(p), "have 16 samples (16, 3)", "have 10 (10,)"])


def _data_no_samples(d):
    p = tiny_data(d, inputs=torch.zeros(0, 3), targets=torch.zeros(0, dtype=torch.long))
    return Setup(_compute_on(arch_model(d, "Tiny"), p), ["no samples", str(p)])


def _data_wrong_width(d):
    p = tiny_data(d, inputs=torch.randn(16, 5))
    return Setup(_compute_on(arch_model(d, "Tiny"), p), ["inputs (8, 5)", "8x5 and 3x4"])


def _targets_float_for_ce(d):
    p = tiny_data(d, targets=torch.rand(16))
    return Setup(
        _compute_on(arch_model(d, "Tiny"), p, "--loss", "cross_entropy"),
        ["--loss cross_entropy needs integer class targets", "float32"],
    )


def _targets_int_for_mse(d):
    p = tiny_data(d, targets=torch.randint(0, 2, (16, 2)))
    return Setup(
        _compute_on(arch_model(d, "Tiny"), p, "--loss", "mse"), ["--loss mse needs floating targets", "int64", "(8, 2)"]
    )


def _targets_bool(d):
    p = tiny_data(d, targets=torch.ones(16, dtype=torch.bool))
    return Setup(_compute_on(arch_model(d, "Tiny"), p), ["--loss auto", "bool targets (8,)", "outputs (8, 2)"])


def _class_out_of_range(d):
    p = tiny_data(d, targets=torch.full((16,), 2))
    return Setup(_compute_on(arch_model(d, "Tiny"), p), ["class index 2", "2 classes", "outputs (8, 2)"])


def _class_negative(d):
    p = tiny_data(d, targets=torch.full((16,), -3))
    return Setup(_compute_on(arch_model(d, "Tiny"), p), ["class index -3", "2 classes"])


def _inputs_nan(d):
    x = torch.randn(16, 3)
    x[5, 1] = float("nan")
    p = tiny_data(d, inputs=x)
    return Setup(_compute_on(arch_model(d, "Tiny"), p), [str(p), "inputs 'inputs' contain NaN or Inf", "sample 5"])


def _inputs_inf(d):
    x = torch.randn(16, 3)
    x[7, 0] = float("inf")
    p = tiny_data(d, inputs=x)
    return Setup(_compute_on(arch_model(d, "Tiny"), p), [str(p), "contain NaN or Inf", "sample 7"])


def _targets_nan(d):
    y = torch.randn(16, 2)
    y[3, 0] = float("nan")
    p = tiny_data(d, targets=y)
    return Setup(_compute_on(arch_model(d, "Tiny"), p), [str(p), "targets 'targets' contain NaN or Inf"])


def _weights_inf(d):
    return Setup(
        _compute_on(with_weight(d, float("inf")), tiny_data(d)), ["parameter 'fc2.weight' (2, 4) contains NaN or Inf"]
    )


def _weights_nan(d):
    return Setup(
        _compute_on(with_weight(d, float("nan")), tiny_data(d)), ["parameter 'fc2.weight' (2, 4) contains NaN or Inf"]
    )


def _loss_inf(d):
    p = tiny_data(d, targets=torch.randn(16, 2))
    return Setup(_compute_on(arch_model(d, "Overflow"), p), ["the loss is infinite", "16 samples"])


def _loss_nan(d):
    """Sample 12 (past the first 8, which the model checks look at) makes the loss NaN."""
    x = torch.rand(16, 3)
    x[12, 0] = -1.0
    p = tiny_data(d, inputs=x, targets=torch.randn(16, 2))
    return Setup(_compute_on(arch_model(d, "NaNLoss"), p), ["the loss is NaN", "16 samples"])


def _outputs_nan_first_batch(d):
    """NaN outputs among the first samples: the error must say NaN, not 'dropout'."""
    x = torch.rand(16, 3)
    x[1, 0] = -1.0
    p = tiny_data(d, inputs=x, targets=torch.randn(16, 2))
    return Setup(_compute_on(arch_model(d, "NaNLoss"), p), ["NaN"])


def _hessian_nan(command: str, *extra: str):
    """Finite loss, NaN second derivatives (bad_models.KinkedNorm)."""

    def build(d):
        return Setup([command, *arch_model(d, "KinkedNorm"), "--data", tiny_data(d), *extra], ["NaN or Inf"])

    return build


def _forward_raises(d):
    return Setup(
        _compute_on(arch_model(d, "Raises"), tiny_data(d)),
        ["forward failed on inputs (8, 3)", "this model refuses to run"],
    )


def _broadcast_auto(d):
    p = tiny_data(d, targets=torch.randn(16))
    return Setup(
        _compute_on(arch_model(d, "Regressor"), p), ["--loss auto", "outputs (8, 1)", "targets (8,)", "no broadcasting"]
    )


def _broadcast_mse(d):
    p = tiny_data(d, targets=torch.randn(16))
    return Setup(
        _compute_on(arch_model(d, "Regressor"), p, "--loss", "mse"), ["--loss mse", "outputs (8, 1)", "targets (8,)"]
    )


def _dropout_arch(d):
    return Setup(
        _compute_on(arch_model(d, "BakedDropout"), tiny_data(d)), ["change between two identical calls", "dropout"]
    )


def _batch_centering(d):
    return Setup(
        _compute_on(arch_model(d, "BatchCentering"), tiny_data(d)),
        ["depends on the rest of the batch", "batch statistics"],
    )


def _batchnorm_no_running_stats(d):
    return Setup(
        _compute_on(arch_model(d, "BatchStats"), tiny_data(d)), ["depends on the rest of the batch", "batch statistics"]
    )


def _params_nothing(d):
    return Setup(
        _compute_on(arch_model(d, "Tiny"), tiny_data(d), "--params", "^conv"),
        ["--params '^conv' selects no parameter", "fc1.weight"],
    )


def _unknown_loss(d):
    return Setup(
        _compute_on(arch_model(d, "Tiny"), tiny_data(d), "--loss", "hinge"), ["'--loss'", "'hinge'", "cross_entropy"]
    )


def _unknown_engine(d):
    return Setup(_compute_on([DIABETES_PT2], DIABETES, "--engine", "fast"), ["'--engine'", "'fast'", "'auto', 'autograd', 'chain'"])


def _engine_chain_not_a_chain(d):
    return Setup(_compute_on([DIABETES_PT2], DIABETES, "--engine", "chain"),
                 ["--engine chain", "not an affine chain", "native_layer_norm"])


def _unknown_reduction(d):
    return Setup(
        _compute_on(arch_model(d, "Tiny"), tiny_data(d), "--reduction", "median"), ["'--reduction'", "'median'", "'mean', 'sum'"]
    )


def _output_fault(needles):
    def build(d):
        return Setup(_compute_on(arch_model(d, "Tiny"), tiny_data(d)), [str(d / "out" / "hessian.npz"), *needles])

    return build


def _output_missing_dir(d):
    out = d / "out" / "missing" / "hessian.npz"
    return Setup(_compute_on(arch_model(d, "Tiny"), tiny_data(d), "-o", out), [str(out), "does not exist"])


def _output_is_dir(d):
    out = d / "out" / "adir.npz"
    out.mkdir()
    return Setup(_compute_on(arch_model(d, "Tiny"), tiny_data(d), "-o", out), [str(out), "is a directory"])


def _max_memory(mode):
    def build(d):
        return Setup(
            [
                "compute",
                SAMPLES / "digits_mlp.pt2",
                "--data",
                SAMPLES / "digits.pt",
                "--max-memory",
                "20MB",
                "--mode",
                mode,
            ],
            ["P = 3,466", "over the budget of 20.00 MB", "--max-memory", "fits a dense matrix of about", "spectrum"],
        )

    return build


def _max_memory_not_a_size(d):
    return Setup(
        ["compute", DIABETES_PT2, "--data", DIABETES, "--max-memory", "lots"], ["--max-memory 'lots' is not a size"]
    )


def _show(name: str, make: Callable[[Path], None] | None, needles: list[str], marker: bool = False):
    def build(d):
        p = d / name
        if make is not None:
            make(p)
        return Setup(["show", p], [f"'{p}'", *needles], d / "MARKER" if marker else None)

    return build


def _single_npy(p: Path) -> None:
    with open(p, "wb") as f:
        np.save(f, np.eye(2))


def _npz_without_meta(p: Path) -> None:
    np.savez(p, hessian=np.eye(2))


def _npz_pickled_meta(p: Path) -> None:
    np.savez(p, meta=np.array([Payload(p.parent / "MARKER")], dtype=object))


def _npz_other_schema(p: Path) -> None:
    np.savez(p, meta=np.array(json.dumps({"schema": "other/9"})))


def _truncated_result(p: Path) -> None:
    buf = p.parent / "full.npz"
    np.savez(buf, meta=np.array(json.dumps({"schema": "hesscli/1"})), hessian=np.eye(64))
    raw = buf.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])



CASES = [
    Case("model_missing", _missing_model),
    Case("model_directory", _directory_model),
    Case("model_empty", _empty_model),
    Case("data_missing", _missing_data),
    Case("data_directory", _directory_data),
    Case("data_empty", _empty_data),
    Case("truncated_torchscript", _truncated_model("diabetes_mlp.pt")),
    Case("truncated_export", _truncated_model("diabetes_mlp.pt2")),
    Case("truncated_state_dict", _truncated_model("diabetes_mlp_state_dict.pt", "--arch", DIABETES_ARCH)),
    Case("truncated_safetensors", _truncated_safetensors),
    Case("truncated_data", _truncated_data),
    Case("export_damaged_inside", _export_damaged_inside),
    Case("torchscript_damaged_code", _torchscript_damaged_code),
    Case("random_bytes_model_pt", _random_model(".pt")),
    Case("random_bytes_model_pt2", _random_model(".pt2")),
    Case("random_bytes_model_safetensors", _random_model(".safetensors")),
    Case("random_bytes_data_pt", _random_data(".pt")),
    Case("random_bytes_data_safetensors", _random_data(".safetensors")),
    Case("random_bytes_data_npz", _random_data(".npz")),
    Case("safetensors_corrupt_header", corrupt_header),
    Case(
        "safetensors_offsets_past_end",
        lambda d: offsets(d, "past_end.safetensors", [128, 10**6], "end past the 320 bytes"),
    ),
    Case(
        "safetensors_offsets_wrong_size", lambda d: offsets(d, "wrong_size.safetensors", [128, 136], "needs 192 bytes")
    ),
    Case("pickle_in_state_dict", _pickle_state_dict),
    Case("pickle_in_data", _pickle_data),
    Case("plain_pickle_data", _pickle_legacy),
    Case("npz_object_arrays", _npz_objects),
    Case("safetensors_arch_metadata_untrusted", _arch_in_metadata, code=2),
    Case("state_dict_without_arch", _state_dict_without_arch, code=2),
    Case("state_dict_missing_keys", _missing_keys),
    Case("state_dict_extra_keys", _extra_keys),
    Case("state_dict_wrong_shapes", _wrong_shapes),
    Case("arch_missing_file", _arch_missing_file),
    Case("arch_missing_name", _arch_missing_name),
    Case("arch_missing_module", _arch_missing_module),
    Case("data_unknown_keys", _data_unknown_keys),
    Case("data_missing_key", _data_missing_key_flag),
    Case("data_length_mismatch", _data_lengths),
    Case("data_no_samples", _data_no_samples),
    Case("data_wrong_width", _data_wrong_width),
    Case("targets_float_for_cross_entropy", _targets_float_for_ce),
    Case("targets_int_for_mse", _targets_int_for_mse),
    Case("targets_bool", _targets_bool),
    Case("class_index_out_of_range", _class_out_of_range),
    Case("class_index_negative", _class_negative),
    Case("inputs_nan", _inputs_nan),
    Case("inputs_inf", _inputs_inf),
    Case("targets_nan", _targets_nan),
    Case("weights_inf", _weights_inf),
    Case("weights_nan", _weights_nan),
    Case("loss_inf", _loss_inf),
    Case("loss_nan", _loss_nan),
    Case("outputs_nan_first_batch", _outputs_nan_first_batch),
    Case("forward_raises", _forward_raises),
    Case("hessian_nan_compute", _hessian_nan("compute")),
    Case(
        "hessian_nan_spectrum",
        _hessian_nan("spectrum", "--top-k", "2"),
    ),
    Case("outputs_n1_targets_n_auto", _broadcast_auto),
    Case("outputs_n1_targets_n_mse", _broadcast_mse),
    Case("dropout_in_arch", _dropout_arch),
    Case("dropout_traced_torchscript", dropout_torchscript),
    Case("dropout_exported", dropout_export),
    Case("batch_statistics", _batch_centering),
    Case("batchnorm_without_running_stats", _batchnorm_no_running_stats),
    Case("params_select_nothing", _params_nothing, code=2),
    Case("unknown_loss", _unknown_loss, code=2),
    Case("unknown_reduction", _unknown_reduction, code=2),
    Case("unknown_engine", _unknown_engine, code=2),
    Case("engine_chain_not_a_chain", _engine_chain_not_a_chain),
    Case("output_missing_directory", _output_missing_dir, existing=False),
    Case("output_is_directory", _output_is_dir, existing=False),
    Case("output_directory_not_writable", _output_fault(["not writable"]), patch=deny_write_access),
    Case("output_write_denied_late", _output_fault(["Permission denied"]), patch=open_denied),
    Case("disk_full", _output_fault(["No space left on device"]), patch=disk_full),
    Case("max_memory_full", _max_memory("full"), code=3, patch=forbid_dense),
    Case("max_memory_auto", _max_memory("auto"), code=3, patch=forbid_dense),
    Case("max_memory_not_a_size", _max_memory_not_a_size, code=2),
    Case("show_missing", _show("nope.npz", None, ["does not exist"]), existing=False),
    Case("show_truncated", _show("cut.npz", _truncated_result, ["truncated or damaged"]), existing=False),
    Case(
        "show_random_bytes",
        _show("noise.npz", lambda p: p.write_bytes(b"\x80" + bytes(999)), ["not an .npz archive"]),
        existing=False,
    ),
    Case("show_single_npy", _show("one.npz", _single_npy, ["a single .npy array"]), existing=False),
    Case("show_not_a_result", _show("other.npz", _npz_without_meta, ["no 'meta' entry"]), existing=False),
    Case(
        "show_pickled_meta",
        _show("pickled.npz", _npz_pickled_meta, ["Object arrays cannot be loaded"], marker=True),
        existing=False,
    ),
    Case(
        "show_other_schema", _show("future.npz", _npz_other_schema, ["schema 'other/9'", "hesscli/1"]), existing=False
    ),
]


def _params():
    out = []
    for c in CASES:
        for variant in ("new", "existing") if c.existing else ("new",):
            out.append(pytest.param(c, variant, id=f"{c.id}-{variant}", marks=c.marks))
    return out


@pytest.mark.parametrize("case,variant", _params())
def test_refused(case: Case, variant: str, tmp_path, capfd, caplog, monkeypatch):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    setup = case.build(tmp_path)
    argv = [str(a) for a in setup.argv]
    out = out_dir / "hessian.npz"
    if "-o" not in argv:
        argv += ["-o", str(out)]
    if variant == "existing":
        out.write_bytes(EXISTING)
        argv.append("--force")
    before = listing(out_dir)
    if case.patch is not None:
        case.patch(monkeypatch, tmp_path)
    code, stdout, stderr = run_cli(argv, capfd, caplog)
    monkeypatch.undo()
    assert code == case.code, f"exit {code}, expected {case.code}: {stderr}"
    assert_error_line(stderr, setup.needles)
    assert stdout == ""
    assert listing(out_dir) == before, "a file was left in the output directory"
    if variant == "existing":
        assert out.read_bytes() == EXISTING
    if setup.marker is not None:
        assert not setup.marker.exists(), "hesscli ran code from a pickle"


# ---------------------------------------------------------------------------------------------
# cases that need more than one run


def test_existing_output_without_force(tmp_path, capfd, caplog):
    """row output_exists: refused before any work, the file untouched."""
    out = tmp_path / "hessian.npz"
    out.write_bytes(EXISTING)
    code, stdout, stderr = run_cli(
        ["compute", *arch_model(tmp_path, "Tiny"), "--data", tiny_data(tmp_path), "-o", out], capfd, caplog
    )
    assert code == 1
    assert_error_line(stderr, [f"output '{out}' exists", "--force"])
    assert out.read_bytes() == EXISTING and stdout == ""
    assert not [n for n in listing(tmp_path) if n.startswith(".")]


@pytest.mark.parametrize(
    "case_id", ["pickle_in_state_dict", "pickle_in_data", "plain_pickle_data", "npz_object_arrays", "show_pickled_meta"]
)
def test_payload_would_run_if_unpickled(case_id, tmp_path):
    """The pickle cases are real: a full unpickle of the same file creates the marker."""
    setup = next(c for c in CASES if c.id == case_id).build(tmp_path)
    path = Path(setup.needles[0].strip("'"))
    assert not setup.marker.exists()
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=True) as z:
            [z[k] for k in z.files]
    elif case_id == "plain_pickle_data":
        with open(path, "rb") as f:
            pickle.load(f)
    else:
        torch.load(path, weights_only=False)
    assert setup.marker.exists()


def test_arch_hint_from_metadata_works(tmp_path, capfd, caplog):
    """The ``--arch`` (and ``--arch-kwargs``) the untrusted-metadata error suggests, pasted as is,
    loads the model."""
    import shlex

    st = SAMPLES / "diabetes_mlp.safetensors"
    code, _, stderr = run_cli(["compute", st, "--data", DIABETES, "-o", tmp_path / "a.npz"], capfd, caplog)
    assert code == 2
    hint = re.search(r"pass (--arch .*?) \(after", stderr).group(1)
    args = shlex.split(hint)
    code, _, stderr = run_cli(["inspect", st, *args, "--quiet"], capfd, caplog)
    assert code == 0, stderr


def test_unused_parameters_get_zero_rows(tmp_path, capfd, caplog):
    """row no_gradient: parameters the loss never sees are reported in a note, and their rows and
    columns are exactly zero; the rest equals a float64 torch.func reference."""
    from torch.func import functional_call, hessian

    from hesscli.io.resultfile import read_result

    model_argv = arch_model(tmp_path, "Unused")
    data = tiny_data(tmp_path)
    out = tmp_path / "h.npz"
    code, _, stderr = run_cli(["compute", *model_argv, "--data", data, "--dtype", "float64", "-o", out], capfd, caplog)
    assert code == 0, stderr
    assert "no gradient" in stderr and "extra.weight, extra.bias" in stderr
    rf = read_result(out)
    H = rf["hessian"]
    names = list(rf["param_names"])
    offs = rf["param_offsets"]
    lo, hi = int(offs[names.index("extra.weight")]), int(offs[names.index("extra.bias") + 1])
    assert np.all(H[lo:hi, :] == 0) and np.all(H[:, lo:hi] == 0)
    assert rf.meta["unused_params"] == ["extra.weight", "extra.bias"]

    model = bm.Unused()
    model.load_state_dict(torch.load(model_argv[0], weights_only=True))
    model = model.double().eval()
    d = torch.load(data, weights_only=True)
    x, y = d["inputs"].double(), d["targets"]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    Hd = hessian(loss)(params)
    ref = torch.cat(
        [torch.cat([Hd[a][b].reshape(params[a].numel(), params[b].numel()) for b in names], 1) for a in names], 0
    )
    assert np.abs(H - ref.numpy()).max() <= 1e-10 * max(np.abs(ref.numpy()).max(), 1e-300)


def test_spectrum_data_without_source(tmp_path, capfd, caplog):
    """row spectrum_data_without_source: --data without SOURCE is ambiguous (usage, exit 2)."""
    out = tmp_path / "s.npz"
    code, stdout, stderr = run_cli(["spectrum", "--data", DIABETES, "-o", out], capfd, caplog)
    assert code == 2, stderr
    assert_error_line(stderr, ["--data", "SOURCE"])
    assert not out.exists() and listing(tmp_path) == []


def test_docs_table_matches_cases():
    """docs/refusals.md has one row per case, each naming its test, with the case's exit code."""
    text = (ROOT / "docs" / "refusals.md").read_text()
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\|\s*(.+?)\s*\|\s*(\d+)\s*\|.*\|\s*`([a-z0-9_]+)`\s*\|\s*$", line)
        if m:
            rows[m.group(3)] = int(m.group(2))
    expected = {c.id: c.code for c in CASES}
    expected.update(output_exists=1, no_gradient=0, spectrum_data_without_source=2, sigint=130, sigterm=143)
    assert rows == expected


CUDA_CASES = [
    "class_index_out_of_range",
    "class_index_negative",
    "targets_float_for_cross_entropy",
    "inputs_nan",
    "data_wrong_width",
    "loss_inf",
    "dropout_in_arch",
    "batch_statistics",
]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case_id", CUDA_CASES)
def test_refused_on_cuda(case_id, tmp_path, capfd, caplog):
    """The same refusals with --device cuda: targets are checked on the CPU before they reach the
    GPU, so a bad class index is an Error line, not a device-side assert that kills the process."""
    case = next(c for c in CASES if c.id == case_id)
    setup = case.build(tmp_path)
    out = tmp_path / "out.npz"
    code, stdout, stderr = run_cli([*setup.argv, "--device", "cuda", "-o", out], capfd, caplog)
    assert code == case.code, stderr
    assert_error_line(stderr, setup.needles)
    assert not out.exists() and stdout == ""


def test_max_memory_hint_is_honest(tmp_path, capfd, caplog):
    """The figure in the exit-3 message ("fits a dense matrix of about N parameters") is one to act
    on: under the same budget, selecting fewer than N parameters (fc3, 330) runs, and selecting more
    (fc2, 1,056) is refused again."""
    base = ["compute", SAMPLES / "digits_mlp.pt2", "--data", SAMPLES / "digits.pt", "--max-memory", "20MB"]
    base += ["--mode", "full", "--no-dense", "--quiet"]
    code, _, stderr = run_cli([*base, "-o", tmp_path / "all.npz"], capfd, caplog)
    assert code == 3, stderr
    n = int(re.search(r"fits a dense matrix of about ([\d,]+) parameters", stderr).group(1).replace(",", ""))
    assert 330 <= n < 1056, n
    code, _, stderr = run_cli([*base, "--params", "^fc2", "-o", tmp_path / "fc2.npz"], capfd, caplog)
    assert code == 3 and "P = 1,056" in stderr, stderr
    code, _, stderr = run_cli([*base, "--params", "^fc3", "-o", tmp_path / "fc3.npz"], capfd, caplog)
    assert code == 0, stderr
    assert (tmp_path / "fc3.npz").exists() and not (tmp_path / "fc2.npz").exists()


def test_readme_carries_the_refusals_table():
    """The README's "What hesscli refuses" table is docs/refusals.md's, row for row."""
    table = [ln for ln in (ROOT / "docs" / "refusals.md").read_text().splitlines() if ln.startswith("| ")]
    readme = (ROOT / "README.md").read_text()
    assert "## What hesscli refuses" in readme
    missing = [ln for ln in table if ln not in readme]
    assert not missing, f"README lacks {len(missing)} rows of docs/refusals.md, e.g. {missing[0]}"
