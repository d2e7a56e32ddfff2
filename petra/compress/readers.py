"""Who reads a recurrent layer's units: the tracing behind
:func:`petra.compress.recurrent.recurrent_layers`.

One pass over the example batch, with forward hooks on the recurrent layers, their possible
readers (``nn.Linear``, ``nn.Conv1d``) and ``nn.LayerNorm``, and a torch function mode
(:class:`_Follow`) that maps each tensor derived from a recurrent output to the units it
carries, by storage: views share it, and elementwise functions, arithmetic with a factor per
position (a padding mask), reductions over time and concatenations along the features are
followed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from petra.tasks.contract import args, tensors_in

_CONSUMERS = (nn.Linear, nn.Conv1d)


def _storage(t: Any) -> int | None:
    return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None


#: Functions whose output keeps its input's units where they were.
_ELEMENTWISE = frozenset({
    torch.relu, F.relu, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.gelu, F.silu, F.elu,
    F.leaky_relu, F.dropout, torch.clone, torch.Tensor.relu, torch.Tensor.tanh,
    torch.Tensor.sigmoid, torch.Tensor.contiguous, torch.Tensor.clone,
})
#: Functions that concatenate tensors: along the last dimension (the features), a recurrent
#: output's units become a block of the result's features, at an offset.
_CONCAT = frozenset({torch.cat, torch.concat, torch.concatenate})
#: Reductions: over dimensions other than the last (a mean over time), the units stay where
#: they were in the last dimension.
_REDUCE = frozenset({torch.mean, torch.sum, torch.amax, torch.amin, torch.Tensor.mean,
                     torch.Tensor.sum, torch.Tensor.amax, torch.Tensor.amin})
#: Arithmetic with a per-position factor: where every other operand is a number or a tensor
#: whose last dimension is 1 (a padding mask ``out * mask[..., None]``, the masked mean's
#: ``/ mask.sum(1)``), each unit stays where it was.
_BROADCAST = frozenset({
    torch.mul, torch.div, torch.add, torch.sub, torch.Tensor.mul, torch.Tensor.div,
    torch.Tensor.add, torch.Tensor.sub, torch.Tensor.__mul__, torch.Tensor.__rmul__,
    torch.Tensor.__truediv__, torch.Tensor.__add__, torch.Tensor.__radd__,
    torch.Tensor.__sub__, torch.Tensor.__rsub__, torch.Tensor.masked_fill, torch.masked_fill,
    torch.where,
})
#: Reductions that return (values, indices) when given a dimension.
_MAX = frozenset({torch.max, torch.min, torch.Tensor.max, torch.Tensor.min})


class _Feed(NamedTuple):
    """A traced tensor that carries recurrent units."""

    #: its last dimension: the hidden size for a recurrent output, the features for a concat
    width: int
    #: each block of units: the recurrent output's storage, and the feature where it starts
    blocks: tuple[tuple[int, int], ...]
    #: whether it came through a concatenation (its units are in the last dimension, at the
    #: blocks' offsets), not a recurrent output or an elementwise copy of one (any layout)
    concat: bool = False


class _Follow(TorchFunctionMode):
    """Maps the storage of an elementwise function's output, or of a reduction over dimensions
    other than the features, to its input's feed, and of a concatenation along the features
    to its parts' blocks shifted by their offsets, while active.

    Every output it maps is kept alive in :attr:`alive` until the trace ends, so that no later
    tensor can be given its freed storage and pass for an alias.
    """

    def __init__(self, alias: dict[int, _Feed], alive: list[torch.Tensor]) -> None:
        super().__init__()
        self.alias = alias
        self.alive = alive

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _MAX and isinstance(out, tuple) and args and isinstance(args[0], torch.Tensor):
            # ``out.max(dim=1)``: (values, indices); the values keep the units
            self._reduce(out[0], args[0], args[1] if len(args) > 1 else kwargs.get("dim"))
            return out
        if not isinstance(out, torch.Tensor) or out.dim() == 0:
            return out
        if func in _ELEMENTWISE and args and isinstance(args[0], torch.Tensor) and (
                out.shape == args[0].shape):
            feed = self.alias.get(_storage(args[0]))
            if feed is not None:
                self._map(out, feed)
        elif func in _CONCAT:
            parts = args[0] if args else kwargs.get("tensors", kwargs.get("arrays", ()))
            dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
            if isinstance(dim, int) and dim % out.dim() == out.dim() - 1:
                self._concat(out, parts)
        elif func in _REDUCE and args and isinstance(args[0], torch.Tensor):
            self._reduce(out, args[0], args[1] if len(args) > 1 else kwargs.get("dim"))
        elif func in _BROADCAST:
            self._broadcast(out, [*args, *kwargs.values()])
        return out

    def _broadcast(self, out: torch.Tensor, operands: Sequence[Any]) -> None:
        """One operand carries units along its last dimension, as ``out`` does; every other
        is a number or is constant along that dimension."""
        tensors = [t for t in operands if isinstance(t, torch.Tensor)]
        fed = [(t, self.alias[_storage(t)]) for t in tensors if _storage(t) in self.alias]
        if len(fed) != 1:
            return
        source, feed = fed[0]
        if feed.width == source.shape[-1] == out.shape[-1] and all(
                t is source or t.dim() == 0 or t.shape[-1] == 1 for t in tensors):
            self._map(out, feed)

    def _reduce(self, out: torch.Tensor, source: torch.Tensor, dim: Any) -> None:
        feed = self.alias.get(_storage(source))
        dims = (dim,) if isinstance(dim, int) else tuple(dim) if isinstance(
            dim, tuple | list) else None
        if feed is None or dims is None or not all(isinstance(d, int) for d in dims):
            return
        last = source.dim() - 1
        if feed.width == source.shape[-1] == out.shape[-1] and all(
                d % source.dim() != last for d in dims):
            self._map(out, feed)

    def _concat(self, out: torch.Tensor, parts: Sequence[Any]) -> None:
        blocks, start = [], 0
        for part in parts:
            if not isinstance(part, torch.Tensor) or part.dim() != out.dim():
                return
            feed = self.alias.get(_storage(part))
            if feed is not None and feed.width == part.shape[-1]:
                blocks.extend((root, start + offset) for root, offset in feed.blocks)
            start += part.shape[-1]
        if blocks:
            self._map(out, _Feed(out.shape[-1], tuple(blocks), concat=True))

    def _map(self, out: torch.Tensor, feed: _Feed) -> None:
        self.alias[_storage(out)] = feed
        self.alive.append(out)


def trace_readers(model: nn.Module, example_input: Sequence[Any], is_recurrent: Any
                  ) -> tuple[
        dict[str, set[int]], dict[int, list[tuple[str, int, bool]]], dict[int, list[str]]]:
    """Run ``model`` on its example once: each recurrent layer's output storages; for each such
    storage who reads its units: (the Linear or Conv1d, the input column where they start,
    whether through a concatenation); and the LayerNorms its units pass through.

    ``is_recurrent(module)`` says which modules' outputs are traced: their ``hidden_size``
    is the units' width."""
    trace = _Trace()
    hooks = []
    for name, module in model.named_modules():
        hook = (trace.recurrent if is_recurrent(module) else trace.reader
                if isinstance(module, _CONSUMERS) else trace.norm
                if isinstance(module, nn.LayerNorm) else None)
        if hook is not None:
            hooks.append(module.register_forward_hook(functools.partial(hook, name)))
    was_training = model.training
    model.eval()
    try:
        with _Follow(trace.alias, trace.alive):
            model(*args(example_input))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    trace.alive.clear()
    return trace.outputs, trace.readers, trace.norms


