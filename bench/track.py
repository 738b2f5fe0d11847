"""``hesscli track``: eigensolver products with warm starts against random starts (issue 14).

On ``sample_checkpoints/gd_run/`` (the digits MLP, 16 hidden units, P = 1,482, full-batch gradient
descent at η = 0.6 on all 1,797 digits; TorchScript every 10 steps), for ``--top-k 1`` and ``5``:
the total number of eigensolver products (``matvecs``, Lanczos and its final residual check; not
the update product) with warm starts (each checkpoint's Lanczos starts from the previous one's
Ritz vectors) and with ``--no-warm-start`` (the seeded random start of ``spectrum``), over all
twenty checkpoints and over the ten of the acceptance test (steps 100..190), and the largest
difference between the two runs' eigenvalues relative to λmax.

    python bench/track.py            # prints the table
    python bench/track.py --append   # and appends it as a section to bench/RESULTS.md

Product counts do not depend on the machine (seeded); times are wall clock on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from hesscli.tracking import track

ROOT = Path(__file__).resolve().parents[1]
GD = ROOT / "sample_checkpoints" / "gd_run"
DATA = ROOT / "sample_checkpoints" / "digits.pt"


def run(paths: list[Path], k: int, warm: bool) -> tuple[list, float]:
    t0 = time.perf_counter()
    rows = list(track([str(p) for p in paths], str(DATA), top_k=k, warm_start=warm, tol=1e-6))  # the figures below are at tol 1e-6
    return rows, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--append", action="store_true", help="append the results to bench/RESULTS.md")
    args = ap.parse_args()
    every = sorted(GD.glob("step_*.pt"))
    sets = {"all 20 (steps 0..190)": every, "acceptance 10 (steps 100..190)": [p for p in every if int(p.stem[5:]) >= 100]}
    lines = [
        "| checkpoints | --top-k | warm: products | random: products | warm / random | warm time | random time "
        "| max \\|Δλ\\| / λmax |",
        "|---|---|---|---|---|---|---|---|",
    ]
    per_row = []
    for name, paths in sets.items():
        for k in (1, 5):
            w, tw = run(paths, k, True)
            c, tc = run(paths, k, False)
            mw, mc = sum(r.matvecs for r in w), sum(r.matvecs for r in c)
            diff = max(float(np.max(np.abs(a.eigenvalues - b.eigenvalues))) / b.lambda_max for a, b in zip(w, c))
            lines.append(f"| {name} | {k} | {mw} | {mc} | {mw / mc:.2f} | {tw:.1f} s | {tc:.1f} s | {diff:.1e} |")
            print(lines[-1], flush=True)
            if name.startswith("all"):
                per_row.append((k, [r.matvecs for r in w], [r.matvecs for r in c]))
    detail = ["", "Products per checkpoint (steps 0, 10, ..., 190), warm / random:", ""]
    for k, w, c in per_row:
        detail.append(f"- `--top-k {k}`: warm {w}; random {c}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = "\n".join([
        "",
        "## `hesscli track`: warm starts against random starts (`python bench/track.py`, issue 14)",
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs; load average {load:.1f} (shared: "
        "times are noisy, product counts are exact)",
        "- Run: `sample_checkpoints/gd_run/` (digits MLP 64-16-16-10, P = 1,482, full-batch GD at η = 0.6, all "
        "1,797 digits, TorchScript every 10 steps), float32, tol 1e-6·‖H‖₂, default block size min(4, k).",
        "- Products: the eigensolver's (`matvecs`: Lanczos and its final residual check), not the update product.",
        "",
        *lines,
        *detail,
        "",
        "Warm starts save the most where the top eigenvectors move little between checkpoints (steps 100..190,",
        "where λmax hovers just below 2/η) and the least in the catapult (steps 20..50), where they turn;",
        "a single outlier (`--top-k 1`) converges in a dozen products from any start, so the saving there",
        "is a few products per checkpoint. The eigenvalues of both runs agree to the tolerance.",
        "",
    ])
    print(text)
    if args.append:
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
