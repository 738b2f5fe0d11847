"""SIGINT and SIGTERM in the middle of a run (SPEC.md, Exit codes and failure).

A real process computes the dense float64 Hessian of the digits MLP (seconds of work); 1.5 s after
``main`` starts it receives the signal. It must stop promptly with 130 (SIGINT) or 143 (SIGTERM)
and one ``Error:`` line, leave no partial or temporary file, and leave an existing output as it was.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_checkpoints"
EXISTING = b"an earlier result that must survive\n"

# hesscli's own main(), after its imports: "ready" tells the test when main() is about to run
LAUNCH = (
    "import sys; import hesscli.api; from hesscli.cli import main; "
    "sys.stderr.write('ready\\n'); sys.stderr.flush(); sys.exit(main(sys.argv[1:]))"
)


def run_and_signal(out: Path, sig: signal.Signals, force: bool) -> tuple[int, str]:
    argv = [
        sys.executable, "-c", LAUNCH, "compute", str(SAMPLES / "digits_mlp.pt2"),
        "--data", str(SAMPLES / "digits.pt"), "--dtype", "float64", "-o", str(out), "--quiet",
    ]  # fmt: skip
    if force:
        argv.append("--force")
    env = dict(os.environ, NO_COLOR="1")
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=out.parent)
    try:
        assert p.stderr.readline() == b"ready\n"
        time.sleep(1.5)
        assert p.poll() is None, "the run ended before the signal: it must last longer for this test"
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert stdout == b""
    return p.returncode, stderr.decode()


@pytest.mark.parametrize(
    "sig,code,message,force",
    [
        (signal.SIGINT, 130, "Error: interrupted (SIGINT)", False),
        (signal.SIGINT, 130, "Error: interrupted (SIGINT)", True),
        (signal.SIGTERM, 143, "Error: terminated (SIGTERM)", True),
    ],
    ids=["sigint", "sigint-existing", "sigterm-existing"],
)
def test_signal_mid_run(tmp_path, sig, code, message, force):
    out = tmp_path / "hessian.npz"
    if force:
        out.write_bytes(EXISTING)
    before = sorted(os.listdir(tmp_path))
    rc, stderr = run_and_signal(out, sig, force)
    assert rc == code, stderr
    assert stderr.splitlines() == [message], stderr
    assert sorted(os.listdir(tmp_path)) == before, "a partial or temporary file was left"
    if force:
        assert out.read_bytes() == EXISTING


# compute() replaced by code that swallows the first interrupt (as C code does when the exception
# surfaces inside a getattr it calls) and would then run for a minute
SWALLOW = (
    "import sys, time; import hesscli.api; from hesscli.cli import main\n"
    "def compute(*a, **k):\n"
    "    try:\n"
    "        time.sleep(30)\n"
    "    except BaseException:\n"
    "        pass\n"
    "    time.sleep(60)\n"
    "hesscli.api.compute = compute\n"
    "sys.stderr.write('ready\\n'); sys.stderr.flush(); sys.exit(main(sys.argv[1:]))"
)


def test_swallowed_interrupt_is_raised_again(tmp_path):
    """An interrupt whose exception something swallowed is raised again within seconds."""
    argv = [sys.executable, "-c", SWALLOW, "compute", "m.pt", "--data", "d.pt", "-o", str(tmp_path / "h.npz")]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        assert p.stderr.readline() == b"ready\n"
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        _, stderr = p.communicate(timeout=30)
        waited = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, stderr
    assert stderr.decode().splitlines() == ["Error: interrupted (SIGINT)"]
    assert waited < 20  # not the 60 s the swallowing code would run on
