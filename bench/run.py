"""hesscli against the naive methods and the peers, side by side; writes bench/RESULTS.md.

    python bench/run.py [--quick] [--device cpu|cuda] [--only dense,process,hvp,spectral,roofline,layernorm]

Every measurement runs in a fresh process (bench/worker.py) so that peak memory is the method's
own; see bench/README.md for the cases and what each column means.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import cases  # noqa: E402

PY = sys.executable
SECTIONS = ["dense", "process", "hvp", "spectral", "roofline", "layernorm"]
HC = "hesscli"
NOSYM = "hesscli (no symmetry)"
HCA = "hesscli (autograd engine)"
ROW = "row loop (autograd.grad per entry)"
FUNC = "torch.func.hessian"
AGF = "autograd.functional.hessian(vectorize)"
CURV = "curvlinops HessianLinearOperator @ I"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def worker(task: dict, timeout: float) -> dict:
    """Run one task in a fresh process; its figures, or {"failed": reason}."""
    t = time.perf_counter()
    try:
        p = subprocess.run([PY, str(HERE / "worker.py"), json.dumps(task)], capture_output=True, text=True,
                           timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"failed": f"timeout after {timeout:.0f} s"}
    wall = time.perf_counter() - t
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        err = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"failed": f"exit {p.returncode}: {err[:160]}"}
    out = json.loads(lines[-1])
    out["process_wall"] = wall
    return out


def truth_path(case: cases.Case) -> Path:
    key = hashlib.sha1(f"{case.weights}:{case.weights.stat().st_mtime}:{case.data}:{case.data.stat().st_mtime}".encode())
    return cases.CACHE / f"truth-{case.name}-{key.hexdigest()[:10]}.pt"


def ensure_truth(name: str, quick: bool, timeout: float) -> Path | None:
    case = cases.get(name, quick)
    path = truth_path(case)
    if not path.exists():
        cases.CACHE.mkdir(parents=True, exist_ok=True)
        log(f"truth {name} (float64, jacrev of grad)")
        r = worker({"task": "truth", "case": name, "quick": quick, "path": str(path)}, timeout)
        if "failed" in r:
            log(f"  truth failed: {r['failed']}")
            return None
    return path


# ----------------------------------------------------------------------------- sections


def run_dense(cfg) -> dict:
    out = {}
    for name in cfg.dense_cases:
        case = cases.get(name, cfg.quick)
        tp = ensure_truth(name, cfg.quick, cfg.timeout)
        if tp is None:
            continue
        P = case.n_params
        out[name] = {"what": case.what, "P": P, "methods": {}}
        for method in cfg.dense_methods(name, P):
            log(f"dense {name} P={P:,}: {method}")
            r = worker({"task": "dense", "case": name, "quick": cfg.quick, "method": method, "device": cfg.device,
                        "truth": str(tp)}, cfg.timeout)
            out[name]["methods"][method] = r
            log("  " + (r["failed"] if "failed" in r else f"{r['seconds']:.2f} s, error {r['error']:.1e}"))
    return out


def run_process(cfg) -> dict:
    """The whole-process comparison of issue 2 on the digits MLP."""
    res = {}
    tmp = Path(tempfile.mkdtemp(prefix="hesscli-bench-"))
    s = ROOT / "sample_checkpoints"
    runs = {
        "hesscli compute digits_mlp.pt (TorchScript)": [PY, str(HERE / "proc_hesscli.py"), "compute", str(s / "digits_mlp.pt"),
                                                        "--data", str(s / "digits.pt"), "-o", str(tmp / "a.npz"), "--force", "--quiet"],
        "torch.func.hessian script (bench/func_hessian_script.py)": [PY, str(HERE / "func_hessian_script.py"), str(tmp / "b.npz")],
    }
    if not cfg.quick:
        runs["hesscli compute digits_mlp.pt2 (torch.export)"] = [
            PY, str(HERE / "proc_hesscli.py"), "compute", str(s / "digits_mlp.pt2"), "--data", str(s / "digits.pt"),
            "-o", str(tmp / "c.npz"), "--force", "--quiet"]
    for label, cmd in runs.items():
        best = None
        for _ in range(cfg.process_reps):
            log(f"process: {label}")
            t = time.perf_counter()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.timeout, cwd=ROOT)
            except subprocess.TimeoutExpired:
                best = {"failed": "timeout"}
                break
            wall = time.perf_counter() - t
            lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
            if p.returncode != 0 or not lines:
                best = {"failed": (p.stderr.strip().splitlines() or ["?"])[-1][:160]}
                break
            r = json.loads(lines[-1])
            r["seconds"] = wall
            log(f"  {wall:.2f} s, peak growth {r['peak_growth'] / 1e9:.2f} GB")
            if best is None or wall < best["seconds"]:
                best = r
        res[label] = best
    # the two results agree?
    try:
        import numpy as np

        a, b = np.load(tmp / "a.npz", allow_pickle=False), np.load(tmp / "b.npz", allow_pickle=False)
        ha, hb = a["hessian"].astype(float), b["hessian"].astype(float)
        res["_agreement"] = float(np.abs(ha - hb).max() / np.abs(hb).max())
    except Exception as e:  # noqa: BLE001
        res["_agreement"] = f"not compared: {e}"
    return res


def run_hvp(cfg) -> dict:
    out = {}
    for name in cfg.hvp_cases:
        case = cases.get(name, cfg.quick)
        out[name] = {"what": case.what, "P": case.n_params, "methods": {}}
        for method in (HC, HCA, "PyHessian", "curvlinops"):
            log(f"hvp {name}: {method}")
            reps = 3 if name == "mlp_1m" else (8 if cfg.quick else 20)
            r = worker({"task": "hvp", "case": name, "quick": cfg.quick, "method": method, "device": cfg.device,
                        "reps": reps}, cfg.timeout)
            out[name]["methods"][method] = r
            log("  " + (r["failed"] if "failed" in r else f"{r['per_product'] * 1e3:.2f} ms per product"))
    return out


def run_spectral(cfg) -> dict:
    name = "digits_mlp"
    tp = ensure_truth(name, cfg.quick, cfg.timeout)
    out = {"case": name, "k": 20, "matvecs": 300, "methods": {}}
    for method in cfg.spectral_methods:
        log(f"top-20 and trace {name}: {method}")
        r = worker({"task": "spectral", "case": name, "method": method, "device": cfg.device, "k": 20, "matvecs": 300,
                    "truth": str(tp)}, cfg.timeout)
        out["methods"][method] = r
        log("  " + (r["failed"] if "failed" in r else f"top-20 {r['eig_seconds']:.2f} s err {r['eig_error']:.1e}"))
    return out


def run_layernorm(cfg) -> str | None:
    """bench/layernorm.py in its own process (issue 10: who is right on a LayerNorm MLP, and the whole
    ``hesscli spectrum`` process against curvlinops + eigsh); its markdown section, or a note."""
    if not str(cfg.device).startswith("cpu"):
        log("layernorm: CPU only, skipped (the section already in RESULTS.md is kept)")
        return None
    import layernorm

    with tempfile.TemporaryDirectory(prefix="hesscli-bench-ln-") as tmp:
        out = Path(tmp) / "section.md"
        cmd = [PY, str(HERE / "layernorm.py"), "--out", str(out), "--workdir", str(Path(tmp) / "work")]
        if cfg.quick:
            cmd.append("--quick")
        try:
            p = subprocess.run(cmd, cwd=ROOT, timeout=1800 if cfg.quick else 3600, stdout=subprocess.DEVNULL,
                               stderr=None)
        except subprocess.TimeoutExpired:
            return f"{layernorm.HEADING}\n\nNot measured: bench/layernorm.py timed out.\n"
        if p.returncode != 0 or not out.exists():
            return f"{layernorm.HEADING}\n\nNot measured: bench/layernorm.py exited with {p.returncode}.\n"
        return out.read_text()


def run_roofline(cfg) -> dict:
    log("roofline: matmul peak")
    out = {"peak": worker({"task": "peak", "device": cfg.device}, cfg.timeout), "cases": {}}
    for name in cfg.roofline_cases:
        log(f"roofline: flops of {name}")
        out["cases"][name] = worker({"task": "flops", "case": name, "quick": cfg.quick, "device": cfg.device}, cfg.timeout)
    return out


# ----------------------------------------------------------------------------- report


def gb(b) -> str:
    return "—" if b is None else f"{b / 1e9:.2f} GB"


def sec(s) -> str:
    return "—" if s is None else (f"{s:.2f} s" if s >= 0.1 else f"{s * 1e3:.1f} ms")


def machine() -> list[str]:
    import importlib.metadata as md

    import torch

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    vers = []
    for pkg in ("torch", "numpy", "scipy", "pyhessian", "curvlinops-for-pytorch", "hessian-eigenthings", "hesscli"):
        try:
            vers.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            vers.append(f"{pkg} (not installed)")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "hesscli"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        commit += " (hesscli/ modified)" if dirty else ""
    except OSError:
        commit = "?"
    return [
        f"- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; commit {commit}",
        f"- Machine: {cpu}; {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}; "
        f"{mem / 1e9:.0f} GB RAM; {platform.platform()}; Python {platform.python_version()}",
        "- Versions: " + ", ".join(vers),
    ]


def report(cfg, res: dict, load: tuple) -> str:
    L = ["# hesscli benchmark results", ""]
    L += [f"Written by `python bench/run.py{' --quick' if cfg.quick else ''}` (device `{cfg.device}`). "
          "Each figure comes from a fresh process; times are wall clock, one run unless said; ratios are "
          "`method time / hesscli time` (higher = hesscli faster). Peak memory growth is the process's peak "
          "resident set minus its resident set after `import torch`. Error: max|H − H_true| / max|H_true| "
          "against the float64 `jacrev(grad)` truth of the eager model (layer_norm from primitives).", ""]
    L += machine()
    L += [f"- Load average (1 min) at start {load[0]:.2f}, at end {load[1]:.2f} "
          f"({'quiet' if max(load) < 1.5 else 'shared machine: timings noisy, read the ratios'})", ""]
    targets = []

    dense = res.get("dense")
    if dense:
        L += ["## Dense Hessian, in-process", "",
              "hesscli: `dense_hessian(objective, mode='full')` after `open_session` (time without its "
              "eigendecomposition, which the others do not do; the eigvalsh time is given apart). Others: the "
              "Hessian only, after loading the model and data.", ""]
        for name, c in dense.items():
            ms = c["methods"]
            base = ms.get(HC, {}).get("seconds")
            L += [f"### {name}: {c['what']}, P = {c['P']:,}", "",
                  "| method | time | × hesscli | peak memory growth | error | notes |", "|---|---|---|---|---|---|"]
            for m, r in ms.items():
                if "failed" in r:
                    L.append(f"| {m} | — | — | — | — | {r['failed']} |")
                    continue
                ratio = f"{r['seconds'] / base:.2f}×" if base else "—"
                note = ""
                if m in (HC, NOSYM, HCA):
                    note = (f"{r.get('engine', '?')} products, chunk {r['chunk']}, {r['hvps']} products; "
                            f"+{sec(r['eig_seconds'])} eigvalsh")
                L.append(f"| {m} | {sec(r['seconds'])} | {ratio} | {gb(r['peak_growth'])} | {r['error']:.1e} | {note} |")
            L.append("")
            if base:
                out_b = ms[HC]["output_bytes"]
                lim = 2 * out_b + 0.5e9
                targets.append((f"{name}: peak memory ≤ 2× dense output + 0.5 GB", f"{gb(ms[HC]['peak_growth'])} vs {gb(lim)}",
                                ms[HC]["peak_growth"] <= lim))
                if FUNC in ms and "seconds" in ms[FUNC] and name == "digits_mlp":
                    r = ms[FUNC]["seconds"] / base
                    targets.append(("digits MLP: dense ≥ 3× faster than torch.func.hessian", f"{r:.2f}×", r >= 3))
                if ROW in ms and "seconds" in ms[ROW]:
                    r = ms[ROW]["seconds"] / base
                    if name == "few_samples":
                        targets.append(("few samples: ≥ 1.5× faster than the row loop", f"{r:.2f}×", r >= 1.5))
                    elif name == "many_samples":
                        targets.append(("many samples: not slower than the row loop", f"{r:.2f}×", r >= 1.0))
                if NOSYM in ms and "seconds" in ms[NOSYM]:
                    c["symmetry_gain"] = ms[NOSYM]["seconds"] / base
        gains = {n: c["symmetry_gain"] for n, c in dense.items() if "symmetry_gain" in c}
        if gains:
            L += ["## Symmetry", "", "hesscli computes, for each parameter tensor j, only the blocks H[j, i≤j], "
                  "differentiating w.r.t. those tensors only, and mirrors the rest.", "",
                  "| case | without symmetry / with |", "|---|---|"]
            L += [f"| {n} | {g:.2f}× |" for n, g in gains.items()]
            L.append("")

    proc = res.get("process")
    if proc:
        L += ["## Whole process (issue 2): Hessian + eigenvalues + file, digits MLP", "",
              "| command | time | × hesscli | peak memory growth |", "|---|---|---|---|"]
        hk = next((k for k in proc if k.startswith("hesscli compute digits_mlp.pt ")), None)
        base = proc.get(hk, {}).get("seconds") if hk else None
        for label, r in proc.items():
            if label.startswith("_"):
                continue
            if "failed" in r:
                L.append(f"| {label} | — | — | {r['failed']} |")
                continue
            ratio = f"{r['seconds'] / base:.2f}×" if base else "—"
            L.append(f"| {label} | {sec(r['seconds'])} | {ratio} | {gb(r['peak_growth'])} |")
        agree = proc.get("_agreement")
        L += ["", f"The two files' Hessians agree to {agree:.1e} of max|H|." if isinstance(agree, float) else f"({agree})", ""]
        sk = "torch.func.hessian script (bench/func_hessian_script.py)"
        if base and "seconds" in proc.get(sk, {}):
            r = proc[sk]["seconds"] / base
            targets.append(("whole process ≥ 2.5× faster than the torch.func.hessian script", f"{r:.2f}×", r >= 2.5))
            targets.append(("whole process peak memory growth < 1 GB", gb(proc[hk]["peak_growth"]), proc[hk]["peak_growth"] < 1e9))

    hvp = res.get("hvp")
    if hvp:
        L += ["## Hessian-vector products", "",
              "Set-up: from nothing loaded to the first product done (hesscli: `open_session` and its checks; "
              "PyHessian: `hessian(...)`; curvlinops: the operator). Per product: best of several further "
              "products of one vector. Batch: 32 vectors in one call, per vector (PyHessian has no batched product).", ""]
        for name, c in hvp.items():
            ms = c["methods"]
            ph = ms.get("PyHessian", {}).get("per_product")
            L += [f"### {name}: {c['what']}, P = {c['P']:,}", "",
                  "| method | set-up | per product | × PyHessian | batch of 32, per vector | batch gain | peak memory growth |",
                  "|---|---|---|---|---|---|---|"]
            for m, r in ms.items():
                if "failed" in r:
                    L.append(f"| {m} | — | — | — | — | — | {r['failed']} |")
                    continue
                ratio = f"{r['per_product'] / ph:.2f}×" if ph else "—"
                L.append(f"| {m} | {sec(r['setup'])} | {sec(r['per_product'])} | {ratio} | {sec(r.get('batch32_per_vector'))} | "
                         f"{r['batch_gain']:.2f}× | {gb(r['peak_growth'])} |" if "batch_gain" in r else
                         f"| {m} | {sec(r['setup'])} | {sec(r['per_product'])} | {ratio} | — | — | {gb(r['peak_growth'])} |")
            L.append("")
            h = ms.get("hesscli", {})
            if ph and "per_product" in h:
                r = h["per_product"] / ph
                targets.append((f"{name}: further product within 1.3× of PyHessian's", f"{r:.2f}×", r <= 1.3))
            if "batch_gain" in h and name == "digits_mlp":
                m = f"{h['batch_gain']:.2f}×"
                bound = _batch_bound(res, name, h["per_product"])
                if bound:
                    m += (f" (one product runs at {100 / bound:.0f}% of the matmul peak, so no batch can be more than "
                          f"{bound:.1f}× cheaper per vector; vs the autograd engine's single product: "
                          f"{ms.get(HCA, {}).get('per_product', float('nan')) / h['batch32_per_vector']:.2f}×)")
                targets.append(("digits MLP (P ≈ 3.5k): batch of 32 ≥ 3× cheaper per vector", m, h["batch_gain"] >= 3))

    spec = res.get("spectral")
    if spec:
        L += [f"## Top-{spec['k']} eigenvalues and trace, {spec['case']}", "",
              "Error: worst relative error of the 20 largest eigenvalues; trace: relative error, "
              f"with a budget of {spec['matvecs']} products.", "",
              "| method | top-20 products | top-20 time | worst rel. error | trace method | trace products | trace time | trace rel. error |",
              "|---|---|---|---|---|---|---|---|"]
        for m, r in spec["methods"].items():
            if "failed" in r:
                L.append(f"| {m} | — | — | — | — | — | — | {r['failed']} |")
                continue
            L.append(f"| {m} | {r['eig_hvps']} | {sec(r['eig_seconds'])} | {r['eig_error']:.1e} | {r['trace_method']} | "
                     f"{r['trace_hvps']} | {sec(r['trace_seconds'])} | {r['trace_error']:.1e} |")
        L.append("")
        h, c = spec["methods"].get("hesscli", {}), spec["methods"].get("curvlinops + scipy eigsh", {})
        if "eig_seconds" in h and "eig_seconds" in c:
            best_err = min(r["eig_error"] for m, r in spec["methods"].items() if "eig_error" in r and m != "hesscli")
            ok = h["eig_error"] <= max(best_err, 1e-6) and h["eig_seconds"] < c["eig_seconds"]
            targets.append(("top-20: accuracy ≥ best peer and less time than curvlinops + eigsh",
                            f"{h['eig_error']:.1e} vs {best_err:.1e}; {sec(h['eig_seconds'])} vs {sec(c['eig_seconds'])}", ok))

    roof = res.get("roofline")
    if roof and "failed" not in roof["peak"]:
        pk = roof["peak"]
        L += ["## Roofline", "",
              f"Matmul peak measured in this run (2048², best of 5): float32 {pk['float32'] / 1e9:.0f} GFLOP/s, "
              f"float64 {pk['float64'] / 1e9:.0f} GFLOP/s. Flops: matmul/convolution flops counted by "
              "`torch.utils.flop_counter.FlopCounterMode` (elementwise work is not in the floor). The floor of a "
              "dense Hessian is P products at the float32 peak; *raw* = floor / hesscli's Hessian time; "
              "*effective* = the flops hesscli's symmetric scheme actually runs, at peak, / its time.", "",
              "| case | P | flops per product | one product: time, % of peak | floor (P products) | hesscli Hessian | raw | effective |",
              "|---|---|---|---|---|---|---|---|"]
        best_raw = 0.0
        for name, f in roof["cases"].items():
            if "failed" in f:
                L.append(f"| {name} | — | — | — | — | — | — | {f['failed']} |")
                continue
            floor = f["P"] * f["hvp_flops"] / pk["float32"]
            one = f["hvp_flops"] / pk["float32"] / f["hvp_seconds"]
            t = (dense or {}).get(name, {}).get("methods", {}).get(HC, {}).get("seconds")
            raw = floor / t if t else None
            eff = f["dense_flops"] / pk["float32"] / t if t else None
            best_raw = max(best_raw, raw or 0)
            L.append(f"| {name} | {f['P']:,} | {f['hvp_flops'] / 1e6:.1f} M | {sec(f['hvp_seconds'])}, {100 * one:.0f}% | "
                     f"{sec(floor)} | {sec(t)} | {'—' if raw is None else f'{100 * raw:.0f}%'} | "
                     f"{'—' if eff is None else f'{100 * eff:.0f}%'} |")
        L.append("")
        if best_raw:
            targets.append(("≥ 40% of the flop floor (raw) in the better regime", f"{100 * best_raw:.0f}%", best_raw >= 0.4))

    if targets:
        L += ["## Targets (issues 2 and 4)", "", "| target | measured | met |", "|---|---|---|"]
        L += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in targets]
        L.append("")
    if cfg.notes.exists():
        L += [cfg.notes.read_text().strip(), ""]
    return "\n".join(L)


def _batch_bound(res: dict, name: str, per_product: float) -> float | None:
    """The most a batch can gain per vector: one product's time over its flops at the matmul peak."""
    roof = res.get("roofline") or {}
    f = roof.get("cases", {}).get(name, {})
    peak = roof.get("peak", {}).get("float32")
    if not peak or "hvp_flops" not in f:
        return None
    return per_product / (f["hvp_flops"] / peak)


