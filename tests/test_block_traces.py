"""Per-block traces from one stream of shared full products (``estimate_block_traces``): Hutchinson
and Hutch++ per block against the dense per-block traces of the bundled samples, their standard
errors covering the truth, the product count, and the definitions on small matrices."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from mf_models import DIGITS, DIGITS_MLP, SAMPLES, MatOp, one_thread
from reference import assert_close_matrix, sample_reference

from hesscli.algorithms.dense import dense_hessian
from hesscli.algorithms.operators import DenseOperator, HessianOperator
from hesscli.algorithms.trace import _rademacher, estimate_block_traces, estimate_trace
from hesscli.errors import UsageError
from hesscli.session import ModelSpec, open_session

DIABETES_MLP = SAMPLES / "diabetes_mlp.pt"
DIABETES = SAMPLES / "diabetes.pt"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@functools.cache
def _sample(model: str, data: str, dtype: str = "float64"):
    """(objective, dense float64 H (P, P)) of a bundled sample; H from hesscli's dense path."""
    obj = open_session(ModelSpec(model, data=[data], dtype=dtype)).objective
    if dtype == "float64":
        H = dense_hessian(obj, mode="full").blocks[0].hessian.numpy().astype(np.float64)
    else:
        H = _sample(model, data, "float64")[1]
    return obj, H


def _block_truth(H: np.ndarray, blocks) -> np.ndarray:
    return np.array([np.trace(H[b.start : b.stop, b.start : b.stop]) for b in blocks])


def _check_dense_against_reference(name: str, model: str, data: str) -> None:
    """The dense truth used below is checked once against the independent float64 reference
    (``tests/reference.py``: functorch on the eager architecture, primitive LayerNorm)."""
    ref = sample_reference(name)
    obj, H = _sample(model, data)
    assert obj.names == ref.names
    assert_close_matrix(H, ref.hessian, 1e-10, f"{name}: dense_hessian vs reference", ref)


def _seed_sweep(obj, H, by: str, method: str, matvecs: int, seeds: range):
    blocks = obj.blocks(by)
    truth = _block_truth(H, blocks)
    covered = np.zeros(len(blocks), dtype=int)
    for seed in seeds:
        op = HessianOperator(obj)
        r = estimate_block_traces(op, blocks, method, matvecs, seed)
        assert r.matvecs == matvecs and op.matvecs == matvecs
        assert np.all(r.stderrs > 0)
        covered += np.abs(r.traces - truth) <= 2 * r.stderrs
    return dict(zip([b.name for b in blocks], covered.tolist()))


# ---------------------------------------------------------------------------------------------
# the bundled samples


def test_diabetes_dense_truth_is_the_reference():
    _check_dense_against_reference("diabetes_mlp", str(DIABETES_MLP), str(DIABETES))


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
@pytest.mark.parametrize("by", ["module", "tensor"])
def test_diabetes_fixed_seed_within_3_stderr(method, by):
    """Seed 0: every block's estimate within 3 standard errors of the dense block's trace; the
    product count is --matvecs in all (shared by the blocks), and the total is tr(H)."""
    obj, H = _sample(str(DIABETES_MLP), str(DIABETES))
    blocks = obj.blocks(by)
    truth = _block_truth(H, blocks)
    op = HessianOperator(obj)
    h0 = obj.hvps
    r = estimate_block_traces(op, blocks, method, 60, seed=0)
    assert r.method == method and r.matvecs == 60 and op.matvecs == 60 and obj.hvps - h0 == 60
    assert r.names == [b.name for b in blocks] and len(blocks) >= 3
    err = np.abs(r.traces - truth)
    assert np.all(err <= 3 * r.stderrs), (r.names, r.traces, truth, r.stderrs)
    assert abs(r.trace - np.trace(H)) <= 3 * r.stderr
    assert r.trace == pytest.approx(r.traces.sum(), rel=1e-12)


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_diabetes_20_seeds_within_2_stderr(method):
    """Over seeds 0..19, each block's estimate is within 2 standard errors of the truth in at least
    16 (about 19 expected): the standard errors are honest, per block, with shared products."""
    obj, H = _sample(str(DIABETES_MLP), str(DIABETES))
    for by in ("module", "tensor"):
        covered = _seed_sweep(obj, H, by, method, 60, range(20))
        assert all(c >= 16 for c in covered.values()), (by, covered)


@pytest.mark.slow  # the digits MLP's float64 reference (~50 s) and dense Hessian (~30 s)
def test_digits_mlp_blocks_against_dense_truth():
    """The digits MLP (closed-form chain products): the dense truth checked against the reference;
    seed 0 within 3 standard errors (float64 and float32 products); 20 seeds within 2 in ≥ 16."""
    _check_dense_against_reference("digits_mlp", str(DIGITS_MLP), str(DIGITS))
    for dtype in ("float64", "float32"):
        obj, H = _sample(str(DIGITS_MLP), str(DIGITS), dtype)
        blocks = obj.blocks("module")
        truth = _block_truth(H, blocks)
        for method in ("hutchinson", "hutchpp"):
            op = HessianOperator(obj)
            r = estimate_block_traces(op, blocks, method, 150, seed=0)
            assert r.matvecs == 150 and op.matvecs == 150
            assert np.all(np.abs(r.traces - truth) <= 3 * r.stderrs), (dtype, method, r.traces, truth, r.stderrs)
    obj, H = _sample(str(DIGITS_MLP), str(DIGITS))
    for method in ("hutchinson", "hutchpp"):
        covered = _seed_sweep(obj, H, "module", method, 150, range(20))
        assert all(c >= 16 for c in covered.values()), (method, covered)


