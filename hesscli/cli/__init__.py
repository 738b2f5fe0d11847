"""The command line: options, one library call per command, rendering, exit codes.

``base`` holds the Typer app, the shared options, the signal handling and ``main``; each other
module adds its commands to the app when imported (below)."""

from hesscli.cli import batch, matrixfree, merge  # noqa: F401  (registers their commands)
from hesscli.cli import track as _track  # noqa: F401  (registers hesscli track)
from hesscli.cli.base import app, main, run

__all__ = ["app", "main", "run"]
