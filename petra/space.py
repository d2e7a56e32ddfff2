"""Gene types, and the search space decoded against a model's own prunable layers.

A genome is a plain ``dict`` from stable dotted gene names to values:
    layers.<module>.method    categorical, the pruning criterion of that layer
    layers.<module>.sparsity  float, the fraction of weights (or output channels) removed
    blocks.<block>.skip       bool, the block is removed and its input passed on
    quant.calibration, quant.smooth_alpha, quant.fallback   the static int8 schemes' options

then the genes petra reads whatever the methods, declared with what their absence means in
:data:`petra.genes.DECLARED` (``prune.width``, ``quant.scheme``, ``finetune.epochs``, ...), and
those each method declares in its registry metadata (``prune.eq_beta``, ``reg.kd_alpha``, ...).

Workers receive these dicts. Every gene's default means "no compression" (:meth:`complete`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from petra.genes import Categorical, Float, Gene, Genome, Int, absent, geomean, static_genes
from petra.layers import (
    ATTENTION_TYPE_NAMES,
    PRUNABLE_TYPES,
    RECURRENT_TYPE_NAMES,
    VERIFY_VERSION,
    LayerInfo,
    check_globs,
    model_space,
    offered,
    protected,
    prunable_layers,
    select_layers,
    unit_kind,
)
from petra.registry import PRUNING, QUANTIZATION, REGULARIZERS, Registry

if TYPE_CHECKING:
    from petra.compress.blocks import BlockInfo
    from petra.schema import SpaceConfig


LOWRANK_ENERGIES = (0.9, 0.95, 0.99, 0.999)  # PETRA's low-rank energy thresholds (METHODS.md)


def skipped_blocks(genome: Mapping[str, Any]) -> list[str]:
    """The blocks a genome skips (its ``blocks.<name>.skip`` genes that are true), in order."""
    return [k[len("blocks."):-len(".skip")] for k, v in genome.items()
            if k.startswith("blocks.") and k.endswith(".skip") and v in (True, "True")]


def idle(method: str, sparsity: float, automatic: bool) -> bool:
    """Whether a layer's ``method`` at ``sparsity`` changes nothing: ``none``, or a method that
    takes the sparsity gene at 0 (under a fixed sparsity rule; ``automatic``: EMP sets it)."""
    meta = PRUNING.get(method).meta if method in PRUNING else {}
    return method == "none" or (
        meta.get("uses_sparsity", True) and not automatic and sparsity == 0.0)


def inside(layer: str, skipped: Iterable[str]) -> bool:
    """Whether ``layer`` is a skipped block or sits inside one."""
    return any(layer == s or layer.startswith(s + ".") for s in skipped)


class SearchSpace:
    """An ordered set of genes, with the layers they were decoded from."""

    def __init__(self, genes: Sequence[Gene], *, layers: Sequence[LayerInfo] = (),
                 blocks: Sequence[BlockInfo] = (),
                 owners: Mapping[str, tuple[str, str]] | None = None,
                 structured: Mapping[str, tuple[str, ...]] | None = None) -> None:
        names = [g.name for g in genes]
        if len(set(names)) != len(names):
            raise ValueError("gene names must be unique")
        self.genes: tuple[Gene, ...] = tuple(genes)
        self.layers: tuple[LayerInfo, ...] = tuple(layers)
        self.blocks: tuple[Any, ...] = tuple(blocks)
        #: What :func:`model_space` withheld (``layers.<name>``, ``quant.scheme=<s>``...), with why.
        self.withheld: dict[str, str] = {}
        #: Layers of the space whose units no gene removes, each with a one-line reason.
        self.kept_whole: dict[str, str] = {}
        #: Genes a registry entry declared → ("pruning" | "regularizer", entry): idle otherwise.
        self.owners: dict[str, tuple[str, str]] = dict(owners or {})
        #: Layer → the methods its gene offers that remove units physically, in config order.
        self.structured: dict[str, tuple[str, ...]] = dict(structured or {})
        #: The probed fine-tune lr of the seed recipes and by-hand grid (None: the default).
        self.seed_lr: float | None = None
        self._by_name = {g.name: g for g in self.genes}

    def overview(self) -> str:
        """A search's line on its space: its genes, what is kept whole, what was withheld."""
        def some(names: list[str]) -> str:
            return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        withheld = f"; withheld: {some(list(self.withheld))}" if self.withheld else ""
        return (f"space: {len(self)} genes over {len(self.layers)} layers; kept whole: "
                f"{some(list(self.kept_whole)) or 'none'}{withheld} (`petra space` says why)")

    def drop(self, names: Iterable[str]) -> None:
        """Remove the genes ``names``, which decide nothing for the task (kd's temperature)."""
        gone = set(names)
        self.genes = tuple(g for g in self.genes if g.name not in gone)
        self._by_name = {g.name: g for g in self.genes}

    def __iter__(self) -> Iterator[Gene]:
        return iter(self.genes)

    def __len__(self) -> int:
        return len(self.genes)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def gene(self, name: str) -> Gene:
        if name not in self._by_name:
            raise ValueError(self._unknown(name))
        return self._by_name[name]

    def _unknown(self, name: str) -> str:
        """Why gene ``name`` is not in the space: its layer's reason where it is kept whole."""
        layer = name.removeprefix("layers.").rpartition(".")[0]
        if name.startswith("layers.") and layer in self.kept_whole:
            return f"unknown gene {name!r}: layer {layer} is kept whole ({self.kept_whole[layer]})"
        near = difflib.get_close_matches(name, self._by_name, n=6, cutoff=0.0)
        return (f"unknown gene {name!r}; the nearest of the space's {len(self)} genes are "
                f"{', '.join(near)} (`petra space CONFIG` lists them all)")

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
        if unknown := [k for k in partial if k not in self._by_name]:
            raise ValueError(self._unknown(unknown[0]))
        return {g.name: g.clip(partial.get(g.name, g.default)) for g in self.genes}

    def effective(self, genome: Mapping[str, Any]) -> Genome:
        """The genome with genes that have no effect reset to their defaults: two genomes with
        the same effective form build the same model, so they share a hash."""
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
            if idle(out[method], float(out.get(sparsity, 0.0)), automatic):
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
    return scheme in QUANTIZATION and bool(QUANTIZATION.get(scheme).meta.get("static"))


