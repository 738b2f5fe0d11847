"""What a user would write instead of ``hesscli compute``: the Hessian of the digits MLP's training
loss with ``torch.func.hessian`` on the params dict, its eigenvalues, and a file.

    python bench/func_hessian_script.py OUT.npz

Prints one JSON line last: the peak memory growth after ``import torch``.
"""

import json
import os
import resource
import sys
from pathlib import Path

import torch

with open("/proc/self/statm") as f:
    rss0 = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

import numpy as np  # noqa: E402
from torch.func import functional_call  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "sample_checkpoints"))
from archs import DigitsMLP  # noqa: E402

model = DigitsMLP().eval()
model.load_state_dict(torch.load(ROOT / "sample_checkpoints/digits_mlp_state_dict.pt", weights_only=True))
data = torch.load(ROOT / "sample_checkpoints/digits.pt", weights_only=True)
x, y = data["inputs"].float(), data["targets"]
params = {n: p.detach() for n, p in model.named_parameters()}
names = list(params)


def loss(p):
    return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)


Hd = torch.func.hessian(loss)(params)
H = torch.cat([torch.cat([Hd[a][b].reshape(params[a].numel(), params[b].numel()) for b in names], 1) for a in names])
del Hd
eigenvalues = torch.linalg.eigvalsh(H.double()).numpy()
np.savez(sys.argv[1], hessian=H.numpy(), eigenvalues=eigenvalues, trace=np.float64(eigenvalues.sum()))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"rc": 0, "peak_growth": peak - rss0}))
