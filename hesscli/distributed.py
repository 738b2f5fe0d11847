"""torch.distributed support (placeholder until the torchrun work lands): single process only."""

from __future__ import annotations

import os

__all__ = ["from_env", "shutdown"]


def from_env():
    """A communicator when launched by torchrun with WORLD_SIZE > 1, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .errors import HesscliError

        raise HesscliError("running under torchrun is not supported yet")
    return None


def shutdown(code: int) -> None:
    pass
