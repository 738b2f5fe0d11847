"""Models and helpers for the tests of issue 10 (``test_cases.py``, ``test_model_kinds.py``).

The classes are architectures for ``--arch tests/case_models.py:NAME`` (this file is imported by path
by hesscli, so it needs nothing beyond torch at import time) and models that the tests save with
``torch.jit.script``/``trace``, ``torch.export`` or safetensors.

The reference (:func:`plain_hessian`) is independent of hesscli: the eager model cast to float64, the
loss over the whole data set in one batch, the gradient once with its graph and then one
``torch.autograd.grad`` per row (plain double backward, right for LayerNorm and InstanceNorm:
../shared/NOTES.md), with a few entries checked against finite differences of the loss.
"""

from __future__ import annotations

import copy
import json
import math
from collections import namedtuple
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# structured outputs (structured-outputs case: iris, Linear(4, 8) -> tanh -> Linear(8, 3), the
# parameter names of iris.safetensors)


class _Iris(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def hidden(self, x):
        return torch.tanh(self.fc1(x))

    def logits(self, x):
        return self.fc2(self.hidden(x))


class DictLogits(_Iris):
    """``{"logits": ..., "hidden": ...}``: the prediction is the ``logits`` entry."""

    def forward(self, x):
        h = self.hidden(x)
        return {"logits": self.fc2(h), "hidden": h}


class TupleLossLogits(_Iris):
    """Hugging Face's ``return_dict=False`` order: ``(loss, logits)`` with labels, ``(logits,)``
    without; with ``--loss model`` element 0 is the mean loss."""

    def forward(self, x, labels=None):
        z = self.logits(x)
        if labels is None:
            return (z,)
        return F.cross_entropy(z, labels), z


class IrisOut(NamedTuple):
    logits: torch.Tensor
    hidden: torch.Tensor
    loss: Optional[torch.Tensor] = None


class NamedTupleOut(_Iris):
    """A named tuple ``(logits, hidden, loss)``: the prediction is ``logits``; with ``--loss model``
    the ``loss`` entry (not element 0)."""

    def forward(self, x, labels=None):
        h = self.hidden(x)
        z = self.fc2(h)
        return IrisOut(z, h, F.cross_entropy(z, labels) if labels is not None else None)


PlainPair = namedtuple("PlainPair", ["scores", "features"])


class TwoTensorDict(_Iris):
    """``{"scores": ..., "features": ...}``: no ``logits`` entry and two tensors, so ambiguous
    without ``--output-key``."""

    def forward(self, x):
        h = self.hidden(x)
        return {"scores": self.fc2(h), "features": h}


class TwoTensorTuple(_Iris):
    """A plain tuple ``(features, scores)``: ambiguous without ``--output-key 1``."""

    def forward(self, x):
        h = self.hidden(x)
        return h, self.fc2(h)


@dataclass
class _NoLoss:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None


class NoLossOut(_Iris):
    """Takes labels but never computes a loss: ``--loss model`` has nothing to differentiate."""

    def forward(self, x, labels=None):
        return _NoLoss(logits=self.logits(x))


# ---------------------------------------------------------------------------------------------
# EmbeddingBag (embedding case: Embedding(17, 4) -> mean over 64 tokens -> tanh -> Linear(4, 10))


class BagBoW(nn.Module):
    """The embedding case's ``EmbBoW`` with ``nn.EmbeddingBag``: the same function for
    ``mode="mean"``, and for ``mode="sum"`` divided by the bag length. ``offsets=True`` passes the
    tokens flat with offsets, else as a 2-D batch of bags."""

    def __init__(self, mode: str = "mean", offsets: bool = False):
        super().__init__()
        self.mode = mode
        self.offsets = offsets
        self.emb = nn.EmbeddingBag(17, 4, mode=mode)
        self.fc = nn.Linear(4, 10)

    def forward(self, ids):
        if self.offsets:
            flat = ids.reshape(-1)
            e = self.emb(flat, torch.arange(0, flat.numel(), ids.shape[1], device=ids.device))
        else:
            e = self.emb(ids)
        if self.mode == "sum":
            e = e / ids.shape[1]
        return self.fc(torch.tanh(e))


# ---------------------------------------------------------------------------------------------
# checkpoint contents


class CustomHparams:
    """Not a harmless global: a checkpoint that pickles one must be refused, naming it."""

    def __init__(self, lr: float = 0.1):
        self.lr = lr


# ---------------------------------------------------------------------------------------------
# model kinds (test_model_kinds.py): tiny, P <= ~500


class SeqClassifier(nn.Module):
    """(N, T, 2) -> recurrent layer(s) -> last step -> [LayerNorm] -> Linear(., 3)."""

    def __init__(self, kind: str = "gru", layers: int = 1, bidirectional: bool = False, norm: bool = False,
                 hidden: int = 2):
        super().__init__()
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[kind]
        self.rnn = rnn(2, hidden, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        width = hidden * (2 if bidirectional else 1)
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(self.norm(out[:, -1]))


class InstanceNorm1dNet(nn.Module):
    """(N, 2, 6) -> Conv1d(2, 3, 3) -> InstanceNorm1d(3, affine) -> tanh -> Linear(12, 3)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.norm = nn.InstanceNorm1d(3, affine=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.norm(self.conv(x))).flatten(1))


class InstanceNorm2dNet(nn.Module):
    """(N, 1, 5, 5) -> Conv2d(1, 2, 3) -> InstanceNorm2d(2, affine) -> tanh -> Linear(18, 3)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.norm = nn.InstanceNorm2d(2, affine=True)
        self.fc = nn.Linear(18, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.norm(self.conv(x))).flatten(1))


class SDPANet(nn.Module):
    """(N, T, 4) -> qkv Linear -> two heads of F.scaled_dot_product_attention -> mean over T ->
    LayerNorm -> Linear(4, 3)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        n, t = x.shape[0], x.shape[1]
        q, k, v = self.qkv(x).reshape(n, t, 3, 2, 2).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.fc(self.norm(a.transpose(1, 2).reshape(n, t, 4).mean(1)))


class MHANet(nn.Module):
    """(N, T, 4) -> nn.MultiheadAttention(4, 2) -> mean over T -> Linear(4, 3)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a, _ = self.attn(x, x, x, need_weights=False)
        return self.fc(a.mean(1))


class LayerNormMLP(nn.Module):
    """(N, 5) -> Linear(5, 6) -> LayerNorm(6) -> tanh -> Linear(6, 3)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


class TinyTied(nn.Module):
    """Embedding(7, 3) -> tanh(Linear(3, 3)) -> Linear(3, 7) whose weight IS the embedding table:
    ``emb.weight`` 21, ``fc.weight`` 9, ``fc.bias`` 3 = 33 parameters."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.fc = nn.Linear(3, 3)
        self.head = nn.Linear(3, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.fc(self.emb(ids))))


