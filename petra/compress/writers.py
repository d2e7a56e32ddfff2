"""Each writer of a channel group keeps a channel.

A group whose channels are concatenated from several layers (an Inception module's branches,
16 + 24 + 12 + 12 channels) maps each writer to a span of the root's channels. A removal that
takes a whole span leaves that layer with no output channel: torch-pruning then builds a conv
whose weight is ``[0, 12, 3, 3]``, and its forward fails. The structure checks remove the
highest-numbered channels, so they emptied the last branches and withheld the whole group,
which a removal by importance can prune (the same Inception module, with its widest branch
last, was offered).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def writer_spans(graph: Any, group: Any, n: int) -> list[list[int]]:
    """The root channels each writer of ``group`` (a group of all ``n`` of its root's channels)
    holds, for the writers that hold fewer than all: one list per layer."""
    spans: dict[int, set[int]] = {}
    for item in getattr(group, "_group", ()):
        target = item.dep.target.module
        if not isinstance(target, nn.Module) or getattr(target, "weight", None) is None \
                or not graph.is_out_channel_pruning_fn(item.dep.handler):
            continue
        roots = getattr(item, "root_idxs", None) or item.idxs
        spans.setdefault(id(target), set()).update(int(r) for r in roots)
    return [sorted(s) for s in spans.values() if 0 < len(s) < n]


def keep_one_each(scores: torch.Tensor, spans: list[list[int]]) -> torch.Tensor:
    """``scores`` with the best channel of each span raised above every other, so that a removal
    of the lowest never takes a whole span (where enough channels are kept for that)."""
    if not spans:
        return scores
    out = scores.detach().clone().float()
    for span in spans:
        idx = torch.tensor(span, device=out.device)
        out[idx[out[idx].argmax()]] = math.inf  # no sync per channel on a GPU
    return out
