"""SIGINT and SIGTERM in the middle of a run (SPEC.md, Exit codes and failure).

A real process runs ``hesscli compute``; a hook installed in that process (the launch script below,
test code only) stops it at a known point and says so on a line of stderr: in the middle of the
Hessian (the first progress report, after the first rows are done), or in the middle of the atomic
write (the temporary file written, before its ``fsync`` and rename). Only then does the test send
the signal, so the outcome does not depend on how fast the machine is. The process must stop with
130 (SIGINT) or 143 (SIGTERM) and one ``Error:`` line, leave no partial or temporary file, and
leave an existing output as it was.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_checkpoints"
EXISTING = b"an earlier result that must survive\n"
MARKER = b"hook: blocked, waiting for the signal\n"

# hesscli's own main(), with a hook that blocks at HOOK (argv[1]) after writing MARKER to stderr;
# the signal's exception ends the sleep. --quiet keeps every other line off stderr until the error.
LAUNCH = f"""
import os, sys, time
import hesscli.api, hesscli.runtime.progress
from hesscli.cli import main

def block(*args, **kwargs):
    sys.stderr.write({MARKER.decode()!r}); sys.stderr.flush()
    time.sleep(3600)
    raise SystemExit("hook: no signal came")

hook = sys.argv.pop(1)
if hook == "hessian":  # the first progress report of the dense Hessian: rows are done, more to come
    hesscli.runtime.progress.NullProgress.advance = block
elif hook == "write":  # the temporary result file is written and about to be fsynced and renamed
    os.fsync = block
else:
    raise SystemExit("unknown hook " + hook)
sys.exit(main(sys.argv[1:]))
"""


def run_and_signal(out: Path, hook: str, sig: signal.Signals, force: bool) -> tuple[int, str]:
    argv = [
        sys.executable, "-c", LAUNCH, hook, "compute", str(SAMPLES / "diabetes_mlp.pt2"),
        "--data", str(SAMPLES / "diabetes.pt"), "--dtype", "float64", "-o", str(out), "--quiet",
    ]  # fmt: skip
    if force:
        argv.append("--force")
    env = dict(os.environ, NO_COLOR="1")
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=out.parent)
    try:
        first = p.stderr.readline()
        if first != MARKER:  # the run ended (or failed) without reaching the hook
            rest = p.communicate(timeout=120)[1]
            pytest.fail(f"the run never reached the '{hook}' hook: {(first + rest).decode()}")
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert stdout == b""
    return p.returncode, stderr.decode()


@pytest.mark.parametrize(
    "hook,sig,code,message,force",
    [  # each a process that imports torch: the quick suite keeps one per hook, make test runs all
        ("hessian", signal.SIGINT, 130, "Error: interrupted (SIGINT)", False),
        pytest.param("hessian", signal.SIGINT, 130, "Error: interrupted (SIGINT)", True, marks=pytest.mark.slow),
        pytest.param("hessian", signal.SIGTERM, 143, "Error: terminated (SIGTERM)", True, marks=pytest.mark.slow),
        pytest.param("write", signal.SIGINT, 130, "Error: interrupted (SIGINT)", False, marks=pytest.mark.slow),
        ("write", signal.SIGTERM, 143, "Error: terminated (SIGTERM)", True),
    ],
    ids=["sigint", "sigint-existing", "sigterm-existing", "sigint-writing", "sigterm-writing-existing"],
)
def test_signal_mid_run(tmp_path, hook, sig, code, message, force):
    out = tmp_path / "hessian.npz"
    if force:
        out.write_bytes(EXISTING)
    before = sorted(os.listdir(tmp_path))
    rc, stderr = run_and_signal(out, hook, sig, force)
    assert rc == code, stderr
    assert stderr.splitlines() == [message], stderr
    assert sorted(os.listdir(tmp_path)) == before, "a partial or temporary file was left"
    if force:
        assert out.read_bytes() == EXISTING


# compute() replaced by code that swallows the first interrupt (as C code does when the exception
# surfaces inside a getattr it calls) and then blocks for an hour: only a re-raised interrupt ends it
SWALLOW = f"""
import sys, time
import hesscli.api
from hesscli.cli import main

def compute(*a, **k):
    sys.stderr.write({MARKER.decode()!r}); sys.stderr.flush()
    try:
        time.sleep(3600)
    except BaseException:
        pass
    time.sleep(3600)

hesscli.api.compute = compute
sys.exit(main(sys.argv[1:]))
"""


def test_swallowed_interrupt_is_raised_again(tmp_path):
    """An interrupt whose exception something swallowed is raised again (by the watchdog thread):
    without that, the process would sleep on for an hour and ``communicate`` would time out."""
    argv = [sys.executable, "-c", SWALLOW, "compute", "m.pt", "--data", "d.pt", "-o", str(tmp_path / "h.npz")]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        assert p.stderr.readline() == MARKER  # inside compute(), the handlers installed
        p.send_signal(signal.SIGINT)
        _, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, stderr
    assert stderr.decode().splitlines() == ["Error: interrupted (SIGINT)"]
