"""Model files: detect the format by content and load a module that ``torch.func`` can use.

Four kinds (SPEC.md, Model files): a TorchScript archive, a torch.export archive, safetensors
weights plus an architecture, or a ``torch.save`` state_dict (``weights_only=True``) plus an
architecture. ``functional_call`` refuses TorchScript modules, so a TorchScript archive is converted
to an ``ExportedProgram`` (``TS2EPConverter``), whose ``.module()`` behaves like the eager model and
whose ATen calls :mod:`hesscli.safeops` can intercept.

Trust: safetensors and state_dicts never run code; ``--arch`` names code the user chose; the
``hesscli.arch`` metadata of a safetensors file is honoured only with ``--trust-code``.
TorchScript and torch.export archives are programs, loaded as PyTorch loads them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import struct
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import HesscliError, UsageError

__all__ = ["LoadedModel", "detect_format", "load_model", "resolve_arch", "file_sha256", "quiet_torch"]

FORMATS = ("torchscript", "export", "safetensors", "state_dict")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def quiet_torch():
    """Silence torch's deprecation warnings (TorchScript) and its loggers' tracebacks."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.export", "torch._export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


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


def zip_kind(path: Path) -> str | None:
    """'torchscript', 'export', 'torch_save', 'npz' or None for a zip archive's contents."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    if any("/code/" in n for n in names) and any(n.endswith("/constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("/archive_format") or "/models/" in n for n in names):
        return "export"
    if any(n.endswith("data.pkl") for n in names):
        return "torch_save"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    return "zip"


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
    with open(p, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":  # legacy (non-zip) torch.save / pickle
        return "state_dict"
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
            raise HesscliError(f"--arch file '{path}' failed to import: {type(e).__name__}: {e}") from None
        origin = str(path)
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise HesscliError(f"--arch module '{where}' cannot be imported: {type(e).__name__}: {e}") from None
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


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists missing, extra and misshaped keys."""
    expected = model.state_dict()
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
        raise HesscliError(f"weights in '{source}' do not fit the architecture: " + "; ".join(problems))
    with torch.no_grad():
        model.load_state_dict({k: state[k] for k in expected}, strict=True)


def _tensor_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            sub = obj.get(key)
            if isinstance(sub, dict) and sub and all(isinstance(v, torch.Tensor) for v in sub.values()):
                return dict(sub)
    raise HesscliError(f"'{source}' does not hold a state_dict (a dict of tensors)")


def torch_load_safe(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` with errors named after the file (never runs code)."""
    try:
        with quiet_torch():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        if "Weights only load failed" in msg or "weights_only" in msg:
            raise HesscliError(
                f"{what} file '{path}' holds objects that only a full unpickle could load; "
                "hesscli loads with weights_only=True and refuses it (it could run code)"
            ) from None
        raise HesscliError(f"cannot read {what} file '{path}': {type(e).__name__}: {msg}") from None


def load_safetensors_file(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise HesscliError(f"cannot read {what} file '{path}' as safetensors: {type(e).__name__}: {e}") from None
    return tensors, dict(meta)


# --------------------------------------------------------------------------------------------
# The loaded model


@dataclass
class LoadedModel:
    """A model ready for ``functional_call``, with where it came from."""

    path: str
    format: str
    sha256: str
    module: nn.Module | None = None  # usable with functional_call (after :meth:`materialize`)
    script: Any = None  # the TorchScript module, before conversion
    arch: str | None = None
    notes: list[str] = field(default_factory=list)

    def named_parameters(self):
        src = self.module if self.module is not None else self.script
        return list(src.named_parameters())

    def materialize(self, example_inputs: Any) -> nn.Module:
        """Convert a TorchScript module with an example batch; a no-op for the other formats."""
        if self.module is not None:
            return self.module
        from torch._export.converter import TS2EPConverter

        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        try:
            with quiet_torch():
                ep = TS2EPConverter(self.script, args).convert()
                module = ep.module()
        except Exception as e:
            raise HesscliError(
                f"TorchScript model '{self.path}' could not be converted for torch.func "
                f"({type(e).__name__}: {e}); save it with torch.export, or as safetensors with --arch"
            ) from None
        _buffers_to_parameters(module, [n for n, _ in self.script.named_parameters()])
        self.module = module
        self.notes.append("TorchScript converted to an ExportedProgram for torch.func")
        return module


def _buffers_to_parameters(module: nn.Module, names: list[str]) -> None:
    """TS2EPConverter lifts a TorchScript module's weights as buffers: make them parameters again,
    in the TorchScript module's order."""
    have = dict(module.named_parameters())
    moved = {}
    for name in names:
        if name in have:
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        if attr not in owner._buffers:
            raise HesscliError(f"TorchScript conversion lost parameter '{name}'")
        t = owner._buffers.pop(attr)
        owner.register_parameter(attr, nn.Parameter(t.detach().clone(), requires_grad=True))
        moved[name] = True
    module._hesscli_param_order = list(names)  # named_parameters() order of the archive


def load_model(
    path: str | os.PathLike,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    trust_code: bool = False,
) -> LoadedModel:
    """Load a model file of any supported format (:func:`detect_format`), in eval mode, on the CPU."""
    p = Path(path)
    fmt = detect_format(p)
    sha = file_sha256(p)
    lm = LoadedModel(path=str(p), format=fmt, sha256=sha)
    if fmt == "torchscript":
        try:
            with quiet_torch():
                script = torch.jit.load(str(p), map_location="cpu")
        except Exception as e:
            raise HesscliError(f"cannot load TorchScript model '{p}': {type(e).__name__}: {e}") from None
        script.eval()
        lm.script = script
        return lm
    if fmt == "export":
        try:
            with quiet_torch():
                ep = torch.export.load(str(p))
                module = ep.module()
        except Exception as e:
            raise HesscliError(f"cannot load torch.export model '{p}': {type(e).__name__}: {e}") from None
        lm.module = module
        return lm
    if fmt == "safetensors":
        state, meta = load_safetensors_file(p, "model")
        if arch is None:
            meta_arch = meta.get("hesscli.arch")
            if meta_arch and not trust_code:
                raise UsageError(
                    f"'{p}' names its architecture '{meta_arch}' in its metadata; metadata does not "
                    f"choose code to run: pass --arch {meta_arch} (relative to {p.parent or '.'}) "
                    "or --trust-code"
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
        load_weights_into(model, state, str(p))
    else:  # state_dict
        if arch is None:
            raise UsageError(f"'{p}' is a torch.save state_dict: pass --arch path/to/file.py:NAME")
        state = _tensor_dict(torch_load_safe(p, "model"), str(p))
        model = build_arch(arch, arch_kwargs or {}, None)
        load_weights_into(model, state, str(p))
    model.eval()
    lm.module = model
    lm.arch = arch
    return lm
