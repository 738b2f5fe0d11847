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
    from hesscli import api
    from hesscli.cli.console import err_console
    from hesscli.cli.render import render_compute
    from hesscli.io.resultfile import check_output

    if not common.out:
        raise UsageError("merge needs -o OUT.npz")
    check_output(common.out, common.force)
    result = api.merge(results)
    result.save(common.out, common.force)
    summary = result.summary()
    con = err_console()
    emit(summary, common, lambda: (render_compute(con, summary, title=f"merged {len(results)} results"),
                                   con.print(f"wrote {common.out}")))
    return result.exit_code
