"""The ``hesscli`` command line: parse options, call the library, format the result.

Data goes to stdout (``--json``), people get stderr (tables, progress, warnings). Errors become one
``Error:`` line and SPEC.md's exit code.
"""

from __future__ import annotations

import enum
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
from hesscli.errors import HesscliError, Interrupted, UsageError, clean_message, on_interrupt_handled

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
    """The options every command shares: --json, --quiet, -o/--out, --force."""
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


class LossChoice(str, enum.Enum):
    """--loss choices (SPEC.md, Loss)."""
    auto = "auto"
    cross_entropy = "cross_entropy"
    mse = "mse"
    nll = "nll"
    bce_with_logits = "bce_with_logits"
    model = "model"


class Reduction(str, enum.Enum):
    """--reduction choices."""
    mean = "mean"
    sum = "sum"


class DtypeChoice(str, enum.Enum):
    """--dtype choices."""
    float32 = "float32"
    float64 = "float64"


class Engine(str, enum.Enum):
    """--engine choices: auto (closed form for MLPs, checked), autograd, chain."""
    auto = "auto"
    autograd = "autograd"
    chain = "chain"


MODEL_OPTIONS = [
    _opt("data", Optional[list[str]], None, "--data", help="Data shard (.pt, .safetensors, .npz); repeat for several."),
    _opt("arch", Optional[str], None, "--arch", help="Architecture for weights-only files: file.py:NAME or package.module:NAME."),
    _opt("arch_kwargs", Optional[str], None, "--arch-kwargs", help="JSON object of keyword arguments for --arch."),
    _opt("trust_code", bool, False, "--trust-code", help="Let a safetensors file's metadata name its architecture."),
    _opt("loss", LossChoice, LossChoice.auto, "--loss", help="auto, cross_entropy, mse, nll, bce_with_logits or model."),
    _opt("reduction", Reduction, Reduction.mean, "--reduction", help="mean or sum."),
    _opt("input_key", Optional[str], None, "--input-key", help="Key of the inputs in the data shards."),
    _opt("target_key", Optional[str], None, "--target-key", help="Key of the targets in the data shards."),
    _opt("params", Optional[str], None, "--params", help="Regex selecting parameters by name (default: all)."),
    _opt("batch_size", Optional[int], None, "--batch-size", help="Samples per micro-batch (default: a whole shard)."),
    _opt("device", str, "auto", "--device", help="auto, cpu, cuda or cuda:N."),
    _opt("dtype", Optional[DtypeChoice], None, "--dtype", help="float32 or float64 (default: the parameters', at least float32)."),
    _opt("seed", int, 0, "--seed", help="Seed for random vectors."),
    _opt("output_key", Optional[str], None, "--output-key",
         help="Entry of a structured output (dict, tuple, ModelOutput) that is the prediction (default: 'logits', else the only tensor)."),
    _opt("trainable_only", bool, False, "--trainable-only",
         help="Only the parameters saved with requires_grad=True (default: all; frozen ones get a note)."),
    _opt("engine", Engine, Engine.auto, "--engine",
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


def spec_options(spec_kw: dict) -> dict:
    """The model options of the command line as keyword arguments of the library (enums as their
    values; ``data`` left out: it is the library's second argument)."""
    return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in spec_kw.items() if k != "data"}


def model_spec(model: str, spec_kw: dict):
    """A :class:`~hesscli.session.ModelSpec` from the command line's MODEL and model options."""
    from hesscli.session import ModelSpec

    return ModelSpec(model=model, data=list(spec_kw.get("data") or []), **spec_options(spec_kw))


def emit(summary: dict, common: Common, render) -> None:
    """``--json`` to stdout; the human summary to stderr unless ``--quiet``."""
    from hesscli.io.resultfile import json_safe

    if common.json:
        sys.stdout.write(json.dumps(json_safe(summary), allow_nan=False) + "\n")
        sys.stdout.flush()
    if not common.quiet:
        render()


def comm_from_env():
    """The torchrun communicator (None in one process); rank 0 alone prints and writes."""
    from hesscli.runtime import distributed

    return distributed.from_env()


def start_output(common: Common, default_out: str) -> tuple[str, object, bool]:
    """The output path, the torchrun communicator (or None) and whether this rank writes; the
    output is checked before any work, on the writing rank, and every rank learns of a refusal."""
    from hesscli.io.resultfile import check_output
    from hesscli.session import stage

    out = common.out or default_out
    comm = comm_from_env()
    writer = comm is None or comm.rank == 0
    with stage(comm):
        if writer:
            check_output(out, common.force)
    return out, comm, writer


# ---------------------------------------------------------------------------------------------
# compute, show, inspect


class Mode(str, enum.Enum):
    """compute --mode choices."""
    auto = "auto"
    full = "full"
    block = "block"


class BlocksBy(str, enum.Enum):
    """compute --blocks choices."""
    module = "module"
    layer = "layer"
    tensor = "tensor"


class Split(str, enum.Enum):
    """--split choices under torchrun."""
    data = "data"
    columns = "columns"


@app.command()
@with_options()
def compute(
    model: Annotated[str, typer.Argument(help="Model file: TorchScript, torch.export (.pt2), safetensors or state_dict.")],
    *,
    mode: Annotated[Mode, typer.Option("--mode", help="auto, full or block.")] = Mode.auto,
    blocks: Annotated[BlocksBy, typer.Option("--blocks", help="Blocks of block mode: module, layer (by the first integer index in the path) or tensor.")] = BlocksBy.module,
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", help="Memory budget, e.g. 4GB (default: half of what the process may use).")] = None,
    eigenvectors: Annotated[bool, typer.Option("--eigenvectors", help="Store eigenvectors too.")] = False,
    no_dense: Annotated[bool, typer.Option("--no-dense", help="Do not store the dense matrices.")] = False,
    no_symmetry: Annotated[bool, typer.Option("--no-symmetry", help="Compute every column instead of one triangle of tensor blocks.")] = False,
    split: Annotated[Split, typer.Option("--split", help="Under torchrun: data (default) or columns.")] = Split.data,
    spec_kw: dict,
    common: Common,
) -> int:
    """The dense Hessian (full or block-diagonal) of a model's loss, into an .npz."""
    from hesscli import api
    from hesscli.cli.console import err_console, make_progress
    from hesscli.cli.render import render_compute

    if not spec_kw.get("data"):
        raise UsageError("compute needs --data FILE")
    out, comm, writer = start_output(common, "hessian.npz")
    con = err_console()
    result = api.compute(
        model, spec_kw["data"], mode=Mode(mode).value, blocks=BlocksBy(blocks).value, max_memory=max_memory,
        eigenvectors=eigenvectors, no_dense=no_dense, symmetric=not no_symmetry,
        progress=make_progress(con, common.quiet or not writer), comm=comm, split=Split(split).value,
        **spec_options(spec_kw),
    )
    if writer:
        result.save(out, common.force)
        summary = result.summary()
        emit(summary, common, lambda: (render_compute(con, summary), con.print(f"wrote {out}")))
    return result.exit_code


@app.command()
@with_options(model=False)
def show(
    result: Annotated[str, typer.Argument(help="A result file written by hesscli.")],
    *,
    common: Common,
) -> int:
    """Print the summary of a result file."""
    from hesscli.cli.console import err_console
    from hesscli.cli.render import RENDERERS, render_density
    from hesscli.results import DensityResult, load

    loaded = load(result)
    summary = loaded.summary()
    con = err_console()
    command = summary.get("command")

    def render():
        if isinstance(loaded, DensityResult):
            render_density(con, summary, loaded.grid, loaded.density)
        elif command in ("compute", "merge"):
            RENDERERS[command](con, summary, title=f"{command}: {result}")
        else:
            RENDERERS[command](con, summary)

    emit(summary, common, render)
    return 0


@app.command()
@with_options()
def inspect_(
    model: Annotated[str, typer.Argument(help="Model file.")],
    *,
    spec_kw: dict,
    common: Common,
) -> int:
    """List a model's parameters and blocks, and the memory full and block mode would need."""
    from hesscli import api
    from hesscli.cli.console import err_console
    from hesscli.cli.render import render_inspect

    con = err_console()
    result = api.inspect(model, spec_kw.get("data") or None, **spec_options(spec_kw))
    summary = result.summary()
    emit(summary, common, lambda: render_inspect(con, summary))
    return result.exit_code


app.registered_commands[-1].name = "inspect"




# ---------------------------------------------------------------------------------------------
# entry point


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


def acknowledge_signal() -> None:
    """A command that handled SIGINT itself (kept its partial result) stops the watchdog."""
    _acknowledge_signal()


on_interrupt_handled(acknowledge_signal)  # library code that keeps a partial result acknowledges at once


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
        # one line, as every error (SPEC.md): the message and where the usage is
        msg = clean_message(e.format_message()).replace("Value error, ", "")
        ctx = e.ctx
        where = f" (see '{ctx.command_path} --help')" if ctx is not None and ctx.command_path else ""
        sys.stderr.write(f"Error: {msg}{where}\n")
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
    """The console script: main() with the process's arguments, then exit with its code."""
    sys.exit(main())
