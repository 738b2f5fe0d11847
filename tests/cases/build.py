"""Builds the cases of issue 10 (copies of ``../shared/cases/<case>/make.py`` and ``archs.py``) into a
folder: ``python tests/cases/build.py OUT [CASE ...]``.

Each case folder is copied to ``OUT/<case>`` and its ``make.py`` is run there (it writes its model and
data files into the current directory), all in this one process so that torch and scikit-learn are
imported once. Nothing generated is written into the repository. Needs scikit-learn (the ``dev``
extra). Runs on the CPU whatever the machine has (``make.py`` of dataparallel-prefix wraps the model
in ``nn.DataParallel``, which would move it to a GPU)."""

from __future__ import annotations

import os
import runpy
import shutil
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = sorted(p.name for p in HERE.iterdir() if (p / "make.py").is_file())


def build(out: Path, names: list[str]) -> None:
    cwd = os.getcwd()
    for name in names:
        if name not in CASES:
            raise SystemExit(f"no case {name!r}; cases: {', '.join(CASES)}")
        dst = out / name
        shutil.copytree(HERE / name, dst, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        sys.modules.pop("archs", None)  # each case has its own archs.py
        sys.path.insert(0, str(dst))
        os.chdir(dst)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                runpy.run_path(str(dst / "make.py"), run_name="__main__")
        finally:
            os.chdir(cwd)
            sys.path.remove(str(dst))
            sys.modules.pop("archs", None)


if __name__ == "__main__":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    build(Path(sys.argv[1]).resolve(), sys.argv[2:] or CASES)
