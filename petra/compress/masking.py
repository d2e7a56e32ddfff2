"""Whether removing a channel group computes what zeroing its channels computes.

The structured criteria rank channels by what zeroing them costs, and petra's checks of an
artifact compare it with the dense model with those channels zeroed. A physical removal
computes the same where every operation on the channels treats each one apart (a layer's
weights, an activation, an add, a per-channel scale) and where a norm takes its statistics over
the channels kept (a LayerNorm, an RMSNorm, a GroupNorm: petra's semantics for the width). It
does not where the forward reduces over the channels outside a layer: a mean, a variance or a
softmax over them, or a reader that standardizes its own weight over its input channels (BiT's
``WeightStandardizedConv2d``). Once the channels are gone, those run over fewer of them, and the
kept channels compute something else: a removal scored as harmless changed every output (a
channel softmax: val 0.575 where the dense model gave 0.994), and each such candidate was
reported complete.

:func:`planned` lists what each member of a group loses; :func:`masked_output` runs a twin of
the unpruned model (the same blocks skipped, heads and units removed) with those channels zeroed
at every writer, and each norm of the group computed by its pruned self over the channels it
keeps. :mod:`petra.compress.verify` withholds a group whose removal gives another output.
A group with a member petra cannot zero (an attention, a recurrent layer) is not checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from petra.compress.kinds import is_op_node
from petra.compress.landing import _NORMS, _pick
from petra.tasks.contract import args

#: Norms whose channels are their input's dimension 1 (a LayerNorm's, an RMSNorm's: the last).
_BY_DIM_1 = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
             nn.PReLU)
#: Writers whose removed output channels are zeroed, with their channel dimension.
_ZEROED = ((nn.modules.conv._ConvNd, 1), (nn.Linear, -1), (nn.Embedding, -1))


def planned(graph: Any, whole: Any, removed: Sequence[int]) -> list[tuple[str, str, int, list[int]]]:
    """``(kind, name, dim, indices)`` of what each member of ``whole`` (a torch-pruning group
    of all of its root's channels) loses when its root loses ``removed``: ``module`` members
    (writers and norms, by their output channels) and ``param`` members (a parameter the group
    cuts, at ``dim``)."""
    chosen = set(removed)
    names = {id(m): n for n, m in graph.model.named_modules()}
    params = {id(p): n for n, p in graph.model.named_parameters()}
    dims = {id(u.parameters): u.pruning_dim for u in getattr(graph, "unwrapped_parameters",
                                                               None) or ()}
    out = []
    for item in getattr(whole, "_group", ()):
        target = item.dep.target.module
        if is_op_node(target) or not \
                graph.is_out_channel_pruning_fn(item.dep.handler):
            continue
        roots = getattr(item, "root_idxs", None) or item.idxs
        ix = sorted(set(_pick([int(i) for i in item.idxs], [int(r) for r in roots], chosen)))
        if isinstance(target, nn.Parameter) and id(target) in params:
            owner = params[id(target)].rpartition(".")[0]
            if _per_channel(graph.model.get_submodule(owner)):  # a hand-written norm's weights
                out.append(("module", owner, 0, ix))
            else:
                out.append(("param", params[id(target)], dims.get(id(target), 0), ix))
        elif id(target) in names:
            out.append(("module", names[id(target)], 0, ix))
    return list(dict.fromkeys((k, n, d, tuple(i)) for k, n, d, i in out))


def _per_channel(module: nn.Module) -> bool:
    """Whether ``module`` holds only tensors of one dimension and no layers: a norm or a scale
    written by hand, whose pruned self computes over the channels it keeps."""
    own = list(module.parameters())
    return bool(own) and all(p.dim() == 1 for p in own) and not any(True for _ in
                                                                     module.children())


def masked_output(twin: nn.Module, example_input: Sequence[Any],
                  masks: Sequence[tuple[str, str, int, list[int]]], pruned: nn.Module
                  ) -> torch.Tensor | None:
    """The output of ``twin`` with ``masks`` zeroed (:func:`planned`), each norm computed by
    its counterpart in ``pruned`` over the channels it keeps; None where a member is one petra
    cannot zero, or is not called."""
    hooks, fired = [], set()
    try:
        for kind, name, dim, ix in masks:
            if kind == "param":
                with torch.no_grad():
                    param = twin.get_parameter(name)
                    param.index_fill_(dim, torch.tensor(ix, dtype=torch.long), 0.0)
                continue
            module = twin.get_submodule(name)
            hook = _hook(module, pruned.get_submodule(name), ix, name, fired)
            if hook is None:
                return None
            hooks.append(module.register_forward_hook(hook))
        with torch.no_grad():
            out = twin.eval()(*args(example_input))
    finally:
        for handle in hooks:
            handle.remove()
    wanted = {name for kind, name, _, ix in masks if kind == "module"}
    return out if fired >= wanted and isinstance(out, torch.Tensor) else None


def _hook(module: nn.Module, pruned: nn.Module, ix: list[int], name: str, fired: set[str]
          ) -> Any:
    """A forward hook that zeroes ``module``'s output channels ``ix``, or, for a norm or a
    per-channel scale, gives ``pruned``'s output over the channels kept; None where petra
    cannot tell the channel dimension."""
    zero_dim = next((d for kinds, d in _ZEROED if isinstance(module, kinds)), None)
    weight = next(module.parameters(), None)
    norm = isinstance(module, (*_NORMS, nn.PReLU)) or (zero_dim is None and _per_channel(module))
    if zero_dim is None and not norm:
        return None

    def hook(_module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        fired.add(name)
        if not isinstance(output, torch.Tensor) or not ix:
            return output
        if zero_dim is not None:
            return output.index_fill(zero_dim, torch.tensor(ix), 0.0)
        dim = 1 if isinstance(module, _BY_DIM_1) else -1
        if not isinstance(module, _BY_DIM_1 + (nn.LayerNorm, nn.RMSNorm)) and output.dim() > 2:
            width = weight.shape[0]  # a hand-written norm: channels first (ConvNeXt's) or last
            if (output.shape[1] == width) == (output.shape[-1] == width):
                raise LookupError(f"{name}: its channels are neither, or both, of its first "
                                  "and last dimensions")  # the twin is not compared
            dim = 1 if output.shape[1] == width else -1
        drop = set(ix)
        keep = torch.tensor([c for c in range(output.shape[dim]) if c not in drop])
        result = torch.zeros_like(output)
        return result.index_copy(dim, keep, pruned(inputs[0].index_select(dim, keep)))

    return hook