class TinyTiedHeadFirst(nn.Module):
    """The same function with the head defined first: the shared matrix is ``head.weight`` in
    ``named_parameters()`` and ``emb.weight`` is the alias."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 7, bias=False)
        self.fc = nn.Linear(3, 3)
        self.emb = nn.Embedding(7, 3)
        self.emb.weight = self.head.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.fc(self.emb(ids))))


class DetachedParam(nn.Module):
    """Reads ``secret`` through ``.detach()``: autograd sees it as a constant, the function does not."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.secret = nn.Parameter(torch.randn(3, 5) * 0.5)

    def forward(self, x):
        return torch.tanh(self.inp(x)) @ self.secret.detach().t()


class DataParam(nn.Module):
    """Reads ``secret`` through ``.data``."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.secret = nn.Parameter(torch.randn(3, 5) * 0.5)

    def forward(self, x):
        return torch.tanh(self.inp(x)) @ self.secret.data.t()


# ---------------------------------------------------------------------------------------------
# running the CLI


def _reject_constant(name: str):
    raise ValueError(f"JSON holds {name}")


@dataclass
class Run:
    code: int
    out: str
    err: str
    logged: list[str]

    @property
    def json(self) -> dict:
        assert self.out.count("\n") == 1 and self.out.endswith("\n"), f"stdout is not one JSON line: {self.out[:500]!r}"
        return json.loads(self.out, parse_constant=_reject_constant)

    def error_line(self, max_len: int | None = None) -> str:
        """The one ``Error:`` line of a refusal (exit 1), no traceback."""
        assert self.code == 1, f"exit {self.code}, expected 1; stderr:\n{self.err[-2000:]}"
        lines = self.err.splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{self.err[-3000:]}"
        line = lines[0]
        assert line.startswith("Error: "), line
        assert "Traceback" not in line and "internal error" not in line, line
        if max_len is not None:
            assert len(line) < max_len, f"{len(line)} characters: {line[:500]}"
        return line


def runner(capfd, caplog):
    """``run(*argv)``: ``hesscli.cli.main(argv + ['--json', '--quiet'])`` in this process, stdout and
    stderr captured at the file-descriptor level (C++ warnings count), log records of WARNING and
    above collected (they would reach the terminal)."""
    import logging
    import signal

    from hesscli.cli import main

    def run(*argv, quiet: bool = True, as_json: bool = True) -> Run:
        args = [str(a) for a in argv] + (["--json"] if as_json else []) + (["--quiet"] if quiet else [])
        capfd.readouterr()
        caplog.clear()
        handler = signal.getsignal(signal.SIGTERM)
        try:
            with caplog.at_level(logging.WARNING):
                code = main(args)
        finally:
            signal.signal(signal.SIGTERM, handler)
        out, err = capfd.readouterr()
        logged = [f"{r.name}: {r.getMessage()[:300]}" for r in caplog.records if r.levelno >= logging.WARNING]
        return Run(code, out, err, logged)

    return run


def ok(r: Run) -> dict:
    """A successful quiet run: exit 0, nothing on stderr, nothing logged, one strict JSON object."""
    assert r.code == 0, f"exit {r.code}:\n{r.err[-3000:]}"
    assert r.err == "", f"stderr is not empty under --quiet:\n{r.err[-3000:]}"
    assert not r.logged, f"log records under --quiet: {r.logged}"
    doc = r.json
    assert doc.get("status", "ok") == "ok", doc.get("status")
    return doc


def notes_text(doc: dict, meta: dict | None = None) -> str:
    """Every note and warning of the JSON document and of meta, as one string."""
    parts = []
    for src in (doc, meta or {}):
        for key in ("notes", "warnings"):
            v = src.get(key) or []
            parts.extend(v if isinstance(v, list) else [str(v)])
    return "\n".join(str(p) for p in parts)


# ---------------------------------------------------------------------------------------------
# the reference


@dataclass
class Ref:
    """A float64 reference Hessian over the named parameters, in order."""

    H: np.ndarray
    names: list[str]
    sizes: list[int]
    loss_value: float

    @property
    def eig(self) -> np.ndarray:
        return np.linalg.eigvalsh((self.H + self.H.T) / 2)

    @property
    def norm2(self) -> float:
        return float(np.abs(self.eig).max())

    def block(self, names: list[str]) -> Ref:
        offs = np.cumsum([0, *self.sizes])
        idx = np.concatenate([np.arange(offs[self.names.index(n)], offs[self.names.index(n) + 1]) for n in names])
        return Ref(self.H[np.ix_(idx, idx)].copy(), list(names), [self.sizes[self.names.index(n)] for n in names],
                   self.loss_value)

    def name_of(self, flat: int) -> str:  # for reference.assert_close_matrix
        off = 0
        for n, s in zip(self.names, self.sizes):
            if flat < off + s:
                return f"{n}[{flat - off}]"
            off += s
        return "?"


def float64_copy(model: nn.Module) -> nn.Module:
    """A float64 eval-mode copy (ties kept: ``deepcopy`` and ``.double()`` keep a shared tensor shared)."""
    m = copy.deepcopy(model).double().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def to64(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.is_floating_point() else t


def plain_hessian(model: nn.Module, loss, select: list[str] | None = None, fd_entries: int = 4) -> Ref:
    """H of ``loss(m)`` (a scalar computed from ``m``, the float64 copy of ``model``) w.r.t. the
    parameters ``select`` (default: every entry of ``named_parameters()``, shared tensors once): the
    gradient with its graph, then one ``autograd.grad`` per row. ``fd_entries`` entries (the largest
    diagonal one and random ones) are checked against 4-point central differences of the loss; a
    disagreement beyond 1e-5 of max|H| (Richardson-extrapolated steps) means the reference itself is wrong."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster, and immune to a busy machine
    try:
        with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU kernels have no double backward
            return _plain_hessian(model, loss, select, fd_entries)
    finally:
        torch.set_num_threads(threads)


