"""Gene types, and the search space decoded against a model's own prunable layers.

A genome is a plain ``dict`` from stable dotted gene names to values:

    layers.<module>.method    categorical, the pruning criterion of that layer
    layers.<module>.sparsity  float, the fraction of weights (or output channels) removed
    prune.round_to            categorical, kept channel counts are rounded to this multiple
    prune.sparsity_rule       categorical, fixed (the sparsity genes) or auto_emp (EMP), with
    prune.emp_beta, prune.emp_scope
    prune.eq_beta, prune.eq_gamma   float, the equilibrium criterion's utility weights
    lowrank.energy, lowrank.rank_rule   the SVD rank: by energy, or by the MP edge (mp)
    quant.scheme              categorical
    reg.kind, reg.strength    categorical, float (log scale)
    finetune.epochs           int
    finetune.lr               float (log scale)

Workers receive these dicts, never strategy objects. The defaults of every gene mean
"no compression", so a partial genome is completed with :meth:`SearchSpace.complete`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Genome = dict[str, Any]


@dataclass(frozen=True)
class Categorical:
    """A gene that takes one of ``choices``. Mutates by reset, crosses uniformly."""

    name: str
    choices: tuple[Any, ...]
    default: Any

    kind = "categorical"

    def sample(self, rng: np.random.Generator) -> Any:
        return self.choices[int(rng.integers(len(self.choices)))]

    def clip(self, value: Any) -> Any:
        if value not in self.choices:
            raise ValueError(
                f"gene {self.name} must be one of {list(self.choices)}; got {value!r}"
            )
        return value

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "choices": list(self.choices),
                "default": self.default}


@dataclass(frozen=True)
class Float:
    """A real gene in ``[low, high]``; SBX crossover and polynomial mutation within bounds.

    ``log`` genes are sampled log-uniformly. Values are rounded to ``step`` (linear genes) or
    to ``digits`` significant digits (log genes) so that equal recipes hash equally.
    """

    name: str
    low: float
    high: float
    default: float
    log: bool = False
    step: float | None = None
    digits: int = 3

    kind = "float"

    def sample(self, rng: np.random.Generator) -> float:
        if self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = float(rng.uniform(self.low, self.high))
        return self.clip(value)

    def clip(self, value: Any) -> float:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"gene {self.name} must be a number; got {value!r}") from None
        if math.isnan(value):
            raise ValueError(f"gene {self.name} must be a number; got nan")
        value = min(max(value, self.low), self.high)
        if self.log:
            if value > 0:
                value = float(f"{value:.{self.digits}g}")
        elif self.step:
            value = round(round(value / self.step) * self.step, 10)
        return min(max(value, self.low), self.high)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "low": self.low, "high": self.high,
                "default": self.default, "log": self.log}


@dataclass(frozen=True)
class Int:
    """An integer gene in ``[low, high]``, varied like a real gene and rounded."""

    name: str
    low: int
    high: int
    default: int

    kind = "int"

    def sample(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.low, self.high + 1))

    def clip(self, value: Any) -> int:
        try:
            value = int(round(float(value)))
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"gene {self.name} must be an integer; got {value!r}") from None
        return min(max(value, self.low), self.high)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "low": self.low, "high": self.high,
                "default": self.default}


Gene = Categorical | Float | Int


@dataclass(frozen=True)
class LayerInfo:
    """A prunable layer of the model, as found by :func:`prunable_layers`."""

    name: str
    type: str
    out_channels: int
    params: int
    structured: bool  # False for layers whose outputs are the model's outputs


PRUNABLE_TYPES = ("Linear", "Conv1d", "Conv2d")
# PETRA's low-rank energy thresholds (METHODS.md).
LOWRANK_ENERGIES = (0.9, 0.95, 0.99, 0.999)


def prunable_layers(model: Any, example_input: Any) -> list[LayerInfo]:
    """The model's prunable layers in execution order.

    A layer whose output is the model's output (the classifier) keeps its output channels, and
    so does a layer whose channels torch-pruning cannot follow (e.g. into an ``nn.GRU``):
    structured criteria are not offered for them.
    """
    import torch
    from torch import nn

    types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.GRU)
    order: list[str] = []
    outputs: dict[str, Any] = {}
    names = {m: n for n, m in model.named_modules()}
    hooks = []
    for module in model.modules():
        if isinstance(module, types):

            def hook(mod: Any, _inp: Any, out: Any) -> None:
                order.append(names[mod])
                outputs[names[mod]] = out[0] if isinstance(out, tuple) else out  # a GRU's

            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            result = model(example_input)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    from petra.compress.recurrent import gru_layers
    from petra.compress.structured import structured_layers

    capable = structured_layers(model, example_input)
    capable |= {g.name for g in gru_layers(model, example_input)}
    modules = dict(model.named_modules())
    seen: list[str] = []
    for name in order:
        if name not in seen:
            seen.append(name)
    infos = []
    for name in seen:
        module = modules[name]
        if isinstance(module, nn.GRU):
            out_channels = module.hidden_size
        else:
            out_channels = (module.out_features if isinstance(module, nn.Linear)
                            else module.out_channels)
        is_output = outputs[name] is result or (
            isinstance(result, torch.Tensor) and outputs[name].shape == result.shape
            and name == seen[-1]
        )
        grouped = getattr(module, "groups", 1) != 1
        infos.append(
            LayerInfo(
                name=name,
                type=type(module).__name__,
                out_channels=int(out_channels),
                params=sum(p.numel() for p in module.parameters()),
                structured=not is_output and not grouped and name in capable,
            )
        )
    return infos


def select_layers(
    layers: Sequence[LayerInfo], include: Sequence[str], exclude: Sequence[str]
) -> list[LayerInfo]:
    """The layers whose names match an ``include`` glob and no ``exclude`` glob."""
    return [
        layer
        for layer in layers
        if any(fnmatch.fnmatchcase(layer.name, p) for p in include)
        and not any(fnmatch.fnmatchcase(layer.name, p) for p in exclude)
    ]


def check_globs(layers: Sequence[LayerInfo], include: Sequence[str],
                exclude: Sequence[str]) -> None:
    """Every glob must match a prunable layer (a glob that matches none is a typo).

    Raises:
        petra.config.ConfigError: naming the glob's field, the glob and the model's layers.
    """
    from petra.config import ConfigError

    names = [layer.name for layer in layers]
    for key, globs in (("include", include), ("exclude", exclude)):
        for i, pattern in enumerate(globs):
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                shown = ", ".join(names[:40]) + (" ..." if len(names) > 40 else "")
                raise ConfigError(f"space.layers.{key}[{i}]", pattern, "", (
                    f"{pattern!r} matches no prunable layer of the model; its layers are "
                    f"{shown or '(none)'}"))


def skipped_blocks(genome: Mapping[str, Any]) -> list[str]:
    """The blocks a genome skips (its ``blocks.<name>.skip`` genes that are true), in order."""
    return [k[len("blocks."):-len(".skip")] for k, v in genome.items()
            if k.startswith("blocks.") and k.endswith(".skip") and v in (True, "True")]


def inside(layer: str, skipped: Iterable[str]) -> bool:
    """Whether ``layer`` is a skipped block or sits inside one."""
    return any(layer == s or layer.startswith(s + ".") for s in skipped)


class SearchSpace:
    """An ordered set of genes, with the layers they were decoded from."""

    def __init__(self, genes: Sequence[Gene], *, layers: Sequence[LayerInfo] = (),
                 blocks: Sequence[Any] = ()) -> None:
        names = [g.name for g in genes]
        if len(set(names)) != len(names):
            raise ValueError("gene names must be unique")
        self.genes: tuple[Gene, ...] = tuple(genes)
        self.layers: tuple[LayerInfo, ...] = tuple(layers)
        self.blocks: tuple[Any, ...] = tuple(blocks)
        self._by_name = {g.name: g for g in self.genes}

    def __iter__(self) -> Iterator[Gene]:
        return iter(self.genes)

    def __len__(self) -> int:
        return len(self.genes)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def gene(self, name: str) -> Gene:
        try:
            return self._by_name[name]
        except KeyError:
            raise ValueError(
                f"unknown gene {name!r}; the space has {', '.join(self._by_name)}"
            ) from None

    def offers(self, name: str, value: Any) -> bool:
        """Whether gene ``name`` exists and may take ``value`` (any value, for a range gene)."""
        return name in self._by_name and value in getattr(self._by_name[name], "choices",
                                                          (value,))

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def default(self) -> Genome:
        return {g.name: g.default for g in self.genes}

    def sample(self, rng: np.random.Generator) -> Genome:
        return {g.name: g.sample(rng) for g in self.genes}

    def distinct(self, partials: Iterable[Mapping[str, Any]], seen: set[str] | None = None,
                 limit: int | None = None) -> list[Genome]:
        """``partials`` completed, in order, less those whose hash is in ``seen`` or repeats;
        at most ``limit`` of them. The hashes kept are added to ``seen``."""
        seen = set() if seen is None else seen
        out: list[Genome] = []
        for partial in partials:
            if limit is not None and len(out) >= limit:
                break
            genome = self.complete(partial)
            key = self.genome_hash(genome)
            if key not in seen:
                seen.add(key)
                out.append(genome)
        return out

    def complete(self, partial: Mapping[str, Any]) -> Genome:
        """Validate ``partial`` and fill the genes it leaves out with their defaults."""
        unknown = [k for k in partial if k not in self._by_name]
        if unknown:
            raise ValueError(
                f"unknown gene {unknown[0]!r}; the space has {', '.join(self._by_name)}"
            )
        return {g.name: g.clip(partial.get(g.name, g.default)) for g in self.genes}

    def effective(self, genome: Mapping[str, Any]) -> Genome:
        """The genome with genes that have no effect reset to their defaults.

        Two genomes with the same effective form build the same model, so they share a hash.
        """
        from petra.registry import PRUNING

        out = self.complete(genome)
        kinds, methods = set(), set()
        automatic = out.get("prune.sparsity_rule", "fixed") != "fixed"
        skipped = skipped_blocks(out)
        for layer in self.layers:
            method, sparsity = f"layers.{layer.name}.method", f"layers.{layer.name}.sparsity"
            if method not in out:
                continue
            if inside(layer.name, skipped):
                out[method] = "none"  # the layer left the model with its block
            meta = PRUNING.get(out[method]).meta if out[method] in PRUNING else {}
            uses_sparsity = meta.get("uses_sparsity", True)
            if out[method] == "none" or (
                    uses_sparsity and not automatic and out.get(sparsity, 0.0) == 0.0):
                out[method] = "none"
            else:
                kinds.add(meta.get("kind", "unstructured"))
                methods.add(out[method])
            if out[method] == "none" or not uses_sparsity or automatic:
                out[sparsity] = self._by_name[sparsity].default
        if not automatic or not methods:
            for name in ("prune.emp_beta", "prune.emp_scope"):
                if name in out:
                    out[name] = self._by_name[name].default
        if "equilibrium" not in methods:
            for name in ("prune.eq_beta", "prune.eq_gamma"):
                if name in out:
                    out[name] = self._by_name[name].default
        for gene, used in (("prune.round_to", {"structured", "recurrent"}),
                           ("lowrank.energy", {"lowrank"}), ("lowrank.rank_rule", {"lowrank"})):
            if gene in out and not kinds & used:
                out[gene] = self._by_name[gene].default
        if out.get("lowrank.rank_rule", "energy") != "energy" and "lowrank.energy" in out:
            out["lowrank.energy"] = self._by_name["lowrank.energy"].default
        if out.get("finetune.epochs", 0) == 0:
            for name in out:
                if name == "finetune.lr" or name.startswith("reg."):
                    out[name] = self._by_name[name].default
        if out.get("reg.kind", "none") == "none" and "reg.strength" in out:
            out["reg.strength"] = self._by_name["reg.strength"].default
        if out.get("reg.kind") != "kd":
            for name in out:
                if name.startswith("reg.kd_"):
                    out[name] = self._by_name[name].default
        return out

    def genome_hash(self, genome: Mapping[str, Any]) -> str:
        """A short stable hash of the effective genome."""
        payload = json.dumps(self.effective(genome), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def describe(self) -> list[dict[str, Any]]:
        return [g.describe() for g in self.genes]


def summarize(genome: Mapping[str, Any]) -> str:
    """A one-line recipe: each method with its layer count and mean sparsity, channel
    rounding, quantization, and the fine-tune with its regularizer.

    >>> summarize({"layers.a.method": "l2_channel", "layers.a.sparsity": 0.5,
    ...            "quant.scheme": "int8_static"})
    'l2_channelx1@0.50 int8_static'
    """
    methods: dict[str, list[float]] = {}
    for key, value in genome.items():
        if key.startswith("layers.") and key.endswith(".method") and value != "none":
            methods.setdefault(str(value), []).append(
                float(genome.get(key[: -len(".method")] + ".sparsity", 0.0)))
    parts = [f"{m}x{len(s)}@{sum(s) / len(s):.2f}" for m, s in methods.items()]
    skipped = skipped_blocks(genome)
    if skipped:
        parts.insert(0, f"skip[{','.join(skipped)}]")
    if genome.get("prune.round_to", 1) not in (1, "1") and parts:
        parts.append(f"round{genome['prune.round_to']}")
    if genome.get("quant.scheme", "none") != "none":
        parts.append(str(genome["quant.scheme"]))
    epochs = int(float(genome.get("finetune.epochs", 0) or 0))
    if epochs:
        parts.append(f"ft{epochs}@{float(genome.get('finetune.lr', 0)):.1e}")
        if genome.get("reg.kind") == "kd":
            parts.append(f"kd(alpha={float(genome.get('reg.kd_alpha', 0.5)):g},"
                         f"T={float(genome.get('reg.kd_temperature', 4.0)):g})")
        elif genome.get("reg.kind", "none") != "none":
            parts.append(f"{genome['reg.kind']}={float(genome.get('reg.strength', 0)):.0e}")
    return " ".join(parts) or "dense"


def model_space(space_cfg: Any, model: Any, example_input: Any) -> SearchSpace:
    """The search space of ``model``: its prunable layers and, when ``space.skip_blocks`` is on,
    the blocks it may skip."""
    from petra.compress.blocks import skippable_blocks

    blocks = skippable_blocks(model, example_input) if getattr(
        space_cfg, "skip_blocks", False) else ()
    return build_space(space_cfg, prunable_layers(model, example_input), blocks)


def build_space(space_cfg: Any, layers: Sequence[LayerInfo], blocks: Sequence[Any] = ()
                ) -> SearchSpace:
    """Decode the config's ``space`` section against the model's prunable layers.

    Args:
        space_cfg: the validated ``space`` section of the config (``petra.config.SpaceConfig``).
        layers: the model's prunable layers, from :func:`prunable_layers`.
        blocks: the blocks the model may skip (:func:`petra.compress.blocks.skippable_blocks`);
            each gets a ``blocks.<name>.skip`` gene.
    """
    import petra.compress  # noqa: F401  (fills the registries)
    from petra.registry import PRUNING

    check_globs(layers, space_cfg.layers.include, space_cfg.layers.exclude)
    selected = select_layers(layers, space_cfg.layers.include, space_cfg.layers.exclude)
    lo, hi = space_cfg.sparsity
    genes: list[Gene] = [Categorical(f"blocks.{b.name}.skip", (False, True), False)
                         for b in blocks]
    kinds: set[str] = set()
    for layer in selected:
        recurrent = layer.type == "GRU"
        methods = [
            m for m in space_cfg.pruning
            if (layer.structured or not PRUNING.get(m).meta.get("structured"))
            and (PRUNING.get(m).meta.get("kind") == "recurrent") == recurrent or m == "none"
        ]
        if "none" not in methods:
            methods = ["none", *methods]
        if len(methods) == 1:
            continue
        kinds |= {PRUNING.get(m).meta.get("kind", "unstructured") for m in methods}
        genes.append(Categorical(f"layers.{layer.name}.method", tuple(methods), "none"))
        genes.append(Float(f"layers.{layer.name}.sparsity", lo, hi, lo, step=0.01))
    if kinds & {"structured", "recurrent"}:  # a single choice still travels, to the workers
        genes.append(Categorical("prune.round_to", tuple(space_cfg.round_to), space_cfg.round_to[0]))
    rules = list(getattr(space_cfg, "sparsity_rules", ["fixed"]))
    uses_sparsity = any(
        PRUNING.get(m).meta.get("uses_sparsity", True) for m in space_cfg.pruning if m != "none")
    if genes and uses_sparsity and rules != ["fixed"]:
        genes.append(Categorical("prune.sparsity_rule", tuple(rules), rules[0]))
        b_lo, b_hi = space_cfg.emp_beta
        genes.append(Float("prune.emp_beta", b_lo, b_hi, min(max(1.0, b_lo), b_hi), step=0.05))
        genes.append(Categorical("prune.emp_scope", tuple(space_cfg.emp_scope),
                                 space_cfg.emp_scope[0]))
    if "equilibrium" in space_cfg.pruning and genes:
        q_lo, q_hi = space_cfg.eq_beta
        genes.append(Float("prune.eq_beta", q_lo, q_hi, _geomean(q_lo, q_hi), log=True))
        g_lo, g_hi = space_cfg.eq_gamma
        genes.append(Float("prune.eq_gamma", g_lo, g_hi, g_lo, step=0.001))
    if "lowrank" in kinds:
        genes.append(Categorical("lowrank.energy", LOWRANK_ENERGIES, 0.99))
        rank_rules = list(getattr(space_cfg, "rank_rules", ["energy"]))
        if rank_rules != ["energy"]:
            genes.append(Categorical("lowrank.rank_rule", tuple(rank_rules), rank_rules[0]))
    if len(space_cfg.quantization) > 1 or space_cfg.quantization[0] != "none":
        genes.append(Categorical("quant.scheme", _with_none(space_cfg.quantization), "none"))
    e_lo, e_hi = space_cfg.finetune.epochs
    if e_hi > 0:
        genes.append(Int("finetune.epochs", e_lo, e_hi, e_lo))
        lr_lo, lr_hi = space_cfg.finetune.lr
        genes.append(Float("finetune.lr", lr_lo, lr_hi, _geomean(lr_lo, lr_hi), log=True))
        if len(space_cfg.regularizer) > 1 or space_cfg.regularizer[0] != "none":
            genes.append(Categorical("reg.kind", _with_none(space_cfg.regularizer), "none"))
            s_lo, s_hi = space_cfg.reg_strength
            genes.append(Float("reg.strength", s_lo, s_hi, _geomean(s_lo, s_hi), log=True))
            if "kd" in space_cfg.regularizer:
                genes.append(Float("reg.kd_alpha", 0.1, 0.9, 0.5, step=0.05))
                genes.append(Categorical("reg.kd_temperature", (1.0, 2.0, 4.0, 8.0), 4.0))
    return SearchSpace(genes, layers=selected, blocks=blocks)


def _with_none(choices: Sequence[str]) -> tuple[str, ...]:
    return tuple(choices) if "none" in choices else ("none", *choices)


def _geomean(lo: float, hi: float) -> float:
    return float(f"{math.sqrt(lo * hi):.3g}")
