"""Sharpness across the checkpoints of a training run (``hesscli track``).

For each checkpoint θ_i of a run, in step order, :func:`track` computes

- the ``top_k`` largest eigenvalues of the Hessian H_i = ∇²L(θ_i) of the training loss (and with
  ``which="both"`` the ``top_k`` smallest), by block Lanczos with thick restarts
  (:func:`hesscli.algorithms.lanczos.lanczos`; Golub & Underwood 1977, Wu & Simon 2000), with
  their residuals ‖H u − λ u‖;
- the **curvature along the update** dᵀH_i d / ‖d‖² for d = θ_i − θ_{i−1} (NaN for the first
  checkpoint), one more Hessian-vector product against this checkpoint's Hessian. For checkpoints
  one optimizer step apart it is the directional sharpness along the step taken, which
  edge-of-stability studies compare with 2/η; over many steps it is the curvature along the net
  displacement, which can be far below λmax;
- the loss L(θ_i), and with ``trace=True`` tr H_i ± its standard error (Hutch++, Meyer et al.
  2021; exact when P ≤ ``trace_matvecs``).

With full-batch gradient descent at step size η, λmax rises until it reaches about 2/η and then
hovers there (Cohen, Kaur, Li, Kolter & Talwalkar 2021, "Gradient descent on neural networks
typically occurs at the edge of stability"); with heavy-ball momentum β the threshold is
(2 + 2β)/η. :func:`stability_threshold` gives it; :func:`plot_sharpness` draws λmax against it.

Work shared across checkpoints: the data is loaded and checked once; every checkpoint is loaded
once up front to check that its parameter layout (names and shapes) is the first one's, so a
mismatch is an error before any work; the symmetry probe of the products runs on the first
checkpoint computed. **Warm start**: each checkpoint's eigensolver starts from the previous
checkpoint's Ritz vectors (completed with seeded random directions to the block size), which is
sound because consecutive checkpoints are close; ``warm_start=False`` starts every checkpoint from
the seeded random block that ``spectrum`` uses. Each row's ``matvecs`` counts the eigensolver's
products only (with its final residual check), not the update product, the trace or the probe.

Results: :class:`TrackRow` per checkpoint; :class:`TrackResult` holds the rows as the arrays of
``track.npz`` (SPEC.md, Result files). With ``out`` the file is rewritten atomically after each
checkpoint, and a second run with the same ``out`` keeps the rows whose checkpoint sha256, whose
predecessor's and whose settings match, and computes the rest (an interrupted run resumes).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from hesscli.api import DEFAULT_TOL
from hesscli.errors import HesscliError, UsageError
from hesscli.io.checkpoints import (
    Checkpoint,
    LearningRates,
    candidates,
    check_lr_options,
    discover,
    load_learning_rates,
    parse_step,
    watch_signature,
)
from hesscli.io.data import Dataset
from hesscli.io.resultfile import check_output, json_safe, read_result
from hesscli.results import Result, register
from hesscli.runtime.progress import NullProgress, Progress
from hesscli.session import ModelSpec, Session, data_argument, open_session

__all__ = [
    "TrackRow",
    "TrackResult",
    "Tracking",
    "track",
    "stability_threshold",
    "threshold_rule",
    "plot_sharpness",
]

WHICH = ("largest", "both")
_SPEC_FIELDS = {f.name for f in dataclasses.fields(ModelSpec)} - {"model", "data"}
# settings that change what a row means: a kept row must have been computed with the same ones
_SETTING_KEYS = ("loss", "reduction", "params", "trainable_only", "dtype", "input_key", "target_key", "output_key",
                 "arch", "arch_kwargs", "top_k", "which", "tol", "trace", "trace_matvecs", "data")


def stability_threshold(lr: float, momentum: float | None = None) -> float:
    """The sharpness above which gradient descent at step size ``lr`` is unstable on a quadratic:
    2/η, or (2 + 2β)/η with heavy-ball momentum β (Cohen et al. 2021). NaN when η is unknown."""
    if lr is None or not math.isfinite(lr) or lr <= 0:
        return math.nan
    return (2.0 + 2.0 * (momentum or 0.0)) / lr


def threshold_rule(momentum: float | None = None) -> str:
    """How the threshold is computed, for labels: ``2/η`` or ``(2 + 2β)/η, β = 0.9``."""
    return "2/η (gradient descent)" if not momentum else f"(2 + 2β)/η (momentum β = {momentum:g})"


@dataclass
class TrackRow:
    """One checkpoint's answer.

    Eigenvalues are in the units of the loss per squared parameter unit (those of H).

    - ``eigenvalues`` (k,) float64, largest first; ``residuals`` (k,) ‖Hu − λu‖₂; ``converged``
      (k,) bool: residual ≤ tol·‖H‖₂. With ``which="both"`` also ``eigenvalues_smallest`` (k,)
      (smallest first), ``residuals_smallest``, ``converged_smallest``; else None.
    - ``matvecs``: Hessian-vector products of the eigensolver (not the update product, the trace
      or the symmetry probe).
    - ``update_curvature``: dᵀHd/‖d‖² for d = θ(this) − θ(previous checkpoint); NaN for the first
      and when d = 0.
    - ``loss``: L(θ); ``lr``: the learning rate at this step (NaN where unknown);
      ``trace``/``trace_stderr``: tr H ± standard error (None unless asked).
    - ``kept``: read back from an earlier run's file, not computed now; ``warm``: the eigensolver
      started from the previous checkpoint's Ritz vectors.
    """

    step: int
    path: str
    sha256: str
    eigenvalues: np.ndarray
    residuals: np.ndarray
    converged: np.ndarray
    matvecs: int
    update_curvature: float
    loss: float
    lr: float = math.nan
    eigenvalues_smallest: np.ndarray | None = None
    residuals_smallest: np.ndarray | None = None
    converged_smallest: np.ndarray | None = None
    trace: float | None = None
    trace_stderr: float | None = None
    seconds: float = 0.0
    warm: bool = False
    kept: bool = False
    momentum: float | None = field(default=None, repr=False)

    @property
    def lambda_max(self) -> float:
        """The largest eigenvalue."""
        return float(self.eigenvalues[0])

    @property
    def lambda_min(self) -> float | None:
        """The smallest eigenvalue (``which="both"``), else None."""
        return float(self.eigenvalues_smallest[0]) if self.eigenvalues_smallest is not None else None

    @property
    def all_converged(self) -> bool:
        """Every pair of the row converged."""
        ok = bool(np.all(self.converged))
        return ok and (self.converged_smallest is None or bool(np.all(self.converged_smallest)))

    @property
    def residual(self) -> float:
        """The worst residual of the row's pairs (a bound for every eigenvalue it reports)."""
        r = [self.residuals] + ([self.residuals_smallest] if self.residuals_smallest is not None else [])
        vals = np.concatenate([np.asarray(x, dtype=np.float64) for x in r])
        return float(np.nanmax(vals)) if vals.size and not np.all(np.isnan(vals)) else math.nan

    @property
    def threshold(self) -> float:
        """(2 + 2β)/η at this step (NaN where η is unknown)."""
        return stability_threshold(self.lr, self.momentum)

    def summary(self) -> dict:
        """The row as ``--json`` prints it (one line per checkpoint): NaN becomes null; ``lambda_min``,
        ``trace``, ``trace_stderr``, ``lr`` and ``threshold`` appear only where computed or known."""
        out: dict[str, Any] = {
            "step": self.step,
            "path": self.path,
            "sha256": self.sha256,
            "lambda_max": self.lambda_max,
            "residual": self.residual,
            "converged": self.all_converged,
            "matvecs": int(self.matvecs),
            "update_curvature": self.update_curvature,
            "loss": self.loss,
            "eigenvalues": [float(v) for v in self.eigenvalues],
        }
        if self.eigenvalues_smallest is not None:
            out["lambda_min"] = self.lambda_min
            out["eigenvalues_smallest"] = [float(v) for v in self.eigenvalues_smallest]
        if self.trace is not None:
            out["trace"] = self.trace
            out["trace_stderr"] = self.trace_stderr
        if math.isfinite(self.lr):
            out["lr"] = self.lr
            out["threshold"] = self.threshold
        out.update(warm_start=self.warm, kept=self.kept, seconds=self.seconds)
        return json_safe(out)


