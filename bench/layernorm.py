"""A digits MLP with an affine LayerNorm, saved with TorchScript: who gets its Hessian right, and the
whole ``hesscli spectrum --top-k 20`` process against curvlinops + scipy ``eigsh`` in a script.

    python bench/layernorm.py [--quick] [--out bench/RESULTS.md] [--workdir DIR]

Writes (or replaces) one section of RESULTS.md, the rest of the file left as it is; ``bench/run.py``
runs it as its ``layernorm`` section. Steps:

1. Build: Linear(64, 32) → LayerNorm(32) → tanh → Linear(32, 32) → tanh → Linear(32, 10)
   (``layernorm_peers.LNMLP``), 200 full-batch Adam steps (lr 3e-3, seed 0, the recipe of the bundled
   digits MLP) on sklearn's digits, pixels / 16; saved with ``torch.jit.script`` + ``torch.jit.save``
   (``model.pt``), the data as ``{"inputs", "targets"}`` (``data.pt``) and the state_dict.
2. Whole processes, each fresh, alternated, best of N (3; 1 with --quick): wall time and peak
   resident set (``ru_maxrss`` of the child from ``wait4``) of ``hesscli spectrum MODEL.pt --data
   data.pt --top-k 20 --tol 1e-6 --json -o out.npz --force`` (the venv's console script) and of
   ``bench/layernorm_peers.py curvlinops`` (eager model from the state_dict, ``HessianLinearOperator``,
   ``eigsh(k=20, which="LA", tol=1e-6)``); PyHessian top-20 too without --quick.
3. Accuracy on all 1,797 samples (``--samples`` to change): a float64 reference by plain autograd
   double backward (one ``autograd.grad`` per row of the eager model; independent of hesscli),
   checked against central finite differences of the gradient on a few columns of every parameter
   tensor; against it the whole Hessian from ``torch.func.hessian`` over ``functional_call``,
   ``jacrev(jacrev)``, curvlinops ``HessianLinearOperator @ I``, PyHessian's own
   ``hessian_vector_product`` on unit vectors (plain double backward) and ``hesscli compute --dtype
   float64`` on the TorchScript file; and the top-20 eigenvalues of each, and of the step-2 runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

HEADING = "## LayerNorm MLP (TorchScript): correctness and whole-process spectrum"
PY = sys.executable
K, TOL = 20, 1e-6
HC = "hesscli spectrum (TorchScript file)"
CL = "curvlinops + scipy eigsh (script)"
RIGHT, RIGHT_FD = 1e-10, 1e-7  # verdict thresholds: vs the float64 reference, vs finite differences
PH = "PyHessian top-20 (script)"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] layernorm: {msg}", file=sys.stderr, flush=True)


def hesscli_exe() -> str:
    exe = Path(PY).parent / "hesscli"
    return str(exe) if exe.exists() else (shutil.which("hesscli") or "hesscli")


# ----------------------------------------------------------------------------- 1. the model


def build(work: Path) -> dict:
    import warnings

    import torch
    from layernorm_peers import LNMLP
    from sklearn.datasets import load_digits

    torch.set_num_threads(1)  # this process only (the timed ones are children with torch's defaults)
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.int64)
    torch.manual_seed(0)
    model = LNMLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.* FutureWarnings (torch >= 2.10)
        torch.jit.save(torch.jit.script(model), str(work / "model.pt"))
    torch.save({"inputs": x, "targets": y}, work / "data.pt")
    torch.save(model.state_dict(), work / "state_dict.pt")
    return {"N": len(y), "P": sum(p.numel() for p in model.parameters()),
            "loss": torch.nn.functional.cross_entropy(out, y).item(), "accuracy": (out.argmax(1) == y).double().mean().item()}


# ----------------------------------------------------------------------------- 2. whole processes


def timed(cmd: list[str], timeout: float, cwd: Path) -> dict:
    """Run ``cmd`` as a fresh process: wall time, peak RSS (the child's own ru_maxrss), its last JSON line."""
    out, err = cwd / "stdout.txt", cwd / "stderr.txt"
    with open(out, "w") as fo, open(err, "w") as fe:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, cwd=cwd)
        deadline = t + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                p.kill()
                os.wait4(p.pid, 0)
                return {"failed": f"timeout after {timeout:.0f} s"}
            time.sleep(0.005)
        wall = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    lines = [ln for ln in out.read_text().splitlines() if ln.startswith("{")]
    if p.returncode != 0:
        last = (err.read_text().strip().splitlines() or ["?"])[-1]
        return {"failed": f"exit {p.returncode}: {last[:200]}"}
    r = {"seconds": wall, "peak_rss": ru.ru_maxrss * 1024}
    if lines:
        try:
            r["json"] = json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    return r


