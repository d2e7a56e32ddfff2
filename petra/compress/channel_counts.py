"""How many channels a removal keeps, and which, where its group constrains them: the runs of
a grouped convolution, a GroupNorm or a chunked projection that must stay alike, and the step
its kept count rounds to (:mod:`petra.compress.structured` removes them)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from petra.compress.graph import pruning_group
from petra.compress.kinds import CONV_LAYERS


def channel_step(group: Any, round_to: int, runs: int = 1, block: int = 1) -> int:
    """``round_to``, made a multiple of the heads of each ``nn.MultiheadAttention`` in
    ``group`` (its ``embed_dim``), of :func:`conv_groups` and of ``block`` (:func:`ties`)."""
    step = round_to
    for dep, _ in group:
        if isinstance(module := dep.target.module, nn.MultiheadAttention):
            step = math.lcm(step, module.num_heads)
    return math.lcm(step, conv_groups(group, runs), block)


def conv_groups(group: Any, runs: int = 1) -> int:
    """How many equal runs the channels of ``group`` (all of its root's) fall in, each of which
    a removal must leave alike: the group counts of its grouped convolutions (not depthwise
    ones), whose channels it writes or reads, of its GroupNorms (not one group per channel: a
    GroupNorm regroups the channels it keeps in order, so each group must keep as many), and
    ``runs`` (:func:`ties`); 1 where it has none. A member with fewer channels than the
    root, a whole number of times fewer (a grouped conv reading the output of ``F.glu``, whose
    halves are the root's tied runs), splits each of those runs in its groups."""
    count, n = runs, len(group[0].idxs) if len(group) else 0
    for dep, _ in group:
        if grouped_conv(module := dep.target.module):
            groups, m = module.groups, (module.out_channels if getattr(
                dep.handler, "__name__", "") == "prune_out_channels" else module.in_channels)
        elif isinstance(module, nn.GroupNorm) and 1 < module.num_groups < module.num_channels:
            groups, m = module.num_groups, module.num_channels
        else:
            continue
        count = math.lcm(count, groups * (n // m if 0 < m < n and n % m == 0 else 1))
    return count


def ties(graph: Any, root: nn.Module) -> tuple[int, int]:
    """``(runs, block)``: how ``root``'s output channels go together, 1 each where they do not.

    ``runs``: equal runs whose same offsets go together, a projection chunked in two and
    multiplied (Phi-3's ``gate_up_proj``, a fused SwiGLU). torch-pruning takes a channel of
    either half with its twin in the other, so a removal chosen over all of them took up to
    twice as many as asked (128 asked of 256: 254 went); chosen as the same offsets of every
    run, it takes what it asks. ``block``: consecutive channels that go together, the r * r
    channels a pixel shuffle makes one channel of (:func:`lowest` takes whole blocks)."""
    pruner = graph.get_pruner_of_module(root)
    n = pruner.get_out_channels(root)
    group = pruning_group(graph, root, pruner.prune_out_channels, [0])
    own = sorted({int(i) for dep, idxs in group if dep.target.module is root
                  and graph.is_out_channel_pruning_fn(dep.handler) for i in idxs})
    k = len(own)
    if k > 1 and n % k == 0 and own == [j * (n // k) for j in range(k)]:
        return k, 1
    return (1, k) if k > 1 and n % k == 0 and own == list(range(k)) else (1, 1)


def lowest(scores: torch.Tensor, count: int, groups: int = 1, block: int = 1) -> list[int]:
    """The ``count`` channels of lowest score; across ``groups`` equal runs of channels (a
    grouped convolution's), the same offsets in every run, by each offset's score summed over
    the runs, ``count`` rounded down to a multiple of ``groups``. torch-pruning narrows a
    grouped convolution's input by the offsets it keeps in the first run, and its output per
    run, so any other removal fails or misreads the inputs. With ``block``, whole blocks of
    that many consecutive channels, by their scores summed (``count`` rounded down to them)."""
    if block > 1:
        blocks = scores.reshape(-1, block).sum(1)
        picked = lowest(blocks, count // block, groups if blocks.numel() % groups == 0 else 1)
        return sorted(b * block + k for b in picked for k in range(block))
    if groups == 1:
        return torch.argsort(scores, stable=True)[:count].tolist()
    size = scores.numel() // groups
    offsets = torch.argsort(scores.reshape(groups, size).sum(0), stable=True)[: count // groups]
    return sorted(g * size + int(j) for g in range(groups) for j in offsets)


def kept_channels(n: int, sparsity: float, round_to: int) -> int:
    """How many of ``n`` channels survive ``sparsity``, rounded to a multiple of ``round_to``."""
    keep = max(1, n - int(round(sparsity * n)))
    if round_to > 1 and n > round_to:
        keep = max(round_to, int(round(keep / round_to)) * round_to)
    return min(keep, n)


def grouped_conv(module: Any) -> bool:
    """Whether ``module`` is a grouped convolution that is not depthwise."""
    return isinstance(module, CONV_LAYERS) and module.groups > 1 and not (
        module.groups == module.in_channels == module.out_channels)
