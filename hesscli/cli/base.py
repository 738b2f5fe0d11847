"""The ``hesscli`` command line: parse options, call the library, format the result.

Data goes to stdout (``--json``), people get stderr (tables, progress, warnings). Errors become one
``Error:`` line and SPEC.md's exit code.
"""

from __future__ import annotations

import functools
import inspect
import json
import signal
import sys
import warnings
from dataclasses import dataclass
from typing import Annotated, Optional

import typer

try:  # typer >= 0.20 vendors click
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover - older typer depends on click
    import click.exceptions as _cx

from hesscli import __version__
from hesscli.errors import HesscliError, UsageError, clean_message

app = typer.Typer(
    name="hesscli",
    help="The Hessian of a saved model's training loss with respect to its weights.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that ``finally`` blocks clean up (exit 143)."""


# ---------------------------------------------------------------------------------------------
# Options shared by commands, declared once and injected into each command's signature.


@dataclass
class Common:
    json: bool = False
    quiet: bool = False
    out: Optional[str] = None
    force: bool = False


def _opt(name: str, annotation, default, *flags: str, help: str, **kw) -> inspect.Parameter:
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[annotation, typer.Option(*flags, help=help, **kw)],
    )


MODEL_OPTIONS = [
    _opt("data", Optional[list[str]], None, "--data", help="Data shard (.pt, .safetensors, .npz); repeat for several."),
    _opt("arch", Optional[str], None, "--arch", help="Architecture for weights-only files: file.py:NAME or package.module:NAME."),
    _opt("arch_kwargs", Optional[str], None, "--arch-kwargs", help="JSON object of keyword arguments for --arch."),
    _opt("trust_code", bool, False, "--trust-code", help="Let a safetensors file's metadata name its architecture."),
    _opt("loss", str, "auto", "--loss", help="auto, cross_entropy, mse, nll, bce_with_logits or model."),
    _opt("reduction", str, "mean", "--reduction", help="mean or sum."),
    _opt("input_key", Optional[str], None, "--input-key", help="Key of the inputs in the data shards."),
    _opt("target_key", Optional[str], None, "--target-key", help="Key of the targets in the data shards."),
    _opt("params", Optional[str], None, "--params", help="Regex selecting parameters by name (default: all)."),
    _opt("batch_size", Optional[int], None, "--batch-size", help="Samples per micro-batch (default: a whole shard)."),
    _opt("device", str, "auto", "--device", help="auto, cpu, cuda or cuda:N."),
    _opt("dtype", Optional[str], None, "--dtype", help="float32 or float64 (default: the parameters', at least float32)."),
    _opt("seed", int, 0, "--seed", help="Seed for random vectors."),
    _opt("output_key", Optional[str], None, "--output-key",
         help="Entry of a structured output (dict, tuple, ModelOutput) that is the prediction (default: 'logits', else the only tensor)."),
    _opt("trainable_only", bool, False, "--trainable-only",
         help="Only the parameters saved with requires_grad=True (default: all; frozen ones get a note)."),
    _opt("engine", str, "auto", "--engine",
         help="Hessian-vector products: auto (closed form for MLPs, checked against autograd; autograd otherwise), autograd, or chain (closed form or refuse)."),
]

COMMON_OPTIONS = [
    _opt("json", bool, False, "--json", help="Print one JSON object on stdout."),
    _opt("quiet", bool, False, "--quiet", "-q", help="No progress, no tables."),
    _opt("out", Optional[str], None, "--out", "-o", help="Output file."),
    _opt("force", bool, False, "--force", help="Overwrite an existing output file."),
]

_MODEL_NAMES = [p.name for p in MODEL_OPTIONS]
_COMMON_NAMES = [p.name for p in COMMON_OPTIONS]


def with_options(model: bool = True, common: bool = True):
    """Add the shared options to a command; it receives ``spec_kw`` (dict) and ``common`` (Common)."""

    def deco(fn):
        sig = inspect.signature(fn)
        own = [p for n, p in sig.parameters.items() if n not in ("spec_kw", "common")]
        extra = (MODEL_OPTIONS if model else []) + (COMMON_OPTIONS if common else [])
        positional = [p for p in own if p.kind != inspect.Parameter.KEYWORD_ONLY]
        keyword = [p for p in own if p.kind == inspect.Parameter.KEYWORD_ONLY]

        @functools.wraps(fn)
        def wrapper(*args, **kw):
            spec_kw = {n: kw.pop(n) for n in _MODEL_NAMES if n in kw}
            com = Common(**{n: kw.pop(n) for n in _COMMON_NAMES if n in kw})
            extra_kw = {}
            if "spec_kw" in sig.parameters:
                extra_kw["spec_kw"] = spec_kw
            if "common" in sig.parameters:
                extra_kw["common"] = com
            return fn(*args, **kw, **extra_kw)

        wrapper.__signature__ = sig.replace(parameters=positional + keyword + extra)
        wrapper.__annotations__ = {p.name: p.annotation for p in positional + keyword + extra}
        del wrapper.__wrapped__
        return wrapper

    return deco