def _row_arrays(rows: Sequence[TrackRow], k: int, both: bool, with_trace: bool) -> dict:
    n = len(rows)

    def mat(get, dtype=np.float64, fill=np.nan):
        a = np.full((n, k), fill, dtype=dtype)
        for i, r in enumerate(rows):
            v = np.asarray(get(r))
            a[i, : min(k, len(v))] = v[:k]
        return a

    arrays = {
        "steps": np.array([r.step for r in rows], dtype=np.int64),
        "paths": np.array([r.path for r in rows], dtype=str),
        "sha256": np.array([r.sha256 for r in rows], dtype=str),
        "eigenvalues": mat(lambda r: r.eigenvalues),
        "residuals": mat(lambda r: r.residuals),
        "converged": mat(lambda r: r.converged, bool, False),
        "matvecs": np.array([r.matvecs for r in rows], dtype=np.int64),
        "update_curvature": np.array([r.update_curvature for r in rows], dtype=np.float64),
        "lr": np.array([r.lr for r in rows], dtype=np.float64),
        "loss": np.array([r.loss for r in rows], dtype=np.float64),
        "seconds": np.array([r.seconds for r in rows], dtype=np.float64),
        "warm_start": np.array([r.warm for r in rows], dtype=bool),
    }
    if both:
        arrays["eigenvalues_smallest"] = mat(lambda r: r.eigenvalues_smallest)
        arrays["residuals_smallest"] = mat(lambda r: r.residuals_smallest)
        arrays["converged_smallest"] = mat(lambda r: r.converged_smallest, bool, False)
    if with_trace:
        arrays["trace"] = np.array([np.nan if r.trace is None else r.trace for r in rows], dtype=np.float64)
        arrays["trace_stderr"] = np.array([np.nan if r.trace_stderr is None else r.trace_stderr for r in rows],
                                          dtype=np.float64)
    if not n:
        arrays["paths"] = np.zeros(0, dtype="<U1")
        arrays["sha256"] = np.zeros(0, dtype="<U1")
    return arrays


