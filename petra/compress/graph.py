"""torch-pruning's dependency graph, as petra builds it: it knows the layers petra adds or
prunes its own way (:class:`~petra.compress.attention.PrunedMultiheadAttention`, ``nn.GRU``,
``nn.LSTM``), and it sees each multi-head attention and recurrent layer as one node, not as
its internal ops."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from petra.compress.attention import PrunedMultiheadAttention
from petra.compress.broadcasts import cutting_broadcasts
from petra.compress.index_maps import guard_index_mappings, map_pixel_shuffles
from petra.compress.kinds import is_op_node
from petra.compress.norms import norm_pruners
from petra.tasks.contract import tensors_in


def dependency_graph(model: nn.Module, example_inputs: Any) -> Any:
    """torch-pruning's ``DependencyGraph`` of ``model``, built on ``example_inputs``, which
    knows :class:`PrunedMultiheadAttention`: channels of the stream it reads are removed from
    its ``qkv`` columns, and channels of what it writes from its ``out_proj`` rows. Traced
    through, its separate q, k and v inputs (a model that normalizes the stream once per
    input) reach ``qkv`` by ``F.linear`` on chunks, which torch-pruning cannot follow.

    It knows ``nn.GRU`` and ``nn.LSTM`` as petra prunes them (:func:`_recurrent_pruner`):
    torch-pruning has no GRU pruner, so a GRU's output concatenated with another branch failed
    the whole graph; it traces a bidirectional LSTM in pieces, and its LSTM pruner lets another
    layer's channel group remove an LSTM's input columns or units through ``h_n``. It knows the
    norms it does not know itself (an RMSNorm: :mod:`petra.compress.norms`)."""
    import torch_pruning as tp

    guard_index_mappings()
    roots: dict[str, Any] = {}
    with _as_leaves(model), _all_trainable(model), _glu_as_halves():
        try:
            graph = cutting_broadcasts(tp.DependencyGraph()).build_dependency(
                model, example_inputs=example_inputs, verbose=False,
                forward_fn=_every_output(roots) if hasattr(model, "outputs") else None,
                customized_pruners={PrunedMultiheadAttention: _pruned_attention_pruner(),
                                    nn.GRU: _recurrent_pruner(nn.GRU),
                                    nn.LSTM: _recurrent_pruner(nn.LSTM),
                                    **norm_pruners(model)})
        except Exception:
            # torch-pruning retries a failed ``model(*inputs)`` as ``model(inputs)``, and
            # raises what the retry raised (a wrong argument count): raise the first failure
            if isinstance(example_inputs, (tuple, list)):
                model(*example_inputs)
            raise
    map_pixel_shuffles(graph)
    if roots:  # only the task's output protects channels (see _every_output)
        graph.petra_task_output = next((n.module for n in graph.module2node.values()
                                        if n.grad_fn is roots["task"]), None)
    return graph


@contextlib.contextmanager
def _glu_as_halves() -> Iterator[None]:
    """``F.glu`` (and ``nn.GLU``) computed as ``a * sigmoid(b)`` of the input's two halves while
    torch-pruning traces the model: one ``glu`` op is element-wise to it, which tied the
    output's channels to the first half of the input's (a Conformer's pointwise conv then lost
    channels its depthwise conv still expected). Split, each output channel takes its two input
    channels with it."""
    from torch.nn import functional

    original = functional.glu

    def glu(input: torch.Tensor, dim: int = -1) -> torch.Tensor:  # noqa: A002 - F.glu's name
        a, b = input.chunk(2, dim=dim)
        return a * torch.sigmoid(b)

    functional.glu = glu
    try:
        yield
    finally:
        functional.glu = original


@contextlib.contextmanager
def _all_trainable(model: nn.Module) -> Iterator[None]:
    """Every parameter requires grad while torch-pruning traces the model, then as it was.
    torch-pruning follows the autograd graph, where a frozen parameter leaves no node:
    Whisper's encoder freezes its position table (``requires_grad_(False)``), the table kept
    its width while the stream's shrank (``The size of tensor a (10) must match the size of
    tensor b (48)``), and the encoder's width was withheld. So would any frozen layer be."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _every_output(roots: dict[str, Any]) -> Any:
    """A forward for the trace of a :class:`~petra.tasks.contract.TaskModel`: its output, then
    every other tensor its user model returned. Traced from the task's output alone, an
    auxiliary head that the task does not read (but the model still computes) was left out of
    the graph, and the layers that feed it lost channels without it (``mat1 and mat2 shapes
    cannot be multiplied``). Only the task's output is exported, so only its channels are the
    model's output: ``roots["task"]`` gets its ``grad_fn``."""

    def forward(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
        made: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: made.extend(tensors_in(o)))
                 for m in model.modules() if m is not model]
        try:
            out, raw = model.outputs(*((inputs,) if isinstance(inputs, torch.Tensor)
                                       else inputs))
        finally:
            for h in hooks:
                h.remove()
        roots["task"] = out.grad_fn
        kept = [out, *(t for t in tensors_in(raw) if t is not out and t.grad_fn is not None)]
        return kept + _unread(made, kept)

    return forward