def summarize(genome: Mapping[str, Any], metrics: Mapping[str, Any] | None = None) -> str:
    """A one-line recipe: each method with its layer count and mean sparsity, channel
    rounding, quantization, and the fine-tune with its regularizer. What changes nothing is
    left out, as :meth:`SearchSpace.effective` leaves it: a method at sparsity 0, a layer inside
    a skipped block, a skipped block inside another, rounding with no structured method.

    With a candidate's ``metrics``, a removal's sparsity is the one it ended with (its
    ``sparsity.<layer>``), and one left at none (by rounding, or its group's vote) is left out,
    as is a low-rank layer whose factors would not have paid (left whole).

    >>> summarize({"layers.a.method": "crit", "layers.a.sparsity": 0.5,
    ...            "quant.scheme": "scheme"})
    'critx1@0.50 scheme'
    """
    skipped = skipped_blocks(genome)
    methods = _methods(genome, metrics or {}, skipped)
    parts = [f"{m}x{len(s)}" + (f"@{sum(s) / len(s):.2f}" if m not in PRUNING or PRUNING.get(
        m).meta.get("uses_sparsity", True) else "") for m, s in methods.items()]  # svd: its energy
    outermost = [b for b in skipped if not inside(b, (s for s in skipped if s != b))]
    if outermost:
        parts.insert(0, f"skip[{','.join(outermost)}]")
    if (width := float(genome.get("prune.width", 0.0) or 0.0)) > 0:
        parts.append(f"width-{width:.2f}({genome['prune.width_method']})")
    if genome.get("prune.round_to", 1) not in (1, "1") and (width > 0 or any(  # as effective()
            PRUNING.get(m).meta.get("kind") in ("structured", "recurrent") for m in methods)):
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