@dataclass
class TrackResult(Result):
    """``hesscli track``: one row per checkpoint, in step order (SPEC.md, Result files).

    Arrays: ``steps`` (n,) int64, ``paths`` (n,) str, ``sha256`` (n,) str, ``eigenvalues`` (n, k)
    largest first, ``residuals`` (n, k), ``converged`` (n, k) bool, ``matvecs`` (n,) int64,
    ``update_curvature`` (n,) float64 (NaN for the first), ``lr`` (n,) float64 (NaN where unknown),
    ``loss`` (n,), ``seconds`` (n,), ``warm_start`` (n,) bool; with ``which="both"`` also
    ``eigenvalues_smallest``/``residuals_smallest``/``converged_smallest`` (n, k); with ``trace``
    also ``trace`` and ``trace_stderr`` (n,). ``meta.settings`` holds what a resumed run must match.
    """

    command: ClassVar[str] = "track"

    @classmethod
    def from_rows(cls, rows: Sequence[TrackRow], meta: dict, out: str | None = None) -> TrackResult:
        """The result of ``rows`` (sorted by step here) with ``meta`` (``top_k``, ``which``, ``trace``)."""
        rows = sorted(rows, key=lambda r: r.step)
        k = int(meta.get("top_k") or (len(rows[0].eigenvalues) if rows else 1))
        both = meta.get("which") == "both"
        arrays = _row_arrays(rows, k, both, bool(meta.get("trace")))
        meta = dict(meta)
        meta["n_checkpoints"] = len(rows)
        meta["matvecs"] = int(arrays["matvecs"].sum())
        return cls(arrays, meta, out)

    def __len__(self) -> int:
        return len(self.arrays["steps"])

    @property
    def steps(self) -> np.ndarray:
        """(n,) int64, ascending."""
        return self.arrays["steps"]

    @property
    def lambda_max(self) -> np.ndarray:
        """(n,) the largest eigenvalue of each checkpoint's Hessian."""
        ev = self.arrays["eigenvalues"]
        return ev[:, 0] if len(ev) else np.zeros(0)

    @property
    def update_curvature(self) -> np.ndarray:
        """(n,) dᵀHd/‖d‖² for d = θ_i − θ_{i−1} (NaN for the first)."""
        return self.arrays["update_curvature"]

    def rows(self) -> list[TrackRow]:
        """The rows back as :class:`TrackRow` (``kept=True``: they come from a file or an earlier run)."""
        a = self.arrays
        keys = set(_keys(a))
        momentum = self.meta.get("momentum")
        out = []
        for i in range(len(a["steps"])):
            tr = float(a["trace"][i]) if "trace" in keys else None
            out.append(TrackRow(
                step=int(a["steps"][i]), path=str(a["paths"][i]), sha256=str(a["sha256"][i]),
                eigenvalues=np.asarray(a["eigenvalues"][i], dtype=np.float64),
                residuals=np.asarray(a["residuals"][i], dtype=np.float64),
                converged=np.asarray(a["converged"][i], dtype=bool), matvecs=int(a["matvecs"][i]),
                update_curvature=float(a["update_curvature"][i]), loss=float(a["loss"][i]), lr=float(a["lr"][i]),
                eigenvalues_smallest=np.asarray(a["eigenvalues_smallest"][i]) if "eigenvalues_smallest" in keys else None,
                residuals_smallest=np.asarray(a["residuals_smallest"][i]) if "residuals_smallest" in keys else None,
                converged_smallest=np.asarray(a["converged_smallest"][i], dtype=bool) if "converged_smallest" in keys else None,
                trace=tr, trace_stderr=float(a["trace_stderr"][i]) if "trace_stderr" in keys else None,
                seconds=float(a["seconds"][i]) if "seconds" in keys else 0.0,
                warm=bool(a["warm_start"][i]) if "warm_start" in keys else False,
                kept=True, momentum=momentum,
            ))
        return out

    @property
    def all_converged(self) -> bool:
        """Every pair of every row converged (``converged`` says which did not)."""
        ok = bool(np.all(self.arrays["converged"]))
        return ok and ("converged_smallest" not in _keys(self.arrays) or bool(np.all(self.arrays["converged_smallest"])))

    @property
    def exit_code(self) -> int:
        """0: a row whose pairs did not converge is reported (``converged``, a warning), not a failure
        of the run — a sidecar keeps going, and the other rows stand."""
        return 0

    def summary(self) -> dict:
        """The whole track: settings, totals and every row's :meth:`TrackRow.summary`."""
        meta = self.meta
        rows = [r.summary() for r in self.rows()]
        for r in rows:
            r.pop("kept", None)
        return json_safe({
            "status": "ok" if self.all_converged else "not_converged",
            "command": "track",
            "out": self.out,
            "n_checkpoints": len(self),
            "top_k": meta.get("top_k"),
            "which": meta.get("which"),
            "tol": meta.get("tol"),
            "warm_start": meta.get("warm_start"),
            "threshold_rule": meta.get("threshold_rule"),
            "matvecs": int(np.sum(self.arrays["matvecs"])),
            "dtype": meta.get("dtype"),
            "device": meta.get("device"),
            "n_params": sum(int(np.prod(p["shape"])) for p in meta.get("params") or []) or None,
            "seconds": meta.get("seconds"),
            "notes": self.notes,
            "rows": rows,
        })


