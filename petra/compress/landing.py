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

from petra.compress.kinds import CONV_LAYERS, is_op_node
from petra.errors import Refused
from petra.tasks.contract import args

#: Writers whose per-channel weights are one dimension of their own parameters.
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
          nn.LayerNorm, nn.RMSNorm)


class WrongMapping(Refused):
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


def _array(graph: Any, target: Any) -> list[tuple[torch.Tensor, int]]:
    """A parameter of two or more dimensions that the group cuts, with the dimension it cuts
    (a Perceiver's latent array, where the stream starts): a source, zeroed as a layer's
    weights are. Its readers took it for a channel moved while it stayed as it was."""
    if not isinstance(target, nn.Parameter) or target.dim() < 2:
        return []
    dim = next((u.pruning_dim for u in getattr(graph, "unwrapped_parameters", None) or ()
                if u.parameters is target), None)
    return [] if dim is None else [(target, dim)]


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


#: The operations between a group's writers and readers that keep each channel where it is
#: (torch-pruning's nodes for them, by their autograd function): a group through no other
#: is checked at the channels to remove alone.
_IN_PLACE = {f"{name}Backward0" for name in (
    "Relu", "Gelu", "Silu", "Sigmoid", "Tanh", "Hardtanh", "Hardswish", "Hardsigmoid",
    "LeakyRelu", "Elu", "Softplus", "Mish", "Add", "Sub", "Mul", "Div", "Neg", "Clone", "T",
    "Addmm", "Mm", "NativeDropout")} | {"MeanBackward1"}


def moves_channels(group: Any) -> bool:
    """Whether ``group`` goes through an operation that may move channels (a reshape, a
    transpose, an index): only then are its bit sets tried (:func:`check_landing`)."""
    for dep, _ in group:
        op = dep.target.module
        if is_op_node(op) and type(op).__name__ not in (
                "_ConcatOp", "_SplitOp") and str(getattr(op, "_grad_fn", "")) not in _IN_PLACE:
            return True
    return False


def check_landing(model: nn.Module, example_input: Sequence[Any], graph: Any, whole: Any,
                  removed: Sequence[int], dense: dict[int, torch.Tensor] | None = None, *,
                  bits: bool = True) -> None:
    """Raise :class:`WrongMapping` where removing the root channels ``removed`` of ``whole``
    (a torch-pruning group of all of its root's channels) would cut, at a reader, channels
    that its sources keep.

    Besides ``removed``, it tries each set of root channels whose index has bit ``b`` set: a
    mapping that moves any channel moves one with a bit set to one without it (follow the
    channels it moves round to where they started), so these ``log2(n)`` sets tell every
    permutation, where ``removed`` alone (the last channels) passed one that moves only the
    first. ``dense`` caches the readers' inputs on the unchanged model, by module id, across
    the groups of one trial. Without ``bits``, only ``removed`` is tried."""
    members = _members(graph, whole)
    if members is None:
        return
    writers, readers = members
    if not writers or not readers:
        return
    n = 1 + max(r for *_, roots in writers for r in roots)
    trials = [set(removed)] + [{c for c in range(n) if c >> b & 1}
                               for b in range(max(1, (n - 1).bit_length()) if bits else 0)]
    dense = {} if dense is None else dense
    modules = list(dict.fromkeys(m for m, *_ in readers))
    if missing := [m for m in modules if id(m) not in dense]:
        dense.update(zip((id(m) for m in missing), _inputs(model, example_input, missing),
                         strict=True))
    for chosen in trials:
        zero = [(t, d, _pick(ix, roots, chosen)) for t, d, ix, roots in writers]
        watch = [(m, d, _pick(ix, roots, chosen)) for m, d, ix, roots in readers]
        masked = dict(zip((id(m) for m in modules), _zeroed(model, example_input, zero, modules),
                          strict=True))
        for module, dim, ix in watch:
            before, after = dense.get(id(module)), masked.get(id(module))
            if before is None or after is None or before.shape != after.shape or not ix:
                continue
            if kept := _untouched(before, after, dim, ix):
                names = {m: n for n, m in model.named_modules()}
                raise WrongMapping(
                    f"torch-pruning maps this group's channels wrongly {_through(whole, module)}"
                    f": {names.get(module, 'a layer')} would lose input channels {kept[:4]} "
                    "that still carry kept channels' data")


def reader_inputs(model: nn.Module, example_input: Sequence[Any], graph: Any,
                  groups: Sequence[Any]) -> dict[int, torch.Tensor | None]:
    """The inputs of every reader :func:`check_landing` watches in ``groups``, on the
    unchanged model, by module id: one forward for all of them, where each group's took one
    of its own."""
    modules = [m for whole in groups if (members := _members(graph, whole)) is not None
               and members[0] for m, *_ in members[1]]
    modules = list(dict.fromkeys(modules))
    return dict(zip((id(m) for m in modules), _inputs(model, example_input, modules),
                    strict=True)) if modules else {}