def _methods(genome: Mapping[str, Any], metrics: Mapping[str, Any], skipped: Sequence[str]
             ) -> dict[str, list[float]]:
    """Each pruning method of ``genome`` that changes something, with its layers' sparsities."""
    methods: dict[str, list[float]] = {}
    automatic = genome.get("prune.sparsity_rule", "fixed") != "fixed"
    for key, value in genome.items():
        if not (key.startswith("layers.") and key.endswith(".method") and value != "none"):
            continue
        layer = key[len("layers."): -len(".method")]
        sparsity = float(genome.get(f"layers.{layer}.sparsity", 0.0))
        kind = PRUNING.get(value).meta.get("kind") if value in PRUNING else None
        measured = f"sparsity.{layer}" in metrics and kind in ("structured", "recurrent",
                                                               "lowrank")  # what it did
        if measured:
            done = float(metrics[f"sparsity.{layer}"])
            if not done:  # no channel removed, or factors that would not have paid
                continue
            sparsity = sparsity if kind == "lowrank" else done
        if inside(layer, skipped) or idle(value, sparsity, automatic and not measured):
            continue  # as effective() drops, or a removal that removed nothing
        methods.setdefault(str(value), []).append(sparsity)
    return methods


def build_space(space_cfg: SpaceConfig, layers: Sequence[LayerInfo], blocks: Sequence[BlockInfo] = ()
                ) -> SearchSpace:
    """Decode the config's ``space`` section against the model's prunable layers.

    Args:
        space_cfg: the validated ``space`` section of the config (``petra.config.SpaceConfig``).
        layers: the model's prunable layers, from :func:`prunable_layers`.
        blocks: the blocks the model may skip (:func:`petra.compress.blocks.skippable_blocks`);
            each gets a ``blocks.<name>.skip`` gene.
    """
    check_globs(layers, space_cfg.layers.include, space_cfg.layers.exclude)
    selected = select_layers(layers, space_cfg.layers.include, space_cfg.layers.exclude)
    lo, hi = space_cfg.sparsity
    genes: list[Gene] = [Categorical(f"blocks.{b.name}.skip", (False, True), False)
                         for b in blocks]
    kinds: set[str] = set()
    structured: dict[str, tuple[str, ...]] = {}
    idle: dict[str, str] = {}
    for layer in selected:
        methods = [m for m in space_cfg.pruning if m == "none" or offered(layer, PRUNING.get(m))]
        if "none" not in methods:
            methods = ["none", *methods]
        if len(methods) == 1:  # said, not dropped in silence (a tabular model's embeddings)
            would = [e.name for e in PRUNING if e.name != "none" and offered(layer, e)]
            idle[layer.name] = (
                layer.no_lowrank if layer.no_lowrank and not would and any(
                    PRUNING.get(m).meta.get("kind") == "lowrank" for m in space_cfg.pruning)
                else f"no method in space.pruning takes {layer.type} layers"
                + (f" ({', '.join(would)} would)" if would else ""))
            continue
        kinds |= {PRUNING.get(m).meta.get("kind", "unstructured") for m in methods}
        structured[layer.name] = tuple(m for m in methods if PRUNING.get(m).meta["structured"])
        genes.append(Categorical(f"layers.{layer.name}.method", tuple(methods), "none"))
        genes.append(Float(f"layers.{layer.name}.sparsity", lo, hi, lo, step=0.01))
    width, residual = width_genes(space_cfg, selected), {x.name for x in selected if x.residual}
    genes += width
    if width:
        kinds.add("structured")
        idle = {n: why for n, why in idle.items() if n not in residual}  # prune.width's
    if kinds & {"structured", "recurrent"}:  # a single choice still travels, to the workers
        genes.append(Categorical("prune.round_to", tuple(space_cfg.round_to), space_cfg.round_to[0]))
    genes += rule_genes(space_cfg) if genes else []
    owners: dict[str, tuple[str, str]] = {}
    if genes:
        genes += declared_genes(PRUNING, "pruning", space_cfg.pruning, space_cfg, owners)
    if "lowrank" in kinds:
        genes.append(Categorical("lowrank.energy", LOWRANK_ENERGIES, absent("lowrank.energy")))
        rank_rules = list(getattr(space_cfg, "rank_rules", ["energy"]))
        if rank_rules != ["energy"]:
            genes.append(Categorical("lowrank.rank_rule", tuple(rank_rules), rank_rules[0]))
    if len(space_cfg.quantization) > 1 or space_cfg.quantization[0] != "none":
        genes.append(Categorical("quant.scheme", _with_none(space_cfg.quantization),
                                 absent("quant.scheme")))
    if any(QUANTIZATION.get(s).meta.get("static") for s in space_cfg.quantization):
        genes += static_genes(space_cfg.static)
    genes += finetune_genes(space_cfg, owners)
    space = SearchSpace(genes, layers=selected, blocks=blocks, owners=owners,
                        structured=structured)
    space.kept_whole = idle
    return space


