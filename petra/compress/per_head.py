"""Tensors an attention holds one slice of per head, beside its projections.

A Swin attention adds a learned relative-position bias to each head's scores (its table is
``(positions, heads)``), T5's first attention has a bias embedding ``(buckets, heads)``, an
ALiBi attention a slope per head. Removing heads must remove their slices too, or the kept
heads' scores meet a bias with the old head count (``doesn't match the broadcast shape``).

A per-head tensor is a floating-point parameter or buffer of the attention or of one of its
submodules (or of a module beside it that holds tensors and no layers: BEiT's
``relative_position_bias``) that is neither a Linear (the projections lose their rows and columns themselves)
nor a norm (a q/k norm's weights are per feature of a head), with
exactly one dimension of the head count; a conv over the heads, one group per head
(Nystromformer's depthwise conv of its values), loses the removed heads' groups with them. A list of modules, one per head, that holds no layer
(StableLM's ``qk_layernorm``: a LayerNorm per head, applied to the heads in order) keeps the
kept heads' entries: a list as long as the query heads keeps each kept unit's query heads, one
as long as the units (a grouped attention's key/value heads) keeps the units. That is a guess
from shapes: the attention's trial
removal (:func:`petra.compress.attention._trial`) then checks that the pruned attention computes
what the whole one computes with those heads' outputs zeroed, and refuses the heads where it
does not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: Modules that make a sibling of an attention something other than a holder of tensors.
_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention, nn.Embedding)


def per_head_tensors(module: nn.Module, heads: int, parent: nn.Module | None = None
                     ) -> list[tuple[nn.Module, str, int]]:
    """``(owner, name, dim)`` of each per-head tensor of the attention ``module``, and of the
    modules beside it in ``parent`` that hold tensors and no layers (BEiT's layer holds its
    attention's relative-position bias table in a sibling module)."""
    found = []
    beside = [m for m in (parent.children() if parent is not None else ())
              if m is not module and not any(isinstance(x, _LAYERS) for x in m.modules())]
    for owner in (*module.modules(), *(x for m in beside for x in m.modules())):
        if isinstance(owner, nn.Linear) or type(owner).__name__.endswith("Norm"):
            continue  # a projection loses its rows itself; a norm's are per feature
        tensors = {**owner._parameters, **owner._buffers}
        for name, t in tensors.items():
            if t is None or not t.is_floating_point():
                continue
            dims = [d for d, size in enumerate(t.shape) if size == heads]
            if len(dims) == 1:
                found.append((owner, name, dims[0]))
    return found


@torch.no_grad()
def slice_per_head(module: nn.Module, heads: int, keep: Sequence[int],
                   parent: nn.Module | None = None, group: int = 1) -> None:
    """Keep the ``keep`` slices of every per-head tensor of ``module`` (and of its holders
    beside it in ``parent``), and the kept entries of its per-head module lists; ``heads``
    units of ``group`` query heads each."""
    _slice_lists(module, heads, keep, group)
    for owner, name, dim in per_head_tensors(module, heads, parent):
        old = getattr(owner, name)
        new = old.index_select(dim, torch.tensor(list(keep), device=old.device))
        if name in owner._parameters:
            owner._parameters[name] = nn.Parameter(new, requires_grad=old.requires_grad)
        else:
            owner._buffers[name] = new
        if isinstance(owner, nn.Embedding) and name == "weight":
            owner.embedding_dim = len(keep)
        if isinstance(owner, nn.modules.conv._ConvNd) and name == "weight" and \
                owner.groups == owner.in_channels == owner.out_channels == heads:
            # a conv over the heads, one group each (Nystromformer's over its values)
            owner.in_channels = owner.out_channels = owner.groups = len(keep)


def _slice_lists(module: nn.Module, heads: int, keep: Sequence[int], group: int) -> None:
    """Keep the kept heads' entries of each list of per-head modules of ``module``, and lower
    the count its holder keeps of them (StableLM's ``num_heads``)."""
    queries = [u * group + j for u in keep for j in range(group)]
    for holder in list(module.modules()):
        for name, child in list(holder.named_children()):
            if not isinstance(child, nn.ModuleList) or len(child) not in (heads, heads * group) \
                    or any(isinstance(x, _LAYERS) for x in child.modules()):
                continue
            old = len(child)
            holder._modules[name] = nn.ModuleList(
                [child[i] for i in (queries if old == heads * group else keep)])
            for attr in [a for a in ("num_heads", "num_key_value_heads", "heads")
                         if vars(holder).get(a) == old]:
                setattr(holder, attr, len(holder._modules[name]))


def passed_in(model: nn.Module, example_input: Sequence[object], name: str, heads: int
              ) -> list[str]:
    """The tensors handed to the attention ``name``'s forward, past its first, with a dimension
    of ``heads`` or of the batch times ``heads``: per-head terms made outside it (a T5 stack's
    ``position_bias``, computed once for every layer; BLOOM's ``alibi``, from the model's
    config), which no removal of its heads can cut. Each reads ``name (shape)``."""
    import inspect

    from petra.tasks.contract import args

    module, seen = model.get_submodule(name), []

    def hook(mod: nn.Module, given: tuple, kwargs: dict) -> None:
        try:
            bound = inspect.signature(mod.forward).bind(*given, **kwargs).arguments
        except TypeError:
            bound = {f"argument {i}": v for i, v in enumerate(given)} | kwargs
        seen.append(bound)

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.eval()(*args(example_input))
    finally:
        handle.remove()
    if not seen:
        return []
    values = [(k, v) for k, v in seen[0].items() if isinstance(v, torch.Tensor)]
    batch = values[0][1].shape[0] if values and values[0][1].dim() else 0
    return [f"{k} {tuple(v.shape)}" for k, v in values[1:] if v.is_floating_point()
            and v.shape != values[0][1].shape  # a residual handed in beside the input
            and (heads in v.shape[1:] or batch * heads in v.shape)]


def per_head_layers(attention: nn.Module, heads: int) -> str:
    """``; continuous_position_bias_mlp.2 writes one output per head, ...``: a layer of the
    attention that makes a per-head term (Swin V2's position-bias MLP), which petra does not cut
    with the heads; '' where it has none."""
    made = [n for n, m in attention.named_modules()
            if n and isinstance(m, nn.Linear) and m.out_features == heads]
    return (f"; {', '.join(made)} writes one output per head, a per-head term petra does not "
            "cut with the heads" if made else "")
