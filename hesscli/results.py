"""Typed results of the commands: each holds the arrays and ``meta`` of the file the command
writes (SPEC.md, Result files), writes itself (:meth:`Result.save`) and summarises itself
(:meth:`Result.summary`, which is what ``--json`` prints). :func:`load` reads any result file
back into its type.

The summary is a function of the arrays and ``meta`` alone, so a result loaded from its file
summarises exactly as it did when it was computed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from hesscli.errors import HesscliError
from hesscli.io.resultfile import json_safe, read_result, summarize, write_result

__all__ = [
    "Result",
    "ComputeResult",
    "MergeResult",
    "SpectrumResult",
    "TraceResult",
    "DensityResult",
    "InspectResult",
    "load",
    "health_warnings",
]


def health_warnings(summary: Mapping[str, Any]) -> list[str]:
    """Numerical health: an extreme eigenvalue (λmax or λmin, of the matrix or of any block) that
    lies within the rounding threshold τ = ‖H‖₂·√P·ε of zero in float32 has no meaningful sign."""
    tau = summary.get("negative_threshold") or 0.0
    if summary.get("dtype") != "float32" or tau <= 0:
        return []
    near = []
    for b in summary.get("blocks") or []:
        for key, sym in (("lambda_max", "λmax"), ("lambda_min", "λmin")):
            v = b.get(key)
            if v is not None and abs(v) <= tau:
                near.append(f"{sym} of {b['name']} ({v:.2e})")
    if not near:
        return []
    return [
        f"{', '.join(near[:4])}{' …' if len(near) > 4 else ''} within the rounding threshold {tau:.1e} of zero "
        "in float32: the sign is not meaningful; rerun with --dtype float64"
    ]


def _get(arrays: Mapping[str, Any], key: str, default=None):
    return arrays[key] if key in arrays else default


@dataclass
class Result:
    """A command's answer: ``arrays`` (name → numpy array, SPEC.md's keys) and ``meta`` (a JSON
    object), ``out`` the path it was last written to or read from (None before :meth:`save`)."""

    arrays: Mapping[str, Any]
    meta: dict
    out: str | None = None
    command: ClassVar[str] = ""

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write the result file atomically (SPEC.md); refuses an existing ``path`` without
        ``force`` (:class:`HesscliError`). Returns the path; :attr:`out` becomes it."""
        p = write_result(path, {k: self.arrays[k] for k in _keys(self.arrays)}, self.meta, force)
        self.out = str(path)
        return p

    @property
    def exit_code(self) -> int:
        """The command's exit code for this answer (SPEC.md, Exit codes)."""
        return 0

    @property
    def approximation(self) -> str | None:
        """``"block-diagonal"`` when the answer describes H's diagonal blocks, not H (else None)."""
        return self.meta.get("approximation")

    @property
    def notes(self) -> list[str]:
        """meta.notes: what the run wants the reader to know (warnings prefixed 'warning: ')."""
        return list(self.meta.get("notes") or [])

    def summary(self) -> dict:  # pragma: no cover - every subclass defines it
        """The JSON-ready summary (what --json prints)."""
        raise NotImplementedError

    def _head(self, status: str = "ok") -> dict:
        """The fields every matrix-free command's summary starts with."""
        meta, a = self.meta, self.arrays
        src = meta.get("source") or {}
        offs = _get(a, "block_offsets")
        return {
            "status": status,
            "command": meta.get("command"),
            "out": self.out,
            "source": {"kind": src.get("kind"), "path": src.get("path")},
            "approximation": meta.get("approximation"),
            "per_block": bool(meta.get("per_block")),
            "n_params": int(offs[-1]) if offs is not None and len(offs) else None,
            "dtype": meta.get("dtype"),
            "device": meta.get("device"),
            "symmetry_probe": meta.get("symmetry_probe"),
            "symmetry_probe_hvps": meta.get("symmetry_probe_hvps"),
            "hvps": meta.get("hvps"),
            "seconds": meta.get("seconds"),
        }

    def _targets(self) -> list[dict]:
        """Per-target facts kept in ``meta.targets`` (one per block, or the whole H)."""
        return [dict(t) for t in self.meta.get("targets") or []]


