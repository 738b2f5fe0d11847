"""``hesscli batch``: a data shard from raw text, tokenised by a Hugging Face directory's tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hesscli.cli.base import Common, app, emit, with_options


@app.command()
@with_options(model=False)
def batch(
    model: Annotated[str, typer.Argument(help="Hugging Face model directory (its tokenizer is used).")],
    *,
    text: Annotated[Optional[str], typer.Option("--text", help="Text file: one example per line.")] = None,
    jsonl: Annotated[Optional[str], typer.Option("--jsonl", help="JSON Lines: {\"text\": ..., \"label\": ...} per line.")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", min=1, help="Truncate examples to this many tokens.")] = None,
    common: Common,
) -> int:
    """Tokenise text into a data shard (.pt) for the model's head: padding, attention mask, labels."""
    from hesscli.cli.console import err_console
    from hesscli.io.hf import make_batch, read_texts, save_shard

    out = Path(common.out or "batch.pt")
    texts, labels = read_texts(Path(text) if text else None, Path(jsonl) if jsonl else None)
    shard, notes = make_batch(Path(model), texts, labels, max_length)
    save_shard(shard, out, common.force)
    summary = {
        "status": "ok",
        "command": "batch",
        "out": str(out),
        "n_samples": len(texts),
        "keys": {k: list(v.shape) for k, v in shard.items()},
        "notes": notes,
    }
    con = err_console()

    def render():
        shapes = ", ".join(f"{k} {tuple(v)}" for k, v in summary["keys"].items())
        con.print(f"{len(texts)} examples → {out}: {shapes}")
        for n in notes:
            con.print(f"note: {n}")

    emit(summary, common, render)
    return 0
