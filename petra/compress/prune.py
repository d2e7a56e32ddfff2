"""Pruning criteria, one registered function each.

Two kinds of entry live in :data:`petra.registry.PRUNING`:

- unstructured (``structured=False``): ``fn(weight, sparsity, ctx) -> mask``, a 0/1 tensor of
  the weight's shape with ``round(sparsity * numel)`` zeros. The artifact stores the survivors in
  a sparse encoding (values plus a bitmask) wherever that is smaller than dense.
- structured (``structured=True``): ``fn(group, ctx) -> scores``, one importance score per output
  channel of a torch-pruning dependency group; the lowest-scoring channels are removed
  physically by :func:`petra.compress.structured.prune_channels`.

``none`` leaves a layer alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from petra.registry import PRUNING


@dataclass
class PruneContext:
    """What a criterion may use besides the weights: data, loss, and a seeded generator."""

    model: Any = None
    batches: Any = None  # a few training batches (for data-aware criteria)
    loss: Any = None
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))


@PRUNING.register("none", description="leave the layer dense", structured=False)
def none(weight: torch.Tensor, sparsity: float, ctx: PruneContext) -> None:
    return None


def keep_top(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A 0/1 mask that zeroes the ``round(sparsity * n)`` lowest scores (ties by position)."""
    n = scores.numel()
    n_prune = min(int(round(sparsity * n)), n - 1)
    mask = torch.ones(n, dtype=torch.bool)
    if n_prune > 0:
        order = torch.argsort(scores.flatten(), stable=True)
        mask[order[:n_prune]] = False
    return mask.view_as(scores)


@PRUNING.register(
    "magnitude",
    description="unstructured: zero the smallest |w| of each layer; stored as values + bitmask",
    structured=False,
)
def magnitude(weight: torch.Tensor, sparsity: float, ctx: PruneContext) -> torch.Tensor:
    return keep_top(weight.detach().abs(), sparsity)


@PRUNING.register(
    "l2_channel",
    description="structured: remove output channels with the smallest group L2 norm (DepGraph)",
    structured=True,
)
def l2_channel(group: Any, ctx: PruneContext) -> torch.Tensor:
    import torch_pruning as tp

    return tp.importance.GroupMagnitudeImportance(p=2)(group)