def landing_key(group: Any, names: dict[int, str], removed: Sequence[int]) -> tuple[Any, ...]:
    """What :func:`check_landing`'s verdict on ``group`` at ``removed`` depends on: each
    member (a layer or parameter by its name in the model, an operation by its kind, its
    autograd function, and its sizes, offsets or slice) with the handler that cuts it and the
    indices it maps to, from which root indices. A skipped block takes its layers out of
    every group that reaches it, so the groups it leaves unchanged keep their key, and their
    verdict (``names``: module and parameter ids to names)."""
    items = []
    for item in getattr(group, "_group", ()):
        dep, target = item.dep, item.dep.target.module
        label = (type(target).__name__, *(repr(v) for k, v in sorted(vars(target).items())
                                          if k not in ("id", "grad_fn") and (
                                              not k.startswith("_") or k == "_grad_fn"))
                 ) if is_op_node(target) else (names.get(id(target)) or repr(target),)
        items.append((label, getattr(dep.handler, "__name__", str(dep.handler)),
                       tuple(int(i) for i in item.idxs),
                       tuple(int(r) for r in getattr(item, "root_idxs", None) or ())))
    return tuple(sorted(items)), tuple(removed)


class Landings:
    """The verdicts of :func:`check_landing` across the trials of one verification, by
    :func:`landing_key` and whether bit sets were tried. A group checked in an earlier trial
    is not checked again, and its verdict stands: a MobileViT's 35 skip trials each checked
    the same 32 groups again (2348 forwards of the model in its ``petra space``; 211 with the
    verdicts kept and the readers' inputs read in one forward)."""

    def __init__(self) -> None:
        self.verdicts: dict[tuple[Any, bool], WrongMapping | None] = {}

    def _known(self, key: Any, bits: bool) -> tuple[bool, WrongMapping | None]:
        """(whether a verdict stands for this check, that verdict: None where it passed).
        One with the same ``bits``, or a pass with bit sets, which a check of the removed
        channels alone passes too."""
        if (key, bits) in self.verdicts:
            return True, self.verdicts[key, bits]
        return (not bits and (key, True) in self.verdicts
                and self.verdicts[key, True] is None), None

    def new(self, key: Any, bits: bool) -> bool:
        return not self._known(key, bits)[0]

    def check(self, key: Any, bits: bool, check: Any) -> None:
        """Raise the :class:`WrongMapping` that stands for this check, or run ``check()``
        (:func:`check_landing`) where none does, and keep what it finds."""
        known, verdict = self._known(key, bits)
        if verdict is not None:
            raise WrongMapping(*verdict.args)
        if known:
            return
        try:
            check()
        except WrongMapping as exc:
            self.verdicts[key, bits] = exc
            raise
        self.verdicts[key, bits] = None


def _through(group: Any, reader: nn.Module) -> str:
    """Through what torch-pruning followed the channels to ``reader``: the operations between
    (a GhostNet module's ``cat([x1, x2], 1)[:, :out]`` before its depthwise conv, where the
    slice keeps every channel, reads ``alias, concat, relu``), or a guess where there are none."""
    from petra.compress.graph import op_name, ops_to

    items = list(getattr(group, "_group", ()))
    deps = [item.dep for item in items if item.dep.target.module is reader]
    ops = next((o for d in deps if (o := ops_to(group, d))), "") or ", ".join(dict.fromkeys(
        op_name(item.dep.target.name) for item in items if is_op_node(item.dep.target.module)))
    return (f"through the operations between them ({ops})" if ops else "through the forward "
            "(a channel shuffle, a view that moves channels, the model's own input channels?)")


def _members(graph: Any, group: Any) -> tuple[list[Any], list[Any]] | None:
    """The group's sources, as (tensor, dim, indices, root indices), and its readers, as
    (module, dim, indices, root indices); None where a writer is one petra cannot zero."""
    writers, readers = [], []
    for item in getattr(group, "_group", ()):
        dep, ix = item.dep, [int(i) for i in item.idxs]
        roots = [int(r) for r in (getattr(item, "root_idxs", None) or ix)]
        target = dep.target.module
        if is_op_node(target):
            continue  # its own nodes for the ops between (a reshape, an add)
        if graph.is_out_channel_pruning_fn(dep.handler):
            tensors = _array(graph, target) or _writer(target)
            if tensors is None:
                return None  # a writer petra cannot zero (an attention): not checked
            writers += [(t, d, ix, roots) for t, d in tensors]
            if isinstance(target, CONV_LAYERS) and target.groups > 1 \
                    and target.groups == target.in_channels:
                readers.append((target, 1, ix, roots))  # a depthwise conv reads what it writes
        elif (dim := _reader_dim(target)) is not None:
            readers.append((target, dim, ix, roots))
    return writers, readers


def _pick(ix: Sequence[int], roots: Sequence[int], chosen: set[int]) -> list[int]:
    return [i for i, r in zip(ix, roots, strict=True) if r in chosen]


def _zeroed(model: nn.Module, example_input: Sequence[Any],
            zero: Sequence[tuple[torch.Tensor, int, list[int]]], modules: Sequence[nn.Module]
            ) -> list[torch.Tensor | None]:
    """The inputs of ``modules`` with the tensors ``zero`` zeroed at their indices (in place,
    then restored)."""
    saved = [(t, t.detach().clone()) for t, _, _ in zero]
    try:
        with torch.no_grad():
            for t, dim, ix in zero:
                if ix:
                    t.index_fill_(dim, torch.tensor(ix, device=t.device), 0.0)
        return _inputs(model, example_input, modules)
    finally:
        with torch.no_grad():
            for t, old in saved:
                t.copy_(old)


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
