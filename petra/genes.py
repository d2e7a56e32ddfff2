"""Gene types: the values a genome holds, and how strategies vary them.

A genome is a plain ``dict`` from gene names to values (:mod:`petra.space` lists the names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

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


def geomean(lo: float, hi: float) -> float:
    """The geometric mean of ``lo`` and ``hi`` to 3 significant digits (a log gene's default)."""
    return float(f"{math.sqrt(lo * hi):.3g}")
