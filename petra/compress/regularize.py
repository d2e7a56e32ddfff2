"""Penalties used while fine-tuning, one registered function each.

``fn(ctx) -> penalty or None`` where ``penalty(model, inputs, outputs, targets)`` returns a scalar
added to the task loss (see :func:`petra.train.train`). ``ctx`` is a :class:`RegContext`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from petra.registry import REGULARIZERS

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class RegContext:
    """What a regularizer may use: its strength, the dense teacher, the task loss, extra genes."""

    strength: float = 0.0
    teacher: nn.Module | None = None
    loss: Callable[[Any, Any], torch.Tensor] | None = None
    params: Mapping[str, float] = field(default_factory=dict)


def weighted_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _WEIGHTED)]


@REGULARIZERS.register("none", description="no penalty")
def none(ctx: RegContext) -> None:
    return None


@REGULARIZERS.register(
    "l1", description="strength * sum |w| over Linear/Conv weights (drives weights to zero)"
)
def l1(ctx: RegContext) -> Any:
    strength = ctx.strength

    def penalty(model: nn.Module, inputs: Any, outputs: Any, targets: Any) -> torch.Tensor:
        return strength * sum(m.weight.abs().sum() for m in weighted_modules(model))

    return penalty
