"""Recurrent layers: hidden units of an ``nn.GRU`` removed physically (``l2_units``).

torch-pruning cannot follow channels into a GRU, so a GRU-based model kept its recurrence whole,
and the recurrence is where its time goes. Here a single-layer, unidirectional ``nn.GRU``
loses hidden units: the kept units' rows of every gate (reset, update, new) in the input and
recurrent weights and biases, their columns of the recurrent weights, and the matching input
columns of each layer that reads the GRU's output.

:func:`gru_layers` finds the GRUs that can be pruned so, by tracing the example batch: every
Conv or Linear layer whose input shares storage with a GRU output (``out[:, -1]`` does) is a
consumer, and so is a layer that reads it through elementwise activations (``relu(out)``: a
skipped block between a GRU and its reader leaves one), followed by :class:`_Elementwise`. The
GRU counts only if a trial pruning still runs the model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from petra.registry import PRUNING

_CONSUMERS = (nn.Linear, nn.Conv1d)


@dataclass(frozen=True)
class RecurrentInfo:
    """A prunable GRU: its name, hidden size, and the layers that read its output."""

    name: str
    hidden: int
    consumers: tuple[str, ...]


def _storage(t: Any) -> int | None:
    return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None


#: Functions whose output keeps its input's units where they were.
_ELEMENTWISE = frozenset({
    torch.relu, F.relu, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.gelu, F.silu, F.elu,
    F.leaky_relu, F.dropout, torch.clone, torch.Tensor.relu, torch.Tensor.tanh,
    torch.Tensor.sigmoid, torch.Tensor.contiguous, torch.Tensor.clone,
})


class _Elementwise(TorchFunctionMode):
    """Maps the storage of an elementwise function's output to its input's, while active."""

    def __init__(self, alias: dict[int, int]) -> None:
        super().__init__()
        self.alias = alias

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in _ELEMENTWISE and args and isinstance(args[0], torch.Tensor) and isinstance(
                out, torch.Tensor) and out.shape == args[0].shape:
            source = _storage(args[0])
            if source in self.alias:
                self.alias[_storage(out)] = self.alias[source]
        return out


@torch.no_grad()
def gru_layers(model: nn.Module, example_input: Any) -> list[RecurrentInfo]:
    """The GRUs of ``model`` whose hidden units can be removed (see the module docstring)."""
    names = {m: n for n, m in model.named_modules()}
    outputs: dict[str, set[int]] = {}
    readers: dict[int, list[str]] = {}
    alias: dict[int, int] = {}  # storage -> the GRU output storage it is elementwise of
    hooks = []
    for module, name in names.items():
        if isinstance(module, nn.GRU) and module.num_layers == 1 and not module.bidirectional:
            def on_gru(mod: Any, _inp: Any, out: Any, name: str = name) -> None:
                outputs[name] = {p for p in (_storage(o) for o in out) if p is not None}
                alias.update({p: p for p in outputs[name]})
            hooks.append(module.register_forward_hook(on_gru))
        elif isinstance(module, _CONSUMERS):
            def on_layer(mod: Any, inp: Any, _out: Any, name: str = name) -> None:
                ptr = _storage(inp[0]) if inp else None
                if ptr is not None:
                    readers.setdefault(alias.get(ptr, ptr), []).append(name)
            hooks.append(module.register_forward_hook(on_layer))
    was_training = model.training
    model.eval()
    try:
        with _Elementwise(alias):
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    found = []
    for name, ptrs in outputs.items():
        consumers = tuple(dict.fromkeys(c for p in ptrs for c in readers.get(p, [])))
        gru = model.get_submodule(name)
        if not consumers or gru.hidden_size < 2:
            continue
        info = RecurrentInfo(name, gru.hidden_size, consumers)
        trial = copy.deepcopy(model).eval()
        try:
            prune_gru_units(trial, info, list(range(gru.hidden_size // 2)))
            trial(example_input)
        except (RuntimeError, ValueError):
            continue
        found.append(info)
    return found


def unit_scores(model: nn.Module, info: RecurrentInfo) -> torch.Tensor:
    """The L2 norm of every weight that belongs to each hidden unit (gate rows, recurrent
    column, consumers' input columns)."""
    gru = model.get_submodule(info.name)
    h = gru.hidden_size
    total = torch.zeros(h, dtype=torch.float64)
    for weight in (gru.weight_ih_l0, gru.weight_hh_l0):
        total += weight.detach().double().pow(2).reshape(3, h, -1).sum(dim=(0, 2))
    total += gru.weight_hh_l0.detach().double().pow(2).sum(dim=0)
    for consumer in info.consumers:
        w = model.get_submodule(consumer).weight.detach().double()
        total += w.pow(2).transpose(0, 1).reshape(h, -1).sum(dim=1)
    return total.sqrt().float()


@torch.no_grad()
def prune_gru_units(model: nn.Module, info: RecurrentInfo, keep: Sequence[int]) -> None:
    """Keep only hidden units ``keep`` of the GRU ``info.name``, in place."""
    gru = model.get_submodule(info.name)
    h = gru.hidden_size
    keep = sorted(int(k) for k in keep)
    rows = torch.tensor([g * h + k for g in range(3) for k in keep])
    cols = torch.tensor(keep)
    new = nn.GRU(gru.input_size, len(keep), num_layers=1, bias=gru.bias,
                 batch_first=gru.batch_first)
    new.weight_ih_l0.copy_(gru.weight_ih_l0[rows])
    new.weight_hh_l0.copy_(gru.weight_hh_l0[rows][:, cols])
    if gru.bias:
        new.bias_ih_l0.copy_(gru.bias_ih_l0[rows])
        new.bias_hh_l0.copy_(gru.bias_hh_l0[rows])
    parent_name, _, child = info.name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    for consumer in info.consumers:
        layer = model.get_submodule(consumer)
        if layer.weight.shape[1] != h:
            raise ValueError(f"{consumer} reads {layer.weight.shape[1]} features, not the "
                             f"GRU's {h}")
        layer.weight = nn.Parameter(layer.weight[:, cols].clone())
        if isinstance(layer, nn.Linear):
            layer.in_features = len(keep)
        else:
            layer.in_channels = len(keep)


def prune_recurrent(model: nn.Module, plan: Mapping[str, tuple[str, float]],
                    infos: Sequence[RecurrentInfo], *, round_to: int = 1) -> dict[str, tuple]:
    """Prune the GRUs of ``plan`` (name → (method, sparsity)); returns name → (before, after)."""
    from petra.compress.structured import kept_channels

    by_name = {i.name: i for i in infos}
    changes = {}
    for name, (method, sparsity) in plan.items():
        info = by_name.get(name)
        if info is None:
            raise ValueError(f"{name} is not a GRU whose units petra can remove")
        keep = kept_channels(info.hidden, sparsity, round_to)
        if keep >= info.hidden:
            continue
        scores = PRUNING.get(method).fn(model, info)
        kept = torch.argsort(scores, descending=True, stable=True)[:keep].tolist()
        prune_gru_units(model, info, kept)
        changes[name] = (info.hidden, keep)
    return changes


@PRUNING.register(
    "l2_units",
    description="recurrent: remove the GRU hidden units of smallest weight L2 norm (every gate's "
                "rows, recurrent columns, and the readers' input columns)",
    kind="recurrent", structured=True,
)
def l2_units(model: nn.Module, info: RecurrentInfo) -> torch.Tensor:
    return unit_scores(model, info)
