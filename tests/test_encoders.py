"""Attention-bearing user models beyond BERT. A Perceiver: its latents cross-attend to inputs
of another width."""

from __future__ import annotations

import torch
from torch import nn


class Perceiver(nn.Module):
    """Latents cross-attend to the inputs (``kdim`` and ``vdim`` differ from the latents'
    width), then attend to themselves."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.latents = nn.Parameter(torch.randn(4, 16) * 0.1)
        self.inp = nn.Linear(8, 12)
        self.cross = nn.MultiheadAttention(16, 2, kdim=12, vdim=12, batch_first=True)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.inp(x)
        q = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        h, _ = self.cross(q, kv, kv, need_weights=False)
        return self.head(self.layer(h + q).mean(1))


def test_no_width_gene_where_only_attentions_write_a_verified_stream(tmp_path):
    """torch-pruning merges the inputs' width (12, read by the cross-attention) with the
    latents' (16): every Linear that writes the latent stream fails its check and is withheld.
    The width gene had been offered on the attentions' account (their heads verified), and
    failed candidates (``expecting query weights shape of (24, 24)``)."""
    from petra.config import load_config
    from petra.space import model_space

    model = Perceiver().eval()
    cfg = load_config({"space": {"pruning": ["none", "l2_channel", "l2_heads"],
                                 "sparsity": [0.0, 0.8], "quantization": ["none"]}})
    space = model_space(cfg.space, model, (torch.randn(2, 6, 8),), cache=tmp_path)
    names = {g.name for g in space.genes}
    assert "layers.layer.self_attn.method" in names  # its heads are offered
    assert "layers.inp" in space.withheld and "layers.layer.linear2" in space.withheld
    assert "prune.width" not in names
