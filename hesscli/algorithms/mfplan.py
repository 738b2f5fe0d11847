"""The memory plan of a matrix-free command, made before its first Hessian-vector product.

Inputs are measured, not guessed: P (parameters), the products' dtype, and the bytes one data
piece's gradient graph holds (``Objective.measure_linearization``: one forward and backward, no
product) and how many of those graphs the objective keeps. From ``--max-memory`` it chooses

- the block size b of block Lanczos (the requested one, else min(4, k), lowered until one
  batched product fits: a batched double backward holds about b graphs' worth of intermediates);
- the number m of basis vectors kept and their dtype: float64 when m float64 vectors fit, else
  float32 storage (the projection T and every coefficient still accumulate in float64);
- the chunk of probe vectors for the symmetry probe.

A budget that cannot hold the minimum — the graphs, one product of one vector and
:func:`smallest_basis` float32 basis vectors — is a :class:`~hesscli.errors.MemoryBudgetError` (exit 3) that says what would fit,
raised before any product.

The budget covers what the run allocates on top of the open session: the model's parameters and
the data in memory when the plan is made are already there (0.7 GB for the 22.7M-parameter MiniLM
classifier), so a process peaks near the budget plus that. Calibration (``bench/minilm.py``): a
batched product of b vectors adds 2·b·P·itemsize + b·graph_bytes to within 5 %; a block is batched
only as far as the Hessian operator's chunk goes (one vector at a time at 22.7M parameters); the
eigensolver keeps its block's products in the basis dtype and works on them in place
(:func:`work_bytes`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hesscli.algorithms.lanczos import SLAB_BYTES
from hesscli.algorithms.operators import default_chunk
from hesscli.errors import MemoryBudgetError
from hesscli.runtime.memory import fmt_bytes

__all__ = ["MatrixFreePlan", "plan_matrix_free", "WANT_NCV", "batch_of", "work_bytes", "smallest_basis"]


def WANT_NCV(k: int, b: int) -> int:  # noqa: N802 - a formula, named as in lanczos.default_ncv
    """The basis Lanczos wants for k pairs with blocks of b: max(2k + 2b, k + 6b, 128) vectors."""
    return max(2 * k + 2 * b, k + 6 * b, 128)


def smallest_basis(k: int, b: int) -> int:
    """The fewest basis vectors a plan gives Lanczos for k pairs with blocks of b: max(k + 3b,
    2k + 2b) (ARPACK's advice is at least 2k + 1). Measured on the MiniLM classifier
    (``bench/minilm.py``): with 9 vectors for the top 5 (b = 1) the fifth Ritz value converged to
    the eigenvalue below the fifth — a small residual, a missed eigenvalue; 12 found it."""
    return max(k + 3 * b, 2 * k + 2 * b)


@dataclass
class MatrixFreePlan:
    """What a matrix-free run may hold (bytes) and how it is cut: ``block_size`` vectors per
    product, ``ncv`` basis vectors of ``basis_dtype``, probe vectors ``probe_chunk`` at a time.
    ``bytes`` breaks the total down (graphs, product, basis, work); ``notes`` says what the budget
    changed against the defaults."""

    budget: int
    n: int
    itemsize: int
    graph_bytes: int
    graphs_kept: int
    block_size: int
    ncv: int
    basis_dtype: str
    probe_chunk: int
    bytes: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    micro_batch: int | None = None  # samples per piece when the plan cut the data smaller (api._plan)

    @property
    def total(self) -> int:
        """Bytes the plan expects to hold at its peak."""
        return int(sum(self.bytes.values()))

    def describe(self) -> dict:
        """The plan for ``meta.memory_plan`` (JSON-ready)."""
        d = asdict(self)
        d["total"] = self.total
        return d


def _product_bytes(b: int, n: int, itemsize: int, graph_bytes: int) -> int:
    """One batched product of b vectors: inputs and outputs (b·n each) and about b graphs' worth
    of double-backward intermediates."""
    return 2 * b * n * itemsize + b * graph_bytes


def batch_of(b: int, n: int, itemsize: int, graph_bytes: int) -> int:
    """How many of a block's b vectors go into one batched product: the Hessian operator's chunk
    (:func:`~hesscli.algorithms.operators.default_chunk`: about 256 MB of work per batch), so at
    22.7M parameters a block is taken one vector at a time and costs one vector's product memory."""
    return int(max(1, min(b, default_chunk(n, itemsize, graph_bytes))))


def work_bytes(b: int, n: int, size: int) -> int:
    """The eigensolver's own vectors beside its basis, for a block of b and a basis of ``size``-byte
    numbers: the block's products (b·n, stored like the basis: they become the residual and then
    the next block in place; growing the block adds as many), three float64 column slabs (the
    widened basis, the block, a rotation: every re-orthogonalisation works in place a slab at a
    time), and the transients a step holds besides (one product's output on its way into the block,
    the allocator's slack): 2·n·8, calibrated on the MiniLM classifier (``bench/minilm.py``: with
    3 GB planned the resident set grew 0.34 GB more than basis, block and product during Lanczos)."""
    return b * n * size + 3 * min(SLAB_BYTES, 64 * n * 8) + 2 * n * 8


def plan_matrix_free(
    n: int,
    itemsize: int,
    graph_bytes: int,
    budget: int,
    k: int = 1,
    block_size: int | None = None,
    ncv: int | None = None,
    graphs_kept: int = 1,
    what: str = "spectrum",
    ncv_name: str = "--ncv",
    eigenvectors: bool = False,
) -> MatrixFreePlan:
    """Plan a matrix-free run on an operator of size ``n`` (P) whose products are of dtype size
    ``itemsize`` (bytes), each data piece's graph holding ``graph_bytes`` and ``graphs_kept`` of
    them resident, inside ``budget`` bytes, for ``k`` wanted pairs (trace and density: k = 1).

    ``block_size`` / ``ncv``: the user's choices, kept when they fit (a requested basis that does
    not fit is an error, not silently shrunk; ``ncv_name`` says which option asked for it, e.g.
    ``--steps`` for SLQ). Without ``block_size`` the plan's block is the largest Lanczos may grow to
    (min(4, k), lowered until it fits). ``eigenvectors``: the k returned vectors are copied out (in
    the basis dtype; charged as float64) at the end; otherwise the Ritz vectors overwrite the basis
    and cost nothing more.
    Raises :class:`MemoryBudgetError` naming the minimum that would fit."""
    notes: list[str] = []
    graphs = graph_bytes * max(graphs_kept, 1)  # a graph's bytes include its gradient (measured)
    fixed = graphs
    k = max(1, min(k, n))
    b = block_size or int(min(4, k))
    ritz = k * n * 8 if eigenvectors else 0
    min_basis = smallest_basis(k, 1) * n * 4

    def product(b: int) -> int:
        return _product_bytes(batch_of(b, n, itemsize, graph_bytes), n, itemsize, graph_bytes)

    def need(b: int, m: int, size: int) -> int:
        return fixed + ritz + product(b) + m * n * size + work_bytes(b, n, size)

    minimum = need(1, smallest_basis(k, 1), 4)
    if minimum > budget:
        raise MemoryBudgetError(
            f"{what} of P = {n:,} parameters needs at least {fmt_bytes(minimum)} (the gradient graph "
            f"{fmt_bytes(graphs)}, one Hessian-vector product {fmt_bytes(product(1))}, "
            f"{smallest_basis(k, 1)} float32 basis vectors {fmt_bytes(min_basis)}, the eigensolver's work vectors "
            f"{fmt_bytes(work_bytes(1, n, 4) + ritz)}), over the budget of {fmt_bytes(budget)} "
            f"(--max-memory); raise --max-memory to {fmt_bytes(minimum)} or more, or lower --batch-size "
            "(a smaller graph) or --params"
        )
    if block_size is None:
        while b > 1 and need(b, smallest_basis(k, b), 4) > budget:
            b -= 1
        if b < min(4, k):
            notes.append(f"block size at most {b} (default up to {min(4, k)}): a larger block does not fit")
    elif need(b, smallest_basis(k, b), 4) > budget:
        raise MemoryBudgetError(
            f"--block-size {b} needs {fmt_bytes(need(b, smallest_basis(k, b), 4))} with the smallest basis, over the budget of "
            f"{fmt_bytes(budget)} (--max-memory); a block of 1 needs {fmt_bytes(minimum)}"
        )
    want = ncv if ncv is not None else WANT_NCV(k, b)
    want = min(want, n)
    free64 = budget - fixed - ritz - product(b) - work_bytes(b, n, 8)
    free32 = budget - fixed - ritz - product(b) - work_bytes(b, n, 4)
    if want * n * 8 <= free64:
        m, dtype = want, "float64"
    elif ncv is not None:
        if want * n * 4 > free32:
            raise MemoryBudgetError(
                f"{what} of P = {n:,} parameters keeps {want} vectors ({ncv_name}), {fmt_bytes(want * n * 4)} even in "
                f"float32, more than the {fmt_bytes(max(free32, 0))} the budget of {fmt_bytes(budget)} leaves "
                f"(--max-memory); at most {max(free32 // (4 * n), 0)} fit: lower {ncv_name.split()[0]} or raise --max-memory"
            )
        m, dtype = want, "float32"
        notes.append(f"basis of {m} vectors stored in float32 (float64 does not fit the budget)")
    else:
        m64, m32 = max(free64, 0) // (8 * n), max(free32, 0) // (4 * n)
        enough = min(want, max(2 * k + 2 * b, k + 6 * b, 32))  # a float64 basis this large restarts little
        if m64 < enough and m32 > m64:
            m, dtype = int(min(want, m32)), "float32"
            notes.append(f"basis of {m} vectors stored in float32 (only {m64} fit in float64); coefficients "
                         "and reorthogonalisation accumulate in float64")
        else:
            m, dtype = int(min(want, m64)), "float64"
        m = max(m, smallest_basis(k, b))
        if m < want:
            notes.append(f"basis of {m} vectors (default {want}): the budget holds no more; expect more restarts")
    size = 8 if dtype == "float64" else 4
    probe_chunk = batch_of(b, n, itemsize, graph_bytes)  # the probe's vectors are batched products too
    parts = {
        "ritz_vectors": int(ritz),  # --eigenvectors: the returned vectors copied out (charged as float64)
        "graphs": int(graphs),
        "product": int(product(b)),
        "basis": int(m * n * size),
        "work": int(work_bytes(b, n, size)),
    }
    return MatrixFreePlan(int(budget), int(n), int(itemsize), int(graph_bytes), int(graphs_kept), int(b), int(m),
                          dtype, probe_chunk, parts, notes)
