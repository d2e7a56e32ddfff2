"""Penalties used while fine-tuning, one registered function each.

``fn(strength) -> penalty or None`` where ``penalty(model, inputs, outputs, targets)`` returns a
scalar added to the task loss (see :func:`petra.train.train`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from petra.registry import REGULARIZERS

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


@REGULARIZERS.register("none", description="no penalty")
def none(strength: float) -> None:
    return None


@REGULARIZERS.register(
    "l1", description="strength * sum |w| over Linear/Conv weights (drives weights to zero)"
)
def l1(strength: float) -> Any:
    def penalty(model: nn.Module, inputs: Any, outputs: Any, targets: Any) -> torch.Tensor:
        total = sum(m.weight.abs().sum() for m in model.modules() if isinstance(m, _WEIGHTED))
        return strength * total

    return penalty
