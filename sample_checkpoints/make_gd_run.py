"""Regenerate ``sample_checkpoints/gd_run/``: a short full-batch gradient-descent run of the digits
MLP, saved every 10 steps (twenty checkpoints, steps 0..190), for ``hesscli track``.

Usage (from the repo root or from anywhere)::

    python sample_checkpoints/make_gd_run.py

The model is ``archs.py``'s ``DigitsMLP(hidden=16)`` (1,482 parameters) on all of ``digits.pt``
(1,797 scikit-learn digits), cross-entropy, plain gradient descent at step size η = 0.6 from
``torch.manual_seed(0)``. With this η the sharpness (λmax of the Hessian of the training loss)
rises past 2/η ≈ 3.33 within 30 steps (progressive sharpening, then a catapult: the loss goes up
for a few steps while λmax falls back), and then hovers just below 2/η: the edge of stability of
Cohen et al. (2021), "Gradient descent on neural networks typically occurs at the edge of
stability". ``sharpness.png`` beside them is ``hesscli track --lr 0.6 --which both --plot`` of this
run (the README's figure). Each checkpoint is TorchScript (``torch.jit.script``), named ``step_NNNN.pt`` after
its step, so ``hesscli track`` reads its step from the name.

Single-threaded with deterministic algorithms and ``PYTHONHASHSEED=0`` (as ``make_samples.py``):
the files are byte-for-byte reproducible for a given torch version. Takes a few seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
OUT = HERE / "gd_run"
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from archs import DigitsMLP  # noqa: E402 - archs.py sits beside this script

SEED = 0
HIDDEN = 16
LR = 0.6
EVERY = 10  # steps between checkpoints
STEPS = 190  # the last checkpoint's step: twenty checkpoints, 0, 10, ..., 190
MAX_BYTES = 100_000


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    data = torch.load(HERE / "digits.pt", weights_only=True)
    x, y = data["inputs"], data["targets"]
    model = DigitsMLP(hidden=HIDDEN).eval()  # no dropout, no batch statistics: eval = train
    params = list(model.parameters())
    OUT.mkdir(exist_ok=True)
    for old in OUT.glob("step_*.pt"):
        old.unlink()
    print(f"{'step':>5} {'loss':>8}  file")
    for step in range(STEPS + 1):
        loss = F.cross_entropy(model(x), y)
        if step % EVERY == 0:
            p = OUT / f"step_{step:04d}.pt"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.jit.save(torch.jit.script(model), str(p))
            if p.stat().st_size > MAX_BYTES:
                raise AssertionError(f"{p.name} is {p.stat().st_size} bytes (limit {MAX_BYTES})")
            print(f"{step:>5} {loss.item():>8.4f}  {p.relative_to(HERE)}")
        if step == STEPS:
            break
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p_, g in zip(params, grads):
                p_.sub_(LR * g)


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":  # TorchScript writes constants in set order
        env = dict(os.environ, PYTHONHASHSEED="0")
        sys.exit(subprocess.call([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], env=env))
    main()