def _unread(made: list[torch.Tensor], outputs: list[torch.Tensor]
            ) -> list[torch.Tensor]:
    """The outputs of module calls in ``made`` (every call's tensors, in order) of which nothing the
    model returns was computed: a Hugging Face encoder's pooler (CLIP's ``post_layernorm``,
    BERT's ``pooler``) when the model reads ``last_hidden_state``. Traced from the outputs
    alone, torch-pruning left them out of the graph, and the stream lost channels they still
    read (``Given normalized_shape=[48] ... got input of size [16, 10]``): the width gene was
    withheld. So are the unread outputs of a call of which another is read: a WaveNet block's
    stream ``x + res(z)``, unread after the last block, beside its read skip output (the last
    ``res`` conv kept its width while the stream's shrank). A GRU's unread final state comes
    from the node that made its sequence, which is in the graph already."""
    seen: set[Any] = set()
    todo = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo.extend(next_fn for next_fn, _ in fn.next_functions)
    unread = []
    for t in made:
        if t.grad_fn is not None and t.grad_fn not in seen:
            seen.add(t.grad_fn)
            unread.append(t)
    return unread


#: A channel group may hold this many dependencies per node of the graph before it is taken
#: as one that never closes. The largest group of the built-in tasks and of GPT-2 and Llama
#: (text_bert's residual stream: 143 over 353 nodes) holds under half a dependency per node.
GROUP_STEPS_PER_NODE = 4
_GROUP_LOCK = threading.Lock()