def rule_genes(space_cfg: SpaceConfig) -> list[Gene]:
    """``prune.sparsity_rule`` and EMP's ``prune.emp_beta`` and ``prune.emp_scope``, when the
    config offers a rule beyond ``fixed`` and a criterion uses the sparsity gene."""

    rules = list(getattr(space_cfg, "sparsity_rules", ["fixed"]))
    uses_sparsity = any(
        PRUNING.get(m).meta.get("uses_sparsity", True) for m in space_cfg.pruning if m != "none")
    if not uses_sparsity or rules == ["fixed"]:
        return []
    b_lo, b_hi = space_cfg.emp_beta
    return [Categorical("prune.sparsity_rule", tuple(rules), rules[0]),
            Float("prune.emp_beta", b_lo, b_hi, min(max(1.0, b_lo), b_hi), step=0.05),
            Categorical("prune.emp_scope", tuple(space_cfg.emp_scope), space_cfg.emp_scope[0])]


def finetune_genes(space_cfg: SpaceConfig, owners: dict[str, tuple[str, str]]) -> list[Gene]:
    """``finetune.epochs`` and ``finetune.lr`` when the fine-tune may run, then ``reg.kind``,
    ``reg.strength`` and the genes the regularizers declare (recorded in ``owners``)."""

    e_lo, e_hi = space_cfg.finetune.epochs
    if e_hi <= 0:
        return []
    lr_lo, lr_hi = space_cfg.finetune.lr
    genes: list[Gene] = [Int("finetune.epochs", e_lo, e_hi, e_lo),
                         Float("finetune.lr", lr_lo, lr_hi, geomean(lr_lo, lr_hi), log=True)]
    if len(space_cfg.regularizer) > 1 or space_cfg.regularizer[0] != "none":
        s_lo, s_hi = space_cfg.reg_strength
        genes += [Categorical("reg.kind", _with_none(space_cfg.regularizer), absent("reg.kind")),
                  Float("reg.strength", s_lo, s_hi, geomean(s_lo, s_hi), log=True)]
        genes += declared_genes(REGULARIZERS, "regularizer", space_cfg.regularizer, space_cfg,
                                owners)
    return genes


def declared_genes(registry: Registry, kind: str, names: Sequence[str], space_cfg: SpaceConfig,
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


def width_genes(space_cfg: SpaceConfig, selected: Sequence[LayerInfo]) -> list[Gene]:
    """``prune.width`` (the share of the residual stream's channels removed, in
    ``space.width``) and ``prune.width_method`` (its structured criterion), when a selected
    layer writes a verified residual stream and the space allows a structured criterion. An
    attention that writes the stream does not count: its heads are verified, not the stream's
    channels (a Perceiver's latent stream, which torch-pruning merges with the width of the
    inputs its cross-attention reads, failed every check of its Linear writers, and a width
    gene offered on its attentions' account failed 4 of 35 candidates)."""

    lo, hi = getattr(space_cfg, "width", (0.0, 0.0))
    methods = tuple(m for m in space_cfg.pruning if m != "none"
                    and PRUNING.get(m).meta.get("kind") == "structured"
                    and not PRUNING.get(m).meta.get("trained"))
    if hi <= 0 or not methods or not any(x.residual and unit_kind(x) == "structured"
                                         for x in selected):
        return []
    return [Float("prune.width", lo, hi, lo, step=0.01),
            Categorical("prune.width_method", methods, methods[0])]


def _with_none(choices: Sequence[str]) -> tuple[str, ...]:
    return tuple(choices) if "none" in choices else ("none", *choices)


__all__ = [
    "ATTENTION_TYPE_NAMES", "LOWRANK_ENERGIES", "PRUNABLE_TYPES", "RECURRENT_TYPE_NAMES",
    "STATIC_GENES", "VERIFY_VERSION", "Categorical", "Float", "Gene", "Genome", "Int",
    "LayerInfo", "SearchSpace", "build_space", "check_globs", "declared_genes", "geomean",
    "inside", "model_space", "offered", "protected", "prunable_layers", "select_layers",
    "skipped_blocks", "static_genes", "summarize", "unit_kind", "width_genes",
]
