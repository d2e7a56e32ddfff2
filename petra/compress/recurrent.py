"""Recurrent layers: hidden units of an ``nn.GRU`` or ``nn.LSTM`` removed physically
(``l2_units``).

torch-pruning cannot follow channels into a GRU or LSTM, so a recurrent model kept its
recurrence whole, and the recurrence is where its time goes. Here an ``nn.GRU``
or ``nn.LSTM`` (without projection, ``proj_size == 0``) loses hidden units: the kept units'
rows of every gate (GRU: reset, update, new; LSTM: input, forget, cell, output) in the input
and recurrent weights and biases, their columns of the recurrent weights, and the matching
input columns of each layer that reads the layer's outputs. A bidirectional one loses the same
units in both directions: its sequence output holds them twice (forward, then backward), two
blocks of its readers' columns. A stacked one loses the same units in every layer (one
sparsity gene; ``h_n[i]`` of any layer stays readable), and each layer above the first keeps
the input columns of the units it reads.

:func:`recurrent_layers` (also :func:`gru_layers`, its older name) finds the layers that can be
pruned so, by tracing the example batch: every Conv or Linear layer whose input shares storage
with one of the recurrent layer's outputs is a reader. Those outputs are the sequence output
(``out[:, -1]`` is a view of it) and the final states: a GRU's ``h_n``, an LSTM's ``h_n`` and
``c_n`` (``h_n[-1]`` is a view of ``h_n``, which shares no storage with ``out``). A layer that
reads an output through elementwise activations (``relu(out)``: a skipped block between a
recurrent layer and its reader leaves one), through a mean, sum or max over time
(``out.mean(1)``), through an ``nn.LayerNorm`` over its units (whose weights lose the
removed units' entries too), or through ``torch.cat`` along the features
(``cat([h[:, -1], side], -1)``: the units are a block of the reader's input columns, at an
offset) is a reader too (the tracing is :mod:`petra.compress.readers`). The layer counts only
if a trial pruning still runs the model; a GRU or LSTM that does not count gets a one-line
reason (``recurrent_layers(..., why=)``).

Halving an LSTM's units (input 64, hidden 256, 50 steps, batch 16, ORT on 1 thread) measured
0.33x the dense fp32 latency and 0.31x its artifact bytes; ``int8_dynamic`` turns the pruned
LSTM into ``DynamicQuantizeLSTM``: 0.16x latency, 0.08x bytes (dense int8_dynamic alone: 0.39x,
0.25x). At hidden 128: 0.42x pruned, 0.49x int8_dynamic, 0.23x both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from petra.compress.channel_counts import kept_channels
from petra.compress.graph import directions, keep_frozen
from petra.compress.readers import trace_readers
from petra.errors import first_line
from petra.registry import PRUNING
from petra.tasks.contract import args, copy_model

#: The recurrent layer types whose units can be removed, and their gates per unit.
_GATES: dict[type[nn.Module], int] = {nn.GRU: 3, nn.LSTM: 4}


@dataclass(frozen=True)
class RecurrentInfo:
    """A prunable GRU or LSTM: its name, hidden size, and the layers that read its outputs."""

    name: str
    hidden: int
    consumers: tuple[str, ...]
    #: Per consumer, the input column where each block of the layer's units starts (a reader
    #: of ``cat([h, side], -1)`` reads them at 0, of ``cat([side, h], -1)`` after ``side``);
    #: empty: every consumer reads them at column 0, and only them.
    offsets: tuple[tuple[int, ...], ...] = ()
    #: The ``nn.LayerNorm`` layers between the layer and its readers (over its ``hidden``
    #: features): their weights and biases lose the removed units' entries too.
    norms: tuple[str, ...] = ()

    def blocks(self, consumer: int) -> tuple[int, ...]:
        """The input columns where consumer ``consumer``'s blocks of units start."""
        return self.offsets[consumer] if self.offsets else (0,)


