"""Pruning criteria, one registered function each.

Entries of :data:`petra.registry.PRUNING` carry metadata that says how the evaluator calls them:

- ``kind="unstructured"``: ``fn(weight, sparsity, ctx) -> mask``, a 0/1 tensor of the weight's
  shape. The artifact stores the survivors in a sparse encoding (values plus a bitmask) wherever
  that is smaller than dense. With ``scope="global"`` the call is instead
  ``fn(weights: dict[name, tensor], sparsity, ctx) -> dict[name, mask]`` over every layer that
  chose the method, at their size-weighted mean sparsity.
- ``kind="structured"``: ``fn(group, ctx) -> scores``, one importance score per output channel
  of a torch-pruning dependency group; the lowest-scoring channels are removed physically by
  :func:`petra.compress.structured.prune_channels`.
- ``kind="lowrank"``: applied by :mod:`petra.compress.lowrank` (the layer is factorized).

``structured`` (bool) mirrors ``kind == "structured"``. ``uses_sparsity=False`` marks methods
whose amount is not the sparsity gene (N:M patterns, low-rank); their sparsity gene has no
effect. ``none`` leaves a layer alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from petra.registry import PRUNING


@dataclass
class PruneContext:
    """What a criterion may use besides the weights: data, loss, gradients, activations, RNG.

    Gradients and input-activation norms are computed lazily, once, on ``model`` as it is when
    first asked for (structured criteria are scored before any channel is removed; unstructured
    ones after the structured step).
    """

    model: Any = None
    batches: Any = None  # a few training batches (for data-aware criteria)
    loss: Any = None
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    _gradients: bool = field(default=False, repr=False)
    _input_norms: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def ensure_gradients(self) -> None:
        """Accumulate ``d loss / d param`` over ``batches`` into ``param.grad`` (once)."""
        if self._gradients:
            return
        if self.model is None or not self.batches or self.loss is None:
            raise ValueError("this criterion needs model, batches and loss in its context")
        was_training = self.model.training
        self.model.eval()
        self.model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            for inputs, targets in self.batches:
                self.loss(self.model(inputs), targets).backward()
        self.model.train(was_training)
        self._gradients = True

    def input_norms(self, name: str) -> torch.Tensor:
        """The L2 norm of each input feature (Linear) or input channel (Conv) of layer ``name``
        over the context's batches: Wanda's ``||X_j||``."""
        if self._input_norms is None:
            self._input_norms = _collect_input_norms(self.model, self.batches)
        try:
            return self._input_norms[name]
        except KeyError:
            raise ValueError(f"no input activations recorded for layer {name!r}") from None


def _collect_input_norms(model: Any, batches: Any) -> dict[str, torch.Tensor]:
    from torch import nn

    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d):

            def hook(mod: Any, inputs: Any, _out: Any, name: str = name) -> None:
                x = inputs[0].detach()
                dims = [
                    d
                    for d in range(x.dim())
                    if d != (x.dim() - 1 if isinstance(mod, nn.Linear) else 1)
                ]
                sq = x.pow(2).sum(dim=dims)
                sums[name] = sums.get(name, 0) + sq

            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for inputs, _targets in batches or ():
                model(inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {k: v.sqrt() for k, v in sums.items()}


@PRUNING.register(
    "none", description="leave the layer dense", kind="unstructured", structured=False
)
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
    kind="unstructured",
    structured=False,
)
def magnitude(weight: torch.Tensor, sparsity: float, ctx: PruneContext) -> torch.Tensor:
    return keep_top(weight.detach().abs(), sparsity)


@PRUNING.register(
    "l2_channel",
    description="structured: remove output channels with the smallest group L2 norm (DepGraph)",
    kind="structured",
    structured=True,
)
def l2_channel(group: Any, ctx: PruneContext) -> torch.Tensor:
    import torch_pruning as tp

    return tp.importance.GroupMagnitudeImportance(p=2)(group)


def unstructured_masks(
    model: Any, plan: dict[str, tuple[str, float]], ctx: PruneContext
) -> dict[str, torch.Tensor]:
    """Compute and apply the masks of ``plan`` (layer → (unstructured method, sparsity)).

    Layer-scope methods are called per layer. A global-scope method is called once over every
    layer that chose it, at their size-weighted mean sparsity. Weights are zeroed in place.

    Returns:
        parameter name (``<layer>.weight``) → 0/1 mask, for the fine-tune to hold.
    """
    weights = {name: model.get_submodule(name).weight for name in plan}
    masks: dict[str, torch.Tensor] = {}
    by_global_method: dict[str, list[str]] = {}
    for name, (method, sparsity) in plan.items():
        entry = PRUNING.get(method)
        if entry.meta.get("scope") == "global":
            by_global_method.setdefault(method, []).append(name)
            continue
        mask = entry.fn(weights[name], sparsity, ctx)
        if mask is not None:
            masks[name] = mask
    for method, names in by_global_method.items():
        sizes = {n: weights[n].numel() for n in names}
        sparsity = sum(plan[n][1] * sizes[n] for n in names) / sum(sizes.values())
        masks.update(PRUNING.get(method).fn({n: weights[n] for n in names}, sparsity, ctx))
    with torch.no_grad():
        for name, mask in masks.items():
            weights[name].mul_(mask.to(weights[name].dtype))
    return {f"{name}.weight": mask for name, mask in masks.items()}
