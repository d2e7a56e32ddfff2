"""petra: evolutionary multi-objective compression of trained PyTorch models.

    import petra
    result = petra.search("search_spaces/quickstart.yaml", search__population=8)
    result.front                        # a pandas DataFrame, the knee marked
    result.plot()                       # a plotly figure of the front
    again = petra.load(result.run_id)   # read back from the MLflow store

Heavy dependencies (torch, ray, mlflow, optuna) are imported where they are used, so
``import petra`` is fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "PRUNING",
    "QUANTIZATION",
    "REGULARIZERS",
    "Result",
    "SearchResult",
    "Task",
    "evaluate",
    "load",
    "load_config",
    "search",
]

from petra.registry import PRUNING, QUANTIZATION, REGULARIZERS


def __getattr__(name: str) -> Any:
    if name == "load_config":
        from petra.config import load_config

        return load_config
    if name in ("search", "load", "Result"):
        from petra import notebook

        return getattr(notebook, name)
    if name == "SearchResult":
        from petra.engine import loop

        return loop.SearchResult
    if name == "Task":
        from petra.tasks import Task

        return Task
    if name == "evaluate":
        from petra.candidate.evaluate import Evaluator

        return Evaluator
    raise AttributeError(f"module 'petra' has no attribute {name!r}")
