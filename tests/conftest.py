"""Shared fixtures: the sample folder, the CLI run in-process (``cli``) and as a real process
(``run_subprocess``), and reading result files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/reference.py, tests/models.py


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def __iter__(self):  # code, out, err = cli(...)
        return iter((self.code, self.out, self.err))

    @property
    def json(self) -> dict:
        """The one JSON object on stdout (``--json``); strict: no NaN or Infinity."""
        return json.loads(self.out, parse_constant=_reject_constant)


def _reject_constant(name: str):
    raise ValueError(f"JSON holds {name}")


@pytest.fixture(autouse=True)
def _restore_sigterm():
    """hesscli.cli.main() installs a SIGTERM handler; after an in-process run, restore pytest's."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


@pytest.fixture
def cli(capsys):
    """``cli(*argv)`` runs ``hesscli.cli.main(argv)`` in this process: (exit code, stdout, stderr)."""
    from hesscli.cli import main

    def run(*argv) -> CliResult:
        capsys.readouterr()
        handler = signal.getsignal(signal.SIGTERM)
        try:
            code = main([str(a) for a in argv])
        finally:  # main() installs its own SIGTERM handler: give pytest its own back
            signal.signal(signal.SIGTERM, handler)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


def run_subprocess(*argv, timeout: float = 600, env: dict | None = None) -> CliResult:
    """``python -m hesscli ARGV`` as a separate process, from the repository root."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    p = subprocess.run(
        [sys.executable, "-m", "hesscli", *[str(a) for a in argv]],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env=full_env,
    )
    return CliResult(p.returncode, p.stdout, p.stderr)


def load_result(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) of a result file, read as SPEC.md promises: ``allow_pickle=False``."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta")[()]))
    return meta, arrays


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    """A folder shared by the tests of a session (results reused by several tests)."""
    return tmp_path_factory.mktemp("shared")
