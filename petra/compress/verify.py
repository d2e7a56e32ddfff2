"""Only offer what works: structured and quantization genes verified on the user's model.

A search must never propose a gene that the space could have known would fail. When the space
is built, :func:`verify_structure` removes, on a copy of the model, the most that each
structured unit can lose (the channels of a dependency group, the heads of an attention, the
hidden units of a recurrent layer, each at the space's largest sparsity), runs the example
batch, compares it with the model with the same channels zeroed (:mod:`petra.compress.masking`)
and exports it to ONNX. Every structured criterion removes channels the same way, so the removal
is verified once per unit, whatever the criterion. The units of each kind (channel groups, heads,
recurrent units) are tried together, then all kinds together, then all again with each unit at
a sparsity of its own (:func:`staggered`: units whose widths must match, which torch-pruning did
not join, pass at equal sparsities by chance); only a failing set is bisected, so a model where
everything works pays for one trial per kind and two more. Skipped blocks are verified the same
way, each block alone. Quantization schemes are checked in
:mod:`petra.compress.verify_schemes`.

A unit that fails is withheld, with the first line of its error as the reason.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from petra.candidate import artifact
from petra.compress import landing, masking
from petra.compress.attention import kept_heads, prune_heads
from petra.compress.blocks import skip_blocks
from petra.compress.channel_counts import (
    channel_step,
    conv_groups,
    kept_channels,
    lowest,
    ties,
)
from petra.compress.graph import dependency_graph, pruning_group
from petra.compress.recurrent import gru_layers, prune_units
from petra.compress.structured import channel_groups, check_indices, heads_apart, remove_channels
from petra.compress.trial_failure import failure, train_run
from petra.compress.writers import keep_one_each, writer_spans
from petra.errors import Refused, a_kind
from petra.layers import ATTENTION_TYPE_NAMES, RECURRENT_TYPE_NAMES, protected
from petra.tasks.contract import args, copy_model

if TYPE_CHECKING:
    from torch import nn


#: Why ``space.width``, set in the config, gives no ``prune.width`` gene.
NO_WIDTH = ("no residual stream to narrow: no channel group that two LayerNorms (or RMSNorms) "
            "read and two layers write, verified, with a structured criterion in space.pruning")
#: How a verdict reads when a set fails though each half of it runs.
COMBINATION = "fails only in combination with other pruned layers"
#: How a verdict reads when a unit runs at the sparsity of every other unit, but not at its own.
UNEQUAL = "runs only where other layers lose the same share of their width"
#: Why a channel removal is withheld that computes other than zeroing the same channels.
REDUCED = ("removing channels changes what the kept channels compute: the forward reduces over "
           "the channels outside a layer (a mean, a variance or a softmax over them, a Fourier "
           "transform along them, a weight standardized over its input channels?)")
#: Why a skip that runs alone is withheld where the other units' removals break it.
AROUND = "runs only while the layers around it keep their units"


@dataclass(frozen=True)
class Unit:
    """A structured unit to verify: ``kind`` is ``channels`` (a dependency group, named by its
    root layer), ``heads`` (an attention), ``units`` (a recurrent layer) or ``skip`` (a block);
    ``members`` are the prunable layers (or the block) that lose their genes if it fails."""

    kind: str
    name: str
    members: tuple[str, ...]


def bisect(items: Sequence[Any], trial: Callable[[Sequence[Any]], str | None]) -> dict[Any, str]:
    """The items that fail ``trial`` (None means it ran), each with its reason.

    ``trial`` runs on all items first, then on halves only where a set fails. Where a set
    fails though both its halves run, its items are taken back one at a time, in order, and
    each one whose addition makes the set fail is marked with :data:`COMBINATION`: what is
    left runs together, and no more is withheld than that.
    """
    if not items:
        return {}
    reason = trial(items)
    if reason is None:
        return {}
    if len(items) == 1:
        return {items[0]: reason}
    mid = len(items) // 2
    bad = {**bisect(items[:mid], trial), **bisect(items[mid:], trial)}
    if bad:
        return bad
    kept: list[Any] = []
    for item in items:
        failed = trial([*kept, item])
        if failed is None:
            kept.append(item)
        else:
            bad[item] = f"{COMBINATION} ({failed})"
    # all of them ran this time (a flaky failure): withhold the set, as it failed first
    return bad or {item: f"{COMBINATION} ({reason})" for item in items}


def structured_units(model: nn.Module, example_input: Sequence[Any], layers: Sequence[Any],
                     attention: Sequence[Any], recurrent: Sequence[Any]) -> list[Unit]:
    """The units to verify: the channel groups that hold a structured layer of ``layers``
    (torch-pruning DepGraph), the ``attention`` layers and the ``recurrent`` ones."""
    units = [Unit("heads", a.name, (a.name,)) for a in attention]
    units += [Unit("units", r.name, (r.name,)) for r in recurrent]

    # Channel groups decide the genes of Linear and Conv layers only: an attention or a
    # recurrent layer in a group (torch-pruning follows MHA's embed_dim) has units of its own.
    structured = {layer.name for layer in layers if layer.structured
                  and layer.type not in ATTENTION_TYPE_NAMES + RECURRENT_TYPE_NAMES}
    if not structured:
        return units
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    ignored = [modules[name] for name in protected(layers) if name in modules]
    model.eval()
    graph = dependency_graph(model, args(example_input))
    for group in channel_groups(graph, ignored):
        members = tuple(dict.fromkeys(
            names[dep.target.module] for dep, _ in group
            if graph.is_out_channel_pruning_fn(dep.handler)
            and names.get(dep.target.module) in structured))
        if structured.intersection(members):
            units.append(Unit("channels", names[group[0].dep.target.module], members))
    return units


def staggered(units: Sequence[Unit], top: float) -> dict[Unit, float]:
    """A sparsity for each unit, all different, from a quarter of ``top`` to ``top``, and far
    apart for units next to each other (the golden ratio's sequence): the units' widths differ
    where a search could make them differ."""
    step = (math.sqrt(5) - 1) / 2
    return {u: top * (0.25 + 0.75 * ((i * step) % 1.0)) for i, u in enumerate(units)}


def _apply(model: nn.Module, example_input: Sequence[Any], units: Sequence[Unit], *,
           sparsity: Callable[[Unit], float], round_to: int, attention: Mapping[str, Any],
           recurrent: Mapping[str, Any], blocks: Sequence[Any], mapped: set[str] | None = None,
           masks: list[Any] | None = None, landed: landing.Landings | None = None) -> None:
    """Remove, in place, what each unit loses at its ``sparsity``: skipped blocks, then heads
    and recurrent units, then channel groups (as :class:`petra.candidate.evaluate.Evaluator`
    does). ``masks``, when given, gets what each group's members lose
    (:func:`petra.compress.masking.planned`). ``mapped`` holds the channel units whose bit
    sets were tried, ``landed`` each group's landing verdict (by
    :func:`~petra.compress.landing.landing_key`), across the trials of one verification."""

    skipped = [u.name for u in units if u.kind == "skip"]
    if skipped:
        skip_blocks(model, skipped, blocks)
        if any(u.kind == "units" for u in units):  # a skipped reader's: the layers after
            recurrent = {r.name: r for r in gru_layers(model, example_input)}
    for unit in units:
        if unit.kind == "heads":
            info = attention[unit.name]
            prune_heads(model, info, range(kept_heads(info.heads, sparsity(unit)), info.heads))
        elif unit.kind == "units":
            info = recurrent[unit.name]
            keep = kept_channels(info.hidden, sparsity(unit), round_to)
            prune_units(model, info, list(range(keep)))
    import torch

    roots = [u for u in units if u.kind == "channels"]
    if not roots:
        return
    graph = heads_apart(model, args(example_input), dependency_graph(model, args(example_input)),
                        [model.get_submodule(u.name) for u in roots])
    planned = []  # every group checked on the model before any is removed
    covered: set[int] = set()  # the layers whose output channels a planned group holds
    for unit in roots:
        root = model.get_submodule(unit.name)
        if id(root) in covered or root not in graph.module2node:
            # a skip joined two groups (a Jasper block's): removed once; or it left the layer
            # unread (a skipped decoder's encoder), as a candidate leaves it
            continue
        n = graph.get_out_channels(root)
        whole = pruning_group(graph, root, graph.get_pruner_of_module(root).prune_out_channels,
                              range(n))
        covered.update(id(dep.target.module) for dep, _ in whole
                       if graph.is_out_channel_pruning_fn(dep.handler))
        check_indices(graph, whole)
        runs, block = ties(graph, root)
        keep = kept_channels(n, sparsity(unit), channel_step(whole, round_to, runs, block))
        idxs = lowest(keep_one_each(torch.arange(n, 0, -1, dtype=torch.float),
                                    writer_spans(graph, whole, n)), n - keep,
                      conv_groups(whole, runs), block)
        if not idxs:  # a gene that would change nothing (CBAM: a 1-channel map is the root)
            raise Refused(
                f"removes no channel even at sparsity {sparsity(unit):.2f}: torch-pruning's "
                f"group of these channels is {unit.name}'s, {a_kind(type(root).__name__)} of "
                f"{n} output channel{'s' * (n != 1)}, which keeps at least {keep}")
        planned.append((unit, root, whole, idxs))
    _check_landings(model, example_input, graph, planned, mapped, masks, landed)
    for _, root, _, idxs in planned:
        remove_channels(graph, root, idxs)


def _check_landings(model: nn.Module, example_input: Sequence[Any], graph: Any,
                    planned: Sequence[tuple[Unit, nn.Module, Any, list[int]]],
                    mapped: set[str] | None, masks: list[Any] | None,
                    landed: landing.Landings | None) -> None:
    """:func:`~petra.compress.landing.check_landing` on each planned group (unit, root, group,
    channels removed) through ``landed``; ``mapped`` and ``masks`` as in :func:`_apply`."""
    landed = landing.Landings() if landed is None else landed
    names = {id(t): n for n, t in [*model.named_modules(), *model.named_parameters()]}
    keys = [landing.landing_key(whole, names, idxs) for _, _, whole, idxs in planned]
    bits = [mapped is not None and unit.name not in mapped and landing.moves_channels(whole)
            for unit, _, whole, _ in planned]
    dense = landing.reader_inputs(model, example_input, graph, [
        p[2] for p, key, bit in zip(planned, keys, bits, strict=True) if landed.new(key, bit)])
    for (unit, _, whole, idxs), key, bit in zip(planned, keys, bits, strict=True):
        landed.check(key, bit, functools.partial(
            landing.check_landing, model, example_input, graph, whole, idxs, dense, bits=bit))
        if mapped is not None:
            mapped.add(unit.name)  # its bit sets are tried once per verification
        if masks is not None:
            masks += masking.planned(graph, whole, idxs)


def _runs(model: nn.Module, example_input: Sequence[Any],
          change: Callable[[nn.Module], Any], twin: Callable[[nn.Module], Any] | None = None,
          masks: Sequence[Any] = (), dense_trains: Callable[[], Any] | None = None
          ) -> str | None:
    """Why a copy of ``model`` that ``change`` changed in place fails to run the example (in
    eval mode, and in train mode where ``model`` runs so, returning what it returns there:
    ``dense_trains``, memoized by the caller) or to export to ONNX, or None where it does all
    three. With ``masks`` (what ``change`` removed of its channel groups), also where it
    computes other than a copy that ``twin`` changed, with those channels zeroed
    (:mod:`petra.compress.masking`)."""
    import torch

    candidate = copy_model(model).eval()
    try:
        change(candidate)
        with torch.no_grad():
            got = candidate(*args(example_input))
        artifact.export_onnx(candidate, args(example_input))
    except Exception as exc:  # noqa: BLE001 - any failure withholds what was tried
        return failure(exc, candidate)
    if masks and twin is not None and isinstance(got, torch.Tensor):
        try:  # a twin petra cannot mask as it removed is not compared
            twin(other := copy_model(model).eval())
            want = masking.masked_output(other, example_input, masks, candidate)
        except Exception:  # noqa: BLE001
            want = None
        if want is not None and want.shape == got.shape and not torch.allclose(
                got, want, rtol=1e-3, atol=1e-4 * (float(want.abs().max()) or 1.0)):
            return (f"{REDUCED} (the output moves by {float((got - want).abs().max()):.3g} "
                    "against the model with those channels zeroed)")
    # last, on the candidate itself: a forward in train mode may update a buffer in place
    if isinstance(dense := (dense_trains or _dense_trains(model, example_input))(), tuple):
        if isinstance(ran := train_run(candidate, example_input), BaseException):
            return f"in train mode, as a fine-tune runs it: {failure(ran, candidate)}"
        if ran != dense:  # an auxiliary head's output, returned in training only
            return (f"in train mode, as a fine-tune runs it, the model returns shapes {ran} "
                    f"where the dense model returns {dense}: these channels are part of what "
                    "it returns in training (a deep-supervision head's?)")
    return None


def _dense_trains(model: nn.Module, example_input: Sequence[Any]) -> Callable[[], Any]:
    """What a copy of the dense ``model`` returns in train mode (:func:`train_run`), asked
    once, when first asked: the train-mode check blames a change only where the dense model
    trains, and compares what the candidate returns with it."""
    return functools.cache(lambda: train_run(copy_model(model), example_input))


def verify_structure(model: nn.Module, example_input: Sequence[Any], units: Sequence[Unit], *,
                     sparsity: float, round_to: int,
                     attention: Sequence[Any] = (), recurrent: Sequence[Any] = (),
                     blocks: Sequence[Any] = ()) -> dict[Unit, str]:
    """The units whose largest removal fails to run or to export, each with the reason.

    Args:
        model: the model (left unchanged; each trial works on a copy).
        example_input: the canonical example inputs (a tuple of tensors).
        units: from :func:`structured_units`.
        sparsity: the space's largest sparsity.
        round_to: the smallest channel multiple the space offers (the most removed).
        attention, recurrent, blocks: the infos of the ``heads``, ``units`` and ``skip``
            units.
    """
    by_name = {"attention": {a.name: a for a in attention},
               "recurrent": {r.name: r for r in recurrent}}
    mapped: set[str] = set()  # the channel units whose landing was checked in full
    landed = landing.Landings()  # each group's landing verdict, across the trials
    dense_trains = _dense_trains(model, example_input)

    def trial(subset: Sequence[Unit], level: Callable[[Unit], float] = lambda _: sparsity,
              ) -> str | None:
        masks: list[Any] = []  # what the channel groups lose, zeroed on a twin to compare

        def change(candidate: nn.Module, units: Sequence[Unit] = subset) -> None:
            _apply(candidate, example_input, units, sparsity=level, round_to=round_to,
                   attention=by_name["attention"], recurrent=by_name["recurrent"],
                   blocks=blocks, mapped=mapped, masks=masks if units is subset else None,
                   landed=landed)

        return _runs(model, example_input, change, lambda twin: change(
            twin, [u for u in subset if u.kind != "channels"]), masks, dense_trains)

    # A skipped block takes its layers with it, and an outer skipped block its inner ones: each
    # block is verified alone (skipping nn.TransformerEncoder's first layer fails, as the stack
    # reads that layer's self_attn, while skipping the whole stack runs).
    # Each kind alone first (a channel group may run only while the attention it feeds was
    # rebuilt by a head removal: alone, it fails), then what is left of all kinds together.
    failed: dict[Unit, str] = {}
    kinds = list(dict.fromkeys(u.kind for u in units if u.kind != "skip"))
    for kind in kinds:
        failed.update(bisect([u for u in units if u.kind == kind], trial))
    if len(kinds) > 1:
        failed.update(bisect([u for u in units if u.kind != "skip" and u not in failed], trial))
    # At one sparsity everywhere, two units whose widths must match, and which torch-pruning
    # did not join, lose the same count and pass by chance: a WaveNet's last ``res`` conv,
    # before its unread sum was traced, and a branch read through ``detach()``. The units left
    # are tried once more, each at a sparsity of its own.
    rest = [u for u in units if u.kind != "skip" and u not in failed]
    if len(rest) > 1:
        levels = staggered(rest, sparsity)
        failed.update({u: f"{UNEQUAL} ({reason})" for u, reason in bisect(
            rest, lambda subset: trial(subset, levels.__getitem__)).items()})
    return {**failed, **_skips(units, failed, trial)}


def _skips(units: Sequence[Unit], failed: Mapping[Unit, str],
           trial: Callable[[Sequence[Unit]], str | None]) -> dict[Unit, str]:
    """The skip units that fail, each tried with every other unit that passed (skipping
    SqueezeBERT's post-attention conv joins its values to the stream, which prune.width then
    cut), and alone where that fails."""
    out = {}
    for unit in (u for u in units if u.kind == "skip"):
        around = _around(unit, [u for u in units if u.kind != "skip" and u not in failed])
        if around and (together := trial([unit, *around])) is None:
            continue
        if (reason := trial([unit])) is not None:
            out[unit] = reason
        elif around:
            out[unit] = f"{AROUND} ({together})"
    return out


def _around(block: Unit, units: Sequence[Unit]) -> list[Unit]:
    """``units`` less those wholly inside ``block``, a channel group re-rooted at its first
    member outside it: what a candidate that skips the block may still remove."""
    def outside(name: str) -> bool:
        return name != block.name and not name.startswith(f"{block.name}.")

    return [Unit(u.kind, root, u.members) for u in units
            if (root := next((m for m in (u.name, *u.members) if outside(m)), None))]


#: The energy of :func:`verify_lowrank`'s trial: rank 1, whatever the spectrum. At the least
#: energy a space keeps, an untrained WavLM's 32x2 position-bias table kept its rank and was
#: not factorized, so the trial passed; trained, it was, and every such candidate failed.
RANK_ONE = 1e-9


def verify_lowrank(model: nn.Module, example_input: Sequence[Any], names: Sequence[str],
                   methods: Sequence[str], energy: float = RANK_ONE) -> dict[str, str]:
    """The layers whose low-rank factorization (by the first of ``methods``, at ``energy``:
    rank 1, so every layer a factorization could save on is factorized) fails to run or to
    export, each with the reason: a model that reads the layer's attributes (Whisper sizes its
    positions by ``embed_positions.num_embeddings``) fails on the thin layers."""
    from petra.compress.lowrank import factorize

    if not methods:
        return {}

    dense_trains = _dense_trains(model, example_input)

    def trial(subset: Sequence[str]) -> str | None:
        return _runs(model, example_input, lambda candidate: factorize(
            candidate, {name: methods[0] for name in subset}, energy=energy),
            dense_trains=dense_trains)

    return {name: f"{methods[0]}: " + (f"the model reads the layer's `{attr.group(1)}` itself, "
                                        f"which its factors (two thin layers) lack ({why})"
                                        if (attr := _ATTRIBUTE.search(why)) else why)
            for name, why in bisect(list(names), trial).items()}


#: A factorized layer's attribute read by the model (torch's TransformerEncoderLayer reads
#: ``linear2.weight``): ``'Sequential' object has no attribute 'weight'``.
_ATTRIBUTE = re.compile(r"'Sequential' object has no attribute '(\w+)'")


def why_no_width(layers: Sequence[Any], failed: Mapping[str, str]) -> str:
    """Why the ``prune.width`` that the config asks for is not offered: where the writers of
    the model's residual streams were found but failed their checks (a Segformer's, whose
    stages reshape to the widths in its config), it names them, not "no residual stream"."""
    writers = [x.name for x in layers if x.residual and x.name in failed]
    if not writers:
        return NO_WIDTH
    more = f" and {len(writers) - 3} more" if len(writers) > 3 else ""
    return ("the writers of its residual streams fail the structure checks (withheld: "
            f"{', '.join(writers[:3])}{more})")
