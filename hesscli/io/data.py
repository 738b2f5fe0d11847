"""Data shards: ``.pt`` (``weights_only=True``), ``.safetensors`` and ``.npz`` (``allow_pickle=False``).

Several shards count as one data set; :meth:`Dataset.pieces` walks it in micro-batches of at most
``batch_size`` samples, one shard in memory at a time (SPEC.md, Data shards).

Shards are read lazily: :func:`load_dataset` opens each once to check it (keys, lengths, NaN) and
describe it, and keeps its tensors only while the shards kept so far fit :data:`CACHE_BYTES`; the
others are read again, one at a time, on each pass. Peak data memory is then about the cache budget
plus one shard, whatever the number of shards. The first shards that fit stay (no eviction): a
pass over the shards in order would make a least-recently-used cache miss every time.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from hesscli.errors import HesscliError, UsageError
from hesscli.io.loading import (
    _check_readable,
    damaged_zip_message,
    file_sha256,
    is_safetensors,
    load_safetensors_file,
    reason,
    torch_load_safe,
    zip_kind,
)

__all__ = ["Shard", "Dataset", "ShardCache", "load_dataset", "take", "KEY_PAIRS", "CACHE_BYTES"]

KEY_PAIRS = (("inputs", "targets"), ("x", "y"), ("input", "target"), ("input_ids", "labels"))

CACHE_BYTES = 256 << 20
"""Bytes of shard tensors kept in memory between passes (read when a shard is loaded, so a test or
a memory plan may lower it)."""


def _nbytes(x, y: torch.Tensor) -> int:
    xs = x.values() if isinstance(x, dict) else [x]
    return sum(t.numel() * t.element_size() for t in [*xs, y])


class ShardCache:
    """The shards kept in memory between passes: those read first while their total fits
    :data:`CACHE_BYTES` (or ``budget``), and every in-memory shard (:meth:`Dataset.from_tensors`),
    which is the caller's data and costs nothing more. Shared by a data set and its
    :meth:`Dataset.split` parts."""

    def __init__(self, budget: int | None = None):
        self.budget = budget
        self.entries: dict[str, tuple] = {}
        self.pinned: set[str] = set()
        self.nbytes = 0

    def get(self, path: str):
        """The cached (inputs, targets) of a shard, or None."""
        return self.entries.get(path)

    def offer(self, path: str, value: tuple) -> bool:
        """Keep ``value`` if it fits the budget; True when the shard is (now) cached."""
        if path in self.entries:
            return True
        size = _nbytes(*value)
        budget = CACHE_BYTES if self.budget is None else self.budget
        if self.nbytes + size > budget:
            return False
        self.entries[path] = value
        self.nbytes += size
        return True

    def pin(self, path: str, value: tuple) -> None:
        """Keep ``value`` whatever its size (in-memory data: it cannot be read again)."""
        self.entries[path] = value
        self.pinned.add(path)

    def clear(self) -> None:
        """Drop every shard that can be read again (in-memory shards stay)."""
        self.entries = {k: v for k, v in self.entries.items() if k in self.pinned}
        self.nbytes = 0


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {}
            for k in z.files:
                arr = z[k]
                if arr.dtype.kind not in "biuf":
                    raise HesscliError(f"data file '{path}': array '{k}' has dtype {arr.dtype}, not numeric")
                out[k] = torch.from_numpy(np.ascontiguousarray(arr))
            return out
    except HesscliError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise HesscliError(
                f"data file '{path}' holds object arrays, which need a pickle; hesscli loads "
                ".npz with allow_pickle=False and refuses it"
            ) from None
        raise HesscliError(f"cannot read data file '{path}' as .npz: {e}") from None
    except Exception as e:
        raise HesscliError(f"cannot read data file '{path}' as .npz: {reason(e)}") from None


def _head(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def read_tensors(path: Path) -> dict[str, torch.Tensor] | tuple[torch.Tensor, torch.Tensor]:
    """The raw content of a data file, by content: a dict of tensors or an (inputs, targets) pair."""
    _check_readable(path, "data")
    if is_safetensors(path):
        tensors, _ = load_safetensors_file(path, "data")
        return tensors
    kind = zip_kind(path)
    if kind == "npz":
        return _read_npz(path)
    if kind in ("torchscript", "export"):
        raise HesscliError(f"data file '{path}' is a model archive, not a data shard")
    if kind == "damaged":
        raise HesscliError(damaged_zip_message(path, "data"))
    if kind == "torch_save" or (kind is None and _head(path, 1) == b"\x80"):
        obj = torch_load_safe(path, "data")
        if isinstance(obj, dict):
            bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
            if bad:
                raise HesscliError(f"data file '{path}': entries {', '.join(bad[:5])} are not tensors")
            return {str(k): v for k, v in obj.items()}
        if isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj):
            return (obj[0], obj[1])
        raise HesscliError(
            f"data file '{path}' holds a {type(obj).__name__}; expected a dict of tensors or a pair (inputs, targets)"
        )
    if kind == "zip":
        raise HesscliError(f"data file '{path}' is a zip archive, but neither a .npz nor a torch.save file")
    raise HesscliError(f"data file '{path}' is not a format hesscli knows (.pt from torch.save, .safetensors, .npz)")


def derived_labels(content: dict) -> torch.Tensor:
    """Labels of a causal-LM shard that has none: ``input_ids`` with the positions the attention
    mask hides set to -100 (SPEC.md, Data shards)."""
    labels = content["input_ids"].clone()
    mask = content.get("attention_mask")
    if mask is not None:
        labels[mask == 0] = -100
    return labels


def pick_keys(
    content: dict | tuple, path: Path, input_key: str | None, target_key: str | None, derive_labels: bool = False
) -> tuple[torch.Tensor, torch.Tensor, str, str]:
    if derive_labels and isinstance(content, dict) and "input_ids" in content and "labels" not in content and not (input_key or target_key):
        return content["input_ids"], derived_labels(content), "input_ids", "labels"
    if isinstance(content, tuple):
        if input_key or target_key:
            raise HesscliError(f"data file '{path}' holds a pair (inputs, targets), not named keys; drop --input-key/--target-key")
        return content[0], content[1], "0", "1"
    keys = list(content)
    if input_key or target_key:
        ik, tk = input_key, target_key
        if ik is None or tk is None:
            for a, b in KEY_PAIRS:
                if ik is None and b == tk and a in content:
                    ik = a
                if tk is None and a == ik and b in content:
                    tk = b
        for flag, k in (("--input-key", ik), ("--target-key", tk)):
            if k is None:
                raise UsageError(f"data file '{path}': give {flag} too (keys: {', '.join(keys)})")
            if k not in content:
                raise HesscliError(f"data file '{path}' has no key '{k}' ({flag}); its keys: {', '.join(keys)}")
        return content[ik], content[tk], ik, tk
    for a, b in KEY_PAIRS:
        if a in content and b in content:
            return content[a], content[b], a, b
    raise HesscliError(
        f"data file '{path}' has none of the key pairs inputs/targets, x/y, input/target, input_ids/labels "
        f"(its keys: {', '.join(keys) or 'none'}); name them with --input-key and --target-key"
    )


@dataclass
class Shard:
    """One data file (or an in-memory batch): its path, checksum, sample count, the keys of its
    inputs and targets, further keyword inputs, and the sample range this data set uses of it."""

    path: str
    sha256: str
    n_samples: int
    input_key: str
    target_key: str
    extra: tuple[str, ...] = ()  # further keys passed to the model by name, with the input
    start: int = 0
    stop: int | None = None  # sample range of the file this shard covers (distributed split)

    @property
    def size(self) -> int:
        """The number of samples of this shard in the data set (its range)."""
        stop = self.n_samples if self.stop is None else self.stop
        return max(0, stop - self.start)


@dataclass
class Dataset:
    """One data set made of shards; samples are the first dimension of inputs and targets."""

    shards: list[Shard]
    input_key: str | None = None
    target_key: str | None = None
    _cache: ShardCache = field(default_factory=ShardCache, repr=False)
    derive_labels: bool = False  # a causal LM: labels from input_ids where the shard has none
    notes: list[str] = field(default_factory=list)

    @property
    def n_samples(self) -> int:
        """The number of samples in all shards (their ranges)."""
        return sum(s.size for s in self.shards)

    def piece_sizes(self, batch_size: int | None = None) -> list[int]:
        """The samples in each piece :meth:`pieces` yields, from the shards' ranges alone (no
        shard is read)."""
        out: list[int] = []
        for shard in self.shards:
            if shard.size == 0:
                continue
            step = batch_size or shard.size
            out += [min(step, shard.size - s) for s in range(0, shard.size, step)]
        return out

    def _load(self, shard: Shard) -> tuple[tuple, bool]:
        """((inputs, targets) of the whole file, whether the cache keeps them)."""
        hit = self._cache.get(shard.path)
        if hit is not None:
            return hit, True
        content = read_tensors(Path(shard.path))
        x, y, _, _ = pick_keys(content, Path(shard.path), self.input_key, self.target_key, self.derive_labels)
        value = (_with_keywords(x, content, shard.input_key, shard.extra), y)
        del content, x, y
        return value, self._cache.offer(shard.path, value)

    def pieces(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets) micro-batches of at most ``batch_size`` samples, shard by shard.

        One shard is in memory at a time beyond the cached ones: a shard the cache does not keep is
        released before the next is read, and when it is cut into several pieces each piece is a
        copy, so a piece still held by the caller (or by a gradient graph) does not keep the whole
        shard alive."""
        for shard in self.shards:
            if shard.size == 0:
                continue
            value, cached = self._load(shard)
            stop = shard.n_samples if shard.stop is None else shard.stop
            step = batch_size or (stop - shard.start)
            whole = shard.start == 0 and stop == shard.n_samples and step >= stop
            copy = not cached and not whole
            for s in range(shard.start, stop, step):
                e = min(s + step, stop)
                self.current = (shard.path, s, e)
                x, y = take(value[0], s, e), value[1][s:e]
                if copy:
                    x, y = _clone(x), y.clone()
                yield x, y
                del x, y
            del value

    def where(self) -> str:
        """Where the piece being processed comes from, for error messages."""
        cur = getattr(self, "current", None)
        if cur is None:
            return ""
        path, s, e = cur
        return f" (data file '{path}', samples {s}–{e - 1})"

    def first(self, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The first ``n`` samples of the first non-empty shard (for checks and examples)."""
        for shard in self.shards:
            if shard.size:
                self.current = (shard.path, shard.start, min(shard.start + n, shard.stop or shard.n_samples))
                break
        for shard in self.shards:
            if shard.size:
                (x, y), cached = self._load(shard)
                e = min(shard.start + n, shard.stop or shard.n_samples)
                x, y = take(x, shard.start, e), y[shard.start : e]
                return (x, y) if cached else (_clone(x), y.clone())
        return None

    def split(self, rank: int, world: int) -> Dataset:
        """This rank's part: whole files when there are at least ``world`` shards, else sample ranges."""
        if world <= 1:
            return self
        if len(self.shards) >= world:
            mine = [s for i, s in enumerate(self.shards) if i % world == rank]
        else:
            mine = []
            total = self.n_samples
            lo, hi = total * rank // world, total * (rank + 1) // world
            off = 0
            for s in self.shards:
                a, b = max(lo, off), min(hi, off + s.size)
                if a < b:
                    mine.append(replace(s, start=s.start + a - off, stop=s.start + b - off))
                off += s.size
        return Dataset(mine, self.input_key, self.target_key, self._cache, self.derive_labels, self.notes)

    @classmethod
    def from_tensors(cls, inputs, targets: torch.Tensor, name: str = "memory") -> Dataset:
        """A one-shard data set held in memory (a notebook's batch): ``inputs`` a tensor (N, ...) or a
        dict of tensors whose first dimension is N (keyword inputs; the first key is the input),
        ``targets`` (N, ...). The shard's ``sha256`` is that of the tensors' bytes, its path
        ``<name>``. Raises :class:`HesscliError` when the sample counts differ."""
        if isinstance(inputs, dict):
            if not inputs:
                raise HesscliError("in-memory data: the inputs dict is empty")
            ik, extra = next(iter(inputs)), tuple(list(inputs)[1:])
            x = inputs[ik]
        else:
            ik, extra, x = "inputs", (), inputs
        tensors = [x, targets] + [inputs[k] for k in extra]
        for k, t in zip([ik, "targets", *extra], tensors, strict=True):
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                raise HesscliError(f"in-memory data: '{k}' must be a tensor whose first dimension indexes samples")
            if t.shape[0] != x.shape[0]:
                raise HesscliError(f"in-memory data: '{k}' {tuple(t.shape)} does not have the {x.shape[0]} samples of '{ik}' {tuple(x.shape)}")
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        path = f"<{name}>"
        ds = cls([Shard(path, h.hexdigest(), int(x.shape[0]), ik, "targets", extra)])
        ds._cache.pin(path, (_with_keywords(x, dict(inputs) if isinstance(inputs, dict) else {}, ik, extra), targets))
        return ds

    def describe(self) -> list[dict]:
        """Path, sha256 and sample count of each shard (``meta.data``)."""
        return [{"path": s.path, "sha256": s.sha256, "n_samples": s.size} for s in self.shards]


def take(x, s: int, e: int):
    """Samples s..e-1 of inputs that are a tensor or a dict of tensors (keyword inputs)."""
    if isinstance(x, dict):
        return {k: v[s:e] for k, v in x.items()}
    return x[s:e]


def _clone(x):
    """A copy of inputs that are a tensor or a dict of tensors, sharing no storage with the shard."""
    if isinstance(x, dict):
        return {k: v.clone() for k, v in x.items()}
    return x.clone()


def _with_keywords(x: torch.Tensor, content, input_key: str, extra: tuple[str, ...]):
    if not extra:
        return x
    return {input_key: x, **{k: content[k] for k in extra}}


def load_dataset(
    paths: list[str | os.PathLike],
    input_key: str | None = None,
    target_key: str | None = None,
    accepts: set[str] | None = None,
    derive_labels: bool = False,
) -> Dataset:
    """Open every shard once, check its keys, lengths and values, and describe it. The tensors of a
    shard stay in memory only while the shards kept so far fit :data:`CACHE_BYTES`; every other
    shard is released before the next is read, and read again when a pass needs it, so loading and
    each pass hold about one shard beyond the cache (module docstring).

    ``accepts``: the argument names of the model's ``forward``; keys of a shard beyond the
    input/target pair that it names are passed by name (keyword inputs: ``attention_mask``,
    ``token_type_ids``, ...), sliced with the samples. ``derive_labels``: a causal LM, whose shards
    may hold no labels (then ``input_ids`` with masked positions set to -100)."""
    if not paths:
        raise UsageError("no data: pass --data FILE (one or more)")
    shards = []
    ds = Dataset([], input_key, target_key, derive_labels=derive_labels)
    for raw in paths:
        p = Path(raw)
        shard, value = _open_shard(p, input_key, target_key, accepts, derive_labels, ds.notes)
        shards.append(shard)
        ds._cache.offer(str(p), value)
        del value  # released here unless the cache kept it: one shard at a time
    if sum(s.n_samples for s in shards) == 0:
        raise HesscliError("the data holds no samples: " + ", ".join(str(p) for p in paths))
    ds.shards = shards
    return ds


def _open_shard(
    p: Path, input_key: str | None, target_key: str | None, accepts: set[str] | None, derive_labels: bool, notes: list[str]
) -> tuple[Shard, tuple]:
    """Read one data file, check it, and describe it: (its :class:`Shard`, (inputs, targets))."""
    content = read_tensors(p)
    x, y, ik, tk = pick_keys(content, p, input_key, target_key, derive_labels)
    for name, t in (("inputs", x), ("targets", y)):
        if t.dim() == 0:
            raise HesscliError(f"data file '{p}': {name} '{ik if name == 'inputs' else tk}' is a scalar; the first dimension must index samples")
    if x.shape[0] != y.shape[0]:
        raise HesscliError(
            f"data file '{p}': inputs '{ik}' have {x.shape[0]} samples {tuple(x.shape)} but targets "
            f"'{tk}' have {y.shape[0]} {tuple(y.shape)}"
        )
    if x.is_floating_point() and not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).flatten(1).any(1).nonzero()[0, 0]) if x.dim() > 1 else int((~torch.isfinite(x)).nonzero()[0, 0])
        raise HesscliError(f"data file '{p}': inputs '{ik}' contain NaN or Inf (first at sample {bad})")
    if y.is_floating_point() and not torch.isfinite(y).all():
        raise HesscliError(f"data file '{p}': targets '{tk}' contain NaN or Inf")
    extra: tuple[str, ...] = ()
    if accepts and isinstance(content, dict):
        extra = tuple(k for k in content if k not in (ik, tk) and k in accepts)
        for k in extra:
            t = content[k]
            if t.dim() == 0 or t.shape[0] != x.shape[0]:
                raise HesscliError(
                    f"data file '{p}': '{k}' {tuple(t.shape)} does not have the {x.shape[0]} samples of '{ik}' {tuple(x.shape)}"
                )
        mask = content.get("attention_mask") if "attention_mask" in extra else None
        if mask is not None and mask.dim() == 2 and "position_ids" not in extra and bool(((mask[:, 0] == 0) & (mask[:, -1] != 0)).any()):
            notes.append(
                f"data file '{p}' is left-padded and has no position_ids: the positions of its tokens depend on the padding"
            )
    return Shard(str(p), file_sha256(p), int(x.shape[0]), ik, tk, extra), (_with_keywords(x, content, ik, extra), y)