def time_processes(work: Path, reps: int, pyhessian: bool, timeout: float) -> dict:
    runs = {
        HC: [hesscli_exe(), "spectrum", "model.pt", "--data", "data.pt", "--top-k", str(K), "--tol", str(TOL),
             "--json", "-o", "hc_spectrum.npz", "--force"],
        CL: [PY, str(HERE / "layernorm_peers.py"), "curvlinops", ".", "cl_eigsh.npz", "--k", str(K), "--tol", str(TOL)],
    }
    if pyhessian:
        runs[PH] = [PY, str(HERE / "layernorm_peers.py"), "pyhessian", ".", "ph_top.npz", "--k", str(K)]
    res: dict = {label: {"all_seconds": []} for label in runs}
    for rep in range(reps):  # alternate the methods, so that a burst of load hits all alike
        for label, cmd in runs.items():
            if "failed" in res[label]:
                continue
            log(f"run {rep + 1}/{reps}: {label}")
            r = timed(cmd, timeout, work)
            if "failed" in r:
                log(f"  {r['failed']}")
                res[label]["failed"] = r["failed"]
                continue
            log(f"  {r['seconds']:.2f} s, peak RSS {r['peak_rss'] / 1e9:.2f} GB")
            best = res[label]
            best["all_seconds"].append(r["seconds"])
            if "seconds" not in best or r["seconds"] < best["seconds"]:
                best.update({k: v for k, v in r.items() if k != "all_seconds"})
    for label in runs:  # a method that failed after a success still has its best
        if res[label].get("seconds") is not None:
            res[label].pop("failed", None)
    return res


# ----------------------------------------------------------------------------- 3. accuracy


def _eager64(work: Path, n: int | None):
    import torch
    from layernorm_peers import LNMLP

    model = LNMLP().double().eval()
    model.load_state_dict(torch.load(work / "state_dict.pt", weights_only=True))
    data = torch.load(work / "data.pt", weights_only=True)
    x, y = data["inputs"].double(), data["targets"]
    if n is not None:
        x, y = x[:n], y[:n]
    return model, x, y