def model_spec(model: str, spec_kw: dict):
    from hesscli.api import ModelSpec

    kw = dict(spec_kw)
    kw["data"] = list(kw.get("data") or [])
    return ModelSpec(model=model, **kw)


def emit(summary: dict, common: Common, render) -> None:
    """``--json`` to stdout; the human summary to stderr unless ``--quiet``."""
    from hesscli.io.resultfile import json_safe

    if common.json:
        sys.stdout.write(json.dumps(json_safe(summary), allow_nan=False) + "\n")
        sys.stdout.flush()
    if not common.quiet:
        render()


def health_warnings(summary: dict) -> list[str]:
    """Numerical health: an extreme eigenvalue (λmax or λmin, of the matrix or of any block) that
    lies within the rounding threshold τ = ‖H‖₂·√P·ε of zero in float32 has no meaningful sign."""
    tau = summary.get("negative_threshold") or 0.0
    if summary.get("dtype") != "float32" or tau <= 0:
        return []
    near = []
    for b in summary.get("blocks") or []:
        for key, sym in (("lambda_max", "λmax"), ("lambda_min", "λmin")):
            v = b.get(key)
            if v is not None and abs(v) <= tau:
                near.append(f"{sym} of {b['name']} ({v:.2e})")
    if not near:
        return []
    return [
        f"{', '.join(near[:4])}{' …' if len(near) > 4 else ''} within the rounding threshold {tau:.1e} of zero "
        "in float32: the sign is not meaningful; rerun with --dtype float64"
    ]


def _comm():
    """The torchrun communicator (None in one process); rank 0 alone prints and writes."""
    from hesscli.runtime import distributed

    return distributed.from_env()


# ---------------------------------------------------------------------------------------------
# compute, show, inspect


@app.command()
@with_options()
def compute(
    model: Annotated[str, typer.Argument(help="Model file: TorchScript, torch.export (.pt2), safetensors or state_dict.")],
    *,
    mode: Annotated[str, typer.Option("--mode", help="auto, full or block.")] = "auto",
    blocks: Annotated[str, typer.Option("--blocks", help="Blocks of block mode: module, layer (by the first integer index in the path) or tensor.")] = "module",
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", help="Memory budget, e.g. 4GB (default: half of what the process may use).")] = None,
    eigenvectors: Annotated[bool, typer.Option("--eigenvectors", help="Store eigenvectors too.")] = False,
    no_dense: Annotated[bool, typer.Option("--no-dense", help="Do not store the dense matrices.")] = False,
    no_symmetry: Annotated[bool, typer.Option("--no-symmetry", help="Compute every column instead of one triangle of tensor blocks.")] = False,
    split: Annotated[str, typer.Option("--split", help="Under torchrun: data (default) or columns.")] = "data",
    spec_kw: dict,
    common: Common,
) -> int:
    """The dense Hessian (full or block-diagonal) of a model's loss, into an .npz."""
    from hesscli.api import compute as run_compute
    from hesscli.cli.console import err_console, make_progress, summary_footer, summary_table

    con = err_console()
    comm = _comm()
    out = common.out or "hessian.npz"
    if not spec_kw.get("data"):
        raise UsageError("compute needs --data FILE")
    if split not in ("data", "columns"):
        raise UsageError(f"--split '{split}': choose data or columns")
    summary = run_compute(
        model_spec(model, spec_kw),
        out,
        mode=mode,
        blocks=blocks,
        max_memory=max_memory,
        eigenvectors=eigenvectors,
        no_dense=no_dense,
        symmetric=not no_symmetry,
        force=common.force,
        progress=make_progress(con, common.quiet or (comm is not None and comm.rank != 0)),
        comm=comm,
        split=split,
    )
    if comm is not None and comm.rank != 0:
        return 0

    def render():
        con.print(summary_table(summary))
        con.print(summary_footer(summary))
        for note in summary.get("notes", []):
            if not note.startswith("warning: "):  # the warnings follow
                con.print(f"note: {note}")
        for warning in summary["warnings"]:
            con.print(f"[yellow]warning:[/yellow] {warning}")
        con.print(f"wrote {summary['out']}")

    summary["warnings"] = list(summary.get("warnings") or []) + health_warnings(summary)
    emit(summary, common, render)
    return 0