def _keys(arrays) -> list[str]:
    k = arrays.keys
    return list(k() if callable(k) else k)


register("track", TrackResult)


# ---------------------------------------------------------------------------------------------
# the run


def _data_fingerprint(files: list[str], ds: Dataset | None) -> list[str]:
    from hesscli.io.loading import file_sha256

    if ds is not None:
        return [s.sha256 for s in ds.shards]
    out = []
    for f in files:
        if not Path(f).is_file():
            raise HesscliError(f"data file '{f}' does not exist" if not Path(f).exists() else f"data '{f}' is not a file")
        out.append(file_sha256(f))
    return out


def _layout(module) -> list[tuple[str, tuple[int, ...]]]:
    from hesscli.objective.ties import unique_parameters

    return [(n, tuple(p.shape)) for n, p in unique_parameters(module)]


def _compare_layout(ref: list, ref_path: str, got: list, path: str) -> None:
    if got == ref:
        return
    a, b = dict(ref), dict(got)
    for name, shape in ref:
        if name not in b:
            raise HesscliError(f"checkpoint '{path}' has no parameter '{name}' (the first checkpoint '{ref_path}' has it, "
                               f"shape {list(shape)}): every checkpoint must have the same parameters")
        if b[name] != shape:
            raise HesscliError(f"checkpoint '{path}': parameter '{name}' has shape {list(b[name])}, the first checkpoint "
                               f"'{ref_path}' has {list(shape)}: every checkpoint must have the same parameters")
    for name, shape in got:
        if name not in a:
            raise HesscliError(f"checkpoint '{path}' has a parameter '{name}' {list(shape)} that the first checkpoint "
                               f"'{ref_path}' has not: every checkpoint must have the same parameters")
    raise HesscliError(f"checkpoint '{path}' lists its parameters in another order than the first checkpoint '{ref_path}'")


def _layout_error(e: HesscliError) -> bool:
    return "every checkpoint must have the same parameters" in str(e) or "another order" in str(e)


def _flat(module, names: Sequence[str]) -> torch.Tensor:
    """The parameters ``names`` of ``module``, flat, float64 on the CPU."""
    from hesscli.objective.ties import unique_parameters

    params = dict(unique_parameters(module))
    return torch.cat([params[n].detach().reshape(-1).to("cpu", torch.float64) for n in names])


class _Prefixed(Progress):
    """Progress reports with the checkpoint's step in the description."""

    def __init__(self, inner: Progress, prefix: str):
        self.inner, self.prefix = inner, prefix

    def start(self, total: int, description: str = "") -> None:
        self.inner.start(total, f"{self.prefix}: {description}")

    def advance(self, n: int = 1, **fields) -> None:
        self.inner.advance(n, **fields)

    def stop(self) -> None:
        self.inner.stop()


