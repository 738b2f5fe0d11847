"""Model files: detect the format by content and load the module the file holds.

Four kinds (SPEC.md, Model files): a TorchScript archive, a torch.export archive, safetensors
weights plus an architecture, or a ``torch.save`` state_dict (``weights_only=True``) plus an
architecture. Every kind is loaded as what it is — a ScriptModule, an exported program's module,
an eager module — and differentiated through its own parameter tensors (NOTES.md): no conversion,
no parameter substitution, so tied weights and the weight lists of scripted RNNs are seen as they
are. Loading fixes what files commonly get wrong: ``module.``/``_orig_mod.`` key prefixes, tied
tensors stored once, a tie that ``ExportedProgram.module()`` splits into two Parameter objects.

Trust: safetensors and state_dicts never run code; ``--arch`` names code the user chose; the
``hesscli.arch`` metadata of a safetensors file is honoured only with ``--trust-code``.
TorchScript and torch.export archives are programs, loaded as PyTorch loads them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import struct
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hesscli.errors import HesscliError, UsageError, clean_message
from hesscli.objective.ties import storage_key, tie_groups

__all__ = ["LoadedModel", "detect_format", "load_model", "resolve_arch", "file_sha256", "quiet_torch"]

FORMATS = ("torchscript", "export", "safetensors", "state_dict")


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file (hex), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class TorchLog(logging.Handler):
    """Collects what torch's loggers say while :func:`quiet_torch` is active."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def first_exception(self) -> BaseException | None:
        """The exception torch logged with its traceback and then replaced by a vaguer one
        (``torch.export.load`` says "check the warnings above")."""
        for r in self.records:
            if r.exc_info and r.exc_info[1] is not None:
                return r.exc_info[1]
        return None


@contextlib.contextmanager
def quiet_torch():
    """Silence torch's deprecation warnings (TorchScript) and its loggers' tracebacks; yields a
    :class:`TorchLog` with what the loggers said, so that errors can quote the real cause."""
    log = TorchLog()
    saved = []
    for name in ("torch", "torch.export", "torch._export", "torch._dynamo"):
        lg = logging.getLogger(name)
        saved.append((lg, lg.level, lg.propagate, list(lg.handlers)))
        lg.handlers = [log]
        lg.propagate = False
        if lg.level == logging.NOTSET or lg.level > logging.WARNING:
            lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield log
    finally:
        for lg, level, propagate, handlers in saved:
            lg.handlers = handlers
            lg.propagate = propagate
            lg.setLevel(level)


def _check_readable(path: Path, what: str) -> None:
    if not path.exists():
        raise HesscliError(f"{what} file '{path}' does not exist")
    if path.is_dir():
        raise HesscliError(f"{what} file '{path}' is a directory, not a file")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as e:
        raise HesscliError(f"cannot read {what} file '{path}': {e.strerror or e}") from None
    if size == 0:
        raise HesscliError(f"{what} file '{path}' is empty")


def is_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        if len(head) < 9:
            return False
        (n,) = struct.unpack("<Q", head[:8])
        return 2 <= n <= path.stat().st_size - 8 and head[8:9] == b"{"
    except OSError:
        return False


