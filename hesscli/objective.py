"""The objective every second-order algorithm consumes.

    L(θ) = (1/n) Σ_pieces Σ_{terms t in piece} ℓ_t(θ)        (reduction mean; sum drops the 1/n)

over the selected parameters θ (SPEC.md, Loss): each micro-batch ("piece") contributes the sum of
its loss terms and the mean divides once by the total count n = ``n_loss_terms``, so the Hessian
does not depend on ``--batch-size``, on the split into shards, or on the number of ranks.

:class:`Objective` offers Hessian-vector products H·V for one or many vectors, built as
reverse-over-reverse products (Pearlmutter 1994): per piece, the gradient g(θ) is computed once with
its graph (:class:`Linearization`), and H·v = ∂(gᵀv)/∂θ is one more backward pass; many vectors go
through one batched backward (``vmap`` over the grad outputs, ``is_grads_batched``). Every forward
pass runs under :func:`hesscli.safeops.second_order_safe`, so ``layer_norm`` and
``instance_norm`` are differentiated through primitive ops that torch gets right.

When the model is an affine chain (an MLP; :mod:`hesscli.chain`) and ``engine`` allows it, a piece's
linearisation is instead the chain's primal quantities, whose products are the same H·v in closed
form, checked against autograd's on the first samples before they are used.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from .chain import ChainLinearization, ChainProgram, NotAChain, record_chain
from .data import Dataset
from .devices import no_tf32, resolve_device, resolve_dtype
from .errors import HesscliError, UsageError
from .losses import Loss, resolve_loss
from .safeops import second_order_safe

__all__ = ["Objective", "Linearization", "ParamBlock", "ENGINES"]

ENGINES = ("auto", "autograd", "chain")  # products: chain when the model is one, autograd always, chain or refuse


def engine_wanted(engine: str, loss: str) -> bool:
    return engine != "autograd" and loss != "model"


@dataclass(frozen=True)
class ParamBlock:
    """A contiguous range of the flat parameter vector: one module's tensors, or one tensor."""

    name: str
    tensors: tuple[int, ...]  # indices into Objective.names
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


class Linearization:
    """One piece's gradient g(θ) with its graph: applies v ↦ ∂(gᵀv)/∂θ for many v.

    Products are unscaled (the piece's sum of loss terms); :class:`Objective` scales and reduces.
    """

    def __init__(self, leaves: list[torch.Tensor], grads: list[torch.Tensor | None]):
        self.leaves = leaves
        self.grads = grads

    def apply(
        self,
        vectors: Sequence[torch.Tensor],
        of: Sequence[int],
        wrt: Sequence[int],
        batched: bool,
    ) -> list[torch.Tensor]:
        """∂/∂θ_wrt of Σ_{j in of} ⟨g_j, v_j⟩, for ``vectors`` shaped like θ_of (with a leading
        batch dimension when ``batched``). Returns one tensor per ``wrt``, zeros where θ_wrt does
        not enter."""
        outs, gouts = [], []
        for j, v in zip(of, vectors):
            g = self.grads[j]
            if g is not None and g.requires_grad:
                outs.append(g)
                gouts.append(v)
        inputs = [self.leaves[i] for i in wrt]
        if outs:
            res = torch.autograd.grad(
                outs, inputs, gouts, retain_graph=True, allow_unused=True, is_grads_batched=batched
            )
        else:
            res = [None] * len(inputs)
        k = vectors[0].shape[0] if batched else None
        full = []
        for r, x in zip(res, inputs):
            if r is None:
                r = x.new_zeros(((k,) if batched else ()) + tuple(x.shape))
            full.append(r)
        return full


@dataclass
class ObjectiveInfo:
    notes: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)


