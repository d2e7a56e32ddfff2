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

``structured`` (bool) is derived at registration: true for the kinds that remove units
(structured, heads, recurrent). The metadata is validated then (:data:`petra.registry.PRUNING`):
an unstructured criterion that uses the sparsity gene must give ``scores``. ``uses_sparsity=False`` marks methods
whose amount is not the sparsity gene (N:M patterns, low-rank); their sparsity gene has no
effect, and ``fixed_sparsity`` says what fraction such a pattern zeroes. ``none`` leaves a layer
alone. Data-aware criteria (``taylor``, ``activation_aware``) take what they need from the
:class:`PruneContext` and raise ``ValueError`` when it lacks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from petra.compress import layer_cache
from petra.registry import PRUNING
from petra.tasks.contract import args

if TYPE_CHECKING:
    from petra.compress.sparsity import SparsityRule



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
    val_batches: Any = None  # a few validation batches (shapley)
    shapley_permutations: int = 4
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
                self.loss(self.model(*args(inputs)), targets).backward()
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


def _collect_input_norms(model: torch.nn.Module, batches: Any) -> dict[str, torch.Tensor]:
    from torch import nn

    from petra.compress.kinds import WEIGHTED_LAYERS

    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, WEIGHTED_LAYERS):
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
                model(*args(inputs))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {k: v.sqrt() for k, v in sums.items()}


@PRUNING.register(
    "none", description="leave the layer dense", kind="unstructured", uses_sparsity=False
)
def none(weight: torch.Tensor, sparsity: float, ctx: PruneContext) -> None:
    return None