@dataclass
class ComputeResult(Result):
    """``hesscli compute``: the dense Hessian (full mode) or its diagonal blocks (block mode).

    Full mode: :attr:`eigenvalues` (P,) ascending, :attr:`hessian` (P, P) unless ``no_dense``;
    block mode: :meth:`block` gives each block's arrays. :attr:`trace` is tr H (block mode too)."""

    command: ClassVar[str] = "compute"

    @property
    def mode(self) -> str:
        """full or block."""
        return self.meta.get("mode")

    @property
    def eigenvalues(self) -> np.ndarray | None:
        """(P,) float64 ascending, full mode only (None in block mode)."""
        return _get(self.arrays, "eigenvalues")

    @property
    def hessian(self) -> np.ndarray | None:
        """(P, P) in the result's dtype, full mode unless written with ``no_dense``."""
        return _get(self.arrays, "hessian")

    @property
    def trace(self) -> float:
        """tr H, float64."""
        return float(self.arrays["trace"])

    def block(self, name: str) -> dict[str, np.ndarray]:
        """The arrays of block ``name`` (block mode): eigenvalues, trace, hessian, eigenvectors."""
        p = f"blocks/{name}/"
        found = {k[len(p):]: self.arrays[k] for k in _keys(self.arrays) if k.startswith(p)}
        if not found:
            raise HesscliError(f"result has no block '{name}'")
        return found

    def summary(self) -> dict:
        """The JSON-ready summary: per block trace, λmax, λmin, negatives; totals; health warnings."""
        s = summarize(self.arrays, self.meta, out=self.out)
        s["seconds"] = self.meta.get("seconds")
        s["notes"] = self.notes
        s["warnings"] = list(self.meta.get("warnings") or []) + health_warnings(s)
        return s


@dataclass
class MergeResult(ComputeResult):
    """``hesscli merge``: a compute result from compute results on disjoint shards of the data."""

    command: ClassVar[str] = "merge"

    def summary(self) -> dict:
        """The compute summary plus the merged input files."""
        s = super().summary()
        s["inputs"] = [i["path"] for i in self.meta.get("inputs") or []]
        return s


def _keys(arrays: Mapping[str, Any]) -> list[str]:
    k = arrays.keys
    return list(k() if callable(k) else k)


@dataclass
class SpectrumResult(Result):
    """``hesscli spectrum``: the wanted extreme eigenpairs with their residuals.

    :attr:`eigenvalues` (k,) in the order the file stores them, :attr:`residuals` (k,)
    ‖Hv − λv‖₂ (NaN where not measured), :attr:`converged` (k,) bool, ``eigenvectors`` (P, k) when
    asked; per block (``per_block``) the same under ``blocks/<name>/`` and in the summary's
    ``blocks``. Algorithm: block Lanczos with thick restarts (Golub & Underwood 1977; Wu & Simon 2000)."""

    command: ClassVar[str] = "spectrum"

    @property
    def eigenvalues(self) -> np.ndarray:
        """(k,) float64: the wanted eigenvalues (per block: of the block-diagonal part)."""
        return self.arrays["eigenvalues"]

    @property
    def residuals(self) -> np.ndarray:
        """(k,) ‖Hv − λv‖₂ of each pair (NaN where not measured)."""
        return self.arrays["residuals"]

    @property
    def converged(self) -> np.ndarray:
        """(k,) bool: residual ≤ tol·‖H‖₂."""
        return self.arrays["converged"]

    @property
    def matvecs(self) -> int:
        """Eigensolver products (Hessian-vector products), all blocks together."""
        return int(self.arrays["matvecs"])

    @property
    def lambda_max(self) -> float:
        """The largest eigenvalue found."""
        return float(np.max(self.eigenvalues))

    @property
    def exit_code(self) -> int:
        """130 when interrupted (SIGINT; the pairs found so far), 4 when a wanted pair did not
        converge (the result is still written), else 0."""
        if self.meta.get("interrupted"):
            return 130
        return 0 if self.meta.get("converged", True) else 4

    def summary(self) -> dict:
        """The JSON-ready summary: eigenvalues, residuals, converged, products, per block rows."""
        meta, a = self.meta, self.arrays
        s = self._head("interrupted" if meta.get("interrupted") else ("ok" if meta.get("converged", True) else "not_converged"))
        targets = self._targets()
        multi = bool(meta.get("per_block")) or len(targets) > 1
        blocks = []
        if multi:
            for t in targets:
                p = f"blocks/{t['name']}/"
                blocks.append(dict(t, eigenvalues=a[p + "eigenvalues"], residuals=a[p + "residuals"],
                                   converged=a[p + "converged"], matvecs=int(a[p + "matvecs"])))
        s.update(which=meta.get("which"), top_k=meta.get("top_k"), tol=meta.get("tol"),
                 norm_estimate=meta.get("norm_estimate"), method=meta.get("method"), eigenvalues=a["eigenvalues"],
                 residuals=a["residuals"], converged=a["converged"], matvecs=int(a["matvecs"]), blocks=blocks,
                 notes=self.notes)
        if not multi and targets:
            s.update(restarts=targets[0].get("restarts"), block_size=targets[0].get("block_size"))
        return json_safe(s)


