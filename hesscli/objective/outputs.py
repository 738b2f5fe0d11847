"""What a model returns, read by SPEC.md's rules (Model files, Outputs).

A model may return a tensor, or a structured output: a dict, a tuple or list, a named tuple, a
dataclass, or a Hugging Face ``ModelOutput`` (an ordered dict whose ``None`` entries are absent).

- The **prediction** (what hesscli's losses are applied to) is the tensor itself; of a structured
  output, the ``logits`` entry, else the only tensor entry; ``--output-key NAME`` (or an integer
  index) chooses another. Anything ambiguous is an error that names the entries.
- With ``--loss model`` the model computes its own loss: a scalar tensor or a ``loss`` entry is the
  mean loss of the batch; a tuple of exactly two scalars is ``(sum, count)``; any other tuple's
  first element is the mean loss (Hugging Face's ``return_dict=False`` order).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from hesscli.errors import HesscliError

__all__ = ["entries", "prediction", "model_loss", "ModelLoss"]


def entries(out: Any) -> list[tuple[str, Any]] | None:
    """The (name, value) entries of a structured output, in order; None for anything else.

    Tuples and lists are named by position ("0", "1", ...), named tuples by field."""
    if isinstance(out, dict):  # ModelOutput is an OrderedDict
        return [(str(k), v) for k, v in out.items() if v is not None]
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return [(f, getattr(out, f)) for f in out._fields]
    if isinstance(out, (tuple, list)):
        return [(str(i), v) for i, v in enumerate(out)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out) if getattr(out, f.name) is not None]
    return None


def _describe(items: list[tuple[str, Any]]) -> str:
    def one(v):
        if isinstance(v, torch.Tensor):
            return f"tensor {tuple(v.shape)}"
        return type(v).__name__

    return ", ".join(f"{k} ({one(v)})" for k, v in items) or "none"


def prediction(out: Any, key: str | None = None) -> torch.Tensor:
    """The tensor hesscli's losses apply to (module docstring). Raises :class:`HesscliError`."""
    if isinstance(out, torch.Tensor) and key is None:
        return out
    items = entries(out)
    if items is None:
        if isinstance(out, torch.Tensor):
            raise HesscliError(f"--output-key '{key}': the model returns a single tensor, not a structured output")
        raise HesscliError(f"the model returns a {type(out).__name__}, not a tensor or a structured output")
    kind = type(out).__name__
    if key is not None:
        found = dict(items)
        if key not in found and key.lstrip("-").isdigit() and isinstance(out, (tuple, list)):
            i = int(key)
            found = {key: out[i]} if -len(out) <= i < len(out) else {}
        v = found.get(key)
        if v is None:
            raise HesscliError(f"--output-key '{key}': the model's {kind} output has no such entry; its entries: {_describe(items)}")
        if not isinstance(v, torch.Tensor):
            raise HesscliError(f"--output-key '{key}': entry is a {type(v).__name__}, not a tensor")
        return v
    named = dict(items)
    if isinstance(named.get("logits"), torch.Tensor):
        return named["logits"]
    tensors = [(k, v) for k, v in items if isinstance(v, torch.Tensor)]
    if len(tensors) == 1:
        return tensors[0][1]
    raise HesscliError(
        f"the model returns a {kind} with entries {_describe(items)}: no 'logits' entry and not exactly one "
        "tensor, so the prediction is ambiguous; name it with --output-key (or use --loss model if one of them is the loss)"
    )


@dataclasses.dataclass
class ModelLoss:
    """A model's own loss on one piece: ``total`` (the sum of its loss terms, a scalar tensor) and
    ``count`` (their number or total weight, a float); ``mean`` says whether the model returned a
    mean (then ``count`` is the piece's number of samples) rather than a ``(sum, count)`` pair."""

    total: torch.Tensor
    count: float
    mean: bool


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)


def model_loss(out: Any, n_samples: int, form: str | None = None) -> ModelLoss:
    """Read ``--loss model``'s output on a piece of ``n_samples`` samples (module docstring).

    ``form`` ("mean" or "pair"), when given, is how the first piece was read: every piece is read
    the same way (a ``(mean, prediction)`` tuple whose prediction has one element in a piece of one
    sample is not a ``(sum, count)`` pair), and a piece that does not fit it is an error."""
    if isinstance(out, torch.Tensor):
        if out.numel() != 1:
            raise HesscliError(f"--loss model: the model returned a tensor of shape {tuple(out.shape)}, not a scalar loss")
        return ModelLoss(out.reshape(()) * n_samples, float(n_samples), True)
    items = entries(out)
    if items is None:
        raise HesscliError(f"--loss model: the model returned a {type(out).__name__}, not a loss")
    named = dict(items)
    kind = type(out).__name__
    if "loss" in named or "loss" in _all_names(out):
        v = named.get("loss")
        if not isinstance(v, torch.Tensor) or v.numel() != 1:
            what = "no loss (None: were the targets passed?)" if v is None else f"a loss that is not a scalar ({_describe([('loss', v)])})"
            raise HesscliError(f"--loss model: the model's {kind} output holds {what}")
        return ModelLoss(v.reshape(()) * n_samples, float(n_samples), True)
    if isinstance(out, (tuple, list)) and not hasattr(out, "_fields"):
        if len(out) == 2 and all(_scalar(v) for v in out) and form != "mean":
            s, c = out
            s = s if isinstance(s, torch.Tensor) else torch.tensor(float(s))
            c = float(c.detach()) if isinstance(c, torch.Tensor) else float(c)
            return ModelLoss(s.reshape(()), c, False)
        if form == "pair":
            raise HesscliError(f"--loss model: the model returned a pair (sum, count) on the first piece but {_describe(items)} on this one")
        if out and isinstance(out[0], torch.Tensor) and out[0].numel() == 1:
            return ModelLoss(out[0].reshape(()) * n_samples, float(n_samples), True)
    raise HesscliError(
        f"--loss model: the model's {kind} output holds no loss (entries: {_describe(items)}); it must return a "
        "scalar mean loss, an output with a 'loss' entry, or a pair (sum, count)"
    )


def _all_names(out: Any) -> set[str]:
    """Entry names including those whose value is None (a ModelOutput or dataclass without a loss)."""
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return {f.name for f in dataclasses.fields(out)}
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return set(out._fields)
    if isinstance(out, dict):
        names = set(out.keys())
        fields = getattr(type(out), "__dataclass_fields__", None)  # ModelOutput subclasses are dataclasses
        return names | set(fields or ())
    return set()
