"""Hessian-vector products of affine chains (MLPs) in closed form, for many vectors at once.

A model whose forward pass, as ATen runs it, is a chain of affine layers with pointwise
activations between them,

    z_l = a_l W_lᵀ + b_l,    a_{l+1} = f_l(z_l),    a_0 = x (or any function of x alone),

followed by one of hesscli's losses ℓ(z_{L-1}, y), has the Hessian-vector product of Pearlmutter's
R-operator (Pearlmutter 1994, "Fast exact multiplication by the Hessian"), with V = (dW_l, db_l):

    forward   R z_l = R a_l W_lᵀ + a_l dW_lᵀ + db_l,          R a_{l+1} = f_l'(z_l) ⊙ R z_l
    top       R δ_{L-1} = ∇²_z ℓ · R z_{L-1}                      (closed form per loss)
    backward  (HV)_{W_l} = R δ_lᵀ a_l + δ_lᵀ R a_l,           (HV)_{b_l} = Σ_n R δ_l
              R δ_{l-1} = (R δ_l W_l + δ_l dW_l) ⊙ f'(z_{l-1}) + (δ_l W_l) ⊙ f''(z_{l-1}) ⊙ R z_{l-1}

where δ_l = ∂ℓ/∂z_l. Primal quantities (a_l, δ_l, f', (δ_l W_l) ⊙ f'') are computed once per data
piece; a batch of k vectors then costs six matrix products per layer, all of them with the k
vectors folded into one operand dimension (layout (N, k, h), so no operand is copied), and three
fused elementwise passes. autograd's double backward of the same chain runs about 40 ops per layer,
several of them accumulating (k, N, h) temporaries; this is 2–3× fewer passes over memory.

Recognition is by recording the ATen ops of one forward pass (a ``TorchDispatchMode``), so the
same code serves eager modules, torch.export programs and TorchScript, and is checked, not assumed:
:class:`Objective` compares these products with autograd's on the first piece before using them
(and the result is the same function of the weights either way). Anything else (convolutions,
norms, skip connections, weight sharing, ``--loss model``) falls back to autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hesscli.objective.losses import IGNORE_INDEX, Loss

__all__ = ["ChainProgram", "ChainLinearization", "NotAChain", "record_chain"]

aten = torch.ops.aten

# unary pointwise ops an activation may be made of (extra arguments are constants)
_POINTWISE = {
    aten.tanh.default, aten.sigmoid.default, aten.relu.default, aten.gelu.default, aten.silu.default,
    aten.elu.default, aten.leaky_relu.default, aten.softplus.default, aten.hardtanh.default,
    aten.mish.default, aten.sin.default, aten.cos.default, aten.exp.default, aten.celu.default,
    aten.selu.default, aten.hardswish.default, aten.hardsigmoid.default, aten.log1p.default,
}
# scaling by a Python number is pointwise too
_SCALAR_OPS = {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.pow.Tensor_Scalar}
# ops that give the same values in the same shape
_SAME = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.alias.default,
    aten.clone.default, aten.contiguous.default,
}
_TRANSPOSE = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}

_LOSSES = ("cross_entropy", "mse", "bce_with_logits", "nll")


class NotAChain(Exception):
    """The forward pass is not an affine chain (the message says where)."""


def _key(t: torch.Tensor):
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        ptr = id(t)
    return (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


class _Recorder(TorchDispatchMode):
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # otherwise torch wraps __torch_dispatch__ in torch._disable_dynamo, whose first call
        # imports torch._dynamo and sympy: about a second of start-up for nothing (no compilation here)
        return False

    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


def record_chain(forward: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list[tuple]]:
    """Run ``forward()`` without gradients and return its output and the ATen ops it ran."""
    rec = _Recorder()
    with torch.no_grad(), rec:
        out = forward()
    return out, rec.ops


@dataclass
class _Layer:
    w: int | None  # index into the parameter list, None when the weight is a constant
    b: int | None
    w_value: torch.Tensor | None = None  # the constant weight (w is None)
    b_value: torch.Tensor | None = None  # the constant bias (b is None; may stay None)
    op_at: int = -1  # position of the affine op in the recording
    in_at: int = -1  # position of the op whose result is the layer's input (-1: a constant)
    acts: tuple = ()  # (func, extra args, kwargs) applied after the layer, in order


@dataclass
class ChainProgram:
    """The structure of an affine chain, read from one recorded forward pass."""

    layers: list[_Layer]
    signature: tuple  # the recorded op sequence, to check later recordings against
    description: str

    @staticmethod
    def parse(ops: list[tuple], params: Sequence[torch.Tensor], x: torch.Tensor, out: torch.Tensor) -> ChainProgram:
        """Read the chain from a recording; raises :class:`NotAChain`."""
        role: dict = {}
        for i, p in enumerate(params):
            role[_key(p)] = ("param", i)
        layers: list[_Layer] = []
        used: set[int] = set()
        n = x.shape[0]

        def get(a):
            return role.get(_key(a)) if isinstance(a, torch.Tensor) else None

        def take(i):
            if i in used:
                raise NotAChain("a parameter is used twice (shared weights)")
            used.add(i)

        def current(r, what):
            if r is None:
                return None  # a constant: only the first layer may read one
            if r[0] in ("z", "a") and r[1] == len(layers) - 1:
                return r
            raise NotAChain(f"{what} reads something other than the previous layer's output")

        producer: dict = {}  # tensor key -> position of the op that made it
        for pos, (func, args, kwargs, res) in enumerate(ops):
            if isinstance(res, torch.Tensor):
                producer[_key(res)] = pos
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            for a in args:
                if isinstance(a, (list, tuple)):
                    tensors += [t for t in a if isinstance(t, torch.Tensor)]
            roles = [get(t) for t in tensors]
            if all(r is None for r in roles):
                continue  # depends on the inputs only: a constant
            if not isinstance(res, torch.Tensor):
                raise NotAChain(f"{_name(func)} is neither an affine layer nor a pointwise activation")
            r0 = get(args[0]) if args and isinstance(args[0], torch.Tensor) else None
            if func in _TRANSPOSE and r0 is not None and r0[0] == "param" and args[0].dim() == 2 and _is_2d_transpose(func, args):
                role[_key(res)] = ("wt", r0[1])
            elif func in (aten.addmm.default, aten.mm.default):
                if func is aten.addmm.default:
                    bias, a, wt = args[0], args[1], args[2]
                    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
                        raise NotAChain("addmm with scaling factors")
                else:
                    bias, (a, wt) = None, args[:2]
                rw, ra, rb = get(wt), get(a), get(bias) if bias is not None else None
                current(ra, "a layer")
                if ra is None and layers:
                    raise NotAChain("a later layer reads the inputs directly")
                layer = _Layer(None, None, op_at=pos, in_at=producer.get(_key(a), -1) if ra is not None else -1)
                if rw is None:
                    layer.w_value = wt.t()
                elif rw[0] == "wt":
                    take(rw[1])
                    layer.w = rw[1]
                else:
                    raise NotAChain("a matrix product whose right operand is not a transposed weight")
                if bias is not None:
                    if bias.dim() != 1:
                        raise NotAChain("a bias that is not a vector")
                    if rb is None:
                        layer.b_value = bias
                    elif rb[0] == "param":
                        take(rb[1])
                        layer.b = rb[1]
                    else:
                        raise NotAChain("a bias that depends on the weights")
                if layer.w is None and layer.b is None and ra is None:
                    continue
                layers.append(layer)
                role[_key(res)] = ("z", len(layers) - 1)
            elif func is aten.add.Tensor and r0 is not None and r0[0] == "z" and not layers[r0[1]].acts \
                    and layers[r0[1]].b is None and layers[r0[1]].b_value is None and len(args) == 2 \
                    and isinstance(args[1], torch.Tensor) and args[1].dim() == 1 and kwargs.get("alpha", 1) == 1:
                current(r0, "a bias")
                rb = get(args[1])
                if rb is None:
                    layers[-1].b_value = args[1]
                elif rb[0] == "param":
                    take(rb[1])
                    layers[-1].b = rb[1]
                else:
                    raise NotAChain("a bias that depends on the weights")
                role[_key(res)] = ("z", r0[1])
            elif ((base := _out_of_place(func)) in _POINTWISE or (base in _SCALAR_OPS and _scalar_args(args, kwargs))) \
                    and r0 is not None:
                current(r0, _name(func))
                if r0[0] not in ("z", "a") or res.shape != args[0].shape:
                    raise NotAChain(f"{_name(func)} is not pointwise here")
                layers[-1].acts += ((base, tuple(args[1:]), dict(kwargs)),)
                role[_key(res)] = ("a", r0[1])
            elif func in _SAME and r0 is not None and res.shape == args[0].shape and r0[0] in ("z", "a"):
                role[_key(res)] = r0
            elif func in _SAME and r0 is not None and r0[0] in ("z", "a") and res.shape[0] == n:
                role[_key(res)] = ("out", r0[1], tuple(res.shape[1:]))
            else:
                raise NotAChain(f"{_name(func)} is neither an affine layer nor a pointwise activation")

        if not layers:
            raise NotAChain("no affine layer")
        missing = [i for i in range(len(params)) if i not in used]
        if missing:
            raise NotAChain("a parameter is not a weight or bias of an affine layer")
        r = get(out)
        if r is None or r[1] != len(layers) - 1 or layers[-1].acts:
            raise NotAChain("the output is not the last layer's affine output")
        a0 = _layer_input(ops[layers[0].op_at])
        if a0.dim() != 2 or a0.shape[0] != n:
            raise NotAChain("the first layer's input is not a matrix (N, features)")
        signature = tuple(str(op[0]) for op in ops)
        acts = sorted({_name(f) for layer in layers for f, _, _ in layer.acts})
        widths = [a0.shape[1]] + [ops[la.op_at][3].shape[1] for la in layers]
        desc = "affine chain " + "-".join(str(w) for w in widths) + (f" ({', '.join(acts)})" if acts else "")
        return ChainProgram(layers, signature, desc)


def _out_of_place(func):
    """``aten.relu_.default`` → ``aten.relu.default`` (in-place activations, e.g.
    ``nn.ReLU(inplace=True)``); any other op as it is."""
    packet = getattr(func, "_schema", None) and func._schema.name.split("::")[-1]
    if not packet or not packet.endswith("_") or packet.startswith("_"):
        return func
    try:
        return getattr(getattr(aten, packet[:-1]), func._overloadname)
    except AttributeError:
        return func


def _weight_operand(op) -> torch.Tensor:
    func, args = op[0], op[1]
    return args[2] if func is aten.addmm.default else args[1]


def _name(func) -> str:
    """``aten.native_layer_norm.default`` → ``native_layer_norm``."""
    parts = str(func).split(".")
    return parts[1] if len(parts) > 2 else str(func)


def _layer_input(op) -> torch.Tensor:
    func, args = op[0], op[1]
    return args[1] if func is aten.addmm.default else args[0]


def _is_2d_transpose(func, args) -> bool:
    if func is aten.transpose.int:
        return sorted(d % 2 for d in args[1:3]) == [0, 1]
    if func is aten.permute.default:
        return list(args[1]) == [1, 0]
    return True


def _scalar_args(args, kwargs) -> bool:
    return len(args) == 2 and isinstance(args[1], (int, float)) and not kwargs


class ChainLinearization:
    """One piece's primal quantities for :class:`ChainProgram` products; the interface of
    :class:`hesscli.objective.core.Linearization` (``apply``), products unscaled."""

    def __init__(self, program: ChainProgram, ops: list[tuple], params: Sequence[torch.Tensor],
                 out: torch.Tensor, y: torch.Tensor, loss: Loss):
        sig = tuple(str(op[0]) for op in ops)
        if sig != program.signature:
            raise NotAChain("the forward pass ran different ops on this piece")
        self.program = program
        L = len(program.layers)
        self.W: list[torch.Tensor] = []
        self.A: list[torch.Tensor] = []  # input of each layer
        Z: list[torch.Tensor] = []
        for la in program.layers:
            self.A.append(_layer_input(ops[la.op_at]))
            # the same ops in the same order, but also the same data flow: each layer reads the
            # previous one's result, and multiplies by the same weight
            if la.in_at >= 0 and _key(self.A[-1]) != _key(ops[la.in_at][3]):
                raise NotAChain("a layer read another input on this piece")
            if la.w is not None and _weight_operand(ops[la.op_at]).untyped_storage().data_ptr() != params[la.w].untyped_storage().data_ptr():
                raise NotAChain("a layer used another weight on this piece")
            self.W.append(params[la.w] if la.w is not None else la.w_value)
            # z = a Wᵀ + b anew: the recorded one may have been overwritten by an in-place activation
            b = params[la.b] if la.b is not None else la.b_value
            Z.append(torch.addmm(b, self.A[-1], self.W[-1].t()) if b is not None else self.A[-1] @ self.W[-1].t())
        self.n = out.shape[0]
        zt = Z[-1].detach().requires_grad_(True)
        with torch.enable_grad():
            total = loss.total(zt.reshape(out.shape), y)
            (dz,) = torch.autograd.grad(total, zt)
        self.delta: list[torch.Tensor | None] = [None] * L
        self.delta[-1] = dz
        self._top = _loss_curvature(loss, Z[-1], out.shape, y)
        self.s1: list[torch.Tensor | None] = [None] * L
        self.c2: list[torch.Tensor | None] = [None] * L
        for i in range(L - 1, 0, -1):
            dt = self.delta[i] @ self.W[i]  # ∂ℓ/∂a_i
            acts = program.layers[i - 1].acts
            if acts:
                s1, s2 = _derivatives(acts, Z[i - 1])
                self.s1[i - 1] = s1
                self.c2[i - 1] = dt * s2 if s2 is not None else None
                self.delta[i - 1] = dt * s1
            else:
                self.delta[i - 1] = dt
        self.slots: dict[int, tuple[int, str]] = {}
        for i, la in enumerate(program.layers):
            if la.w is not None:
                self.slots[la.w] = (i, "w")
            if la.b is not None:
                self.slots[la.b] = (i, "b")
        self.nbytes = sum(t.numel() * t.element_size() for t in self.A + self.delta + self.s1 + self.c2 if t is not None)

    def apply(self, vectors: Sequence[torch.Tensor], of: Sequence[int], wrt: Sequence[int], batched: bool) -> list[torch.Tensor]:
        """∂/∂θ_wrt of Σ_{j in of} ⟨g_j, v_j⟩ (see :class:`hesscli.objective.core.Linearization`)."""
        if not batched:
            return [r[0] for r in self.apply([v.unsqueeze(0) for v in vectors], of, wrt, True)]
        L = len(self.W)
        k = vectors[0].shape[0]
        N = self.n
        dW: list[torch.Tensor | None] = [None] * L
        db: list[torch.Tensor | None] = [None] * L
        for j, v in zip(of, vectors):
            i, what = self.slots[j]
            if what == "w":
                dW[i] = v
            else:
                db[i] = v
        given = [i for i in range(L) if dW[i] is not None or db[i] is not None]
        need = [self.slots[j][0] for j in wrt]
        out_shapes = {j: (k,) + tuple(self._shape(j)) for j in wrt}
        if not given:
            return [self.W[0].new_zeros(out_shapes[j]) for j in wrt]
        lo, ml = min(given), min(need)
        RZ: list[torch.Tensor | None] = [None] * L
        RA: list[torch.Tensor | None] = [None] * L  # R of each layer's input
        for i in range(lo, L):
            W = self.W[i]
            out_f, in_f = W.shape
            if dW[i] is not None:
                rz = torch.mm(self.A[i], dW[i].permute(2, 0, 1).reshape(in_f, k * out_f)).view(N, k, out_f)
            else:
                rz = self.A[i].new_zeros(N, k, out_f)
            if RA[i] is not None:
                _acc_mm(rz.view(N * k, out_f), RA[i].view(N * k, in_f), W.t())
            if db[i] is not None:
                rz += db[i]
            RZ[i] = rz
            if i + 1 < L:
                RA[i + 1] = rz * self.s1[i][:, None, :] if self.s1[i] is not None else rz
        rd = self._top(RZ[-1])
        res: dict[tuple[int, str], torch.Tensor] = {}
        for i in range(L - 1, ml - 1, -1):
            W = self.W[i]
            out_f, in_f = W.shape
            gw = torch.mm(rd.view(N, k * out_f).t(), self.A[i]).view(k, out_f, in_f)
            if RA[i] is not None:
                gw += torch.mm(self.delta[i].t(), RA[i].view(N, k * in_f)).view(out_f, k, in_f).transpose(0, 1)
            res[(i, "w")] = gw
            res[(i, "b")] = rd.sum(0)
            if i - 1 >= ml:
                rdt = torch.mm(rd.view(N * k, out_f), W).view(N, k, in_f)
                if dW[i] is not None:
                    _acc_mm(rdt.view(N, k * in_f), self.delta[i], dW[i].transpose(0, 1).reshape(out_f, k * in_f))
                if self.s1[i - 1] is not None:
                    rdt *= self.s1[i - 1][:, None, :]
                if self.c2[i - 1] is not None and RZ[i - 1] is not None:
                    rdt.addcmul_(self.c2[i - 1][:, None, :], RZ[i - 1])
                rd = rdt
        return [res[self.slots[j]].reshape(out_shapes[j]) for j in wrt]

    def _shape(self, j: int) -> tuple:
        i, what = self.slots[j]
        return tuple(self.W[i].shape) if what == "w" else (self.W[i].shape[0],)


def _acc_mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b in place (the ``out=`` form of addmm, which flop counters see; ``addmm_`` they miss)."""
    torch.addmm(out, a, b, out=out)


