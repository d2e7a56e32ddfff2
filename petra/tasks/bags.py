"""``nn.EmbeddingBag`` as the embedding lookup and pooling it computes.

torch exports an ``nn.EmbeddingBag`` to ONNX as a loop over the bags around a ``Gather``: no
gene reached its table (an embedding gene takes an ``nn.Embedding``), int8 schemes left it
float (they quantize a ``Gather`` of a table), and ONNX Runtime ran the loop. A bag read as a
2-D batch of ids, without offsets or per-sample weights, is an ``nn.Embedding`` followed by a
sum, mean or max over each row: :func:`bag_stand_ins` puts that in its place, with the same
table, so the table is an embedding like any other (low-rank, magnitude, int8 per row) and the
graph is ``Gather`` then ``ReduceMean``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from petra.tasks.stand_ins import swap_if_unchanged


class BagOfEmbeddings(nn.Module):
    """An ``nn.EmbeddingBag``'s lookup (``table``) and its pooling over each row of ids."""

    def __init__(self, bag: nn.EmbeddingBag) -> None:
        super().__init__()
        self.table = nn.Embedding(bag.num_embeddings, bag.embedding_dim,
                                  device=bag.weight.device, dtype=bag.weight.dtype)
        with torch.no_grad():
            self.table.weight.copy_(bag.weight)
        self.table.weight.requires_grad_(bag.weight.requires_grad)
        self.mode = bag.mode

    def forward(self, ids: torch.Tensor, offsets: Any = None,
                per_sample_weights: Any = None) -> torch.Tensor:
        if offsets is not None or per_sample_weights is not None or ids.dim() != 2:
            raise ValueError("a bag of embeddings takes a 2-D batch of ids only")
        rows = self.table(ids)
        if self.mode == "sum":
            return rows.sum(1)
        return rows.mean(1) if self.mode == "mean" else rows.amax(1)


def _fits(bag: nn.Module) -> bool:
    return (type(bag) is nn.EmbeddingBag and bag.padding_idx is None and not bag.max_norm
            and not bag.include_last_offset and bag.mode in ("sum", "mean", "max"))


def bag_stand_ins(model: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[str, ...]:
    """Replace, in place, each ``nn.EmbeddingBag`` of ``model`` (which takes ``inputs``
    positionally) by a :class:`BagOfEmbeddings`, and return their names. Where the model then
    fails or computes anything else (a bag called with offsets, per-sample weights or 1-D ids),
    each bag is tried alone, and kept where the model then computes the same."""
    found = [(name, m) for name, m in model.named_modules() if name and _fits(m)]
    return swap_if_unchanged(model, inputs, found, BagOfEmbeddings, rtol=1e-5, atol=1e-6)
