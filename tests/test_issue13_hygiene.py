"""Issue 13, hygiene: what a dependency does is not hand-written (byte sizes, ANSI stripping,
command-line quoting, option choices and bounds), and the build files say what they run."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hesscli.cli import main

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"


def test_fmt_bytes_is_rich_filesize():
    from rich.filesize import decimal

    from hesscli.runtime.memory import fmt_bytes

    for n in (0, 1, 999, 1000, 20e6, 3.5e9, 2**40):
        assert fmt_bytes(n) == decimal(int(n), precision=2)
    assert fmt_bytes(20e6) == "20.00 MB"  # what the refusal messages quote


def test_clean_message_strips_ansi_and_folds_whitespace():
    from hesscli.errors import HesscliError, clean_message

    assert clean_message("\x1b[1;31mError\x1b[0m:  bad\n value") == "Error: bad value"
    assert clean_message("a\x1b[?25lb \x1b]8;;https://x\x1b\\link\x1b]8;;\x1b\\") == "ab link"
    assert clean_message("first\rsecond") == "first second"  # no text lost to a carriage return
    assert clean_message("shape [3, 4] vs [4]") == "shape [3, 4] vs [4]"  # brackets are not markup
    assert HesscliError("\x1b[31mred\x1b[0m").message == "red"


@pytest.mark.parametrize("args", [["spectrum", "my model.pt", "--data", "it's.pt"], ["trace", "", "a\"b", "$HOME"]])
def test_command_line_round_trips_through_a_shell(monkeypatch, args):
    from hesscli.io import resultfile as results

    monkeypatch.setattr(results, "CURRENT_ARGV", args)
    line = results.command_line()
    assert shlex.split(line) == ["hesscli", *args]
    assert line == shlex.join(["hesscli", *args])


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["spectrum", "x.npz", "--which", "middle"], "'middle' is not one of"),
        (["spectrum", "x.npz", "--top-k", "0"], "--top-k"),
        (["spectrum", "x.npz", "--max-matvecs", "0"], "--max-matvecs"),
        (["spectrum", "x.npz", "--block-size", "0"], "--block-size"),
        (["trace", "x.npz", "--method", "nope"], "'nope' is not one of"),
        (["trace", "x.npz", "--matvecs", "0"], "--matvecs"),
        (["density", "x.npz", "--runs", "0"], "--runs"),
        (["density", "x.npz", "--steps", "1"], "--steps"),
    ],
)
def test_choices_and_bounds_are_checked_by_the_parser(tmp_path, monkeypatch, capsys, argv, needle):
    """Usage errors (exit 2) from the option parser itself, before any file is looked at."""
    monkeypatch.chdir(tmp_path)  # x.npz does not exist: the parser refuses first
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Error:" in err


def test_help_lists_the_choices(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # Rich's help panel cuts long metavars at 80 columns
    main(["spectrum", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "largest|smallest|both|magnitude" in out
    main(["trace", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "auto|exact|hutchinson|hutchpp|xtrace" in out


def test_pyproject_license_is_an_spdx_string():
    tomllib = pytest.importorskip("tomllib")
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert doc["project"]["license"] == "MIT"  # a table is deprecated by setuptools (PEP 639)
    req = [r for r in doc["build-system"]["requires"] if r.startswith("setuptools")]
    assert req and ">=77" in req[0]  # the first setuptools that reads SPDX expressions


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_targets_and_ci():
    def recipe(target: str) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}  # make within make (CI)
        p = subprocess.run(["make", "--no-print-directory", "-n", target, "BIN=.venv/bin", f"PYTHON={sys.executable}"],
                           cwd=ROOT, capture_output=True, text=True, check=True, env=env)
        return p.stdout.splitlines()[-1]

    assert "pytest" in recipe("test-fast") and '-m "not slow"' in recipe("test-fast")
    assert "pytest" in recipe("test") and "not slow" not in recipe("test")
    assert "ruff check" in recipe("lint")
    steps = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip().startswith("make ")]
    assert steps == ["make install", "make lint", "make test"]
