"""Losses as sums of loss terms, with the count that a mean divides by (SPEC.md, Loss).

Every piece of data contributes the **sum** of its loss terms; with ``--reduction mean`` the total
is divided once by ``n_loss_terms`` (elements for mse and bce_with_logits, non-ignored targets for
cross_entropy and nll), which is PyTorch's mean over the whole data set however it is split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hesscli.errors import HesscliError, UsageError

__all__ = ["Loss", "LOSSES", "resolve_loss", "causal_lm_loss", "IGNORE_INDEX"]

LOSSES = ("auto", "cross_entropy", "mse", "nll", "bce_with_logits", "model")
IGNORE_INDEX = -100


def _shape(t) -> str:
    return str(tuple(t.shape))


@dataclass(frozen=True)
class Loss:
    """A resolved loss: its name, reduction and, for classification, where the class dimension is."""

    name: str
    reduction: str = "mean"
    class_dim: str = "second"  # "second" (N, C, ...) or "last" (..., C), for cross_entropy and nll
    shift: int = 0  # 1: next-token prediction, outputs[:, :-1] against targets[:, 1:] (causal LM)
    reshape_targets: bool = False  # targets (N,) against outputs (N, 1): a one-label regression head

    def _shifted(self, outputs, targets):
        if self.reshape_targets and targets.numel() == outputs.numel():
            targets = targets.reshape(outputs.shape)
        if self.shift:
            return outputs[:, : -self.shift], targets[:, self.shift :]
        return outputs, targets

    def count(self, outputs_shape: torch.Size, targets: torch.Tensor) -> int:
        """The number of loss terms this piece contributes (targets only; no model call)."""
        if self.shift:
            targets = targets[:, self.shift :]
        if self.name in ("cross_entropy", "nll"):
            return int((targets != IGNORE_INDEX).sum())
        if self.name in ("mse", "bce_with_logits"):
            return int(targets.numel())
        raise AssertionError(self.name)

    def total(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The sum of this piece's loss terms."""
        outputs, targets = self._shifted(outputs, targets)
        if self.name in ("cross_entropy", "nll"):
            fn = F.cross_entropy if self.name == "cross_entropy" else F.nll_loss
            if self.class_dim == "last" and outputs.dim() > 2:
                outputs = outputs.reshape(-1, outputs.shape[-1])
                targets = targets.reshape(-1)
            return fn(outputs, targets, reduction="sum", ignore_index=IGNORE_INDEX)
        if self.name == "mse":
            d = outputs - targets
            return (d * d).sum()
        if self.name == "bce_with_logits":
            return F.binary_cross_entropy_with_logits(outputs, targets, reduction="sum")
        raise AssertionError(self.name)


def _classification(name: str, outputs, targets, loss_flag: str) -> Loss:
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise HesscliError(
            f"{loss_flag} needs integer class targets; found {targets.dtype} targets {_shape(targets)}"
        )
    if outputs.dim() >= 1 and tuple(outputs.shape[:-1]) == tuple(targets.shape):
        class_dim, n_classes = "last", outputs.shape[-1]
    elif outputs.dim() >= 2 and outputs.shape[0] == targets.shape[0] and tuple(outputs.shape[2:]) == tuple(targets.shape[1:]):
        class_dim, n_classes = "second", outputs.shape[1]
    else:
        raise HesscliError(
            f"{loss_flag} does not fit outputs {_shape(outputs)} and targets {_shape(targets)}: expected "
            "outputs (..., C) with targets (...), or outputs (N, C, ...) with targets (N, ...)"
        )
    valid = targets[targets != IGNORE_INDEX]
    if valid.numel():
        lo, hi = int(valid.min()), int(valid.max())
        if lo < 0 or hi >= n_classes:
            bad = lo if lo < 0 else hi
            raise HesscliError(
                f"class index {bad} in the targets is out of range for {n_classes} classes "
                f"(outputs {_shape(outputs)}; {IGNORE_INDEX} marks ignored targets)"
            )
    return Loss(name, class_dim=class_dim)


def causal_lm_loss(reduction: str, outputs: torch.Tensor, targets: torch.Tensor) -> Loss:
    """Next-token cross-entropy of a causal language model (SPEC.md, Loss: ``*ForCausalLM``):
    logits (N, L, V) at positions 0..L-2 against labels (N, L) at 1..L-1, -100 ignored; the loss
    terms are the predicted tokens."""
    if outputs.dim() != 3 or targets.dim() != 2 or tuple(outputs.shape[:2]) != tuple(targets.shape):
        raise HesscliError(
            f"a causal language model needs logits (N, L, V) and labels (N, L); found outputs {_shape(outputs)}, labels {_shape(targets)}"
        )
    _classification("cross_entropy", outputs[:, :-1], targets[:, 1:], "the causal-LM loss")
    return Loss("cross_entropy", reduction, "last", shift=1)


def resolve_loss(name: str, reduction: str, outputs: torch.Tensor, targets: torch.Tensor) -> Loss:
    """Check ``name`` against one piece's outputs and targets; ``auto`` picks by SPEC.md's rules."""
    if name not in LOSSES:
        raise UsageError(f"unknown --loss '{name}'; choose one of {', '.join(LOSSES)}")
    if reduction not in ("mean", "sum"):
        raise UsageError(f"unknown --reduction '{reduction}'; choose mean or sum")
    if name == "model":
        return Loss("model", reduction)
    if not isinstance(outputs, torch.Tensor):
        raise HesscliError(
            f"the model returns a {type(outputs).__name__}, not a tensor; use --loss model for a model that computes its own loss"
        )
    if name == "auto":
        if not targets.is_floating_point() and targets.dtype != torch.bool:
            loss = _classification("cross_entropy", outputs, targets, "--loss auto (cross_entropy for integer targets)")
        elif tuple(targets.shape) == tuple(outputs.shape):
            loss = Loss("mse")
        else:
            raise HesscliError(
                f"--loss auto cannot pair outputs {_shape(outputs)} with {str(targets.dtype).replace('torch.', '')} targets {_shape(targets)}: "
                "mse needs exactly the outputs' shape (no broadcasting); reshape the targets or pass --loss"
            )
        return Loss(loss.name, reduction, loss.class_dim)
    if name in ("cross_entropy", "nll"):
        loss = _classification(name, outputs, targets, f"--loss {name}")
        return Loss(name, reduction, loss.class_dim)
    # mse, bce_with_logits
    if not targets.is_floating_point():
        raise HesscliError(f"--loss {name} needs floating targets; found {targets.dtype} targets {_shape(targets)}")
    if tuple(targets.shape) != tuple(outputs.shape):
        raise HesscliError(
            f"--loss {name} needs targets of the outputs' shape: outputs {_shape(outputs)}, targets {_shape(targets)}"
        )
    if name == "bce_with_logits" and ((targets < 0) | (targets > 1)).any():
        raise HesscliError("--loss bce_with_logits needs targets in [0, 1]")
    return Loss(name, reduction)