def _derivatives(acts, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """f'(z) and f''(z), elementwise, of the pointwise function the recorded ops compose."""
    zq = z.detach().requires_grad_(True)
    with torch.enable_grad():
        a = zq
        for func, extra, kw in acts:
            a = func(a, *extra, **kw)
        (s1,) = torch.autograd.grad(a.sum(), zq, create_graph=True)
        if not s1.requires_grad:
            return s1.detach(), None
        (s2,) = torch.autograd.grad(s1.sum(), zq, allow_unused=True)
    return s1.detach(), (s2.detach() if s2 is not None else None)


def _loss_curvature(loss: Loss, z: torch.Tensor, out_shape: torch.Size, y: torch.Tensor):
    """r ↦ ∇²_z ℓ · r for r of shape (N, k, C), in closed form (z: the last layer's (N, C))."""
    name = loss.name
    if name not in _LOSSES:
        raise NotAChain(f"--loss {name}")
    if name == "mse":
        return lambda r: 2.0 * r
    if name == "nll":  # linear in the log-probabilities
        return lambda r: torch.zeros_like(r)
    if name == "bce_with_logits":
        s = torch.sigmoid(z)
        h = (s * (1 - s))[:, None, :]
        return lambda r: h * r
    # cross_entropy on (N, C) logits: (diag(p) − p pᵀ) r per sample, ignored targets give 0
    if len(out_shape) != 2:
        raise NotAChain("cross_entropy on outputs that are not (N, C)")
    p = torch.softmax(z, dim=1)
    p = (p * (y != IGNORE_INDEX).to(p.dtype)[:, None])[:, None, :]

    def top(r):
        pr = p * r
        pr -= p * pr.sum(2, keepdim=True)
        return pr

    return top