def accuracy(work: Path, n: int | None, quick: bool, timeout: float) -> dict:
    import numpy as np
    import torch
    from torch.func import functional_call

    torch.manual_seed(0)
    torch.set_num_threads(1)  # small ops: on a loaded 2-core machine, 2 threads were 4x slower per product
    model, x, y = _eager64(work, n)
    crit = torch.nn.CrossEntropyLoss()
    names = [k for k, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    P = sum(sizes)
    out: dict = {"N": len(y), "P": P, "methods": {}}

    # the reference: plain double backward, one autograd.grad per row
    log(f"reference: float64 row loop of autograd.grad, P = {P:,}, N = {len(y):,}")
    t = time.perf_counter()
    g = torch.autograd.grad(crit(model(x), y), params, create_graph=True)
    gf = torch.cat([a.reshape(-1) for a in g])
    H = torch.empty(P, P, dtype=torch.float64)
    for i in range(P):
        H[i] = torch.cat([r.reshape(-1) for r in torch.autograd.grad(gf[i], params, retain_graph=True)])
    del g, gf
    t_ref = time.perf_counter() - t

    # finite differences of the gradient on a few columns of every tensor
    theta0 = torch.cat([p.detach().reshape(-1) for p in params])

    def grad_at(theta):
        theta = theta.detach().requires_grad_(True)
        ps = {k: v.reshape(s) for k, v, s in zip(names, theta.split(sizes), shapes, strict=True)}
        return torch.autograd.grad(crit(functional_call(model, ps, (x,)), y), theta)[0]

    rng = np.random.default_rng(0)
    offs = np.cumsum([0] + sizes)
    cols = sorted({int(offs[i] + j) for i in range(len(sizes)) for j in rng.choice(sizes[i], min(2, sizes[i]), replace=False)})
    h = 1e-5
    fd = torch.stack([(grad_at(theta0 + h * e) - grad_at(theta0 - h * e)) / (2 * h)
                      for e in (torch.nn.functional.one_hot(torch.tensor(c), P).double() for c in cols)], 1)
    Hmax = H.abs().max().item()
    ref_eigs = np.linalg.eigvalsh(((H + H.T) / 2).numpy())
    norm2 = float(np.abs(ref_eigs).max())
    ref_top = np.sort(ref_eigs)[::-1][:K]
    out.update(max_H=Hmax, norm2=norm2, lambda_max=float(ref_top[0]), fd_columns=len(cols), fd_step=h,
               ref_seconds=t_ref, fd_names=sorted({names[int(np.searchsorted(offs, c, side="right") - 1)] for c in cols}))

    def record(label: str, M, seconds: float | None, note: str = "") -> None:
        M = torch.as_tensor(M, dtype=torch.float64)
        r = {"seconds": seconds, "note": note}
        r["error"] = (M - H).abs().max().item() / Hmax
        r["fd_error"] = (M[:, cols] - fd).abs().max().item() / Hmax
        r["asymmetry"] = (M - M.T).abs().max().item() / Hmax
        top = np.sort(np.linalg.eigvalsh(((M + M.T) / 2).numpy()))[::-1][:K]
        r["eig_error"] = float(np.abs(top - ref_top).max() / norm2)
        out["methods"][label] = r
        log(f"  {label}: error {r['error']:.1e}, vs FD {r['fd_error']:.1e}, top-{K} {r['eig_error']:.1e}")

    record("reference: plain double backward (row loop, float64)", H, t_ref, "the reference")
    flat_loss = _flat_loss(model, x, y, crit, names, shapes, sizes)

    log("torch.func.hessian over functional_call")
    t = time.perf_counter()
    # torch.func.hessian(f) is jacfwd(jacrev(f)): a vmap of jvp(jacrev(f)) over the columns of I; jacfwd has no
    # chunk_size, so the same vmap is run here 256 columns at a time (all 3,530 at once need ~20 GB)
    jr = torch.func.jacrev(flat_loss)
    eye = torch.eye(P, dtype=torch.float64)
    cols_of = torch.func.vmap(lambda v: torch.func.jvp(jr, (theta0,), (v,))[1])
    Hf = torch.cat([cols_of(eye[s:s + 256]) for s in range(0, P, 256)], 0).T
    record("torch.func.hessian (jacfwd∘jacrev) over functional_call", Hf, time.perf_counter() - t,
           "float64; its vmap run on 256 columns at a time")
    del Hf
    if not quick:
        log("jacrev(jacrev)")
        t = time.perf_counter()
        Hr = torch.func.jacrev(torch.func.jacrev(flat_loss), chunk_size=256)(theta0)
        record("torch.func jacrev(jacrev) over functional_call", Hr, time.perf_counter() - t, "float64, chunks of 256 rows")
        del Hr

    log("curvlinops HessianLinearOperator @ I")
    try:
        from curvlinops import HessianLinearOperator

        t = time.perf_counter()
        op = HessianLinearOperator(model, crit, params, [(x, y)], check_deterministic=False)
        eye = torch.eye(P, dtype=torch.float64)
        Hc = torch.cat([op @ eye[:, s:s + 256] for s in range(0, P, 256)], 1)
        record("curvlinops HessianLinearOperator @ I (jvp of jacrev)", Hc, time.perf_counter() - t, "float64, 256 columns a call")
        del Hc, eye
    except Exception as e:  # noqa: BLE001
        out["methods"]["curvlinops HessianLinearOperator @ I (jvp of jacrev)"] = {"failed": f"{type(e).__name__}: {e}"[:200]}

    log("PyHessian hessian_vector_product on unit vectors")
    try:
        import importlib

        ph = importlib.import_module("pyhessian.hessian")
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        hc = ph.hessian(model, crit, data=(x, y), cuda=False)
        Hp = torch.empty(P, P, dtype=torch.float64)
        for j in range(P):
            v = [e.reshape(s) for e, s in zip(torch.nn.functional.one_hot(torch.tensor(j), P).double().split(sizes), shapes, strict=True)]
            Hp[:, j] = torch.cat([c.reshape(-1) for c in ph.hessian_vector_product(hc.gradsH, hc.params, v)])
        record("PyHessian hessian_vector_product @ I (plain double backward)", Hp, time.perf_counter() - t, "float64, one product per column")
        del Hp, hc
        model.zero_grad(set_to_none=True)
    except Exception as e:  # noqa: BLE001
        out["methods"]["PyHessian hessian_vector_product @ I (plain double backward)"] = {"failed": f"{type(e).__name__}: {e}"[:200]}

    label = "hesscli compute --dtype float64 (TorchScript file, whole process)"
    log(label)
    data_arg = "data.pt"
    if n is not None and n < 1797:
        d = torch.load(work / "data.pt", weights_only=True)
        torch.save({"inputs": d["inputs"][:n], "targets": d["targets"][:n]}, work / "data_acc.pt")
        data_arg = "data_acc.pt"
    r = timed([hesscli_exe(), "compute", "model.pt", "--data", data_arg, "--dtype", "float64", "-o", "hc_compute.npz",
               "--force", "--quiet"], timeout, work)
    if "failed" in r:
        out["methods"][label] = r
        log(f"  {r['failed']}")
    else:
        z = np.load(work / "hc_compute.npz", allow_pickle=False)
        Hh = _reorder(z, names, sizes)
        if isinstance(Hh, str):
            out["methods"][label] = {"failed": Hh}
        else:
            record(label, Hh, r["seconds"], f"process time; peak RSS {r['peak_rss'] / 1e9:.2f} GB")
    out["ref_top"] = ref_top.tolist()
    return out


def _flat_loss(model, x, y, crit, names, shapes, sizes):
    from torch.func import functional_call

    def loss(theta):
        ps = {k: v.reshape(s) for k, v, s in zip(names, theta.split(sizes), shapes, strict=True)}
        return crit(functional_call(model, ps, (x,)), y)

    return loss


def _reorder(z, names: list[str], sizes: list[int]):
    """hesscli's dense Hessian in the eager model's parameter order (by its param_names/offsets)."""
    import numpy as np

    H = z["hessian"].astype(np.float64)
    if "param_names" not in z:
        return H if H.shape[0] == sum(sizes) else f"hessian of shape {H.shape}, no param_names"
    hn, ho = [str(s) for s in z["param_names"]], [int(o) for o in z["param_offsets"]]
    if sorted(hn) != sorted(names):
        return f"parameters {hn} differ from the eager model's {names}"
    idx = np.concatenate([np.arange(ho[hn.index(k)], ho[hn.index(k) + 1]) for k in names])
    return H[np.ix_(idx, idx)]


def eig_errors(work: Path, acc: dict | None, proc: dict, n_proc: int) -> None:
    """Top-20 errors of the step-2 runs against the reference, where both used the same data."""
    import numpy as np

    files = {HC: "hc_spectrum.npz", CL: "cl_eigsh.npz", PH: "ph_top.npz"}
    ref = None if acc is None else np.asarray(acc["ref_top"])
    for label, r in proc.items():
        if "seconds" not in r:
            continue
        try:
            z = np.load(work / files[label], allow_pickle=False)
            if label == HC and "converged" in z:
                r["converged"] = int(np.asarray(z["converged"]).sum())
            if acc is None or acc["N"] != n_proc:
                continue
            ev = np.sort(np.asarray(z["eigenvalues"], dtype=np.float64))[::-1][:K]
            r["eig_error"] = float(np.abs(ev - ref[: len(ev)]).max() / acc["norm2"]) if len(ev) == K else None
            r["n_eigs"] = len(ev)
        except Exception as e:  # noqa: BLE001
            r["eig_error_failed"] = f"{type(e).__name__}: {e}"[:160]


# ----------------------------------------------------------------------------- 4. report


def sec(s) -> str:
    return "—" if s is None else (f"{s:.2f} s" if s >= 0.1 else f"{s * 1e3:.1f} ms")


def section(info: dict, proc: dict, acc: dict | None, cfg: dict) -> str:
    L = [HEADING, ""]
    L += [f"Written by `python bench/layernorm.py{' --quick' if cfg['quick'] else ''}` on "
          f"{dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} ({os.cpu_count()} logical CPUs; load average "
          f"{cfg['load'][0]:.2f} at start, {cfg['load'][1]:.2f} at end{'' if max(cfg['load']) < 1.5 else ': shared machine, read the ratios'}"
          f"; hesscli: {cfg['hesscli_state']}). The section took {cfg['seconds']:.0f} s.", ""]
    L += [f"Model: Linear(64, 32) → LayerNorm(32) (affine) → tanh → Linear(32, 32) → tanh → Linear(32, 10), P = "
          f"{info['P']:,}; 200 full-batch Adam steps (lr 3e-3, seed 0) on sklearn digits (N = {info['N']:,}, pixels / 16), "
          f"loss {info['loss']:.4f}, training accuracy {info['accuracy']:.3f}; saved with `torch.jit.script` + `torch.jit.save`. "
          "Cross-entropy, mean over samples.", ""]

    L += [f"### Whole process: top-{K} eigenvalues (best of {cfg['reps']}, each a fresh process, methods alternated)", "",
          f"hesscli: `hesscli spectrum model.pt --data data.pt --top-k {K} --tol {TOL:g} --json -o out.npz --force` (the venv's "
          "console script). curvlinops: `bench/layernorm_peers.py curvlinops` — imports torch, scipy and curvlinops, builds "
          f"the eager model from the state_dict, `HessianLinearOperator(model, CrossEntropyLoss(), params, [(x, y)], "
          f"check_deterministic=False).to_scipy()`, `eigsh(k={K}, which=\"LA\", tol={TOL:g})`. PyHessian: "
          f"`hessian(...).eigenvalues(top_n={K})` (power iteration, its default tolerance 1e-3). Peak RSS: the child's "
          "`ru_maxrss` (whole process, torch included). Top-20 error: max |λᵢ − λᵢ,ref| / ‖H_ref‖₂ against the float64 "
          "reference below.", "",
          "| command | time (best) | all runs | peak RSS | time / curvlinops time | products | top-20 error |",
          "|---|---|---|---|---|---|---|"]
    base = proc.get(CL, {}).get("seconds")
    for label, r in proc.items():
        if "seconds" not in r:
            L.append(f"| {label} | — | — | — | — | — | failed: {r.get('failed', '?')} |")
            continue
        ratio = f"{r['seconds'] / base:.2f}" if base else "—"
        j = r.get("json") or {}
        products = j.get("products") or j.get("matvecs") or _find(j, "matvecs") or "—"
        if "converged" in r:
            products = f"{products} ({r['converged']}/{K} converged)"
        err = r.get("eig_error")
        L.append(f"| {label} | {sec(r['seconds'])} | {', '.join(f'{s:.2f}' for s in r['all_seconds'])} | "
                 f"{r['peak_rss'] / 1e9:.2f} GB | {ratio} | {products} | {'—' if err is None else f'{err:.1e}'} |")
    L.append("")
    h = proc.get(HC, {})
    if base and "seconds" in h:
        ratio = h["seconds"] / base
        L += [f"**hesscli / curvlinops = {ratio:.2f}** (issue 10 asks < 1: "
              f"{'met' if ratio < 1 else 'not met'} in this run).", ""]
    else:
        L += [f"**hesscli / curvlinops: not measured** — {h.get('failed', proc.get(CL, {}).get('failed', '?'))}", ""]

    if acc:
        L += [f"### Correctness: the whole Hessian, float64, N = {acc['N']:,}", "",
              f"Reference: plain autograd double backward on the eager float64 model, one `autograd.grad` of the gradient "
              f"per row (independent of hesscli; {sec(acc['ref_seconds'])}). It is checked against central finite "
              f"differences of the gradient (step {acc['fd_step']:g}) on {acc['fd_columns']} columns, two of each "
              f"parameter tensor ({', '.join(acc['fd_names'])}). max|H| = {acc['max_H']:.3g}, ‖H‖₂ = {acc['norm2']:.4g}. "
              "Error: max|ΔH| / max|H_ref| of the matrix as returned (not symmetrized); vs FD: the same on the checked "
              "columns against the finite differences; asymmetry: max|H − Hᵀ| / max|H_ref| as returned; top-20: "
              "max |λᵢ − λᵢ,ref| / ‖H_ref‖₂ of the symmetrized matrix.", "",
              "| method | max\\|ΔH\\|/max\\|H\\| | vs finite differences | asymmetry | top-20 eig error | verdict | time | notes |",
              "|---|---|---|---|---|---|---|---|"]
        for label, r in acc["methods"].items():
            if "failed" in r:
                L.append(f"| {label} | — | — | — | — | — | — | failed: {r['failed']} |")
                continue
            err = "0 (itself)" if label.startswith("reference") else f"{r['error']:.1e}"
            right = r["error"] < RIGHT and r["fd_error"] < RIGHT_FD
            L.append(f"| {label} | {err} | {r['fd_error']:.1e} | {r['asymmetry']:.1e} | "
                     f"{r['eig_error']:.1e} | {'right' if right else '**wrong**'} | {sec(r['seconds'])} | {r['note']} |")
        L.append("")
        L += [f"Verdict: *right* where the error is below {RIGHT:g} of max|H| and the finite-difference error below "
              f"{RIGHT_FD:g} (the differences' own truncation and rounding). What to expect (`../shared/NOTES.md`, first "
              "section): torch.func transforms wrapped around a first derivative (`torch.func.hessian` = jacfwd of jacrev, "
              "`jacrev(jacrev)`, curvlinops' `jvp` of `jacrev`) are wrong through an affine `layer_norm`; plain double "
              "backward (the reference, PyHessian, hessian-eigenthings) is right. The size of the error depends on the "
              "LayerNorm's weights; what marks a wrong route is an error far above 1e-12 and an asymmetric matrix.", ""]
    return "\n".join(L).rstrip() + "\n"


def _find(obj, key):
    """The first value under ``key`` anywhere in a JSON object (hesscli's --json nests its figures)."""
    if isinstance(obj, dict):
        if key in obj and not isinstance(obj[key], (dict, list)):
            return obj[key]
        for v in obj.values():
            f = _find(v, key)
            if f is not None:
                return f
    elif isinstance(obj, list):
        for v in obj:
            f = _find(v, key)
            if f is not None:
                return f
    return None


# ----------------------------------------------------------------------------- RESULTS.md


def _span(lines: list[str]) -> tuple[int, int] | None:
    """Line range of this section in ``lines``: its heading up to the next '## ' heading or the total line."""
    try:
        a = lines.index(HEADING)
    except ValueError:
        return None
    b = a + 1
    while b < len(lines) and not (lines[b].startswith("## ") or lines[b].startswith("Total benchmark time")):
        b += 1
    return a, b


def extract_section(text: str) -> str | None:
    lines = text.splitlines()
    s = _span(lines)
    return None if s is None else "\n".join(lines[s[0]:s[1]]).rstrip() + "\n"


def insert_section(text: str, sec_text: str) -> str:
    """``text`` with this section replaced, or inserted before the targets/hand-written notes, else at the end."""
    lines = text.splitlines()
    new = sec_text.rstrip().splitlines() + [""]
    s = _span(lines)
    if s is None:
        at = next((i for i, ln in enumerate(lines) if ln.startswith(("## Targets", "## Where the time goes", "Total benchmark time"))),
                  len(lines))
        s = (at, at)
        if at == len(lines) and lines and lines[-1].strip():
            new = [""] + new
    return "\n".join(lines[: s[0]] + new + lines[s[1]:]).rstrip() + "\n"


def write_section(path: Path, sec_text: str) -> None:
    old = path.read_text() if path.exists() else ""
    path.write_text(insert_section(old, sec_text) if old.strip() else sec_text)


# ----------------------------------------------------------------------------- main


def hesscli_state() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "hesscli"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        return f"commit {commit}{' with hesscli/ modified' if dirty else ''}"
    except OSError:
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one run per process, no PyHessian top-20 and no jacrev(jacrev)")
    ap.add_argument("--reps", type=int, help="runs per process (default 3; 1 with --quick)")
    ap.add_argument("--samples", type=int, help="samples for the accuracy part (default all 1,797; the top-20 errors "
                                                 "of the whole-process runs need all)")
    ap.add_argument("--no-accuracy", action="store_true", help="timings only")
    ap.add_argument("--workdir", help="where the model, data and outputs go (default: a new temporary folder)")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"), help="the markdown file whose section is replaced")
    ap.add_argument("--json", help="also write the raw figures here")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="hesscli-bench-ln-"))
    work.mkdir(parents=True, exist_ok=True)
    timeout = 300 if a.quick else 600
    log(f"building the model in {work}")
    info = build(work)
    reps = a.reps or (1 if a.quick else 3)
    proc = time_processes(work, reps, pyhessian=not a.quick, timeout=timeout)
    acc = None
    if not a.no_accuracy:
        acc = accuracy(work, a.samples, a.quick, timeout)
    eig_errors(work, acc, proc, info["N"])
    cfg = {"quick": a.quick, "reps": reps, "load": (load0, os.getloadavg()[0]), "seconds": time.perf_counter() - t0,
           "hesscli_state": hesscli_state()}
    text = section(info, proc, acc, cfg)
    write_section(Path(a.out), text)
    if a.json:
        Path(a.json).write_text(json.dumps({"info": info, "processes": proc, "accuracy": acc, "config": cfg}, indent=1, default=str))
    log(f"wrote the section into {a.out} ({cfg['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
