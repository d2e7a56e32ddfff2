"""Gene types: the values a genome holds, and how strategies vary them.

A genome is a plain ``dict`` from gene names to values (:mod:`petra.space` lists the names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from petra.schema import StaticQuantConfig

Genome = dict[str, Any]


@dataclass(frozen=True)
class Categorical:
    """A gene that takes one of ``choices``. Mutates by reset, crosses uniformly."""

    name: str
    choices: tuple[Any, ...]
    default: Any

    kind = "categorical"

    def sample(self, rng: np.random.Generator) -> Any:
        return self.choices[int(rng.integers(len(self.choices)))]

    def clip(self, value: Any) -> Any:
        if value not in self.choices:
            raise ValueError(
                f"gene {self.name} must be one of {list(self.choices)}; got {value!r}"
            )
        return value

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "choices": list(self.choices),
                "default": self.default}


@dataclass(frozen=True)
class Float:
    """A real gene in ``[low, high]``; SBX crossover and polynomial mutation within bounds.

    ``log`` genes are sampled log-uniformly. Values are rounded to ``step`` (linear genes) or
    to ``digits`` significant digits (log genes) so that equal recipes hash equally.
    """

    name: str
    low: float
    high: float
    default: float
    log: bool = False
    step: float | None = None
    digits: int = 3

    kind = "float"

    def sample(self, rng: np.random.Generator) -> float:
        if self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = float(rng.uniform(self.low, self.high))
        return self.clip(value)

    def clip(self, value: Any) -> float:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"gene {self.name} must be a number; got {value!r}") from None
        if math.isnan(value):
            raise ValueError(f"gene {self.name} must be a number; got nan")
        value = min(max(value, self.low), self.high)
        if self.log:
            if value > 0:
                value = float(f"{value:.{self.digits}g}")
        elif self.step:
            value = round(round(value / self.step) * self.step, 10)
        return min(max(value, self.low), self.high)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "low": self.low, "high": self.high,
                "default": self.default, "log": self.log}


@dataclass(frozen=True)
class Int:
    """An integer gene in ``[low, high]``, varied like a real gene and rounded."""

    name: str
    low: int
    high: int
    default: int

    kind = "int"

    def sample(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.low, self.high + 1))

    def clip(self, value: Any) -> int:
        try:
            value = int(round(float(value)))
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"gene {self.name} must be an integer; got {value!r}") from None
        return min(max(value, self.low), self.high)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "low": self.low, "high": self.high,
                "default": self.default}


Gene = Categorical | Float | Int


def check_range(gene: Gene, value: Any) -> None:
    """Raise ``ValueError`` where ``value`` lies outside a numeric ``gene``'s range, or is no
    integer for an integer gene: a genome the user wrote (``petra evaluate``) is not clipped
    into the space in silence, as the search's own variations are."""
    if isinstance(gene, Categorical):
        gene.clip(value)
        return
    number = gene.clip(value) if isinstance(value, str) else value  # the type's own message
    if isinstance(gene, Int) and float(number) != int(float(number)):
        raise ValueError(f"gene {gene.name} must be an integer in [{gene.low}, {gene.high}]; "
                         f"got {value!r}")
    if not gene.low <= float(number) <= gene.high:
        raise ValueError(f"gene {gene.name} must be in [{gene.low:g}, {gene.high:g}]; got "
                         f"{value!r}")


def geomean(lo: float, hi: float) -> float:
    """The geometric mean of ``lo`` and ``hi`` to 3 significant digits (a log gene's default)."""
    return float(f"{math.sqrt(lo * hi):.3g}")


@dataclass(frozen=True)
class Declared:
    """A gene that petra itself reads, whatever the methods: its name, the :class:`Recipe
    <petra.candidate.recipes.Recipe>` field it fills, how its value is read, and what a genome
    without it means (its space does not offer it): no compression, no fine-tune."""

    name: str
    field: str
    cast: type
    absent: Any
    doc: str


#: The genes of :class:`Declared`, in one table; the per-layer genes (``layers.<m>.method``,
#: ``layers.<m>.sparsity``), the skip genes (``blocks.<b>.skip``) and the genes that methods
#: declare themselves (registry metadata ``genes``) come on top.
DECLARED: dict[str, Declared] = {d.name: d for d in (
    Declared("prune.round_to", "round_to", int, 1,
             "categorical, kept channel counts are rounded to this multiple"),
    Declared("prune.width", "width", float, 0.0,
             "float, the share of the residual stream's channels (the hidden size) removed"),
    Declared("prune.width_method", "width_method", str, "none",
             "categorical, the structured criterion that chooses them"),
    Declared("prune.sparsity_rule", "sparsity_rule", str, "fixed",
             "categorical, fixed (the sparsity genes) or a sparsity rule such as auto_emp"),
    Declared("prune.emp_beta", "emp_beta", float, 1.0, "float, the EMP rule's beta"),
    Declared("prune.emp_scope", "emp_scope", str, "layer", "categorical, layer or global"),
    Declared("lowrank.energy", "energy", float, 0.99,
             "categorical, the share of squared singular values an SVD rank keeps"),
    Declared("lowrank.rank_rule", "rank_rule", str, "energy",
             "categorical, the rank rule: by energy, or by the MP edge (mp)"),
    Declared("quant.scheme", "quant", str, "none", "categorical, the quantization scheme"),
    Declared("reg.kind", "reg", str, "none", "categorical, the fine-tune's regularizer"),
    Declared("reg.strength", "reg_strength", float, 0.0, "float (log scale), its weight"),
    Declared("finetune.epochs", "epochs", int, 0, "int, the fine-tune's epochs"),
    Declared("finetune.lr", "lr", float, 1e-3, "float (log scale), its learning rate"),
)}


def absent(name: str) -> Any:
    """What a genome without the declared gene ``name`` means."""
    return DECLARED[name].absent


def static_genes(static_cfg: StaticQuantConfig) -> list[Gene]:
    """The genes of the static int8 schemes (:class:`petra.compress.quantize.StaticOptions`)
    that the config's ``space.static`` ranges leave open; a single value is no gene."""
    genes: list[Gene] = []
    calibration = tuple(static_cfg.calibration)
    if calibration != ("minmax",):
        genes.append(Categorical("quant.calibration", calibration, calibration[0]))
    for name, (lo, hi) in (("quant.smooth_alpha", static_cfg.smooth_alpha),
                           ("quant.fallback", static_cfg.fallback)):
        if hi > lo or lo > 0:
            genes.append(Float(name, lo, hi, lo, step=0.05))
    return genes
