"""hesscli: the Hessian of a saved model's training loss with respect to its weights.

The library is the product; the command line renders it. Every command is a function that returns
a typed result, which writes itself (``result.save(path)``) and summarises itself
(``result.summary()``, what ``--json`` prints)::

    import hesscli
    r = hesscli.spectrum(model, (X, y), top_k=1, loss="cross_entropy")   # an nn.Module in memory
    r.eigenvalues, r.residuals
    h = hesscli.compute("ckpt.pt", "batch.pt")                             # files, as the CLI takes
    h.save("hessian.npz")
    hesscli.load("hessian.npz").eigenvalues
"""

__version__ = "0.1.0"

from hesscli.algorithms.dense import DenseResult, dense_hessian, plan_dense  # noqa: E402
from hesscli.api import compute, density, inspect, merge, spectrum, trace  # noqa: E402
from hesscli.errors import HesscliError, MemoryBudgetError, UsageError  # noqa: E402
from hesscli.io.data import Dataset, load_dataset  # noqa: E402
from hesscli.io.loading import LoadedModel, detect_format, load_model  # noqa: E402
from hesscli.objective.core import Linearization, Objective  # noqa: E402
from hesscli.objective.losses import Loss, resolve_loss  # noqa: E402
from hesscli.objective.safeops import second_order_safe  # noqa: E402
from hesscli.results import (  # noqa: E402
    ComputeResult,
    DensityResult,
    InspectResult,
    MergeResult,
    Result,
    SpectrumResult,
    TraceResult,
    load,
)
from hesscli.session import ModelSpec, Session, open_session  # noqa: E402
from hesscli.tracking import TrackResult, TrackRow, track  # noqa: E402

__all__ = [
    # one function per command, and reading results back
    "compute",
    "spectrum",
    "trace",
    "density",
    "inspect",
    "merge",
    "track",
    "load",
    # typed results
    "Result",
    "ComputeResult",
    "SpectrumResult",
    "TraceResult",
    "DensityResult",
    "InspectResult",
    "MergeResult",
    "TrackResult",
    "TrackRow",
    # a model and its data, opened once
    "ModelSpec",
    "Session",
    "open_session",
    # pieces
    "load_model",
    "detect_format",
    "LoadedModel",
    "load_dataset",
    "Dataset",
    "Loss",
    "resolve_loss",
    "Objective",
    "Linearization",
    "second_order_safe",
    "dense_hessian",
    "plan_dense",
    "DenseResult",
    # errors
    "HesscliError",
    "UsageError",
    "MemoryBudgetError",
]
