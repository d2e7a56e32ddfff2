"""Block removal: a whole residual block replaced by its shortcut, or dropped where it keeps the
shape (the ``blocks.<name>.skip`` genes).

On a small CNN run by ONNX Runtime, latency is paid per operator as much as per multiply: at a
few dozen channels, removing channels stops paying long before removing operators does (on
digits_cnn, 50% of every conv's channels with int8 ran at 0.33 of dense; dropping its last
block and running its first on the shortcut alone reached 0.16). Removing whole blocks is the
layer-pruning half of hybrid channel and layer pruning (arXiv 2509.08714).

:func:`skippable_blocks` finds, by tracing the example batch:

- **identity blocks**: a module, other than the model itself, that holds at least two Conv or
  Linear layers (or one that does not keep its own input's shape: a TCN block that pads
  outside its conv) and returns a tensor of its input's shape (a residual block with an
  identity shortcut). Skipping it makes it the identity.
- **shortcut blocks**: a module with a child named ``downsample``, ``shortcut`` or ``skip``
  whose output has the block's output shape (a residual block with a projection shortcut).
  Skipping it keeps only that path.
- **square layers**: a Conv or Linear layer outside any such block whose output has its input's
  shape and that is not the model's output layer (an MLP's hidden-to-hidden layer). Skipping
  it makes it the identity.
- **residual branches**: an identity block or square layer whose output is added to the
  stream it read (a pre-norm transformer's ``x + mlp(norm(x))``, MobileNetV2's inner ``conv``).
  As the identity it would add the stream to itself; skipping it makes it output zeros, so
  only the residual's other path is left. A block is a branch where, on the example batch,
  its output was added to what its input was computed from (through views, products and
  sums: a DiT's modulated stream), or to the input of the module that made its input (a
  norm; seen through views: an MLP-Mixer's token ``mlp`` reads the stream transposed), on the
  way through operations that keep zeros zero (views, products: a layer scale; activations
  that map 0 to 0: ``h + relu(conv(h))``).

A module that holds two or more whole blocks of one class and no layer outside them (an
``nn.TransformerEncoder``, the Sequential of every block) is no block itself: skipping it is
skipping them all.

If a block's outputs were all non-negative on the example batch (it ends in a ReLU), its
replacement ends in a ReLU too. A skipped block's own layers leave the model, so their genes do
nothing.

Transformer layers are identity blocks too (a ``BertLayer``, an ``nn.TransformerEncoderLayer``,
a ``BertAttention``): their replacement takes and ignores the extra arguments they are called
with (masks), and returns a tuple where the block returned one (``(x, None, ...)``), handing on
the arguments the block handed on (a T5 layer's position bias; the first layer, which computes
that bias for the rest, is not skipped). A
self-attention alone (the module that holds q, k and v) is a block only where it is a residual
branch (Llama's ``self_attn``, GPT-2's ``attn``, ModernBERT's ``attn``: ``x +
attn(norm(x))``), which skipping removes, or where it adds the stream it is handed (BLOOM's
``self_attention(x, residual)``), which skipping hands on; elsewhere (BERT's, whose output
projection sits outside it) skipping it would feed the layer's input to the output projection,
and its heads are removed instead. The replacement takes its input as the block did, the
first positional argument or the keyword it came by (Llama's ``hidden_states=``), and keeps the
block's plain attributes, which a model may read (ModernBERT's encoder picks each layer's mask
by its ``attention_type``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from petra.compress.attention_forms import is_hf_attention
from petra.compress.kinds import WEIGHTED_LAYERS
from petra.compress.mha import PrunedMultiheadAttention
from petra.compress.stand_ins import BatchFirst, ReluIdentity, ShortcutOnly, Zero
from petra.tasks.contract import args, no_fast_path

SHORTCUT_NAMES = ("downsample", "shortcut", "skip")


@dataclass(frozen=True)
class BlockInfo:
    """A block that may be skipped: its name, how, and the parameters skipping removes."""

    name: str
    kind: str  # "identity", "branch" (skipped, it outputs zeros) or "shortcut"
    shortcut: str | None
    relu: bool
    params: int
    outputs: int = 0  # the length of the tuple the block returns; 0 for a tensor
    keyword: str = ""  # the keyword its input comes by (Llama's hidden_states=), or positional
    #: The tuple slots where the block returns one of its own arguments, with where that
    #: argument comes from (a position or a keyword): a T5 layer hands on the position bias it
    #: was given, and its stand-in must too.
    passthrough: tuple[tuple[int, int | str], ...] = ()
    #: Where the argument comes from (a position or a keyword) that the block adds to its own
    #: result (BLOOM's MLP, given ``residual``, returns ``residual + mlp(x)``): skipped, it
    #: hands on that argument, not its first.
    carried: int | str | None = None
    #: How many times the model calls the block per forward: an ALBERT layer shared across
    #: depths is called at each, and its one gene skips every call.
    calls: int = 1

    @property
    def becomes(self) -> str:
        """What the block is, skipped: its kind, or ``carried`` where it hands on that argument."""
        return "carried" if self.carried is not None else self.kind


#: What a skipped block becomes, by :attr:`BlockInfo.becomes`.
SKIPPED = {"identity": "these hand on their input", "branch": "these residual branches give "
           "zeros", "shortcut": "these become their shortcut", "carried": "these hand on the "
           "residual they were given to add to (BLOOM's)"}


def skip_lines(blocks: Sequence[BlockInfo]) -> list[str]:
    """``petra space``'s lines on the skip genes: what each kind of block becomes, and the
    blocks the model calls more than once per forward (one gene skips every call)."""
    lines = [f"skipped, {what}: {', '.join(names)}" for kind, what in SKIPPED.items()
             if (names := [b.name for b in blocks if b.becomes == kind])]
    if shared := [f"{b.name} ({b.calls} calls)" for b in blocks if b.calls > 1]:
        lines.append("called more than once per forward (shared across depths: one skip gene "
                     f"removes every call): {', '.join(shared)}")
    return lines


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _is_attention(module: nn.Module) -> bool:
    """A multi-head attention itself (torch's, or a Hugging Face self-attention)."""

    return isinstance(module, nn.MultiheadAttention | PrunedMultiheadAttention) or \
        is_hf_attention(module)


def _own_mha(name: str, module: nn.Module, modules: dict[str, nn.Module]) -> bool:
    """An ``nn.MultiheadAttention`` that a user's block calls (its one Linear is ``out_proj``:
    its q, k, v weights are no layer). Inside torch's own Transformer layers it stays: their
    forward reads its projection tensors."""
    parent = modules.get(name.rpartition(".")[0])
    return isinstance(module, nn.MultiheadAttention) and not isinstance(
        parent, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer)


def _layer_count(module: nn.Module) -> int:
    return sum(isinstance(m, WEIGHTED_LAYERS) for m in module.modules())


def _reshaped_layer(name: str, module: nn.Module, seen: dict[str, dict[str, Any]]) -> bool:
    """Whether ``module`` holds one layer, not depthwise (a grouped one may be: a gated CNN's),
    which does not keep its own input's shape (a TCN block's conv, padded outside it), so that
    it has no skip gene of its own."""
    inner = [(f"{name}.{n}", m) for n, m in module.named_modules()
             if isinstance(m, WEIGHTED_LAYERS)]
    groups = getattr(inner[0][1], "groups", 1) if len(inner) == 1 else 0
    return len(inner) == 1 and (groups == 1 or groups < inner[0][1].in_channels) \
        and inner[0][0] in seen and seen[inner[0][0]]["in"] != seen[inner[0][0]]["out"]


class _Ops(torch.overrides.TorchFunctionMode):
    """Records, in call order, every tensor addition (its operands and result) and every
    operation that keeps a zero tensor zero (a view, a product, a dropout: its tensor operands
    and result) while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[torch.Tensor, ...], Any]] = []
        #: The tensors a block made and returned beside its output (id → the tensor, and the
        #: blocks that returned it), and the blocks one of whose such tensors was read after.
        self.handed: dict[int, tuple[torch.Tensor, list[str]]] = {}
        self.read: set[str] = set()
        self.looking = False  # a hook reads shapes: no read by the model

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        for arg in (*args, *(kwargs or {}).values()) if self.handed and not self.looking else ():
            for t in arg if isinstance(arg, tuple | list) else (arg,):
                if isinstance(t, torch.Tensor) and id(t) in self.handed:
                    self.read.update(self.handed[id(t)][1])
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        kind = "add" if name in _ADD_NAMES else "keeps_zero" if name in _KEEPS_ZERO else None
        tensors = tuple(a for a in args[:2] if isinstance(a, torch.Tensor))
        if kind == "add" and len(tensors) == 2 and len(args) >= 2 or (
                kind == "keeps_zero" and tensors and isinstance(out, torch.Tensor)):
            self.ops.append((kind, tensors, out))
        return out


_ADD_NAMES = {"add", "add_", "__add__", "__radd__", "__iadd__"}
#: Operations whose output is zero where their first tensor (a view's source) or any tensor
#: operand (a product) is: a branch's output reaches the sum through them (the MLP-Mixer's
#: ``x + mlp(norm(x).transpose(1, 2)).transpose(1, 2)``, a layer scale's ``gamma * mlp(x)``,
#: an activation that maps 0 to 0: ``h + relu(conv(h))``).
_VIEWS = {"transpose", "permute", "reshape", "view", "flatten", "unflatten", "contiguous",
          "squeeze", "unsqueeze", "movedim", "swapaxes", "t"}
_KEEPS_ZERO = _VIEWS | {"mul", "mul_", "__mul__", "__rmul__", "__imul__", "dropout", "relu",
                        "relu_", "gelu", "silu", "tanh", "leaky_relu", "hardtanh", "elu"}


def _carried(inputs: tuple[Any, ...], kwargs: dict[str, Any], x: torch.Tensor,
             y: torch.Tensor, ops: _Ops) -> int | str | None:
    """Where the argument comes from that a block's last operation added (BLOOM's MLP)."""
    last = next((op for op in reversed(ops.ops) if op[2] is y), None)
    if last is None or last[0] != "add":
        return None
    for operand in (a for a in last[1] if a is not x):
        source = next((j for j, a in enumerate(inputs) if a is operand), None)
        source = next((k for k, a in kwargs.items() if a is operand), source)
        if source is not None:
            return source
    return None


def _handed_on(name: str, inputs: tuple[Any, ...], kwargs: dict[str, Any], output: Any,
               ops: _Ops, x: torch.Tensor | None) -> tuple[tuple[int, int | str], ...]:
    """The slots of the tuple a block returned that hold one of its arguments, with where that
    argument came from, or a stream of its own: a tensor it made with the shape of exactly one
    of its arguments besides its input ``x``, and not ``x``'s (an HRNet stage takes its high-
    and low-resolution features and returns both), handed on as that argument where the block
    is skipped. Any other tensor it made and returned beside its output is watched by ``ops``
    for a read after the block returned."""
    handed = []
    for slot, value in enumerate(output[1:] if isinstance(output, tuple | list) else (), 1):
        if not isinstance(value, torch.Tensor):
            continue
        source = next((j for j, a in enumerate(inputs) if a is value), None)
        source = next((k for k, a in kwargs.items() if a is value), source)
        streams = [j for j, a in [*enumerate(inputs), *kwargs.items()]
                   if isinstance(a, torch.Tensor) and a is not x and a.shape == value.shape]
        if source is None and len(streams) == 1 and x is not None and x.shape != value.shape:
            source = streams[0]
        if source is not None:
            handed.append((slot, source))
        else:
            ops.handed.setdefault(id(value), (value, []))[1].append(name)
    return tuple(handed)


def _trace(model: nn.Module, example_input: Any) -> tuple[dict[str, dict[str, Any]], Any, _Ops]:
    """Each module's first call on the example batch (its input and output tensors, in call
    order), the model's output, and the additions and zero-keeping operations made on the way
    (:class:`_Ops`)."""
    names = {m: n for n, m in model.named_modules() if m is not model}
    seen: dict[str, dict[str, Any]] = {}
    calls: dict[str, int] = {}
    hooks, ops = [], _Ops()
    for module, name in names.items():
        def hook(mod: nn.Module, inputs: Any, kwargs: Any, output: Any, name: str = name
                 ) -> None:
            x, y, keyword = _first_tensor(inputs), _first_tensor(output), ""
            calls[name] = calls.get(name, 0) + 1
            if x is None and not inputs:  # called by keyword (Llama's self_attn)
                keyword = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), "")
                x = kwargs.get(keyword)
            if x is None or y is None or name in seen:
                return
            ops.looking = True
            try:
                seen[name] = {"in": tuple(x.shape), "out": tuple(y.shape), "input": x,
                              "nonneg": bool((y >= 0).all()), "output": y, "keyword": keyword,
                              "outputs": len(output) if isinstance(output, tuple | list) else 0,
                              "args": len(inputs) + len(kwargs),
                              "carried": _carried(inputs, kwargs, x, y, ops),
                              "passthrough": _handed_on(name, inputs, kwargs, output, ops, x)}
            finally:
                ops.looking = False

        hooks.append(module.register_forward_hook(hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with ops:
            result = model(*args(example_input))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for name, info in seen.items():
        info["calls"] = calls[name]
    return seen, result, ops


@torch.no_grad()
def skippable_blocks(model: nn.Module, example_input: Any,
                     why: dict[str, str] | None = None) -> list[BlockInfo]:
    """The blocks of ``model`` that may be skipped, in execution order (see the module doc).
    A block that returns, beside its output, a tensor it made and that the model reads after
    it (the position bias a T5 encoder's first layer computes for every later layer) is not
    one: skipped, it would return None there. It goes into ``why``, with that reason."""
    seen, result, ops = _trace(model, example_input)
    final = _first_tensor(result)
    modules = dict(model.named_modules())
    found = []
    for name, info in seen.items():
        module = modules[name]
        params = sum(p.numel() for p in module.parameters())
        if info["output"] is final:
            continue  # the model's output layer stays
        kind = "branch" if _is_branch(name, seen, ops.ops) and info["carried"] is None \
            else "identity"
        if _is_attention(module) and kind != "branch" and info["carried"] is None:
            continue  # it loses heads; skipped where it is a residual branch or adds one
        shortcut = next((c for c in SHORTCUT_NAMES if hasattr(module, c)
                         and isinstance(getattr(module, c), nn.Module)
                         and f"{name}.{c}" in seen
                         and seen[f"{name}.{c}"]["out"] == info["out"]
                         # its stand-in calls it on the block's input alone (not Swin's
                         # patch merging, which takes the resolution too)
                         and seen[f"{name}.{c}"]["args"] == 1), None)
        square = info["in"] == info["out"]
        if isinstance(module, WEIGHTED_LAYERS):
            if square and getattr(module, "groups", 1) == 1:
                found.append(BlockInfo(name, kind, None, info["nonneg"], params,
                                       calls=info["calls"]))
        elif _layer_count(module) >= 2 and shortcut is not None:
            found.append(BlockInfo(name, "shortcut", f"{name}.{shortcut}", info["nonneg"],
                                   params - sum(p.numel() for p in getattr(
                                       module, shortcut).parameters()), info["outputs"],
                                   info["keyword"], info["passthrough"], calls=info["calls"]))
        elif (_layer_count(module) >= 2 or _own_mha(name, module, modules)
              or _reshaped_layer(name, module, seen)) and square:
            found.append(BlockInfo(name, kind, None, info["nonneg"], params, info["outputs"],
                                   info["keyword"], info["passthrough"], info["carried"],
                                   info["calls"]))
    # Square layers inside a block are left to the block's own gene: one gene per block keeps
    # the space small, and a block's layers are what channel pruning already reaches. Those of
    # an attention lose heads instead (as the identity, a q or k projection is nonsense).
    outer = [b.name for b in found if not isinstance(modules[b.name], WEIGHTED_LAYERS)] + [
        name for name in seen if _is_attention(modules[name])]
    for name in ops.read & {b.name for b in found}:
        (why if why is not None else {})[name] = (
            "beside its output, it returns a tensor that it computes and that the model reads "
            "after it (a WaveNet block's skip output, the position bias of a T5 encoder's first "
            "layer): a skipped block would return None there")
    return [b for b in found if b.name not in ops.read and not _stack(b, found, modules) and not (
        isinstance(modules[b.name], WEIGHTED_LAYERS)
        and any(b.name.startswith(o + ".") for o in outer)) and not _wrapper(b, found)]


def _wrapper(block: BlockInfo, found: Sequence[BlockInfo]) -> bool:
    """Whether ``block`` only wraps another of ``found``, skipped the same way, with the same
    parameters (a ResNet stage of one layer, ALBERT's group of one layer): two genes for one
    change; the inner one stays."""
    return any(b.name.startswith(f"{block.name}.") and (b.kind, b.params, b.relu) == (
        block.kind, block.params, block.relu) and (block.shortcut is None) == (b.shortcut is None)
        for b in found)


def _stack(block: BlockInfo, found: Sequence[BlockInfo], modules: dict[str, nn.Module]) -> bool:
    """Whether ``block`` is a stack of layers: two or more whole blocks of one class (an
    ``nn.TransformerEncoder``'s layers, the Sequential that holds every block), with every
    Conv and Linear it holds inside one of them. Skipping it is skipping them all, which their
    own genes reach; as one gene it removed the whole network in half of the random genomes,
    and such candidates stood on fronts. A layer that holds two sub-blocks of different kinds
    (T5's attention and feed-forward), or layers of its own beside its blocks (a stage's
    downsampling, MobileViT's convolutions around its transformer), is kept."""
    inner = [b.name for b in found if b.name.startswith(block.name + ".")
             and b.kind != "branch" and not isinstance(modules[b.name], WEIGHTED_LAYERS)]
    kinds = [type(modules[name]) for name in inner]
    own = (f"{block.name}.{n}" for n, m in modules[block.name].named_modules()
           if isinstance(m, WEIGHTED_LAYERS))
    return any(kinds.count(kind) >= 2 for kind in set(kinds)) and all(
        any(name.startswith(f"{b}.") for b in inner) for name in own)


def _is_branch(name: str, seen: dict[str, dict[str, Any]],
               ops: Sequence[tuple[str, tuple[torch.Tensor, ...], Any]]) -> bool:
    """Whether module ``name``'s output was added, alone or in a sum with other branches
    (GPT-NeoX's ``mlp(ln2(x)) + attn(ln1(x)) + x``), to the stream it read: what its input was
    computed from, back through views, products and sums to the nearest module outputs (a
    DiT's ``mlp(norm(x) * (1 + scale) + shift)``), or the input of a module that made that (a
    norm: ``x + mlp(norm(x))``), seen through views (a transpose). Its output may reach the sum
    through operations that keep zeros zero (:data:`_KEEPS_ZERO`)."""
    made_by = {id(out): operands for _, operands, out in ops
               if all(out is not a for a in operands)}
    outputs = {id(s["output"]) for s in seen.values()}

    def upstream(t: torch.Tensor, views_only: bool) -> list[torch.Tensor]:
        found, todo = [], [t]
        while todo and len(found) < 32:
            u = todo.pop()
            if any(u is f for f in found):
                continue
            found.append(u)
            made = made_by.get(id(u), ())
            if id(u) not in outputs and (not views_only or len(made) == 1):
                todo.extend(made)
        return found

    sources = upstream(seen[name]["input"], views_only=False)
    sources += [t for s in seen.values() if any(s["output"] is x for x in sources)
                for t in upstream(s["input"], views_only=True)]
    summed = [seen[name]["output"]]  # its output, and every sum it went into
    for kind, operands, out in ops:
        if not any(a is t for a in operands for t in summed):
            continue
        if kind == "add" and any(a is s for a in operands for s in sources):
            return True
        summed.append(out)
    return False


def _replacement(module: nn.Module, info: BlockInfo) -> nn.Module:
    if info.kind == "shortcut":
        return ShortcutOnly(module.get_submodule(info.shortcut[len(info.name) + 1:]),
                            info.relu, info.outputs, info.keyword, info.passthrough)
    out = Zero(info.outputs, info.keyword, info.passthrough) if info.kind == "branch" else \
        ReluIdentity(info.relu, info.outputs, info.keyword, info.passthrough)
    out.carried = info.carried
    for key, value in vars(module).items():
        # What the model reads of the block besides calling it (ModernBERT's encoder reads
        # each layer's attention_type to pick its mask) stays readable on the stand-in.
        if not key.startswith("_") and key != "training" and not hasattr(out, key):
            setattr(out, key, value)
    if isinstance(module, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer):
        # nn.TransformerEncoder (and the decoder) read their first layer's
        # self_attn.batch_first, and the encoder's fast path the rest: the replacement answers
        # the first, the encoder skips the second.
        out.self_attn = BatchFirst(module.self_attn.batch_first)
    return out


def skip_blocks(model: nn.Module, names: Iterable[str],
                blocks: Sequence[BlockInfo]) -> list[str]:
    """Replace the blocks ``names`` in place; returns those replaced (outer ones first)."""
    by_name = {b.name: b for b in blocks}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown block {unknown[0]!r}; the model's skippable blocks are "
                         f"{', '.join(by_name) or '(none)'}")
    done: list[str] = []
    for name in sorted(set(names), key=lambda n: n.count(".")):
        if any(name.startswith(d + ".") for d in done):
            continue  # inside a block already skipped
        module = model.get_submodule(name)
        if isinstance(module, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer
                      | nn.MultiheadAttention):
            no_fast_path(model)
        model.set_submodule(name, _replacement(module, by_name[name]))
        del module
        done.append(name)
    return done
