"""Exceptions that carry their exit code (SPEC.md, Exit codes and failure).

Library code raises these with a message that names the culprit (file, key, parameter, shape);
the CLI prints ``Error: <message>`` on one line and exits with ``exit_code``.
"""

from __future__ import annotations

__all__ = [
    "HesscliError",
    "UsageError",
    "MemoryBudgetError",
    "Interrupted",
    "interrupt_handled",
    "on_interrupt_handled",
    "clean_message",
]


def clean_message(text: object) -> str:
    """One printable line: ANSI escapes removed (torch's messages carry some), whitespace folded.

    The escapes are decoded by Rich (``Text.from_ansi``), a dependency already: ``click.unstyle``
    is gone from the click that typer >= 0.20 vendors (``typer._click``), and click itself is no
    longer installed. Rich keeps only what follows a line's last carriage return, as a terminal
    shows it; a message keeps all of its text, so carriage returns become line breaks first."""
    from rich.text import Text

    return " ".join(Text.from_ansi(str(text).replace("\r", "\n")).plain.split())


class HesscliError(Exception):
    """An error a user can act on; exit code 1 (unreadable or mismatched input, numerical failure)."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(clean_message(message))

    @property
    def message(self) -> str:
        """The one-line message shown after 'Error:'."""
        return str(self)


class UsageError(HesscliError):
    """Options that contradict each other or the command; exit code 2."""

    exit_code = 2


class MemoryBudgetError(HesscliError):
    """The dense work asked for exceeds ``--max-memory``; exit code 3."""

    exit_code = 3


class Interrupted(BaseException):
    """SIGINT as the command line raises it (exit 130). Not a KeyboardInterrupt, which click would
    turn into an abort; the library catches both where it can keep what it has (spectrum's pairs
    found so far)."""


_INTERRUPT_HANDLERS: list = []


def on_interrupt_handled(callback) -> None:
    """Register ``callback()`` to run when library code has caught an :class:`Interrupted` and
    keeps its partial result (the command line stops re-sending the signal then)."""
    _INTERRUPT_HANDLERS.append(callback)


def interrupt_handled() -> None:
    """Called by library code that caught a SIGINT and keeps what it has (spectrum's pairs)."""
    for callback in _INTERRUPT_HANDLERS:
        callback()