def _gates(module: nn.Module) -> int | None:
    """The gates per hidden unit of a recurrent layer whose units can be removed, else None.

    Only the exact ``nn.GRU`` and ``nn.LSTM`` count (stacked and bidirectional too), without an
    LSTM projection: a subclass may have a forward of its own, which the rebuilt layer would
    drop.
    """
    gates = _GATES.get(type(module))
    if gates is None:
        return None
    if getattr(module, "proj_size", 0):
        return None
    return gates


def _unfit(module: nn.Module) -> str | None:
    """Why the units of a GRU or LSTM (or a subclass) cannot be removed by its shape, else
    None."""
    if _gates(module) is not None:
        return None
    base = next(t for t in _GATES if isinstance(module, t)).__name__
    if type(module) not in _GATES:
        return (f"a subclass of nn.{base} ({type(module).__name__}): its own forward would "
                "be lost; only an exact nn.GRU or nn.LSTM loses units")
    return (f"proj_size={module.proj_size}: only an nn.{base} without projection loses "
            "units")


@torch.no_grad()
def recurrent_layers(model: nn.Module, example_input: Sequence[Any], *,
                     why: dict[str, str] | None = None) -> list[RecurrentInfo]:
    """The GRUs and LSTMs of ``model`` whose hidden units can be removed.

    Args:
        model: the model, called as ``model(*example_input)``.
        example_input: the example batch, a tuple of tensors.
        why: when given, filled with layer name → a one-line reason for each GRU or LSTM of
            the model (subclasses too) whose units cannot be removed.

    Returns:
        One :class:`RecurrentInfo` per prunable layer (see the module docstring), in the
        order of ``model.named_modules()``.
    """
    reasons: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, tuple(_GATES)) and (reason := _unfit(module)):
            reasons[name] = reason
    outputs, readers, norms = trace_readers(model, example_input,
                                            lambda m: _gates(m) is not None)
    found = []
    for name, module in model.named_modules():
        if name in reasons or _gates(module) is None:
            continue
        if name not in outputs:
            reasons[name] = "not called on the example batch"
            continue
        blocks: dict[str, set[int]] = {}
        concat = False
        for ptr in outputs[name]:
            for consumer, offset, through in readers.get(ptr, []):
                blocks.setdefault(consumer, set()).add(offset)
                concat |= through
        if not blocks:
            reasons[name] = ("no Linear or Conv1d reads its outputs directly, through "
                             "elementwise functions, a padding mask, reductions over time or "
                             "torch.cat along the features: petra cannot follow its units to "
                             "their readers")
            continue
        if module.hidden_size < 2:
            reasons[name] = f"hidden_size {module.hidden_size}: nothing to remove"
            continue
        offsets = tuple(tuple(sorted(o)) for o in blocks.values())
        info = RecurrentInfo(name, module.hidden_size, tuple(blocks),
                             offsets if concat else (), tuple(dict.fromkeys(
                                 n for p in outputs[name] for n in norms.get(p, []))))
        trial = copy_model(model).eval()
        try:
            prune_units(trial, info, list(range(module.hidden_size // 2)))
            trial(*args(example_input))
        except (RuntimeError, ValueError) as exc:
            reasons[name] = f"removing half its units breaks the model ({first_line(exc, 200)})"
            continue
        found.append(info)
    if why is not None:
        why.update(reasons)
    return found


#: The older name of :func:`recurrent_layers`, from when only GRUs were pruned.
gru_layers = recurrent_layers


def unit_scores(model: nn.Module, info: RecurrentInfo) -> torch.Tensor:
    """The L2 norm of every weight that belongs to each hidden unit.

    Those are the unit's row of every gate in the input and recurrent weights, its column of
    the recurrent weights, and its input column of each reader. Biases do not count.

    Args:
        model: the model that holds the layer ``info.name``.
        info: the layer, as :func:`recurrent_layers` found it.

    Returns:
        A float tensor of ``info.hidden`` scores, one per unit.
    """
    layer = model.get_submodule(info.name)
    h, gates = layer.hidden_size, _GATES[type(layer)]
    total = torch.zeros(h, dtype=torch.float64)
    for name in _weights(layer):
        hh = getattr(layer, f"weight_hh_{name}").detach().double()
        ih = getattr(layer, f"weight_ih_{name}").detach().double()
        for weight in (ih, hh):
            total += weight.pow(2).reshape(gates, h, -1).sum(dim=(0, 2))
        total += hh.pow(2).sum(dim=0)
        if not name.startswith("l0"):  # its input columns: the layer below's units
            total += ih.pow(2).reshape(ih.shape[0], -1, h).sum(dim=(0, 1))
    for i, consumer in enumerate(info.consumers):
        w = model.get_submodule(consumer).weight.detach().double()
        for offset in info.blocks(i):
            total += w.narrow(1, offset, h).pow(2).transpose(0, 1).reshape(h, -1).sum(dim=1)
    return total.sqrt().float()


@torch.no_grad()
def prune_units(model: nn.Module, info: RecurrentInfo, keep: Sequence[int]) -> None:
    """Keep only hidden units ``keep`` of the GRU or LSTM ``info.name``, in place.

    The layer is rebuilt with ``len(keep)`` units (rows ``k + g * hidden`` of every gate ``g``
    for each kept unit ``k``, and the kept columns of the recurrent weights); each reader keeps
    the input columns of the kept units, in each of its blocks (:attr:`RecurrentInfo.offsets`),
    and every column outside them.

    Args:
        model: the model that holds the layer; changed in place.
        info: the layer, as :func:`recurrent_layers` found it.
        keep: the indices of the units to keep.

    Raises:
        ValueError: when the layer cannot be pruned so, or a reader does not read
            ``hidden`` features (at its offsets).
    """
    layer = model.get_submodule(info.name)
    gates = _gates(layer)
    if gates is None:
        raise ValueError(f"{info.name} is not a GRU or an LSTM without projection")
    h = layer.hidden_size
    keep = sorted(int(k) for k in keep)
    if not keep or keep[0] < 0 or keep[-1] >= h:
        raise ValueError(f"{info.name}: cannot keep units {keep} of {h}")
    cols = torch.tensor(keep)
    new = _rebuilt(layer, gates, keep)
    columns = []
    for i, consumer in enumerate(info.consumers):
        width = model.get_submodule(consumer).weight.shape[1]
        offsets = info.blocks(i)
        if width != h and not info.offsets or max(offsets) + h > width:
            raise ValueError(f"{consumer} reads {width} features, not the {info.name}'s {h}"
                             + (f" at columns {list(offsets)}" if info.offsets else ""))
        dropped = {o + k for o in offsets for k in range(h)} - {o + k for o in offsets
                                                                 for k in keep}
        columns.append(torch.tensor([c for c in range(width) if c not in dropped]))
    for norm in info.norms:
        if tuple(model.get_submodule(norm).normalized_shape) != (h,):
            raise ValueError(f"{norm} normalizes {model.get_submodule(norm).normalized_shape}, "
                             f"not the {info.name}'s {h} units")
    with keep_frozen(model, [info.name, *info.norms, *info.consumers]):  # frozen stays so
        model.set_submodule(info.name, new)
        for norm in info.norms:
            _keep_features(model.get_submodule(norm), cols)
        for consumer, kept in zip(info.consumers, columns, strict=True):
            reader = model.get_submodule(consumer)
            reader.weight = nn.Parameter(reader.weight[:, kept].clone())
            if isinstance(reader, nn.Linear):
                reader.in_features = len(kept)
            else:
                reader.in_channels = len(kept)


#: The older name of :func:`prune_units`, from when only GRUs were pruned.
prune_gru_units = prune_units


def _rebuilt(layer: nn.Module, gates: int, keep: Sequence[int]) -> nn.Module:
    """A copy of the GRU or LSTM ``layer`` with only units ``keep`` (sorted), in every layer
    and direction."""
    h = layer.hidden_size
    rows = torch.tensor([g * h + k for g in range(gates) for k in keep])
    cols = torch.tensor(keep)
    # a layer above the first reads the units of the one below, each direction's in turn
    below = torch.tensor([d * h + k for d in range(len(directions(layer))) for k in keep])
    new = type(layer)(layer.input_size, len(keep), num_layers=layer.num_layers, bias=layer.bias,
                      batch_first=layer.batch_first, dropout=layer.dropout,
                      bidirectional=layer.bidirectional)
    new = new.to(device=layer.weight_ih_l0.device, dtype=layer.weight_ih_l0.dtype)
    new.train(layer.training)
    for name in _weights(layer):
        ih = getattr(layer, f"weight_ih_{name}")[rows]
        getattr(new, f"weight_ih_{name}").copy_(ih if name.startswith("l0") else ih[:, below])
        getattr(new, f"weight_hh_{name}").copy_(getattr(layer, f"weight_hh_{name}")[rows][:, cols])
        for bias in (f"bias_ih_{name}", f"bias_hh_{name}") if layer.bias else ():
            getattr(new, bias).copy_(getattr(layer, bias)[rows])
    return new


def _weights(layer: nn.Module) -> list[str]:
    """The names that follow ``weight_ih_`` of each of a recurrent layer's layers and
    directions: ``l0``, ``l0_reverse``, ``l1``, ..."""
    return [f"l{i}{suffix}" for i in range(layer.num_layers) for suffix in directions(layer)]


def _keep_features(norm: nn.LayerNorm, keep: torch.Tensor) -> None:
    """Keep only features ``keep`` of a LayerNorm over one dimension, in place."""
    for attr in ("weight", "bias"):
        param = getattr(norm, attr, None)
        if param is not None:
            setattr(norm, attr, nn.Parameter(param.detach()[keep].clone()))
    norm.normalized_shape = (len(keep),)


def prune_recurrent(model: nn.Module, plan: Mapping[str, tuple[str, float]],
                    infos: Sequence[RecurrentInfo], *, round_to: int = 1) -> dict[str, tuple]:
    """Prune the GRUs and LSTMs of ``plan``, in place.

    Args:
        model: the model; changed in place.
        plan: layer name → (a ``recurrent`` pruning method, sparsity).
        infos: the prunable layers, as :func:`recurrent_layers` found them.
        round_to: the kept units are rounded to a multiple of this.

    Returns:
        Layer name → (units before, units after), for each layer that lost units.

    Raises:
        ValueError: when a layer of ``plan`` is not among ``infos``.
    """

    by_name = {i.name: i for i in infos}
    changes = {}
    for name, (method, sparsity) in plan.items():
        info = by_name.get(name)
        if info is None:
            raise ValueError(f"{name} is not a GRU or LSTM whose units petra can remove")
        keep = kept_channels(info.hidden, sparsity, round_to)
        if keep >= info.hidden:
            continue
        scores = PRUNING.get(method).fn(model, info)
        kept = torch.argsort(scores, descending=True, stable=True)[:keep].tolist()
        prune_units(model, info, kept)
        changes[name] = (info.hidden, keep)
    return changes


@PRUNING.register(
    "l2_units",
    description="recurrent: remove the GRU/LSTM hidden units of smallest weight L2 norm (every "
                "gate's rows, recurrent columns, and the readers' input columns)",
    kind="recurrent",
)
def l2_units(model: nn.Module, info: RecurrentInfo) -> torch.Tensor:
    """Score each hidden unit of ``info``'s layer by :func:`unit_scores` (higher is kept)."""
    return unit_scores(model, info)
