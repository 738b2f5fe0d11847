"""Hugging Face model directories (SPEC.md, Model files 5): ``config.json`` plus ``model.safetensors``
or a sharded ``model.safetensors.index.json`` — what ``save_pretrained`` and a Trainer's
``checkpoint-N/`` folder hold.

The class is ``config.architectures[0]`` looked up in ``transformers`` itself; a config that asks
for remote code (``auto_map``) or names a class transformers does not have is refused, so no code
from a model directory runs. Attention is eager (``attn_implementation="eager"``); weights are
loaded in float32 whatever their stored dtype (bf16/fp16 included) and cast by the objective for
``--dtype``. Needs the ``hf`` extra (``pip install 'hesscli[hf]'``).

:func:`head_of` tells which loss ``--loss auto`` uses (SPEC.md, Loss): the head of a causal LM
(next-token cross-entropy), a masked LM or token classifier (cross-entropy over non-ignored
tokens), or a sequence classifier (by ``config.problem_type``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hesscli.errors import HesscliError

__all__ = ["HFInfo", "is_hf_directory", "load_hf_directory", "head_of", "hf_fingerprint"]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


@dataclass(frozen=True)
class HFInfo:
    """What hesscli needs to know of a Hugging Face model: its class, head and label set-up."""

    class_name: str
    head: str | None  # causal_lm | masked_lm | token_classification | sequence_classification | None
    problem_type: str | None
    num_labels: int


def is_hf_directory(path: Path) -> bool:
    """Whether path is a Hugging Face model directory (a config.json with a model class and weights)."""
    return path.is_dir() and (path / "config.json").is_file()


def _transformers():
    try:
        import transformers
    except ImportError:
        raise HesscliError(
            "Hugging Face model directories need the 'hf' extra: pip install 'hesscli[hf]' (it installs transformers)"
        ) from None
    return transformers


def hf_fingerprint(path: Path) -> str:
    """sha256 over the directory's config and weight files (names and contents, sorted)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file() and (p.name == "config.json" or p.suffix == ".safetensors" or p.name.endswith(".index.json")))
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _names(mapping) -> set[str]:
    out: set[str] = set()
    for v in mapping.values():
        out.update(v if isinstance(v, (tuple, list)) else (v,))
    return out


