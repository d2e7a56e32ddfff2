"""Hugging Face ``Conv1D`` (GPT-2's projections) is taken as the ``nn.Linear`` it computes, so
every gene that takes a Linear takes it (``petra.tasks.contract.linear_stand_ins``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from petra import Task
from petra.candidate.baseline import baseline_key
from petra.config import load_config
from petra.tasks.contract import adapt, linear_stand_ins

pytest.importorskip("transformers")


class LM(nn.Module):
    """A tiny GPT-2 (built from a config: nothing downloaded), its logits out."""

    def __init__(self) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        super().__init__()
        torch.manual_seed(0)
        self.gpt = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=8, n_embd=32,
                                              n_layer=2, n_head=4, attn_implementation="eager"))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.gpt(input_ids=input_ids).logits


def test_gpt2s_conv1d_layers_become_linears_that_compute_the_same():
    model, ids = LM().eval(), torch.randint(0, 32, (2, 8))
    with torch.no_grad():
        want = model(ids)
    names = linear_stand_ins(model, ids)
    assert len(names) == 8 and "gpt.transformer.h.0.mlp.c_fc" in names
    fc = model.gpt.transformer.h[0].mlp.c_fc
    assert type(fc) is nn.Linear and (fc.in_features, fc.out_features) == (32, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want)


def test_a_conv1d_that_computes_something_else_is_left_as_it_is():
    class Conv1D(nn.Module):  # named as Hugging Face's, but it scales what it computes
        def __init__(self) -> None:
            super().__init__()
            self.nf = 4
            self.weight = nn.Parameter(torch.randn(4, 4))
            self.bias = nn.Parameter(torch.zeros(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * (x @ self.weight + self.bias)

    model = nn.Sequential(Conv1D(), nn.Linear(4, 2))
    assert linear_stand_ins(model, torch.randn(3, 4)) == ()
    assert type(model[0]).__name__ == "Conv1D"


def test_gpt2s_space_offers_its_ffn_channels_width_and_blocks():
    """Before, GPT-2's projections got no gene at all, and torch-pruning could not trace it
    while it built its key/value cache (``use_cache``, on by default)."""
    from petra.space import model_space

    ids = torch.randint(0, 32, (4, 8))
    task = adapt(Task(model=LM(), train=[(ids, ids)], val=[(ids, ids)], test=[(ids, ids)],
                      example_input=ids, trained=True))
    assert len(task.linear_stand_ins) == 8
    cfg = load_config({"space": {"pruning": ["none", "magnitude", "l2_channel"],
                                 "quantization": ["none"], "skip_blocks": True,
                                 "layers": {"include": ["*"], "exclude": []}}}).space
    space = model_space(cfg, task.model, task.example_input)
    h0 = "layers.gpt.transformer.h.0"
    assert space.offers(f"{h0}.mlp.c_fc.method", "l2_channel")
    assert space.offers(f"{h0}.attn.c_attn.method", "magnitude")
    assert f"{h0}.attn.c_attn" in space.withheld  # its q, k, v columns fail the head split
    assert "prune.width" in space and "blocks.gpt.transformer.h.1.skip" in space
    assert task.model.gpt.config.use_cache  # the trace's switch is put back


def test_the_baseline_cache_key_tells_stand_ins_apart():
    """A baseline cached before the stand-ins holds Conv1D-shaped (transposed) weights: a
    square one would load into the Linear without an error, and compute something else."""
    assert baseline_key("t", {}, 0) != baseline_key("t", {}, 0, ("fc",))
    assert baseline_key("t", {}, 0) == baseline_key("t", {}, 0, ())
