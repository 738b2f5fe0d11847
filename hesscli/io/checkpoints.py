"""The checkpoints of a training run: which files, at which step, with which learning rate.

- :func:`discover` turns what the command line names (files, directories, quoted globs that
  hesscli expands itself) into :class:`Checkpoint` records sorted by step.
- :func:`parse_step` reads a checkpoint's step: ``global_step`` from the ``trainer_state.json``
  of a checkpoint directory (a Hugging Face Trainer ``checkpoint-N/``); else the integer after
  ``step``, ``checkpoint``, ``ckpt``, ``iter`` or ``epoch`` in the name (in that order of
  preference, so ``epoch3_step1200.pt`` is step 1200); else the name's only integer. A name with
  none, or with several and none of those words, is an error that names it. A file's extension
  (``.pt``, ``.pt2``, ...) is not part of the name read.
- :func:`candidates` lists what a directory holds that may be a checkpoint: files ending in a
  model extension (:data:`MODEL_SUFFIXES`) and model directories (with ``config.json``, or a
  ``trainer_state.json``); hidden files are skipped (temporary files while a trainer writes).
- :func:`load_learning_rates` reads ``--lr-from``: a ``trainer_state.json`` (the learning rate
  logged in ``log_history`` at or before each step) or a CSV file with ``step`` and ``lr`` columns.

Every error is a :class:`~hesscli.errors.HesscliError` (or :class:`~hesscli.errors.UsageError`)
whose message names the file.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hesscli.errors import HesscliError, UsageError

__all__ = [
    "Checkpoint",
    "MODEL_SUFFIXES",
    "STEP_WORDS",
    "parse_step",
    "discover",
    "candidates",
    "fingerprint",
    "watch_signature",
    "LearningRates",
    "load_learning_rates",
]

MODEL_SUFFIXES = (".pt", ".pth", ".pt2", ".safetensors", ".bin", ".ckpt")
STEP_WORDS = ("step", "checkpoint", "ckpt", "iter", "epoch")
_WORD_RE = {w: re.compile(rf"{w}{'(?:ation)?' if w == 'iter' else ''}s?[-_.= ]*(\d+)", re.IGNORECASE) for w in STEP_WORDS}
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint: its path (a file, or a model directory) and its training step."""

    path: str
    step: int

    @property
    def name(self) -> str:
        """The file or directory name."""
        return Path(self.path).name


def _stem(p: Path) -> str:
    """The name a step is read from: without a model extension (``model.pt2`` has no integer)."""
    return p.name[: -len(p.suffix)] if p.suffix.lower() in MODEL_SUFFIXES else p.name


def parse_step(path: str | os.PathLike) -> int:
    """The training step of the checkpoint at ``path`` (see the module docstring for the rules)."""
    p = Path(path)
    state = p / "trainer_state.json"
    if p.is_dir() and state.is_file():
        try:
            step = json.loads(state.read_text(encoding="utf-8")).get("global_step")
        except (OSError, ValueError, AttributeError) as e:
            raise HesscliError(f"cannot read the step of checkpoint '{p}' from '{state}': {e}") from None
        if isinstance(step, bool) or not isinstance(step, int):
            raise HesscliError(f"'{state}' has no integer 'global_step' (got {step!r}): cannot tell the step of '{p}'")
        return step
    name = _stem(p)
    for word in STEP_WORDS:
        m = _WORD_RE[word].search(name)
        if m:
            return int(m.group(1))
    ints = re.findall(r"\d+", name)
    if len(ints) == 1:
        return int(ints[0])
    words = ", ".join(STEP_WORDS)
    if not ints:
        raise HesscliError(f"cannot tell the step of checkpoint '{p}': its name has no integer "
                           f"(name it like step_100.pt, or use a checkpoint-N/ directory with trainer_state.json)")
    raise HesscliError(f"cannot tell the step of checkpoint '{p}': its name has several integers "
                       f"({', '.join(ints)}) and none follows {words}")


def is_model_directory(p: Path) -> bool:
    """A directory that is one checkpoint (a Hugging Face model or Trainer checkpoint directory)."""
    return p.is_dir() and ((p / "config.json").is_file() or (p / "trainer_state.json").is_file())


def candidates(directory: str | os.PathLike) -> list[Path]:
    """What ``directory`` holds that may be a checkpoint (model files and model directories), by name."""
    d = Path(directory)
    try:
        entries = sorted(d.iterdir())
    except OSError as e:
        raise HesscliError(f"cannot list checkpoint directory '{d}': {e.strerror or e}") from None
    out = []
    for e in entries:
        if e.name.startswith("."):
            continue
        if (e.is_file() and e.suffix.lower() in MODEL_SUFFIXES) or is_model_directory(e):
            out.append(e)
    return out


def _expand(item: str) -> list[Path]:
    p = Path(item)
    if p.exists():
        if p.is_dir() and not is_model_directory(p):
            found = candidates(p)
            if not found:
                raise HesscliError(f"directory '{p}' holds no checkpoints (files ending {', '.join(MODEL_SUFFIXES)}, "
                                   "or model directories)")
            return found
        return [p]
    if _GLOB_CHARS & set(item):
        matches = sorted(Path(m) for m in glob.glob(item) if not Path(m).name.startswith("."))
        if not matches:
            raise HesscliError(f"no checkpoint matches '{item}'")
        out: list[Path] = []
        for m in matches:
            out.extend(_expand(str(m)) if m.is_dir() and not is_model_directory(m) else [m])
        return out
    raise HesscliError(f"checkpoint '{item}' does not exist")


