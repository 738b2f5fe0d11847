"""Device and dtype choice, and the numerical settings second-order work needs."""

from __future__ import annotations

import contextlib
import functools

import torch

from hesscli.errors import HesscliError, UsageError

__all__ = ["resolve_device", "resolve_dtype", "no_tf32", "tf32_off"]


def resolve_device(spec: str | None) -> torch.device:
    """The torch.device for --device (auto: CUDA when available, else CPU); UsageError for an unknown or missing device."""
    spec = (spec or "auto").strip()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        try:
            dev = torch.device(spec)
        except RuntimeError:
            raise UsageError(f"--device '{spec}' is not a device; use auto, cpu, cuda or cuda:N") from None
        if not torch.cuda.is_available():
            raise HesscliError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        idx = dev.index or 0
        if idx >= torch.cuda.device_count():
            raise HesscliError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", idx)
    raise UsageError(f"--device '{spec}' is not a device; use auto, cpu, cuda or cuda:N")


def resolve_dtype(spec: str | None, param_dtypes: list[torch.dtype]) -> torch.dtype:
    """``--dtype``, else the parameters' dtype raised to at least float32."""
    if spec in (None, "", "auto"):
        if any(d == torch.float64 for d in param_dtypes):
            return torch.float64
        return torch.float32
    table = {"float32": torch.float32, "float64": torch.float64}
    if spec not in table:
        raise UsageError(f"--dtype '{spec}': choose float32 or float64")
    return table[spec]


def tf32_off(fn):
    """Decorator: ``fn`` runs inside :func:`no_tf32`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with no_tf32():
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def no_tf32():
    """TF32 loses about three digits of a float32 Hessian on CUDA: off inside this context (every
    evaluation and product of :class:`~hesscli.objective.core.Objective`), and the caller's settings
    restored on exit."""
    if not torch.cuda.is_available():
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
