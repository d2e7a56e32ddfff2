"""Physical removal of channels and neurons, with dependency handling (torch-pruning DepGraph).

Coupled layers (for example the last conv of a residual block and its shortcut) share one channel
set, a dependency *group*. Each group is pruned once:

- its members are the layers whose output channels it prunes; those with a structured method in
  the genome vote;
- the group's sparsity is the mean of the voters' sparsities, and its criterion is that of the
  first voter in execution order;
- the kept count ``n - round(sparsity * n)`` is rounded to the nearest multiple of ``round_to``
  (at least one multiple, never above ``n``), because odd channel counts run nearly as slowly as
  dense ones on ONNX Runtime (see STACK.md). An ``nn.MultiheadAttention`` in a group is first
  replaced by one whose heads stay whole (:func:`heads_apart`); one petra cannot replace (with
  learned key/value biases) keeps its ``embed_dim`` divisible by its heads (:func:`channel_step`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from petra.compress.channel_counts import (
    channel_step,
    conv_groups,
    grouped_conv,
    kept_channels,
    lowest,
    ties,
)
from petra.compress.graph import (
    GroupDoesNotClose,
    dependency_graph,
    keep_frozen,
    ops_to,
    pruning_group,
)
from petra.compress.kinds import WEIGHTED_LAYERS
from petra.compress.writers import keep_one_each, writer_spans
from petra.errors import Refused, a_kind, first_line, raised_in
from petra.registry import PRUNING

if TYPE_CHECKING:
    from petra.compress.prune import PruneContext
    from petra.compress.sparsity import SparsityRule


#: The modules whose output channels carry gates: the norms, else the layers.
GATED_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def out_channel_members(group: Any) -> list[nn.Module]:
    """The modules whose output channels a torch-pruning group prunes, in group order."""
    out, seen = [], set()
    for dep, _ in group:
        module, name = dep.target.module, getattr(dep.handler, "__name__", "")
        if name == "prune_out_channels" and id(module) not in seen and isinstance(
                module, GATED_NORMS + WEIGHTED_LAYERS):
            seen.add(id(module))
            out.append(module)
    return out


#: A graph traced without a task model: every output it traced is the model's.
ANY_OUTPUT = object()


def channel_groups(graph: Any, ignored: Sequence[nn.Module] = (),
                   skipped: dict[nn.Module, str] | None = None) -> Any:
    """The dependency groups of a torch-pruning graph, rooted at Conv/Linear output channels.

    Like ``DependencyGraph.get_all_groups``, but a group that torch-pruning cannot build (a
    channel dimension shared with an ``nn.GRU``; a GAT's heads, expanded over node pairs, where
    it divides by zero) is skipped, and its layers stay unpruned. So is a group whose channels
    are the model's output, however it is reshaped on the way, and a group whose channels a
    grouped convolution reads one per group (a depthwise conv with a channel multiplier): no
    removal leaves its groups alike (:func:`lowest`). ``skipped`` gets their writers, with why.
    """
    from torch_pruning.ops import OPTYPE

    reasons = ignored
    ignored = list(ignored) + list(graph.IGNORED_LAYERS_IN_TRACING)
    task_output = getattr(graph, "petra_task_output", ANY_OUTPUT)
    visited: set[nn.Module] = set()
    for module in list(graph.module2node):
        if module in ignored or module in visited or not isinstance(module, WEIGHTED_LAYERS):
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        try:
            group = pruning_group(graph, module, pruner.prune_out_channels,
                                  range(pruner.get_out_channels(module)))
        except (IndexError, KeyError, RuntimeError, TypeError) as exc:
            if skipped is not None and isinstance(exc, GroupDoesNotClose):
                skipped[module] = exc.reason
            continue
        except Exception as exc:  # noqa: BLE001 - any other failure of torch-pruning's
            if skipped is not None:
                skipped[module] = (f"torch-pruning fails to build its channel group ("
                                   f"{first_line(exc, 120)}{raised_in(exc, 'torch_pruning')})")
            continue
        members = [dep.target.module for dep, _ in group
                   if graph.is_out_channel_pruning_fn(dep.handler)]
        visited.update(members)
        if any(dep.target.type == OPTYPE.OUTPUT and task_output in (ANY_OUTPUT, dep.target.module)
               for dep, _ in group):
            # the model's output (logits permuted, squeezed or reshaped before they are returned)
            if skipped is not None:
                skipped.update({m: "its output channels are the model's output" for m in members})
            continue
        grouped = next((dep.target.module for dep, _ in group
                        if graph.is_in_channel_pruning_fn(dep.handler)
                        and grouped_conv(dep.target.module)
                        and dep.target.module.in_channels == dep.target.module.groups), None)
        if grouped is not None:
            if skipped is not None:
                skipped.update({m: f"its channels feed a grouped convolution (groups="
                                   f"{grouped.groups}) one channel per group: removing any "
                                   "would leave its groups unlike" for m in members})
            continue
        held = next((m for m in members if m in ignored), None)
        if held is None:
            yield group
        elif skipped is not None:  # a layer that keeps its channels holds the group's
            skipped.update({m: _held_by(graph, held, reasons) for m in members if m is not held})


def _held_by(graph: Any, held: nn.Module, reasons: Any) -> str:
    """Why a group's writers keep their channels where ``held``, whose channels stay, is one
    (``reasons``: the module's reason where channel_groups was given a mapping)."""
    why = f" ({reasons[held]})" if isinstance(reasons, Mapping) and held in reasons else ""
    return f"its channels are also {graph._module2name.get(held, 'a kept layer')}'s, which " \
           f"keeps them{why}"


#: Normalization layers whose presence marks a channel group as the residual stream: a
#: transformer normalizes its hidden state (the stream every block reads and adds to) with them,
#: so their channels are the hidden size (``LayerNorm``, ``nn.RMSNorm``, ``LlamaRMSNorm``, ...).
STREAM_NORMS = ("LayerNorm", "RMSNorm")


def channel_layers(model: nn.Module, example_input: Any, *, errors: list[str] | None = None,
                   why: dict[str, str] | None = None, batchnorm: set[str] | None = None,
                   keep: Mapping[str, str] | None = None) -> tuple[set[str], tuple[str, ...]]:
    """``(structured, residual)``: the layers whose output channels torch-pruning can remove
    with their group, and the writers of the residual stream (the hidden size), if the model has
    one. A model torch-pruning cannot trace has none; the reason is appended to ``errors``, when
    given. ``why``, when given, gets the writers of the groups :func:`channel_groups` skips,
    with why. ``batchnorm``, when given, gets the layers whose group holds an affine BatchNorm
    (what ``bn_scale`` ranks channels by). ``keep`` names layers whose channels stay, with why
    (attention heads' q, k and v projections): no group that holds one is removable.

    The residual stream is the channel group that at least two normalization layers
    (:data:`STREAM_NORMS`) follow and at least two layers write; where several qualify, the one
    with the most writers. Its members (embeddings, every block's output projections) share one
    width, so it is one model-wide gene (``prune.width``), never per-layer votes.
    """
    names = {m: n for n, m in model.named_modules()}
    was_training = model.training
    model.eval()
    try:
        graph = dependency_graph(model, example_input)
    except Exception as exc:  # noqa: BLE001 - a model DepGraph cannot trace gets no channels
        if errors is not None:
            errors.append(f"torch-pruning cannot trace the model ({first_line(exc, 200)}"
                          f"{raised_in(exc, 'torch_pruning')})")
        return set(), ()
    finally:
        model.train(was_training)
    found: set[str] = set()
    residual: tuple[str, ...] = ()
    skipped: dict[nn.Module, str] = {}
    modules = dict(model.named_modules())
    kept = {modules[n]: reason for n, reason in (keep or {}).items() if n in modules}
    for group in channel_groups(graph, kept, skipped=skipped):
        writers = tuple(dict.fromkeys(
            names[dep.target.module] for dep, _ in group
            if graph.is_out_channel_pruning_fn(dep.handler) and dep.target.module in names))
        found.update(writers)
        if batchnorm is not None and any(
                isinstance(dep.target.module, nn.modules.batchnorm._BatchNorm)
                and dep.target.module.affine for dep, _ in group):
            batchnorm.update(writers)
        norms = {dep.target.module for dep, _ in group
                 if type(dep.target.module).__name__.endswith(STREAM_NORMS)}
        if len(norms) >= 2 and len(writers) >= 2 and len(writers) > len(residual):
            residual = writers
    if why is not None:
        why.update({names[m]: reason for m, reason in skipped.items() if m in names})
    return found, residual


def prune_channels(
    model: nn.Module,
    example_input: torch.Tensor,
    plan: Mapping[str, tuple[str, float]],
    *,
    round_to: int = 1,
    protected: Sequence[str] = (),
    ctx: PruneContext | None = None,
    sparsity_rule: SparsityRule | None = None,
    gate: Any = None,
) -> dict[str, tuple[int, int]]:
    """Remove output channels in place, following ``plan``.

    Args:
        model: the model, pruned in place.
        example_input: an input batch, for tracing the dependency graph.
        plan: layer name → (structured method, sparsity). Layers not in it are not voters.
        round_to: kept channel counts are rounded to this multiple.
        protected: layers whose output channels must stay (the classifier).
        ctx: a :class:`petra.compress.prune.PruneContext` passed to the criteria.
        sparsity_rule: None keeps each group's voted sparsity; otherwise a
            :class:`petra.compress.sparsity.SparsityRule` that sets it from the criterion's
            scores (EMP), per group or pooled over the groups.
        gate: for groups whose criterion is trained during the fine-tune (``trained=True``,
            e.g. ``equilibrium``): called as ``gate(name, method, members, n)`` and the group is
            left whole for now (the criterion's ``gates`` metadata builds its gates). None skips
            such groups.

    Returns:
        group root name → (channels before, channels after), for every pruned group.
    """
    if not plan:
        return {}
    modules = dict(model.named_modules())
    model.eval()
    graph = heads_apart(model, example_input, dependency_graph(model, example_input),
                        [modules[n] for n in plan if n in modules])
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    ignored = [modules[n] for n in protected if n in modules]
    scored = _scored_groups(graph, names, ignored, plan, round_to=round_to, ctx=ctx,
                            gate=gate, keep_whole=sparsity_rule is None)
    if sparsity_rule is not None:
        chosen = sparsity_rule.sparsities([s[3] for s in scored])
        scored = [(root, n, sp, scores, step, groups) for (root, n, _, scores, step, groups), sp
                  in zip(scored, chosen, strict=True)]
    changes: dict[str, tuple[int, int]] = {}
    for root, n, sparsity, scores, step, groups in scored:
        keep = kept_channels(n, sparsity, step)
        if keep >= n:
            continue
        idxs = lowest(scores, n - keep, *groups)
        if not idxs:
            continue
        remove_channels(graph, root, idxs)
        changes[names[root]] = (n, n - len(idxs))
    return changes


def _scored_groups(graph: Any, names: Mapping[nn.Module, str], ignored: Sequence[nn.Module],
                   plan: Mapping[str, tuple[str, float]], *, round_to: int, ctx: PruneContext | None,
                   gate: Any, keep_whole: bool
                   ) -> list[tuple[Any, int, float, Any, int, tuple[int, int]]]:
    """``(root, channels, voted sparsity, scores, rounding step, (conv groups, tied block))``
    of each group that ``plan`` votes on, scored on the unpruned model as MetaPruner does.
    Groups of a trained criterion go to ``gate`` instead (left whole where a grouped
    convolution or a tied block is in them: its gates would remove any channels); with
    ``keep_whole``, groups whose vote keeps every channel are left out."""

    order = list(plan)
    scored = []
    for group in channel_groups(graph, ignored):
        members = [names.get(dep.target.module) for dep, _ in group
                   if graph.is_out_channel_pruning_fn(dep.handler)]
        voters = sorted((n for n in members if n in plan), key=order.index)
        if not voters:
            continue
        root = group[0].dep.target.module
        n = graph.get_out_channels(root)
        method = plan[voters[0]][0]
        entry = PRUNING.get(method)
        runs, block = ties(graph, root)
        if entry.meta.get("trained"):
            if gate is not None and conv_groups(group, runs) == block == 1:
                gate(names[root], method, out_channel_members(group), n)
            continue
        sparsity = sum(plan[v][1] for v in voters) / len(voters)
        step = channel_step(group, round_to, runs, block)
        if keep_whole and kept_channels(n, sparsity, step) >= n:
            continue
        scores = entry.fn(group, ctx).detach().flatten()
        if scores.numel() != n:
            raise RuntimeError(f"{method} gave {scores.numel()} scores for {n} channels")
        scored.append((root, n, sparsity, keep_one_each(scores, writer_spans(graph, group, n)),
                       step, (conv_groups(group, runs), block)))
    return scored


def heads_apart(model: nn.Module, example_input: Any, graph: Any, layers: Sequence[nn.Module]
                ) -> Any:
    """``graph``, or the graph again after each ``nn.MultiheadAttention`` in a channel group of
    ``layers`` became a :class:`~petra.compress.mha.PrunedMultiheadAttention` of every head,
    whose widths are apart from its heads'. torch-pruning cut its q, k and v rows at the
    stream's indices too, and the rebuilt attention split the rest into heads in order, mixing
    them (a Conformer at ``prune.width`` 0.25 was 4% off its masked dense model)."""
    from petra.compress.attention import PrunedMultiheadAttention
    from petra.tasks.contract import no_fast_path

    if not any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return graph  # the groups are not built again for nothing
    found: list[nn.Module] = []
    for layer in layers:
        pruner = graph.get_pruner_of_module(layer)
        if pruner is None or not hasattr(pruner, "prune_out_channels"):
            continue
        try:
            group = pruning_group(graph, layer, pruner.prune_out_channels, [0])
        except Exception:  # noqa: BLE001 - a group that does not build is not removed
            continue
        found += [dep.target.module for dep, _ in group
                  if isinstance(dep.target.module, nn.MultiheadAttention)
                  and dep.target.module._qkv_same_embed_dim and dep.target.module.bias_k is None]
    names = {m: n for n, m in model.named_modules()}
    found = list(dict.fromkeys(m for m in found if m in names))
    if not found:
        return graph
    with keep_frozen(model, [names[m] for m in found]):
        for module in found:
            model.set_submodule(names[module], PrunedMultiheadAttention(
                module, range(module.num_heads)))
    no_fast_path(model)
    return dependency_graph(model, example_input)


def check_indices(graph: Any, group: Any) -> None:
    """Raise if torch-pruning maps a group's channels past a member's width: a graph traced
    through ops that it follows wrongly (an attention's packed projection, three times as wide;
    Funnel's per-head ``r_kernel`` of shape (d, heads, d_head)) gives such indices, and a
    criterion that scores the group then fails."""
    dims = {id(u.parameters): u.pruning_dim for u in getattr(graph, "unwrapped_parameters",
                                                             None) or ()}
    for dep, idxs in group:
        module, pruner = dep.target.module, graph.get_pruner_of_module(dep.target.module)
        if pruner is None or not idxs or not isinstance(module, nn.Module | nn.Parameter):
            continue
        if isinstance(module, nn.Parameter):
            dim = dims.get(id(module))
            width = None if dim is None else module.shape[dim]
            kind = f"a parameter of shape {tuple(module.shape)} cut along its dimension {dim}"
        else:
            width = (pruner.get_out_channels(module) if graph.is_out_channel_pruning_fn(
                dep.handler) else pruner.get_in_channels(module))
            kind = f"{a_kind(type(module).__name__)} with {width} channels"
        if width is not None and max(idxs) >= width:
            name = next((f"{n}, " for n, t in [*graph.model.named_modules(),
                                                *graph.model.named_parameters()] if t is module), "")
            ops = ops_to(group, dep)
            raise Refused(f"torch-pruning maps this group's channels past the width of {name}"
                          f"{kind} (to channel {max(idxs)}): " + (
                              f"it follows them wrongly through the operations between them "
                              f"({ops})" if ops else "it takes another of its dimensions for them"))


def remove_channels(graph: Any, root: nn.Module, idxs: Sequence[int]) -> None:
    """Remove output channels ``idxs`` of ``root`` and of every layer coupled to it. A
    ``GroupNorm`` with a group per channel (Wav2Vec2's first conv) keeps one per channel, a
    frozen parameter (a loose one too: a position table) stays frozen, and an ``nn.Transformer``
    takes its stream's new width as its ``d_model`` (``the feature number of src and tgt must
    be equal to d_model`` withheld a seq2seq model's width)."""
    pruner = graph.get_pruner_of_module(root)
    before = pruner.get_out_channels(root)
    group = pruning_group(graph, root, pruner.prune_out_channels, idxs)
    modules = [dep.target.module for dep, _ in group  # and loose parameters (a position table)
               if isinstance(dep.target.module, nn.Module | nn.Parameter)]
    per_channel = [m for m in modules if isinstance(m, nn.GroupNorm) and m.num_groups == m.num_channels]
    names = {id(m): n for n, m in graph.model.named_modules()} | {
        id(p): n.rpartition(".")[0] for p, n in graph._param_to_name.items()}  # their owners'
    with keep_frozen(graph.model, list(dict.fromkeys(names[id(m)] for m in modules if id(m) in names))):
        group.prune()
    for norm in per_channel:
        norm.num_groups = norm.num_channels
    after = pruner.get_out_channels(root)
    if after != before - len(set(idxs)):
        # Phi-3's gate_up_proj, chunked into gate and up: asked to keep 128 of 256, it kept 2
        raise Refused(f"torch-pruning removed {before - after} of the {before} channels "
                      f"where {len(set(idxs))} were asked: it maps them wrongly through "
                      "the forward (a projection chunked, split or viewed as a matrix?)")
    for module in graph.model.modules():  # it checks its inputs' width against d_model
        if isinstance(module, nn.Transformer) and (norm := next((  # a skipped stack has none
                n for n in (getattr(module.encoder, "norm", None),
                            getattr(module.decoder, "norm", None))
                if isinstance(n, nn.LayerNorm)), None)) is not None:
            module.d_model = norm.normalized_shape[0]


def remove_gated_channels(
    model: nn.Module, example_input: torch.Tensor, removals: Mapping[str, Sequence[int]]
) -> dict[str, tuple[int, int]]:
    """Remove the channels ``removals`` names (group root name → channel indices), after a
    trained criterion chose them; returns root name → (channels before, after)."""
    todo = {k: v for k, v in removals.items() if len(v)}
    if not todo:
        return {}
    model.eval()
    graph = dependency_graph(model, example_input)
    changes = {}
    for name, idxs in todo.items():
        root = model.get_submodule(name)
        n = graph.get_out_channels(root)
        idxs = sorted(set(int(i) for i in idxs))[: n - 1]  # never empty a layer
        remove_channels(graph, root, idxs)
        changes[name] = (n, n - len(idxs))
    return changes
