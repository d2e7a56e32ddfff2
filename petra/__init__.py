"""petra: evolutionary multi-objective compression of trained PyTorch models.

    import petra
    cfg = petra.load_config("search_spaces/quickstart.yaml", ["search.population=8"])
    result = petra.search(cfg)          # a SearchResult: run id, front, knee, records

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
    "SearchResult",
    "Task",
    "evaluate",
    "load_config",
    "search",
]

from petra.registry import PRUNING, QUANTIZATION, REGULARIZERS


def __getattr__(name: str) -> Any:
    if name == "load_config":
        from petra.config import load_config

        return load_config
    if name in ("search", "SearchResult"):
        from petra.engine import loop

        return getattr(loop, name)
    if name == "Task":
        from petra.tasks import Task

        return Task
    if name == "evaluate":
        from petra.candidate.evaluate import Evaluator

        return Evaluator
    raise AttributeError(f"module 'petra' has no attribute {name!r}")
