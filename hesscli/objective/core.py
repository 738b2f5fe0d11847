"""The objective every second-order algorithm consumes.

    L(θ) = (1/n) Σ_pieces Σ_{terms t in piece} ℓ_t(θ)        (reduction mean; sum drops the 1/n)

over the selected parameters θ (SPEC.md, Loss): each micro-batch ("piece") contributes the sum of
its loss terms and the mean divides once by the total count n = ``n_loss_terms``, so the Hessian
does not depend on ``--batch-size``, on the split into shards, or on the number of ranks.

One product route for every model format (eager, TorchScript scripted or traced, torch.export):
the leaves are the model's **own parameter tensors** (``requires_grad_``), the model is called as
it is, and Hessian-vector products are reverse-over-reverse (Pearlmutter 1994) by plain autograd —
per piece, the gradient g(θ) is computed once with its graph (:class:`Linearization`), and
H·v = ∂(gᵀv)/∂θ is one more backward pass; many vectors go through one batched backward
(``is_grads_batched``). Nothing is substituted into the model, so every use of a weight is seen:
tied weights, the flat weight list of a scripted RNN, scripted control flow. Plain double backward
is right for ``layer_norm`` and ``instance_norm`` (NOTES.md); the ops torch cannot differentiate
twice at all are swapped by :mod:`hesscli.objective.safeops`.

At load time a **derivative self-check** compares autograd's directional derivative of the loss
with central finite differences (Richardson-extrapolated) of the model itself, per group of
parameter tensors; a weight that autograd does not see (read through ``.detach()``, ``.data`` or a
copy) is refused by name instead of becoming a silent zero row.

When the model is an affine chain (an MLP; :mod:`hesscli.objective.chain`) and ``engine`` allows it, a piece's
linearisation is instead the chain's primal quantities, whose products are the same H·v in closed
form, checked against autograd's on the first samples before they are used.

**Gradient graphs and memory** (:meth:`Objective.plan_graphs`). A piece's linearisation (its
gradient graph, or the chain's quantities) is what a product needs. With one piece it is built once
and kept. With several, products keep every piece's graph only when a graph budget was given
(``cache_bytes``, or :meth:`Objective.plan_graphs` from a memory plan) and all the graphs fit it,
measured as the bytes each graph holds: then ``graph_policy`` is ``"kept"`` and once a product has
built them no forward pass is repeated. Otherwise it is ``"recomputed"``: every product re-runs the
forward and backward pass of each piece, one graph alive at a time (and a note says so when a budget
was too small). Without a budget nothing is kept, so a consumer that never planned for the graphs
(the dense Hessian, whose one pass uses :meth:`linearizations`, and its symmetry probe) holds one
graph at a time.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from hesscli.errors import HesscliError, UsageError
from hesscli.io.data import Dataset
from hesscli.io.loading import reason
from hesscli.objective.chain import ChainLinearization, ChainProgram, NotAChain, record_chain
from hesscli.objective.losses import Loss, causal_lm_loss, resolve_loss
from hesscli.objective.outputs import model_loss, prediction
from hesscli.objective.safeops import float64_everywhere, second_order_safe
from hesscli.objective.ties import tied_parameters, unique_parameters
from hesscli.runtime.devices import no_tf32, resolve_device, resolve_dtype
from hesscli.runtime.memory import default_budget, fmt_bytes

__all__ = ["Objective", "Linearization", "ParamBlock", "ENGINES", "param_blocks", "asymmetry_tolerance"]

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
        """The number of parameters in the block."""
        return self.stop - self.start


class Linearization:
    """One piece's gradient g(θ) with its graph: applies v ↦ ∂(gᵀv)/∂θ for many v.

    Products are unscaled (the piece's sum of loss terms); :class:`Objective` scales and reduces.
    A sparse gradient (a scripted ``Embedding(sparse=True)``) is densified first, which is
    differentiable; where autograd's batched backward (``is_grads_batched``) cannot run an op, the
    vectors go one at a time.
    """

    def __init__(self, leaves: list[torch.Tensor], grads: list[torch.Tensor | None], shared: dict | None = None):
        self._last = None
        self.leaves = leaves
        self.shared = shared if shared is not None else {}  # the objective's: {"batched": False} once batching failed
        self.grads = [g.to_dense() if g is not None and g.is_sparse else g for g in grads]
        self.nbytes = 0  # bytes its graph holds (saved tensors), set by the objective that built it

    def apply(
        self,
        vectors: Sequence[torch.Tensor],
        of: Sequence[int],
        wrt: Sequence[int],
        batched: bool,
    ) -> list[torch.Tensor]:
        """∂/∂θ_wrt of Σ_{j in of} ⟨g_j, v_j⟩, for ``vectors`` shaped like θ_of (with a leading
        batch dimension when ``batched``). Returns one tensor per ``wrt``, zeros where θ_wrt does
        not enter. Raises :class:`HesscliError` naming the op when torch has no second derivative
        for one of the model's ops."""
        try:
            return self._apply(vectors, of, wrt, batched)
        except (NotImplementedError, RuntimeError) as e:
            m = re.search(r"derivative for '?([\w.:]+)'? is not implemented", str(e))
            if m is None:
                raise
            raise HesscliError(
                f"torch has no second derivative for {m.group(1)}, which the model calls; an eager model "
                "(safetensors + --arch) gets equivalent ops for embedding_bag and sparse embeddings"
            ) from None
        finally:
            self._last = None

    def _apply(self, vectors, of, wrt, batched) -> list[torch.Tensor]:
        outs, gouts = [], []
        for j, v in zip(of, vectors):
            g = self.grads[j]
            if g is not None and g.requires_grad:
                outs.append(g)
                gouts.append(v)
        inputs = [self.leaves[i] for i in wrt]
        k = vectors[0].shape[0] if batched else None
        if not outs:
            res = [None] * len(inputs)
        elif batched and not (self.shared.get("batched", True) and self._try_batched(outs, inputs, gouts)):
            res = self._one_by_one(outs, inputs, gouts, k)
        elif batched:
            res = self._last
        else:
            res = torch.autograd.grad(outs, inputs, gouts, retain_graph=True, allow_unused=True)
        full = []
        for r, x in zip(res, inputs):
            if r is None:
                r = x.new_zeros(((k,) if batched else ()) + tuple(x.shape))
            elif r.is_sparse:
                r = r.to_dense()
            full.append(r)
        return full

    def _try_batched(self, outs, inputs, gouts) -> bool:
        try:
            self._last = torch.autograd.grad(outs, inputs, gouts, retain_graph=True, allow_unused=True, is_grads_batched=True)
            return True
        except (RuntimeError, NotImplementedError):  # an op without a batching rule (e.g. sparse)
            self.shared["batched"] = False
            return False

    def _one_by_one(self, outs, inputs, gouts, k):
        rows = []
        for i in range(k):
            rows.append(torch.autograd.grad(outs, inputs, [v[i] for v in gouts], retain_graph=True, allow_unused=True))
        return [None if rows[0][t] is None else torch.stack([r[t].to_dense() if r[t].is_sparse else r[t] for r in rows])
                for t in range(len(inputs))]


@dataclass
class ObjectiveInfo:
    notes: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class Objective:
    """The training loss of a model on a data set, as a function of the selected parameters.

    ``module`` is deep-copied first (``copy=True``, the default), so the caller's module is left as
    it was: hesscli casts, moves and sets ``requires_grad`` on the parameters it differentiates.
    ``copy=False`` works on the module itself (what the command line does with a module it loaded). Raises :class:`HesscliError` for models and data that cannot give a right Hessian
    (non-finite outputs, randomness, batch dependence, weights autograd does not see), and
    :class:`UsageError` for bad options.
    """

    def __init__(
        self,
        module: nn.Module,
        data: Dataset,
        *,
        loss: str = "auto",
        reduction: str = "mean",
        params: str | None = None,
        trainable_only: bool = False,
        batch_size: int | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        comm=None,
        check: bool = True,
        cache_bytes: int | None = None,
        example: tuple[torch.Tensor, torch.Tensor] | None = None,
        engine: str = "auto",
        output_key: str | None = None,
        static_batch: int | None = None,
        copy: bool = True,
        head=None,
    ):
        if engine not in ENGINES:
            raise UsageError(f"--engine '{engine}': choose auto, autograd or chain")
        self.engine = engine
        self.chain: ChainProgram | None = None
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
        self.data = data
        self.info = ObjectiveInfo()
        self.static_batch = static_batch
        if static_batch is not None:
            asked = "" if batch_size in (None, static_batch) else f", not --batch-size {batch_size}"
            self.info.notes.append(
                f"the torch.export archive accepts batches of exactly {static_batch} samples: micro-batches of "
                f"{static_batch}{asked}, a short last one padded with copies of its last sample whose outputs are dropped"
            )
            batch_size = static_batch
        self.batch_size = batch_size
        self.comm = comm
        self.output_key = output_key
        self.head = head  # hesscli.io.hf.HFInfo of a Hugging Face model: --loss auto follows its head
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        if copy:
            module = _copy_module(module)
        self.module = module
        self.is_script = isinstance(module, torch.jit.ScriptModule)
        everything = unique_parameters(module)
        if isinstance(dtype, torch.dtype):
            self.dtype = dtype
        else:
            self.dtype = resolve_dtype(dtype, [p.dtype for _, p in everything])
        self.tied = tied_parameters(module)
        frozen = [n for n, p in everything if not p.requires_grad]
        _cast_in_place(module, self.device, self.dtype)
        self.hvps = 0
        self.reduction = reduction

        named = list(everything)
        if trainable_only:
            named = [(n, p) for n, p in named if n not in frozen]
            if not named:
                raise UsageError("--trainable-only: every parameter of the model has requires_grad=False")
        if params:
            try:
                rx = re.compile(params)
            except re.error as e:
                raise UsageError(f"--params '{params}' is not a regular expression: {e}") from None
            named = [(n, p) for n, p in named if rx.search(n)]
            if not named:
                avail = ", ".join(n for n, _ in everything)
                raise UsageError(f"--params '{params}' selects no parameter; the model has: {avail}")
        if not named:
            raise HesscliError("the model has no parameters")
        for n, p in everything:
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise HesscliError(f"parameter '{n}' {tuple(p.shape)} contains NaN or Inf")
        self.frozen = frozen
        frozen_in = [n for n, _ in named if n in frozen]
        if frozen_in:
            size = sum(p.numel() for n, p in named if n in frozen)
            self.info.notes.append(
                f"{len(frozen_in)} tensor(s) ({size:,} parameters) have requires_grad=False and are included: "
                f"{', '.join(frozen_in[:6])}{' ...' if len(frozen_in) > 6 else ''}; pass --trainable-only "
                "(or --params) to leave them out"
            )
        if self.tied:
            self.info.notes.append(
                "tied weights are one parameter: " + ", ".join(f"{t['name']} = {t['tied_to']}" for t in self.tied)
            )
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.P = self.offsets[-1]
        chosen = {id(p) for _, p in named}
        for _, p in everything:  # the selected tensors are the leaves; the rest are constants
            p.requires_grad_(id(p) in chosen)
        self.theta = [p for _, p in named]
        self._plain = [p.detach() for p in self.theta]  # the same storage, without autograd

        self.loss: Loss | None = None
        self._piece_counts: list[float] = []
        self._cache: list[Linearization] | None = None
        self._cache_bytes = cache_bytes  # the graph budget (None: none given, graphs are not kept)
        self.linearization_bytes = 0  # the largest gradient graph measured (bytes)
        self._policy_noted = False
        self.derivative_check: dict = {}
        self._lin_state: dict = {}
        self._loss_form: str | None = None
        self._example = example
        self._setup(loss, reduction, check)

    # ------------------------------------------------------------------ evaluating the model

    @contextlib.contextmanager
    def evaluating(self):
        """Context for every evaluation: :func:`hesscli.objective.safeops.second_order_safe`, and for a
        TorchScript module the graph executor's optimisation off (its profiling executor
        specialises graphs after warm-up, NOTES.md; eager interpretation is what autograd sees),
        and TF32 off on CUDA. Every setting is the caller's again on exit."""
        with contextlib.ExitStack() as st:
            st.enter_context(no_tf32())
            if self.is_script:
                st.enter_context(torch.jit.optimized_execution(False))
            st.enter_context(second_order_safe())
            st.enter_context(float64_everywhere(self.dtype == torch.float64 and not self.is_script))
            yield

    def _move(self, x, y: torch.Tensor) -> tuple:
        def move(t):
            if t.is_floating_point():
                t = t.to(self.dtype)
            return t.to(self.device, non_blocking=True)

        xd = {k: move(v) for k, v in x.items()} if isinstance(x, dict) else move(x)
        return xd, move(y)

    def _raw(self, *args):
        try:
            if isinstance(args[0], dict):  # keyword inputs; the target of --loss model as labels=
                return self.module(**args[0], **({"labels": args[1]} if len(args) > 1 else {}))
            return self.module(*args)
        except HesscliError:
            raise
        except Exception as e:
            x = args[0]
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else (
                "{" + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in x.items()) + "}" if isinstance(x, dict) else "?")
            hint = ""
            if self.static_batch is not None:
                hint = f" (the torch.export archive accepts batches of exactly {self.static_batch} samples)"
            raise HesscliError(
                f"the model's forward failed on inputs {shape}{self.data.where()}{hint}: {reason(e)}"
            ) from None

    def forward(self, x, y: torch.Tensor | None = None):
        """The model's output on one piece (``model(x)``, or ``model(x, y)`` for ``--loss model``).

        For an archive exported with a fixed batch size B, the piece is evaluated B samples at a
        time, the last chunk padded with copies of its last sample whose outputs are dropped (such a
        model's outputs do not depend on the rest of the batch: :meth:`_check_model`)."""
        args = (x,) if y is None else (x, y)
        B = self.static_batch
        if B is None or not isinstance(x, torch.Tensor) or x.shape[0] == B:
            return self._raw(*args)
        if y is not None:
            raise HesscliError(
                f"--loss model with a torch.export archive that accepts batches of exactly {B} samples needs pieces of "
                f"exactly {B} (this one has {x.shape[0]}); export with dynamic_shapes="
                "{'x': {0: torch.export.Dim('batch')}} or use one of hesscli's losses"
            )
        outs = []
        for s in range(0, x.shape[0], B):
            part = x[s : s + B]
            n = part.shape[0]
            if n < B:
                part = torch.cat([part, part[-1:].expand((B - n,) + tuple(part.shape[1:]))])
            out = self._raw(part)
            if not isinstance(out, torch.Tensor):
                out = prediction(out, self.output_key)
            outs.append(out[:n])
        return torch.cat(outs)

    def _prediction(self, out) -> torch.Tensor:
        """The prediction of an output; :meth:`forward` has already chosen it for a fixed-batch
        archive evaluated in chunks."""
        if isinstance(out, torch.Tensor) and self.static_batch is not None:
            return out
        return prediction(out, self.output_key)

    def piece_total(self, x, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The sum of the loss terms of one piece (inputs on the device) and their count (for
        ``--loss model`` returning ``(sum, count)``, the count it returns, a real number)."""
        if self.loss.name == "model":
            ml = model_loss(self.forward(x, y), _n(x), self._loss_form)
            return ml.total, ml.count
        out = self._prediction(self.forward(x))
        return self.loss.total(out, y), float(self.loss.count(out.shape, y))

    # ------------------------------------------------------------------ set-up and checks

    def _setup(self, loss_name: str, reduction: str, check: bool) -> None:
        first = self.data.first(8 if self.static_batch is None else max(8, self.static_batch))
        if first is None:  # a rank without data: resolve the loss on an example batch, check nothing
            if loss_name == "model" or self._example is None:
                self.loss = resolve_loss("model" if loss_name == "model" else "mse", reduction, torch.zeros(1), torch.zeros(1))
            else:
                with torch.no_grad(), self.evaluating():
                    xe, ye = self._example
                    out = self._prediction(self.forward(self._move(xe, ye)[0]))
                    self.loss = self._resolve(loss_name, reduction, out, ye)
        counts: list[float] = []
        total = 0.0
        mean_pieces = 0
        with torch.no_grad(), self.evaluating():
            if first is not None:
                x0, y0 = self._move(*first)
                if loss_name == "model":
                    out0 = self.forward(x0, y0)
                    self.loss = resolve_loss("model", reduction, out0, y0)
                    # readable as a loss (fail here, before any work), and read the same way on every piece
                    self._loss_form = "mean" if model_loss(out0, _n(x0)).mean else "pair"
                else:
                    out0 = self.forward(x0)
                    self.loss = self._resolve(loss_name, reduction, self._prediction(out0), first[1])
                if check:
                    self._check_model(x0, y0, out0)
            for x, y in self.data.pieces(self.batch_size):
                if self.loss.name == "model":
                    xd, yd = self._move(x, y)
                    ml = model_loss(self.forward(xd, yd), _n(xd), self._loss_form)
                    s, c = ml.total, ml.count
                    mean_pieces += ml.mean
                else:
                    xd = self._move(x, y[:0])[0]
                    out = self._prediction(self.forward(xd))
                    self._resolve(self.loss, reduction, out, y)  # checks the targets on the CPU
                    yd = self._move(x[:0] if isinstance(x, torch.Tensor) else x, y)[1]
                    c = float(self.loss.count(out.shape, y))
                    s = self.loss.total(out, yd)
                s = float(s)
                if not math.isfinite(s):
                    raise HesscliError(
                        f"the loss is {'NaN' if math.isnan(s) else 'infinite'} on a batch of {_n(x)} samples"
                        f"{self.data.where()} "
                        "(check the inputs, the weights and --loss)"
                    )
                counts.append(c)
                total += s
        self._piece_counts = counts
        n_terms = torch.tensor([float(sum(counts)), total, float(mean_pieces), float(len(counts))], dtype=torch.float64)
        n_samples = torch.tensor([float(self.data.n_samples)], dtype=torch.float64)
        if self.comm is not None:
            self.comm.all_reduce(n_terms)
            self.comm.all_reduce(n_samples)
        terms = n_terms[0].item()
        self.n_loss_terms = int(round(terms)) if abs(terms - round(terms)) < 1e-9 * max(1.0, terms) else terms
        self.n_samples = int(round(n_samples[0].item()))
        if not self.n_loss_terms > 0:
            raise HesscliError("the data has no loss terms (every target is ignored, or there are no samples)")
        if n_terms[2].item() > 0 and n_terms[3].item() > 1:
            self.info.warnings.append(
                f"--loss model: the model returns a mean loss and the data is evaluated in {int(n_terms[3].item())} pieces, "
                "so each piece's mean is weighted by its number of samples; a loss whose terms carry weights (class or "
                "sample weights, ignored targets) then differs from the model's loss on the whole data set. Return the "
                "pair (sum, count) from the model to make it exact"
            )
        self.scale = 1.0 / self.n_loss_terms if reduction == "mean" else 1.0
        self.loss_value = n_terms[1].item() * self.scale
        if check and first is not None:
            self._check_derivatives(first)
        if self.engine == "chain" and self.loss.name == "model":
            raise UsageError("--engine chain needs one of hesscli's losses, not --loss model")
        if first is not None and engine_wanted(self.engine, self.loss.name):
            self._detect_chain(first)

    def _resolve(self, loss: str | Loss, reduction: str, outputs: torch.Tensor, targets: torch.Tensor) -> Loss:
        """``--loss`` checked against one piece's outputs and (CPU) targets. ``auto`` on a Hugging
        Face model follows its head (SPEC.md, Loss); a resolved :class:`Loss` is re-checked as it is."""
        if isinstance(loss, Loss):
            if loss.shift:
                return causal_lm_loss(reduction, outputs, targets.cpu())
            if loss.reshape_targets and targets.numel() == outputs.numel():
                targets = targets.reshape(outputs.shape)
            return replace(resolve_loss(loss.name, reduction, outputs, targets.cpu()), reshape_targets=loss.reshape_targets)
        if loss != "auto" or self.head is None:
            return resolve_loss(loss, reduction, outputs, targets)
        head = self.head
        if head.head == "causal_lm":
            return causal_lm_loss(reduction, outputs, targets)
        if head.head in ("masked_lm", "token_classification"):
            return resolve_loss("cross_entropy", reduction, outputs, targets)
        if head.head == "sequence_classification":
            kind = head.problem_type
            if kind is None:  # as transformers infers it
                if head.num_labels == 1:
                    kind = "regression"
                elif not targets.is_floating_point():
                    kind = "single_label_classification"
                else:
                    kind = "multi_label_classification"
            if kind == "regression":
                like = targets.reshape(outputs.shape) if targets.numel() == outputs.numel() else targets
                return replace(resolve_loss("mse", reduction, outputs, like), reshape_targets=True)
            if kind == "single_label_classification":
                return resolve_loss("cross_entropy", reduction, outputs, targets)
            return resolve_loss("bce_with_logits", reduction, outputs, targets)
        raise HesscliError(
            f"--loss auto does not know the loss of {head.class_name}'s head: pass --loss model (the model's own loss) "
            "or --loss cross_entropy|mse|nll|bce_with_logits (applied to its logits)"
        )

    def _check_model(self, x, y, out0) -> None:
        """Refuse models whose outputs are not finite, are random (dropout baked in) or depend on
        the batch."""
        args = (x, y) if self.loss.name == "model" else (x,)
        a = _first_tensor(out0, self.output_key)
        if a is not None and a.is_floating_point() and not torch.isfinite(a).all():
            bad = (~torch.isfinite(a)).reshape(a.shape[0], -1).any(1).nonzero() if a.dim() else a.new_zeros(0, 1)
            where = f" (first at sample {int(bad[0, 0])})" if a.dim() and a.shape[0] == _n(x) and bad.numel() else ""
            raise HesscliError(f"the model's outputs contain NaN or Inf{where} although its inputs and weights are finite")
        out1 = self.forward(*args)
        b = _first_tensor(out1, self.output_key)
        if a is not None and b is not None and not _close(a, b):
            raise HesscliError(
                "the model's outputs change between two identical calls (dropout or other randomness "
                "baked in, e.g. traced or exported in train mode); its Hessian would depend on chance"
            )
        n = _n(x)
        if self.loss.name == "model" or n < 2 or a is None or a.dim() == 0 or a.shape[0] != n:
            return
        # a sub-batch of 2 when there are 3 or more samples (BatchNorm refuses a batch of 1), else of 1
        k = 2 if n >= 3 else 1
        try:
            part = _first_tensor(self.forward(_slice(x, k)), self.output_key)
        except HesscliError as e:
            raise HesscliError(f"{_BATCH_MSG} (a batch of {k} fails: {e})") from None
        if part is not None and part.shape[1:] == a.shape[1:] and not _close(part[:k], a[:k]):
            raise HesscliError(_BATCH_MSG)

    def _check_derivatives(self, first) -> None:
        """The derivative self-check (module docstring): per group of parameter tensors, autograd's
        derivative of the loss along a random direction against Richardson-extrapolated central
        differences of the loss the model computes with the weights it actually reads. Names the
        tensors at fault; also finds the parameters that get no gradient."""
        t0 = time.perf_counter()
        x, y = self._move(*first)
        with self.evaluating():
            total, _ = self.piece_total(x, y)
            if total.requires_grad:
                grads = torch.autograd.grad(total, self.theta, allow_unused=True)
            else:
                grads = [None] * len(self.theta)
        self.info.unused = [n for n, g in zip(self.names, grads) if g is None]
        for n, g in zip(self.names, grads):
            if g is not None and not torch.isfinite(g.to_dense() if g.is_sparse else g).all():
                raise HesscliError(
                    f"the gradient of the loss w.r.t. parameter '{n}' contains NaN or Inf although the loss is finite "
                    "(an op whose derivative is undefined at these inputs, e.g. sqrt or norm at 0); its Hessian is undefined"
                )
        gen = torch.Generator().manual_seed(20240611)
        scale_all = math.sqrt(sum(float((p.double() ** 2).sum()) for p in self._plain) / max(self.P, 1)) or 1.0
        dirs = []
        for p in self._plain:
            rms = math.sqrt(float((p.double() ** 2).mean())) if p.numel() else 0.0
            d = torch.randn(p.shape, generator=gen, dtype=torch.float64) * (rms or scale_all)
            dirs.append(d.to(p.device, p.dtype))
        saved = [p.clone() for p in self._plain]
        T = len(self.theta)
        n_groups = min(T, 6)
        groups = [list(range(T * i // n_groups, T * (i + 1) // n_groups)) for i in range(n_groups)]
        stats = {"forwards": 0, "worst": 0.0}

        def ad(idx):
            return sum(float((g.double() * dirs[i].double()).sum()) for i in idx if (g := grads[i]) is not None)

        def f(idx, h):
            with torch.no_grad():
                for i in idx:
                    self._plain[i].copy_(saved[i] + h * dirs[i])
                try:
                    return float(self.piece_total(x, y)[0])
                finally:
                    for i in idx:
                        self._plain[i].copy_(saved[i])
                    stats["forwards"] += 1

        def agrees(idx) -> tuple[bool, float, float]:
            a = ad(idx)
            eps = float(torch.finfo(self.dtype).eps)
            rel = 1e-7 if self.dtype == torch.float64 else 1e-4
            h = 1e-3 if self.dtype == torch.float64 else 3e-2
            D = a
            for _ in range(2):  # a smaller step when the first straddles a kink (ReLU) or the loss curves fast
                fp, fm, fp2, fm2, fph, fmh = (f(idx, t) for t in (h, -h, 2 * h, -2 * h, h / 2, -h / 2))
                d_h = (8 * (fp - fm) - (fp2 - fm2)) / (12 * h)
                d_half = (8 * (fph - fmh) - (fp - fm)) / (6 * h)
                big = max(abs(v) for v in (fp, fm, fp2, fm2, fph, fmh))
                # measured noise (two step sizes) + the rounding bound of the 4-point formula + a relative floor
                tol = 3 * abs(d_h - d_half) + 3 * eps * big / h + rel * max(abs(a), abs(d_half))
                D = d_half
                err = abs(a - D)
                stats["worst"] = max(stats["worst"], err / max(abs(D), abs(a), 1e-300))
                if err <= tol:
                    return True, a, D
                h /= 10
            return False, a, D

        with self.evaluating():
            bad = []
            for g in groups:
                ok, a, D = agrees(g)
                if not ok:
                    singles = [(i, agrees([i])) for i in g] if len(g) > 1 else [(g[0], (ok, a, D))]
                    culprits = [(i, r) for i, r in singles if not r[0]] or [(g[0], (ok, a, D))]
                    bad.extend(culprits)
            # a tensor autograd gives no gradient at all must not change the loss, to any order (a
            # first-derivative check is blind at a stationary point): perturb it alone, ±h
            for i in range(len(self.names)):
                if grads[i] is None and not any(j == i for j, _ in bad):
                    f0 = f([], 0.0)
                    h = 3e-2
                    moved = max(abs(f([i], h) - f0), abs(f([i], -h) - f0))
                    if moved > 16 * float(torch.finfo(self.dtype).eps) * max(abs(f0), 1e-30):
                        bad.append((i, (False, 0.0, moved / h)))
        self.derivative_check = {
            "seconds": round(time.perf_counter() - t0, 4),
            "forwards": stats["forwards"],
            "groups": len(groups),
            "samples": _n(x),
        }
        if bad:
            names = ", ".join(f"'{self.names[i]}' (autograd {r[1]:.4g}, finite differences {r[2]:.4g})" for i, r in bad[:4])
            raise HesscliError(
                f"the loss's derivative along parameter {names} disagrees with finite differences of the model: the model "
                "reads these weights in a way autograd does not see (through .detach(), .data or a copy), so their Hessian "
                "would be wrong; save the model so that its forward uses its parameters directly"
            )
        if self.info.unused:
            self.info.notes.append(
                "parameters that get no gradient (their Hessian rows are zero; perturbing them does not change the loss): "
                + ", ".join(self.info.unused)
            )

    def _detect_chain(self, first) -> None:
        """Use :mod:`hesscli.objective.chain`'s closed-form products when the model is an affine chain and
        they agree with autograd's on the first samples (two random vectors)."""
        x, y = self._move(*first)
        if not isinstance(x, torch.Tensor) or self.static_batch is not None or self.output_key is not None:
            return
        try:
            with self.evaluating():
                out, ops = record_chain(lambda: self.forward(x))
            if not isinstance(out, torch.Tensor):
                raise NotAChain("the model returns a structured output")
            program = ChainProgram.parse(ops, self._plain, x, out)
            lin = ChainLinearization(program, ops, self._plain, out, y, self.loss)
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

    def linearize(self, x, y: torch.Tensor) -> Linearization | ChainLinearization:
        """What products on this piece need: the closed-form chain quantities
        (:mod:`hesscli.objective.chain`) when the model is a checked affine chain, else the gradient with its
        graph (:class:`Linearization`)."""
        if self.chain is not None:
            try:
                with self.evaluating():
                    out, ops = record_chain(lambda: self.forward(x))
                lin = ChainLinearization(self.chain, ops, self._plain, out, y, self.loss)
                self.linearization_bytes = max(self.linearization_bytes, lin.nbytes)
                return lin
            except NotAChain:  # this piece ran other ops: autograd
                pass
        return self._autograd_linearization(x, y)

    def _autograd_linearization(self, x, y: torch.Tensor) -> Linearization:
        """g(θ) = ∇ of this piece's summed loss, with its graph kept for products."""
        seen: dict[int, int] = {}

        def pack(t):
            try:
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
            except (RuntimeError, NotImplementedError):  # e.g. a tensor without storage
                pass
            # detached: a saved output packed as itself would hold its own grad_fn, a reference cycle
            # through C++ that Python's collector cannot see, and every graph would stay alive (about
            # one graph per piece and product leaked); autograd restores the grad_fn on unpacking
            return t.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), self.evaluating(), torch.enable_grad():
            total, _ = self.piece_total(x, y)
            if not total.requires_grad:
                return Linearization(self.theta, [None] * len(self.theta), self._lin_state)
            grads = torch.autograd.grad(total, self.theta, create_graph=True, allow_unused=True)
        lin = Linearization(self.theta, list(grads), self._lin_state)
        for g in lin.grads:  # the gradient itself (P numbers per piece) belongs to the graph too
            if g is not None:
                seen[g.untyped_storage().data_ptr()] = g.untyped_storage().nbytes()
        for p in self._plain:  # the parameters are saved by reference: they are no cost of the graph
            seen.pop(p.untyped_storage().data_ptr(), None)
        lin.nbytes = sum(seen.values())
        self.linearization_bytes = max(self.linearization_bytes, lin.nbytes)
        return lin

    def linearizations(self) -> Iterator[Linearization]:
        """One :class:`Linearization` per piece, for one pass (the dense Hessian's): the kept ones
        when :attr:`graph_policy` has kept them, else built piece by piece, one alive at a time."""
        return self._pieces(keep=False)

    def _pieces(self, keep: bool) -> Iterator[Linearization]:
        """The pieces' linearisations; with ``keep`` (and graphs that fit the budget), kept for the
        next passes, a pass that outgrows the budget falling back to one graph at a time."""
        if self._cache is not None:
            yield from self._cache
            return
        kept: list | None = [] if keep or self.n_pieces() <= 1 else None
        budget, total = self.graph_budget() or 0, 0
        for x, y in self.data.pieces(self.batch_size):
            lin = self.linearize(*self._move(x, y))
            del x, y
            if kept is not None:
                kept.append(lin)
                total += _lin_bytes(lin)
                if self.n_pieces() > 1 and total > budget:  # later pieces' graphs outgrew the first one's
                    kept = None  # (linearization_bytes, their maximum, now says so: graph_policy is recomputed)
            yield lin
            del lin
        if kept is not None:
            self._cache = kept

    def measure_linearization(self) -> int:
        """Bytes one piece's gradient graph holds (measured once, on the first piece)."""
        if self.linearization_bytes == 0:
            for x, y in self.data.pieces(self.batch_size):
                lin = self.linearize(*self._move(x, y))
                if self.n_pieces() == 1:
                    self._cache = [lin]
                break
        return self.linearization_bytes

    def graph_budget(self) -> int | None:
        """Bytes the kept gradient graphs of all pieces may take: ``cache_bytes``, or the budget set by
        :meth:`plan_graphs`; None when none was given (then graphs are not kept)."""
        return int(self._cache_bytes) if self._cache_bytes is not None else None

    @property
    def graph_policy(self) -> str:
        """``"kept"``: every piece's gradient graph is kept between products (one piece; or a graph
        budget was given and all of them fit it); ``"recomputed"``: each product re-runs the forward
        pass of every piece, one graph alive at a time. Measures one graph first if none was."""
        if self.n_pieces() <= 1:
            return "kept"
        budget = self.graph_budget()
        if budget is None:
            return "recomputed"
        self.measure_linearization()
        return "kept" if self.n_pieces() * max(self.linearization_bytes, 1) <= budget else "recomputed"

    @property
    def graph_plan(self) -> dict:
        """What ``meta`` records of the gradient graphs: ``graph_policy``, ``graph_bytes`` (the
        largest measured, bytes; 0 when none was), ``graph_pieces`` (micro-batches, this rank) and
        ``graph_budget`` (None when none was given)."""
        policy = self.graph_policy
        return {
            "graph_policy": policy,
            "graph_bytes": int(self.linearization_bytes),
            "graph_pieces": self.n_pieces(),
            "graph_budget": self.graph_budget(),
        }

    def plan_graphs(self, budget: int | None = None) -> dict:
        """Choose whether products keep every piece's gradient graph (module docstring) within
        ``budget`` bytes (None: :func:`~hesscli.runtime.memory.default_budget` of the device),
        measuring one graph if none was: a memory plan calls it with what the rest of its work
        leaves. Kept graphs that no longer fit are dropped. Adds a note when the graphs are
        recomputed; returns :attr:`graph_plan`. Under torchrun, pass the same budget on every rank
        (the choice changes speed and memory only, never the number of collectives)."""
        budget = default_budget(self.device) if budget is None else int(budget)
        if budget < 0:
            raise UsageError(f"graph budget must be at least 0 bytes (got {budget})")
        self._cache_bytes = budget
        self.measure_linearization()
        plan = self.graph_plan
        if plan["graph_policy"] == "recomputed":
            self._cache = None
        self._note_policy(plan)
        return plan

    def _note_policy(self, plan: dict) -> None:
        if plan["graph_policy"] == "recomputed" and plan["graph_budget"] is not None and not self._policy_noted:
            self._policy_noted = True
            n, per = plan["graph_pieces"], plan["graph_bytes"]
            self.info.notes.append(
                f"the gradient graphs of the {n} micro-batches ({fmt_bytes(per)} each, {fmt_bytes(n * per)} together) do not "
                f"fit the {fmt_bytes(plan['graph_budget'])} budget for them: each product re-runs the forward pass, one "
                "micro-batch's graph at a time"
            )

    def n_pieces(self) -> int:
        """The number of pieces (micro-batches) of this rank's data."""
        return len(self._piece_counts)

    def can_rebatch(self) -> bool:
        """Whether :meth:`rebatch` may cut the data differently without changing the objective: not
        for a fixed-batch export, under torchrun, or with ``--loss model`` returning a mean (its
        pieces are weighted by their sizes, which is exact only for one piece)."""
        return (self.static_batch is None and self.comm is None
                and not (self.loss.name == "model" and self._loss_form == "mean"))

    def largest_piece(self) -> int:
        """The most samples in one piece (micro-batch) of this rank's data."""
        return max(self.data.piece_sizes(self.batch_size), default=0)

    def rebatch(self, batch_size: int | None) -> None:
        """Evaluate the data in micro-batches of at most ``batch_size`` samples from now on (the
        memory plan's choice when the whole batch's gradient graph and product do not fit; None: whole
        shards, as without ``--batch-size``). The
        objective is the same sum of loss terms over the same samples — products agree to rounding —
        and the kept graphs and measured graph size are dropped. Raises ValueError when
        :meth:`can_rebatch` is false."""
        if not self.can_rebatch():
            raise ValueError("rebatch: this objective's data cannot be cut differently")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"rebatch: batch_size must be at least 1 (got {batch_size})")
        self.batch_size = None if batch_size is None else int(batch_size)
        self._piece_counts = [float(c) for c in self.data.piece_sizes(self.batch_size)]  # no data is read
        self._cache = None
        self.linearization_bytes = 0

    def products(self, V: torch.Tensor, tensors: Sequence[int] | None = None) -> torch.Tensor:
        """The one product function: H·V (or the diagonal block on ``tensors``) for the rows of V.

        V: (k, n) in the objective's dtype and device, n = P or the total size of ``tensors``
        (consecutive indices into :attr:`names`). Returns (k, n): the products summed over the
        pieces, scaled by 1/n_loss_terms (mean), and summed over the ranks under torchrun."""
        idx = list(range(len(self.names))) if tensors is None else list(tensors)
        k = V.shape[0]
        base = self.offsets[idx[0]]
        parts = [V[:, self.offsets[t] - base : self.offsets[t + 1] - base].reshape((k,) + self.shapes[t]) for t in idx]
        acc = torch.zeros(k, V.shape[1], dtype=self.dtype, device=self.device)
        keep = self.graph_policy == "kept"  # all pieces' graphs fit the budget a memory plan gave
        with no_tf32():
            for lin in self._pieces(keep):
                if k == 1:
                    res = lin.apply([p[0] for p in parts], idx, idx, batched=False)
                else:
                    res = lin.apply(parts, idx, idx, batched=True)
                del lin
                acc += torch.cat([r.reshape(k, -1) for r in res], dim=1)
                del res
        self._note_policy(self.graph_plan)
        acc *= self.scale
        if self.comm is not None:
            self.comm.all_reduce(acc)
        self.hvps += k
        return acc

    def hvp(self, V: torch.Tensor) -> torch.Tensor:
        """H·V for V of shape (P,) or (k, P) (rows are vectors); same shape back, on V's device."""
        single = V.dim() == 1
        Vb = V.reshape(1, -1) if single else V
        if Vb.shape[-1] != self.P:
            raise ValueError(f"hvp: vectors of length {Vb.shape[-1]}, expected P = {self.P}")
        acc = self.products(Vb.to(self.device, self.dtype))
        out = acc[0] if single else acc
        return out.to(V.device) if V.device != self.device else out

    def grad(self) -> torch.Tensor:
        """∇L(θ), flat."""
        acc = torch.zeros(self.P, dtype=self.dtype, device=self.device)
        for x, y in self.data.pieces(self.batch_size):
            xd, yd = self._move(x, y)
            with self.evaluating():
                total, _ = self.piece_total(xd, yd)
                if not total.requires_grad:
                    continue
                gs = torch.autograd.grad(total, self.theta, allow_unused=True)
            acc += torch.cat([(g.to_dense() if g is not None and g.is_sparse else g if g is not None else torch.zeros_like(t)).reshape(-1)
                              for g, t in zip(gs, self._plain)])
        acc *= self.scale
        if self.comm is not None:
            self.comm.all_reduce(acc)
        return acc

    def symmetry_probe(self, seed: int = 0, max_groups: int = 16, chunk: int = 8) -> tuple[float, str]:
        """Check that the Hessian operator is symmetric, and name the worst pair of parameters.

        Two random vectors u_a, u'_a supported on each parameter group a (tensors, merged into at
        most ``max_groups`` groups) give M = Uᵀ(HU); a correct Hessian has M = Mᵀ to rounding, while
        a wrong second derivative breaks it by O(1). Returns
        (max |M_ab − M_ba| / (‖Hu_a‖‖u_b‖ + ‖Hu_b‖‖u_a‖), "name_a / name_b"). Costs 2·groups HVPs.

        Memory: each u_i is kept as its group's segment only (2·P numbers in all, in the products'
        dtype), and the products
        are taken ``chunk`` vectors at a time, each consumed into M before the next chunk — never
        2·groups full vectors at once (5.8 GB at 22.7M parameters before)."""
        T = len(self.names)
        per = max(1, math.ceil(T / max_groups))
        groups = [list(range(i, min(i + per, T))) for i in range(0, T, per)]
        gen = torch.Generator().manual_seed(seed)
        spans, segs = [], []
        for g in groups:
            a, b = self.offsets[g[0]], self.offsets[g[-1] + 1]
            pair = torch.randn(2, b - a, generator=gen, dtype=torch.float64).to(self.dtype)
            for r in range(2):
                spans.append((a, b))
                segs.append(pair[r])
        m = len(segs)
        M = torch.zeros(m, m, dtype=torch.float64)
        norms_hu = torch.zeros(m, dtype=torch.float64)
        norms_u = torch.stack([torch.linalg.vector_norm(s.double()) for s in segs])
        chunk = max(1, int(chunk))
        for c0 in range(0, m, chunk):
            idx = range(c0, min(c0 + chunk, m))
            U = torch.zeros(len(idx), self.P, dtype=self.dtype)
            for row, j in enumerate(idx):
                a, b = spans[j]
                U[row, a:b] = segs[j]
            HU = self.hvp(U).cpu()  # the products' dtype: each dot product below is float64, a segment at a time
            del U
            for row, j in enumerate(idx):
                norms_hu[j] = torch.linalg.vector_norm(HU[row].double())
                for i, (a, b) in enumerate(spans):  # M[i, j] = u_iᵀ H u_j
                    M[i, j] = segs[i].double() @ HU[row, a:b].double()
            del HU
        denom = norms_hu[:, None] * norms_u[None, :] + norms_u[:, None] * norms_hu[None, :]
        # a block that is zero up to rounding (e.g. a conv bias before an InstanceNorm) has an O(1)
        # relative asymmetry of pure noise: measure against at least a floor set by the whole H,
        # at which rounding (ε of the dtype) stays a tenth of the tolerance
        floor = float((norms_hu * norms_u).max()) * 20 * float(torch.finfo(self.dtype).eps) / asymmetry_tolerance(self.dtype)
        rel = (M - M.T).abs() / denom.clamp_min(max(floor, 1e-300))
        rel[denom == 0] = 0.0
        i, j = divmod(int(rel.argmax()), rel.shape[1])
        name = lambda k: ",".join(self.names[t] for t in groups[k // 2])  # noqa: E731
        return float(rel.max()), f"{name(i)} / {name(j)}"

    # ------------------------------------------------------------------ bookkeeping

    def describe_params(self) -> list[dict]:
        """Name and shape of each selected parameter tensor (``meta.params``)."""
        return [{"name": n, "shape": list(s)} for n, s in zip(self.names, self.shapes)]

    def param_checksum(self) -> float:
        """A number that changes when the parameters do (to detect a module changed in place)."""
        return float(sum(t.double().sum().item() + 1e-3 * t.double().abs().sum().item() for t in self._plain))


def _lin_bytes(lin) -> int:
    return int(getattr(lin, "nbytes", 0) or 0)


def asymmetry_tolerance(dtype: torch.dtype) -> float:
    """Relative asymmetry above which a Hessian is wrong, not rounded: 1e-3 (float32), 1e-8 (float64)."""
    return 1e-3 if dtype == torch.float32 else 1e-8


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
    path; a root parameter after itself), ``layer`` (modules grouped by the path up to the first
    integer index, ``encoder.layer.3``; modules without one stay one block each), ``tensor`` (one
    each) or ``all`` (one block)."""
    if by not in ("module", "layer", "tensor", "all"):
        raise UsageError(f"--blocks '{by}': choose module, layer or tensor")
    if by == "all":
        return [ParamBlock("all", tuple(range(len(names))), 0, offsets[-1])]
    groups: list[tuple[str, list[int]]] = []
    for i, n in enumerate(names):
        key = n if by == "tensor" else (n.rpartition(".")[0] or n)
        if by == "layer":
            parts = n.split(".")
            num = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
            if num is not None:
                key = ".".join(parts[: num + 1])
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


def _cast_in_place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move the module's parameters and buffers to ``device`` and its floating ones to ``dtype``, by
    replacing each tensor's data: the tensor objects stay the same, so every reference to them (a
    scripted RNN's flat weight list, a tie) sees the change."""
    done: set[int] = set()
    tensors = [p for _, p in module.named_parameters(remove_duplicate=False)]
    tensors += [b for _, b in module.named_buffers(remove_duplicate=False) if b is not None]
    for t in tensors:
        if id(t) in done:
            continue
        done.add(id(t))
        want = dtype if t.is_floating_point() else t.dtype
        if t.device != device or t.dtype != want:
            t.data = t.data.to(device=device, dtype=want)


def _copy_module(module: nn.Module) -> nn.Module:
    """An independent copy whose parameters are leaves: a ScriptModule through a save/load round
    trip in memory (its ``deepcopy`` returns parameters that are not leaves), others ``deepcopy``."""
    try:
        if isinstance(module, torch.jit.ScriptModule):
            buf = io.BytesIO()
            torch.jit.save(module, buf)
            buf.seek(0)
            return torch.jit.load(buf, map_location="cpu")
        return copy.deepcopy(module)
    except Exception as e:  # noqa: BLE001 - a module that cannot be copied
        raise HesscliError(f"the model cannot be copied ({reason(e)}); pass copy=False to let hesscli change it in place") from None


def _n(x) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0])
    if isinstance(x, dict):
        return int(next(iter(x.values())).shape[0])
    return len(x)


def _slice(x, k: int):
    if isinstance(x, dict):
        return {key: v[:k] for key, v in x.items()}
    return x[:k]


def _first_tensor(out, key: str | None = None) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    try:
        return prediction(out, key)
    except HesscliError:
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            return out[0]
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
