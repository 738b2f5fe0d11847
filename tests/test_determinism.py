"""The same command twice gives bit-identical arrays (issue 5, Determinism).

Each command runs twice, in-process, from two empty directories with the same relative output
name, so that the two command lines are identical. Every array must be equal bit for bit (same
dtype, same shape, same bytes), and ``meta`` equal apart from its clock fields (``created``, the
``*seconds`` timings, and ``chunk_size``, which dense.py tunes by timing). Random methods are given ``--seed``; ``meta`` records it, and another seed
gives another estimate (so the seed is really used).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hesscli.cli import main

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
MODEL = str(SAMPLES / "diabetes_mlp.pt2")
DATA = str(SAMPLES / "diabetes.pt")


def run_in(directory: Path, argv: list[str], monkeypatch, capsys) -> dict:
    directory.mkdir()
    monkeypatch.chdir(directory)
    code = main(argv + ["-o", "result.npz", "--quiet"])
    err = capsys.readouterr().err
    assert code in (0, 4), err  # 4: spectrum wrote its result with some pairs unconverged
    with np.load(directory / "result.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# fields that come from the clock: when the run happened, how long it took, and the chunk size
# that dense.py picks by timing chunks (the arrays must not depend on it)
TIMING = {"created", "chunk_size"}


def _clockless(value):
    """``value`` without its clock fields, at any depth (a nested step's ``seconds`` too)."""
    if isinstance(value, dict):
        return {k: _clockless(v) for k, v in value.items() if k not in TIMING and "seconds" not in k}
    if isinstance(value, list):
        return [_clockless(v) for v in value]
    return value


def clockless_meta(arrays: dict) -> dict:
    import json

    return _clockless(json.loads(str(arrays["meta"][()])))


def assert_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        if k == "meta":
            continue
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"'{k}' differs between two identical runs"
    assert clockless_meta(a) == clockless_meta(b)


COMMANDS = {
    "compute": ["compute", MODEL, "--data", DATA],
    "spectrum": ["spectrum", MODEL, "--data", DATA, "--top-k", "3", "--seed", "3"],
    "trace": ["trace", MODEL, "--data", DATA, "--method", "hutchinson", "--matvecs", "20", "--seed", "3"],
    "density": ["density", MODEL, "--data", DATA, "--runs", "3", "--steps", "12", "--seed", "3"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_same_command_same_bits(command, tmp_path, monkeypatch, capsys):
    argv = COMMANDS[command]
    first = run_in(tmp_path / "one", argv, monkeypatch, capsys)
    second = run_in(tmp_path / "two", argv, monkeypatch, capsys)
    assert_identical(first, second)
    meta = clockless_meta(first)
    assert meta["seed"] == (3 if "--seed" in argv else 0)


def test_seed_is_used(tmp_path, monkeypatch, capsys):
    """Hutchinson's estimate depends on its random vectors: another --seed, another estimate."""
    argv = COMMANDS["trace"]
    a = run_in(tmp_path / "three", argv, monkeypatch, capsys)
    b = run_in(tmp_path / "four", argv[:-1] + ["4"], monkeypatch, capsys)
    assert clockless_meta(b)["seed"] == 4
    assert a["trace"].tobytes() != b["trace"].tobytes()
