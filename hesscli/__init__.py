"""hesscli: the Hessian of a saved model's training loss with respect to its weights.

Library API (the CLI is a thin layer over it)::

    from hesscli import ModelSpec, open_session, dense_hessian
    s = open_session(ModelSpec("ckpt.pt", data=["batch.pt"]))
    H = dense_hessian(s.objective)
"""

__version__ = "0.1.0"

from hesscli.algorithms.dense import DenseResult, dense_hessian, plan_dense  # noqa: E402
from hesscli.api import ModelSpec, Session, compute, open_session  # noqa: E402
from hesscli.errors import HesscliError, MemoryBudgetError, UsageError  # noqa: E402
from hesscli.io.data import Dataset, load_dataset  # noqa: E402
from hesscli.io.loading import LoadedModel, detect_format, load_model  # noqa: E402
from hesscli.io.resultfile import ResultFile, read_result, write_result  # noqa: E402
from hesscli.objective.core import Linearization, Objective  # noqa: E402
from hesscli.objective.losses import Loss, resolve_loss  # noqa: E402
from hesscli.objective.safeops import second_order_safe  # noqa: E402

__all__ = [
    # pipeline
    "ModelSpec",
    "Session",
    "open_session",
    "compute",
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
    # dense
    "dense_hessian",
    "plan_dense",
    "DenseResult",
    # results
    "read_result",
    "write_result",
    "ResultFile",
    # errors
    "HesscliError",
    "UsageError",
    "MemoryBudgetError",
]
