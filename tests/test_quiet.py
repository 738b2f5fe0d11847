"""SPEC.md: under ``--quiet`` stderr is empty on success — for every bundled sample, in every format,
and every command that evaluates a model (the cases of ``tests/cases`` are covered in
``test_cases.py``). Captured at the file-descriptor level, so C++ warnings would count."""

from __future__ import annotations

import pytest
from case_models import ok, runner
from conftest import SAMPLES

pytestmark = pytest.mark.slow  # a dozen whole compute runs

ARCHS = str(SAMPLES / "archs.py")
MODELS = {
    "digits_mlp": ("DigitsMLP", "digits.pt"),
    "digits_cnn": ("DigitsCNN", "digits_images.pt"),
    "diabetes_mlp": ("DiabetesMLP", "diabetes.pt"),
}
FORMATS = {"torchscript": ".pt", "export": ".pt2", "safetensors": ".safetensors", "state_dict": "_state_dict.pt"}


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("name", list(MODELS))
def test_compute_is_quiet(name, fmt, capfd, caplog, tmp_path):
    arch, data = MODELS[name]
    argv = ["compute", SAMPLES / f"{name}{FORMATS[fmt]}", "--data", SAMPLES / data, "-o", tmp_path / "h.npz"]
    if fmt in ("safetensors", "state_dict"):
        argv += ["--arch", f"{ARCHS}:{arch}"]
    if name == "digits_mlp":  # the largest: block mode keeps the test short
        argv += ["--mode", "block", "--params", "fc3"]
    ok(runner(capfd, caplog)(*argv))


@pytest.mark.parametrize("command", [["spectrum", "--top-k", "2", "--tol", "1e-4"], ["trace", "--matvecs", "20"],
                                     ["density", "--runs", "2", "--steps", "10"], ["inspect"]])
def test_matrix_free_and_inspect_are_quiet(command, capfd, caplog, tmp_path):
    argv = [command[0], SAMPLES / "diabetes_mlp.pt", "--data", SAMPLES / "diabetes.pt", *command[1:]]
    if command[0] != "inspect":
        argv += ["-o", tmp_path / "r.npz"]
    ok(runner(capfd, caplog)(*argv))