class Tracking:
    """The iterator :func:`track` returns: :class:`TrackRow` per checkpoint, in step order.

    Attributes known before the first row: ``checkpoints`` (the :class:`Checkpoint` list found so
    far), ``kept`` (rows taken from an earlier run's ``out``), ``notes``. :attr:`result` is the
    :class:`TrackResult` of the rows finished so far (what ``out`` holds)."""

    def __init__(self, checkpoints, data, *, out, force, top_k, which, tol, max_matvecs, block_size, warm_start,
                 trace, trace_matvecs, lr, momentum, lr_from, follow, until, poll_seconds, progress, options):
        unknown = set(options) - _SPEC_FIELDS
        if unknown:
            raise UsageError(f"unknown option(s) {', '.join(sorted(unknown))}: choose from {', '.join(sorted(_SPEC_FIELDS))}")
        if which not in WHICH:
            raise UsageError(f"--which '{which}': choose largest or both")
        if top_k < 1:
            raise UsageError(f"--top-k must be at least 1 (got {top_k})")
        if tol is None:  # as spectrum's default: above the products' rounding in float32 (1e-5·‖H‖₂)
            tol = DEFAULT_TOL["float64" if options.get("dtype") == "float64" else "float32"]
        if not (tol > 0):
            raise UsageError(f"--tol must be positive (got {tol})")
        if trace_matvecs < 1:
            raise UsageError(f"--trace-matvecs must be at least 1 (got {trace_matvecs})")
        check_lr_options(lr, momentum, lr_from)
        if until is not None and follow is None:
            raise UsageError("--until applies to --follow DIR only")
        if follow is not None and not Path(follow).is_dir():
            raise HesscliError(f"--follow '{follow}' is not a directory")
        if isinstance(checkpoints, (str, os.PathLike)):
            checkpoints = [checkpoints]
        checkpoints = [str(c) for c in checkpoints or []]
        if not checkpoints and follow is None:
            raise UsageError("no checkpoints: name files, directories or a quoted glob (or --follow DIR)")
        self.files, self.dataset = data_argument(data)
        if not self.files and self.dataset is None:
            raise UsageError("no data: pass --data FILE (one or more)")
        self.spec = ModelSpec(model="", data=list(self.files), **options)
        self.top_k, self.which, self.tol = top_k, which, tol
        self.max_matvecs, self.block_size, self.warm_start = max_matvecs, block_size, warm_start
        self.with_trace, self.trace_matvecs = trace, trace_matvecs
        self.lr, self.momentum = lr, momentum
        self.rates: LearningRates | None = load_learning_rates(lr_from) if lr_from is not None else None
        self.lr_from = str(lr_from) if lr_from is not None else None
        self.follow, self.until, self.poll_seconds = follow, until, poll_seconds
        self.progress = progress or NullProgress()
        self.out = str(out) if out is not None else None
        self.notes: list[str] = []
        self.t0 = time.perf_counter()

        self.checkpoints: list[Checkpoint] = discover(checkpoints) if checkpoints else []
        self.settings = self._settings()
        self._layout_ref: tuple[list, str] | None = None
        self.shas = {c.path: self._check(c) for c in self.checkpoints}  # every checkpoint read once up front
        if follow is not None:
            self._adopt_present()
        self.old_meta: dict | None = None
        self.finished: dict[int, TrackRow] = {}
        self.kept = 0
        if self.out is not None:
            self._resume(force)
        self.session: Session | None = None  # the first checkpoint computed: its data and meta
        self.probe: dict = {}
        self.hvps = 0
        self.names: list[str] | None = None
        self._gen = self._run()

    # -- setup

    def _settings(self) -> dict:
        s = {k: getattr(self.spec, k) for k in _SETTING_KEYS if hasattr(self.spec, k)}
        s.update(top_k=self.top_k, which=self.which, tol=self.tol, trace=self.with_trace,
                 trace_matvecs=self.trace_matvecs if self.with_trace else None,
                 data=_data_fingerprint(self.files, self.dataset))
        if isinstance(s.get("arch_kwargs"), dict):
            s["arch_kwargs"] = json_safe(s["arch_kwargs"])
        return json_safe(s)

    def _load(self, path: str):
        from hesscli.io.loading import load_model, parse_arch_kwargs

        spec = self.spec
        kwargs = spec.arch_kwargs if isinstance(spec.arch_kwargs, dict) else parse_arch_kwargs(spec.arch_kwargs)
        return load_model(path, spec.arch, kwargs if spec.arch_kwargs is not None else None, spec.trust_code)

    def _check(self, c: Checkpoint) -> str:
        """Load a checkpoint, check its parameter layout against the first; returns its sha256."""
        lm = self._load(c.path)
        layout = _layout(lm.module)
        if self._layout_ref is None:
            self._layout_ref = (layout, c.path)
        else:
            _compare_layout(self._layout_ref[0], self._layout_ref[1], layout, c.path)
        return lm.sha256

    def _adopt_present(self) -> None:
        """``follow``: what the directory holds already and loads joins the list (and can be resumed);
        what does not load yet is left to the watcher (it may still be being written)."""
        known = {os.path.realpath(c.path) for c in self.checkpoints}
        for p in candidates(self.follow):
            if os.path.realpath(p) in known:
                continue
            c = Checkpoint(str(p), parse_step(p))
            try:
                self.shas[c.path] = self._check(c)
            except UsageError:
                raise
            except HesscliError as e:
                if _layout_error(e):
                    raise
                continue
            self.checkpoints.append(c)
        self.checkpoints.sort(key=lambda c: c.step)
        for a, b in zip(self.checkpoints, self.checkpoints[1:]):
            if a.step == b.step:
                raise HesscliError(f"checkpoints '{a.path}' and '{b.path}' are both step {a.step}: give one of them")

    def _resume(self, force: bool) -> None:
        p = Path(self.out)
        check_output(p, True)  # a directory or an unwritable place is refused before any work
        if not p.exists() or force:
            return
        try:
            rf = read_result(p)
        except HesscliError as e:
            raise HesscliError(f"output '{p}' exists and is not a track result ({e}); pass --force to overwrite it, "
                               "or -o another path") from None
        with rf:
            meta = dict(rf.meta)
            if meta.get("command") != "track":
                raise HesscliError(f"output '{p}' holds a '{meta.get('command')}' result, not a track; pass --force to "
                                   "overwrite it, or -o another path")
            old = meta.get("settings") or {}
            diff = [k for k in sorted(set(old) | set(self.settings)) if old.get(k) != self.settings.get(k)]
            if diff:
                shown = ", ".join(f"{k} {old.get(k)!r} there, {self.settings.get(k)!r} here" for k in diff[:3]
                                  if k != "data") or "the data differs"
                raise HesscliError(f"output '{p}' holds a track with other settings ({shown}); pass --force to start "
                                   "over, or -o another path")
            previous = TrackResult({k: rf[k] for k in rf.keys}, meta, str(p)).rows()
        self.old_meta = meta
        previous.sort(key=lambda r: r.step)
        old_prev = {r.step: (previous[i - 1].sha256 if i else None) for i, r in enumerate(previous)}
        by_step = {r.step: r for r in previous}
        new_prev = None
        for c in self.checkpoints:
            sha = self.shas[c.path]
            r = by_step.get(c.step)
            # kept: the same checkpoint, after the same predecessor (its update curvature is still right)
            if r is not None and r.sha256 == sha and old_prev[c.step] == new_prev:
                r.path = c.path
                self.finished[c.step] = r
            new_prev = sha
        self.kept = len(self.finished)
        dropped = len([r for r in previous if r.step not in self.finished])
        if self.kept or dropped:
            self.notes.append(f"kept {self.kept} of {len(previous)} row(s) from '{p}' (same checkpoint sha256 and settings)"
                              + (f"; {dropped} recomputed or dropped" if dropped else ""))

    # -- iteration

    def __iter__(self) -> Tracking:
        return self

    def __next__(self) -> TrackRow:
        return next(self._gen)

    def close(self) -> None:
        """Stop (a ``follow`` run waits for new checkpoints until then)."""
        self._gen.close()

    def lr_at(self, step: int) -> float:
        """η at ``step`` from ``lr`` or ``lr_from`` (NaN where unknown)."""
        if self.lr is not None:
            return float(self.lr)
        if self.rates is not None:
            return self.rates.at(step)
        return math.nan

    def _run(self) -> Iterator[TrackRow]:
        prev: tuple[Checkpoint, torch.Tensor | None] | None = None
        warm: torch.Tensor | None = None
        last_step: int | None = None
        for c in self.checkpoints:
            row, prev, warm = self._one(c, prev, warm)
            last_step = c.step
            yield row
            if self.until is not None and c.step >= self.until:
                self._write()
                return
        self._write()  # the kept rows with this run's learning rates (and a file when nothing was computed)
        if self.follow is None:
            return
        yield from self._follow(prev, warm, last_step)

    def _follow(self, prev, warm, last_step) -> Iterator[TrackRow]:
        """Watch ``follow`` for new checkpoints: one is taken once its size (files and bytes) is the
        same at two looks one poll apart and it loads; then rows are computed in step order."""
        seen = {os.path.realpath(c.path) for c in self.checkpoints}
        pending: dict[str, tuple[tuple[int, int] | None, float]] = {}
        ignored: set[str] = set()
        while True:
            ready: list[Checkpoint] = []
            for p in candidates(self.follow):
                key = os.path.realpath(p)
                if key in seen or key in ignored:
                    continue
                sig = watch_signature(p)
                before = pending.get(key)
                pending[key] = (sig, time.monotonic())
                if before is None or sig is None or sig != before[0] or sig[1] == 0:
                    continue
                try:
                    step = parse_step(p)
                except HesscliError as e:
                    self.notes.append(f"warning: skipped '{p}': {e}")
                    ignored.add(key)
                    continue
                if last_step is not None and step <= last_step:
                    self.notes.append(f"warning: skipped '{p}': step {step} appeared after step {last_step} was computed")
                    ignored.add(key)
                    continue
                try:
                    sha = self._check(Checkpoint(str(p), step))
                except UsageError:
                    raise  # e.g. weights without --arch: waiting would not help
                except HesscliError as e:
                    if _layout_error(e):
                        raise
                    continue  # not loadable yet (still being written): look again next time
                ready.append(Checkpoint(str(p), step))
                self.shas[str(p)] = sha
                seen.add(key)
                pending.pop(key, None)
            for c in sorted(ready, key=lambda c: c.step):
                if last_step is not None and c.step <= last_step:
                    self.notes.append(f"warning: skipped '{c.path}': step {c.step} is not after step {last_step}")
                    continue
                self.checkpoints.append(c)
                row, prev, warm = self._one(c, prev, warm)
                last_step = c.step
                yield row
                if self.until is not None and c.step >= self.until:
                    return
            time.sleep(self.poll_seconds)

    def _open(self, c: Checkpoint) -> Session:
        spec = dataclasses.replace(self.spec, model=c.path)
        if self.session is None and self.dataset is None:
            return open_session(spec)  # loads and checks the data, once
        ds = self.dataset if self.dataset is not None else self.session.data
        return open_session(spec, dataset=ds)

    def _one(self, c: Checkpoint, prev, warm):
        """The row of checkpoint ``c``: kept from the earlier file, or computed."""
        t0 = time.perf_counter()
        kept = self.finished.get(c.step)
        if kept is not None:
            kept.lr = self.lr_at(c.step)
            kept.momentum = self.momentum
            # its parameters, when the next checkpoint is computed (for d); flattened once names are known
            theta = self._load(c.path).module if self._next_needs_theta(c) else None
            return kept, (c, theta), None
        from hesscli.algorithms.lanczos import lanczos
        from hesscli.algorithms.operators import HessianOperator
        from hesscli.algorithms.trace import estimate_trace

        session = self._open(c)
        obj = session.objective
        first = self.session is None
        if first:
            self.session = session
            self._probe(session)
        op = HessianOperator(obj)
        theta = torch.cat([p.detach().reshape(-1).to("cpu", torch.float64) for p in obj.theta])
        k_solver = self.top_k if self.which == "largest" else 2 * self.top_k
        start = warm if (self.warm_start and warm is not None and warm.shape[1] == obj.P) else None
        progress = _Prefixed(self.progress, f"step {c.step}")
        r = lanczos(op, k_solver, self.which, self.tol, self.max_matvecs, self.block_size, seed=self.spec.seed,
                    eigenvectors=self.warm_start, progress=progress, start=start)
        ev, res, conv = r.eigenvalues, r.residuals, r.converged  # ascending
        kk = min(self.top_k, len(ev))
        hi = slice(len(ev) - kk, len(ev))
        row = TrackRow(
            step=c.step, path=c.path, sha256=self.shas.get(c.path) or session.model.sha256,
            eigenvalues=ev[hi][::-1].copy(), residuals=res[hi][::-1].copy(), converged=conv[hi][::-1].copy(),
            matvecs=int(r.matvecs), update_curvature=math.nan, loss=float(obj.loss_value), lr=self.lr_at(c.step),
            warm=start is not None, momentum=self.momentum,
        )
        if self.which == "both":
            lo = slice(0, min(self.top_k, len(ev)))
            row.eigenvalues_smallest, row.residuals_smallest, row.converged_smallest = ev[lo].copy(), res[lo].copy(), conv[lo].copy()
        for n in r.notes:
            if n not in self.notes:
                self.notes.append(n)
        if prev is not None:
            p_theta = prev[1]
            if p_theta is not None and not isinstance(p_theta, torch.Tensor):
                p_theta = _flat(p_theta, obj.names)
            if p_theta is not None:
                row.update_curvature = self._update_curvature(op, theta - p_theta, c)
        if self.with_trace:
            t = estimate_trace(op, "auto", self.trace_matvecs, self.spec.seed, progress)
            row.trace, row.trace_stderr = float(t.trace), float(t.stderr)
        self.names = list(obj.names)
        self.hvps += obj.hvps
        row.seconds = time.perf_counter() - t0
        new_warm = torch.from_numpy(np.ascontiguousarray(r.eigenvectors.T)) if r.eigenvectors is not None else None
        self.finished[c.step] = row
        self._write()
        return row, (c, theta), new_warm

    def _next_needs_theta(self, c: Checkpoint) -> bool:
        """Whether the checkpoint after ``c`` is computed (so ``c``'s parameters are needed for d)."""
        later = [x for x in self.checkpoints if x.step > c.step]
        return self.follow is not None if not later else later[0].step not in self.finished

    def _update_curvature(self, op, d: torch.Tensor, c: Checkpoint) -> float:
        norm = float(d.norm())
        if not math.isfinite(norm):
            raise HesscliError(f"checkpoint '{c.path}': the update from the previous checkpoint is not finite")
        if norm == 0.0:
            self.notes.append(f"checkpoint '{c.path}' has the parameters of the previous one: no update curvature")
            return math.nan
        u = d / norm
        Hu = op.matmat(u.to(op.device))
        return float(torch.dot(u.to(Hu.device), Hu).item())

    def _probe(self, session: Session) -> None:
        from hesscli.objective.core import asymmetry_tolerance

        obj = session.objective
        h0 = obj.hvps
        probe, where = obj.symmetry_probe(self.spec.seed)
        tol = asymmetry_tolerance(obj.dtype)
        if not math.isfinite(probe):
            raise HesscliError(f"checkpoint '{session.model.path}': the Hessian-vector products contain NaN or Inf "
                               f"(largest trouble between parameters {where}); check the weights, the inputs and the loss")
        if probe > tol:
            raise HesscliError(f"checkpoint '{session.model.path}': the Hessian-vector products are not symmetric: relative "
                               f"asymmetry {probe:.2e} > {tol:.0e}, largest between parameters {where}")
        self.probe = {"symmetry_probe": probe, "symmetry_probe_at": where, "symmetry_probe_hvps": obj.hvps - h0}

    # -- results

    def meta(self) -> dict:
        """``meta`` of the track file: the first computed checkpoint's model and data, the settings."""
        from hesscli.meta import build_meta

        fields = dict(
            settings=self.settings, top_k=self.top_k, which=self.which, tol=self.tol, max_matvecs=self.max_matvecs,
            block_size=self.block_size, warm_start=self.warm_start, trace=self.with_trace,
            trace_matvecs=self.trace_matvecs if self.with_trace else None, lr=self.lr, momentum=self.momentum,
            lr_from=self.lr_from, threshold_rule=threshold_rule(self.momentum) if (self.lr or self.lr_from) else None,
            follow=str(self.follow) if self.follow is not None else None, until=self.until, kept=self.kept,
            method="block-lanczos", mode="matrix-free", seconds=time.perf_counter() - self.t0,
        )
        if self.session is not None:
            meta = build_meta("track", session=self.session, source={"kind": "checkpoints", "path": self.session.model.path},
                              hvps=self.hvps, **self.probe, **fields)
        else:
            meta = build_meta("track", inherited=self.old_meta or {}, **fields)
        meta["notes"] = list(meta.get("notes") or []) + [n for n in self.notes if n not in (meta.get("notes") or [])]
        return meta

    @property
    def result(self) -> TrackResult:
        """The rows finished so far (kept and computed) as a :class:`TrackResult`."""
        return TrackResult.from_rows(list(self.finished.values()), self.meta(), self.out)

    def _write(self) -> None:
        if self.out is not None:
            self.result.save(self.out, force=True)


