"""Architectures that hesscli must refuse or handle with care, for the refusal tests.

Loaded by path through ``--arch tests/bad_models.py:NAME`` (only ``torch`` is imported here), with
weights written by :func:`save_state` into a test's temporary directory. Every model maps (N, 3)
float inputs to (N, 2) outputs unless its docstring says otherwise.
"""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Tiny",
    "BakedDropout",
    "TrainDropout",
    "BatchStats",
    "BatchCentering",
    "Raises",
    "Unused",
    "Overflow",
    "NaNLoss",
    "KinkedNorm",
    "Regressor",
    "save_state",
]


class Tiny(nn.Module):
    """A well-behaved model: Linear(3, 4) -> tanh -> Linear(4, 2). 26 parameters."""

    def __init__(self, width: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(width, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class BakedDropout(Tiny):
    """Dropout that stays on in eval mode (``training=True`` hard-coded, as tracing in train mode
    bakes it in): two identical calls give different outputs."""

    def forward(self, x):
        return self.fc2(F.dropout(torch.tanh(self.fc1(x)), p=0.5, training=True))


class TrainDropout(Tiny):
    """An ordinary ``nn.Dropout``: harmless in eval mode, random once traced in train mode."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


class BatchStats(Tiny):
    """BatchNorm without running statistics: a sample's output depends on the rest of the batch."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4, track_running_stats=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


class BatchCentering(Tiny):
    """Hidden features centred over the batch (batch statistics written by hand): a sample's
    output depends on the rest of the batch, and a batch of one still runs."""

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.tanh(h - h.mean(0, keepdim=True)))


class Raises(Tiny):
    """A forward that raises."""

    def forward(self, x):
        raise RuntimeError("this model refuses to run (bad_models.Raises)")


class Unused(Tiny):
    """``extra`` is a parameter the loss never sees: its Hessian rows and columns are zero."""

    def __init__(self):
        super().__init__()
        self.extra = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class Overflow(Tiny):
    """Finite weights and inputs, infinite loss: outputs of about 1e30 overflow mse in float32."""

    def forward(self, x):
        return super().forward(x) * 1e30


class NaNLoss(Tiny):
    """Finite weights and inputs, NaN outputs for samples whose first feature is negative (a square
    root of it is added to the logits)."""

    def forward(self, x):
        return super().forward(x) + torch.sqrt(x[:, :1])


class KinkedNorm(Tiny):
    """|h| written as sqrt(h²), with one hidden unit whose weights are zero: the loss is finite,
    but its derivatives through that unit are 0/0 = NaN (so is the Hessian)."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.fc1.weight[0].zero_()
            self.fc1.bias[0] = 0.0

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.sqrt(h * h))


class Regressor(Tiny):
    """(N, 3) -> (N, 1): one output per sample, for the (N, 1) against (N,) broadcast case."""

    def __init__(self):
        super().__init__()
        self.fc2 = nn.Linear(4, 1)


def save_state(module: nn.Module, path) -> None:
    """Write ``module``'s state_dict with ``torch.save`` (what ``--arch`` loads)."""
    torch.save(module.state_dict(), path)
