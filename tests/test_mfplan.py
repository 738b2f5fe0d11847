"""Issue 12: the memory plan of the matrix-free commands, made before any product — block size,
basis size and dtype from --max-memory and the measured gradient graph; exit 3 with what would fit;
a float32 basis that gives the float64 basis's answers; a default --tol reachable in float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hesscli
from hesscli.algorithms.lanczos import lanczos
from hesscli.algorithms.mfplan import plan_matrix_free
from hesscli.algorithms.operators import SymOperator
from hesscli.errors import MemoryBudgetError
from hesscli.objective.core import Objective


class Diagonal(SymOperator):
    """Q diag(d) Qᵀ for a random orthogonal Q given by a Householder reflection (products cost O(n))."""

    def __init__(self, d: np.ndarray, seed: int = 0):
        super().__init__()
        self.d = torch.as_tensor(d, dtype=torch.float64)
        self.n = len(d)
        w = torch.randn(self.n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.w = w / w.norm()
        self.device = torch.device("cpu")
        self.dtype = torch.float64
        self.chunk = 64

    def _reflect(self, V):
        return V - 2 * (V @ self.w)[:, None] * self.w[None, :]

    def _apply(self, V):
        return self._reflect(self._reflect(V) * self.d[None, :])


def test_plan_chooses_what_fits():
    n, item, graph = 1_000_000, 4, 50_000_000
    big = plan_matrix_free(n, item, graph, 20 << 30, k=5)
    assert big.basis_dtype == "float64" and big.ncv == 128 and big.block_size == 4 and big.total <= 20 << 30
    mid = plan_matrix_free(n, item, graph, 400_000_000, k=5)
    assert mid.basis_dtype == "float32" and mid.total <= 400_000_000 and mid.ncv >= 5 + 3 * mid.block_size
    assert any("float32" in s for s in mid.notes)
    with pytest.raises(MemoryBudgetError, match=r"raise --max-memory to [0-9.]+ MB"):
        plan_matrix_free(n, item, graph, 60_000_000, k=5)
    tight = plan_matrix_free(n, item, graph, 300_000_000, k=5)  # a block of 4 does not fit: smaller blocks
    assert tight.block_size < 4 and tight.total <= 300_000_000


def test_float32_basis_gives_the_float64_answers():
    rng = np.random.default_rng(0)
    d = np.concatenate([[50.0, 49.9, 49.9, 30.0, 12.0], rng.uniform(-1, 5, 3000)])
    want = np.sort(d)[-5:]
    r64 = lanczos(Diagonal(d), 5, tol=1e-8, ncv=40)
    op32 = Diagonal(d)
    r32 = lanczos(op32, 5, tol=1e-6, ncv=40, basis_dtype=torch.float32)
    assert r64.converged.all() and r32.converged.all()
    np.testing.assert_allclose(r64.eigenvalues, want, rtol=1e-10)
    np.testing.assert_allclose(r32.eigenvalues, want, rtol=1e-6)
    assert any("float32" in s for s in r32.notes)


def test_budget_too_small_is_exit_3_before_any_product(samples, monkeypatch, cli, tmp_path):
    def no_products(self, *a, **k):
        raise AssertionError("a product was computed before the plan refused")

    monkeypatch.setattr(Objective, "products", no_products)
    model, data = samples / "digits_cnn.pt", samples / "digits_images.pt"
    for call in (lambda: hesscli.spectrum(str(model), str(data), top_k=3, max_memory="200KB"),
                 lambda: hesscli.trace(str(model), str(data), max_memory="200KB"),
                 lambda: hesscli.density(str(model), str(data), max_memory="200KB")):
        with pytest.raises(MemoryBudgetError, match="raise --max-memory to"):
            call()
    out = tmp_path / "s.npz"
    r = cli("spectrum", model, "--data", data, "--max-memory", "200KB", "-o", out)
    assert r.code == 3 and r.err.count("\n") == 1 and "--max-memory" in r.err and not out.exists()


def test_a_budget_that_forces_a_float32_basis_still_answers(samples):
    model, data = str(samples / "digits_mlp.pt"), str(samples / "digits.pt")
    ref = hesscli.compute(model, data, dtype="float64").eigenvalues[-5:]
    # the product graph of the digits MLP is ~ a few MB; leave room for ~20 float32 vectors only
    probe = hesscli.spectrum(model, data, top_k=5, tol=1e-5)
    plan = probe.meta["memory_plan"]
    fixed = plan["total"] - plan["bytes"]["basis"]
    r = hesscli.spectrum(model, data, top_k=5, tol=1e-5, max_memory=fixed + 20 * plan["n"] * 4)
    assert r.meta["memory_plan"]["basis_dtype"] == "float32"
    assert r.converged.all()
    np.testing.assert_allclose(np.sort(r.eigenvalues), ref, rtol=0, atol=1e-5 * ref[-1] * 3)


def test_default_tol_is_reachable_in_float32(samples):
    """digits_cnn in float32 with the default --tol used to end in exit 4: the products' own
    rounding is above 1e-6·‖H‖₂."""
    r = hesscli.spectrum(str(samples / "digits_cnn.pt"), str(samples / "digits_images.pt"), top_k=3)
    assert r.exit_code == 0 and r.converged.all()
    assert r.meta["tol"] >= 1e-5 and "float32" in r.meta["tol_rule"]


class StopAfter:
    """A progress whose n-th advance raises what SIGINT raises in the command line."""

    def __init__(self, n: int, exc: type[BaseException]):
        self.n, self.exc, self.seen = n, exc, 0

    def start(self, total, description=""):
        pass

    def advance(self, n=1, **fields):
        self.seen += 1
        if self.seen >= self.n:
            raise self.exc()

    def stop(self):
        pass


@pytest.mark.parametrize("exc", [KeyboardInterrupt, hesscli.errors.Interrupted])
def test_sigint_keeps_the_pairs_found_so_far(samples, exc):
    model, data = str(samples / "digits_mlp.pt"), str(samples / "digits.pt")
    ref = hesscli.compute(model, data, dtype="float64").eigenvalues
    r = hesscli.spectrum(model, data, top_k=4, tol=1e-12, max_matvecs=100000, progress=StopAfter(25, exc))
    assert r.meta["interrupted"] and r.exit_code == 130 and r.summary()["status"] == "interrupted"
    assert r.eigenvalues.shape == (4,) and r.matvecs >= 25
    # the largest converges first: it is right to the accuracy its (estimated) residual claims
    top = np.argmax(r.eigenvalues)
    assert abs(r.eigenvalues[top] - ref[-1]) <= max(10 * r.residuals[top], 1e-5 * ref[-1])


def test_sigint_in_the_cli_writes_the_pairs_and_exits_130(samples, cli, tmp_path, monkeypatch):
    import hesscli.cli.matrixfree as mf

    monkeypatch.setattr(mf, "make_progress", lambda con, quiet: StopAfter(25, hesscli.errors.Interrupted))
    out = tmp_path / "s.npz"
    r = cli("spectrum", samples / "digits_mlp.pt", "--data", samples / "digits.pt", "--top-k", "4", "--tol", "1e-12",
            "--max-matvecs", "100000", "-o", out, "--json")
    assert r.code == 130, r.err
    assert "interrupted" in r.err and out.exists()
    loaded = hesscli.load(out)
    assert loaded.meta["interrupted"] and loaded.converged.dtype == bool and len(loaded.eigenvalues) == 4
    assert r.json["status"] == "interrupted"


def test_sigint_per_block_marks_the_blocks_not_reached(samples):
    model, data = str(samples / "digits_cnn.pt"), str(samples / "digits_images.pt")
    r = hesscli.spectrum(model, data, top_k=2, tol=1e-12, per_block=True, max_matvecs=100000,
                         progress=StopAfter(8, KeyboardInterrupt))
    s = r.summary()
    assert s["status"] == "interrupted"
    assert any(all(e is None for e in b["eigenvalues"]) for b in s["blocks"])  # a block never reached
    assert not np.isnan(r.eigenvalues).any()


def test_progress_for_a_log_says_done_residual_elapsed_and_left(capsys):
    from hesscli.algorithms.lanczos import _expected
    from hesscli.cli.console import LineProgress

    p = LineProgress(every=0.0)
    p.start(1000, "Lanczos (block 1)")
    p.advance(10, residual="1.0e-02", expected_total=40)
    err = capsys.readouterr().err
    assert err.startswith("Lanczos (block 1): 10/40 residual=1.0e-02 (") and "elapsed" in err and "s left" in err
    # the residual falls a decade every 10 products: from 1e-2 at 30 products, 1e-6 takes 40 more
    hist = [(10, np.log(1e-0)), (20, np.log(1e-1)), (30, np.log(1e-2))]
    assert _expected(hist, 1e-6, 1000) == 70
    assert _expected(hist[:2], 1e-6, 1000) == 1000  # too early to tell


def test_symmetry_probe_in_chunks_is_the_same_probe(samples):
    """The probe keeps segments and takes its products a chunk at a time: the same number whatever
    the chunk (one vector at a time uses 1/16 of the memory of all 16 at once)."""
    s = hesscli.open_session(hesscli.ModelSpec(str(samples / "digits_mlp.pt"), data=[str(samples / "digits.pt")],
                                               engine="autograd", dtype="float64"))
    a = s.objective.symmetry_probe(0, chunk=1)
    b = s.objective.symmetry_probe(0, chunk=32)
    assert a[1] == b[1] and a[0] == pytest.approx(b[0], rel=1e-6, abs=1e-15)
    assert a[0] < 1e-10


class Float32Diagonal(Diagonal):
    """The diagonal operator with float32 products that records what it is handed."""

    def __init__(self, d, seed=0):
        super().__init__(d, seed)
        self.dtype = torch.float32
        self.seen: list[tuple[torch.dtype, int]] = []

    def _apply(self, V):
        self.seen.append((V.dtype, V.data_ptr()))
        return super()._apply(V.to(torch.float64)).to(torch.float32)


def test_float32_basis_is_handed_to_the_products_without_a_copy():
    """A float32 basis for float32 products: each block goes to the products as a view of the basis
    (the pointer of a basis row, no float64 or float32 copy), and the answers stay the float64 ones."""
    rng = np.random.default_rng(1)
    d = np.concatenate([[9.0, 8.0, 7.5, 7.0, 6.0], rng.uniform(-1, 1, 3000)])
    op = Float32Diagonal(d)
    r = lanczos(op, 5, tol=1e-5, ncv=30, basis_dtype=torch.float32)
    assert r.converged.all()
    np.testing.assert_allclose(r.eigenvalues, np.sort(d)[-5:], atol=1e-5 * 9)
    assert all(dt == torch.float32 for dt, _ in op.seen)
    # the first block is the basis's first rows, the next ones follow them: the pointers step by whole rows
    ptrs = [p for _, p in op.seen[:4]]
    assert all((p - ptrs[0]) % (4 * op.n) == 0 for p in ptrs)


def test_block_starts_at_two_and_grows_only_on_a_cluster():
    """Distinct eigenvalues: the block stays at 2 (fewer products than a block of 4); an eigenvalue
    four times: the block grows to 4 and all four copies come back, with a note."""
    rng = np.random.default_rng(2)
    d = np.concatenate([[9.0, 8.0, 7.5, 7.0, 6.0], rng.uniform(-1, 1, 2000)])
    r2 = lanczos(Diagonal(d), 5, tol=1e-8)
    r4 = lanczos(Diagonal(d), 5, tol=1e-8, block_size=4)
    assert r2.block_size == 2 and r2.converged.all() and r2.matvecs < r4.matvecs
    np.testing.assert_allclose(r2.eigenvalues, np.sort(d)[-5:], atol=1e-7 * 9)
    assert not any("grown" in s for s in r2.notes)
    d4 = np.concatenate([[9.0] * 4, [8.0, 7.0], rng.uniform(-1, 1, 2000)])
    r = lanczos(Diagonal(d4), 6, tol=1e-8)
    np.testing.assert_allclose(r.eigenvalues, np.sort(d4)[-6:], atol=1e-7 * 9)
    assert r.block_size == 4 and any("block grown from 2 to 4" in s for s in r.notes)


def test_plan_counts_a_block_as_the_operators_batches():
    """At 22.7M parameters one vector per batched product fits the operator's chunk: a block of 4
    costs one vector's product memory (the bench's calibration), so the 5 GB budget keeps a block
    of up to 4 and a float32 basis. 3 GB cannot hold the whole batch's graph (0.72 GB), a product
    and the smallest reliable basis (2k + 2 vectors); with the graph of half the batch it can."""
    P, graph = 22_713_986, 719_530_000
    p5 = plan_matrix_free(P, 4, graph, 5_000_000_000, k=5)
    assert p5.block_size == 4 and p5.basis_dtype == "float32" and p5.ncv >= 20 and p5.total <= 5e9
    assert p5.bytes["product"] == 2 * P * 4 + graph and p5.probe_chunk == 1
    with pytest.raises(MemoryBudgetError, match="12 float32 basis vectors"):
        plan_matrix_free(P, 4, graph, 3_000_000_000, k=5)
    p3 = plan_matrix_free(P, 4, 405_211_324, 3_000_000_000, k=5)
    assert p3.block_size <= 2 and p3.ncv >= 2 * 5 + 2 * p3.block_size and p3.total <= 3e9
    assert plan_matrix_free(P, 4, graph, 5_000_000_000, k=5, eigenvectors=True).bytes["ritz_vectors"] == 5 * P * 8


def test_a_budget_below_the_whole_batch_cuts_micro_batches(samples):
    """No --batch-size and a budget that cannot hold the whole batch's graph and product: the plan
    cuts the data into micro-batches until it fits (a note, ``memory_plan.micro_batch``), and the
    answer is the whole batch's."""
    model, data = str(samples / "digits_cnn.pt"), str(samples / "digits_images.pt")
    whole = hesscli.spectrum(model, data, top_k=2, tol=1e-5)
    graph = whole.meta["graph_bytes"]
    plan = whole.meta["memory_plan"]
    assert plan["micro_batch"] is None
    # a budget that holds everything but the whole batch's graph and product
    budget = plan["total"] - plan["bytes"]["graphs"] - plan["bytes"]["product"] + graph // 2
    cut = hesscli.spectrum(model, data, top_k=2, tol=1e-5, max_memory=int(budget))
    mp = cut.meta["memory_plan"]
    assert mp["micro_batch"] is not None and mp["micro_batch"] < 1797 and mp["total"] <= budget
    assert any(n.startswith("micro-batches of") for n in mp["notes"])
    assert cut.meta["graph_pieces"] > 1
    np.testing.assert_allclose(cut.eigenvalues, whole.eigenvalues, rtol=2e-5)
    assert any(n.startswith("micro-batches of") for n in cut.notes)  # said to the user, not only in meta


