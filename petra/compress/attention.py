"""Attention heads as the unit of pruning: q, k, v and the output projection lose whole heads.

Removing output channels of a query, key or value projection one by one breaks the head
reshape (``shape '[32, 32, -1, 32]' is invalid``), and torch-pruning's dependency graph cannot
follow channels through it. A head is the unit that keeps a multi-head attention runnable: its
``head_dim`` rows of q, k and v and its ``head_dim`` input columns of the output projection go
together, and the residual width stays as it is.

Three families are found by :func:`attention_layers`:

- **Hugging Face self-attention** (BERT, ViT, and their kin) and hand-written ones of the same
  form: a module with ``query``, ``key`` and ``value`` (or ``q_proj``/``k_proj``/``v_proj``,
  ``q_lin``/..., ``to_q``/..., ``q``/``k``/``v``, DeBERTa's ``query_proj``/...) ``nn.Linear``
  children of equal width (other projections to that width, DeBERTa's relative-position ones,
  lose the same rows) and a
  head count attribute (``HEAD_COUNT_NAMES``; else the config's, as Llama's). Its output
  projection is its own ``o_proj`` (or another of ``OUTPUT_NAMES``) child where it has one
  (transformers 5's ViT), else the ``nn.Linear`` that reads its output, found by tracing the
  example batch (``BertSelfOutput.dense``). The rows and columns are removed with
  torch-pruning's own pruning functions, and the head counts are updated. With grouped-query
  attention (Llama's fewer key/value heads, counted by its config), a unit is a key/value head
  with the query heads that read it (:attr:`AttentionInfo.group`); with one key/value head
  (multi-query attention), a unit is a query head, and k and v stay whole.
- **fused q, k, v** (GPT-2's ``c_attn``, timm's ``qkv``): a module with a head count and one
  ``nn.Linear`` child named in ``FUSED_QKV_NAMES`` that projects to q, k and v stacked
  (``[q | k | v]``, each ``heads * head_dim`` wide), with an output projection child that reads
  that width (``split_size`` and ``embed_dim`` follow), or with the queries then one key/value
  head (multi-query: Falcon's ``query_key_value``, GPTBigCode's ``c_attn``), or laid out by head (``[q_h k_h v_h]`` for each head,
  GPT-NeoX's ``query_key_value``). A trial removal must give what the whole attention gives
  with those heads' outputs zeroed: the first layout that does is the attention's, and one
  where neither does is refused.
- **torch's** ``nn.MultiheadAttention`` (inside ``nn.TransformerEncoderLayer``): its fused
  ``in_proj_weight`` cannot hold fewer heads than ``embed_dim`` allows, so a pruned one is
  replaced by :class:`PrunedMultiheadAttention`, the same computation with separate q, k, v
  projections of ``heads * head_dim`` rows.

The names, and how a form is recognized, are in :mod:`petra.compress.attention_forms`. A
module with a head count and a projection by one of those names in no form above (a fused
grouped-query projection) gets a one-line reason. A layer counts only if a trial removal
of half its heads still runs the model, or gets a one-line reason."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from petra.compress.attention_forms import (
    HEAD_COUNT_NAMES,
    OUTPUT_NAMES,
    WIDTH_NAMES,
    count_attribute,
    counts_query_heads,
    declared_heads,
    fused_names,
    is_hf_attention,
    qkv_layers,
    unhandled_form,
)
from petra.compress.mha import PrunedMultiheadAttention, _rows
from petra.compress.norms import narrow, norm_width
from petra.compress.per_head import passed_in, per_head_layers, per_head_tensors, slice_per_head
from petra.errors import first_line
from petra.registry import PRUNING
from petra.tasks.contract import args, copy_model, no_fast_path


@dataclass(frozen=True)
class AttentionInfo:
    """A multi-head attention whose heads can be removed.

    Attributes:
        name: the attention module (the HF self-attention, or the ``nn.MultiheadAttention``).
        heads: its number of heads.
        head_dim: the width of one head.
        output: the output projection's module name (HF), or ``""`` (MHA: its ``out_proj``).
        fused: the fused q, k, v projection's module name, or ``""`` (separate ones).
        group: query heads per key/value head (grouped-query attention): a unit is a
            key/value head with its query heads, ``head_dim`` query rows and
            ``head_dim // group`` key and value rows.
        by_head: the fused projection's rows are laid out by head (``[q_h k_h v_h]`` for
            each head in turn), not as ``[q | k | v]``.
        shared_kv: multi-query attention (Gemma's, Falcon's, GPTBigCode's): one key/value head
            that every query head reads. The units are the query heads; k and v stay whole.
        q_norms: its norms as wide as q or k are q's and k's (OLMo-2's), narrowed with the
            heads; False where one is not (ALBERT's post-residual LayerNorm, as wide as q).
    """

    name: str
    heads: int
    head_dim: int
    output: str = ""
    fused: str = ""
    group: int = 1
    by_head: bool = False
    shared_kv: bool = False
    q_norms: bool = True


def qkv_names(model: nn.Module, info: AttentionInfo) -> tuple[str, ...]:
    """The module names of the q, k and v projections of ``info``: one where they are fused,
    none for torch's ``nn.MultiheadAttention`` (its ``in_proj_weight`` is no module)."""
    if info.fused:
        return (info.fused,)
    module = model.get_submodule(info.name)
    children = {id(m): n for n, m in module.named_children()}
    return tuple(f"{info.name}.{children[id(p)]}" for p in (*(qkv_layers(module) or ()),
                                                             *_side(module, info)))


def _side(module: nn.Module, info: AttentionInfo) -> list[nn.Linear]:
    """The attention's other projections to its q width, read a slice per head (DeBERTa's
    ``pos_key_proj``, ``pos_query_proj``): they lose the same rows (checked by the trial)."""
    qkv = qkv_layers(module)
    if qkv is None or info.group > 1 or info.shared_kv:
        return []
    width = qkv[0].out_features
    return [m for n, m in module.named_children() if isinstance(m, nn.Linear)
            and m.out_features == width and all(m is not p for p in qkv)
            and f"{info.name}.{n}" != info.output]


def _norms(module: nn.Module, q: int, k: int) -> list[tuple[nn.Module, int]]:
    """The attention's norms over its whole q or k width (OLMo-2's ``q_norm``, ``k_norm``),
    each with the rows of a unit it holds per head of q (1, or the group for k); a norm per
    head (Qwen3's) is left as it is."""
    if qkv_layers(module) is None:
        return []
    widths = ((child, norm_width(child)) for child in module.children())
    return [(child, 1 if width == q else q // k) for child, width in widths if width in (q, k)]


def _head_count(module: nn.Module) -> int:
    if isinstance(module, nn.MultiheadAttention | PrunedMultiheadAttention):
        return int(module.num_heads)
    return int(declared_heads(module))  # type: ignore[arg-type]


def _storage(t: Any) -> int | None:
    if isinstance(t, tuple | list):
        t = t[0] if t else None
    return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None


@torch.no_grad()
def _attention_info(name: str, module: nn.Module, reader: str | None) -> AttentionInfo | None:
    """What head removal needs of one attention (``reader``: the Linear traced reading a
    Hugging Face attention's output), or None where petra does not handle its form."""
    heads = _head_count(module)
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim or module.bias_k is not None:
            return None  # separate kdim/vdim, or learned key/value biases: not handled
        return AttentionInfo(name, heads, module.head_dim)
    if isinstance(module, PrunedMultiheadAttention):
        return AttentionInfo(name, heads, module.head_dim)
    qkv = qkv_layers(module)
    if qkv is None:
        fused, out = fused_names(module)  # type: ignore[misc]
        width = module.get_submodule(out).in_features
        return AttentionInfo(name, heads, width // heads, f"{name}.{out}", f"{name}.{fused}",
                             shared_kv=module.get_submodule(fused).out_features != 3 * width)
    q, k, _ = qkv
    width, group = q.out_features, q.out_features // k.out_features
    inner = next((f"{name}.{n}" for n in OUTPUT_NAMES
                  if isinstance(getattr(module, n, None), nn.Linear)
                  and getattr(module, n).in_features == width), None)
    out = inner or reader
    if out is not None and heads > 1 and group == heads and counts_query_heads(module) \
            and width % heads == 0:  # multi-query: k and v are one query head wide
        return AttentionInfo(name, heads, width // heads, out, shared_kv=True)
    if out is None or width % heads or (group > 1 and count_attribute(module) not in (
            None, heads * group)):
        return None  # a grouped attention is counted by its key/value heads only
    return AttentionInfo(name, heads, width // heads, out, group=group)


def attention_layers(model: nn.Module, example_input: Sequence[Any], *,
                     why: dict[str, str] | None = None) -> list[AttentionInfo]:
    """The attentions of ``model`` whose heads can be removed, in execution order.

    ``why``, when given, is filled with attention name → a one-line reason for each attention
    petra recognized (an ``nn.MultiheadAttention``, or a module with q, k and v projections
    and a head count, by the names above) whose heads cannot be removed."""
    names = {m: n for n, m in model.named_modules()}
    found: dict[str, nn.Module] = {}
    order: list[str] = []
    outputs: dict[int, str] = {}  # storage of an HF attention's output -> its name
    readers: dict[str, str] = {}  # HF attention -> the Linear that reads its output
    hooks = []
    for module, name in names.items():
        mha = isinstance(module, nn.MultiheadAttention | PrunedMultiheadAttention)
        if mha or is_hf_attention(module):
            found[name] = module

            def on_attention(mod: Any, _inp: Any, out: Any, name: str = name,
                             mha: bool = mha) -> None:
                if name not in order:
                    order.append(name)
                ptr = _storage(out)
                if not mha and ptr is not None:
                    outputs[ptr] = name
            hooks.append(module.register_forward_hook(on_attention))
        elif isinstance(module, nn.Linear):
            def on_linear(mod: Any, inp: Any, _out: Any, name: str = name) -> None:
                owner = outputs.get(_storage(inp))
                if owner is not None and owner not in readers:
                    readers[owner] = name
            hooks.append(module.register_forward_hook(on_linear))
    was_training = model.training
    model.eval()
    try:
        model(*args(example_input))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    infos, reasons = [], {n: r for m, n in names.items() if (r := unhandled_form(m))}
    for name in order:
        info, reason = _checked(model, example_input, name, found[name], readers.get(name))
        if reason:
            reasons[name] = reason
        else:
            infos.append(info)
    if why is not None:
        why.update(reasons)
    return infos


def _checked(model: nn.Module, example_input: Sequence[Any], name: str, module: nn.Module,
             reader: str | None) -> tuple[AttentionInfo | None, str]:
    """The attention ``name`` as its trial removal found it, and '' or why it loses no heads."""
    info = _attention_info(name, module, reader)
    if info is None or info.heads < 2:
        return None, ("one head: nothing to remove" if info is not None else
                      "its form is not handled (separate key/value widths, learned key/value "
                      "biases, heads that do not divide the width, no output projection found, "
                      "or grouped key/value heads it keeps no count of)")
    reason = _trial(model, example_input, info)
    if reason == LAYOUT and info.fused:  # [q | k | v] it is not: is it laid out by head?
        by_head = replace(info, by_head=True)
        if not _trial(model, example_input, by_head):
            return by_head, ""
    width = info.heads * info.head_dim
    if reason and _norms(module, width, width // info.group):  # a norm as wide, not q's
        if not _trial(model, example_input, own := replace(info, q_norms=False)):
            return own, ""
    return info, reason


#: Why a fused or grouped attention's heads are refused when the trial computes something else.
LAYOUT = ("removing heads changes what the kept heads compute: its fused q, k, v projection "
          "is laid out neither as [q | k | v] nor by head, or its query heads are not grouped "
          "by key/value head")


def _trial(model: nn.Module, example_input: Sequence[Any], info: AttentionInfo) -> str:
    """Why removing every other head of ``info`` from a copy of ``model`` breaks it, or ''. The
    pruned attention must also compute what the whole attention computes with the removed
    heads' output-projection columns zeroed: that tells a fused or grouped attention's layout
    (else :data:`LAYOUT`), and whether per-head tensors (:mod:`petra.compress.per_head`) were
    cut right."""
    base = copy_model(model).eval()
    with torch.no_grad():  # per-head parameters that start equal (norms at 1) told apart
        noise = torch.Generator().manual_seed(0)
        for p in base.get_submodule(info.name).parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=noise).to(p))
    trial = copy_model(base).eval()
    remove = list(range(0, info.heads, 2))  # not the last ones: a per-head list cut short
    try:  # at its end would still be right
        prune_heads(trial, info, remove)
        with torch.no_grad():
            got = trial(*args(example_input))
        if info.output and not _same_as_masked(base, example_input, info, remove, got):
            sliced = [n for _, n, _ in per_head_tensors(model.get_submodule(info.name),
                                                        info.heads, _parent(model, info))]
            return LAYOUT if info.fused or info.group > 1 else (
                "removing heads changes what the kept heads compute: its forward mixes "
                "heads, or sizes a per-head term from its head count" + (
                    f" ({', '.join(sliced)} was cut as one slice per head)" if sliced else "")
                + per_head_layers(model.get_submodule(info.name), info.heads))
    except (RuntimeError, ValueError, TypeError, AttributeError, IndexError) as exc:
        first = first_line(exc, 200)
        hint = ("; its forward must size the heads from its head count or head width "
                f"attributes ({', '.join(HEAD_COUNT_NAMES + WIDTH_NAMES)}, which petra "
                "updates) or with -1, not from the input's width" if "shape" in first
                or "mat1" in first else "")
        if made := per_head_layers(model.get_submodule(info.name), info.heads):
            hint = made
        if outside := passed_in(model, example_input, info.name, info.heads):
            hint = (f"; its forward is handed {', '.join(outside)}, a per-head term made "
                    "outside it, which petra cannot cut with its heads")
        return f"removing half its heads breaks the model ({first}){hint}"
    return ""


@torch.no_grad()
def _same_as_masked(model: nn.Module, example_input: Sequence[Any], info: AttentionInfo,
                    remove: Sequence[int], got: torch.Tensor) -> bool:
    masked = copy_model(model).eval()
    masked.get_submodule(info.output).weight[:, _rows(remove, info.head_dim)] = 0.0
    want = masked(*args(example_input))
    return bool(torch.allclose(got, want, rtol=1e-3, atol=1e-4 * (float(want.abs().max()) or 1)))


def prune_heads(model: nn.Module, info: AttentionInfo, remove: Sequence[int]) -> None:
    """Remove heads ``remove`` of the attention ``info.name``, in place (at least one stays);
    a frozen projection stays frozen."""
    from petra.compress.graph import keep_frozen

    with keep_frozen(model, [n for n in (info.name, info.output, info.fused) if n]):
        _prune_heads(model, info, remove)


def _prune_heads(model: nn.Module, info: AttentionInfo, remove: Sequence[int]) -> None:
    import torch_pruning as tp

    module = model.get_submodule(info.name)
    heads = _head_count(module)
    remove = sorted(set(int(h) for h in remove))
    if not remove:
        return
    if len(remove) >= heads:
        raise ValueError(f"{info.name}: cannot remove all {heads} heads")
    keep = [h for h in range(heads) if h not in remove]
    if isinstance(module, nn.MultiheadAttention):
        model.set_submodule(info.name, PrunedMultiheadAttention(module, keep))
        no_fast_path(model)  # its fused fast path needs every layer unpruned
        return
    rows = _rows(remove, info.head_dim)
    width = heads * info.head_dim
    stacked = [r + i * width for i in range(3) for r in rows]  # rows of a [q | k | v] projection
    if isinstance(module, PrunedMultiheadAttention):
        tp.prune_linear_out_channels(module.qkv, stacked)
        tp.prune_linear_in_channels(module.out_proj, rows)
        module.num_heads = len(keep)
        return
    if info.fused:
        tp.prune_linear_out_channels(model.get_submodule(info.fused), rows if info.shared_kv
                                     else _rows(remove, 3 * info.head_dim) if info.by_head
                                     else stacked)
    side = _side(module, info)  # found by the q width, before q loses its rows
    norms = _norms(module, heads * info.head_dim, heads * info.head_dim // info.group
                   ) if info.q_norms else []
    for proj, per_unit in zip((qkv_layers(module) or ())[:1 if info.shared_kv else 3],
                              (1, info.group, info.group), strict=False):
        tp.prune_linear_out_channels(proj, _rows(remove, info.head_dim // per_unit))
    for norm, per_unit in norms:  # OLMo-2's q_norm and k_norm, over the whole q and k
        narrow(norm, _rows(remove, info.head_dim // per_unit))
    for proj in side:
        tp.prune_linear_out_channels(proj, rows)
    tp.prune_linear_in_channels(model.get_submodule(info.output), rows)
    slice_per_head(module, heads, keep, _parent(model, info), info.group)  # position biases
    for attr in HEAD_COUNT_NAMES:  # query heads: a unit holds a group of them
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, len(keep) * info.group)
    for attr in WIDTH_NAMES:  # the q, k and v width (DistilBERT: head_dim = dim // n_heads)
        if getattr(module, attr, None) == heads * info.head_dim:
            setattr(module, attr, len(keep) * info.head_dim)
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "num_attention_heads"):
        # A shared config would tell every other layer the new count: give this one its own,
        # which holds the count where the module has none of its own (Llama's attention)
        module.config = copy.copy(config)
        if count_attribute(module) is None:
            module.config.num_attention_heads = len(keep) * info.group
            if getattr(config, "num_key_value_heads", None) and not info.shared_kv:
                module.config.num_key_value_heads = len(keep)
    if not info.shared_kv and isinstance(getattr(module, "num_key_value_heads", None), int):
        module.num_key_value_heads = len(keep)  # Phi-3 slices its fused k and v by it
    if info.shared_kv and isinstance(getattr(module, "num_key_value_groups", None), int):
        module.num_key_value_groups = len(keep)  # each query head reads the one k and v


def _parent(model: nn.Module, info: AttentionInfo) -> nn.Module:
    return model.get_submodule(info.name.rpartition(".")[0])


def _projections(model: nn.Module, info: AttentionInfo) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The q, k, v weights (rows = head channels) and the output weight (columns = head
    channels) of one attention."""
    module = model.get_submodule(info.name)
    if isinstance(module, nn.MultiheadAttention):
        e = module.embed_dim
        w = module.in_proj_weight
        return [w[:e], w[e:2 * e], w[2 * e:]], module.out_proj.weight
    if isinstance(module, PrunedMultiheadAttention):
        return list(module.qkv.weight.chunk(3)), module.out_proj.weight
    if info.fused:
        w = model.get_submodule(info.fused).weight
        width = model.get_submodule(info.output).in_features  # the queries' rows
        qkv = [w[:width]] if info.shared_kv else list(
            w.reshape(-1, 3, info.head_dim, w.shape[1]).unbind(1) if info.by_head else w.chunk(3))
    else:
        qkv = [p.weight for p in qkv_layers(module)][:1 if info.shared_kv else 3]
    return qkv, model.get_submodule(info.output).weight


@PRUNING.register(
    "l2_heads",
    description="attention heads: remove the heads of smallest weight L2 norm (their q, k, v "
    "rows and output-projection columns together), physically",
    kind="heads",
)
def l2_heads(model: nn.Module, info: AttentionInfo) -> torch.Tensor:
    """One score per head: the L2 norm of every weight that belongs to it."""
    qkv, out = _projections(model, info)
    heads = _head_count(model.get_submodule(info.name))
    total = torch.zeros(heads)
    for w in qkv:  # a unit's rows are contiguous: head_dim of q, head_dim // group of k and v
        # (a multi-query attention's units are its query heads: its shared k and v are left out)
        total += w.detach().reshape(heads, -1).pow(2).sum(dim=1)
    total += out.detach().reshape(out.shape[0], heads, -1).pow(2).sum(dim=(0, 2))
    return total.sqrt()


def kept_heads(heads: int, sparsity: float) -> int:
    """How many of ``heads`` survive ``sparsity`` (at least one)."""
    return max(1, heads - int(round(sparsity * heads)))


def prune_attention(model: nn.Module, plan: Mapping[str, tuple[str, float]],
                    infos: Sequence[AttentionInfo]) -> dict[str, tuple[int, int]]:
    """Remove heads following ``plan`` (attention name → (method, sparsity)).

    Returns:
        attention name → (heads before, heads after), for every attention that lost heads.
    """
    by_name = {i.name: i for i in infos}
    changes: dict[str, tuple[int, int]] = {}
    for name, (method, sparsity) in plan.items():
        info = by_name.get(name)
        if info is None:
            raise ValueError(f"{name} is not an attention whose heads petra can remove")
        heads = _head_count(model.get_submodule(name))
        keep = kept_heads(heads, sparsity)
        if keep >= heads:
            continue
        scores = PRUNING.get(method).fn(model, info).detach().flatten()
        remove = torch.argsort(scores, stable=True)[: heads - keep].tolist()
        prune_heads(model, info, remove)
        changes[name] = (heads, keep)
    return changes
