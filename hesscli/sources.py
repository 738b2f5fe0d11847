"""What ``spectrum``, ``trace`` and ``density`` answer for: a model (matrix-free, Hessian-vector
products) or a ``compute`` result file (the stored matrices and eigenvalues).

A source resolves to one or more named symmetric operators (:class:`Target`): the whole Hessian,
or with ``per_block`` (and always for a block-mode result file) one diagonal block per module (or
per layer, or tensor). Per-block answers describe the block-diagonal part of H, not H: their
``meta`` says ``"approximation": "block-diagonal"``.

A result file's stored eigenvalues are answers, not work to redo: targets carry them
(``Target.eigenvalues``) and read the matrix (``Target.operator()``) only when it is needed.
"""

from __future__ import annotations

import functools
import math
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hesscli.algorithms.operators import DenseOperator, HessianOperator, SymOperator
from hesscli.errors import HesscliError
from hesscli.io.resultfile import read_result
from hesscli.meta import build_meta
from hesscli.objective.core import asymmetry_tolerance, param_blocks
from hesscli.session import Session

__all__ = ["BLOCK_DIAGONAL", "Target", "Source", "is_result_file", "result_source", "model_source"]

BLOCK_DIAGONAL = "block-diagonal"


@dataclass
class Target:
    """One operator to answer for: the whole Hessian or one diagonal block (columns start:stop).

    A model's target has its operator ``op``; a result file's target reads its arrays on first use:
    ``matrix()`` (the stored Hessian, or None) and ``vectors()`` (the stored eigenvectors, or None)."""

    name: str
    start: int
    stop: int
    op: SymOperator | None = None
    eigenvalues: np.ndarray | None = None  # stored (ascending)
    trace: float | None = None  # stored
    matrix: Callable[[], np.ndarray | None] | None = None  # reads the stored matrix (None: not stored)
    vectors: Callable[[], np.ndarray | None] | None = None  # reads the stored eigenvectors (columns)

    @property
    def size(self) -> int:
        """Columns in the target (n)."""
        return self.stop - self.start

    def operator(self) -> SymOperator | None:
        """The operator, a stored matrix read (and wrapped) on first use; None when there is none."""
        if self.op is None and self.matrix is not None:
            H = self.matrix()
            self.matrix = None
            self.op = DenseOperator(H) if H is not None else None
        return self.op


@dataclass
class Source:
    """A resolved source: its targets, the ``meta`` its answers inherit, and the parameter index."""

    kind: str  # model | result
    path: str
    targets: list[Target]
    meta: dict
    per_block: bool
    index: dict = field(default_factory=dict)  # param_names / param_offsets
    seconds: float = 0.0
    session: Session | None = None  # a model source's open model
    plan: object | None = None  # a model source's memory plan (hesscli.algorithms.mfplan.MatrixFreePlan)

    @property
    def approximation(self) -> str | None:
        """'block-diagonal' for per-block answers (they describe H's diagonal blocks, not H), else None."""
        return BLOCK_DIAGONAL if self.per_block else None

    hvps_start: int = 0  # the model's product count when this call began

    @property
    def hvps(self) -> int:
        """Hessian-vector products computed for this call, the symmetry probe included (0 for a
        result file)."""
        return int(self.session.objective.hvps) - self.hvps_start if self.session is not None else 0

    def block_index(self) -> dict:
        """SPEC's index arrays: parameters, and the targets as blocks."""
        arrays = dict(self.index)
        arrays["block_names"] = np.array([t.name for t in self.targets], dtype=str)
        arrays["block_offsets"] = np.array([t.start for t in self.targets] + [self.targets[-1].stop], dtype=np.int64)
        return arrays


def is_result_file(path: str) -> bool:
    """Whether ``path`` is a hesscli result file (a zip holding ``meta.npy``), not a model."""
    try:
        with zipfile.ZipFile(path) as z:
            return "meta.npy" in z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _reader(rf, key: str) -> Callable[[], np.ndarray | None] | None:
    """A function that reads ``key`` from the result file when called (None when it is not stored)."""
    return (lambda: rf[key]) if key in rf else None


def result_source(path: str, per_block: bool, command: str, blocks: str = "module") -> Source:
    """A ``compute`` result file as a source (full mode: the whole H, or its diagonal blocks with
    ``per_block``; block mode: always its blocks). Raises :class:`HesscliError` for other results."""
    t0 = time.perf_counter()
    rf = read_result(path)
    meta = dict(rf.meta)
    mode = meta.get("mode")
    index = {k: rf[k] for k in ("param_names", "param_offsets") if k in rf}
    targets: list[Target] = []
    if mode == "full":
        if per_block:
            names = [str(s) for s in rf["param_names"]]
            offs = [int(o) for o in rf["param_offsets"]]
            full = functools.cache(_reader(rf, "hessian")) if "hessian" in rf else None  # read once for every block
            for b in param_blocks(names, offs, blocks):
                sub = (lambda b=b: full()[b.start : b.stop, b.start : b.stop]) if full is not None else None
                targets.append(Target(b.name, b.start, b.stop, matrix=sub))
        else:
            P = int(rf["param_offsets"][-1]) if "param_offsets" in rf else len(rf["eigenvalues"])
            targets.append(Target("all", 0, P, None, rf.get("eigenvalues"), float(rf["trace"]) if "trace" in rf else None,
                                  matrix=_reader(rf, "hessian"), vectors=_reader(rf, "eigenvectors")))
    elif mode == "block":
        offs = [int(o) for o in rf["block_offsets"]]
        for i, name in enumerate(rf.block_names):
            p = f"blocks/{name}/"
            tr = rf.get(p + "trace")
            targets.append(Target(name, offs[i], offs[i + 1], None, rf.get(p + "eigenvalues"),
                                  float(tr) if tr is not None else None,
                                  matrix=_reader(rf, p + "hessian"), vectors=_reader(rf, p + "eigenvectors")))
        per_block = True
    else:
        raise HesscliError(f"'{path}' is a '{meta.get('command')}' result; {command} reads compute results (full or block mode)")
    meta = build_meta(command, inherited=meta, source={"kind": "result", "path": str(path), "mode": mode})
    return Source("result", str(path), targets, meta, per_block, index, time.perf_counter() - t0)


def model_source(session: Session, per_block: bool, command: str, blocks: str = "module", comm=None,
                 plan=None) -> Source:
    """An open model as a source: probe the symmetry of its products (one-line
    :class:`HesscliError` when they are not symmetric or not finite), then one Hessian operator for
    the whole H, or per diagonal block with ``per_block``. ``plan``: the memory plan made before
    (recorded in ``meta.memory_plan``)."""
    t0 = time.perf_counter()
    obj = session.objective
    h0 = obj.hvps
    if session.probe is None:  # once per session: a reused session was checked by its first call
        # 16 parameter groups (32 products) localise a wrong derivative finely; above 5M parameters, where
        # a product takes seconds, 4 groups (8 products) still catch one, less finely
        groups = 16 if obj.P <= 5_000_000 else 4
        probe, where = obj.symmetry_probe(session.spec.seed, max_groups=groups, chunk=plan.probe_chunk if plan is not None else 8)
        session.probe = (probe, where, obj.hvps - h0)
    probe, where, _ = session.probe
    tol = asymmetry_tolerance(obj.dtype)
    if not math.isfinite(probe):
        raise HesscliError(
            f"the Hessian-vector products contain NaN or Inf (largest trouble between parameters {where}); "
            "check the weights, the inputs and the loss"
        )
    if probe > tol:
        raise HesscliError(
            f"the Hessian-vector products are not symmetric: relative asymmetry {probe:.2e} > {tol:.0e}, largest "
            f"between parameters {where}; some op in the model has a wrong second derivative in torch"
        )
    extra = {"memory_plan": plan.describe(), **obj.graph_plan} if plan is not None else {}
    meta = build_meta(command, session=session, source={"kind": "model", "path": session.model.path},
                      symmetry_probe=probe, symmetry_probe_at=where, symmetry_probe_hvps=obj.hvps - h0,
                      symmetry_probe_checked_by=("this call" if obj.hvps > h0 else "an earlier call of the session"),
                      mode="matrix-free", **extra)
    targets = [Target(b.name, b.start, b.stop, HessianOperator(obj, b if per_block else None))
               for b in obj.blocks(blocks if per_block else "all")]
    if comm is not None:  # every rank must cut its products into the same chunks (one collective each)
        for t in targets:
            t.op.chunk = int(comm.minimum(t.op.chunk))
    index = {"param_names": np.array(obj.names, dtype=str), "param_offsets": np.array(obj.offsets, dtype=np.int64)}
    return Source("model", session.model.path, targets, meta, per_block, index, time.perf_counter() - t0 + session.setup_seconds,
                  session=session, plan=plan, hvps_start=h0)


def missing(path: str | Path) -> HesscliError:
    return HesscliError(f"SOURCE '{path}' does not exist")
