"""Layers whose outputs never reach the model's output get no gene (petra.compress.reach)."""

from __future__ import annotations

import torch
from torch import nn

from petra.compress.reach import UNREACHED, _reached, unreached_layers
from petra.config import load_config
from petra.tasks.contract import tensors_in


class Residual(nn.Module):
    """A WaveNet's residual stack: each block's ``res`` conv feeds the next block; the model
    sums only the ``skip`` outputs, so the last block's ``res`` is computed and discarded."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Conv1d(1, 8, 1)
        self.res = nn.ModuleList(nn.Conv1d(8, 8, 1) for _ in range(2))
        self.skip = nn.ModuleList(nn.Conv1d(8, 8, 1) for _ in range(2))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, total = self.inp(x), 0
        for res, skip in zip(self.res, self.skip, strict=True):
            z = torch.tanh(h)
            total = total + skip(z)
            h = h + res(z)
        return self.head(torch.relu(total).mean(-1))


class HardRouter(nn.Module):
    """A router whose argmax picks the expert, with no gradient through it; and a gate of 0."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(4, 2)
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.gated = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pick = self.router(x).argmax(-1, keepdim=True)
        y = torch.where(pick == 0, self.experts[0](x), self.experts[1](x))
        return self.head(y + 0.0 * self.gated(x))


def test_the_discarded_residual_conv_is_kept_whole_with_no_gene():
    from petra.space import model_space

    torch.manual_seed(0)
    model, x = Residual().eval(), torch.randn(4, 1, 16)
    assert unreached_layers(model, (x,), ["inp", "res.0", "res.1", "skip.0", "skip.1",
                                          "head"]) == {"res.1": UNREACHED}
    cfg = load_config({"space": {"pruning": ["none", "magnitude", "l2_channel"],
                                 "layers": {"include": ["*"], "exclude": []},
                                 "quantization": ["none"]}}).space
    space = model_space(cfg, model, (x,))
    assert "layers.res.1.method" not in space and "layers.res.0.method" in space
    assert space.kept_whole["res.1"] == UNREACHED
    assert "res.1" not in [layer.name for layer in space.layers]


def test_a_hard_router_and_a_zero_gate_keep_their_genes():
    torch.manual_seed(0)
    model, x = HardRouter().eval(), torch.randn(16, 4)
    with torch.enable_grad():
        reached = _reached(tensors_in(model(x)))
    # the autograd graph alone would take the router for dead: the perturbation keeps it
    assert id(model.router.weight) not in reached and id(model.gated.weight) in reached
    assert unreached_layers(model, (x,), ["router", "experts.0", "experts.1", "gated",
                                          "head"]) == {}


def test_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model, x = Residual().train(), torch.randn(4, 1, 16)
    model.res[1].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert unreached_layers(model, (x,), ["res.1"]) == {"res.1": UNREACHED}
    assert model.training and not model.res[1].weight.requires_grad
    assert model.head.weight.requires_grad and not model.res[1]._forward_hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