class GroupDoesNotClose(RuntimeError):
    """torch-pruning's channel group from a layer grew past :data:`GROUP_STEPS_PER_NODE`, or
    its indices past the model's widest dimension; ``reason`` says which, of the layer."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def pruning_group(graph: Any, module: nn.Module, pruning_fn: Any, idxs: Sequence[int]) -> Any:
    """``graph.get_pruning_group(module, pruning_fn, idxs)``, or a ``RuntimeError`` where the
    group does not close (:class:`GroupDoesNotClose`): on a grouped-query attention (Llama with fewer key/value heads),
    torch-pruning's index mappings through ``repeat_kv``'s expand and reshape give new indices
    at every turn of a cycle, and it followed them forever."""
    from torch_pruning.dependency.group import Group

    limit = GROUP_STEPS_PER_NODE * len(graph.module2node) + 64
    widest = 2 * max((max(p.shape) for p in graph.model.parameters() if p.dim()), default=0) + 64
    original = Group.add_dep

    def add_dep(group: Any, dep: Any, idxs: Any) -> None:
        if len(group._group) >= limit:
            raise GroupDoesNotClose(
                f"torch-pruning's channel group of {type(module).__name__} did not close after "
                f"{limit} dependencies", "torch-pruning's channel group from it never closes "
                "(its index mappings go round a cycle, as through Llama's grouped key/value heads)")
        if len(idxs) > widest:  # a Gram matrix over channels: 179 s of mapping, not 8
            ops = ops_to([*group, (dep, idxs)], dep)
            raise GroupDoesNotClose(
                f"torch-pruning maps the channels of {type(module).__name__} to {len(idxs)} "
                "indices, more than any dimension of the model has", f"torch-pruning maps its "
                f"channels to {len(idxs)} indices, more than any dimension of the model has: "
                "it follows them wrongly through the operations between them "
                f"({ops or 'none it names'})")
        original(group, dep, idxs)

    with _GROUP_LOCK:
        Group.add_dep = add_dep
        try:
            return graph.get_pruning_group(module, pruning_fn, list(idxs))
        finally:
            Group.add_dep = original


def ops_to(group: Any, last: Any) -> str:
    """The operations torch-pruning followed from the group's root to ``last``'s target, by
    their autograd names (``mul, unsqueeze, scatter, softmax, topk``: an MoE's gates, where it
    took the router's 4 outputs for the 32 channels of the stream); the last 8. A node's own
    tie (a depthwise conv's outputs to its inputs) is no step."""
    came = {d.target: d.source for d, _ in reversed(list(group)) if d.source is not d.target}
    ops, node = [], last.source
    while node not in ops and came.get(node, node) is not node:
        ops.append(node)
        node = came[node]
    names = [op_name(n.name) for n in reversed(ops) if is_op_node(n.module)]
    return ", ".join(names[-8:])


def op_name(node: str) -> str:
    """``_ElementWiseOp_7(MulBackward0)`` reads ``mul``; ``_ConcatOp_3()``, ``concat``."""
    grad = re.search(r"\((\w+?)Backward\d*\)", node)
    if grad:
        return grad.group(1).lower()
    return re.sub(r"Op$", "", re.sub(r"_\d+$", "", node.split("(")[0]).strip("_")).lower()


@contextlib.contextmanager
def _as_leaves(model: nn.Module) -> Iterator[None]:
    """While the graph is traced, each ``nn.MultiheadAttention`` and
    :class:`PrunedMultiheadAttention` of ``model`` runs a stand-in whose output is its query
    (plus its key and value, pooled over their sequence, when they are other tensors), so
    torch-pruning sees the attention as one node between the streams it reads and the stream
    it writes, and not its internal ops.

    Traced through, those ops link the output to the input through the packed q, k, v
    projection, three times as wide: a stream group then got 96 indices for 32 channels
    (``IndexError`` in the channel scores) once one attention of a ``batch_first`` encoder
    had lost heads, and a pruned attention's ``qkv`` columns were narrowed twice, by its own
    pruner and as a traced ``nn.Linear``. An attention whose input and output widths differ is
    traced as it is.

    An ``nn.GRU`` and an ``nn.LSTM`` (not a subclass) run a stand-in too
    (:func:`_recurrent_stand_in`): torch runs a GRU on CPU as ops per time step, and a
    bidirectional LSTM as one op per direction, where torch-pruning's groups break."""
    patched = []
    # A Hugging Face decoder builds a key/value cache by default (GPT-2's ``use_cache``): its
    # concatenations hold no channels of the model's, and torch-pruning cannot size them
    configs = {id(c): c for m in model.modules()
               if getattr(c := getattr(m, "config", None), "use_cache", False) is True}
    for config in configs.values():
        config.use_cache = False
    for module in model.modules():
        if type(module) in (nn.GRU, nn.LSTM):
            module.forward = _recurrent_stand_in(module)
            patched.append(module)
            continue
        if isinstance(module, PrunedMultiheadAttention):
            same = module.qkv.in_features == module.out_proj.out_features
        elif isinstance(module, nn.MultiheadAttention):
            same = bool(module._qkv_same_embed_dim)
        else:
            continue
        if same:
            module.forward = _attention_stand_in(module)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
        for config in configs.values():
            config.use_cache = True


def _attention_stand_in(module: nn.Module) -> Any:
    """An attention's forward for tracing, with ``nn.MultiheadAttention``'s arguments. Where
    the real one returns attention weights (``need_weights``), so does this, of their shape
    and linked to nothing (they hold no channels), so a model that reads them still runs."""
    real_weights = isinstance(module, (nn.MultiheadAttention, PrunedMultiheadAttention))

    def forward(query: torch.Tensor, key: torch.Tensor | None = None,
                value: torch.Tensor | None = None, key_padding_mask: Any = None,
                need_weights: bool = True, attn_mask: Any = None,
                average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        scale = torch.ones(query.shape[-1], dtype=query.dtype, device=query.device,
                           requires_grad=True)
        out = query * scale
        time = 1 if getattr(module, "batch_first", False) and query.dim() == 3 else 0
        others = {id(t): t for t in (key, value) if t is not None and t is not query}
        for other in others.values():  # cross-attention: q, k and v share the input columns
            out = out + other.mean(dim=time, keepdim=True)
        if not (real_weights and need_weights):
            return out, None
        lq = query.shape[time]
        lk = (key if key is not None else query).shape[time]
        batch = () if query.dim() == 2 else (query.shape[1 - time],)
        heads = () if average_attn_weights else (module.num_heads,)
        return out, query.new_full((*batch, *heads, lq, lk), 1.0 / lk)

    return forward


def _recurrent_stand_in(module: nn.Module) -> Any:
    """A GRU's or an LSTM's forward for tracing: an output of its width whose every channel
    reads every input channel (a mean, which torch-pruning passes indices through), and
    ``h_n`` stacked from each direction's block of the output's last step (an LSTM's ``c_n``
    too, unless it is projected: then ``c_n`` links to nothing). A packed sequence runs the
    layer itself."""
    original = type(module).forward

    def forward(input: Any, hx: Any = None) -> Any:
        if not isinstance(input, torch.Tensor):
            return original(module, input, hx)
        units, blocks = _units(module), len(directions(module))
        scale = torch.ones(units * blocks, dtype=input.dtype, device=input.device,
                           requires_grad=True)
        out = input.mean(-1, keepdim=True) * scale
        last = out[:, -1] if input.dim() == 3 and module.batch_first else out[-1]
        # One block per direction, split along dim 1 with explicit sizes, which torch-pruning
        # reads (it cannot read an int split's): the real h_n[-1] of a bidirectional layer is
        # one direction wide, and torch.cat([h_n[-2], h_n[-1]]) must add up to its reader.
        h_n = torch.stack(list(last.split([units] * blocks, dim=last.dim() - 1))
                          * module.num_layers)
        if isinstance(module, nn.GRU):
            return out, h_n
        c_n = h_n if units == module.hidden_size else h_n.new_zeros(
            *h_n.shape[:-1], module.hidden_size)
        return out, (h_n, c_n)

    return forward


def _pruned_attention_pruner() -> Any:
    """torch-pruning's pruning functions for :class:`PrunedMultiheadAttention`: its input and
    output widths are independent (q, k and v keep their heads), so there is no intra-layer
    dependency."""
    import torch_pruning as tp

    class Pruner(tp.pruner.BasePruningFunc):
        TARGET_MODULES = (PrunedMultiheadAttention,)

        def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            tp.prune_linear_in_channels(layer.qkv, list(idxs))
            return layer

        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            tp.prune_linear_out_channels(layer.out_proj, list(idxs))
            layer.embed_dim = layer.out_proj.out_features
            return layer

        def get_in_channels(self, layer: nn.Module) -> int:
            return int(layer.qkv.in_features)

        def get_out_channels(self, layer: nn.Module) -> int:
            return int(layer.out_proj.out_features)

    return Pruner()


def _recurrent_pruner(cell: type[nn.Module]) -> Any:
    """torch-pruning's pruning functions for ``nn.GRU`` (it has none) or ``nn.LSTM`` (in place
    of its own). Its output width is its units times its directions. Its input columns go with
    the channels of the layer that feeds it (every direction of its first layer reads the
    input). Its units are removed by ``l2_units``
    (:func:`petra.compress.recurrent.prune_units`), never as a member of another layer's
    channel group: that raises, and the verification withholds the group."""
    import torch_pruning as tp

    kind = cell.__name__
    article = "an" if kind == "LSTM" else "a"

    class Pruner(tp.pruner.BasePruningFunc):
        TARGET_MODULES = (cell,)

        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            raise ValueError(f"{article} {kind}'s units go with l2_units, not with another "
                             "layer's channels")

        def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            drop = set(int(i) for i in idxs)
            keep = [i for i in range(layer.input_size) if i not in drop]
            for suffix in directions(layer):
                name = f"weight_ih_l0{suffix}"
                weight = getattr(layer, name)
                setattr(layer, name, nn.Parameter(weight.data[:, keep].clone(),
                                                  requires_grad=weight.requires_grad))
            layer.input_size = len(keep)
            layer._init_flat_weights()
            return layer

        def get_in_channels(self, layer: nn.Module) -> int:
            return int(layer.input_size)

        def get_out_channels(self, layer: nn.Module) -> int:
            return int(_units(layer)) * len(directions(layer))

    return Pruner()


def directions(layer: nn.Module) -> tuple[str, ...]:
    """The suffixes of a recurrent layer's per-direction weights: ``""``, and ``"_reverse"``
    when it is bidirectional."""
    return ("", "_reverse") if layer.bidirectional else ("",)


def _units(layer: nn.Module) -> int:
    """How wide one direction of a recurrent layer's output is: its ``proj_size`` if it has
    one, else its ``hidden_size``."""
    return getattr(layer, "proj_size", 0) or layer.hidden_size


@contextlib.contextmanager
def keep_frozen(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """The frozen parameters of the modules ``names`` (and their submodules) stay frozen
    through what the block does: torch-pruning's new parameters require grad. A module
    replaced under the same name (an ``nn.MultiheadAttention`` rebuilt with fewer heads)
    stays frozen where all of its parameters were."""
    before = {}
    for name in names:
        params = dict(model.get_submodule(name).named_parameters())
        before[name] = ({n for n, p in params.items() if not p.requires_grad},
                        bool(params) and not any(p.requires_grad for p in params.values()))
    yield
    for name, (frozen, whole) in before.items():
        for n, p in model.get_submodule(name).named_parameters():
            if whole or n in frozen:
                p.requires_grad_(False)
