"""Memory budgets: parse sizes, find what the process may use, format bytes."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from hesscli.errors import UsageError

__all__ = ["parse_size", "default_budget", "fmt_bytes", "available_memory", "keep_freed_memory"]

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``4GB``, ``512MiB``, ``1e9`` → bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"--max-memory '{text}' is not a size (e.g. 4GB, 512MiB)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise UsageError(f"--max-memory '{text}' must be positive")
    return int(value)


def _cgroup_limit() -> int | None:
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(p).read_text().strip()
        except OSError:
            continue
        if text and text != "max":
            try:
                v = int(text)
            except ValueError:
                continue
            if 0 < v < 1 << 60:
                return v
    return None


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def available_memory(device: torch.device) -> int:
    """What the process may use: the device's total on CUDA, else the cgroup limit or physical RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    lim = _cgroup_limit()
    phys = physical_memory()
    return min(lim, phys) if lim else phys


def default_budget(device: torch.device) -> int:
    """Half of :func:`available_memory` (SPEC.md, ``--max-memory``)."""
    return available_memory(device) // 2


def fmt_bytes(n: float) -> str:
    """Bytes in decimal units with two decimals (``20.00 MB``), by :func:`rich.filesize.decimal`."""
    from rich.filesize import decimal

    return decimal(int(n), precision=2)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Let glibc's allocator reuse freed blocks up to 32 MiB instead of returning them to the kernel.

    By default glibc serves blocks over 128 KiB with fresh ``mmap`` pages (raising that threshold
    only as blocks are freed) and unmaps them on free, so a batched product's (N, k, h)
    temporaries are page-faulted and zeroed by the kernel anew on every product. This fixes the
    threshold at 32 MiB (glibc's own ceiling for it) and the trim threshold at 2 GiB: smaller
    blocks are reused from the heap, larger ones (dense matrices) still get their own pages and go
    back on free. Measured (bench/RESULTS.md): the digits MLP's dense Hessian 10–20% faster, peak
    memory unchanged; a 1 GiB threshold was faster still for hesscli but fragmented the heap of
    ``torch.func.hessian`` from 5.2 to 12.9 GB. The CLI calls this at start-up; a library user
    may. Returns whether it took effect (glibc only; a no-op elsewhere).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1 and ok  # an int: 2 GiB
    return ok
