"""The methods compared, each as a function run inside a fresh worker process (bench/worker.py).

Every function gets a :class:`cases.Case` and a device, does its set-up untimed unless set-up is
what is measured, and returns a dict of figures; ``_hessian`` keys carry a (P, P) result for the
accuracy check, ``_eigs``/``_trace`` spectral results. Timings synchronise CUDA before reading
the clock.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from cases import Case
from torch.func import functional_call


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def clock(device: str) -> float:
    sync(device)
    return time.perf_counter()


def _named(model):
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone() for _, p in model.named_parameters()]
    return names, params


def _flat(rows_by_tensor, P) -> torch.Tensor:
    return torch.cat([r.reshape(r.shape[0], -1) if r.dim() > 1 else r.reshape(1, -1) for r in rows_by_tensor], 1)


def session(case: Case, device: str, dtype: str | None = None, engine: str = "auto"):
    from hesscli import ModelSpec, open_session

    return open_session(ModelSpec(**case.spec_kwargs(device, dtype), engine=engine))


# ----------------------------------------------------------------------------- dense Hessians


def dense_hesscli(case: Case, device: str, symmetric: bool = True, engine: str = "auto") -> dict:
    from hesscli.algorithms.dense import dense_hessian

    obj = session(case, device, engine=engine).objective
    t = clock(device)
    res = dense_hessian(obj, mode="full", symmetric=symmetric)
    total = clock(device) - t
    return {
        "seconds": total - res.eig_seconds,  # the Hessian, checks and symmetrisation, without eigenvalues
        "seconds_with_eigs": total,
        "eig_seconds": res.eig_seconds,
        "hvps": res.hvps,
        "chunk": res.chunk_size,
        "engine": "chain" if obj.chain is not None else "autograd",
        "_hessian": res.blocks[0].hessian,
    }


def dense_hesscli_autograd(case: Case, device: str) -> dict:
    return dense_hesscli(case, device, engine="autograd")


def dense_hesscli_nosym(case: Case, device: str) -> dict:
    return dense_hesscli(case, device, symmetric=False)


def dense_rowloop(case: Case, device: str) -> dict:
    """One ``autograd.grad`` per gradient entry on the retained graph of the gradient."""
    model, x, y, crit = case.load(device)
    params = [p for p in model.parameters()]
    t = clock(device)
    loss = crit(model(x), y)
    g = torch.autograd.grad(loss, params, create_graph=True)
    gflat = torch.cat([gi.reshape(-1) for gi in g])
    P = gflat.numel()
    H = torch.empty(P, P, dtype=gflat.dtype, device=gflat.device)
    for i in range(P):
        row = torch.autograd.grad(gflat[i], params, retain_graph=True)
        H[i] = torch.cat([r.reshape(-1) for r in row])
    return {"seconds": clock(device) - t, "hvps": P, "_hessian": H}


def dense_func_hessian(case: Case, device: str) -> dict:
    """``torch.func.hessian`` (jacfwd of jacrev) of ``functional_call`` on the params dict."""
    model, x, y, crit = case.load(device)
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)

    def loss(p):
        return crit(functional_call(model, p, (x,)), y)

    t = clock(device)
    Hd = torch.func.hessian(loss)(params)
    H = torch.cat([torch.cat([Hd[a][b].reshape(params[a].numel(), params[b].numel()) for b in names], 1) for a in names], 0)
    return {"seconds": clock(device) - t, "_hessian": H}


def dense_autograd_functional(case: Case, device: str) -> dict:
    """``torch.autograd.functional.hessian(vectorize=True)`` of the loss of the flat parameters."""
    model, x, y, crit = case.load(device)
    names, params = _named(model)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    flat = torch.cat([p.reshape(-1) for p in params])

    def loss(theta):
        ps = {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes, strict=True)}
        return crit(functional_call(model, ps, (x,)), y)

    t = clock(device)
    H = torch.autograd.functional.hessian(loss, flat, vectorize=True)
    return {"seconds": clock(device) - t, "_hessian": H}


def dense_curvlinops(case: Case, device: str) -> dict:
    """curvlinops ``HessianLinearOperator @ I``."""
    from curvlinops import HessianLinearOperator

    model, x, y, crit = case.load(device)
    params = [p for p in model.parameters()]
    P = sum(p.numel() for p in params)
    t = clock(device)
    op = HessianLinearOperator(model, crit, params, [(x, y)], check_deterministic=False)
    H = op @ torch.eye(P, dtype=x.dtype, device=x.device)
    return {"seconds": clock(device) - t, "_hessian": H}


DENSE = {
    "hesscli": dense_hesscli,
    "hesscli (no symmetry)": dense_hesscli_nosym,
    "hesscli (autograd engine)": dense_hesscli_autograd,
    "row loop (autograd.grad per entry)": dense_rowloop,
    "torch.func.hessian": dense_func_hessian,
    "autograd.functional.hessian(vectorize)": dense_autograd_functional,
    "curvlinops HessianLinearOperator @ I": dense_curvlinops,
}


def truth(case: Case, device: str = "cpu") -> torch.Tensor:
    """The dense float64 Hessian: reverse over reverse (``jacrev`` of ``grad``, chunked: a vmap over
    the pullback of the gradient, which NOTES.md measured right for layer_norm/instance_norm, unlike
    ``torch.func.hessian`` and ``jacrev(jacrev)``) of the eager model in float64, math attention."""
    from hesscli.objective.safeops import second_order_safe

    model, x, y, crit = case.load(device, torch.float64)
    names, params = _named(model)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    flat = torch.cat([p.reshape(-1) for p in params])

    def loss(theta):
        ps = {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes, strict=True)}
        return crit(functional_call(model, ps, (x,)), y)

    with second_order_safe():
        H = torch.func.jacrev(torch.func.grad(loss), chunk_size=64)(flat)
    return (H + H.T) / 2


# ----------------------------------------------------------------------------- HVP throughput


def _hvp_stats(first_at: float, t0: float, single, batched, P: int, device: str, reps: int) -> dict:
    setup = first_at - t0
    times = []
    for _ in range(reps):
        t = clock(device)
        single()
        times.append(clock(device) - t)
    out = {"setup": setup, "per_product": min(times)}
    if batched is not None:
        batched()
        bt = []
        for _ in range(max(1, reps // 4)):
            t = clock(device)
            batched()
            bt.append(clock(device) - t)
        out["batch32_per_vector"] = min(bt) / 32
        out["batch_gain"] = out["per_product"] / out["batch32_per_vector"]
    return out


def hvp_hesscli(case: Case, device: str, reps: int, engine: str = "auto") -> dict:
    t0 = clock(device)
    obj = session(case, device, engine=engine).objective
    g = torch.Generator().manual_seed(0)
    v = torch.randn(obj.P, generator=g)
    V = torch.randn(32, obj.P, generator=g)
    obj.hvp(v)
    first = clock(device)
    return _hvp_stats(first, t0, lambda: obj.hvp(v), lambda: obj.hvp(V), obj.P, device, reps)


def hvp_pyhessian(case: Case, device: str, reps: int) -> dict:
    from pyhessian import hessian
    from pyhessian.utils import hessian_vector_product

    model, x, y, crit = case.load(device)
    t0 = clock(device)
    hc = hessian(model, crit, data=(x, y), cuda=str(device).startswith("cuda"))
    v = [torch.randn_like(p) for p in hc.params]
    hessian_vector_product(hc.gradsH, hc.params, v)
    first = clock(device)
    return _hvp_stats(first, t0, lambda: hessian_vector_product(hc.gradsH, hc.params, v), None, 0, device, reps)


def hvp_curvlinops(case: Case, device: str, reps: int) -> dict:
    from curvlinops import HessianLinearOperator

    model, x, y, crit = case.load(device)
    params = [p for p in model.parameters()]
    P = sum(p.numel() for p in params)
    t0 = clock(device)
    op = HessianLinearOperator(model, crit, params, [(x, y)], check_deterministic=False)
    v = torch.randn(P, device=x.device)
    V = torch.randn(P, 32, device=x.device)
    op @ v
    first = clock(device)
    return _hvp_stats(first, t0, lambda: op @ v, lambda: op @ V, P, device, reps)


def hvp_hesscli_autograd(case: Case, device: str, reps: int) -> dict:
    return hvp_hesscli(case, device, reps, engine="autograd")


HVP = {"hesscli": hvp_hesscli, "hesscli (autograd engine)": hvp_hesscli_autograd, "PyHessian": hvp_pyhessian,
       "curvlinops": hvp_curvlinops}


# ----------------------------------------------------------------------------- top-20 and trace


class _Counter:
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, v):
        self.n += 1 if v.dim() == 1 else v.shape[-1]
        return self.fn(v)


def spectral_hesscli(case: Case, device: str, k: int, matvecs: int) -> dict:
    from hesscli.algorithms.lanczos import lanczos
    from hesscli.algorithms.operators import HessianOperator
    from hesscli.algorithms.trace import estimate_trace

    obj = session(case, device).objective
    op = HessianOperator(obj)
    t = clock(device)
    r = lanczos(op, k=k, which="largest")
    t_eig = clock(device) - t
    op2 = HessianOperator(obj)
    t = clock(device)
    tr = estimate_trace(op2, method="auto", matvecs=matvecs, seed=0)
    t_tr = clock(device) - t
    return {"eig_seconds": t_eig, "eig_hvps": r.matvecs, "_eigs": np.sort(r.eigenvalues)[::-1][:k].copy(),
            "trace_seconds": t_tr, "trace_hvps": tr.matvecs, "_trace": tr.trace, "trace_method": tr.method}


def spectral_pyhessian(case: Case, device: str, k: int, matvecs: int) -> dict:
    import importlib

    ph = importlib.import_module("pyhessian.hessian")  # the package re-exports a class of the same name
    model, x, y, crit = case.load(device)
    hc = ph.hessian(model, crit, data=(x, y), cuda=str(device).startswith("cuda"))
    counter = {"n": 0}
    orig = ph.hessian_vector_product

    def counted(gradsH, params, v):
        counter["n"] += 1
        return orig(gradsH, params, v)

    ph.hessian_vector_product = counted
    t = clock(device)
    eigs, _ = hc.eigenvalues(top_n=k)
    t_eig = clock(device) - t
    n_eig, counter["n"] = counter["n"], 0
    t = clock(device)
    trs = hc.trace(maxIter=matvecs)
    t_tr = clock(device) - t
    return {"eig_seconds": t_eig, "eig_hvps": n_eig, "_eigs": np.sort(np.array(eigs, dtype=float))[::-1].copy(),
            "trace_seconds": t_tr, "trace_hvps": counter["n"], "_trace": float(np.mean(trs)), "trace_method": "Hutchinson (tol 1e-3)"}


def spectral_eigenthings(case: Case, device: str, k: int, matvecs: int) -> dict:
    import hessian_eigenthings as he

    model, x, y, crit = case.load(device)
    op = he.HessianOperator(model, [(x, y)], he.supervised_loss(crit))
    counted = _Counter(op.matvec)
    op.matvec = counted
    t = clock(device)
    r = he.lanczos(op, k=k, which="LA", seed=0)
    t_eig = clock(device) - t
    n_eig, counted.n = counted.n, 0
    t = clock(device)
    tr = he.trace(op, num_matvecs=matvecs, method="hutch++", seed=0)
    t_tr = clock(device) - t
    return {"eig_seconds": t_eig, "eig_hvps": n_eig, "_eigs": np.sort(r.eigenvalues.cpu().double().numpy())[::-1].copy(),
            "trace_seconds": t_tr, "trace_hvps": counted.n, "_trace": float(tr.estimate), "trace_method": "Hutch++"}


def spectral_curvlinops(case: Case, device: str, k: int, matvecs: int) -> dict:
    from curvlinops import HessianLinearOperator
    from curvlinops.trace.meyer2020hutch import hutchpp_trace
    from scipy.sparse.linalg import LinearOperator, eigsh

    model, x, y, crit = case.load(device)
    params = [p for p in model.parameters()]
    op = HessianLinearOperator(model, crit, params, [(x, y)], check_deterministic=False)
    sp = op.to_scipy()
    counter = {"n": 0}

    def mv(v):
        counter["n"] += 1 if v.ndim == 1 or v.shape[-1] == 1 else v.shape[-1]
        return sp @ v

    lo = LinearOperator(sp.shape, matvec=mv, dtype=sp.dtype)
    t = clock(device)
    w = eigsh(lo, k=k, which="LA", return_eigenvectors=False)
    t_eig = clock(device) - t
    n_eig = counter["n"]
    t = clock(device)
    tr = hutchpp_trace(op, matvecs)
    t_tr = clock(device) - t
    return {"eig_seconds": t_eig, "eig_hvps": n_eig, "_eigs": np.sort(np.asarray(w, dtype=float))[::-1].copy(),
            "trace_seconds": t_tr, "trace_hvps": matvecs, "_trace": float(tr), "trace_method": "Hutch++"}


SPECTRAL = {
    "hesscli": spectral_hesscli,
    "PyHessian": spectral_pyhessian,
    "hessian-eigenthings": spectral_eigenthings,
    "curvlinops + scipy eigsh": spectral_curvlinops,
}


# ----------------------------------------------------------------------------- roofline


def matmul_peak(device: str, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of an n×n matmul, best of ``reps``."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = clock(device)
        a @ b
        best = min(best, clock(device) - t)
    return 2 * n**3 / best


def hvp_flops(case: Case, device: str) -> dict:
    """Matmul/conv FLOPs of one Hessian-vector product (hesscli's, single vector), of the
    symmetric dense Hessian's products as hesscli runs them, and the time of one product."""
    from torch.utils.flop_counter import FlopCounterMode

    from hesscli.algorithms.dense import dense_hessian

    obj = session(case, device).objective
    v = torch.randn(obj.P)
    obj.hvp(v)
    with FlopCounterMode(display=False) as fc:
        obj.hvp(v)
    one = fc.get_total_flops()
    best = float("inf")
    for _ in range(5):
        t = clock(device)
        obj.hvp(v)
        best = min(best, clock(device) - t)
    with FlopCounterMode(display=False) as fc:
        dense_hessian(obj, mode="full", chunk_size=64)
    return {"P": obj.P, "hvp_flops": one, "hvp_seconds": best, "dense_flops": fc.get_total_flops()}
