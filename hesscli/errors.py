"""Exceptions that carry their exit code (SPEC.md, Exit codes and failure).

Library code raises these with a message that names the culprit (file, key, parameter, shape);
the CLI prints ``Error: <message>`` on one line and exits with ``exit_code``.
"""

from __future__ import annotations

import re

__all__ = [
    "HesscliError",
    "UsageError",
    "MemoryBudgetError",
    "clean_message",
]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def clean_message(text: object) -> str:
    """One printable line: ANSI escapes removed (torch's messages carry some), whitespace folded."""
    s = _ANSI.sub("", str(text))
    s = " ".join(s.split())
    return s


class HesscliError(Exception):
    """An error a user can act on; exit code 1 (unreadable or mismatched input, numerical failure)."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(clean_message(message))

    @property
    def message(self) -> str:
        return str(self)


class UsageError(HesscliError):
    """Options that contradict each other or the command; exit code 2."""

    exit_code = 2


class MemoryBudgetError(HesscliError):
    """The dense work asked for exceeds ``--max-memory``; exit code 3."""

    exit_code = 3