def head_of(class_name: str, config) -> HFInfo:
    """The head of a transformers class (by transformers' own task mappings, else by its name)."""
    from transformers.models.auto import modeling_auto as ma

    heads = (
        ("causal_lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "ForCausalLM"),
        ("masked_lm", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "ForMaskedLM"),
        ("token_classification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "ForTokenClassification"),
        ("sequence_classification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "ForSequenceClassification"),
    )
    head = None
    for name, mapping, suffix in heads:
        if class_name in _names(getattr(ma, mapping, {})) or class_name.endswith(suffix):
            head = name
            break
    return HFInfo(class_name, head, getattr(config, "problem_type", None), int(getattr(config, "num_labels", 0) or 0))


@contextlib.contextmanager
def _quiet_transformers():
    lg = logging.getLogger("transformers")
    saved = lg.level
    lg.setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as tlog

        tsaved = tlog.get_verbosity()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # noqa: BLE001 - an older transformers without these switches
        tlog, tsaved = None, None
    try:
        yield
    finally:
        lg.setLevel(saved)
        if tlog is not None:
            tlog.set_verbosity(tsaved)


def load_hf_directory(path: Path) -> tuple[nn.Module, HFInfo, list[str]]:
    """Load the model of a Hugging Face directory in eval mode, float32, eager attention.

    Raises :class:`HesscliError` naming the directory when the extra is missing, the config asks
    for remote code or names an unknown class, the weights are missing or do not fit."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise HesscliError(f"cannot read '{path / 'config.json'}': {e}") from None
    if not isinstance(config, dict):
        raise HesscliError(f"'{path / 'config.json'}' is not a JSON object")
    if config.get("auto_map"):
        raise HesscliError(
            f"'{path}' asks for remote code (config.json auto_map: {', '.join(sorted(config['auto_map']))}); "
            "hesscli never runs code from a model directory"
        )
    archs = config.get("architectures") or []
    if not archs:
        raise HesscliError(f"'{path / 'config.json'}' names no architectures; hesscli needs architectures[0] to pick the class")
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        other = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = (
            f"; it holds {', '.join(sorted(other))}, pickles that hesscli does not load: re-save with save_pretrained "
            "(safetensors is its default)"
        ) if other else ""
        raise HesscliError(f"Hugging Face directory '{path}' has no weights (model.safetensors or model.safetensors.index.json){hint}")
    transformers = _transformers()
    cls = getattr(transformers, archs[0], None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise HesscliError(
            f"'{path}' names the class '{archs[0]}', which transformers {transformers.__version__} does not have; "
            "hesscli runs no code from a model directory"
        )
    notes = []
    try:
        with _quiet_transformers(), torch.device("cpu"):
            model, info = cls.from_pretrained(
                str(path),
                local_files_only=True,
                trust_remote_code=False,
                attn_implementation="eager",
                dtype=torch.float32,
                output_loading_info=True,
            )
    except HesscliError:
        raise
    except Exception as e:  # transformers' own errors: one line
        from hesscli.io.loading import reason

        raise HesscliError(f"cannot load Hugging Face model '{path}': {reason(e)}") from None
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise HesscliError(
            f"weights in '{path}' do not fit {archs[0]}: missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''} "
            "(they would be random)"
        )
    stored = config.get("torch_dtype") or config.get("dtype")
    if stored in ("bfloat16", "float16"):
        notes.append(f"weights stored in {stored}, computed in float32 (pass --dtype float64 for more)")
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    model.eval()
    return model, head_of(archs[0], model.config), notes


def read_texts(text: Path | None, jsonl: Path | None) -> tuple[list[str], list | None]:
    """Examples from a text file (one per non-empty line) or a JSON Lines file of objects with a
    ``text`` and an optional ``label``. Raises :class:`HesscliError` naming the file and line."""
    if (text is None) == (jsonl is None):
        from hesscli.errors import UsageError

        raise UsageError("give exactly one of --text FILE and --jsonl FILE")
    src = text if text is not None else jsonl
    try:
        lines = Path(src).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise HesscliError(f"cannot read '{src}': {e}") from None
    if text is not None:
        texts = [ln for ln in lines if ln.strip()]
        labels = None
    else:
        texts, labels = [], []
        for i, ln in enumerate(lines, 1):
            if not ln.strip():
                continue
            try:
                obj = json.loads(ln)
            except ValueError as e:
                raise HesscliError(f"'{src}' line {i} is not JSON: {e}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise HesscliError(f"'{src}' line {i}: expected an object with a string 'text'")
            texts.append(obj["text"])
            labels.append(obj.get("label"))
        if all(v is None for v in labels):
            labels = None
        elif any(v is None for v in labels):
            raise HesscliError(f"'{src}': line {1 + labels.index(None)} has no 'label' while others have one")
    if not texts:
        raise HesscliError(f"'{src}' holds no text")
    return texts, labels


def make_batch(model_dir: Path, texts: list[str], labels: list | None = None, max_length: int | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A data shard for the model of ``model_dir`` from raw text, tokenised by the directory's own
    tokenizer: ``input_ids`` (N, L) padded to the longest example (at most ``max_length`` tokens,
    truncated beyond), ``attention_mask`` and what else the tokenizer gives (``token_type_ids``), and
    labels for the head: a causal LM's ``input_ids`` with -100 on padding; a sequence classifier's
    ``labels`` (N,) from ``labels`` (integers: classes; floats: regression). Returns (shard, notes)."""
    if not is_hf_directory(model_dir):
        raise HesscliError(f"'{model_dir}' is not a Hugging Face model directory (no config.json)")
    transformers = _transformers()
    config = json.loads((model_dir / "config.json").read_text())
    archs = config.get("architectures") or [""]
    try:
        with _quiet_transformers():
            cfg = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
            tok = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers' own errors: one line
        from hesscli.io.loading import reason

        raise HesscliError(f"cannot load the tokenizer of '{model_dir}': {reason(e)}") from None
    info = head_of(archs[0], cfg)
    notes = []
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise HesscliError(f"the tokenizer of '{model_dir}' has neither a pad nor an eos token to pad with")
        tok.pad_token = tok.eos_token
        notes.append("the tokenizer has no pad token: padding with its eos token (masked out)")
    enc = tok(texts, padding=True, truncation=max_length is not None, max_length=max_length, return_tensors="pt")
    shard = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    if info.head == "causal_lm":
        lab = shard["input_ids"].clone()
        lab[shard["attention_mask"] == 0] = -100
        shard["labels"] = lab
        if labels is not None:
            notes.append("a causal LM predicts its next tokens: the 'label' entries are not used")
    elif info.head == "sequence_classification":
        if labels is None:
            raise HesscliError("a sequence classifier needs a label per example: pass --jsonl with a 'label' on each line")
        floats = any(isinstance(v, float) for v in labels)
        shard["labels"] = torch.tensor(labels, dtype=torch.float32 if floats else torch.long)
    elif labels is not None:
        raise HesscliError(
            f"hesscli batch makes labels for causal LMs and sequence classifiers; {archs[0]} needs per-token labels: "
            "write the shard yourself (a torch.save dict with input_ids, attention_mask, labels)"
        )
    return shard, notes


def save_shard(shard: dict[str, torch.Tensor], out: Path, force: bool) -> None:
    """``torch.save`` the shard atomically (a temporary file, then a rename)."""
    import os

    from hesscli.io.resultfile import check_output

    p = check_output(out, force)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        torch.save(shard, tmp)
        os.replace(tmp, p)
    except OSError as e:
        raise HesscliError(f"cannot write output '{p}': {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
