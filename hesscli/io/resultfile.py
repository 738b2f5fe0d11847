"""Result files (schema ``hesscli/1``, SPEC.md): build ``meta``, write atomically, read, summarise.

Every array is numeric or unicode, so ``numpy.load(path, allow_pickle=False)`` reads them all.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hesscli.errors import HesscliError

__all__ = [
    "SCHEMA",
    "write_result",
    "read_result",
    "check_output",
    "json_safe",
    "summarize",
    "ResultFile",
    "utc_now",
]

SCHEMA = "hesscli/1"


def utc_now() -> str:
    """The current time, UTC, ISO 8601 with a Z (meta.created)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def json_safe(obj: Any) -> Any:
    """JSON-ready copy: NaN and ±Inf become None, numpy scalars and arrays become Python values."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


def check_output(path: str | os.PathLike, force: bool) -> Path:
    """Refuse early (before any work) an output that exists without ``--force`` or cannot be written."""
    p = Path(path)
    if p.is_dir():
        raise HesscliError(f"output '{p}' is a directory")
    if p.exists() and not force:
        raise HesscliError(f"output '{p}' exists; pass --force to overwrite it, or -o another path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise HesscliError(f"cannot write output '{p}': directory '{parent}' does not exist")
    if not os.access(parent, os.W_OK):
        raise HesscliError(f"cannot write output '{p}': directory '{parent}' is not writable")
    return p


def write_result(path: str | os.PathLike, arrays: Mapping[str, Any], meta: Mapping[str, Any], force: bool) -> Path:
    """Write ``arrays`` plus ``meta`` to ``path`` atomically: a temporary file in the same directory,
    flushed and fsynced, then renamed over the target. On any failure the temporary file is removed
    and an existing file at ``path`` is left as it was."""
    p = check_output(path, force)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    payload = {"meta": np.array(json.dumps(json_safe(dict(meta)), sort_keys=True))}
    for k, v in arrays.items():
        if v is None:
            continue
        a = np.asarray(v)
        if a.dtype.kind == "O":
            raise TypeError(f"result array '{k}' has dtype object")
        payload[k] = a
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        if p.exists() and not force:
            raise HesscliError(f"output '{p}' appeared while hesscli ran; pass --force to overwrite it")
        os.replace(tmp, p)
    except OSError as e:
        raise HesscliError(f"cannot write output '{p}': {e.strerror or e}") from None
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass
    return p


def _reason(e: BaseException) -> str:
    from hesscli.io.loading import reason

    return reason(e)


class ResultFile:
    """A result file opened for reading: ``meta`` as a dict, arrays by key."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise HesscliError(f"result file '{self.path}' does not exist")
        if self.path.is_dir():
            raise HesscliError(f"result file '{self.path}' is a directory")
        try:
            with open(self.path, "rb") as f:
                head = f.read(6)
        except OSError as e:
            raise HesscliError(f"cannot read result file '{self.path}': {e.strerror or e}") from None
        if head == b"\x93NUMPY":
            raise HesscliError(f"'{self.path}' is a single .npy array, not a hesscli result (.npz)")
        if head[:4] != b"PK\x03\x04":
            raise HesscliError(f"result file '{self.path}' is not an .npz archive (a hesscli result)")
        try:
            if not zipfile.is_zipfile(self.path):
                raise HesscliError(
                    f"result file '{self.path}' starts like an .npz archive but cannot be opened as one: "
                    "it is truncated or damaged"
                )
            # our own handle: np.load leaks its file when the zip directory is damaged
            self._f = open(self.path, "rb")
        except HesscliError:
            raise
        except OSError as e:
            raise HesscliError(f"cannot read result file '{self.path}': {e.strerror or e}") from None
        try:
            try:
                self._z = np.load(self._f, allow_pickle=False)
            except Exception as e:  # numpy and zipfile raise many kinds (ValueError, BadZipFile, ...)
                raise HesscliError(f"cannot read result file '{self.path}': {_reason(e)}") from None
            self._read_meta()
        except BaseException:
            self.close()
            raise

    def _read_meta(self) -> None:
        self.keys = list(self._z.files)
        if "meta" not in self.keys:
            raise HesscliError(f"'{self.path}' is not a hesscli result: it has no 'meta' entry")
        try:
            self.meta = json.loads(str(self._z["meta"][()]))
        except Exception as e:  # ValueError, BadZipFile, tokenize.TokenError (a damaged .npy header), ...
            raise HesscliError(f"cannot read result file '{self.path}': {_reason(e)}") from None
        if not isinstance(self.meta, dict):
            raise HesscliError(f"result file '{self.path}': 'meta' is not a JSON object")
        schema = self.meta.get("schema")
        if schema != SCHEMA:
            raise HesscliError(f"result file '{self.path}' has schema {schema!r}; this hesscli reads {SCHEMA!r}")

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self._z[key]
        except KeyError:
            raise HesscliError(f"result file '{self.path}' has no array '{key}'") from None
        except Exception as e:
            raise HesscliError(f"cannot read '{key}' from result file '{self.path}': {_reason(e)}") from None

    def get(self, key: str, default=None):
        """The array key, or default when the file does not hold it."""
        return self[key] if key in self.keys else default

    @property
    def block_names(self) -> list[str]:
        """The block names (B,) as str."""
        return [str(s) for s in self["block_names"]]

    def close(self) -> None:
        """Close the underlying file."""
        z = getattr(self, "_z", None)
        if z is not None and hasattr(z, "close"):
            z.close()
        f = getattr(self, "_f", None)
        if f is not None:
            f.close()

    def __enter__(self) -> ResultFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # callers that never close() must not leak the file (ResourceWarning)
        try:
            self.close()
        except Exception:
            pass