class Objective:
    """The training loss of a model on a data set, as a function of the selected parameters."""

    def __init__(
        self,
        module: nn.Module,
        data: Dataset,
        *,
        loss: str = "auto",
        reduction: str = "mean",
        params: str | None = None,
        batch_size: int | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        comm=None,
        check: bool = True,
        cache_bytes: int | None = None,
        example: tuple[torch.Tensor, torch.Tensor] | None = None,
        engine: str = "auto",
    ):
        if engine not in ENGINES:
            raise UsageError(f"--engine '{engine}': choose auto, autograd or chain")
        self.engine = engine
        self.chain: ChainProgram | None = None
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
        self.data = data
        self.batch_size = batch_size
        self.comm = comm
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        all_params = list(module.named_parameters())
        if isinstance(dtype, torch.dtype):
            self.dtype = dtype
        else:
            self.dtype = resolve_dtype(dtype, [p.dtype for _, p in all_params])
        no_tf32()
        module = module.to(device=self.device)
        self.module = _cast_floating(module, self.dtype)
        self.info = ObjectiveInfo()
        self.hvps = 0
        self.reduction = reduction

        named = list(self.module.named_parameters())
        order = getattr(self.module, "_hesscli_param_order", None)
        if order:  # a converted TorchScript module: keep the archive's parameter order
            pos = {n: i for i, n in enumerate(order)}
            named.sort(key=lambda np_: pos.get(np_[0], len(pos)))
        if params:
            try:
                rx = re.compile(params)
            except re.error as e:
                raise UsageError(f"--params '{params}' is not a regular expression: {e}") from None
            named = [(n, p) for n, p in named if rx.search(n)]
            if not named:
                avail = ", ".join(n for n, _ in self.module.named_parameters())
                raise UsageError(f"--params '{params}' selects no parameter; the model has: {avail}")
        if not named:
            raise HesscliError("the model has no parameters")
        for n, p in self.module.named_parameters():
            if not torch.isfinite(p).all():
                raise HesscliError(f"parameter '{n}' {tuple(p.shape)} contains NaN or Inf")
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.P = self.offsets[-1]
        self.theta = [p.detach().clone() for _, p in named]
        for p in self.module.parameters():  # constants: derivatives go through theta (functional_call)
            p.requires_grad_(False)

        self.loss: Loss | None = None
        self._piece_counts: list[int] = []
        self._cache: list[Linearization] | None = None
        self._cache_bytes = cache_bytes
        self.linearization_bytes = 0
        self._example = example
        self._setup(loss, reduction, check)

    # ------------------------------------------------------------------ set-up and checks

    def _move(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.is_floating_point():
            x = x.to(self.dtype)
        if y.is_floating_point():
            y = y.to(self.dtype)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _forward(self, params: dict, x: torch.Tensor, y: torch.Tensor | None = None):
        args = (x,) if y is None else (x, y)
        try:
            return functional_call(self.module, params, args)
        except HesscliError:
            raise
        except Exception as e:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else "?"
            raise HesscliError(
                f"the model's forward failed on inputs {shape}{self.data.where()}: {type(e).__name__}: {e}"
            ) from None

    def _param_dict(self, tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, tensors))

    def piece_total(self, tensors: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The sum of the loss terms of one piece (inputs already on the device)."""
        params = self._param_dict(tensors)
        if self.loss.name == "model":
            out = self._forward(params, x, y)
            if isinstance(out, (tuple, list)):
                return out[0]
            return out * x.shape[0]
        out = self._forward(params, x)
        return self.loss.total(out, y)

    def _setup(self, loss_name: str, reduction: str, check: bool) -> None:
        first = self.data.first(8)
        params = self._param_dict(self.theta)
        if first is None:  # a rank without data: resolve the loss on an example batch, check nothing
            if loss_name == "model" or self._example is None:
                self.loss = resolve_loss("model" if loss_name == "model" else "mse", reduction, torch.zeros(1), torch.zeros(1))
            else:
                with torch.no_grad(), second_order_safe():
                    xe, ye = self._example
                    self.loss = resolve_loss(loss_name, reduction, self._forward(params, self._move(xe, ye)[0]), ye)
        counts = []
        total = 0.0
        with torch.no_grad(), second_order_safe():
            if first is not None:
                x0, y0 = self._move(*first)
                if loss_name == "model":
                    out0 = self._forward(params, x0, y0)
                    self.loss = resolve_loss("model", reduction, out0, y0)
                else:
                    out0 = self._forward(params, x0)
                    self.loss = resolve_loss(loss_name, reduction, out0, first[1])
                if check:
                    self._check_model(params, x0, y0, out0)
            for x, y in self.data.pieces(self.batch_size):
                if self.loss.name == "model":
                    xd, yd = self._move(x, y)
                    out = self._forward(params, xd, yd)
                    if isinstance(out, (tuple, list)):
                        if len(out) != 2:
                            raise HesscliError("--loss model: the model must return a mean loss or a pair (sum, count)")
                        s, c = out
                        c = int(round(float(c)))
                    else:
                        s, c = out * x.shape[0], int(x.shape[0])
                    s = torch.as_tensor(s)
                    if s.numel() != 1:
                        raise HesscliError(f"--loss model: the model returned a loss of shape {tuple(s.shape)}, not a scalar")
                else:
                    xd = self._move(x, y[:0])[0]
                    out = self._forward(params, xd)
                    resolve_loss(self.loss.name, reduction, out, y)  # checks the targets on the CPU
                    yd = self._move(x[:0], y)[1]
                    c = self.loss.count(out.shape, y)
                    s = self.loss.total(out, yd)
                s = float(s)
                if not math.isfinite(s):
                    raise HesscliError(
                        f"the loss is {'NaN' if math.isnan(s) else 'infinite'} on a batch of {x.shape[0]} samples"
                        f"{self.data.where()} "
                        "(check the inputs, the weights and --loss)"
                    )
                counts.append(c)
                total += s
        self._piece_counts = counts
        n_terms = torch.tensor([float(sum(counts)), total], dtype=torch.float64)
        n_samples = torch.tensor([float(self.data.n_samples)], dtype=torch.float64)
        if self.comm is not None:
            self.comm.all_reduce(n_terms)
            self.comm.all_reduce(n_samples)
        self.n_loss_terms = int(round(n_terms[0].item()))
        self.n_samples = int(round(n_samples[0].item()))
        if self.n_loss_terms == 0:
            raise HesscliError("the data has no loss terms (every target is ignored, or there are no samples)")
        self.scale = 1.0 / self.n_loss_terms if reduction == "mean" else 1.0
        self.loss_value = n_terms[1].item() * self.scale
        if check and first is not None:
            self._find_unused(first)
        if self.engine == "chain" and self.loss.name == "model":
            raise UsageError("--engine chain needs one of hesscli's losses, not --loss model")
        if first is not None and engine_wanted(self.engine, self.loss.name):
            self._detect_chain(first)

    def _check_model(self, params, x, y, out0) -> None:
        """Refuse models whose outputs are not finite, are random (dropout baked in) or depend on
        the batch."""
        args = (x, y) if self.loss.name == "model" else (x,)
        a = _first_tensor(out0)
        if a is not None and a.is_floating_point() and not torch.isfinite(a).all():
            bad = (~torch.isfinite(a)).reshape(a.shape[0], -1).any(1).nonzero() if a.dim() else a.new_zeros(0, 1)
            where = f" (first at sample {int(bad[0, 0])})" if a.dim() and a.shape[0] == x.shape[0] and bad.numel() else ""
            raise HesscliError(f"the model's outputs contain NaN or Inf{where} although its inputs and weights are finite")
        out1 = self._forward(params, *args)
        b = _first_tensor(out1)
        if a is not None and b is not None and not _close(a, b):
            raise HesscliError(
                "the model's outputs change between two identical calls (dropout or other randomness "
                "baked in, e.g. traced or exported in train mode); its Hessian would depend on chance"
            )
        if self.loss.name == "model" or x.shape[0] < 2 or a is None or a.dim() == 0 or a.shape[0] != x.shape[0]:
            return
        # a sub-batch of 2 when there are 3 or more samples (BatchNorm refuses a batch of 1), else of 1
        k = 2 if x.shape[0] >= 3 else 1
        try:
            part = _first_tensor(self._forward(params, x[:k]))
        except HesscliError as e:
            raise HesscliError(f"{_BATCH_MSG} (a batch of {k} fails: {e})") from None
        if part is not None and part.shape[1:] == a.shape[1:] and not _close(part[:k], a[:k]):
            raise HesscliError(_BATCH_MSG)

    def _find_unused(self, first) -> None:
        x, y = self._move(*first)
        leaves = [t.clone().requires_grad_(True) for t in self.theta]
        with second_order_safe():
            total = self.piece_total(leaves, x, y)
        if not total.requires_grad:
            self.info.unused = list(self.names)
        else:
            gs = torch.autograd.grad(total, leaves, allow_unused=True)
            self.info.unused = [n for n, g in zip(self.names, gs) if g is None]
        if self.info.unused:
            self.info.notes.append(
                "parameters that get no gradient (their Hessian rows are zero): " + ", ".join(self.info.unused)
            )

    def _detect_chain(self, first) -> None:
        """Use :mod:`hesscli.chain`'s closed-form products when the model is an affine chain and
        they agree with autograd's on the first samples (two random vectors)."""
        x, y = self._move(*first)
        try:
            out, ops = record_chain(lambda: self._forward(self._param_dict(self.theta), x))
            program = ChainProgram.parse(ops, self.theta, x, out)
            lin = ChainLinearization(program, ops, self.theta, out, y, self.loss)
        except NotAChain as e:
            if self.engine == "chain":
                raise HesscliError(f"--engine chain: the model is not an affine chain ({e})") from None
            return
        ref = self._autograd_linearization(x, y)
        self.linearization_bytes = 0  # measured on a whole piece later (measure_linearization)
        gen = torch.Generator(device="cpu").manual_seed(1234)
        idx = list(range(len(self.names)))
        V = [torch.randn((2,) + s, generator=gen, dtype=torch.float64).to(self.device, self.dtype) for s in self.shapes]
        a = torch.cat([r.reshape(2, -1) for r in lin.apply(V, idx, idx, batched=True)], 1)
        b = torch.stack([_scalar_hvp(ref, [v[i] for v in V]) for i in range(2)])
        scale = b.abs().max().item()
        err = (a - b).abs().max().item() / scale if scale > 0 else (a - b).abs().max().item()
        tol = 1e-4 if self.dtype == torch.float32 else 1e-9
        if not err <= tol:
            if self.engine == "chain":
                raise HesscliError(f"--engine chain: its products differ from autograd's by {err:.1e} (relative)")
            self.info.notes.append(f"{program.description}: closed-form products differ from autograd's ({err:.1e}); autograd used")
            return
        self.chain = program
        self.info.notes.append(f"Hessian-vector products in closed form for the {program.description}")

    # ------------------------------------------------------------------ products

    def blocks(self, by: str = "module") -> list[ParamBlock]:
        """Parameter groups: ``module`` (a module's own tensors together), ``tensor`` or ``all``."""
        return param_blocks(self.names, self.offsets, by)

    def linearize(self, x: torch.Tensor, y: torch.Tensor) -> Linearization | ChainLinearization:
        """What products on this piece need: the closed-form chain quantities
        (:mod:`hesscli.chain`) when the model is a checked affine chain, else the gradient with its
        graph (:class:`Linearization`)."""
        if self.chain is not None:
            try:
                out, ops = record_chain(lambda: self._forward(self._param_dict(self.theta), x))
                lin = ChainLinearization(self.chain, ops, self.theta, out, y, self.loss)
                self.linearization_bytes = max(self.linearization_bytes, lin.nbytes)
                return lin
            except NotAChain:  # this piece ran other ops: autograd
                pass
        return self._autograd_linearization(x, y)

    def _autograd_linearization(self, x: torch.Tensor, y: torch.Tensor) -> Linearization:
        """g(θ) = ∇ of this piece's summed loss, with its graph kept for products."""
        leaves = [t.clone().requires_grad_(True) for t in self.theta]
        seen: dict[int, int] = {}

        def pack(t):
            try:
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
            except (RuntimeError, NotImplementedError):  # e.g. a tensor without storage
                pass
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), second_order_safe():
            total = self.piece_total(leaves, x, y)
            if not total.requires_grad:
                return Linearization(leaves, [None] * len(leaves))
            grads = torch.autograd.grad(total, leaves, create_graph=True, allow_unused=True)
        self.linearization_bytes = max(self.linearization_bytes, sum(seen.values()))
        return Linearization(leaves, list(grads))

    def linearizations(self) -> Iterator[Linearization]:
        """One :class:`Linearization` per piece (cached when they all fit the cache budget)."""
        if self._cache is not None:
            yield from self._cache
            return
        keep: list[Linearization] | None = [] if self._cache_wanted() else None
        for x, y in self.data.pieces(self.batch_size):
            lin = self.linearize(*self._move(x, y))
            if keep is not None:
                keep.append(lin)
            yield lin
        if keep is not None:
            self._cache = keep

    def measure_linearization(self) -> int:
        """Bytes one piece's gradient graph holds (measured once, on the first piece)."""
        if self.linearization_bytes == 0:
            for x, y in self.data.pieces(self.batch_size):
                lin = self.linearize(*self._move(x, y))
                if self.n_pieces() == 1:
                    self._cache = [lin]
                break
        return self.linearization_bytes

    def _cache_wanted(self) -> bool:
        n = len(self._piece_counts)
        if n <= 1:
            return True
        if self._cache_bytes is None:
            return False
        return n * max(self.linearization_bytes, 1) <= self._cache_bytes

    def n_pieces(self) -> int:
        return len(self._piece_counts)

    def hvp(self, V: torch.Tensor) -> torch.Tensor:
        """H·V for V of shape (P,) or (k, P) (rows are vectors); same shape back, on V's device."""
        single = V.dim() == 1
        Vb = V.reshape(1, -1) if single else V
        if Vb.shape[-1] != self.P:
            raise ValueError(f"hvp: vectors of length {Vb.shape[-1]}, expected P = {self.P}")
        Vd = Vb.to(self.device, self.dtype)
        k = Vd.shape[0]
        parts = [Vd[:, a:b].reshape((k,) + s) for a, b, s in zip(self.offsets[:-1], self.offsets[1:], self.shapes)]
        if single:
            parts = [p[0] for p in parts]
        idx = list(range(len(self.names)))
        acc = torch.zeros(k, self.P, dtype=self.dtype, device=self.device)
        for lin in self.linearizations():
            res = lin.apply(parts, idx, idx, batched=not single)
            acc += torch.cat([r.reshape(k, -1) for r in res], dim=1)
        acc *= self.scale
        if self.comm is not None:
            self.comm.all_reduce(acc)
        self.hvps += k
        out = acc[0] if single else acc
        return out.to(V.device) if V.device != self.device else out

    def grad(self) -> torch.Tensor:
        """∇L(θ), flat."""
        acc = torch.zeros(self.P, dtype=self.dtype, device=self.device)
        for x, y in self.data.pieces(self.batch_size):
            xd, yd = self._move(x, y)
            leaves = [t.clone().requires_grad_(True) for t in self.theta]
            with second_order_safe():
                total = self.piece_total(leaves, xd, yd)
            if total.requires_grad:
                gs = torch.autograd.grad(total, leaves, allow_unused=True)
                acc += torch.cat([(g if g is not None else torch.zeros_like(t)).reshape(-1) for g, t in zip(gs, leaves)])
        acc *= self.scale
        if self.comm is not None:
            self.comm.all_reduce(acc)
        return acc

    def symmetry_probe(self, seed: int = 0, max_groups: int = 16) -> tuple[float, str]:
        """Check that the Hessian operator is symmetric, and name the worst pair of parameters.

        Two random vectors u_a, u'_a supported on each parameter group a (tensors, merged into at
        most ``max_groups`` groups) give M = Uᵀ(HU); a correct Hessian has M = Mᵀ to rounding, while
        a wrong second derivative (NOTES.md: layer_norm in torch) breaks it by O(1). Returns
        (max |M_ab − M_ba| / (‖Hu_a‖‖u_b‖ + ‖Hu_b‖‖u_a‖), "name_a / name_b"). Costs 2·groups HVPs.
        """
        T = len(self.names)
        per = max(1, math.ceil(T / max_groups))
        groups = [list(range(i, min(i + per, T))) for i in range(0, T, per)]
        gen = torch.Generator().manual_seed(seed)
        U = torch.zeros(2 * len(groups), self.P, dtype=torch.float64)
        for gi, g in enumerate(groups):
            a, b = self.offsets[g[0]], self.offsets[g[-1] + 1]
            U[2 * gi : 2 * gi + 2, a:b] = torch.randn(2, b - a, generator=gen, dtype=torch.float64)
        HU = self.hvp(U.to(self.dtype)).to(torch.float64).cpu()
        M = U @ HU.T  # M[i, j] = u_i^T H u_j
        norms_u = U.norm(dim=1)
        norms_hu = HU.norm(dim=1)
        denom = norms_hu[:, None] * norms_u[None, :] + norms_u[:, None] * norms_hu[None, :]
        rel = (M - M.T).abs() / denom.clamp_min(1e-300)
        rel[denom == 0] = 0.0
        i, j = divmod(int(rel.argmax()), rel.shape[1])
        name = lambda k: ",".join(self.names[t] for t in groups[k // 2])  # noqa: E731
        return float(rel.max()), f"{name(i)} / {name(j)}"

    # ------------------------------------------------------------------ bookkeeping

    def describe_params(self) -> list[dict]:
        return [{"name": n, "shape": list(s)} for n, s in zip(self.names, self.shapes)]

    def param_checksum(self) -> float:
        return float(sum(t.double().sum().item() + 1e-3 * t.double().abs().sum().item() for t in self.theta))


def _scalar_hvp(lin: Linearization, v: list[torch.Tensor]) -> torch.Tensor:
    """H·v (flat) as the gradient of the scalar ⟨g, v⟩: the same product as ``lin.apply``, without
    grad_outputs, whose handling in ``torch.autograd.grad`` imports torch.fx's symbolic shapes and
    sympy (0.3 s) — a start-up cost the closed-form engine otherwise never pays."""
    terms = [(g * vi).sum() for g, vi in zip(lin.grads, v) if g is not None and g.requires_grad]
    if not terms:
        return torch.cat([x.new_zeros(x.numel()) for x in lin.leaves])
    res = torch.autograd.grad(torch.stack(terms).sum(), lin.leaves, retain_graph=True, allow_unused=True)
    return torch.cat([(r if r is not None else x.new_zeros(())).expand_as(x).reshape(-1) for r, x in zip(res, lin.leaves)])


def param_blocks(names: Sequence[str], offsets: Sequence[int], by: str = "module") -> list[ParamBlock]:
    """Contiguous parameter groups: ``module`` (the tensors of one module together, named after its
    path; a root parameter after itself), ``tensor`` (one each) or ``all`` (one block)."""
    if by not in ("module", "tensor", "all"):
        raise UsageError(f"--blocks '{by}': choose module or tensor")
    if by == "all":
        return [ParamBlock("all", tuple(range(len(names))), 0, offsets[-1])]
    groups: list[tuple[str, list[int]]] = []
    for i, n in enumerate(names):
        key = n if by == "tensor" else (n.rpartition(".")[0] or n)
        if groups and groups[-1][0] == key:
            groups[-1][1].append(i)
        else:
            groups.append((key, [i]))
    seen: dict[str, int] = {}
    out = []
    for key, idx in groups:
        name = key
        if key in seen:  # a module whose tensors are not adjacent
            seen[key] += 1
            name = f"{key}#{seen[key]}"
        else:
            seen[key] = 0
        out.append(ParamBlock(name, tuple(idx), offsets[idx[0]], offsets[idx[-1] + 1]))
    return out


def _cast_floating(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    try:
        return module.to(dtype=dtype)
    except Exception:
        for p in list(module.parameters()) + list(module.buffers()):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        return module


def _first_tensor(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict):
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    return None


_BATCH_MSG = (
    "the model's output for a sample depends on the rest of the batch (batch statistics, "
    "e.g. BatchNorm in train mode or track_running_stats=False); its Hessian would depend on the batch size"
)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to rounding; NaN equals NaN (a NaN output is not a sign of randomness)."""
    if a.shape != b.shape:
        return False
    if torch.equal(a, b):
        return True
    if not a.is_floating_point():
        return False
    tol = 1e-4 if a.dtype == torch.float32 else 1e-9
    scale = max(a.nan_to_num(0.0, 0.0, 0.0).abs().max().item(), 1e-30)
    return bool(torch.allclose(a, b, rtol=0.0, atol=tol * scale, equal_nan=True))