@app.command()
@with_options(model=False)
def show(
    result: Annotated[str, typer.Argument(help="A result file written by hesscli.")],
    *,
    common: Common,
) -> int:
    """Print the summary of a result file."""
    from hesscli.cli.console import err_console, summary_footer, summary_table
    from hesscli.io.resultfile import read_result, summarize

    rf = read_result(result)
    command = rf.meta.get("command")
    con = err_console()
    if command in ("spectrum", "trace", "density"):
        summary = estimate_summary(rf)

        def render():
            con.print(estimate_table(summary, title=f"{command}: {result}"))
            con.print(summary_footer(summary))

        emit(summary, common, render)
        return 0
    summary = summarize(rf)

    def render():
        con.print(summary_table(summary, title=f"{command or 'result'}: {result}"))
        con.print(summary_footer(summary))
        for warning in summary["warnings"]:
            con.print(f"[yellow]warning:[/yellow] {warning}")

    summary["warnings"] = health_warnings(summary)
    emit(summary, common, render)
    return 0


_ESTIMATE_KEYS = ("eigenvalues", "residuals", "converged", "trace", "trace_stderr", "matvecs")


def estimate_summary(rf) -> dict:
    """The summary of a spectrum, trace or density result: its estimates, whole and per block."""
    from hesscli.io.resultfile import json_safe, summarize

    base = summarize(rf)
    base.pop("blocks", None)
    meta = rf.meta
    out = dict(base, method=meta.get("method"), approximation=meta.get("approximation"))
    for k in _ESTIMATE_KEYS:
        if k in rf:
            out[k] = rf[k]
    if "density" in rf:
        grid = rf["density_grid"]
        out.update(lambda_min=float(grid[0]), lambda_max=float(grid[-1]), grid_points=int(len(grid)))
    blocks = []
    for name in rf.block_names if "block_names" in rf else []:
        b = {"name": name}
        for k in _ESTIMATE_KEYS:
            key = f"blocks/{name}/{k}"
            if key in rf:
                b[k] = rf[key]
        if len(b) > 1:
            blocks.append(b)
    out["blocks"] = blocks
    return json_safe(out)


def estimate_table(summary: dict, title: str):
    from rich.table import Table

    from hesscli.cli.console import fmt_num

    t = Table(title=title, title_justify="left")
    rows = [dict(summary, name="all")] + list(summary.get("blocks") or [])
    t.add_column("block")
    for col in ("trace", "± stderr", "λmax", "λmin", "worst residual", "converged", "matvecs"):
        t.add_column(col, justify="right")
    for r in rows:
        ev = r.get("eigenvalues") or []
        res = [x for x in (r.get("residuals") or []) if x is not None]
        conv = r.get("converged") or []
        t.add_row(
            r["name"],
            fmt_num(r.get("trace")),
            fmt_num(r.get("trace_stderr")),
            fmt_num(max(ev)) if ev else fmt_num(r.get("lambda_max")),
            fmt_num(min(ev)) if ev else fmt_num(r.get("lambda_min")),
            f"{max(res):.1e}" if res else "—",
            f"{sum(bool(c) for c in conv)}/{len(conv)}" if conv else "—",
            fmt_num(r.get("matvecs")),
        )
    return t


@app.command()
@with_options()
def inspect_(
    model: Annotated[str, typer.Argument(help="Model file.")],
    *,
    spec_kw: dict,
    common: Common,
) -> int:
    """List a model's parameters and blocks, and the memory full and block mode would need."""
    from hesscli.cli.console import err_console
    from hesscli.inspection import inspect_model

    con = err_console()
    summary, render = inspect_model(model_spec(model, spec_kw), con)
    emit(summary, common, render)
    return 0


app.registered_commands[-1].name = "inspect"




# ---------------------------------------------------------------------------------------------
# entry point


class Interrupted(BaseException):
    """SIGINT, raised like :class:`Terminated` (typer would turn a KeyboardInterrupt into a silent
    exit 130; this one reaches ``main`` and its ``Error:`` line)."""


# The signal received and not yet seen by main(). The exception a handler raises can be swallowed:
# when it surfaces in Python code that C code called through getattr/hasattr (torch does, e.g. in
# lazy imports), the C code clears it as a missing attribute. A watchdog thread then sends the
# signal to the main thread again every second until main() acknowledges it.
_pending: dict = {}


