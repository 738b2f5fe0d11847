"""The bundled samples on a GPU (``--device cuda``), against the same float64 CPU reference and
tolerances as on the CPU (SPEC.md: on CUDA the promises hold with TF32 off, which hesscli ensures;
with TF32 on, a float32 convolution loses about three digits). Skipped where no GPU exists."""

from __future__ import annotations

import pytest
import torch
from conftest import SAMPLES, load_result
from reference import sample_reference
from test_accuracy import check_result, data_args, model_args

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CASES = [
    ("diabetes_mlp", "export", "float32"),
    ("diabetes_mlp", "torchscript", "float64"),
    ("diabetes_mlp", "state_dict", "float64"),
    ("digits_cnn", "export", "float32"),
    ("digits_cnn", "safetensors-trust", "float64"),
    ("digits_mlp", "torchscript", "float32"),
    ("digits_mlp", "state_dict", "float64"),
]


@pytest.mark.parametrize("sample,fmt,dtype", CASES, ids=[f"{s}-{f}-{d}" for s, f, d in CASES])
def test_sample_on_cuda(cli, tmp_path, sample, fmt, dtype):
    out = tmp_path / "h.npz"
    r = cli("compute", *model_args(sample, fmt), *data_args(sample), "-o", out, "--mode", "full", "--dtype", dtype,
            "--device", "cuda", "--json", "--quiet")
    assert r.code == 0, r.err
    meta, _ = load_result(out)
    assert meta["device"].startswith("cuda")
    check_result(out, sample_reference(sample), dtype, r.json, f"{sample} {fmt} cuda")


def test_block_mode_on_cuda_matches_cpu(cli, tmp_path):
    args = [*model_args("digits_cnn", "export"), *data_args("digits_cnn"), "--mode", "block", "--blocks", "tensor",
            "--dtype", "float64", "--quiet"]
    assert cli("compute", *args, "-o", tmp_path / "gpu.npz", "--device", "cuda").code == 0
    assert cli("compute", *args, "-o", tmp_path / "cpu.npz", "--device", "cpu").code == 0
    _, gpu = load_result(tmp_path / "gpu.npz")
    _, cpu = load_result(tmp_path / "cpu.npz")
    import numpy as np

    for name in cpu["block_names"].tolist():
        a, b = gpu[f"blocks/{name}/hessian"], cpu[f"blocks/{name}/hessian"]
        assert np.abs(a - b).max() <= 1e-10 * max(np.abs(b).max(), 1e-300), name


def test_bad_class_index_is_caught_before_the_gpu(cli, tmp_path):
    """An out-of-range target would be a device-side assert that kills the process: hesscli checks
    targets on the CPU first and exits 1 with one line."""
    d = torch.load(SAMPLES / "digits.pt", weights_only=True)
    y = d["targets"].clone()
    y[5] = 10
    bad = tmp_path / "bad.pt"
    torch.save({"inputs": d["inputs"], "targets": y}, bad)
    out = tmp_path / "h.npz"
    r = cli("compute", SAMPLES / "digits_mlp.pt2", "--data", bad, "--device", "cuda", "-o", out, "--quiet")
    assert r.code == 1
    assert r.err.startswith("Error:") and "10" in r.err and "class" in r.err
    assert not out.exists()
