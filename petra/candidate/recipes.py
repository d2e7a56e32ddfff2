"""Recipes: what a genome means, and the recipes petra proposes by hand.

- :class:`Recipe`: a genome decoded into compression steps, what a worker carries out;
- :func:`seed_recipes` and :data:`SEED_SHARE`: the hand-style recipes of a search's first
  generation;
- :func:`structured_method` and :func:`grid_points`: the by-hand baseline's recipes (the
  ``grid`` strategy).

This is the one place outside the registries where method names are spelled: the recipes a
competent engineer would try first name their methods.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from petra.genes import DECLARED, absent
from petra.registry import PRUNING
from petra.space import STATIC_GENES, Genome, SearchSpace, inside, skipped_blocks


@dataclass
class Recipe:
    """A genome decoded into compression steps.

    The fields of the genes petra reads itself take their defaults from the declarations
    (:data:`petra.genes.DECLARED`): a genome without one means no compression there. The genes
    that a method declares (registry metadata ``genes``) go to ``params`` by name, and the
    method reads them with its own defaults.
    """

    layers: dict[str, tuple[str, float]] = field(default_factory=dict)
    round_to: int = absent("prune.round_to")
    width: float = absent("prune.width")  # the share of the residual stream's channels removed
    width_method: str = absent("prune.width_method")
    energy: float = absent("lowrank.energy")
    quant: str = absent("quant.scheme")
    static: dict[str, Any] = field(default_factory=dict)  # StaticOptions' fields
    reg: str = absent("reg.kind")
    reg_strength: float = absent("reg.strength")
    params: dict[str, Any] = field(default_factory=dict)  # the methods' own genes
    epochs: int = absent("finetune.epochs")
    lr: float = absent("finetune.lr")
    sparsity_rule: str = absent("prune.sparsity_rule")
    emp_beta: float = absent("prune.emp_beta")
    emp_scope: str = absent("prune.emp_scope")
    rank_rule: str = absent("lowrank.rank_rule")
    skip: tuple[str, ...] = ()

    @classmethod
    def from_genome(cls, genome: Mapping[str, Any]) -> Recipe:
        recipe = cls(**{d.field: d.cast(genome[d.name]) for d in DECLARED.values()
                        if d.name in genome})
        recipe.static = {k[len("quant."):]: genome[k] for k in STATIC_GENES if k in genome}
        recipe.params = {k: v for k, v in genome.items() if k not in DECLARED
                         and k not in STATIC_GENES and not k.startswith(("layers.", "blocks."))}
        recipe.skip = tuple(sorted(skipped_blocks(genome)))
        automatic = recipe.sparsity_rule != "fixed"
        for key, method in genome.items():
            if key.startswith("layers.") and key.endswith(".method"):
                name = key[len("layers."):-len(".method")]
                sparsity = float(genome.get(f"layers.{name}.sparsity", 0.0))
                uses_sparsity = method in PRUNING and PRUNING.get(method).meta.get(
                    "uses_sparsity", True)
                if method != "none" and not inside(name, recipe.skip) and (
                        sparsity > 0 or not uses_sparsity or automatic):
                    recipe.layers[name] = (str(method), sparsity)
        return recipe

    def sparsity(self) -> Any:
        """The sparsity rule of this recipe; None for the fixed sparsity genes."""
        from petra.compress.sparsity import SparsityRule

        if self.sparsity_rule == "fixed":
            return None
        return SparsityRule(self.sparsity_rule, self.emp_beta, self.emp_scope)

    def structured_plan(self, residual: Sequence[str]) -> dict[str, tuple[str, float]]:
        """The channel-pruning plan: the layers with a structured method, and, with a
        ``width``, the writers of the residual stream (``residual``, the hidden size's group)
        voting it with ``width_method``. Layers of skipped blocks are left out."""
        plan = self.of_kind("structured")
        if self.width > 0:
            plan.update({name: (self.width_method, self.width) for name in residual
                         if not inside(name, self.skip)})
        return plan

    def of_kind(self, kind: str) -> dict[str, tuple[str, float]]:
        """The layers whose method is of registry ``kind`` (structured, lowrank, unstructured)."""
        return {n: v for n, v in self.layers.items()
                if PRUNING.get(v[0]).meta.get("kind", "unstructured") == kind}



#: The share of the first generation that seed recipes may fill; random genomes fill the rest.
SEED_SHARE = 0.75


def seed_recipes(space: SearchSpace) -> list[dict[str, Any]]:
    """Sensible hand-style recipes for the first generation, restricted to the space.

    Every recipe removes channels (or GRU units) with the space's structured criterion (see
    :func:`structured_method`) and gets the longest fine-tune, with
    distillation where the space offers it. In order (the loop takes the first
    ``SEED_SHARE × population``; random genomes fill the rest):

    1. half the channels (heads, units) of every layer, rounded to 8, int8 (dynamic for
       attention and LSTM models, see :func:`_int8_scheme`): the by-hand grid's best point;
    2. every other skippable block skipped (the first, third, ...), half the channels of every
       other layer, rounded to 16, int8;
    3. 30% of the channels, int8: the accurate end;
    4. three quarters of the channels, int4 weights: the smallest artifacts;
    5. recipe 2 in fp16: the fastest kind of member on digits_cnn's tuning seeds;
    6. 65% of the channels, int8.

    Measured on benchmarks/front_quality.py, these raised petra's hypervolume by 2–6% per
    task over the earlier seeds, which kept int8 alone (no fine-tune) and left the grid's best
    point out. A gene the space lacks, or a value it does not offer, is left out of a recipe.
    """
    def offered(genes: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in genes.items() if space.offers(k, v)}

    fine_tune = seed_finetune(space)
    blocks = [b.name for b in getattr(space, "blocks", ())]
    alternate = tuple(b for b in blocks[0::2] if f"blocks.{b}.skip" in space)

    def recipe(sparsity: float, quant: str, round_to: int = 8,
               skipped: tuple[str, ...] = ()) -> dict[str, Any]:
        genome = {f"blocks.{b}.skip": True for b in skipped}
        for layer in space.layers:
            method = structured_method(space, layer.name)
            if method is not None and not inside(layer.name, skipped):
                genome[f"layers.{layer.name}.method"] = method
                genome[f"layers.{layer.name}.sparsity"] = sparsity
        return {**genome, **offered({"prune.round_to": round_to, "quant.scheme": quant}),
                **fine_tune}

    int8 = _int8_scheme(space)
    return space.distinct([
        recipe(0.5, int8),
        recipe(0.5, int8, 16, alternate),
        recipe(0.3, int8),
        recipe(0.75, "int4_weight"),
        recipe(0.5, "fp16", 16, alternate),
        recipe(0.65, int8),
    ])


#: Layer types whose int8 is dynamic: static int8 kept a MiniLM-shaped encoder's cosine at 0.44
#: (0.94 on MatMuls alone) against 0.992 dynamic (STACK.md), and ORT quantizes an LSTM only
#: dynamically (DynamicQuantizeLSTM: latency 0.39-0.49 of fp32 on hidden 128-256).
DYNAMIC_INT8_TYPES = ("Attention", "MultiheadAttention", "LSTM")


def _int8_scheme(space: SearchSpace) -> str:
    """The int8 scheme of the seed recipes: ``int8_dynamic`` for a model with attention or
    LSTM layers, where the space offers it; ``int8_static`` otherwise (CNNs, MLPs, GRUs)."""
    sequence = any(layer.type in DYNAMIC_INT8_TYPES for layer in space.layers)
    return "int8_dynamic" if sequence and space.offers("quant.scheme", "int8_dynamic") \
        else "int8_static"



#: Structured criteria, in the order the grid prefers them.
PREFERRED = ("l2_channel", "l1_channel", "fpgm", "bn_scale", "taylor", "l2_units")
#: The grid's quantization: fp32 and int8.
QUANT = ("none", "int8_static")


def structured_method(space: SearchSpace, layer: str) -> str | None:
    """The structured criterion a by-hand recipe uses on ``layer``: the first of
    :data:`PREFERRED` that the space offers there, else any structured one, else None."""
    choices = space.structured.get(layer, ())
    return next((m for m in PREFERRED if m in choices), choices[0] if choices else None)


#: The seed recipes' fine-tune lr, clipped to the space's range, unless a search's probe
#: (:mod:`petra.candidate.lr_probe`) found the model needs a lower one.
DEFAULT_SEED_LR = 5e-3


def seed_finetune(space: SearchSpace) -> dict[str, Any]:
    """The fine-tune of the seed recipes, and of the by-hand grid, so that the two differ only
    in their compression: the space's longest fine-tune, at ``space.seed_lr`` where a probe set
    it (:mod:`petra.candidate.lr_probe`), else :data:`DEFAULT_SEED_LR` (both clipped to the
    space's range), with distillation (alpha 0.5, temperature 4) where the space offers it."""
    genes = {k: v for k, v in {"reg.kind": "kd", "reg.kd_alpha": 0.5,
                                "reg.kd_temperature": 4.0}.items() if space.offers(k, v)}
    if "finetune.epochs" in space:
        genes["finetune.epochs"] = space.gene("finetune.epochs").high
    if "finetune.lr" in space:
        lr = space.seed_lr if space.seed_lr is not None else DEFAULT_SEED_LR
        genes["finetune.lr"] = space.gene("finetune.lr").clip(lr)
    return genes


def grid_points(space: SearchSpace, budget: int) -> list[Genome]:
    """The by-hand baseline's recipes (:mod:`petra.engine.strategies.grid`): one structured ratio on
    every layer × {fp32, int8_static}, the seed recipes' fine-tune (:func:`seed_finetune`),
    channels rounded to 8, about ``budget`` points over the space's sparsity range."""
    quants = [q for q in QUANT if space.offers("quant.scheme", q)] or [None]
    methods: dict[str, str] = {}
    high = 0.0
    for layer in space.layers:
        method = structured_method(space, layer.name)
        if method is not None:
            methods[layer.name] = method
            high = max(high, getattr(space.gene(f"layers.{layer.name}.sparsity"), "high", 0.0))
    extra = seed_finetune(space)
    if space.offers("prune.round_to", 8):
        extra["prune.round_to"] = 8
    n_ratios = max(1, math.ceil(budget / len(quants))) if methods else 1
    ratios = np.linspace(0.0, high, n_ratios) if n_ratios > 1 else np.array([0.0])
    def points() -> Iterable[dict[str, Any]]:
        for ratio in ratios:
            for quant in quants:
                partial = dict(extra)
                if quant is not None:
                    partial["quant.scheme"] = quant
                for layer, method in methods.items():
                    if ratio > 0:
                        partial[f"layers.{layer}.method"] = method
                        partial[f"layers.{layer}.sparsity"] = float(ratio)
                yield partial

    return space.distinct(points())


def layer_sparsity(recipe: Recipe, model: Any, dense: Any,
                   masks: Mapping[str, Any]) -> dict[str, float]:
    """The sparsity each layer of the recipe ended with, whatever rule chose it: the share of
    output channels it lost (structured, coupled layers included), of weights its mask zeroes
    (unstructured), or of weights its factors saved (low-rank: 0 where they would not have
    paid, and the layer was left whole)."""
    from torch import nn

    out = {}
    modules, before = dict(model.named_modules()), dict(dense.named_modules())

    def width(module: Any) -> int | None:
        if hasattr(module, "hidden_size"):
            return int(module.hidden_size)
        return int(module.weight.shape[0]) if hasattr(module, "weight") else None

    for name in {**recipe.of_kind("structured"), **recipe.of_kind("recurrent")}:
        layer, original = modules.get(name), before.get(name)
        if layer is not None and original is not None and width(layer) and width(original):
            out[name] = 1.0 - width(layer) / width(original)
    for name in recipe.of_kind("lowrank"):
        layer, original = modules.get(name), before.get(name)
        if layer is not None and original is not None:
            factored = isinstance(layer, nn.Sequential) and not isinstance(original, nn.Sequential)
            out[name] = 1.0 - _count(layer) / _count(original) if factored else 0.0
    for key, mask in masks.items():
        out[key[: -len(".weight")]] = float(1.0 - mask.float().mean())
    return {k: round(v, 6) for k, v in sorted(out.items())}


def _count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())