class _Trace:
    """What one :func:`trace_readers` pass finds, and its forward hooks (each called with the
    module's name first)."""

    def __init__(self) -> None:
        self.outputs: dict[str, set[int]] = {}
        self.readers: dict[int, list[tuple[str, int, bool]]] = {}
        self.norms: dict[int, list[str]] = {}
        self.alias: dict[int, _Feed] = {}  # storage -> the recurrent units it carries
        # The recurrent outputs and their followed copies stay referenced until the trace
        # ends: a freed one's storage could be handed to a later, unrelated tensor (a model
        # that reads ``self.lstm(x)[0][:, -1]`` drops ``h_n`` and ``c_n`` at once), which would
        # then pass for the recurrent layer's output. A guard: not seen to happen with the CPU
        # allocator.
        self.alive: list[torch.Tensor] = []

    def recurrent(self, name: str, mod: Any, _inp: Any, out: Any) -> None:
        tensors = tensors_in(out)  # a recurrent layer's (out, h_n) or (out, (h_n, c_n))
        self.alive.extend(tensors)
        self.outputs[name] = {p for p in map(_storage, tensors) if p is not None}
        h = mod.hidden_size
        self.alias.update({p: _Feed(h, ((p, 0),)) for p in self.outputs[name]})
        if mod.bidirectional and tensors:  # the sequence output: forward, then backward
            p = _storage(tensors[0])
            self.alias[p] = _Feed(2 * h, ((p, 0), (p, h)), concat=True)

    def reader(self, name: str, mod: Any, inp: Any, _out: Any) -> None:
        feed = self.alias.get(_storage(inp[0])) if inp else None
        if feed is None or feed.concat and not (
                isinstance(mod, nn.Linear) and inp[0].shape[-1] == feed.width):
            return  # a concat read other than along a Linear's features
        for root, offset in feed.blocks:
            self.readers.setdefault(root, []).append((name, offset, feed.concat))

    def norm(self, name: str, mod: Any, inp: Any, out: Any) -> None:
        feed = self.alias.get(_storage(inp[0])) if inp else None
        if feed is not None and not feed.concat and isinstance(out, torch.Tensor) and (
                tuple(mod.normalized_shape) == (feed.width,) == (out.shape[-1],)):
            self.alias[_storage(out)] = feed
            self.alive.append(out)
            for root, _offset in feed.blocks:
                self.norms.setdefault(root, []).append(name)