class Config:
    def __init__(self, a):
        self.quick, self.device = a.quick, a.device
        self.timeout = 240 if a.quick else 900
        self.process_reps = 1 if a.quick else 2
        self.notes = HERE / "NOTES_RESULTS.md"  # hand-written analysis appended to RESULTS.md
        if a.quick:
            self.dense_cases = ["digits_mlp", "diabetes_mlp", "few_samples", "many_samples"]
            self.hvp_cases = ["digits_mlp"]
            self.spectral_methods = ["hesscli", "curvlinops + scipy eigsh"]
            self.roofline_cases = ["digits_mlp", "few_samples"]
        else:
            self.dense_cases = list(cases.DENSE_CASES)
            self.hvp_cases = ["digits_mlp", "mlp_1m"]
            self.spectral_methods = list(__import__("methods").SPECTRAL)
            self.roofline_cases = ["digits_mlp", "few_samples", "many_samples"]

    def dense_methods(self, name: str, P: int) -> list[str]:
        ms = [HC, NOSYM, HCA, ROW, FUNC, AGF, CURV]
        if self.quick and name == "digits_mlp":
            return [HC, NOSYM, HCA, ROW]
        if P > (1000 if self.quick else 4000):  # vectorize=True needs ~1 MB per parameter² / 1000 (12 GB at 3.5k)
            ms.remove(AGF)
        return ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller cases and fewer methods (about 2 minutes)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (skipped with a note where there is no GPU)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ", ".join(SECTIONS))
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    a = ap.parse_args()
    if a.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("bench: no CUDA device here; nothing to run with --device cuda", file=sys.stderr)
            return 0
    cfg = Config(a)
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    res = {}
    old_text = Path(a.out).read_text() if Path(a.out).exists() else ""
    for s in SECTIONS:
        if s in only:
            res[s] = globals()[f"run_{s}"](cfg)
    load1 = os.getloadavg()[0]
    ln_section = res.pop("layernorm", None)
    (HERE / ("results-quick.json" if a.quick else "results.json")).write_text(json.dumps(res, indent=1, default=str))
    text = report(cfg, res, (load0, load1))
    text += f"\nTotal benchmark time {time.perf_counter() - t0:.0f} s.\n"
    import layernorm

    ln_section = ln_section or layernorm.extract_section(old_text)  # not run this time: keep the last one
    if ln_section:
        text = layernorm.insert_section(text, ln_section)
    Path(a.out).write_text(text)
    log(f"wrote {a.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