@dataclass
class TraceResult(Result):
    """``hesscli trace``: tr H, exact or estimated, with its standard error (0 when exact).

    Per block (``per_block``): each diagonal block's trace under ``blocks/<name>/`` — they add up to
    tr H. Estimators: Hutchinson (1989), Hutch++ (Meyer, Musco, Musco & Woodruff 2021), XTrace
    (Epperly, Tropp & Webber 2024)."""

    command: ClassVar[str] = "trace"

    @property
    def trace(self) -> float:
        """The trace estimate (or exact trace), float."""
        return float(self.arrays["trace"])

    @property
    def stderr(self) -> float:
        """Its standard error (0 when exact)."""
        return float(self.arrays["trace_stderr"])

    @property
    def matvecs(self) -> int:
        """Products used, all blocks together."""
        return int(self.arrays["matvecs"])

    def summary(self) -> dict:
        """The JSON-ready summary: trace ± stderr, method, products, per block rows."""
        meta, a = self.meta, self.arrays
        s = self._head()
        multi = bool(meta.get("per_block")) or len(self._targets()) > 1
        method = meta.get("method")
        s.update(trace=float(a["trace"]), stderr=float(a["trace_stderr"]), trace_stderr=float(a["trace_stderr"]),
                 method=method, method_requested=meta.get("method_requested"), matvecs=int(a["matvecs"]),
                 blocks=self._targets() if multi else [], notes=self.notes)
        if meta.get("method_requested") == "auto":
            chosen = method if isinstance(method, list) else [method]
            s["note"] = f"auto chose {', '.join(chosen)}"
        return json_safe(s)


@dataclass
class DensityResult(Result):
    """``hesscli density``: the eigenvalue density on a grid — :attr:`grid` (G,) eigenvalue units,
    :attr:`density` (G,) per eigenvalue unit, integrating to 1 — from stochastic Lanczos quadrature
    (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019) or a result file's exact eigenvalues,
    Gaussian-smoothed with width :attr:`sigma`."""

    command: ClassVar[str] = "density"

    @property
    def grid(self) -> np.ndarray:
        """(G,) eigenvalue grid."""
        return self.arrays["density_grid"]

    @property
    def density(self) -> np.ndarray:
        """(G,) density on the grid (integrates to 1)."""
        return self.arrays["density"]

    @property
    def sigma(self) -> float:
        """The Gaussian smoothing width, eigenvalue units."""
        return float(self.arrays["sigma"])

    def plot(self, path: str | os.PathLike, title: str | None = None, force: bool = False) -> Path:
        """Save a PNG of the density (log scale) to ``path`` (matplotlib, the ``plot`` extra);
        ``meta.plot`` records it. Refuses an existing ``path`` without ``force``."""
        from hesscli.algorithms.density import plot_density
        from hesscli.io.resultfile import check_output

        check_output(path, force)
        src = (self.meta.get("source") or {}).get("path") or "model"
        plot_density(str(path), self.grid, self.density, title=title or f"Hessian eigenvalue density ({Path(src).name})")
        self.meta["plot"] = str(path)
        return Path(path)

    def summary(self) -> dict:
        """The JSON-ready summary: method, λ range, σ, products, per block rows."""
        meta, a = self.meta, self.arrays
        s = self._head()
        targets = self._targets()
        multi = bool(meta.get("per_block")) or len(targets) > 1
        grid = a["density_grid"]
        lo = min((t["lambda_min"] for t in targets), default=float(grid[0])) if multi else (
            targets[0]["lambda_min"] if targets else float(grid[0]))
        hi = max((t["lambda_max"] for t in targets), default=float(grid[-1])) if multi else (
            targets[0]["lambda_max"] if targets else float(grid[-1]))
        s.update(method=meta.get("method"), runs=meta.get("runs"), steps=meta.get("steps"), sigma=float(a["sigma"]),
                 lambda_min=lo, lambda_max=hi, matvecs=int(a["matvecs"]), plot=meta.get("plot"),
                 blocks=targets if multi else [], notes=self.notes)
        return json_safe(s)


@dataclass
class InspectResult:
    """``hesscli inspect``: a model's parameters and blocks and what dense work would cost (bytes).
    It writes no file; :meth:`summary` is the ``--json`` object."""

    info: dict = field(default_factory=dict)
    command: ClassVar[str] = "inspect"

    @property
    def n_params(self) -> int:
        """P: the number of scalar parameters inspected."""
        return int(self.info["n_params"])

    @property
    def exit_code(self) -> int:
        """Always 0: inspect refuses by raising."""
        return 0

    def summary(self) -> dict:
        """The JSON-ready summary (what --json prints)."""
        return json_safe(self.info)


_TYPES: dict[str, type[Result]] = {
    "compute": ComputeResult,
    "merge": MergeResult,
    "spectrum": SpectrumResult,
    "trace": TraceResult,
    "density": DensityResult,
}


def register(command: str, cls: type) -> None:
    """Register the result type ``load`` returns for files whose ``meta.command`` is ``command``."""
    _TYPES[command] = cls


def load(path: str | os.PathLike) -> Result:
    """Read a result file back into its type (by ``meta.command``); arrays are read on access.

    Raises :class:`HesscliError` naming the file when it is not a hesscli result or its command is
    unknown."""
    rf = read_result(path)
    command = rf.meta.get("command")
    if command not in _TYPES and command == "track":
        import hesscli.tracking  # noqa: F401  (registers its type)
    cls = _TYPES.get(command)
    if cls is None:
        raise HesscliError(f"result file '{path}' was written by '{command}', which this hesscli cannot read back")
    return cls(rf, dict(rf.meta), out=str(path))

