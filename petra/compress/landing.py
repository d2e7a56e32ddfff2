"""Whether torch-pruning removes at each reader the channels its writers lose.

torch-pruning follows a group's channels from the layers that write them (a conv's output
channels, a norm's, an embedding's columns) to the layers that read them (the next conv's
input channels), mapping indices through the ops between. Through an op it maps wrongly the
readers lose other channels than the writers: a ShuffleNet unit's channel shuffle (a view,
a transpose and a reshape) was mapped one to one, so removing half of a grouped conv's
output channels cut the depthwise conv after the shuffle at the same indices, rewiring the
unit (val 0.465 where masking the same channels gave 0.81) while every check passed.

:func:`check_landing` tells it on the example batch, before a group is removed: the
removed output channels of the group's sources (its convs, linears and embeddings) are zeroed
(in place, then restored), and at every reader the removed input channels must have changed.
A removed channel that still carries, unchanged, data that varies over the batch comes from a
source channel that stays: the mapping is wrong. The group's per-channel tensors (a norm's
weights, a layer scale, a positional table) are not zeroed: zeroed at torch-pruning's indices
after the op it maps wrongly (a BatchNorm after the shuffle), they changed the channels the
readers lose, and the check passed a rewired unit (val 0.30 where the masked one gave 0.82).
A source zeroed changes what follows it, through a norm too. A cross-channel op between (a
LayerNorm) changes every channel, so it passes; a group with a writer petra cannot zero (an
attention, a recurrent layer) is not checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from petra.compress.kinds import CONV_LAYERS
from petra.tasks.contract import args

#: Writers whose per-channel weights are one dimension of their own parameters.
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
          nn.LayerNorm, nn.RMSNorm)


class WrongMapping(RuntimeError):
    """torch-pruning removes other channels at a reader than its writers lose."""


def _writer(target: Any) -> list[tuple[torch.Tensor, int]] | None:
    """The tensors (and dimension) that hold a source's output channels to zero, [] for a
    per-channel tensor of the group (a norm's, a layer scale), or None where petra cannot
    tell (an attention, a recurrent layer)."""
    if isinstance(target, (nn.Parameter, nn.PReLU, *_NORMS)):
        return []
    if isinstance(target, nn.modules.conv._ConvTransposeNd):
        return [(target.weight, 1), *_bias(target)] if target.groups == 1 else None
    if isinstance(target, nn.Linear | nn.modules.conv._ConvNd):
        return [(target.weight, 0), *_bias(target)]
    if isinstance(target, nn.Embedding):
        return [(target.weight, 1)]
    weight = getattr(target, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1 and not any(
            True for _ in target.children()):
        return []  # a hand-written norm or scale, one weight per channel
    return None


def _bias(module: nn.Module) -> list[tuple[torch.Tensor, int]]:
    bias = getattr(module, "bias", None)
    return [(bias, 0)] if isinstance(bias, torch.Tensor) else []


def _reader_dim(target: Any) -> int | None:
    """The channel dimension of a reader's input, where petra knows it."""
    if isinstance(target, nn.modules.conv._ConvNd):
        return 1
    if isinstance(target, nn.Linear | nn.LSTM | nn.GRU | nn.RNN | nn.MultiheadAttention):
        return -1
    return None


def check_landing(model: nn.Module, example_input: Sequence[Any], graph: Any, group: Any
                  ) -> None:
    """Raise :class:`WrongMapping` where removing ``group`` (a torch-pruning group) would cut,
    at a reader, channels that its sources keep."""
    zero: list[tuple[torch.Tensor, int, list[int]]] = []
    watch: list[tuple[nn.Module, int, list[int]]] = []
    for dep, idxs in group:
        target, ix = dep.target.module, [int(i) for i in idxs]
        if type(target).__module__.startswith("torch_pruning"):
            continue  # its own nodes for the ops between (a reshape, an add)
        if graph.is_out_channel_pruning_fn(dep.handler):
            tensors = _writer(target)
            if tensors is None:
                return  # a writer petra cannot zero: not checked
            zero += [(t, d, ix) for t, d in tensors]
            if isinstance(target, CONV_LAYERS) and target.groups > 1 \
                    and target.groups == target.in_channels:
                watch.append((target, 1, ix))  # a depthwise conv reads the channels it writes
        elif (dim := _reader_dim(target)) is not None:
            watch.append((target, dim, ix))
    if not zero or not watch:
        return
    dense = _inputs(model, example_input, [m for m, _, _ in watch])
    saved = [(t, t.detach().clone()) for t, _, _ in zero]
    try:
        with torch.no_grad():
            for t, dim, ix in zero:
                t.index_fill_(dim, torch.tensor(ix, device=t.device), 0.0)
        masked = _inputs(model, example_input, [m for m, _, _ in watch])
    finally:
        with torch.no_grad():
            for t, old in saved:
                t.copy_(old)
    names = {m: n for n, m in model.named_modules()}
    for (module, dim, ix), before, after in zip(watch, dense, masked, strict=True):
        if before is None or after is None or before.shape != after.shape:
            continue
        if kept := _untouched(before, after, dim, ix):
            raise WrongMapping(
                f"torch-pruning maps this group's channels wrongly through the forward (a "
                f"channel shuffle, a view that moves channels?): {names.get(module, 'a layer')} "
                f"would lose input channels {kept[:4]} that still carry kept channels' data")


def _untouched(before: torch.Tensor, after: torch.Tensor, dim: int, ix: list[int]) -> list[int]:
    """The channels ``ix`` (along ``dim``) that zeroing the writers left unchanged, though
    they vary over the batch."""
    scale = float(before.abs().max()) or 1.0
    out = []
    for i in ix:
        if i >= before.shape[dim]:
            continue
        b, a = before.select(dim, i), after.select(dim, i)
        if float(b.max() - b.min()) > 1e-4 * scale and torch.allclose(b, a, rtol=0, atol=1e-6 * scale):
            out.append(i)
    return out


def _inputs(model: nn.Module, example_input: Sequence[Any], modules: Sequence[nn.Module]
            ) -> list[torch.Tensor | None]:
    """The first input tensor each of ``modules`` receives (its first call) on the example."""
    seen: dict[int, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if id(module) not in seen and inputs and isinstance(inputs[0], torch.Tensor):
            seen[id(module)] = inputs[0].detach().clone()

    hooks = [m.register_forward_pre_hook(hook) for m in dict.fromkeys(modules)]
    try:
        with torch.no_grad():
            model.eval()(*args(example_input))
    finally:
        for h in hooks:
            h.remove()
    return [seen.get(id(m)) for m in modules]
