"""What a user would write instead of ``hesscli spectrum --top-k 20``, on the LayerNorm digits MLP of
``bench/layernorm.py``: the eager model from its state_dict, then

- ``curvlinops``: ``HessianLinearOperator(model, loss, params, [(x, y)]).to_scipy()`` and
  ``scipy.sparse.linalg.eigsh(k=20, which="LA", tol=1e-6)``;
- ``pyhessian``: PyHessian's ``hessian(...).eigenvalues(top_n=20)`` (power iteration with deflation,
  its own default tolerance 1e-3).

    python bench/layernorm_peers.py curvlinops|pyhessian WORKDIR OUT.npz [--k 20] [--tol 1e-6]

Writes the top-k eigenvalues to OUT.npz (key ``eigenvalues``, descending) and prints one JSON line
with the number of Hessian-vector products. This file also defines the
model (``LNMLP``), and ``bench/layernorm.py`` imports it from here, so keep its top level light.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn


class LNMLP(nn.Module):
    """Linear(64, 32) → LayerNorm(32) → tanh → Linear(32, 32) → tanh → Linear(32, 10)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.ln = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.tanh(self.ln(self.fc1(x)))
        x = torch.tanh(self.fc2(x))
        return self.fc3(x)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("method", choices=["curvlinops", "pyhessian"])
    ap.add_argument("workdir")
    ap.add_argument("out")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--tol", type=float, default=1e-6)
    a = ap.parse_args()

    import numpy as np

    model = LNMLP().eval()
    model.load_state_dict(torch.load(f"{a.workdir}/state_dict.pt", weights_only=True))
    data = torch.load(f"{a.workdir}/data.pt", weights_only=True)
    x, y = data["inputs"].float(), data["targets"]
    crit = nn.CrossEntropyLoss()
    products = [0]
    if a.method == "curvlinops":
        from curvlinops import HessianLinearOperator
        from scipy.sparse.linalg import LinearOperator, eigsh

        def count(v):
            products[0] += 1
            return v

        params = [p for p in model.parameters() if p.requires_grad]
        op = HessianLinearOperator(model, crit, params, [(x, y)], check_deterministic=False).to_scipy()
        counted = LinearOperator(op.shape, matvec=lambda v: count(op @ v), dtype=op.dtype)  # to report products
        w = eigsh(counted, k=a.k, which="LA", tol=a.tol, return_eigenvectors=False)
    else:
        import importlib

        ph = importlib.import_module("pyhessian.hessian")  # the package re-exports a class of that name
        orig = ph.hessian_vector_product

        def counted_hvp(gradsH, params, v):
            products[0] += 1
            return orig(gradsH, params, v)

        ph.hessian_vector_product = counted_hvp  # to report products
        w, _ = ph.hessian(model, crit, data=(x, y), cuda=False).eigenvalues(top_n=a.k)
    np.savez(a.out, eigenvalues=np.sort(np.asarray(w, dtype=np.float64))[::-1])
    print(json.dumps({"products": products[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
