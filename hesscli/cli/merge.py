"""``hesscli merge``: one result from ``compute`` results run separately on shards of the data."""

from __future__ import annotations

from typing import Annotated

import typer

from hesscli.cli.base import Common, app, emit, with_options
from hesscli.errors import UsageError


@app.command()
@with_options(model=False)
def merge(
    results: Annotated[
        list[str], typer.Argument(help="Result files written by 'compute' on disjoint shards of the data.")
    ],
    *,
    common: Common,
) -> int:
    """Combine compute results on separate shards, weighted by their loss terms (needs -o)."""
    from hesscli.algorithms.merge import merge_results
    from hesscli.cli.console import err_console, summary_footer, summary_table

    if not common.out:
        raise UsageError("merge needs -o OUT.npz")
    summary = merge_results(results, common.out, force=common.force)
    con = err_console()

    def render():
        con.print(summary_table(summary, title=f"merged {len(results)} results"))
        con.print(summary_footer(summary))
        con.print(f"wrote {summary['out']}")

    emit(summary, common, render)
    return 0