def track(
    checkpoints: str | os.PathLike | Sequence[str | os.PathLike] = (),
    data=None,
    *,
    out: str | os.PathLike | None = None,
    force: bool = False,
    top_k: int = 1,
    which: str = "largest",
    tol: float | None = None,
    max_matvecs: int | None = None,
    block_size: int | None = None,
    warm_start: bool = True,
    trace: bool = False,
    trace_matvecs: int = 300,
    lr: float | None = None,
    momentum: float | None = None,
    lr_from: str | os.PathLike | None = None,
    follow: str | os.PathLike | None = None,
    until: int | None = None,
    poll_seconds: float = 1.0,
    progress: Progress | None = None,
    **options: Any,
) -> Tracking:
    """Sharpness across a training run's checkpoints: an iterator of :class:`TrackRow`, one per
    checkpoint in step order (see the module docstring for what each row holds).

    ``checkpoints``: files or directories of any format hesscli reads, or quoted globs (expanded
    here, sorted by step: :mod:`hesscli.io.checkpoints`); ``data``: data files, a
    :class:`~hesscli.io.data.Dataset` or an ``(inputs, targets)`` pair; ``options``: the model
    options (:class:`~hesscli.session.ModelSpec` fields: ``arch``, ``loss``, ``dtype``, ``params``,
    ``batch_size``, ``device``, ``seed``, ...).

    ``top_k`` largest eigenvalues per checkpoint (``which="both"``: also the ``top_k`` smallest),
    converged when ‖Hu − λu‖ ≤ ``tol``·‖H‖₂, at most ``max_matvecs`` products each;
    ``warm_start=False`` starts each from the seeded random block ``spectrum`` uses. ``trace``: also
    tr H ± stderr in ``trace_matvecs`` products. ``lr`` (with ``momentum`` β) or ``lr_from`` (a
    ``trainer_state.json`` or a ``step,lr`` CSV) give η per step, stored with each row, and the
    threshold (2 + 2β)/η. ``follow``: then watch that directory for new checkpoints (polling every
    ``poll_seconds``) until ``until`` (a step: stop once a checkpoint at or past it is computed) or
    until the caller stops iterating (or SIGINT).

    ``out``: the ``track.npz`` to rewrite atomically after each checkpoint; an existing one with the
    same settings is resumed (its rows whose checkpoint sha256 and predecessor match are kept and
    yielded with ``kept=True``), one with other settings is refused unless ``force`` (which starts
    over). Errors (:class:`HesscliError`, :class:`UsageError`) name the file or parameter; every
    checkpoint given is checked (it loads, its step is known, its parameter layout is the first's)
    before any work.
    """
    return Tracking(checkpoints, data, out=out, force=force, top_k=top_k, which=which, tol=tol,
                    max_matvecs=max_matvecs, block_size=block_size, warm_start=warm_start, trace=trace,
                    trace_matvecs=trace_matvecs, lr=lr, momentum=momentum, lr_from=lr_from, follow=follow, until=until,
                    poll_seconds=poll_seconds, progress=progress, options=options)