def test_a_hessian_of_norm_1e13_converges():
    """The block's second Cholesky pass judges its (now unit) rows against 1, not against ‖H‖: with
    ‖H‖ = 1e13 (a sum over many samples) every row was taken for a vanishing one before."""
    rng = np.random.default_rng(3)
    d = np.concatenate([[100.0, 90.0, 80.0], rng.uniform(1, 50, 397)]) * 1e13
    r = lanczos(Diagonal(d), 3, tol=1e-8, ncv=40)
    assert r.converged.all()
    np.testing.assert_allclose(r.eigenvalues, np.sort(d)[-3:], rtol=1e-8)


class InterruptAfter(Diagonal):
    def __init__(self, d, after):
        super().__init__(d)
        self.after = after

    def _apply(self, V):
        if self.matvecs >= self.after:
            raise KeyboardInterrupt
        return super()._apply(V)


def test_sigint_after_a_thick_restart_returns_the_kept_ritz_pairs():
    """An interrupt after a thick restart reports the kept Ritz pairs of the rotated basis: the
    vectors are orthonormal and their Rayleigh quotients are the reported values."""
    rng = np.random.default_rng(4)
    d = np.concatenate([[100.0, 99.8, 99.5], rng.uniform(0, 99, 2000)])
    op = InterruptAfter(d, 30)
    r = lanczos(op, 3, tol=1e-12, ncv=20, block_size=2, eigenvectors=True)
    assert r.interrupted and r.restarts >= 1
    U = r.eigenvectors
    assert np.abs(U.T @ U - np.eye(3)).max() < 1e-10
    HU = np.stack([Diagonal(d)._apply(torch.from_numpy(U[:, i].copy())[None])[0].numpy() for i in range(3)], 1)
    np.testing.assert_allclose((U * HU).sum(0), r.eigenvalues, rtol=1e-10)


def test_a_failed_micro_batch_search_leaves_the_session_as_it_was(samples):
    """A budget too small even for single samples: exit 3, and the open session keeps its own
    pieces for the next call (not single samples)."""
    from hesscli.api import session_for

    s = session_for(str(samples / "digits_cnn.pt"), str(samples / "digits_images.pt"))
    pieces = s.objective.n_pieces()
    with pytest.raises(MemoryBudgetError):
        hesscli.spectrum(s, top_k=2, max_memory="200KB")
    assert s.objective.n_pieces() == pieces and s.objective.batch_size is None
