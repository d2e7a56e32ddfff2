"""Name → function registries for pruning criteria, quantization schemes and regularizers.

Every extension point of petra is a function registered by name with a decorator, timm-style:

    @PRUNING.register("magnitude", description="...", structured=False)
    def magnitude(...): ...

A duplicate name is an error, and an unknown name raises ``ValueError`` that lists the choices.
"""

from __future__ import annotations

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

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

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
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; choose from {', '.join(self._entries)}"
            ) from None

    def names(self) -> list[str]:
        return list(self._entries)

    def describe(self) -> dict[str, str]:
        return {n: e.description for n, e in self._entries.items()}

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


PRUNING = Registry("pruning method")
QUANTIZATION = Registry("quantization scheme")
REGULARIZERS = Registry("regularizer")
RANK_RULES = Registry("rank rule")
SPARSITY_RULES = Registry("sparsity rule")