def read_result(path: str | os.PathLike) -> ResultFile:
    """Open a result file (lazy: arrays are read on access); HesscliError naming the file when it is not one."""
    return ResultFile(path)


def _f(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def summarize(rf: ResultFile | Mapping[str, Any], meta: Mapping[str, Any] | None = None, out: str | None = None) -> dict:
    """The summary that ``--json`` prints and the tables show, from a result's arrays and meta."""
    get = rf.get if hasattr(rf, "get") else (lambda k, d=None: rf[k] if k in rf else d)
    meta = dict(meta if meta is not None else rf.meta)
    tau = float(meta.get("negative_threshold") or 0.0)
    names = [str(s) for s in get("block_names", np.array([], dtype=str))]
    offsets = get("block_offsets")
    pnames = [str(s) for s in get("param_names", np.array([], dtype=str))]
    poffs = get("param_offsets")
    params = meta.get("params", [])
    shapes = {p["name"]: p["shape"] for p in params}
    blocks = []
    full = meta.get("mode") == "full"
    for i, name in enumerate(names):
        prefix = "" if full else f"blocks/{name}/"
        ev = get(prefix + "eigenvalues")
        tr = get(prefix + "trace")
        lo, hi = (int(offsets[i]), int(offsets[i + 1])) if offsets is not None else (0, 0)
        members = [n for j, n in enumerate(pnames) if poffs is not None and lo <= int(poffs[j]) < hi]
        b = {
            "name": name,
            "params": members,
            "shapes": [shapes.get(n) for n in members],
            "size": hi - lo,
            "trace": _f(tr) if tr is not None else None,
        }
        if ev is not None and len(ev):
            b.update(lambda_max=_f(ev[-1]), lambda_min=_f(ev[0]), n_negative=int((ev < -tau).sum()))
        blocks.append(b)
    lmax = [b["lambda_max"] for b in blocks if b.get("lambda_max") is not None]
    lmin = [b["lambda_min"] for b in blocks if b.get("lambda_min") is not None]
    summary = {
        "status": meta.get("status", "ok"),
        "command": meta.get("command"),
        "out": out if out is not None else (str(rf.path) if hasattr(rf, "path") else None),
        "mode": meta.get("mode"),
        "approximation": meta.get("approximation") or ("block-diagonal" if meta.get("mode") == "block" else None),
        "n_params": int(sum(int(np.prod(p["shape"])) for p in params)) if params else None,
        "n_samples": meta.get("n_samples"),
        "n_loss_terms": meta.get("n_loss_terms"),
        "loss": meta.get("loss"),
        "reduction": meta.get("reduction"),
        "dtype": meta.get("dtype"),
        "device": meta.get("device"),
        "trace": _f(get("trace")) if get("trace") is not None else None,
        "lambda_max": max(lmax) if lmax else None,
        "lambda_min": min(lmin) if lmin else None,
        "n_negative": int(sum(b.get("n_negative", 0) for b in blocks)),
        "negative_threshold": tau,
        "asymmetry": meta.get("asymmetry"),
        "hvps": meta.get("hvps"),
        "seconds": meta.get("seconds"),
        "blocks": blocks,
    }
    return json_safe(summary)


CURRENT_ARGV: list[str] | None = None  # set by hesscli.cli.main for the command being run


def command_line() -> str:
    """The command line being run, as a shell would take it (``meta.command_line``)."""
    import shlex

    args = CURRENT_ARGV if CURRENT_ARGV is not None else sys.argv[1:]
    return shlex.join(["hesscli", *map(str, args)])