def _on_signal(signum, frame):
    _pending["signum"] = signum
    if "watchdog" not in _pending:
        import threading

        _pending["watchdog"] = threading.Thread(target=_watchdog, name="hesscli-signal-watchdog", daemon=True)
        _pending["watchdog"].start()
    raise Terminated() if signum == signal.SIGTERM else Interrupted()


def _watchdog() -> None:
    import threading
    import time

    main_thread = threading.main_thread().ident
    while True:
        time.sleep(1.0)
        signum = _pending.get("signum")
        if signum is None:
            return
        if hasattr(signal, "pthread_kill"):
            signal.pthread_kill(main_thread, signum)  # runs _on_signal again, waking a sleeping main thread
        else:  # Windows
            import _thread

            _thread.interrupt_main(signum)


def _acknowledge_signal() -> None:
    _pending.pop("signum", None)
    _pending.pop("watchdog", None)


def _install_signal_handlers() -> dict:
    """SIGINT and SIGTERM raise where the process is, so that ``finally`` blocks remove temporary
    files; returns the previous handlers (``main`` also runs in-process, in tests)."""
    _acknowledge_signal()
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread
            pass
    return previous


def _restore_signal_handlers(previous: dict) -> None:
    _acknowledge_signal()
    for sig, handler in previous.items():
        if handler is not None:
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns SPEC.md's exit code.

    Warnings raised by torch or other libraries during the command are collected, not printed as
    they come: without ``--quiet`` each distinct one is shown once at the end, after the summary;
    with ``--quiet`` none (SPEC.md: stderr is empty on success). TorchScript's deprecation warnings
    are dropped. The caller's warning filters are restored on return."""
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.*")
        warnings.filterwarnings("ignore", message=".*TorchScript.*")
        code = _main(args)
    if caught and not ({"--quiet", "-q"} & set(args)):
        seen = set()
        for w in caught:
            text = clean_message(str(w.message).strip().splitlines()[0] if str(w.message).strip() else "")
            if text and text not in seen:
                seen.add(text)
                origin = "torch" if "torch" in (w.filename or "") else w.category.__name__
                sys.stderr.write(f"warning ({origin}): {text}\n")
    return code


def _main(args: list[str]) -> int:
    from hesscli.io import resultfile as results
    from hesscli.runtime.memory import keep_freed_memory

    results.CURRENT_ARGV = list(args)
    keep_freed_memory()
    if args and args[0] in ("--version", "-V"):
        print(f"hesscli {__version__}")
        return 0
    exit_types = tuple({typer.Exit, *[c for c in (getattr(_cx, "Exit", None),) if c is not None]})
    abort_types = tuple({typer.Abort, *[c for c in (getattr(_cx, "Abort", None),) if c is not None]})
    click_error = getattr(_cx, "ClickException", _cx.UsageError)
    previous_handlers = _install_signal_handlers()
    code = 0
    try:
        rv = app(args=args, prog_name="hesscli", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except exit_types as e:
        code = getattr(e, "exit_code", 0)
    except _cx.UsageError as e:
        msg = clean_message(e.format_message())
        ctx = e.ctx
        usage = ctx.get_usage() if ctx is not None else ""
        sys.stderr.write((usage + "\n" if usage else "") + f"Error: {msg}\n")
        code = 2
    except click_error as e:  # e.g. click's FileError
        sys.stderr.write(f"Error: {clean_message(e.format_message())}\n")
        code = getattr(e, "exit_code", 1) or 1
    except abort_types:
        sys.stderr.write("Error: aborted\n")
        code = 1
    except HesscliError as e:
        sys.stderr.write(f"Error: {e.message}\n")
        code = e.exit_code
    except (KeyboardInterrupt, Interrupted):
        _acknowledge_signal()
        sys.stderr.write("Error: interrupted (SIGINT)\n")
        code = 130
    except Terminated:
        _acknowledge_signal()
        sys.stderr.write("Error: terminated (SIGTERM)\n")
        code = 143
    except MemoryError:
        sys.stderr.write("Error: out of memory; lower --max-memory or --batch-size, or use --mode block\n")
        code = 1
    except Exception as e:  # a bug: still one line, with its type, and the traceback with HESSCLI_DEBUG
        import os

        if os.environ.get("HESSCLI_DEBUG"):
            raise
        sys.stderr.write(f"Error: internal error: {type(e).__name__}: {clean_message(e)} (set HESSCLI_DEBUG=1 for a traceback)\n")
        code = 1
    finally:
        try:
            from hesscli.runtime import distributed

            distributed.shutdown(code, json_status="--json" in args)
        except ImportError:
            pass
    _restore_signal_handlers(previous_handlers)
    return code


def run() -> None:
    sys.exit(main())
