"""The model's prunable layers, and the search space verified against them.

:func:`prunable_layers` finds the layers a genome can name (Linear, Conv, attention, recurrent,
embedding) and which of them lose units physically; :func:`model_space` builds the space of a
model, offering only the structured genes and quantization schemes verified to work on it
(:mod:`petra.compress.verify`), with the verdicts cached.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from petra.errors import ConfigError, a_kind
from petra.files import write_atomic
from petra.registry import PRUNING

if TYPE_CHECKING:
    from torch import nn

    from petra.schema import SpaceConfig
    from petra.space import SearchSpace


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
    #: Why no gene removes this layer's units ('' where one may, and for an embedding, whose
    #: width is the residual stream's): a one-line reason, e.g. the model's output layer.
    whole: str = ""
    #: Whether its channel group holds an affine BatchNorm (None: not known, as for a layer
    #: given by hand): ``bn_scale`` is offered only where one does.
    batchnorm: bool | None = None
    #: Why svd cannot factorize it ('' where it can): a forward of its class's own, groups.
    no_lowrank: str = ""


PRUNABLE_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")
#: Recurrent layers whose hidden units a ``recurrent`` criterion removes (petra.compress.recurrent).
RECURRENT_TYPE_NAMES = ("GRU", "LSTM")
#: Attentions whose heads a ``heads`` criterion removes (petra.compress.attention): Hugging Face
#: self-attentions are typed ``Attention``.
ATTENTION_TYPE_NAMES = ("Attention", "MultiheadAttention")
#: The torch layers the listing takes wherever the model calls them.
LISTED_TYPE_NAMES = (*PRUNABLE_TYPES, "Embedding", *RECURRENT_TYPE_NAMES, "ConvTranspose1d",
                     "ConvTranspose2d")


def prunable_layers(model: nn.Module, example_input: Any, *, attention: Sequence[Any] | None = None,
                    recurrent: Sequence[Any] | None = None,
                    recurrent_why: Mapping[str, str] | None = None) -> list[LayerInfo]:
    """The model's prunable layers in execution order.

    A layer whose output is the model's output (the classifier), or whose channels torch-
    pruning cannot follow (e.g. into an ``nn.GRU``), keeps its output channels. Multi-head
    attentions whose heads can be removed are layers too (type ``Attention`` or
    ``MultiheadAttention``, one channel a head), and so are embeddings (low-rank only).

    Args:
        model: the canonical task model (:class:`petra.tasks.contract.TaskModel`).
        example_input: its canonical example inputs.
        attention, recurrent: the model's :func:`~petra.compress.attention.attention_layers`
            and :func:`~petra.compress.recurrent.recurrent_layers`, when already found.
        recurrent_why: with ``recurrent``, the reasons ``recurrent_layers(..., why=)`` gave.
    """
    import torch
    from torch import nn

    from petra.compress.attention import attention_layers
    from petra.compress.recurrent import gru_layers
    from petra.compress.structured import channel_layers

    if attention is None:
        attention = attention_layers(model, example_input)
    if recurrent is None:
        recurrent_why = {}
        recurrent = gru_layers(model, example_input, why=recurrent_why)
    heads = {a.name: a for a in attention}
    RECURRENT_TYPES, transposed = tuple(getattr(nn, t) for t in RECURRENT_TYPE_NAMES), (
        nn.ConvTranspose1d, nn.ConvTranspose2d)
    types = tuple(getattr(nn, t) for t in LISTED_TYPE_NAMES)
    order, outputs, result = _traced_outputs(
        model, example_input, lambda name, module: isinstance(module, types) or name in heads)
    errors, channel_why, normed = [], {}, set()
    by_heads = _head_projections(model, attention)
    capable, residual = channel_layers(model, example_input, errors=errors, why=channel_why,
                                       batchnorm=normed, keep=by_heads)
    modules = dict(model.named_modules())
    # recurrent units go as petra's pruning finds them (torch-pruning's LSTM groups mislead)
    capable = {n for n in capable if not isinstance(modules.get(n), RECURRENT_TYPES)}
    capable = (capable | {g.name for g in recurrent} | set(heads)) - set(by_heads)
    channel_why.update(by_heads)
    unfollowed = (errors or [_UNFOLLOWED])[0]
    if packed := outputs.pop("<packed>", None):  # torch-pruning's own words do not name it
        unfollowed += f"; {packed} reads a PackedSequence, which torch-pruning does not follow"
    seen = list(dict.fromkeys(order))
    infos = []
    for name in seen:
        is_output = outputs[name] is result or (isinstance(result, torch.Tensor) and outputs[
            name].shape == result.shape and name == seen[-1])
        whole = ("its output is the model's output" if is_output
                 else _TRANSPOSED if isinstance(modules[name], transposed)
                 else (recurrent_why or {}).get(name) or channel_why.get(name)
                 or unfollowed)
        infos.append(_layer_info(name, modules[name], heads.get(name), removable=not is_output
                                 and name in capable, residual=name in residual, whole=whole,
                                 batchnorm=name in normed))
    return infos


def _head_projections(model: Any, attention: Sequence[Any]) -> dict[str, str]:
    """The q, k and v projections of the attentions that lose heads, each with why it keeps its
    channels: its rows go a head at a time (channel by channel, they break the head reshape)."""
    from petra.compress.attention import qkv_names

    return {proj: f"a q, k or v projection of {a.name}: its units are the attention's heads "
            "(l2_heads), not single channels" for a in attention for proj in qkv_names(model, a)}


#: Why a transposed convolution gets no gene (it is listed, with this reason, and quantized).
_TRANSPOSED = ("a transposed convolution: no gene of its own (its input channels go with the "
               "layer that feeds it)")
#: Why svd leaves a layer alone (it factorizes one weight matrix, run by torch's forward).
_NO_LOWRANK = ("a grouped {}: svd factorizes a single weight matrix",
               "{} has a forward of its own, which svd's thin layers would not run",
               "a {}x{} weight: two thin layers, even of rank 1, would hold more than it")
#: Why a Linear or Conv torch-pruning traced keeps its channels when it is in no channel group.
_UNFOLLOWED = ("torch-pruning puts its output channels in no channel group: it cannot follow "
               "them to every layer that reads them")


def _layer_info(name: str, module: Any, attention: Any, *, removable: bool,
                residual: bool, whole: str = "", batchnorm: bool | None = None) -> LayerInfo:
    """The :class:`LayerInfo` of one layer; ``attention`` is its AttentionInfo (or None),
    ``removable`` whether its units can go (not the model's output, followed by
    torch-pruning or a unit remover of petra's), and ``whole`` why not, when not."""
    from torch import nn

    if attention is not None:
        out_channels = attention.heads
    elif isinstance(module, tuple(getattr(nn, t) for t in RECURRENT_TYPE_NAMES)):
        out_channels = module.hidden_size
    else:
        out_channels = (module.embedding_dim if isinstance(module, nn.Embedding)
                        else module.out_features if isinstance(module, nn.Linear)
                        else module.out_channels)
    kind = type(module).__name__
    if attention is not None and kind not in ATTENTION_TYPE_NAMES:
        kind = "Attention"
    elif isinstance(module, nn.Embedding):  # a subclass (RoFormer's sinusoidal positions) too
        kind = "Embedding"
    structured = removable and not isinstance(module, nn.Embedding)  # its readers' groups: width
    torch_class = next(c for c in type(module).__mro__ if c.__module__.startswith("torch."))
    w = getattr(module, "weight", None)  # out + in >= out * in: no rank pays
    thin = isinstance(w, nn.Parameter) and w.dim() > 1 and w.shape[0] + w[0].numel() >= w.numel()
    no_lowrank = (_NO_LOWRANK[0].format(kind) if getattr(module, "groups", 1) != 1 else
                  _NO_LOWRANK[2].format(w.shape[0], w[0].numel()) if thin else ""
                  if type(module).forward is torch_class.forward
                  else _NO_LOWRANK[1].format(type(module).__name__))
    return LayerInfo(
        name=name, type=kind, out_channels=int(out_channels),
        params=sum(p.numel() for p in module.parameters()), structured=structured,
        residual=residual, whole="" if structured or kind == "Embedding" else whole,
        batchnorm=batchnorm, no_lowrank=no_lowrank)


def _traced_outputs(model: nn.Module, example_input: Any, watch: Any
                    ) -> tuple[list[str], dict[str, Any], Any]:
    """Run ``model`` on its example once (eval mode, no grad) with hooks on the modules
    ``watch(name, module)`` selects: their names in call order, each one's (first) output, and
    the model's output."""
    import torch

    from petra.tasks.contract import args

    order: list[str] = []
    outputs: dict[str, Any] = {}
    names = {m: n for n, m in model.named_modules()}
    hooks = []
    for module in model.modules():
        if watch(names[module], module):
            def hook(mod: Any, inp: Any, out: Any) -> None:
                order.append(names[mod])
                if inp and type(inp[0]).__name__ == "PackedSequence":  # torch-pruning's limit
                    outputs.setdefault("<packed>", names[mod])
                while isinstance(out, tuple | list) and out:  # a GRU's (output, h_n), and
                    out = out[0]  # a PackedSequence's data
                outputs[names[mod]] = out

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
    return order, outputs, result


def protected(layers: Iterable[LayerInfo]) -> list[str]:
    """The layers whose output channels must stay (the classifier, grouped convs that are not
    depthwise, layers torch-pruning cannot follow): channel pruning leaves every group that
    holds one. Not an embedding (its width is the residual's, which its readers' groups
    decide), nor a transposed conv (torch-pruning removes its channels with their group)."""
    return [layer.name for layer in layers if not layer.structured and layer.type != "Embedding"
            and not layer.type.startswith("ConvTranspose")]


def unit_kind(layer: LayerInfo) -> str | None:
    """The method kind that removes units of ``layer`` physically: ``recurrent`` (hidden units),
    ``heads`` (attention heads), ``structured`` (channels), or None where no structured
    removal is offered (the classifier, grouped convs, layers whose removal failed)."""
    if not layer.structured:
        return None
    return ("recurrent" if layer.type in RECURRENT_TYPE_NAMES
            else "heads" if layer.type in ATTENTION_TYPE_NAMES else "structured")


def offered(layer: LayerInfo, entry: Any) -> bool:
    """Whether the pruning method ``entry`` (a registry entry) is offered for ``layer``: a
    structured kind only where it is the layer's own :func:`unit_kind` (and one that ranks by
    BatchNorm scales only where the layer's group holds a BatchNorm); an unstructured, low-rank
    or trained criterion on Linear and Conv layers."""
    kind = entry.meta.get("kind", "unstructured")
    own = unit_kind(layer)
    if layer.type.startswith("ConvTranspose") or (kind == "lowrank" and layer.no_lowrank):
        return False
    if layer.type in RECURRENT_TYPE_NAMES + ATTENTION_TYPE_NAMES:
        return kind == own
    if layer.type == "Embedding":
        return kind == "lowrank"  # a table factorized into a thinner table and a projection
    if kind in ("recurrent", "heads"):
        return False
    if layer.residual and kind == "structured":
        return False  # the hidden size is the one prune.width gene
    if entry.meta.get("batchnorm") and layer.batchnorm is False:
        return False  # it would fall back to another criterion: a duplicate choice
    return not entry.meta.get("structured") or own == "structured"


def select_layers(
    layers: Sequence[LayerInfo], include: Sequence[str], exclude: Sequence[str]
) -> list[LayerInfo]:
    """The layers whose names match an ``include`` glob and no ``exclude`` glob."""
    return [layer for layer in layers if any(fnmatch.fnmatchcase(layer.name, p) for p in include)
            and not any(fnmatch.fnmatchcase(layer.name, p) for p in exclude)]


def check_globs(layers: Sequence[LayerInfo], include: Sequence[str], exclude: Sequence[str]) -> None:
    """Every glob must match a prunable layer (a glob that matches none is a typo).

    Raises:
        petra.config.ConfigError: naming the glob's field, the glob and the model's layers.
    """
    names = [layer.name for layer in layers]
    for key, globs in (("include", include), ("exclude", exclude)):
        for i, pattern in enumerate(globs):
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                shown = ", ".join(names[:40]) + (" ..." if len(names) > 40 else "")
                raise ConfigError(f"space.layers.{key}[{i}]", pattern, "", (
                    f"{pattern!r} matches no prunable layer of the model; its layers are "
                    f"{shown or '(none)'}"))


#: Bump when what :func:`model_space` verifies changes, so cached verdicts are not reused.
VERIFY_VERSION = 79


def model_space(space_cfg: SpaceConfig, model: nn.Module, example_input: Any, *,
                cache: str | Path | None = None) -> SearchSpace:
    """The search space of ``model`` (the canonical task model) under ``space_cfg``: its
    prunable layers, the structured genes and the quantization schemes verified on it
    (:mod:`petra.compress.verify`), and, with ``space.skip_blocks``, the blocks it may skip.
    The verdicts are kept in ``cache`` (a folder; None verifies every time) by a hash of the
    model's architecture and the space's bounds. The withheld genes (and ``prune.width``, set
    but not found), with their reasons, are in the space's ``withheld``, and not also in
    ``kept_whole``."""
    import dataclasses

    from petra.compress.attention import attention_layers
    from petra.compress.blocks import skippable_blocks
    from petra.compress.reach import unreached_layers
    from petra.compress.recurrent import gru_layers

    blocks_why, attention_why, recurrent_why = {}, {}, {}  # type: ignore[var-annotated]
    blocks = skippable_blocks(model, example_input, blocks_why) if getattr(
        space_cfg, "skip_blocks", False) else ()
    attention = attention_layers(model, example_input, why=attention_why)
    recurrent = gru_layers(model, example_input, why=recurrent_why)
    layers = prunable_layers(model, example_input, attention=attention, recurrent=recurrent,
                             recurrent_why=recurrent_why)
    unreached = unreached_layers(model, example_input, [layer.name for layer in layers])
    layers = [layer for layer in layers if layer.name not in unreached]
    verdicts = _verdicts(space_cfg, model, example_input, layers, attention, recurrent, blocks,
                         cache)
    withheld = {f"blocks.{name}.skip": reason
                for name, reason in {**blocks_why, **verdicts["blocks"]}.items()}
    blocks = [b for b in blocks if b.name not in verdicts["blocks"]]
    failed_layers, no_svd = verdicts["layers"], verdicts.get("lowrank", {})  # layer.method=m
    no_lowrank = {key.rpartition(".method=")[0]: why for key, why in no_svd.items()}
    layers = [dataclasses.replace(layer, structured=layer.structured and layer.name not in
              failed_layers, no_lowrank=no_lowrank.get(layer.name, layer.no_lowrank))
              for layer in layers]
    withheld.update({**{f"layers.{n}": why for n, why in failed_layers.items()},
                     **{f"layers.{key}": why for key, why in no_svd.items()},
                     **{f"quant.scheme={s}": why for s, why in verdicts["schemes"].items()}})
    if verdicts["schemes"]:
        kept = [s for s in space_cfg.quantization if s not in verdicts["schemes"]] or ["none"]
        space_cfg = space_cfg.model_copy(update={"quantization": kept})
    from petra.space import build_space

    space = build_space(space_cfg, layers, blocks)
    if "width" in space_cfg.model_fields_set and space_cfg.width[1] > 0 and "prune.width" \
            not in space:  # asked for: said, not dropped in silence
        from petra.compress.verify import why_no_width

        withheld["prune.width"] = why_no_width(layers, failed_layers)
    space.withheld = withheld
    whole = {**space.kept_whole, **attention_why,
             **{layer.name: layer.whole for layer in space.layers if layer.whole}}
    whole.update({**unhandled_layers(model, layers, [*attention_why, *unreached]), **unreached})
    space.kept_whole = {n: why for n, why in whole.items() if n not in failed_layers}
    return space


#: What ``petra space`` says of a weight layer of a type no gene handles.
_UNHANDLED = ("{kind}: no gene prunes this type (petra prunes Linear, Conv1d, Conv2d, Conv3d, "
              "embeddings, GRU, LSTM and attention heads); it is exported as it is, and "
              "quantized where the scheme quantizes its operation")


def unhandled_layers(model: nn.Module, layers: Iterable[LayerInfo],
                     known: Iterable[str] = ()) -> dict[str, str]:
    """The modules of ``model`` with a weight matrix of their own (two dimensions longer than
    1, not ConvNeXt-V2's GRN ``(1, 1, 1, C)``; Mixtral's bank of experts; an LSTMCell's) that
    are none of ``layers``, nor inside one of them or of ``known``, each with why no gene does."""
    from torch import nn

    handled = [layer.name for layer in layers] + list(known)
    modules = dict(model.named_modules())
    tied = {id(w): h for h in handled
            if h in modules and (w := modules[h]._parameters.get("weight")) is not None}
    out = {}
    for name, module in modules.items():
        weight = module._parameters.get("weight")
        weight = weight if weight is not None else next((  # a MoE's bank; LSTMCell's weight_ih
            p for n, p in module._parameters.items() if p is not None and p.dim() >= 3 - (
                "weight" in n) and (p.requires_grad or "weight" in n)), None)  # not a frozen
        # table (a position table, made a parameter from a buffer): it loses the stream's channels
        if not name or weight is None or sum(size > 1 for size in weight.shape) < 2 or any(
                name == h or name.startswith(f"{h}.") for h in handled):
            continue
        article = a_kind(type(module).__name__)
        if id(weight) in tied:  # T5's ``shared``, the encoder's ``embed_tokens``: one table
            out[name] = f"{article} that holds the weight of {tied[id(weight)]}, which is listed"
        elif isinstance(module, tuple(getattr(nn, t) for t in LISTED_TYPE_NAMES)):
            out[name] = (f"{article} the model does not call on the example batch: no gene "
                         "takes it (a weight the model reads directly is exported as it is)")
        else:
            out[name] = _UNHANDLED.format(kind=article)
    return out


def _verdicts(space_cfg: SpaceConfig, model: nn.Module, example_input: Any, layers: Sequence[LayerInfo],
              attention: Sequence[Any], recurrent: Sequence[Any], blocks: Sequence[Any],
              cache: str | Path | None) -> dict[str, dict[str, str]]:
    """What fails on ``model``, ``{"layers" | "blocks" | "schemes" | "lowrank": {name: reason}}``,
    read from ``cache`` when this model and space were verified before."""
    from petra.compress import verify, verify_rows, verify_schemes

    kinds = {PRUNING.get(m).meta.get("kind", "unstructured") for m in space_cfg.pruning}
    selected = {layer.name for layer in select_layers(
        layers, space_cfg.layers.include, space_cfg.layers.exclude)}
    schemes = [s for s in space_cfg.quantization if s != "none"]
    key = _model_key(model, example_input, {
        "kinds": sorted(kinds), "selected": sorted(selected), "schemes": schemes,
        "blocks": [b.name for b in blocks], "sparsity": space_cfg.sparsity[1],
        "round_to": min(space_cfg.round_to), "version": VERIFY_VERSION})
    path = Path(cache) / f"verdicts-{key}.json" if cache is not None else None
    if path is not None and path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    from petra.candidate.baseline import export_dense
    from petra.tasks.contract import args, feed

    proto = export_dense(model, args(example_input))  # first: one line if no search can start
    example_input = verify_rows.fewer_rows(model, example_input)  # hundreds of forwards
    units = [u for u in verify.structured_units(
        model, example_input, layers,
        attention if "heads" in kinds else (), recurrent if "recurrent" in kinds else ())
        if (u.kind != "channels" or "structured" in kinds) and selected.intersection(u.members)]
    units += [verify.Unit("skip", b.name, (b.name,)) for b in blocks]
    failed = verify.verify_structure(
        model, example_input, units, sparsity=space_cfg.sparsity[1],
        round_to=min(space_cfg.round_to), attention=attention,
        recurrent=recurrent, blocks=blocks)
    lowrank = [m for m in space_cfg.pruning if PRUNING.get(m).meta.get("kind") == "lowrank"]
    factored = [layer.name for layer in layers if layer.name in selected
                and any(offered(layer, PRUNING.get(m)) for m in lowrank)]
    out: dict[str, dict[str, str]] = {"layers": {}, "blocks": {}, "schemes": {}, "lowrank": {
        f"{name}.method={lowrank[0]}": why for name, why in verify.verify_lowrank(
            model, example_input, factored, lowrank[:1]).items()}}
    for unit, reason in failed.items():
        if unit.kind == "skip":
            out["blocks"][unit.name] = reason
            continue
        for member in selected.intersection(unit.members):
            out["layers"][member] = reason
    if schemes:
        example = feed(args(example_input), [i.name for i in proto.graph.input])
        out["schemes"] = verify_schemes.verify_schemes(proto, schemes, [example], example)
    if path is not None:
        write_atomic(path, json.dumps(out, indent=1, sort_keys=True))
    return out


def _model_key(model: nn.Module, example_input: Any, extra: Mapping[str, Any]) -> str:
    """A hash of the model's architecture (its repr, its classes' source and its parameter
    shapes), its example inputs' shapes and dtypes, the library versions, and ``extra``."""
    import onnxruntime
    import torch

    from petra.tasks.fingerprint import code_of

    payload = json.dumps({
        "repr": repr(model), "code": code_of(model),
        "params": [(n, list(p.shape)) for n, p in model.named_parameters()],
        "inputs": [(list(x.shape), str(x.dtype)) for x in example_input],
        "versions": [torch.__version__, onnxruntime.__version__], **extra,
    }, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
