"""Small, deterministic PyTorch architectures used by the hesscli sample checkpoints.

Only ``torch`` is imported here so that this file can be loaded on its own by
path (the ``hesscli.arch`` metadata of the ``.safetensors`` samples points at
``archs.py:CLASSNAME``). Every class is built with keyword arguments only, all
of which have defaults; none of them uses dropout or batch statistics, so
``train()`` and ``eval()`` compute the same function.
"""

import torch
from torch import nn

__all__ = ["DiabetesMLP", "DigitsCNN", "DigitsMLP"]


class DigitsMLP(nn.Module):
    """MLP for sklearn digits: (N, 64) float -> (N, 10) logits.

    Linear(64, hidden) -> Tanh -> Linear(hidden, hidden) -> Tanh -> Linear(hidden, 10).
    With hidden=32 it has 3,466 parameters.
    """

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.fc1(x))
        x = torch.tanh(self.fc2(x))
        return self.fc3(x)


class DigitsCNN(nn.Module):
    """Tiny CNN for sklearn digits: (N, 1, 8, 8) float -> (N, 10) logits.

    Conv2d(1, 4, 3) -> Tanh            # (N, 4, 6, 6)
    Conv2d(4, 8, 3, stride=2) -> Tanh  # (N, 8, 2, 2)
    flatten -> Linear(32, 10)
    666 parameters.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        x = torch.flatten(x, 1)
        return self.fc(x)


class DiabetesMLP(nn.Module):
    """Regressor for sklearn diabetes: (N, 10) float -> (N, 1) float.

    Linear(10, hidden) -> LayerNorm(hidden) -> Tanh -> Linear(hidden, 1).
    With hidden=16 it has 225 parameters.
    """

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(10, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.norm(self.fc1(x)))
        return self.fc2(x)