# ---------------------------------------------------------------------------------------------
# the plot


def plot_sharpness(path: str | os.PathLike, result: TrackResult, title: str | None = None) -> None:
    """Save a PNG of λmax (and λmin with ``which="both"``, and the curvature along the update)
    against the step, with the stability threshold (2 + 2β)/η where the learning rate is known,
    labelled with its rule. Needs matplotlib (the ``plot`` extra); written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise HesscliError("--plot needs matplotlib: pip install 'hesscli[plot]'") from None
    a, meta = result.arrays, result.meta
    steps = np.asarray(a["steps"])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        if len(steps):
            ax.plot(steps, a["eigenvalues"][:, 0], "o-", label="λmax", color="C0")
            if "eigenvalues_smallest" in _keys(a):
                ax.plot(steps, a["eigenvalues_smallest"][:, 0], "s-", label="λmin", color="C2")
            uc = np.asarray(a["update_curvature"])
            if np.isfinite(uc).any():
                ax.plot(steps, uc, "^--", label="curvature along the update dᵀHd/‖d‖²", color="C1")
            thr = np.array([stability_threshold(v, meta.get("momentum")) for v in a["lr"]])
            if np.isfinite(thr).any():
                rule = threshold_rule(meta.get("momentum"))
                if np.nanmax(thr) == np.nanmin(thr):
                    ax.axhline(float(np.nanmax(thr)), color="C3", ls=":", label=f"{rule} = {np.nanmax(thr):.4g}")
                else:
                    ax.step(steps, thr, where="post", color="C3", ls=":", label=rule)
        ax.set_xlabel("step")
        ax.set_ylabel("curvature")
        ax.set_title(title or "sharpness across checkpoints")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        fig.savefig(tmp, format="png")
        os.replace(tmp, p)
    except OSError as e:
        raise HesscliError(f"cannot write plot '{p}': {e.strerror or e}") from None
    finally:
        plt.close(fig)
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass

