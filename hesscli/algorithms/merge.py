"""Merge ``compute`` results run separately on disjoint shards of the data into one result.

Shard i holds the Hessian H_i of its own loss over n_i loss terms. With the mean reduction the
Hessian on all the data weighs each by its loss terms,

    H = Σ_i n_i H_i / Σ_i n_i,

and with the sum reduction H = Σ_i H_i (SPEC.md, Loss: each piece contributes the sum of its loss
terms, the mean divides once by the total count). Block-mode results merge block by block. The
inputs must describe the same model, parameters, loss, reduction, dtype and mode, and hold their
dense matrices; eigenvalues, traces and the negative threshold are recomputed from the merged matrix.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from hesscli.errors import HesscliError, UsageError
from hesscli.io.resultfile import ResultFile, read_result
from hesscli.meta import build_meta

__all__ = ["merge_results"]

_INDEX_KEYS = ("param_names", "param_offsets", "block_names", "block_offsets")


def _refuse(a: ResultFile, b: ResultFile, what: str, va, vb) -> HesscliError:
    return HesscliError(f"cannot merge '{a.path}' and '{b.path}': different {what} ({va} vs {vb})")


def _prefixes(f: ResultFile) -> list[str]:
    """Where each dense matrix of a result lives: ``hessian`` (full), ``blocks/<b>/hessian`` (block)."""
    return [""] if f.meta.get("mode") == "full" else [f"blocks/{b}/" for b in f.block_names]


def _check_compatible(files: list[ResultFile]) -> None:
    """Refuse inputs that are not Hessians of the same function on different data."""
    for f in files:
        cmd = f.meta.get("command")
        if cmd not in ("compute", "merge"):
            raise HesscliError(f"cannot merge '{f.path}': it was written by '{cmd}', not by 'compute'")
        if not all(p + "hessian" in f for p in _prefixes(f)):
            raise HesscliError(
                f"cannot merge '{f.path}': it holds no dense matrices (computed with --no-dense); "
                "rerun compute without --no-dense on that shard"
            )
    first = files[0]
    m0 = first.meta
    for f in files[1:]:
        m = f.meta
        sha0, sha = (m0.get("model") or {}).get("sha256"), (m.get("model") or {}).get("sha256")
        if sha0 != sha:
            raise _refuse(first, f, "models (sha256)", str(sha0)[:12], str(sha)[:12])
        p0 = [(p["name"], list(p["shape"])) for p in m0.get("params", [])]
        p1 = [(p["name"], list(p["shape"])) for p in m.get("params", [])]
        if p0 != p1:
            diff = next(
                (f"{a} vs {b}" for a, b in zip(p0, p1, strict=False) if a != b), f"{len(p0)} vs {len(p1)} tensors"
            )
            raise HesscliError(
                f"cannot merge '{first.path}' and '{f.path}': different parameters ({diff}); check --params"
            )
        for key, what in (("loss", "losses"), ("reduction", "reductions"), ("dtype", "dtypes"), ("mode", "modes")):
            if m0.get(key) != m.get(key):
                raise _refuse(first, f, what, m0.get(key), m.get(key))
        for key in _INDEX_KEYS:
            if not np.array_equal(first[key], f[key]):
                raise _refuse(first, f, "blocks (--blocks)", m0.get("blocks"), m.get("blocks"))
    seen: dict[str, Path] = {}
    for f in files:
        for d in f.meta.get("data", []):
            sha = d.get("sha256")
            if sha in seen:
                raise HesscliError(
                    f"cannot merge: '{seen[sha]}' and '{f.path}' both include the data file '{d.get('path')}' "
                    f"(sha256 {str(sha)[:12]}); its samples would count twice"
                )
            seen[sha] = f.path


def _weights(files: list[ResultFile]) -> tuple[list[float], int, int]:
    """The weight of each input, the total loss terms and samples."""
    terms, samples = [], 0
    for f in files:
        n = f.meta.get("n_loss_terms")
        if not isinstance(n, (int, float)) or n <= 0:
            raise HesscliError(f"cannot merge '{f.path}': its meta has no count of loss terms (n_loss_terms)")
        terms.append(int(n))
        samples += int(f.meta.get("n_samples") or 0)
    total = sum(terms)
    if files[0].meta.get("reduction") == "sum":
        return [1.0] * len(files), total, samples
    return [n / total for n in terms], total, samples


def merge_results(paths: list[str | os.PathLike]) -> tuple[dict, dict]:
    """One result from ``compute`` results on disjoint data: its arrays and ``meta`` (SPEC.md).

    Raises :class:`UsageError` for fewer than two files or a file given twice,
    :class:`HesscliError` naming both files when they differ in what must match."""
    t0 = time.perf_counter()
    if len(paths) < 2:
        raise UsageError("merge needs at least two result files")
    if len({os.path.realpath(p) for p in paths}) < len(paths):
        raise UsageError("merge: the same result file is given twice; its data would count twice")
    files = [read_result(p) for p in paths]
    _check_compatible(files)
    w, n_terms, n_samples = _weights(files)
    m0 = files[0].meta
    full = m0.get("mode") == "full"
    prefixes = _prefixes(files[0])
    eigvecs = all((p + "eigenvectors") in f for f in files for p in prefixes)
    dtype = np.dtype(m0.get("dtype", "float32"))
    eps = float(np.finfo(dtype).eps)

    arrays: dict[str, np.ndarray] = {k: files[0][k] for k in _INDEX_KEYS}
    traces, norm2, P = [], 0.0, int(files[0]["param_offsets"][-1])
    eigenvalues = {}
    for prefix in prefixes:
        H = np.zeros_like(files[0][prefix + "hessian"], dtype=np.float64)
        for f, wi in zip(files, w, strict=True):
            H += wi * f[prefix + "hessian"].astype(np.float64)
        H = H.astype(dtype)  # stored as one run would store it; the spectrum is that of the stored matrix
        H64 = torch.from_numpy(H.astype(np.float64))
        if eigvecs:
            ev, V = torch.linalg.eigh(H64)
            arrays[prefix + "eigenvectors"] = V.numpy()
        else:
            ev = torch.linalg.eigvalsh(H64)
        ev = ev.numpy()
        tr = float(np.trace(H64.numpy()))
        arrays[prefix + "hessian"] = H
        arrays[prefix + "eigenvalues"] = ev
        if not full:
            arrays[prefix + "trace"] = np.float64(tr)
        traces.append(tr)
        eigenvalues[prefix] = ev
        if ev.size:
            norm2 = max(norm2, float(np.abs(ev).max()))
    arrays["trace"] = np.float64(sum(traces))
    loss_values = [f.meta.get("loss_value") for f in files]
    loss_value = None
    if all(isinstance(v, (int, float)) for v in loss_values):
        loss_value = float(sum(wi * v for wi, v in zip(w, loss_values, strict=True)))
    unused = set(m0.get("unused_params") or [])
    notes: list[str] = []
    for f in files:
        unused &= set(f.meta.get("unused_params") or [])
        notes += [n for n in f.meta.get("notes", []) if n not in notes]
    inherited = {
        k: m0.get(k)
        for k in (
            "model",
            "loss",
            "reduction",
            "params",
            "params_regex",
            "dtype",
            "mode",
            "blocks",
            "approximation",
            "symmetric",
        )
    }
    meta = build_meta(
        "merge",
        **inherited,
        data=[d for f in files for d in f.meta.get("data", [])],
        n_samples=n_samples,
        n_loss_terms=n_terms,
        loss_value=loss_value,
        device=m0.get("device"),
        seed=m0.get("seed"),
        world_size=1,
        max_memory=m0.get("max_memory"),
        chunk_size=m0.get("chunk_size"),
        hvps=int(sum(int(f.meta.get("hvps") or 0) for f in files)),
        asymmetry=max(float(f.meta.get("asymmetry") or 0.0) for f in files),
        symmetry_probe=max(float(f.meta.get("symmetry_probe") or 0.0) for f in files),
        negative_threshold=norm2 * math.sqrt(P) * eps,
        notes=notes,
        unused_params=sorted(unused, key=[p["name"] for p in m0.get("params", [])].index),
        seconds=time.perf_counter() - t0,
        inputs=[
            {
                "path": str(f.path),
                "n_samples": f.meta.get("n_samples"),
                "n_loss_terms": f.meta.get("n_loss_terms"),
                "weight": wi,
                "created": f.meta.get("created"),
                "seconds": f.meta.get("seconds"),
            }
            for f, wi in zip(files, w, strict=True)
        ],
    )
    for f in files:
        f.close()
    return arrays, meta