def test_total_is_the_whole_trace_estimate_of_the_same_stream():
    """Summed over blocks, per-block Hutchinson/Hutch++ is the plain estimator with the same
    products: ``estimate_trace`` with the same seed gives the same total and standard error."""
    obj, _ = _sample(str(DIABETES_MLP), str(DIABETES))
    for method in ("hutchinson", "hutchpp"):
        r = estimate_block_traces(HessianOperator(obj), obj.blocks("module"), method, 45, seed=7)
        t = estimate_trace(HessianOperator(obj), method, 45, seed=7)
        assert r.trace == pytest.approx(t.trace, rel=1e-12)
        assert r.stderr == pytest.approx(t.stderr, rel=1e-9)
        assert r.samples == t.samples and r.matvecs == t.matvecs == 45
        # the total's error is that of the summed samples, which the covariance gives too
        assert r.stderr == pytest.approx(float(np.sqrt(r.covariance.sum())), rel=1e-9)
        assert np.allclose(np.sqrt(np.diag(r.covariance)), r.stderrs, rtol=1e-12)


def test_exact_per_block():
    """exact: n products (or none on a stored matrix), standard errors 0, the dense block traces."""
    obj, H = _sample(str(DIABETES_MLP), str(DIABETES))
    blocks = obj.blocks("module")
    truth = _block_truth(H, blocks)
    r = estimate_block_traces(HessianOperator(obj), blocks, "auto", 300)  # P = 225 ≤ 300
    assert r.method == "exact" and r.matvecs == obj.P and np.all(r.stderrs == 0)
    assert np.allclose(r.traces, truth, rtol=1e-10, atol=1e-12 * np.abs(truth).max())
    d = estimate_block_traces(DenseOperator(H), [(b.name, b.start, b.stop) for b in blocks])
    assert d.method == "exact" and d.matvecs == 0
    assert np.allclose(d.traces, truth, rtol=1e-13)


# ---------------------------------------------------------------------------------------------
# definitions, on small matrices


def _coupled(n=90, seed=0):
    """A symmetric matrix with strong coupling between the blocks' dominant directions (a low-rank
    part spread over every coordinate) plus an indefinite diagonal."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, 6))
    return A @ A.T / 3 + np.diag(rng.uniform(-1, 2, n))


BLOCKS = [("a", 0, 20), ("b", 20, 21), ("c", 21, 70), ("d", 70, 90)]


def test_hutchinson_per_block_is_the_definition():
    """c_{b,i} = z_{i,b}ᵀ(Hz_i)_b for the Rademacher z_i of the seeded generator."""
    H = _coupled()
    r = estimate_block_traces(MatOp(H), BLOCKS, "hutchinson", 25, seed=5)
    gen = torch.Generator().manual_seed(5)
    Z = _rademacher(25, 90, gen, "cpu").numpy()
    HZ = Z @ H
    c = np.stack([(Z[:, a:b] * HZ[:, a:b]).sum(1) for _, a, b in BLOCKS], 1)
    assert np.allclose(r.traces, c.mean(0), rtol=1e-12)
    assert np.allclose(r.stderrs, c.std(0, ddof=1) / 5, rtol=1e-10)
    assert r.samples == 25 and r.names == ["a", "b", "c", "d"]


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_unbiased_per_block_with_coupled_blocks(method):
    """Over 200 seeds every block's mean estimate is within 4 standard errors of the mean of its
    trace (no bias from the cross-block terms), and 2·stderr covers the truth in ≥ 85%."""
    H = _coupled()
    truth = np.array([np.trace(H[a:b, a:b]) for _, a, b in BLOCKS])
    ests, covered = [], np.zeros(len(BLOCKS))
    for seed in range(200):
        r = estimate_block_traces(MatOp(H), BLOCKS, method, 30, seed)
        ests.append(r.traces)
        covered += np.abs(r.traces - truth) <= 2 * r.stderrs
    ests = np.array(ests)
    z = (ests.mean(0) - truth) / (ests.std(0, ddof=1) / np.sqrt(len(ests)))
    assert np.all(np.abs(z) <= 4), z
    assert np.all(covered >= 170), covered


def test_hutchpp_beats_hutchinson_per_block_on_low_rank_curvature():
    """The point of Hutch++ per block: with curvature concentrated in a few directions, the same
    number of shared products gives much smaller per-block errors than Hutchinson."""
    rng = np.random.default_rng(1)
    A = rng.standard_normal((90, 4))
    H = A @ A.T + 1e-3 * np.eye(90)
    truth = np.array([np.trace(H[a:b, a:b]) for _, a, b in BLOCKS])
    rms = {}
    for method in ("hutchinson", "hutchpp"):
        errs = [estimate_block_traces(MatOp(H), BLOCKS, method, 30, s).traces - truth for s in range(20)]
        rms[method] = np.sqrt(np.mean(np.square(errs), 0))
    assert np.all(rms["hutchpp"] < 0.1 * rms["hutchinson"]), rms


def test_refusals():
    H = _coupled()
    with pytest.raises(UsageError, match="per block"):
        estimate_block_traces(MatOp(H), BLOCKS, "xtrace", 30)
    with pytest.raises(UsageError, match="at least 3"):
        estimate_block_traces(MatOp(H), BLOCKS, "hutchpp", 2)
    with pytest.raises(UsageError, match="at least 1"):
        estimate_block_traces(MatOp(H), BLOCKS, "hutchinson", 0)
    with pytest.raises(ValueError, match="contiguous"):
        estimate_block_traces(MatOp(H), [("a", 0, 20), ("c", 21, 90)], "hutchinson", 10)
    with pytest.raises(ValueError, match="not the operator's n = 90"):
        estimate_block_traces(MatOp(H), [("a", 0, 20), ("b", 20, 80)], "hutchinson", 10)
