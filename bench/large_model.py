"""Matrix-free hesscli on a model far too big for a dense Hessian, checked against an independent reference.

Model: MLP 64-1024-1024-10 (tanh), random init (seed 0), P = 1,126,410, on scikit-learn's digits
(the bundled ``sample_checkpoints/digits.pt``, N = 1,797), cross-entropy (mean).

1. ``hesscli spectrum --top-k 5`` and ``hesscli trace`` (Hutch++ by auto) run as subprocesses (the
   user's view: wall time and peak RSS of the whole process, float32 by default).
2. Reference: scipy's ``eigsh(k=5, which="LA", tol=1e-10)`` on float64 Hessian-vector products
   computed here with plain autograd (double backward of the eager float64 model) — none of
   hesscli's code. Its trace reference: Hutch++ is checked against that by its own error bar only
   (no exact trace at this size); the printed figure is |est − ref| in units of stderr, where ref is
   a float64 Hutchinson estimate with many more vectors when ``--trace-ref N`` is given.

    python bench/large_model.py [--hidden 1024] [--trace-matvecs 300] [--trace-ref 0] [--block-size B]
    python bench/large_model.py --compare-blocks     # block vs single-vector Lanczos on the digits MLP

Prints a small table of figures (time, peak RSS, errors relative to ‖H‖₂).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"

ARCH = '''
import torch
from torch import nn


class WideMLP(nn.Module):
    def __init__(self, hidden: int = 1024):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
'''


def run_cli(args: list[str]) -> tuple[dict, float, float, int]:
    """Run hesscli in a child process: (JSON, wall seconds, peak RSS GB of that child, exit code)."""
    t0 = time.perf_counter()
    argv = [*args, "--json", "--quiet", "--force"]
    # the child reports its own peak RSS after hesscli returns
    wrapper = (
        "import resource, runpy, sys\n"
        "code = 0\n"
        "try:\n    runpy.run_module('hesscli', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code or 0\n"
        "sys.stderr.write('\\nPEAK_RSS_KB %d\\n' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        "sys.exit(code)"
    )
    p = subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True)
    secs = time.perf_counter() - t0
    peak = 0.0
    for line in p.stderr.splitlines():
        if line.startswith("PEAK_RSS_KB"):
            peak = int(line.split()[1]) / 1e6
    if not p.stdout.strip():
        raise SystemExit(f"hesscli failed ({p.returncode}): {p.stderr[-2000:]}")
    return json.loads(p.stdout), secs, peak, p.returncode


def reference(model_path: Path, arch_path: Path, hidden: int, k: int, trace_ref: int):
    """eigsh on float64 HVPs by plain autograd (independent of hesscli)."""
    import importlib.util

    import numpy as np
    import scipy.sparse.linalg as sla
    import torch

    spec = importlib.util.spec_from_file_location("wide_arch", arch_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.WideMLP(hidden)
    model.load_state_dict(torch.load(model_path, weights_only=True))
    model = model.double()
    data = torch.load(SAMPLES / "digits.pt", weights_only=True)
    x, y = (data["inputs"], data["targets"]) if isinstance(data, dict) else data
    x = x.double()
    params = [p for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    g = torch.cat([t.reshape(-1) for t in grads])
    P = g.numel()
    count = [0]

    def hvp(v):
        v = torch.as_tensor(np.asarray(v).reshape(-1), dtype=torch.float64)
        hv = torch.autograd.grad(g, params, v, retain_graph=True)
        count[0] += 1
        return torch.cat([t.reshape(-1) for t in hv]).numpy()

    t0 = time.perf_counter()
    op = sla.LinearOperator((P, P), matvec=hvp, dtype=np.float64)
    w = sla.eigsh(op, k=k, which="LA", tol=1e-10, return_eigenvectors=False)
    eig_s, eig_mv = time.perf_counter() - t0, count[0]
    tr = None
    if trace_ref:
        rng = np.random.default_rng(123)
        vals = []
        for _ in range(trace_ref):
            z = rng.choice([-1.0, 1.0], P)
            vals.append(z @ hvp(z))
        tr = (float(np.mean(vals)), float(np.std(vals, ddof=1) / np.sqrt(trace_ref)))
    return np.sort(w), eig_s, eig_mv, tr, P


def compare_blocks() -> None:
    """Products and time to --tol for block sizes 1, 2, 4, 8 on the digits MLP (float32 and float64)."""
    import numpy as np
    import torch

    from hesscli.algorithms.dense import dense_hessian
    from hesscli.algorithms.lanczos import lanczos
    from hesscli.algorithms.operators import HessianOperator
    from hesscli.api import ModelSpec, open_session

    spec = lambda dt: ModelSpec(str(SAMPLES / "digits_mlp.pt"), data=[str(SAMPLES / "digits.pt")], dtype=dt)  # noqa: E731
    ev = dense_hessian(open_session(spec("float64")).objective, mode="full").blocks[0].eigenvalues
    norm = abs(ev).max()
    print(f"threads {torch.get_num_threads()}")
    print(f"{'dtype':8} {'which':9} {'k':>3} {'b':>3} {'products':>9} {'restarts':>8} {'seconds':>8} {'max err/‖H‖':>12}")
    for dt, tol in (("float32", 1e-6), ("float64", 1e-8)):
        obj = open_session(spec(dt)).objective
        obj.hvp(torch.zeros(2, obj.P))
        for which, k in (("largest", 20), ("smallest", 5)):
            ref = ev[:k] if which == "smallest" else ev[-k:]
            for b in (1, 2, 4, 8):
                t0 = time.perf_counter()
                r = lanczos(HessianOperator(obj), k, which, tol, 5000, b)
                err = np.abs(r.eigenvalues - ref).max() / norm
                print(f"{dt:8} {which:9} {k:>3} {b:>3} {r.matvecs:>9} {r.restarts:>8} {time.perf_counter() - t0:>8.2f} {err:>12.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--trace-matvecs", type=int, default=300)
    ap.add_argument("--trace-ref", type=int, default=0, help="float64 Hutchinson vectors for a trace reference (0: none)")
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--compare-blocks", action="store_true")
    a = ap.parse_args()
    if a.compare_blocks:
        compare_blocks()
        return
    import numpy as np
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        arch = tmp / "wide_arch.py"
        arch.write_text(ARCH)
        ns: dict = {}
        exec(compile(ARCH, str(arch), "exec"), ns)
        torch.manual_seed(0)
        model = ns["WideMLP"](a.hidden)
        P = sum(p.numel() for p in model.parameters())
        model_path = tmp / "wide_mlp.pt"
        torch.save(model.state_dict(), model_path)
        common = [str(model_path), "--arch", f"{arch}:WideMLP", "--arch-kwargs", json.dumps({"hidden": a.hidden}),
                  "--data", str(SAMPLES / "digits.pt")]
        print(f"model: MLP 64-{a.hidden}-{a.hidden}-10 tanh, P = {P:,}, digits N = 1,797, threads={os.environ.get('OMP_NUM_THREADS', 'default')}")
        extra = ["--block-size", str(a.block_size)] if a.block_size else []
        sj, s_secs, s_rss, s_code = run_cli(["spectrum", *common, "--top-k", str(a.top_k), "-o", str(tmp / "s.npz"), *extra])
        print(f"spectrum: exit {s_code}, {s_secs:.1f} s, peak RSS {s_rss:.2f} GB, {sj['matvecs']} products "
              f"(+{sj['symmetry_probe_hvps']} probe), residual max {max(sj['residuals']):.1e}, restarts {sj.get('restarts')}")
        tj, t_secs, t_rss, t_code = run_cli(["trace", *common, "--matvecs", str(a.trace_matvecs), "-o", str(tmp / "t.npz")])
        print(f"trace ({tj['method']}): exit {t_code}, {t_secs:.1f} s, peak RSS {t_rss:.2f} GB, {tj['matvecs']} products: "
              f"{tj['trace']:.6g} ± {tj['trace_stderr']:.2g}")
        w, e_secs, e_mv, tr, _ = reference(model_path, arch, a.hidden, a.top_k, a.trace_ref)
        norm = float(abs(w).max())
        err = np.abs(np.array(sj["eigenvalues"]) - w) / norm
        print(f"reference eigsh (float64 autograd HVPs, tol 1e-10): {e_secs:.1f} s, {e_mv} products")
        print(f"top-{a.top_k} hesscli : {np.array2string(np.array(sj['eigenvalues'])[::-1], precision=7)}")
        print(f"top-{a.top_k} eigsh   : {np.array2string(w[::-1], precision=7)}")
        print(f"max |λ − ref| / ‖H‖₂ = {err.max():.2e}  (target ≤ 1e-4)")
        if tr is not None:
            print(f"trace reference (float64 Hutchinson, {a.trace_ref} vectors): {tr[0]:.6g} ± {tr[1]:.2g}; "
                  f"|hutchpp − ref| = {abs(tj['trace'] - tr[0]):.3g} "
                  f"({abs(tj['trace'] - tr[0]) / np.hypot(tj['trace_stderr'], tr[1]):.2f} combined stderr)")
        print(f"this script's own peak RSS (reference included): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
