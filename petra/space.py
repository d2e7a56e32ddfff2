"""Gene types, and the search space decoded against a model's own prunable layers.

A genome is a plain ``dict`` from stable dotted gene names to values:

    layers.<module>.method    categorical, the pruning criterion of that layer
    layers.<module>.sparsity  float, the fraction of weights (or output channels) removed
    prune.round_to            categorical, kept channel counts are rounded to this multiple
    prune.width, prune.width_method   the share of the residual stream's channels (the hidden
                              size) removed, model-wide, and the structured criterion choosing them
    prune.sparsity_rule       categorical, fixed (the sparsity genes) or auto_emp (EMP), with
    prune.emp_beta, prune.emp_scope
    prune.eq_beta, prune.eq_gamma   float, the equilibrium criterion's utility weights
    lowrank.energy, lowrank.rank_rule   the SVD rank: by energy, or by the MP edge (mp)
    quant.scheme              categorical
    quant.calibration, quant.smooth_alpha, quant.fallback   the static int8 schemes' options
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
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
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
    #: A writer of the residual stream (:func:`petra.compress.structured.channel_layers`): its
    #: output channels are the model's hidden size, searched by the one ``prune.width`` gene.
    residual: bool = False


PRUNABLE_TYPES = ("Linear", "Conv1d", "Conv2d")
#: Recurrent layers whose hidden units a ``recurrent`` criterion removes (petra.compress.recurrent).
RECURRENT_TYPE_NAMES = ("GRU", "LSTM")
#: Attentions whose heads a ``heads`` criterion removes (petra.compress.attention): Hugging Face
#: self-attentions are typed ``Attention``.
ATTENTION_TYPE_NAMES = ("Attention", "MultiheadAttention")
# PETRA's low-rank energy thresholds (METHODS.md).
LOWRANK_ENERGIES = (0.9, 0.95, 0.99, 0.999)


def prunable_layers(model: Any, example_input: Any, *, attention: Sequence[Any] | None = None,
                    recurrent: Sequence[Any] | None = None) -> list[LayerInfo]:
    """The model's prunable layers in execution order.

    A layer whose output is the model's output (the classifier) keeps its output channels, and
    so does a layer whose channels torch-pruning cannot follow (e.g. into an ``nn.GRU``):
    structured criteria are not offered for them. Multi-head attentions whose heads can be
    removed are layers too (type ``Attention`` or ``MultiheadAttention``, one channel a head),
    and so are embeddings (offered low-rank factorization only).

    Args:
        model: the canonical task model (:class:`petra.tasks.contract.TaskModel`).
        example_input: its canonical example inputs.
        attention, recurrent: the model's :func:`~petra.compress.attention.attention_layers`
            and :func:`~petra.compress.recurrent.recurrent_layers`, when already found.
    """
    import torch
    from torch import nn

    from petra.compress.attention import attention_layers
    from petra.compress.recurrent import gru_layers
    from petra.compress.structured import channel_layers
    from petra.tasks.contract import args

    if attention is None:
        attention = attention_layers(model, example_input)
    if recurrent is None:
        recurrent = gru_layers(model, example_input)
    heads = {a.name: a for a in attention}
    RECURRENT_TYPES = tuple(getattr(nn, t) for t in RECURRENT_TYPE_NAMES)
    types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, *RECURRENT_TYPES)
    order: list[str] = []
    outputs: dict[str, Any] = {}
    names = {m: n for n, m in model.named_modules()}
    hooks = []
    for module in model.modules():
        if isinstance(module, types) or names[module] in heads:

            def hook(mod: Any, _inp: Any, out: Any) -> None:
                order.append(names[mod])
                outputs[names[mod]] = out[0] if isinstance(out, tuple) else out  # a GRU's

            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            result = model(*args(example_input))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    capable, residual = channel_layers(model, example_input)
    capable |= {g.name for g in recurrent} | set(heads)
    modules = dict(model.named_modules())
    seen: list[str] = []
    for name in order:
        if name not in seen:
            seen.append(name)
    infos = []
    for name in seen:
        module = modules[name]
        if name in heads:
            out_channels = heads[name].heads
        elif isinstance(module, RECURRENT_TYPES):
            out_channels = module.hidden_size
        elif isinstance(module, nn.Embedding):
            out_channels = module.embedding_dim
        else:
            out_channels = (module.out_features if isinstance(module, nn.Linear)
                            else module.out_channels)
        is_output = outputs[name] is result or (
            isinstance(result, torch.Tensor) and outputs[name].shape == result.shape
            and name == seen[-1]
        )
        # A depthwise conv (groups == in == out channels) loses channels with the conv that
        # feeds it (torch-pruning's depthwise pruner); other grouped convs keep theirs.
        groups = getattr(module, "groups", 1)
        grouped = groups != 1 and not (groups == module.in_channels == module.out_channels)
        kind = type(module).__name__
        if name in heads and kind not in ATTENTION_TYPE_NAMES:
            kind = "Attention"
        infos.append(
            LayerInfo(
                name=name,
                type=kind,
                out_channels=int(out_channels),
                params=sum(p.numel() for p in module.parameters()),
                # an embedding's width is the residual's: channel groups of the Linear layers
                # that share it decide it
                structured=not is_output and not grouped and name in capable
                and not isinstance(module, nn.Embedding),
                residual=name in residual,
            )
        )
    return infos


def protected(layers: Iterable[LayerInfo]) -> list[str]:
    """The layers whose output channels must stay (the classifier, grouped convs that are not
    depthwise, layers torch-pruning cannot follow): channel pruning leaves every group that
    holds one. An
    embedding is not among them: its width is the residual's, which the channel groups of the
    Linear layers that share it decide."""
    return [layer.name for layer in layers if not layer.structured and layer.type != "Embedding"]


def unit_kind(layer: LayerInfo) -> str | None:
    """The method kind that removes units of ``layer`` physically: ``recurrent`` (hidden units),
    ``heads`` (attention heads), ``structured`` (channels), or None where no structured
    removal is offered (the classifier, grouped convs, layers whose removal failed)."""
    if layer.type in RECURRENT_TYPE_NAMES:
        return "recurrent" if layer.structured else None
    if layer.type in ATTENTION_TYPE_NAMES:
        return "heads" if layer.structured else None
    return "structured" if layer.structured else None


def offered(layer: LayerInfo, entry: Any) -> bool:
    """Whether the pruning method ``entry`` (a registry entry) is offered for ``layer``: a
    structured kind only where it is the layer's own :func:`unit_kind`; an unstructured,
    low-rank or trained criterion on Linear and Conv layers."""
    kind = entry.meta.get("kind", "unstructured")
    own = unit_kind(layer)
    if layer.type in RECURRENT_TYPE_NAMES + ATTENTION_TYPE_NAMES:
        return kind == own
    if layer.type == "Embedding":
        return kind == "lowrank"  # a table factorized into a thinner table and a projection
    if kind in ("recurrent", "heads"):
        return False
    if layer.residual and kind == "structured":
        return False  # the hidden size is the one prune.width gene
    return not entry.meta.get("structured") or own == "structured"


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
    from petra.errors import ConfigError

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
                 blocks: Sequence[Any] = (),
                 owners: Mapping[str, tuple[str, str]] | None = None,
                 structured: Mapping[str, tuple[str, ...]] | None = None) -> None:
        names = [g.name for g in genes]
        if len(set(names)) != len(names):
            raise ValueError("gene names must be unique")
        self.genes: tuple[Gene, ...] = tuple(genes)
        self.layers: tuple[LayerInfo, ...] = tuple(layers)
        self.blocks: tuple[Any, ...] = tuple(blocks)
        #: What :func:`model_space` withheld, with why: ``layers.<name>`` (its structured
        #: methods) or ``quant.scheme=<scheme>`` → the first line of the error.
        self.withheld: dict[str, str] = {}
        #: Genes a registry entry declared: gene name → ("pruning" | "regularizer", entry). They
        #: decide nothing unless a layer's method (or ``reg.kind``) is that entry.
        self.owners: dict[str, tuple[str, str]] = dict(owners or {})
        #: Layer name → the methods its gene offers that remove units physically (channels,
        #: heads, hidden units), in the config's order: what a by-hand recipe picks from.
        self.structured: dict[str, tuple[str, ...]] = dict(structured or {})
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
        if float(out.get("prune.width", 0.0)) > 0:
            kinds.add("structured")
        elif "prune.width_method" in out:
            out["prune.width_method"] = self._by_name["prune.width_method"].default
        if not automatic or not methods:
            for name in ("prune.emp_beta", "prune.emp_scope"):
                if name in out:
                    out[name] = self._by_name[name].default
        for gene, used in (("prune.round_to", {"structured", "recurrent"}),
                           ("lowrank.energy", {"lowrank"}), ("lowrank.rank_rule", {"lowrank"})):
            if gene in out and not kinds & used:
                out[gene] = self._by_name[gene].default
        if out.get("lowrank.rank_rule", "energy") != "energy" and "lowrank.energy" in out:
            out["lowrank.energy"] = self._by_name["lowrank.energy"].default
        if not _is_static(out.get("quant.scheme", "none")):
            for name in STATIC_GENES:
                if name in out:
                    out[name] = self._by_name[name].default
        if out.get("finetune.epochs", 0) == 0:
            for name in out:
                if name == "finetune.lr" or name.startswith("reg."):
                    out[name] = self._by_name[name].default
        if out.get("reg.kind", "none") == "none" and "reg.strength" in out:
            out["reg.strength"] = self._by_name["reg.strength"].default
        chosen = {("pruning", m) for m in methods} | {("regularizer", out.get("reg.kind"))}
        for name, owner in self.owners.items():
            if owner not in chosen and name in out:
                out[name] = self._by_name[name].default
        return out

    def genome_hash(self, genome: Mapping[str, Any]) -> str:
        """A short stable hash of the effective genome."""
        payload = json.dumps(self.effective(genome), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def describe(self) -> list[dict[str, Any]]:
        return [g.describe() for g in self.genes]


#: The genes of the static int8 schemes (:func:`static_genes`).
STATIC_GENES = ("quant.calibration", "quant.smooth_alpha", "quant.fallback")


def _is_static(scheme: str) -> bool:
    from petra.registry import QUANTIZATION

    return scheme in QUANTIZATION and bool(QUANTIZATION.get(scheme).meta.get("static"))


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
    if float(genome.get("prune.width", 0.0) or 0.0) > 0:
        parts.append(f"width-{float(genome['prune.width']):.2f}({genome['prune.width_method']})")
    if genome.get("prune.round_to", 1) not in (1, "1") and parts:
        parts.append(f"round{genome['prune.round_to']}")
    if genome.get("quant.scheme", "none") != "none":
        options = [str(genome["quant.calibration"])] if genome.get(
            "quant.calibration", "minmax") != "minmax" else []
        for gene, tag in (("quant.smooth_alpha", "sq"), ("quant.fallback", "float")):
            if float(genome.get(gene, 0.0) or 0.0) > 0:
                options.append(f"{tag}{float(genome[gene]):g}")
        scheme = str(genome["quant.scheme"])
        parts.append(f"{scheme}[{','.join(options)}]" if options else scheme)
    epochs = int(float(genome.get("finetune.epochs", 0) or 0))
    if epochs:
        parts.append(f"ft{epochs}@{float(genome.get('finetune.lr', 0)):.1e}")
        reg = str(genome.get("reg.kind", "none"))
        own = {k[len(f"reg.{reg}_"):]: v for k, v in genome.items()
               if k.startswith(f"reg.{reg}_")}  # the genes it declares, reg.<name>_<param>
        if own:
            parts.append(f"{reg}({','.join(f'{k}={float(v):g}' for k, v in own.items())})")
        elif reg != "none":
            parts.append(f"{genome['reg.kind']}={float(genome.get('reg.strength', 0)):.0e}")
    return " ".join(parts) or "dense"


#: Bump when what :func:`model_space` verifies changes, so cached verdicts are not reused.
VERIFY_VERSION = 2


def model_space(space_cfg: Any, model: Any, example_input: Any, *,
                cache: str | Path | None = None) -> SearchSpace:
    """The search space of ``model``: its prunable layers, the structured genes and the
    quantization schemes that were verified on it (:mod:`petra.compress.verify`), and, when
    ``space.skip_blocks`` is on, the blocks it may skip.

    Args:
        space_cfg: the config's ``space`` section.
        model, example_input: the canonical task model and its example inputs.
        cache: a folder where the verdicts are kept by a hash of the model's architecture and
            the space's bounds; None verifies every time.

    The withheld genes, with their reasons, are in the returned space's ``withheld``.
    """
    import dataclasses

    from petra.compress.attention import attention_layers
    from petra.compress.blocks import skippable_blocks
    from petra.compress.recurrent import gru_layers

    blocks = skippable_blocks(model, example_input) if getattr(
        space_cfg, "skip_blocks", False) else ()
    attention = attention_layers(model, example_input)
    recurrent = gru_layers(model, example_input)
    layers = prunable_layers(model, example_input, attention=attention, recurrent=recurrent)
    verdicts = _verdicts(space_cfg, model, example_input, layers, attention, recurrent, blocks,
                         cache)
    withheld = {f"blocks.{name}.skip": reason for name, reason in verdicts["blocks"].items()}
    blocks = [b for b in blocks if b.name not in verdicts["blocks"]]
    failed_layers = verdicts["layers"]
    layers = [dataclasses.replace(layer, structured=False) if layer.name in failed_layers
              else layer for layer in layers]
    for name, reason in failed_layers.items():
        withheld[f"layers.{name}"] = reason
    for scheme, reason in verdicts["schemes"].items():
        withheld[f"quant.scheme={scheme}"] = reason
    if verdicts["schemes"]:
        kept = [s for s in space_cfg.quantization if s not in verdicts["schemes"]] or ["none"]
        space_cfg = space_cfg.model_copy(update={"quantization": kept})
    space = build_space(space_cfg, layers, blocks)
    space.withheld = withheld
    return space


def _verdicts(space_cfg: Any, model: Any, example_input: Any, layers: Sequence[LayerInfo],
              attention: Sequence[Any], recurrent: Sequence[Any], blocks: Sequence[Any],
              cache: str | Path | None) -> dict[str, dict[str, str]]:
    """``{"layers": {layer: reason}, "blocks": {block: reason}, "schemes": {scheme: reason}}``
    for what fails on ``model``, read from ``cache`` when this model and space were verified
    before."""
    from petra.compress.verify import (
        Unit,
        structured_units,
        verify_schemes,
        verify_structure,
    )
    from petra.registry import PRUNING

    kinds = {PRUNING.get(m).meta.get("kind", "unstructured") for m in space_cfg.pruning}
    selected = {layer.name for layer in select_layers(
        layers, space_cfg.layers.include, space_cfg.layers.exclude)}
    schemes = [s for s in space_cfg.quantization if s != "none"]
    key = _model_key(model, example_input, {
        "kinds": sorted(kinds), "selected": sorted(selected), "schemes": schemes,
        "blocks": [b.name for b in blocks],
        "sparsity": space_cfg.sparsity[1], "round_to": min(space_cfg.round_to),
        "version": VERIFY_VERSION})
    path = Path(cache) / f"verdicts-{key}.json" if cache is not None else None
    if path is not None and path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    units = [u for u in structured_units(
        model, example_input, layers,
        attention if "heads" in kinds else (), recurrent if "recurrent" in kinds else ())
        if (u.kind != "channels" or "structured" in kinds) and selected.intersection(u.members)]
    units += [Unit("skip", b.name, (b.name,)) for b in blocks]
    failed = verify_structure(
        model, example_input, units, sparsity=space_cfg.sparsity[1],
        round_to=min(space_cfg.round_to), attention=attention,
        recurrent=recurrent, blocks=blocks)
    out: dict[str, dict[str, str]] = {"layers": {}, "blocks": {}, "schemes": {}}
    for unit, reason in failed.items():
        if unit.kind == "skip":
            out["blocks"][unit.name] = reason
            continue
        for member in selected.intersection(unit.members):
            out["layers"][member] = reason
    if schemes:
        from petra import artifact
        from petra.tasks.contract import feed

        proto = artifact.export_onnx(model, tuple(example_input))
        example = feed(example_input, [i.name for i in proto.graph.input])
        out["schemes"] = verify_schemes(proto, schemes, [example], example)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(out, indent=1, sort_keys=True))
        tmp.replace(path)
    return out


def _model_key(model: Any, example_input: Any, extra: Mapping[str, Any]) -> str:
    """A hash of the model's architecture (its repr and parameter shapes), its example inputs'
    shapes and dtypes, the library versions, and ``extra``."""
    import onnxruntime
    import torch

    payload = json.dumps({
        "repr": repr(model),
        "params": [(n, list(p.shape)) for n, p in model.named_parameters()],
        "inputs": [(list(x.shape), str(x.dtype)) for x in example_input],
        "versions": [torch.__version__, onnxruntime.__version__],
        **extra,
    }, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_space(space_cfg: Any, layers: Sequence[LayerInfo], blocks: Sequence[Any] = ()
                ) -> SearchSpace:
    """Decode the config's ``space`` section against the model's prunable layers.

    Args:
        space_cfg: the validated ``space`` section of the config (``petra.config.SpaceConfig``).
        layers: the model's prunable layers, from :func:`prunable_layers`.
        blocks: the blocks the model may skip (:func:`petra.compress.blocks.skippable_blocks`);
            each gets a ``blocks.<name>.skip`` gene.
    """
    from petra.registry import PRUNING, QUANTIZATION, REGULARIZERS

    check_globs(layers, space_cfg.layers.include, space_cfg.layers.exclude)
    selected = select_layers(layers, space_cfg.layers.include, space_cfg.layers.exclude)
    lo, hi = space_cfg.sparsity
    genes: list[Gene] = [Categorical(f"blocks.{b.name}.skip", (False, True), False)
                         for b in blocks]
    kinds: set[str] = set()
    structured: dict[str, tuple[str, ...]] = {}
    for layer in selected:
        methods = [m for m in space_cfg.pruning if m == "none" or offered(layer, PRUNING.get(m))]
        if "none" not in methods:
            methods = ["none", *methods]
        if len(methods) == 1:
            continue
        kinds |= {PRUNING.get(m).meta.get("kind", "unstructured") for m in methods}
        structured[layer.name] = tuple(m for m in methods if PRUNING.get(m).meta["structured"])
        genes.append(Categorical(f"layers.{layer.name}.method", tuple(methods), "none"))
        genes.append(Float(f"layers.{layer.name}.sparsity", lo, hi, lo, step=0.01))
    width = width_genes(space_cfg, selected)
    genes += width
    if width:
        kinds.add("structured")
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
    owners: dict[str, tuple[str, str]] = {}
    if genes:
        genes += declared_genes(PRUNING, "pruning", space_cfg.pruning, space_cfg, owners)
    if "lowrank" in kinds:
        genes.append(Categorical("lowrank.energy", LOWRANK_ENERGIES, 0.99))
        rank_rules = list(getattr(space_cfg, "rank_rules", ["energy"]))
        if rank_rules != ["energy"]:
            genes.append(Categorical("lowrank.rank_rule", tuple(rank_rules), rank_rules[0]))
    if len(space_cfg.quantization) > 1 or space_cfg.quantization[0] != "none":
        genes.append(Categorical("quant.scheme", _with_none(space_cfg.quantization), "none"))
    if any(QUANTIZATION.get(s).meta.get("static") for s in space_cfg.quantization):
        genes += static_genes(space_cfg.static)
    e_lo, e_hi = space_cfg.finetune.epochs
    if e_hi > 0:
        genes.append(Int("finetune.epochs", e_lo, e_hi, e_lo))
        lr_lo, lr_hi = space_cfg.finetune.lr
        genes.append(Float("finetune.lr", lr_lo, lr_hi, geomean(lr_lo, lr_hi), log=True))
        if len(space_cfg.regularizer) > 1 or space_cfg.regularizer[0] != "none":
            genes.append(Categorical("reg.kind", _with_none(space_cfg.regularizer), "none"))
            s_lo, s_hi = space_cfg.reg_strength
            genes.append(Float("reg.strength", s_lo, s_hi, geomean(s_lo, s_hi), log=True))
            genes += declared_genes(REGULARIZERS, "regularizer", space_cfg.regularizer,
                                    space_cfg, owners)
    return SearchSpace(genes, layers=selected, blocks=blocks, owners=owners,
                       structured=structured)


def declared_genes(registry: Any, kind: str, names: Sequence[str], space_cfg: Any,
                   owners: dict[str, tuple[str, str]]) -> list[Gene]:
    """The genes the entries ``names`` of ``registry`` declare (registry metadata ``genes``),
    each once; ``owners`` records gene name → (``kind``, entry) for
    :meth:`SearchSpace.effective`."""
    out: list[Gene] = []
    for name in names:
        declare = registry.get(name).meta.get("genes")
        for gene in declare(space_cfg) if declare is not None else ():
            if gene.name not in owners:
                owners[gene.name] = (kind, name)
                out.append(gene)
    return out


def width_genes(space_cfg: Any, selected: Sequence[LayerInfo]) -> list[Gene]:
    """``prune.width`` (the share of the residual stream's channels removed, in
    ``space.width``) and ``prune.width_method`` (its structured criterion), when a selected
    layer writes a verified residual stream and the space allows a structured criterion."""
    from petra.registry import PRUNING

    lo, hi = getattr(space_cfg, "width", (0.0, 0.0))
    methods = tuple(m for m in space_cfg.pruning if m != "none"
                    and PRUNING.get(m).meta.get("kind") == "structured"
                    and not PRUNING.get(m).meta.get("trained"))
    if hi <= 0 or not methods or not any(x.residual and x.structured for x in selected):
        return []
    return [Float("prune.width", lo, hi, lo, step=0.01),
            Categorical("prune.width_method", methods, methods[0])]


def static_genes(static_cfg: Any) -> list[Gene]:
    """The genes of the static int8 schemes (:class:`petra.compress.quantize.StaticOptions`)
    that the config's ``space.static`` ranges leave open; a single value is no gene."""
    genes: list[Gene] = []
    calibration = tuple(static_cfg.calibration)
    if calibration != ("minmax",):
        genes.append(Categorical("quant.calibration", calibration, calibration[0]))
    for name, (lo, hi) in (("quant.smooth_alpha", static_cfg.smooth_alpha),
                           ("quant.fallback", static_cfg.fallback)):
        if hi > lo or lo > 0:
            genes.append(Float(name, lo, hi, lo, step=0.05))
    return genes


def _with_none(choices: Sequence[str]) -> tuple[str, ...]:
    return tuple(choices) if "none" in choices else ("none", *choices)


def geomean(lo: float, hi: float) -> float:
    """The geometric mean of ``lo`` and ``hi`` to 3 significant digits (a log gene's default)."""
    return float(f"{math.sqrt(lo * hi):.3g}")