def _plain_hessian(model, loss, select, fd_entries) -> Ref:
    m = float64_copy(model)
    named = dict(m.named_parameters())
    names = list(named) if select is None else list(select)
    params = [named[n] for n in names]
    for p in params:
        p.requires_grad_(True)
    L = loss(m)
    grads = torch.autograd.grad(L, params, create_graph=True, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
    P = flat.numel()
    H = torch.zeros(P, P, dtype=torch.float64)
    for i in range(P):
        if not flat[i].requires_grad:
            continue
        row = torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
        H[i] = torch.cat([(r if r is not None else torch.zeros_like(p)).reshape(-1) for r, p in zip(row, params)])
    ref = Ref(H.detach().numpy(), names, [p.numel() for p in params], float(L.detach()))
    if fd_entries:
        _fd_check(m, loss, params, ref, fd_entries)
    return ref


def _fd_check(m, loss, params, ref: Ref, n: int, h: float = 2e-3) -> None:
    P = ref.H.shape[0]
    rng = np.random.default_rng(0)
    d = int(np.argmax(np.abs(np.diag(ref.H))))
    entries = [(d, d)] + [tuple(int(v) for v in rng.integers(0, P, 2)) for _ in range(n - 1)]
    offs = np.cumsum([0, *ref.sizes])

    def bump(i, s):
        k = int(np.searchsorted(offs, i, side="right") - 1)
        params[k].view(-1)[i - offs[k]] += s

    with torch.no_grad():
        for p in params:
            p.requires_grad_(False)
        saved = [p.detach().clone() for p in params]

        def at(i, j, si, sj):
            bump(i, si)
            bump(j, sj)
            v = float(loss(m))
            for p, s in zip(params, saved):
                p.copy_(s)
            return v

        def fd(i, j, h):
            return (at(i, j, h, h) - at(i, j, h, -h) - at(i, j, -h, h) + at(i, j, -h, -h)) / (4 * h * h)

        scale = float(np.abs(ref.H).max())
        for i, j in entries:
            v = (4 * fd(i, j, h / 2) - fd(i, j, h)) / 3  # Richardson: the O(h²) term cancels
            assert abs(v - ref.H[i, j]) <= 1e-5 * scale, (
                f"reference H[{ref.name_of(i)}, {ref.name_of(j)}] = {ref.H[i, j]:.8g} but finite differences "
                f"give {v:.8g} (max|H| {scale:.4g})")


def ce(out, y):
    """Mean cross-entropy with the class dimension last (what ``--loss auto`` does for integer targets
    with ``outputs.shape[:-1] == targets.shape``)."""
    if out.dim() > 2:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.cross_entropy(out, y)


def model_ref(model: nn.Module, x, y, loss=ce, select=None) -> Ref:
    """The reference of ``loss(model(x), y)`` over the whole data set."""
    x64 = to64(x)
    return plain_hessian(model, lambda m: loss(m(x64), y), select)


# ---------------------------------------------------------------------------------------------
# checks of hesscli's results against a reference (SPEC.md's accuracy promises)


def load_npz(path) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta")[()]))
    return meta, arrays


def check_full(path, ref: Ref, tol: float = 1e-5, label: str = "") -> dict:
    """A full-mode ``compute`` result against ``ref``: parameter names, max|ΔH| ≤ tol·max|H|,
    eigenvalues within tol·‖H‖₂, the trace within tol·Σ|λ|. Returns the result's meta."""
    from reference import assert_close_matrix

    meta, a = load_npz(path)
    assert [str(s) for s in a["param_names"]] == ref.names, (label, list(a["param_names"]), ref.names)
    assert "hessian" in a, f"{label}: no dense Hessian in {sorted(a)}"
    assert_close_matrix(a["hessian"], ref.H, tol, label=label, names=ref)
    ev = ref.eig
    got = np.sort(np.asarray(a["eigenvalues"], dtype=np.float64))
    assert got.shape == ev.shape, (label, got.shape, ev.shape)
    err = float(np.abs(got - ev).max())
    assert err <= tol * ref.norm2, f"{label}: eigenvalue error {err:.3e} > {tol:.0e}·‖H‖₂ = {tol * ref.norm2:.3e}"
    terr = abs(float(a["trace"]) - float(np.trace(ref.H)))
    assert terr <= tol * float(np.abs(ev).sum()), f"{label}: trace error {terr:.3e} (trace {np.trace(ref.H):.6g})"
    return meta


def check_top(values, ref: Ref, tol: float = 1e-5, label: str = "") -> None:
    """The k largest eigenvalues (any order) against the reference's, within tol·‖H‖₂."""
    got = np.sort(np.asarray(values, dtype=np.float64))
    want = ref.eig[-len(got):]
    err = float(np.abs(got - want).max())
    assert err <= tol * ref.norm2, f"{label}: {got} vs {want}: error {err:.3e} > {tol:.0e}·‖H‖₂"


def rel_close(value: float, expected: float, rel: float = 1e-4) -> bool:
    return math.isclose(float(value), expected, rel_tol=rel)