ZIP_MAGIC = b"PK\x03\x04"
# the legacy (non-zip) torch.save format starts with a pickled magic number
LEGACY_TORCH_SAVE = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def zip_kind(path: Path) -> str | None:
    """What a zip archive holds: 'torchscript', 'export', 'torch_save', 'npz' or 'zip' (something
    else); 'damaged' for a file that starts like a zip archive but cannot be read as one, or whose
    directory describes an archive that does not start at byte 0 (a truncated .pt2 ends with the
    directory of the small torch.save archive stored inside it); None for anything else."""
    with open(path, "rb") as f:
        starts_like_zip = f.read(4) == ZIP_MAGIC
    try:
        if not zipfile.is_zipfile(path):
            return "damaged" if starts_like_zip else None
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except Exception:  # zipfile raises BadZipFile, NotImplementedError, ValueError, OSError, ...
        return "damaged" if starts_like_zip else None
    if not starts_like_zip or not infos or min(i.header_offset for i in infos) != 0:
        return "damaged" if starts_like_zip else None
    names = [i.filename for i in infos]
    if any("/code/" in n for n in names) and any(n.endswith("/constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("/archive_format") or "/models/" in n for n in names):
        return "export"
    if any(n.endswith("data.pkl") for n in names):
        return "torch_save"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    return "zip"


def damaged_zip_message(path: Path, what: str) -> str:
    """A file that starts like a zip archive (TorchScript, torch.export, torch.save and .npz all
    are) but whose directory cannot be read: usually a copy or download that stopped early."""
    return (
        f"{what} file '{path}' starts like a zip archive (the container of TorchScript, torch.export, "
        "torch.save and .npz files) but cannot be opened as one: it is truncated or damaged"
    )


def reason(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` of a library's exception, on one line: the first line of the message only
    (torch appends C++ stack traces), ANSI codes removed, at most ``limit`` characters."""
    text = str(e).strip()
    lines = text.splitlines()
    if lines and "TorchScript interpreter" in lines[0]:  # the cause is the traceback's last "...Error: ..." line
        causes = [s.strip() for s in lines if s.strip() and s.strip().split(":")[0].endswith("Error")]
        if causes:
            kind, _, msg = causes[-1].partition(":")
            first = clean_message(msg)
            return f"{kind}: {first[: limit - 3] + '...' if len(first) > limit else first}"
    first = clean_message(lines[0] if text else "")
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def detect_format(path: str | os.PathLike) -> str:
    """The model format of a file, by content: one of :data:`FORMATS`."""
    p = Path(path)
    _check_readable(p, "model")
    if is_safetensors(p):
        return "safetensors"
    kind = zip_kind(p)
    if kind == "torchscript":
        return "torchscript"
    if kind == "export":
        return "export"
    if kind == "torch_save":
        return "state_dict"
    if kind == "npz":
        raise HesscliError(f"model file '{p}' is a NumPy .npz archive, not a model (is it a data shard?)")
    if kind == "damaged":
        raise HesscliError(damaged_zip_message(p, "model"))
    if kind == "zip":
        raise HesscliError(
            f"model file '{p}' is a zip archive, but not one written by torch.jit.save, torch.export.save or torch.save"
        )
    with open(p, "rb") as f:
        head = f.read(len(LEGACY_TORCH_SAVE))
    if head == LEGACY_TORCH_SAVE:  # torch.save(..., _use_new_zipfile_serialization=False)
        return "state_dict"
    if head[:1] == b"\x80":
        raise HesscliError(
            f"model file '{p}' is a Python pickle, but not one written by torch.save (or it is damaged); "
            "hesscli does not unpickle arbitrary files"
        )
    raise HesscliError(
        f"model file '{p}' is not a format hesscli knows (TorchScript, torch.export .pt2, "
        "safetensors, or a torch.save state_dict)"
    )


# --------------------------------------------------------------------------------------------
# Architectures


def resolve_arch(spec: str, base_dir: Path | None = None):
    """The callable named by ``file.py:NAME`` or ``package.module:NAME``."""
    if ":" not in spec:
        raise UsageError(f"--arch '{spec}' must be 'path/to/file.py:NAME' or 'package.module:NAME'")
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise UsageError(f"--arch '{spec}' must be 'path/to/file.py:NAME' or 'package.module:NAME'")
    if where.endswith(".py") or os.sep in where or "/" in where:
        path = Path(where)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise HesscliError(f"--arch file '{path}' does not exist")
        modname = f"hesscli_arch_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
        spec_obj = importlib.util.spec_from_file_location(modname, path)
        if spec_obj is None or spec_obj.loader is None:
            raise HesscliError(f"--arch file '{path}' cannot be imported")
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[modname] = module
        try:
            spec_obj.loader.exec_module(module)
        except Exception as e:  # the user's code
            sys.modules.pop(modname, None)
            raise HesscliError(f"--arch file '{path}' failed to import: {reason(e)}") from None
        origin = str(path)
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise HesscliError(f"--arch module '{where}' cannot be imported: {reason(e)}") from None
        origin = where
    obj = getattr(module, name, None)
    if obj is None or not callable(obj):
        avail = sorted(
            k for k, v in vars(module).items() if not k.startswith("_") and isinstance(v, type) and issubclass(v, nn.Module)
        )
        hint = f" (nn.Module classes there: {', '.join(avail)})" if avail else ""
        raise HesscliError(f"--arch '{origin}' has no callable named '{name}'{hint}")
    return obj


def build_arch(spec: str, kwargs: dict, base_dir: Path | None = None) -> nn.Module:
    factory = resolve_arch(spec, base_dir)
    try:
        model = factory(**kwargs)
    except Exception as e:
        raise HesscliError(f"--arch '{spec}' raised {type(e).__name__} when called with {kwargs}: {e}") from None
    if not isinstance(model, nn.Module):
        raise HesscliError(f"--arch '{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def parse_arch_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        val = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--arch-kwargs is not valid JSON: {e.msg} at position {e.pos}") from None
    if not isinstance(val, dict):
        raise UsageError("--arch-kwargs must be a JSON object, e.g. '{\"hidden\": 32}'")
    return val


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, stripped: str | None = None) -> list[str]:
    """``load_state_dict(strict=True)`` with an error that lists missing, extra and misshaped keys.

    A key missing from ``state`` whose parameter is tied in ``model`` to one that is present is
    filled from it (``safetensors.torch.save_model`` stores a tied tensor once). Returns notes."""
    expected = model.state_dict()
    notes = []
    ties = tie_groups(model)
    filled = {}
    for k in expected:
        if k not in state:
            present = [n for n in ties.get(k, ()) if n in state]
            if present:
                filled[k] = present[0]
    if filled:
        state = dict(state)
        for k, src in filled.items():
            state[k] = state[src]
        notes.append("tied weights stored once: " + ", ".join(f"{k} = {src}" for k, src in filled.items()))
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    bad = [
        f"{k} (expected {tuple(expected[k].shape)}, found {tuple(state[k].shape)})"
        for k in expected
        if k in state and tuple(expected[k].shape) != tuple(state[k].shape)
    ]
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    if extra:
        problems.append("unexpected keys: " + ", ".join(extra[:8]) + (" ..." if len(extra) > 8 else ""))
    if bad:
        problems.append("wrong shapes: " + ", ".join(bad[:8]) + (" ..." if len(bad) > 8 else ""))
    if problems:
        pre = stripped or _common_prefix(state)
        hint = f" (every key in the file starts with '{pre}'; without it they still do not fit)" if pre else ""
        raise HesscliError(f"weights in '{source}' do not fit the architecture: " + "; ".join(problems) + hint)
    with torch.no_grad():
        model.load_state_dict({k: state[k] for k in expected}, strict=True)
    return notes


def _common_prefix(state: dict) -> str | None:
    keys = list(state)
    if not keys or "." not in keys[0]:
        return None
    pre = keys[0].split(".")[0] + "."
    return pre if all(k.startswith(pre) for k in keys) and pre in ("module.", "_orig_mod.", "model.") else None


def _tensor_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            sub = obj.get(key)
            if isinstance(sub, dict) and sub and all(isinstance(v, torch.Tensor) for v in sub.values()):
                return dict(sub)
    raise HesscliError(f"'{source}' does not hold a state_dict (a dict of tensors)")


# globals a weights-only load may build besides tensors: a Lightning ``.ckpt`` keeps its
# hyper-parameters in an argparse.Namespace; nothing here runs code when it is rebuilt
_HARMLESS_GLOBALS = (argparse.Namespace,)


def torch_load_safe(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` with errors named after the file (never runs code)."""
    try:
        with quiet_torch(), torch.serialization.safe_globals(list(_HARMLESS_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        if "Weights only load failed" in msg or "weights_only" in msg:
            m = re.search(r"GLOBAL ([\w.]+)", msg)
            which = f" (the global {m.group(1)})" if m else ""
            raise HesscliError(
                f"{what} file '{path}' holds objects that only a full unpickle could load{which}; "
                "hesscli loads with weights_only=True and refuses it (it could run code)"
            ) from None
        raise HesscliError(f"cannot read {what} file '{path}': {reason(e)}") from None


def load_safetensors_file(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        problem = safetensors_header_problem(path) or reason(e)
        raise HesscliError(f"cannot read {what} file '{path}' as safetensors: {problem}") from None
    return tensors, dict(meta)


_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2}
_ST_ITEMSIZE.update({"BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8})


def safetensors_header_problem(path: Path) -> str | None:
    """The first thing wrong with a safetensors file's header, naming the tensor, or None.

    Layout: an 8-byte little-endian header length n, n bytes of JSON ``{name: {dtype, shape,
    data_offsets: [begin, end]}, "__metadata__": {...}}``, then the data; offsets count from the
    start of the data, and end - begin must be the tensor's size in bytes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                return f"the header claims {n} bytes but the file has {size - 8} after the length (truncated?)"
            raw = f.read(n)
        header = json.loads(raw)
    except (OSError, struct.error, UnicodeDecodeError, ValueError) as e:
        return f"the header is not valid JSON ({reason(e)}): damaged"
    if not isinstance(header, dict):
        return "the header is not a JSON object: damaged"
    data_len = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            numel = 1
            for d in shape:
                numel *= int(d)
        except (TypeError, KeyError, ValueError):
            return f"tensor '{name}' has a malformed entry in the header: {str(entry)[:120]}"
        if dtype not in _ST_ITEMSIZE:
            return f"tensor '{name}' has an unknown dtype {dtype!r}"
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            return f"tensor '{name}' has invalid data_offsets [{begin}, {end}]"
        if end > data_len:
            return (
                f"tensor '{name}': data_offsets [{begin}, {end}] end past the {data_len} bytes of data "
                "(truncated or damaged)"
            )
        need = numel * _ST_ITEMSIZE[dtype]
        if end - begin != need:
            return (
                f"tensor '{name}' of shape {tuple(shape)} and dtype {dtype} needs {need} bytes, "
                f"but its data_offsets [{begin}, {end}] hold {end - begin}"
            )
    return None


# --------------------------------------------------------------------------------------------
# The loaded model


@dataclass
class LoadedModel:
    """A loaded model (eval mode, CPU) with where it came from.

    ``module`` is what the file holds — an eager ``nn.Module``, a TorchScript ``ScriptModule`` or
    the module of a torch.export program — and its own parameter tensors are what hesscli
    differentiates (:class:`hesscli.objective.core.Objective`); nothing is converted or substituted.
    ``static_batch`` is the batch size a torch.export archive was exported for when it accepts
    that size only (None: any)."""

    path: str
    format: str
    sha256: str
    module: nn.Module | None = None
    arch: str | None = None
    notes: list[str] = field(default_factory=list)
    static_batch: int | None = None
    hf: Any = None  # hesscli.io.hf.HFInfo for a Hugging Face directory

    def named_parameters(self):
        """The module's (name, parameter) pairs, in its own order."""
        return list(self.module.named_parameters())

    def forward_arguments(self) -> set[str] | None:
        """The argument names of the model's ``forward`` (keyword inputs), None where unknown."""
        import inspect

        if isinstance(self.module, torch.jit.ScriptModule):
            return None
        try:
            params = inspect.signature(self.module.forward).parameters
        except (TypeError, ValueError):
            return None
        return {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _static_batch(ep) -> int | None:
    """The fixed size of the first dimension of an exported program's first user input, or None
    when it is dynamic (or there is no tensor input)."""
    user = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            val = node.meta.get("val")
            shape = getattr(val, "shape", None)
            if shape is not None and len(shape) and isinstance(shape[0], int):
                return int(shape[0])
            return None
    return None


def _retie(module: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Make parameters that share one storage in ``state`` one Parameter object in ``module``
    (``ExportedProgram.module()`` gives a tied weight two Parameter objects over one storage, so
    autograd would see two leaves). Returns the aliases re-tied."""
    first: dict[tuple, str] = {}
    tied = []
    params = dict(module.named_parameters(remove_duplicate=False))
    for name, t in state.items():
        if name not in params:
            continue
        key = storage_key(t)
        if key not in first:
            first[key] = name
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        owner._parameters[attr] = params[first[key]]
        tied.append(name)
    return tied


_PREFIXES = ("module.", "_orig_mod.")


def _strip_prefixes(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None]:
    """Keys saved from ``nn.DataParallel``/DDP (``module.``) or ``torch.compile`` (``_orig_mod.``),
    without the prefix when every key carries it and the model expects none of them."""
    expected = set(model.state_dict())
    stripped, found = dict(state), None
    changed = True
    while changed:
        changed = False
        for pre in _PREFIXES:
            if stripped and all(k.startswith(pre) for k in stripped) and not any(k.startswith(pre) for k in expected):
                stripped = {k[len(pre):]: v for k, v in stripped.items()}
                found = (found or "") + pre
                changed = True
    return stripped, found


def _sparse_embeddings_dense(model: nn.Module) -> list[str]:
    """``nn.Embedding(sparse=True)`` modules of an eager model, switched to dense gradients (the
    same function; a sparse gradient cannot be differentiated again)."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and (getattr(m, "sparse", False) or getattr(m, "scale_grad_by_freq", False)):
            m.sparse = False
            m.scale_grad_by_freq = False
            names.append(name)
    return names


def _arch_hint(meta_arch: str, path: Path, meta: dict) -> str:
    """The ``--arch`` (and ``--arch-kwargs``) that a file's metadata asks for, ready to paste: a file
    path in the metadata is relative to the weights' directory, so it is given from here."""
    import shlex

    where, _, name = meta_arch.rpartition(":")
    if where.endswith(".py") and not Path(where).is_absolute():
        where = os.path.normpath(path.parent / where)
        meta_arch = f"{where}:{name}"
    hint = shlex.quote(meta_arch)
    kwargs = meta.get("hesscli.arch_kwargs")
    if kwargs and kwargs.strip() not in ("{}", ""):
        hint += f" --arch-kwargs {shlex.quote(kwargs)}"
    return hint


def load_model(
    path: str | os.PathLike,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    trust_code: bool = False,
) -> LoadedModel:
    """Load a model file of any supported format (:func:`detect_format`), in eval mode, on the CPU.

    Raises :class:`HesscliError` (unreadable or mismatched file) or :class:`UsageError` (a weights
    file without ``--arch``), naming the file."""
    p = Path(path)
    from hesscli.io.hf import hf_fingerprint, is_hf_directory, load_hf_directory

    if is_hf_directory(p):
        module, info, notes = load_hf_directory(p)
        return LoadedModel(path=str(p), format="huggingface", sha256=hf_fingerprint(p), module=module,
                           arch=info.class_name, notes=notes, hf=info)
    fmt = detect_format(p)
    sha = file_sha256(p)
    lm = LoadedModel(path=str(p), format=fmt, sha256=sha)
    if fmt == "torchscript":
        try:
            with quiet_torch():
                module = torch.jit.load(str(p), map_location="cpu")
        except Exception as e:
            raise HesscliError(f"cannot load TorchScript model '{p}': {reason(e)}") from None
        module.eval()
        lm.module = module
        return lm
    if fmt == "export":
        try:
            with quiet_torch() as log:
                ep = torch.export.load(str(p))
                module = ep.module()
        except Exception as e:
            cause = log.first_exception() or e
            raise HesscliError(f"cannot load torch.export model '{p}': {reason(cause)}") from None
        tied = _retie(module, dict(ep.state_dict))
        if tied:
            lm.notes.append(f"tied weights restored from the archive: {', '.join(tied)}")
        lm.static_batch = _static_batch(ep)
        lm.module = module
        return lm
    if fmt == "safetensors":
        state, meta = load_safetensors_file(p, "model")
        if arch is None:
            meta_arch = meta.get("hesscli.arch")
            if meta_arch and not trust_code:
                raise UsageError(
                    f"'{p}' names its architecture '{meta_arch}' in its metadata, and metadata does not "
                    f"choose code to run: pass --arch {_arch_hint(meta_arch, p, meta)} "
                    "(after checking that code), or --trust-code"
                )
            if not meta_arch:
                raise UsageError(f"'{p}' holds weights only: pass --arch path/to/file.py:NAME")
            arch = meta_arch
            if arch_kwargs is None:
                arch_kwargs = parse_arch_kwargs(meta.get("hesscli.arch_kwargs"))
            base = p.parent
        else:
            base = None
        model = build_arch(arch, arch_kwargs or {}, base)
    else:  # state_dict
        if arch is None:
            raise UsageError(f"'{p}' is a torch.save state_dict: pass --arch path/to/file.py:NAME")
        state = _tensor_dict(torch_load_safe(p, "model"), str(p))
        model = build_arch(arch, arch_kwargs or {}, None)
    state, prefix = _strip_prefixes(model, state)
    if prefix:
        lm.notes.append(f"every key in '{p.name}' starts with '{prefix}' (saved from DataParallel/DDP or torch.compile); loaded without it")
    lm.notes.extend(load_weights_into(model, state, str(p), prefix))
    sparse = _sparse_embeddings_dense(model)
    if sparse:
        lm.notes.append(f"embeddings with sparse or frequency-scaled gradients computed with plain dense ones (same function): {', '.join(sparse)}")
    model.eval()
    lm.module = model
    lm.arch = arch
    return lm
