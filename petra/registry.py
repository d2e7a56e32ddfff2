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


@dataclass(frozen=True)
class Meta:
    """One metadata key of a registry's entries: its default, and what it accepts."""

    default: Any
    valid: Callable[[Any], bool]
    allowed: str


def _is(*types: type) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, types) and not (
        isinstance(value, bool) and bool not in types)


def _one_of(*choices: Any) -> Meta:
    return Meta(choices[0], lambda v: v in choices, f"one of {', '.join(map(repr, choices))}")


_OPTIONAL_FN = Meta(None, lambda v: v is None or callable(v), "None or a function")
#: ``genes``: a function of the config's ``space`` section that returns the genes an entry
#: reads (``petra.space`` gene objects), added to the space when the entry is offered and
#: without effect when it is not chosen.
_GENES = _OPTIONAL_FN


class Registry:
    """An ordered, append-only mapping from names to :class:`Entry` objects.

    With a ``schema`` (metadata key → :class:`Meta`), an entry's metadata is validated when it
    is registered: an unknown key or a wrong value is an error naming both, and the keys it
    leaves out take their defaults, so readers never guess one.
    """

    def __init__(self, kind: str, *, builtin: str | None = None,
                 schema: Mapping[str, Meta] | None = None,
                 check: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        """``kind`` names the registry in errors; ``builtin`` is the module whose import
        registers the built-in entries, imported on the first lookup; ``check`` validates a
        whole entry's completed metadata (raising ``ValueError``) and may add derived keys."""
        self.kind = kind
        self._builtin = builtin
        self._schema = dict(schema) if schema is not None else None
        self._check = check
        self._entries: dict[str, Entry] = {}

    def _complete(self, name: str, meta: dict[str, Any]) -> dict[str, Any]:
        if self._schema is None:
            return meta
        for key, value in meta.items():
            spec = self._schema.get(key)
            if spec is None:
                raise ValueError(f"{self.kind} {name!r}: unknown metadata {key!r}; known: "
                                 f"{', '.join(self._schema)}")
            if not spec.valid(value):
                raise ValueError(f"{self.kind} {name!r}: {key} must be {spec.allowed}; "
                                 f"got {value!r}")
        out = {key: meta.get(key, spec.default) for key, spec in self._schema.items()}
        if self._check is not None:
            self._check(name, out)
        return out

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
            self._entries[name] = Entry(name, fn, description,
                                        MappingProxyType(self._complete(name, dict(meta))))
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


#: How a pruning criterion acts (see :mod:`petra.compress.prune`), and which kinds remove units
#: physically (channels, attention heads, recurrent hidden units).
PRUNING_KINDS = ("unstructured", "structured", "heads", "recurrent", "lowrank")
STRUCTURAL_KINDS = ("structured", "heads", "recurrent")


def _check_pruning(name: str, meta: dict[str, Any]) -> None:
    """``structured`` follows from ``kind``; a criterion whose amount is the sparsity gene and
    that masks weights gives ``scores`` (the sparsity rules rank them); only a structured
    criterion is trained during the fine-tune."""
    meta["structured"] = meta["kind"] in STRUCTURAL_KINDS
    if meta["kind"] == "unstructured" and meta["uses_sparsity"] and meta["scores"] is None:
        raise ValueError(f"pruning method {name!r}: an unstructured criterion that uses the "
                         "sparsity gene must give scores= (its per-weight importance)")
    if meta["trained"] and meta["kind"] != "structured":
        raise ValueError(f"pruning method {name!r}: only a structured criterion can be trained")
    if meta["trained"] != (meta["gates"] is not None):
        raise ValueError(f"pruning method {name!r}: a criterion trained during the fine-tune "
                         "gives gates= (its channel gates), and only such a criterion does")


PRUNING = Registry("pruning method", builtin="petra.compress", schema={
    "kind": _one_of(*PRUNING_KINDS),
    "scope": _one_of("layer", "global"),
    "uses_sparsity": Meta(True, _is(bool), "true or false"),
    "scores": _OPTIONAL_FN,
    "trained": Meta(False, _is(bool), "true or false"),
    # (members, n, params) -> ChannelGates: the gates of a trained criterion, from its genes
    "gates": _OPTIONAL_FN,
    "fixed_sparsity": Meta(None, lambda v: v is None or _is(int, float)(v), "None or a number"),
    "genes": _GENES,
    "example_genes": Meta({}, _is(dict), "a dict of gene values"),
    # ranks channels by their BatchNorm's scales: offered only where the group holds one
    "batchnorm": Meta(False, _is(bool), "true or false"),
    "structured": Meta(None, lambda v: v is None, "left out: it follows from kind"),
}, check=_check_pruning)
QUANTIZATION = Registry("quantization scheme", builtin="petra.compress", schema={
    "int8": Meta(False, _is(bool), "true or false (it runs int8 kernels)"),
    "static": Meta(False, _is(bool), "true or false (it takes the static int8 genes)"),
    # how the weights it applies to are stored: tier 0 rounds them so and counts their bytes
    "weights": _one_of("fp32", "fp16", "int8", "int4"),
    "applies_to": Meta(None, lambda v: v is None or _is(tuple)(v), "None or a tuple of types"),
    "prepare": _OPTIONAL_FN,
    "tolerance": Meta(0.1, _is(int, float), "a number"),
})
REGULARIZERS = Registry("regularizer", builtin="petra.compress", schema={
    "genes": _GENES,
    # the names of its genes that only class targets read (dropped for float targets)
    "class_genes": Meta((), lambda v: isinstance(v, tuple), "a tuple of gene names"),
})
RANK_RULES = Registry("rank rule", builtin="petra.compress")
SPARSITY_RULES = Registry("sparsity rule", builtin="petra.compress")
STRATEGIES = Registry("search strategy", builtin="petra.engine.strategies")
TASKS = Registry("task", builtin="petra.tasks.builtin")

#: Every registry, by the name ``petra methods`` lists it under and the config validates with.
REGISTRIES: dict[str, Registry] = {
    "pruning": PRUNING, "sparsity_rule": SPARSITY_RULES, "rank_rule": RANK_RULES,
    "quantization": QUANTIZATION, "regularizer": REGULARIZERS, "strategy": STRATEGIES,
    "task": TASKS,
}
