"""Game-theoretic structured criteria: Shapley values of channels, and equilibrium gates.

- ``shapley`` (ShapKAN, arXiv 2510.01663): a channel's importance is its Shapley value for the
  task, estimated by permutation sampling: channels are switched on in a random order, and each
  one is credited with the change it makes. The value of a coalition is minus the loss on the
  context's validation batches; the accuracy of a few batches is too coarse to tell channels
  apart, and the loss is the task's own measure of fit. The estimate is truncated (Ghorbani and
  Zou, 2019): once a coalition is within :data:`TRUNCATION` of the full group's value, the
  remaining channels of that permutation are credited nothing, which saves most of the forward
  passes. ``space.shapley_permutations`` bounds the permutations.
- ``equilibrium`` ("Pruning as a Game", arXiv 2512.22106): participation gates trained during
  the fine-tune (:class:`petra.compress.gates.EquilibriumGates`, with the ``prune.eq_beta`` and
  ``prune.eq_gamma`` genes); gates under 0.01 are removed physically afterwards, and the others
  folded into the weights. It has no scores before the fine-tune, so the evaluator runs it, not
  :func:`petra.compress.structured.prune_channels`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from petra.compress.gates import ChannelGates, EquilibriumGates
from petra.compress.structured import out_channel_members
from petra.genes import Float, geomean
from petra.registry import PRUNING
from petra.tasks.contract import args

if TYPE_CHECKING:
    from petra.compress.prune import PruneContext
    from petra.schema import SpaceConfig


#: Truncate a permutation once its coalition is this close (relative) to the full value.
TRUNCATION = 0.01
#: Validation batches a Shapley value is measured on.
SHAPLEY_BATCHES = 1


def _group_channels(group: Any) -> int:
    root = group[0].dep.target.module
    return int(root.out_features if isinstance(root, nn.Linear) else root.out_channels)


@PRUNING.register(
    "shapley",
    description="structured: remove the channels of smallest Shapley value (permutation-sampled "
                "on validation batches, bounded by space.shapley_permutations)",
    kind="structured",
)
@torch.no_grad()
def shapley(group: Any, ctx: PruneContext) -> torch.Tensor:
    """Monte-Carlo Shapley values of the group's channels (see the module docstring).

    Raises:
        ValueError: the context lacks the model, validation batches or loss.
    """
    if ctx is None or ctx.model is None or not ctx.val_batches or ctx.loss is None:
        raise ValueError("shapley needs a PruneContext with model, val_batches and loss")
    model, loss = ctx.model, ctx.loss
    batches = list(ctx.val_batches)[:SHAPLEY_BATCHES]
    n = _group_channels(group)
    gates = ChannelGates(out_channel_members(group), n, init=1.0)
    was_training = model.training
    model.eval()

    def value(mask: torch.Tensor) -> float:
        gates.set(mask)
        return -sum(float(loss(model(*args(x)), y)) for x, y in batches) / len(batches)

    try:
        full, empty = value(torch.ones(n)), value(torch.zeros(n))
        phi = torch.zeros(n, dtype=torch.float64)
        span = abs(full - empty)
        permutations = max(1, int(ctx.shapley_permutations))
        for _ in range(permutations):
            mask = torch.zeros(n)
            previous = empty
            for i in torch.randperm(n, generator=ctx.generator).tolist():
                if abs(full - previous) <= TRUNCATION * span:
                    break  # the rest of this permutation adds (almost) nothing
                mask[i] = 1.0
                current = value(mask)
                phi[i] += current - previous
                previous = current
        return (phi / permutations).float()
    finally:
        gates.remove()
        model.train(was_training)


def equilibrium_genes(space_cfg: SpaceConfig) -> list[Any]:
    """``prune.eq_beta`` (log-uniform in ``space.eq_beta``) and ``prune.eq_gamma`` (in
    ``space.eq_gamma``): the utility weights of the equilibrium gates."""

    q_lo, q_hi = space_cfg.eq_beta
    g_lo, g_hi = space_cfg.eq_gamma
    return [Float("prune.eq_beta", q_lo, q_hi, geomean(q_lo, q_hi), log=True),
            Float("prune.eq_gamma", g_lo, g_hi, g_lo, step=0.001)]


def equilibrium_gates(members: Any, n: int, params: Any) -> EquilibriumGates:
    """The equilibrium gates of one channel group, with the candidate's ``prune.eq_beta`` and
    ``prune.eq_gamma`` (0.05 and 0, where the space fixes them)."""
    return EquilibriumGates(members, n, beta=float(params.get("prune.eq_beta", 0.05)),
                            gamma=float(params.get("prune.eq_gamma", 0.0)))


@PRUNING.register(
    "equilibrium",
    description="structured: participation gates trained in the fine-tune by projected gradient "
                "ascent on each channel's utility (prune.eq_beta, prune.eq_gamma); gates < 0.01 "
                "removed",
    kind="structured",
    trained=True,
    gates=lambda members, n, params: equilibrium_gates(members, n, params),
    uses_sparsity=False,
    genes=lambda space_cfg: equilibrium_genes(space_cfg),
    example_genes={"prune.eq_beta": 1.0, "prune.eq_gamma": 0.05},
)
def equilibrium(group: Any, ctx: PruneContext) -> torch.Tensor:
    raise ValueError("equilibrium gates are trained during the fine-tune; the evaluator sets "
                     "them up, nothing scores them beforehand")