def keep_top(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A 0/1 mask that zeroes the ``round(sparsity * n)`` lowest scores (ties by position)."""
    n = scores.numel()
    n_prune = min(int(round(sparsity * n)), n - 1)
    return layer_cache.CACHE.keep_mask(scores, n_prune).view_as(scores)


def magnitude_scores(weight: torch.Tensor, ctx: PruneContext) -> torch.Tensor:
    return weight.detach().abs()


@PRUNING.register(
    "magnitude",
    description="unstructured: zero the smallest |w| of each layer; stored as values + bitmask",
    kind="unstructured",
    scores=magnitude_scores,
)
def magnitude(weight: torch.Tensor, sparsity: float, ctx: PruneContext) -> torch.Tensor:
    return keep_top(weight.detach().abs(), sparsity)


@PRUNING.register(
    "l2_channel",
    description="structured: remove output channels with the smallest group L2 norm (DepGraph)",
    kind="structured",
)
def l2_channel(group: Any, ctx: PruneContext) -> torch.Tensor:
    import torch_pruning as tp

    return tp.importance.GroupMagnitudeImportance(p=2)(group)


@PRUNING.register(
    "global_magnitude",
    description="unstructured: one |w| threshold across every layer that chose it (global scope)",
    kind="unstructured",
    scope="global",
    scores=magnitude_scores,
)
def global_magnitude(
    weights: dict[str, torch.Tensor], sparsity: float, ctx: PruneContext
) -> dict[str, torch.Tensor]:
    """Zero the ``round(sparsity * total)`` smallest |w| pooled over all ``weights``.

    Layers of small weights thus lose more than the mean sparsity, layers of large ones less.
    Each layer's largest weight is exempt, so no layer is ever emptied.
    """
    names = list(weights)
    scores = [weights[n].detach().abs().flatten().float() for n in names]
    for s in scores:
        s[torch.argmax(s)] = torch.inf  # the exempt survivor of each layer
    flat = torch.cat(scores)
    total = flat.numel()
    n_prune = min(int(round(sparsity * total)), total - len(names))
    keep = layer_cache.CACHE.keep_mask(flat, n_prune)
    masks, start = {}, 0
    for name in names:
        size = weights[name].numel()
        masks[name] = keep[start : start + size].view_as(weights[name])
        start += size
    return masks


def _random_scores(weight: torch.Tensor, ctx: PruneContext) -> torch.Tensor:
    """A random order of the weights, as scores; drawn from ``ctx.generator`` on each call."""
    return torch.randperm(weight.numel(), generator=ctx.generator).float().view_as(weight)


@PRUNING.register(
    "random",
    description="unstructured: zero a uniformly random subset of weights (sanity baseline)",
    kind="unstructured",
    scores=_random_scores,
)
def random_mask(weight: torch.Tensor, sparsity: float, ctx: PruneContext) -> torch.Tensor:
    """Exactly ``round(sparsity * n)`` zeros at positions drawn from ``ctx.generator``.

    Its EMP scores are a random order of the weights (the ranks 0..n-1): EMP keeps about
    ``3 * beta / 4`` of them.
    """
    return keep_top(_random_scores(weight, ctx), sparsity)


def wanda_scores(weight: torch.Tensor, ctx: PruneContext) -> torch.Tensor:
    """Wanda's ``|W_ij| * ||X_j||`` of every weight, shaped ``(out, rest)``.

    ``||X_j||`` is the L2 norm of input feature (Linear) or input channel (Conv, broadcast over
    kernel positions) ``j`` over the context's batches. The layer is found in ``ctx.model`` by
    the identity of its weight.

    Raises:
        ValueError: the context has no model holding ``weight``, or no batches.
    """
    if ctx is None or ctx.model is None:
        raise ValueError("activation_aware needs the model and batches in its context")
    found = [(n, m) for n, m in ctx.model.named_modules() if getattr(m, "weight", None) is weight]
    if not found:
        raise ValueError("activation_aware: the weight does not belong to a module of ctx.model")
    name, module = found[0]
    norms = ctx.input_norms(name).to(weight.device, torch.float32)
    w = weight.detach().abs().float()
    out = w.shape[0]
    groups = getattr(module, "groups", 1)
    if norms.numel() != w.shape[1] * groups:
        raise ValueError(
            f"activation_aware: layer {name!r} has {w.shape[1] * groups} inputs but "
            f"{norms.numel()} recorded input norms (were they recorded before pruning?)"
        )
    per_row = norms.view(groups, -1)[torch.arange(out) // (out // groups)]  # (out, in/groups)
    return (w * per_row.view(*per_row.shape, *([1] * (w.dim() - 2)))).flatten(1)


@PRUNING.register(
    "activation_aware",
    description="unstructured: Wanda, zero the smallest |w|*||x|| within each output row",
    kind="unstructured",
    scores=lambda weight, ctx: wanda_scores(weight, ctx).view_as(weight),
)
def activation_aware(weight: torch.Tensor, sparsity: float, ctx: PruneContext) -> torch.Tensor:
    """Wanda (Sun et al., 2023): score ``|W_ij| * ||X_j||`` (:func:`wanda_scores`), compared
    within each output row, so a small weight on a loud input survives. Every row drops
    ``floor(k / rows)`` scores, where ``k = round(sparsity * n)``; the ``k mod rows`` remaining
    ones go to the rows whose next-lowest score is smallest, so the total is exactly ``k``.

    Raises:
        ValueError: the context has no model holding ``weight``, or no batches.
    """
    scores = wanda_scores(weight, ctx)
    out = scores.shape[0]
    row_size = scores.shape[1]
    k = min(int(round(sparsity * weight.numel())), weight.numel() - 1)
    base, extra = divmod(k, out)
    counts = torch.full((out,), base, dtype=torch.long)
    order = torch.argsort(scores, dim=1, stable=True)
    if extra:
        next_lowest = scores.gather(1, order[:, base : base + 1]).squeeze(1)
        counts[torch.argsort(next_lowest, stable=True)[:extra]] += 1
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(row_size).expand(out, row_size).contiguous())
    return (ranks >= counts.unsqueeze(1)).view_as(weight)


@PRUNING.register(
    "nm_2_4",
    description="unstructured 2:4: keep the 2 largest |w| of every 4 inputs; GPU-only speed-up",
    kind="unstructured",
    uses_sparsity=False,
    fixed_sparsity=0.5,
)
def nm_2_4(weight: torch.Tensor, sparsity: float, ctx: PruneContext) -> torch.Tensor:
    """2:4 semi-structured sparsity: of every 4 consecutive weights along the input dimension,
    keep the 2 of largest magnitude; the sparsity gene is ignored (the pattern fixes 50%).

    Groups run along input features (Linear) or input channels at a fixed kernel position
    (Conv, NVIDIA ASP's layout). When the input count is not a multiple of 4, the last group of
    each row keeps ``ceil(size / 2)``, so such layers end slightly under 50%; a 1-channel conv
    keeps every weight.

    The mask is stored compactly through the artifact's values + bitmask encoding, so it cuts
    bytes; on CPU / ONNX Runtime latency does not drop: 2:4 kernels need GPUs (sparse tensor
    cores), and even there they often give no speed-up at small sizes (see STACK.md).
    """
    w = weight.detach().abs().float().movedim(1, -1)  # (out, *kernel, in)
    moved_shape = w.shape
    rows = w.reshape(-1, moved_shape[-1])
    size = rows.shape[1]
    pad = -size % 4
    scores = torch.nn.functional.pad(rows, (0, pad), value=-torch.inf).view(rows.shape[0], -1, 4)
    keep_n = torch.full((scores.shape[1],), 2, dtype=torch.long)
    if pad:
        keep_n[-1] = -(-(4 - pad) // 2)  # ceil(tail / 2)
    order = torch.argsort(scores, dim=2, descending=True, stable=True)
    ranks = torch.argsort(order, dim=2)
    mask = (ranks < keep_n.view(1, -1, 1)).view(rows.shape[0], -1)[:, :size]
    return mask.reshape(moved_shape).movedim(-1, 1).contiguous()


def _tp_scores(importance: Any, group: Any) -> torch.Tensor:
    scores = importance(group)
    if scores is None:
        raise ValueError("the dependency group has no layer this criterion can score")
    return scores


@PRUNING.register(
    "l1_channel",
    description="structured: remove output channels with the smallest group L1 norm (DepGraph)",
    kind="structured",
)
def l1_channel(group: Any, ctx: PruneContext) -> torch.Tensor:
    """Sum of |w| of each channel over every coupled layer of the group (torch-pruning, p=1)."""
    import torch_pruning as tp

    return _tp_scores(tp.importance.GroupMagnitudeImportance(p=1, normalizer=None), group)


@PRUNING.register(
    "fpgm",
    description="structured: remove the channels nearest the geometric median of their group",
    kind="structured",
)
def fpgm(group: Any, ctx: PruneContext) -> torch.Tensor:
    """Filter pruning via geometric median (He et al., 2019), torch-pruning's FPGMImportance.

    A channel's score is its summed distance to the other channels' filters, accumulated over
    the coupled layers of the group: the most replaceable (central) channels go first.
    """
    import torch_pruning as tp

    return _tp_scores(tp.importance.FPGMImportance(p=2, normalizer=None), group)


@PRUNING.register(
    "taylor",
    description="structured: remove channels of smallest first-order Taylor score sum |w*grad|",
    kind="structured",
)
def taylor(group: Any, ctx: PruneContext) -> torch.Tensor:
    """First-order Taylor importance (Molchanov et al., 2019), torch-pruning's
    GroupTaylorImportance on the gradients that ``ctx.ensure_gradients()`` accumulates over the
    context's training batches (once, on the unpruned model).

    Raises:
        ValueError: the context lacks the model, batches or loss.
    """
    import torch_pruning as tp

    if ctx is None:
        raise ValueError("taylor needs a PruneContext with model, batches and loss")
    ctx.ensure_gradients()
    return _tp_scores(tp.importance.GroupTaylorImportance(normalizer=None), group)


@PRUNING.register(
    "bn_scale",
    description="structured: network slimming, remove channels with the smallest BN |gamma|",
    kind="structured",
    batchnorm=True,
)
def bn_scale(group: Any, ctx: PruneContext) -> torch.Tensor:
    """Network slimming (Liu et al., 2017): the mean |gamma| of the group's BatchNorms.

    Offered only for layers whose group holds an affine BatchNorm
    (:func:`petra.layers.offered`); a group with none, given by hand, falls back to the group
    L1 norm (as ``l1_channel``).
    """
    import torch_pruning as tp

    scores = tp.importance.BNScaleImportance(normalizer=None)(group)
    if scores is None:
        return l1_channel(group, ctx)
    return scores


def unstructured_masks(
    model: torch.nn.Module, plan: dict[str, tuple[str, float]], ctx: PruneContext,
    sparsity_rule: SparsityRule | None = None,
) -> dict[str, torch.Tensor]:
    """Compute and apply the masks of ``plan`` (layer → (unstructured method, sparsity)).

    Layer-scope methods are called per layer. A global-scope method is called once over every
    layer that chose it, at their size-weighted mean sparsity. Weights are zeroed in place.

    With an automatic ``sparsity_rule`` (:class:`petra.compress.sparsity.SparsityRule`, EMP),
    the sparsities of the plan are replaced by the rule's, from each criterion's scores
    (``meta["scores"]``; a global-scope method's layers count as one pool).

    Returns:
        parameter name (``<layer>.weight``) → 0/1 mask, for the fine-tune to hold.
    """
    weights = {name: model.get_submodule(name).weight for name in plan}
    plan = dict(plan)
    if sparsity_rule is not None and sparsity_rule.automatic:
        plan.update(_rule_sparsities(plan, weights, ctx, sparsity_rule))
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


def _rule_sparsities(
    plan: dict[str, tuple[str, float]], weights: dict[str, torch.Tensor], ctx: PruneContext,
    rule: Any,
) -> dict[str, tuple[str, float]]:
    """The plan's entries with the sparsity ``rule`` chose from the criteria's scores."""
    units: list[tuple[list[str], torch.Tensor]] = []
    pools: dict[str, list[str]] = {}
    for name, (method, _) in plan.items():
        entry = PRUNING.get(method)
        if method == "none" or not entry.meta.get("uses_sparsity", True):
            continue
        if entry.meta.get("scope") == "global":
            pools.setdefault(method, []).append(name)
            continue
        units.append(([name], entry.meta["scores"](weights[name], ctx)))
    for method, names in pools.items():
        scores = PRUNING.get(method).meta["scores"]
        units.append((names, torch.cat([scores(weights[n], ctx).flatten() for n in names])))
    out = {}
    for (names, _), sparsity in zip(units, rule.sparsities([s for _, s in units]), strict=True):
        for name in names:
            out[name] = (plan[name][0], float(sparsity))
    return out
