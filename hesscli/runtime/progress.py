"""Progress reporting as an argument of the library; the CLI passes a Rich bar, notebooks nothing."""

from __future__ import annotations

__all__ = ["Progress", "NullProgress"]


class Progress:
    """Protocol: ``start(total, description)``, ``advance(n, **fields)``, ``stop()``."""

    def start(self, total: int, description: str = "") -> None:  # pragma: no cover - protocol
        """Begin a task of total steps."""
        ...

    def advance(self, n: int = 1, **fields) -> None:  # pragma: no cover - protocol
        """Advance by n steps; fields are shown beside the bar."""
        ...

    def stop(self) -> None:  # pragma: no cover - protocol
        """End the task."""
        ...


class NullProgress(Progress):
    """Progress that shows nothing (notebooks, --quiet, a stderr that is not a terminal)."""
    def start(self, total: int, description: str = "") -> None:
        """Nothing to show."""
        pass

    def advance(self, n: int = 1, **fields) -> None:
        """Nothing to show."""
        pass

    def stop(self) -> None:
        """Nothing to show."""
        pass
