"""torch's ``nn.MultiheadAttention`` with fewer heads (:class:`PrunedMultiheadAttention`).

Its fused ``in_proj_weight`` cannot hold fewer heads than ``embed_dim`` allows, so
:func:`petra.compress.attention.prune_heads` replaces a pruned one by this module: the same
computation with separate q, k, v rows of ``heads * head_dim`` in one ``qkv`` projection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def _rows(heads: Sequence[int], head_dim: int) -> list[int]:
    return [h * head_dim + i for h in heads for i in range(head_dim)]


class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with fewer heads: ``qkv`` projects ``embed_dim`` to q, k and
    v of ``heads * head_dim`` each (one MatMul, as the original's ``in_proj``), and
    ``out_proj`` back to ``embed_dim``.

    It takes ``nn.MultiheadAttention``'s arguments and returns ``(output, weights)`` as it does
    (batched inputs): the attention weights of the heads kept, averaged over them with
    ``average_attn_weights``, or None without ``need_weights``. Its
    ``in_proj_bias`` is None, which keeps ``nn.TransformerEncoderLayer`` off its fused fast
    path (that path needs the original's fused parameters).
    """

    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, source: nn.MultiheadAttention, keep: Sequence[int]) -> None:
        super().__init__()
        e, d = source.embed_dim, source.head_dim
        self.embed_dim, self.head_dim, self.num_heads = e, d, len(keep)
        self.batch_first = source.batch_first
        self.dropout = source.dropout
        rows = torch.tensor(_rows(keep, d))
        stacked = torch.cat([rows + i * e for i in range(3)])
        bias = source.in_proj_bias is not None
        self.qkv = nn.Linear(e, len(stacked), bias=bias)
        with torch.no_grad():
            self.qkv.weight.copy_(source.in_proj_weight[stacked])
            if bias:
                self.qkv.bias.copy_(source.in_proj_bias[stacked])
        out = source.out_proj
        self.out_proj = nn.Linear(len(rows), e, bias=out.bias is not None)
        with torch.no_grad():
            self.out_proj.weight.copy_(out.weight[:, rows])
            if out.bias is not None:
                self.out_proj.bias.copy_(out.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, lq, _ = query.shape
        lk = key.shape[1]
        h, d = self.num_heads, self.head_dim
        if query is key and key is value:  # self-attention: one MatMul
            q, k, v = self.qkv(query).chunk(3, dim=-1)
        else:
            w, bias = self.qkv.weight.chunk(3), (self.qkv.bias.chunk(3) if self.qkv.bias
                                                  is not None else (None,) * 3)
            q, k, v = (F.linear(t, w[i], bias[i]) for i, t in enumerate((query, key, value)))
        q = q.reshape(b, lq, h, d).transpose(1, 2)
        k = k.reshape(b, lk, h, d).transpose(1, 2)
        v = v.reshape(b, lk, h, d).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 2 else attn_mask.view(b, h, lq, lk)
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool \
                else scores + mask
        elif is_causal:
            causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        if key_padding_mask is not None:
            pad = key_padding_mask.view(b, 1, 1, lk)
            scores = scores.masked_fill(pad, float("-inf")) if pad.dtype == torch.bool \
                else scores + pad
        weights = F.dropout(scores.softmax(dim=-1), self.dropout, self.training)
        out = (weights @ v).transpose(1, 2).reshape(b, lq, h * d)
        out = self.out_proj(out)
        out = out if self.batch_first else out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, (weights.mean(dim=1) if average_attn_weights else weights)