def discover(items: Iterable[str | os.PathLike]) -> list[Checkpoint]:
    """Checkpoints from files, directories and quoted globs, sorted by step.

    Raises :class:`HesscliError` for a path that does not exist, a glob that matches nothing, a
    name without a readable step, or two checkpoints at the same step (naming both)."""
    found: dict[str, Checkpoint] = {}
    for item in items:
        for p in _expand(str(item)):
            key = os.path.realpath(p)
            if key not in found:
                found[key] = Checkpoint(str(p), parse_step(p))
    ckpts = sorted(found.values(), key=lambda c: c.step)
    for a, b in zip(ckpts, ckpts[1:]):
        if a.step == b.step:
            raise HesscliError(f"checkpoints '{a.path}' and '{b.path}' are both step {a.step}: give one of them")
    return ckpts


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint file; of a model directory, over its config and weight files."""
    from hesscli.io.hf import hf_fingerprint
    from hesscli.io.loading import file_sha256

    p = Path(path)
    try:
        return hf_fingerprint(p) if p.is_dir() else file_sha256(p)
    except OSError as e:
        raise HesscliError(f"cannot read checkpoint '{p}': {e.strerror or e}") from None


def watch_signature(path: str | os.PathLike) -> tuple[int, int] | None:
    """(files, total bytes) of a checkpoint being written; None while it cannot be read. Two equal
    signatures one poll apart mean the writer has (most likely) finished."""
    p = Path(path)
    try:
        if p.is_dir():
            files = [f for f in p.rglob("*") if f.is_file()]
            return len(files), sum(f.stat().st_size for f in files)
        return 1, p.stat().st_size
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# learning rates


@dataclass
class LearningRates:
    """Logged learning rates by step: :meth:`at` gives the last one logged at or before a step
    (NaN before the first)."""

    source: str
    steps: np.ndarray  # (m,) int64, ascending
    values: np.ndarray  # (m,) float64

    def at(self, step: int) -> float:
        """The learning rate logged last at or before ``step`` (NaN before the first)."""
        i = int(np.searchsorted(self.steps, step, side="right")) - 1
        return float(self.values[i]) if i >= 0 else math.nan


def _from_trainer_state(path: Path, text: str) -> LearningRates:
    try:
        state = json.loads(text)
    except ValueError as e:
        raise HesscliError(f"--lr-from '{path}' is not valid JSON: {e}") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise HesscliError(f"--lr-from '{path}' has no 'log_history' list (a Hugging Face trainer_state.json has one)")
    pairs = []
    for entry in history:
        if isinstance(entry, dict) and "learning_rate" in entry and "step" in entry:
            try:
                pairs.append((int(entry["step"]), float(entry["learning_rate"])))
            except (TypeError, ValueError):
                raise HesscliError(f"--lr-from '{path}': a log_history entry has step {entry.get('step')!r} and "
                                   f"learning_rate {entry.get('learning_rate')!r}") from None
    if not pairs:
        raise HesscliError(f"--lr-from '{path}' logs no learning_rate in its log_history")
    return _rates(str(path), pairs)


def _from_csv(path: Path, text: str) -> LearningRates:
    rows = list(csv.reader(text.splitlines()))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise HesscliError(f"--lr-from '{path}' is empty: expected a CSV file with 'step' and 'lr' columns")
    header = [c.strip().lower() for c in rows[0]]
    if "step" not in header or "lr" not in header:
        raise HesscliError(f"--lr-from '{path}': the first line must name the columns 'step' and 'lr' (got {rows[0]})")
    i_step, i_lr = header.index("step"), header.index("lr")
    pairs = []
    for line, r in enumerate(rows[1:], start=2):
        try:
            step_f = float(r[i_step])
            if step_f != int(step_f):
                raise ValueError
            pairs.append((int(step_f), float(r[i_lr])))
        except (IndexError, ValueError):
            raise HesscliError(f"--lr-from '{path}', line {line}: expected an integer step and a number lr, got {r}") from None
    if not pairs:
        raise HesscliError(f"--lr-from '{path}' has a header but no rows")
    return _rates(str(path), pairs)


def _rates(source: str, pairs: Sequence[tuple[int, float]]) -> LearningRates:
    pairs = sorted(pairs, key=lambda t: t[0])  # stable: the last one logged at a step wins below
    steps = np.array([s for s, _ in pairs], dtype=np.int64)
    values = np.array([v for _, v in pairs], dtype=np.float64)
    last = np.r_[steps[1:] != steps[:-1], True]
    return LearningRates(source, steps[last], values[last])


def load_learning_rates(path: str | os.PathLike) -> LearningRates:
    """``--lr-from``: a ``trainer_state.json`` or a CSV file with ``step,lr`` columns (by content)."""
    p = Path(path)
    if p.is_dir() and (p / "trainer_state.json").is_file():
        p = p / "trainer_state.json"
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HesscliError(f"--lr-from '{p}' does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HesscliError(f"cannot read --lr-from '{p}': {getattr(e, 'strerror', None) or e}") from None
    if text.lstrip().startswith("{"):
        return _from_trainer_state(p, text)
    return _from_csv(p, text)


def check_lr_options(lr: float | None, momentum: float | None, lr_from: str | None) -> None:
    """``--lr`` and ``--lr-from`` exclude each other; ``--momentum`` needs a learning rate."""
    if lr is not None and lr_from is not None:
        raise UsageError("--lr and --lr-from exclude each other: give one")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise UsageError(f"--lr must be a positive number (got {lr})")
    if momentum is not None:
        if lr is None and lr_from is None:
            raise UsageError("--momentum needs --lr (or --lr-from): the threshold (2 + 2β)/η needs η")
        if not (0 <= momentum < 1):
            raise UsageError(f"--momentum must be in [0, 1) (got {momentum})")
