"""``hesscli spectrum``, ``trace`` and ``density``: parse the options, call the library function
(:func:`hesscli.spectrum`, :func:`hesscli.trace`, :func:`hesscli.density`), write and render its
result. SOURCE is a model file (with ``--data``) or a ``compute`` result file (SPEC.md)."""


import enum
from typing import Annotated, Optional

import typer

from hesscli import api
from hesscli.cli.base import (
    BlocksBy,
    Common,
    acknowledge_signal,
    app,
    comm_from_env,
    emit,
    spec_options,
    start_output,
    with_options,
)
from hesscli.cli.console import err_console, make_progress
from hesscli.cli.render import render_density, render_spectrum, render_trace
from hesscli.io.resultfile import check_output

SOURCE_HELP = "A result file from 'hesscli compute' (default: hessian.npz) or a model file (then --data is needed)."
PER_BLOCK_HELP = "The same for each diagonal block (the block-diagonal part of H; --blocks chooses them)."


class Which(str, enum.Enum):
    """spectrum --which choices."""

    largest = "largest"
    smallest = "smallest"
    both = "both"
    magnitude = "magnitude"


class TraceMethod(str, enum.Enum):
    """trace --method choices."""

    auto = "auto"
    exact = "exact"
    hutchinson = "hutchinson"
    hutchpp = "hutchpp"
    xtrace = "xtrace"


MaxMemory = Annotated[Optional[str], typer.Option(
    "--max-memory", help="Memory budget, e.g. 4GB (default: half of what the process may use); planned before any product.")]
BlocksOption = Annotated[BlocksBy, typer.Option("--blocks", help="Blocks of --per-block: module, layer or tensor.")]


def _source_args(source, spec_kw: dict) -> tuple:
    """The library's (source, data, options) from the command line's SOURCE and model options."""
    data = spec_kw.get("data") or None
    return source, data, spec_options(spec_kw)


@app.command()
@with_options()
def spectrum(
    source: Annotated[Optional[str], typer.Argument(help=SOURCE_HELP)] = None,
    *,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Number of eigenpairs.")] = 20,
    which: Annotated[Which, typer.Option("--which", help="largest, smallest, both (half each end) or magnitude.")] = Which.largest,
    tol: Annotated[Optional[float], typer.Option("--tol", help="Converged when ‖Hv − λv‖ ≤ tol·‖H‖₂ (default 1e-6 in float64; in float32 max(1e-5, 50 × the products' measured asymmetry)).")] = None,
    max_matvecs: Annotated[Optional[int], typer.Option("--max-matvecs", min=1, help="Budget of products per operator for the iterations, in whole blocks (default max(1000, 50·k)); measuring the k residuals adds k.")] = None,
    block_size: Annotated[Optional[int], typer.Option("--block-size", min=1, help="Vectors per Lanczos block (default min(4, k)); at least the multiplicity you expect.")] = None,
    per_block: Annotated[bool, typer.Option("--per-block", help=PER_BLOCK_HELP)] = False,
    blocks: BlocksOption = BlocksBy.module,
    eigenvectors: Annotated[bool, typer.Option("--eigenvectors", help="Store the eigenvectors (P, k).")] = False,
    max_memory: MaxMemory = None,
    spec_kw: dict,
    common: Common,
) -> int:
    """Extreme eigenvalues with residuals: block Lanczos on a model, the stored eigenvalues (or eigh) of a result file."""
    out, comm, writer = start_output(common, "spectrum.npz")
    con = err_console()
    source, data, options = _source_args(source, spec_kw)
    result = api.spectrum(source, data, top_k=top_k, which=Which(which).value, tol=tol, max_matvecs=max_matvecs,
                          block_size=block_size, per_block=per_block, blocks=BlocksBy(blocks).value,
                          eigenvectors=eigenvectors, max_memory=max_memory,
                          progress=make_progress(con, common.quiet or not writer),
                          comm=comm, **options)
    if result.meta.get("interrupted"):
        acknowledge_signal()  # handled here: the pairs found so far are written below
    if writer:
        result.save(out, common.force)
        summary = result.summary()
        emit(summary, common, lambda: (render_spectrum(con, summary), con.print(f"wrote {out}")))
    if result.meta.get("interrupted"):
        con.print(f"Error: interrupted (SIGINT); wrote the pairs found so far to {out} ('converged' says which)",
                  markup=False, highlight=False)
    return result.exit_code


@app.command()
@with_options()
def trace(
    source: Annotated[Optional[str], typer.Argument(help=SOURCE_HELP)] = None,
    *,
    method: Annotated[TraceMethod, typer.Option("--method", help="auto, exact, hutchinson, hutchpp or xtrace.")] = TraceMethod.auto,
    matvecs: Annotated[int, typer.Option("--matvecs", min=1, help="Products (with --per-block on a model: shared by every block; per block for xtrace and result files).")] = 300,
    per_block: Annotated[bool, typer.Option("--per-block", help=PER_BLOCK_HELP)] = False,
    blocks: BlocksOption = BlocksBy.module,
    max_memory: MaxMemory = None,
    spec_kw: dict,
    common: Common,
) -> int:
    """The trace of the Hessian: exact, or estimated (Hutchinson, Hutch++, XTrace) with a standard error."""
    out, comm, writer = start_output(common, "trace.npz")
    con = err_console()
    source, data, options = _source_args(source, spec_kw)
    result = api.trace(source, data, method=TraceMethod(method).value, matvecs=matvecs, per_block=per_block,
                       blocks=BlocksBy(blocks).value, max_memory=max_memory,
                       progress=make_progress(con, common.quiet or not writer), comm=comm,
                       **options)
    if writer:
        result.save(out, common.force)
        summary = result.summary()
        emit(summary, common, lambda: (render_trace(con, summary), con.print(f"wrote {out}")))
    return result.exit_code


@app.command()
@with_options()
def density(
    source: Annotated[Optional[str], typer.Argument(help=SOURCE_HELP)] = None,
    *,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Random start vectors (SLQ; not used for a result file).")] = 10,
    steps: Annotated[int, typer.Option("--steps", min=2, help="Lanczos steps per run (SLQ; not used for a result file).")] = 80,
    plot: Annotated[Optional[str], typer.Option("--plot", help="Save a PNG of the density (log scale); needs matplotlib.")] = None,
    per_block: Annotated[bool, typer.Option("--per-block", help=PER_BLOCK_HELP)] = False,
    blocks: BlocksOption = BlocksBy.module,
    max_memory: MaxMemory = None,
    spec_kw: dict,
    common: Common,
) -> int:
    """The eigenvalue density by stochastic Lanczos quadrature (exact eigenvalues for a result file)."""
    out, comm, writer = start_output(common, "density.npz")
    if plot and writer:
        check_output(plot, common.force)
    con = err_console()
    source, data, options = _source_args(source, spec_kw)
    result = api.density(source, data, runs=runs, steps=steps, per_block=per_block, blocks=BlocksBy(blocks).value,
                         max_memory=max_memory,
                         progress=make_progress(con, common.quiet or not writer), comm=comm, **options)
    if writer:
        if plot:
            result.plot(plot, force=common.force)
        result.save(out, common.force)
        summary = result.summary()
        emit(summary, common, lambda: (render_density(con, summary, result.grid, result.density), con.print(f"wrote {out}")))
    return result.exit_code


__all__ = ["spectrum", "trace", "density", "comm_from_env"]
