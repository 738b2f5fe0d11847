"""Small architectures for tests, loaded by hesscli with ``--arch tests/models.py:NAME`` and by the
reference (``tests/reference.py``) by path. Only ``torch`` is imported."""

import torch
from torch import nn

__all__ = ["Linear", "InstanceNorm1dNet", "InstanceNorm2dNet", "TinyMLP", "ChainMLP", "HandAffine", "ResidualMLP", "SharedMLP",
           "SigmoidHead", "randomize_", "save_state_dict", "save_shard"]


class Linear(nn.Module):
    """One ``nn.Linear(d_in, d_out)``: least squares (mse) and softmax regression (cross_entropy)."""

    def __init__(self, d_in: int = 10, d_out: int = 3, bias: bool = True):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x):
        return self.lin(x)


class InstanceNorm1dNet(nn.Module):
    """(N, d_in) → Linear → (N, C, L) → affine InstanceNorm1d(C) → tanh → flatten → Linear(C·L, d_out)."""

    def __init__(self, d_in: int = 10, channels: int = 3, length: int = 4, d_out: int = 1):
        super().__init__()
        self.channels, self.length = channels, length
        self.fc1 = nn.Linear(d_in, channels * length)
        self.norm = nn.InstanceNorm1d(channels, affine=True)
        self.fc2 = nn.Linear(channels * length, d_out)

    def forward(self, x):
        h = self.fc1(x).reshape(x.shape[0], self.channels, self.length)
        h = torch.tanh(self.norm(h))
        return self.fc2(h.flatten(1))


class InstanceNorm2dNet(nn.Module):
    """(N, 1, 8, 8) → Conv2d(1, C, 3, stride 2) → (N, C, 3, 3) → affine InstanceNorm2d(C) → tanh →
    flatten → Linear(9C, n_classes)."""

    def __init__(self, channels: int = 2, n_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, stride=2)
        self.norm = nn.InstanceNorm2d(channels, affine=True)
        self.fc = nn.Linear(9 * channels, n_classes)

    def forward(self, x):
        return self.fc(torch.tanh(self.norm(self.conv(x))).flatten(1))


class TinyMLP(nn.Module):
    """Linear(d_in, hidden) → tanh → Linear(hidden, d_out)."""

    def __init__(self, d_in: int = 64, hidden: int = 8, d_out: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def randomize_(model: nn.Module, seed: int = 0, scale: float = 0.5) -> nn.Module:
    """Deterministic non-trivial weights (norm weights away from 1, biases away from 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            shift = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(shift + scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def save_state_dict(model: nn.Module, path) -> None:
    torch.save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, path)


def save_shard(path, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    torch.save({"inputs": inputs.contiguous(), "targets": targets.contiguous()}, path)


_ACTS = {
    "tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "gelu": torch.nn.functional.gelu,
    "softplus": torch.nn.functional.softplus, "silu": torch.nn.functional.silu, "none": lambda h: h,
    "relu_": torch.relu_, "leaky_relu": lambda h: torch.nn.functional.leaky_relu(h, 0.1, inplace=True),
}


class ChainMLP(nn.Module):
    """widths[0] → … → widths[-1] through nn.Linear, the activation ``act`` between layers (a
    functional call, as most MLPs write it); ``squeeze`` returns (N,) when the last width is 1."""

    def __init__(self, widths=(12, 7, 5, 3), act: str = "tanh", bias: bool = True, squeeze: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths[:-1], widths[1:]))
        self.act, self.squeeze = act, squeeze

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = _ACTS[self.act](x)
        return x.reshape(-1) if self.squeeze else x


class HandAffine(nn.Module):
    """Images (N, 1, 8, 8) flattened, then affine maps written by hand (``x @ w.t() + b``) with
    a scaled activation ``2 * tanh`` between them: the same chain, other ATen ops."""

    def __init__(self, hidden: int = 6, n_classes: int = 4):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(hidden, 64) * 0.1)
        self.b1 = nn.Parameter(torch.zeros(hidden))
        self.w2 = nn.Parameter(torch.randn(n_classes, hidden) * 0.1)

    def forward(self, x):
        h = x.flatten(1) @ self.w1.t() + self.b1
        return (2.0 * torch.tanh(h)) @ self.w2.t()


class ResidualMLP(nn.Module):
    """x → Linear → tanh → + skip → Linear: not a chain (the skip reads an earlier value)."""

    def __init__(self, d: int = 6, d_out: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d_out)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.tanh(h) + h)


class SharedMLP(nn.Module):
    """The same Linear applied twice: not a chain (shared weights)."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


class SigmoidHead(nn.Module):
    """An activation after the last layer: not a chain in hesscli's sense (the loss sees σ(z))."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.fc1 = nn.Linear(d, 4)
        self.fc2 = nn.Linear(4, 1)

    def forward(self, x):
        return torch.sigmoid(self.fc2(torch.tanh(self.fc1(x))))
