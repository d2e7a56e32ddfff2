"""Name → function registries: every extension point of petra, in one map (:data:`REGISTRIES`).

Every extension point is a function registered by name with a decorator, timm-style:

    @PRUNING.register("magnitude", description="...", structured=False)
    def magnitude(...): ...

A duplicate name is an error, and an unknown name raises ``ValueError`` that lists the choices.
Each registry imports the module of its built-in entries on its first lookup (``petra.compress``
for the compression registries), so no caller imports it for its side effect.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One registered function with its name, one-line description and metadata."""

    name: str
    fn: Callable[..., Any]
    description: str
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class Registry:
    """An ordered, append-only mapping from names to :class:`Entry` objects."""

    def __init__(self, kind: str, *, builtin: str | None = None) -> None:
        """``kind`` names the registry in errors; ``builtin`` is the module whose import
        registers the built-in entries, imported on the first lookup."""
        self.kind = kind
        self._builtin = builtin
        self._entries: dict[str, Entry] = {}

    def _load(self) -> None:
        if self._builtin is not None:
            module, self._builtin = self._builtin, None
            importlib.import_module(module)

    def register(
        self, name: str, *, description: str, **meta: Any
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator that registers ``fn`` under ``name``."""

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = Entry(name, fn, description, MappingProxyType(dict(meta)))
            return fn

        return decorator

    def get(self, name: str) -> Entry:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; choose from {', '.join(self._entries)}"
            ) from None

    def names(self) -> list[str]:
        self._load()
        return list(self._entries)

    def describe(self) -> dict[str, str]:
        self._load()
        return {n: e.description for n, e in self._entries.items()}

    def __contains__(self, name: object) -> bool:
        self._load()
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        self._load()
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        self._load()
        return len(self._entries)


PRUNING = Registry("pruning method", builtin="petra.compress")
QUANTIZATION = Registry("quantization scheme", builtin="petra.compress")
REGULARIZERS = Registry("regularizer", builtin="petra.compress")
RANK_RULES = Registry("rank rule", builtin="petra.compress")
SPARSITY_RULES = Registry("sparsity rule", builtin="petra.compress")
STRATEGIES = Registry("search strategy", builtin="petra.strategies")
TASKS = Registry("task", builtin="petra.tasks.builtin")

#: Every registry, by the name ``petra methods`` lists it under and the config validates with.
REGISTRIES: dict[str, Registry] = {
    "pruning": PRUNING, "sparsity_rule": SPARSITY_RULES, "rank_rule": RANK_RULES,
    "quantization": QUANTIZATION, "regularizer": REGULARIZERS, "strategy": STRATEGIES,
    "task": TASKS,
}
