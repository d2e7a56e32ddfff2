"""How petra recognizes a Hugging Face-style attention: the names of its q, k, v and output
projections, and its head count (:mod:`petra.compress.attention` removes its heads)."""

from __future__ import annotations

from torch import nn

#: A Hugging Face attention's q, k and v projections, and its own output projection's names.
QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"),
             ("q_lin", "k_lin", "v_lin"), ("to_q", "to_k", "to_v"), ("q", "k", "v"),
             ("query_proj", "key_proj", "value_proj"))
OUTPUT_NAMES = ("o_proj", "out_proj", "out_lin", "to_out", "proj", "o", "c_proj", "dense", "Wo")
#: The names of a fused q, k, v projection (GPT-2's, after its Conv1D became a Linear).
FUSED_QKV_NAMES = ("c_attn", "qkv", "qkv_proj", "in_proj", "Wqkv", "query_key_value", "to_qkv")
#: Attributes that hold the width of one head (Llama's ``head_dim``, GPT-NeoX's ``head_size``).
HEAD_DIM_NAMES = ("head_dim", "head_size")
HEAD_COUNT_NAMES = ("num_attention_heads", "num_heads", "n_heads", "n_head", "heads")
#: Attributes of an attention that hold its q, k and v width, updated with its heads (timm's
#: ``Attention`` reshapes its heads back to ``attn_dim``).
WIDTH_NAMES = ("all_head_size", "dim", "inner_dim", "split_size", "embed_dim", "attn_dim",
               "petra_width")  # petra_width: petra.tasks.widths


def qkv_layers(module: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear] | None:
    """A Hugging Face attention's q, k and v projections, or None: k and v of one width, q of
    that width or (grouped-query attention) a multiple of it."""
    for names in QKV_NAMES:
        q, k, v = (getattr(module, n, None) for n in names)
        if all(isinstance(layer, nn.Linear) for layer in (q, k, v)) and \
                k.out_features == v.out_features and q.out_features % k.out_features == 0:
            return q, k, v
    return None


def count_attribute(module: nn.Module) -> int | None:
    """The module's own head count: its first attribute of :data:`HEAD_COUNT_NAMES`."""
    return next((getattr(module, n) for n in HEAD_COUNT_NAMES
                 if isinstance(getattr(module, n, None), int)), None)


def declared_heads(module: nn.Module) -> int | None:
    """A module's head count: an attribute of :data:`HEAD_COUNT_NAMES`, else its config's
    (Llama's attention): its key/value heads, each one unit with its query heads (grouped-query
    attention, where ``num_key_value_groups`` repeats each key/value head that many times);
    with one key/value head (multi-query attention, Gemma's), its query heads."""
    count, kv = count_attribute(module), getattr(module, "num_key_value_heads", None)
    if count is not None and isinstance(kv, int) and 1 < kv < count and count % kv == 0:
        return kv  # its own counts (StableLM's): a unit is a key/value head with its group
    if count is not None:
        return int(count)
    config = getattr(module, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    if not (isinstance(heads, int)
            and any(isinstance(getattr(module, n, None), int) for n in HEAD_DIM_NAMES)):
        return None
    grouped = heads % kv == 0 and getattr(module, "num_key_value_groups", 1) == heads // kv
    return None if not grouped else heads if kv == 1 else kv


def counts_query_heads(module: nn.Module) -> bool:
    """Whether :func:`declared_heads` counts query heads: a head-count attribute of its own
    (with no smaller key/value count of its own), or a config with one key/value head (else it
    counts key/value heads, as grouped-query)."""
    config, count = getattr(module, "config", None), count_attribute(module)
    return (count is not None and declared_heads(module) == count) or getattr(
        config, "num_key_value_heads", 0) == 1


def fused_names(module: nn.Module) -> tuple[str, str] | None:
    """The names of a fused attention's q, k, v projection and output projection: a Linear
    of 3 x width outputs, or (multi-query: Falcon's, GPTBigCode's) of width + 2 x head_dim,
    and one that reads width (the width a multiple of the heads)."""
    heads = declared_heads(module) or 0
    for name in FUSED_QKV_NAMES:
        qkv = getattr(module, name, None)
        if not isinstance(qkv, nn.Linear) or heads < 1:
            continue
        for n in OUTPUT_NAMES:
            out = getattr(module, n, None)
            if isinstance(out, nn.Sequential | nn.ModuleList) and len(out) and isinstance(
                    out[0], nn.Linear):  # vit-pytorch's to_out: a Linear, then a Dropout
                out, n = out[0], f"{n}.0"
            width = getattr(out, "in_features", 0) if isinstance(out, nn.Linear) else 0
            # the queries and one head's k and v, where the heads counted are query heads
            # (a grouped config counts key/value heads: Phi-3's fused [q | k | v] with two)
            if width and width % heads == 0 and (qkv.out_features == 3 * width or (
                    counts_query_heads(module) and qkv.out_features == width + 2 * width // heads)):
                return name, n
    return None


def is_hf_attention(module: nn.Module) -> bool:
    return (qkv_layers(module) is not None or fused_names(module) is not None) and \
        declared_heads(module) is not None


def unhandled_form(module: nn.Module) -> str:
    """Why a module that declares a head count and holds a q, k, v projection by one of the
    names above is no attention petra removes heads from, or '' (it is one, or none at all):
    a fused grouped-query projection (the queries, then several key/value heads)."""
    if is_hf_attention(module) or declared_heads(module) is None:
        return ""
    names = (*FUSED_QKV_NAMES, *(n for triple in QKV_NAMES for n in triple))
    found = next((n for n in names if isinstance(getattr(module, n, None), nn.Linear)), None)
    if found is None:
        return ""
    return (f"its heads are not removed: its projection {found!r} is neither a fused [q | k | v] "
            "(three equal widths, or the queries and one key/value head) read by an output "
            "projection, nor one of separate q, k and v (a fused grouped-query projection is not "
            "handled)")
