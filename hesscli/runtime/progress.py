"""Progress reporting as an argument of the library; the CLI passes a Rich bar, notebooks nothing."""

from __future__ import annotations

__all__ = ["Progress", "NullProgress"]


class Progress:
    """Protocol: ``start(total, description)``, ``advance(n, **fields)``, ``stop()``."""

    def start(self, total: int, description: str = "") -> None:  # pragma: no cover - protocol
        ...

    def advance(self, n: int = 1, **fields) -> None:  # pragma: no cover - protocol
        ...

    def stop(self) -> None:  # pragma: no cover - protocol
        ...


class NullProgress(Progress):
    def start(self, total: int, description: str = "") -> None:
        pass

    def advance(self, n: int = 1, **fields) -> None:
        pass

    def stop(self) -> None:
        pass
