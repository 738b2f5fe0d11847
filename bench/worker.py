"""Runs one measurement in a fresh process and prints one JSON line (the last line of stdout).

    python bench/worker.py '{"task": "dense", "case": "digits_mlp", "method": "hesscli", ...}'

Peak memory growth is the process's peak resident set (``ru_maxrss``) minus its resident set right
after ``import torch``, read as soon as the method returns (before the truth is loaded for the
accuracy check); on CUDA, ``torch.cuda.max_memory_allocated`` too.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import warnings
from pathlib import Path


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def main() -> None:
    task = json.loads(sys.argv[1])
    warnings.filterwarnings("ignore")
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    # the allocator setting hesscli's CLI makes, for every method alike (see hesscli.runtime.memory)
    from hesscli.runtime.memory import keep_freed_memory

    keep_freed_memory()
    rss0 = rss_bytes()
    import cases
    import methods

    if task.get("threads"):
        torch.set_num_threads(int(task["threads"]))
    device = task.get("device", "cpu")
    case = cases.get(task["case"], task.get("quick", False)) if "case" in task else None
    kind = task["task"]
    out: dict = {}
    if kind == "truth":
        path = Path(task["path"])
        H = methods.truth(case)
        torch.save(H, path)
        out = {"P": H.shape[0]}
    elif kind == "dense":
        res = methods.DENSE[task["method"]](case, device)
        out = _memory(res, rss0, device)
        H = res.pop("_hessian").detach().to("cpu", torch.float64)
        out.update(res)
        T = torch.load(task["truth"], weights_only=True)
        out["error"] = float((H - T).abs().max() / T.abs().max())
        out["output_bytes"] = H.shape[0] ** 2 * 4
    elif kind == "hvp":
        res = methods.HVP[task["method"]](case, device, task.get("reps", 5))
        out = _memory(res, rss0, device)
        out.update(res)
    elif kind == "spectral":
        res = methods.SPECTRAL[task["method"]](case, device, task["k"], task["matvecs"])
        out = _memory(res, rss0, device)
        import numpy as np

        T = torch.load(task["truth"], weights_only=True)
        ev = torch.linalg.eigvalsh(T).numpy()[::-1]
        eigs = res.pop("_eigs")
        k = task["k"]
        got = np.full(k, np.nan)
        got[: min(k, len(eigs))] = eigs[:k]
        out["eig_error"] = float(np.nanmax(np.abs(got - ev[:k]) / np.abs(ev[:k]))) if len(eigs) >= k else float("nan")
        out["eig_found"] = int(len(eigs))
        tr = float(np.trace(T.numpy()))
        out["trace_error"] = abs(res.pop("_trace") - tr) / abs(tr)
        out.update(res)
    elif kind == "peak":
        out = {str(dt).replace("torch.", ""): methods.matmul_peak(device, dt) for dt in (torch.float32, torch.float64)}
    elif kind == "flops":
        out = methods.hvp_flops(case, device)
    else:
        raise SystemExit(f"unknown task {kind}")
    out["threads"] = torch.get_num_threads()
    print(json.dumps(out, default=float))


def _memory(res: dict, rss0: int, device: str) -> dict:
    out = {"peak_growth": max(peak_bytes() - rss0, 0)}
    if str(device).startswith("cuda"):
        import torch

        out["cuda_peak"] = torch.cuda.max_memory_allocated()
    return out


if __name__ == "__main__":
    main()
