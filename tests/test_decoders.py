"""Hugging Face decoders as user models. GPT-2: its ``Conv1D`` projections are taken as the
``nn.Linear`` they compute (``petra.tasks.stand_ins.linear_stand_ins``), so every gene that takes a
Linear takes them, and its fused q, k, v projection loses whole heads
(``petra.compress.attention``). GPT-NeoX: its fused projection is laid out by head. Llama: its
attention's head count is its config's; a grouped key/value attention loses a key/value head with
its query heads, and torch-pruning, which follows its channels round a cycle forever, is stopped
with the reason."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from petra import Task
from petra.candidate.baseline import baseline_key
from petra.config import load_config
from petra.tasks.contract import adapt
from petra.tasks.stand_ins import linear_stand_ins

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


@torch.no_grad()
def zeroed(model: nn.Module, ids: torch.Tensor, output: str, columns: slice) -> torch.Tensor:
    """What ``model`` gives with ``columns`` of the output projection ``output`` zeroed: the
    heads they belong to removed, as a head removal must compute."""
    masked = copy.deepcopy(model)
    masked.get_submodule(output).weight[:, columns] = 0.0
    return masked(ids)


def test_gpt2s_conv1d_layers_become_linears_that_compute_the_same():
    model, ids = LM().eval(), torch.randint(0, 32, (2, 8))
    with torch.no_grad():
        want = model(ids)
    names = linear_stand_ins(model, (ids,))
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
    assert linear_stand_ins(model, (torch.randn(3, 4),)) == ()
    assert type(model[0]).__name__ == "Conv1D"


def test_gpt2s_space_offers_its_ffn_channels_width_and_blocks():
    """Before, GPT-2's projections got no gene at all, and torch-pruning could not trace it
    while it built its key/value cache (``use_cache``, on by default)."""
    from petra.space import model_space

    ids = torch.randint(0, 32, (4, 8))
    task = adapt(Task(model=LM(), train=[(ids, ids)], val=[(ids, ids)], test=[(ids, ids)],
                      example_input=ids, trained=True))
    assert len(task.linear_stand_ins) == 8
    cfg = load_config({"space": {"pruning": ["none", "magnitude", "l2_channel", "l2_heads"],
                                 "quantization": ["none"], "skip_blocks": True,
                                 "layers": {"include": ["*"], "exclude": []}}}).space
    space = model_space(cfg, task.model, task.example_input)
    h0 = "layers.gpt.transformer.h.0"
    assert space.offers(f"{h0}.mlp.c_fc.method", "l2_channel")
    assert space.offers(f"{h0}.attn.c_attn.method", "magnitude")
    # its q, k, v rows go a head at a time: kept whole for channels, and never tried
    assert f"{h0}.attn.c_attn" not in space.withheld
    assert "its units are the attention's heads" in space.kept_whole[h0[len("layers."):] + ".attn.c_attn"]
    assert space.offers(f"{h0}.attn.method", "l2_heads")  # whole heads do not
    assert "prune.width" in space and "blocks.gpt.transformer.h.1.skip" in space
    assert task.model.gpt.config.use_cache  # the trace's switch is put back


def test_the_baseline_cache_key_tells_stand_ins_apart():
    """A baseline cached before the stand-ins holds Conv1D-shaped (transposed) weights: a
    square one would load into the Linear without an error, and compute something else."""
    assert baseline_key("t", {}, 0) != baseline_key("t", {}, 0, ("fc",))
    assert baseline_key("t", {}, 0) == baseline_key("t", {}, 0, ())
    assert baseline_key("t", {}, 0, (), ("conv",)) != baseline_key("t", {}, 0)  # baked weights


def test_gpt2s_fused_attention_loses_whole_heads_as_the_masked_model_computes():
    """Removing heads from the fused ``c_attn`` (``[q | k | v]``) and ``c_proj`` gives what the
    whole model gives with those heads' ``c_proj`` columns zeroed, in torch and in ONNX
    Runtime; the attention's ``split_size`` follows."""
    import numpy as np

    from petra.candidate import artifact
    from petra.compress.attention import attention_layers, prune_heads

    model, ids = LM().eval(), torch.randint(0, 32, (2, 8))
    linear_stand_ins(model, (ids,))
    infos = attention_layers(model, (ids,))
    assert [(i.name, i.heads, i.head_dim, i.fused) for i in infos] == [
        (f"gpt.transformer.h.{b}.attn", 4, 8, f"gpt.transformer.h.{b}.attn.c_attn")
        for b in (0, 1)]
    want = zeroed(model, ids, "gpt.transformer.h.0.attn.c_proj", slice(8, 24))
    prune_heads(model, infos[0], [1, 2])
    attn = model.gpt.transformer.h[0].attn
    assert (attn.c_attn.out_features, attn.c_proj.in_features, attn.split_size) == (48, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want, atol=1e-5, rtol=1e-4)
    got = artifact.load(artifact.pack(artifact.export_onnx(model, (ids,)))).run(
        None, {"input": ids.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-3)


class Interleaved(nn.Module):
    """A fused attention laid out by head (``[q_h k_h v_h]`` per head, as GPT-NeoX's
    ``query_key_value``): removing heads as ``[q | k | v]`` rows would still run, and compute
    something else."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim = 4, 8
        self.qkv = nn.Linear(32, 96)
        self.proj = nn.Linear(32, 32)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return qkv.view(*qkv.shape[:2], self.num_heads, 3, self.head_dim).unbind(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (z.transpose(1, 2) for z in self.split(self.qkv(x)))
        att = (q @ k.transpose(-1, -2) / self.head_dim ** 0.5).softmax(-1) @ v
        return self.proj(att.transpose(1, 2).reshape(b, t, -1))


class Stacked(Interleaved):
    """The same attention laid out as ``[q | k | v]`` (timm's ``qkv``)."""

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return qkv.view(*qkv.shape[:2], 3, self.num_heads, self.head_dim).unbind(2)


class HeadMinor(Interleaved):
    """``[q | k | v]`` with each head's channels strided (channel ``c`` of head ``h`` at
    ``c * heads + h``): a head is neither a block of rows nor a block of each third."""

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = qkv.view(*qkv.shape[:2], 3, self.head_dim, self.num_heads).unbind(2)
        return tuple(z.transpose(-1, -2) for z in parts)


class Classifier(nn.Module):
    def __init__(self, attention: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.attn, self.head = attention(), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x).mean(1))


@pytest.mark.parametrize(("attention", "by_head"), [(Stacked, False), (Interleaved, True)])
def test_a_fused_attention_loses_heads_as_its_layout_says(attention, by_head):
    """The layout is told by what a removal computes: both lose whole heads, as the model
    with those heads' output columns zeroed computes."""
    from petra.compress.attention import attention_layers, prune_heads

    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    model = Classifier(attention).eval()
    [info] = attention_layers(model, (x,))
    assert (info.name, info.heads, info.fused, info.output, info.by_head) == (
        "attn", 4, "attn.qkv", "attn.proj", by_head)
    with torch.no_grad():
        masked = copy.deepcopy(model)
        masked.attn.proj.weight[:, 8:24] = 0.0
        want = masked(x)
        prune_heads(model, info, [1, 2])
        assert model.attn.qkv.out_features == 48
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-4)


def test_a_fused_projection_is_offered_heads_not_channels():
    """Channel by channel, a timm-style ``qkv`` (reshaped with ``-1``) ran at the space's
    largest sparsity, where every row went, and failed at 0.5 (``shape '[.., 3, 4, -1]' is
    invalid``): its units are the heads, and its channels are kept whole with that reason."""
    from petra.space import model_space

    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    cfg = load_config({"space": {"pruning": ["none", "magnitude", "l2_channel", "l2_heads"],
                                 "quantization": ["none"]}}).space
    space = model_space(cfg, Classifier(Stacked).eval(), (x,))
    assert space.gene("layers.attn.method").choices == ("none", "l2_heads")
    assert space.gene("layers.attn.qkv.method").choices == ("none", "magnitude")
    assert "its units are the attention's heads" in space.kept_whole["attn.qkv"]


def test_a_fused_attention_laid_out_neither_way_is_refused_with_the_reason():
    from petra.compress.attention import attention_layers

    torch.manual_seed(0)
    why: dict[str, str] = {}
    assert attention_layers(Classifier(HeadMinor).eval(), (torch.randn(2, 5, 32),), why=why) == []
    assert "laid out neither as [q | k | v] nor by head" in why["attn"]


class NeoX(nn.Module):
    """A tiny GPT-NeoX (Pythia's architecture): ``query_key_value`` laid out by head, its
    output projection ``dense``, and no head count of its own (its config's)."""

    def __init__(self) -> None:
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        super().__init__()
        torch.manual_seed(0)
        self.llm = GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=8, attn_implementation="eager"))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llm(input_ids=input_ids).logits


def test_gpt_neoxs_attention_laid_out_by_head_loses_whole_heads():
    """Before, its heads were not offered: no head-count attribute, no ``head_dim`` (its
    ``head_size``), and a fused layout that petra refused. The pruned model computes what the
    whole one does with those heads' ``dense`` columns zeroed, in torch and ONNX Runtime."""
    import numpy as np

    from petra.candidate import artifact
    from petra.compress.attention import attention_layers, prune_heads

    model, ids = NeoX().eval(), torch.randint(0, 32, (2, 8))
    infos = attention_layers(model, (ids,))
    assert [(i.name, i.heads, i.head_dim, i.fused, i.output, i.by_head) for i in infos] == [
        (f"llm.gpt_neox.layers.{b}.attention", 4, 8,
         f"llm.gpt_neox.layers.{b}.attention.query_key_value",
         f"llm.gpt_neox.layers.{b}.attention.dense", True) for b in (0, 1)]
    want = zeroed(model, ids, "llm.gpt_neox.layers.0.attention.dense", slice(0, 8))
    prune_heads(model, infos[0], [0])
    attn = model.llm.gpt_neox.layers[0].attention
    assert (attn.query_key_value.out_features, attn.dense.in_features) == (72, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want, atol=1e-5, rtol=1e-4)
    got = artifact.load(artifact.pack(artifact.export_onnx(model, (ids,)))).run(
        None, {"input": ids.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-3)


class Llama(nn.Module):
    """A tiny Llama (RMSNorm, rotary positions, SwiGLU), ``kv`` key/value heads of 4."""

    def __init__(self, kv: int) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        super().__init__()
        torch.manual_seed(0)
        self.llm = LlamaForCausalLM(LlamaConfig(
            vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=8,
            attn_implementation="eager", tie_word_embeddings=False))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llm(input_ids=input_ids).logits


def test_llamas_attention_takes_its_head_count_from_its_config():
    """Llama's attention has no head-count attribute of its own: its heads were not offered.
    Removing two gives what the whole model gives with their output columns zeroed, and its
    own copy of the config holds the new count."""
    from petra.compress.attention import attention_layers, prune_heads

    model, ids = Llama(kv=4).eval(), torch.randint(0, 32, (2, 8))
    infos = attention_layers(model, (ids,))
    assert [(i.name, i.heads, i.head_dim) for i in infos] == [
        (f"llm.model.layers.{b}.self_attn", 4, 8) for b in (0, 1)]
    want = zeroed(model, ids, "llm.model.layers.0.self_attn.o_proj", slice(0, 16))
    prune_heads(model, infos[0], [0, 1])
    attn = model.llm.model.layers[0].self_attn
    assert attn.config.num_attention_heads == 2 and attn.q_proj.out_features == 16
    assert model.llm.model.layers[1].self_attn.config.num_attention_heads == 4
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model, attention, output", [
    (lambda: Llama(kv=4), "llm.model.layers.0.self_attn", "llm.model.layers.0.self_attn.o_proj"),
    (LM, "gpt.transformer.h.0.attn", "gpt.transformer.h.0.attn.c_proj"),
])
def test_a_decoders_attention_is_skipped_as_the_branch_it_is(model, attention, output):
    """Llama's decoder layer calls its attention by keyword (``hidden_states=``), which the
    trace did not see: its attention, added to the stream it read, had no skip gene, nor
    GPT-2's (an attention was never a block). Skipped, it gives what the model gives with its
    output projection zeroed (its bias too: GPT-2's has one)."""
    from petra.compress.blocks import skip_blocks, skippable_blocks

    model, ids = model().eval(), torch.randint(0, 32, (2, 8))
    linear_stand_ins(model, (ids,))
    blocks = {b.name: b for b in skippable_blocks(model, (ids,))}
    assert blocks[attention].kind == "branch"
    masked = copy.deepcopy(model)
    with torch.no_grad():
        proj = masked.get_submodule(output)
        proj.weight.zero_()
        if proj.bias is not None:
            proj.bias.zero_()
        want = masked(ids)
    skip_blocks(model, [attention], list(blocks.values()))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want)


class Bloom(nn.Module):
    """A tiny BLOOM: its block calls ``self_attention(x, residual)`` and ``mlp(x, residual)``,
    and each adds the residual to its own result."""

    def __init__(self) -> None:
        from transformers import BloomConfig, BloomModel

        super().__init__()
        torch.manual_seed(0)
        self.bloom = BloomModel(BloomConfig(vocab_size=32, hidden_size=32, n_layer=2, n_head=4))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bloom(input_ids=input_ids).last_hidden_state


def test_an_attention_that_adds_the_residual_it_is_given_is_skipped_handing_it_on():
    """BLOOM's attention adds its ``residual`` argument to its result: it had no skip gene
    (an attention was a block only as a residual branch) and no line said why. Skipped, it
    hands on that residual: the model then gives what it gives with the attention's output
    projection zeroed."""
    from petra.compress.blocks import skip_blocks, skippable_blocks

    model, ids = Bloom().eval(), torch.randint(0, 32, (2, 8))
    blocks = {b.name: b for b in skippable_blocks(model, (ids,))}
    name = "bloom.h.1.self_attention"
    assert blocks[name].carried == 1 and blocks[name].becomes == "carried"
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked.get_submodule(f"{name}.dense").weight.zero_()
        masked.get_submodule(f"{name}.dense").bias.zero_()
        want, dense = masked(ids), model(ids)
    skip_blocks(model, [name], list(blocks.values()))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want)
        assert not torch.allclose(model(ids), dense, atol=1e-3)


def test_a_grouped_key_value_attention_is_traced_in_bounded_time_and_named():
    """With fewer key/value heads, torch-pruning's channel group from q_proj or k_proj never
    closed (``petra space`` ran for more than ten minutes); the group is now given up with the
    reason, and the MLP's channels are still found."""
    from petra.compress.structured import channel_layers

    model, ids = Llama(kv=2).eval(), torch.randint(0, 32, (2, 8))
    why: dict[str, str] = {}
    found, _ = channel_layers(model, (ids,), why=why)
    assert "llm.model.layers.0.mlp.gate_proj" in found
    assert why["llm.model.layers.0.self_attn.k_proj"].startswith(
        "torch-pruning's channel group from it never closes")


def test_a_grouped_key_value_attention_loses_a_key_value_head_with_its_query_heads():
    """Grouped-query attention (2 key/value heads, each read by 2 query heads): a unit is one
    key/value head with the query heads that read it, and its removal computes what the whole
    model does with those query heads' output columns zeroed."""
    from petra.compress.attention import attention_layers, l2_heads, prune_heads

    model, ids = Llama(kv=2).eval(), torch.randint(0, 32, (2, 8))
    infos = attention_layers(model, (ids,))
    assert [(i.heads, i.head_dim, i.group) for i in infos] == [(2, 16, 2)] * 2
    assert l2_heads(model, infos[0]).shape == (2,)
    want = zeroed(model, ids, "llm.model.layers.0.self_attn.o_proj", slice(0, 16))
    prune_heads(model, infos[0], [0])  # key/value head 0 and query heads 0 and 1
    attn = model.llm.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (
        16, 8, 16)
    assert (attn.config.num_attention_heads, attn.config.num_key_value_heads) == (2, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want, atol=1e-5, rtol=1e-4)


class Grouped(nn.Module):
    """A hand-written grouped-query attention counted by its config, as Llama's: 4 query heads
    over 2 key/value heads, each key/value head read by two query heads, either adjacent
    (``repeat_interleave``, Llama's ``repeat_kv``) or tiled (``repeat``)."""

    def __init__(self, tiled: bool) -> None:
        from types import SimpleNamespace

        super().__init__()
        self.config = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2)
        self.head_dim, self.num_key_value_groups, self.tiled = 8, 2, tiled
        self.q_proj, self.o_proj = nn.Linear(32, 32), nn.Linear(32, 32)
        self.k_proj, self.v_proj = nn.Linear(32, 16), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        n = self.num_key_value_groups
        k, v = ((z.repeat(1, n, 1, 1) if self.tiled else z.repeat_interleave(n, dim=1))
                for z in (k, v))
        att = (q @ k.transpose(-1, -2) / self.head_dim ** 0.5).softmax(-1) @ v
        return self.o_proj(att.transpose(1, 2).reshape(b, t, -1))


def test_grouped_query_heads_are_offered_only_where_each_key_value_head_serves_its_own():
    """A unit is a key/value head with the query heads next to it. Where the key/value heads
    are tiled instead (query head h reads key/value head h mod 2), that removal would still
    run, and compute something else: the check against the zeroed model refuses it."""
    from petra.compress.attention import attention_layers

    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    [info] = attention_layers(Classifier(lambda: Grouped(tiled=False)).eval(), (x,))
    assert (info.heads, info.head_dim, info.group) == (2, 16, 2)
    why: dict[str, str] = {}
    assert attention_layers(Classifier(lambda: Grouped(tiled=True)).eval(), (x,), why=why) == []
    assert "not grouped by key/value head" in why["attn"]


class MultiQuery(nn.Module):
    """Tiny multi-query decoders (one key/value head for four query heads): GPTBigCode's and
    Falcon's fused ``[q | k | v]``, with the queries' rows then one head's k and v rows."""

    def __init__(self, kind: str) -> None:
        import transformers as tf

        super().__init__()
        torch.manual_seed(0)
        if kind == "bigcode":
            self.lm = tf.GPTBigCodeModel(tf.GPTBigCodeConfig(
                vocab_size=32, n_positions=8, n_embd=32, n_layer=2, n_head=4, multi_query=True,
                attn_implementation="eager"))
        else:
            self.lm = tf.FalconModel(tf.FalconConfig(
                vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                multi_query=True, new_decoder_architecture=False, parallel_attn=True,
                attn_implementation="eager"))
        self.head = nn.Linear(32, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.lm(input_ids=input_ids).last_hidden_state.mean(1))


@pytest.mark.parametrize("model, attention, output, query", [
    (lambda: Llama(kv=1), "llm.model.layers.0.self_attn", "o_proj", "q_proj"),
    (lambda: MultiQuery("bigcode"), "lm.h.0.attn", "c_proj", "c_attn"),
    (lambda: MultiQuery("falcon"), "lm.h.0.self_attention", "dense", "query_key_value"),
])
def test_a_multi_query_attention_loses_query_heads_and_keeps_its_key_value_head(
        model, attention, output, query):
    """With one key/value head, a unit was that head with all four query heads: one unit,
    nothing to remove (Gemma's), or the fused projection was not recognized at all (Falcon's,
    GPTBigCode's). Now its units are the query heads, and the shared k and v stay whole."""
    from petra.compress.attention import attention_layers, l2_heads, prune_heads

    model, ids = model().eval(), torch.randint(0, 32, (2, 8))
    why: dict[str, str] = {}
    infos = {i.name: i for i in attention_layers(model, (ids,), why=why)}
    info = infos[attention]
    assert (info.heads, info.head_dim, info.shared_kv) == (4, 8, True) and not why
    assert l2_heads(model, info).shape == (4,)
    want = zeroed(model, ids, f"{attention}.{output}", slice(8, 24))
    prune_heads(model, info, [1, 2])
    attn = model.get_submodule(attention)
    assert attn.get_submodule(output).in_features == 16
    assert attn.get_submodule(query).out_features == 16 + (0 if query == "q_proj" else 16)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want, atol=1e-5, rtol=1e-4)


def test_a_withheld_stream_names_where_its_removal_fails(monkeypatch):
    """Mixtral's ``o_proj`` was withheld with torch-pruning's own ``TypeError: unsupported
    operand type(s) for +: 'int' and 'NoneType'``: true, but it said nothing of where. Where a
    torch-pruning handler fails, the reason names the split after the experts' weight bank
    that the stream's channels could not be carried through; where the pruned model's forward
    fails, the layer that raised (its router, now that its RMSNorms carry the stream)."""
    import transformers as tf

    import petra.compress.graph
    from petra.space import model_space

    def mixtral() -> nn.Module:
        torch.manual_seed(0)
        return Tiny(tf.MixtralModel(tf.MixtralConfig(
            vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
            num_experts_per_tok=2, max_position_embeddings=16, attn_implementation="eager",
            experts_implementation="eager")))

    cfg = load_config({"space": {"layers": {"include": ["*"], "exclude": []},
                                 "quantization": ["none"]}}).space
    ids = (torch.randint(0, 32, (2, 8)),)
    space = model_space(cfg, mixtral().eval(), ids)
    assert "the compressed model's forward fails in llm.layers.0.mlp.gate, a " \
        "MixtralTopKRouter (" in space.withheld["layers.llm.layers.0.self_attn.o_proj"]
    monkeypatch.setattr(petra.compress.graph, "norm_pruners", lambda model: {})
    space = model_space(cfg, mixtral().eval(), ids)
    assert space.withheld["layers.llm.layers.0.self_attn.o_proj"] == (
        "torch-pruning fails to carry the channels through a split after "
        "llm.layers.0.mlp.experts.gate_up_proj (TypeError: unsupported operand type(s) for +: "
        "'int' and 'NoneType')")


class Tiny(nn.Module):
    """A tiny Hugging Face decoder ``llm`` (built under seed 0), its mean state classified."""

    def __init__(self, llm: nn.Module) -> None:
        super().__init__()
        self.llm, self.head = llm, nn.Linear(32, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.llm(input_ids=input_ids).last_hidden_state.mean(1))


def Phi3(kv: int = 4) -> nn.Module:  # noqa: N802 - read as the model it builds
    """Phi-3: fused ``qkv_proj`` (sliced by ``num_key_value_heads``) and fused
    ``gate_up_proj`` (chunked into gate and up)."""
    import transformers as tf

    torch.manual_seed(0)
    return Tiny(tf.Phi3Model(tf.Phi3Config(
        vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=16,
        pad_token_id=0, attn_implementation="eager")))


def test_phi3_loses_heads_and_its_chunked_projection_the_channels_asked(monkeypatch):
    """Phi-3's heads were refused (its forward slices k and v by ``num_key_value_heads``,
    which stayed 4: ``The size of tensor a (2) must match the size of tensor b (4)``), and
    torch-pruning took ``gate_up_proj``'s channels with their twins in the other half of its
    chunk: asked to keep 128 of 256, it kept 2, and the space offered it. The same offsets of
    both halves now go together, and a removal that takes more than it asks raises. A fused
    grouped-query projection is refused with the line the docs promise."""
    import petra.compress.structured as structured
    from petra.compress.structured import prune_channels
    from petra.space import model_space

    cfg = load_config({"space": {"layers": {"include": ["*"], "exclude": []},
                                 "pruning": ["none", "l2_channel", "l2_heads"],
                                 "quantization": ["none"]}}).space
    ids = (torch.randint(0, 32, (2, 8)),)
    space = model_space(cfg, Phi3().eval(), ids)
    assert "l2_heads" in space.gene("layers.llm.layers.0.self_attn.method").choices
    assert "l2_channel" in space.gene("layers.llm.layers.0.mlp.gate_up_proj.method").choices
    model = Phi3().eval()
    mlp = model.llm.layers[0].mlp
    plan = {"llm.layers.0.mlp.gate_up_proj": ("l2_channel", 0.5)}
    assert prune_channels(model, ids, plan, protected=["head"]) == {
        "llm.layers.0.mlp.gate_up_proj": (96, 48)}
    assert (mlp.gate_up_proj.out_features, mlp.down_proj.in_features) == (48, 24)
    assert model(*ids).shape == (2, 3)
    monkeypatch.setattr(structured, "ties", lambda graph, root: (1, 1))
    with pytest.raises(RuntimeError, match="removed 9[0-9] of the 96 channels where 48 were"):
        prune_channels(Phi3().eval(), ids, plan, protected=["head"])
    monkeypatch.undo()
    space = model_space(cfg, Phi3(kv=2).eval(), ids)
    assert "a fused grouped-query projection is not handled" in \
        space.kept_whole["llm.layers.0.self_attn"]


def test_olmo2s_whole_width_q_norm_loses_the_heads_rows_and_is_refused_for_mixing_heads():
    """OLMo-2 normalizes the whole q and k (``q_norm``, ``k_norm``): they kept their width
    when heads went (``The size of tensor a (64) must match the size of tensor b (32)``). They
    now lose the heads' rows, and the heads are refused for the true reason: the norm's
    statistic mixes the heads."""
    import transformers as tf

    from petra.compress.attention import attention_layers

    torch.manual_seed(0)
    model = Tiny(tf.Olmo2Model(tf.Olmo2Config(
        vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16,
        pad_token_id=0, attn_implementation="eager")))
    why: dict[str, str] = {}
    assert attention_layers(model.eval(), (torch.randint(0, 32, (2, 8)),), why=why) == []
    assert why["llm.layers.0.self_attn"].startswith("removing heads changes what the kept heads")


def test_an_attention_that_holds_its_post_residual_norm_loses_heads():
    """ALBERT's attention holds its own ``LayerNorm(hidden)`` over ``x + dense(context)``;
    with the hidden size equal to q's width it was taken for a whole-width q norm, narrowed
    with the heads, and the heads were refused (``normalized_shape=[16]``) for a reason that
    was not true. A norm narrowing that breaks the trial is now dropped and tried again."""
    from dataclasses import replace

    import transformers as tf

    from petra.compress.attention import _trial, attention_layers, prune_heads

    torch.manual_seed(0)
    model = Tiny(tf.AlbertModel(tf.AlbertConfig(
        vocab_size=32, embedding_size=16, hidden_size=32, intermediate_size=48,
        num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=16,
        attn_implementation="eager"), add_pooling_layer=False)).eval()
    ids = (torch.randint(0, 32, (2, 8)),)
    why: dict[str, str] = {}
    infos = attention_layers(model, ids, why=why)
    assert why == {} and [(i.heads, i.q_norms) for i in infos] == [(4, False)]
    assert "normalized_shape" in _trial(model, ids, replace(infos[0], q_norms=True))
    pruned = copy.deepcopy(model)
    prune_heads(pruned, infos[0], [1, 3])
    assert pruned.llm.encoder.albert_layer_groups[0].albert_layers[0].attention.query \
        .out_features == 16
    assert pruned(*ids).shape == (2, 3)


def test_a_grouped_attention_with_its_own_head_counts_loses_key_value_groups():
    """StableLM's attention keeps ``num_heads`` and ``num_key_value_heads`` of its own (Llama
    reads its config's): its heads were refused as "its form is not handled (separate
    key/value widths, ...)", none of which it is. A unit is now a key/value head with its
    query heads, and both counts are lowered."""
    import transformers as tf

    from petra.compress.attention import attention_layers, prune_heads

    torch.manual_seed(0)
    model = Tiny(tf.StableLmModel(tf.StableLmConfig(
        vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
        partial_rotary_factor=0.25, attn_implementation="eager"))).eval()
    ids = (torch.randint(0, 32, (2, 8)),)
    why: dict[str, str] = {}
    infos = attention_layers(model, ids, why=why)
    assert why == {} and [(i.heads, i.group, i.shared_kv) for i in infos] == [(2, 2, False)]
    prune_heads(model, infos[0], [1])
    attention = model.llm.layers[0].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features,
            attention.num_heads, attention.num_key_value_heads) == (16, 8, 2, 1)
    assert model(*ids).shape == (2, 3)


@pytest.mark.parametrize("kv", [4, 2])
def test_heads_whose_per_head_norms_are_a_list_lose_their_norms(kv):
    """StableLM's ``qk_layernorm`` is a list of per-head LayerNorms, applied in order. It was
    never cut: removing the last heads left the right norms (at init all equal, so the trial
    passed), while removing other heads of a trained model changed it silently; then such heads
    were refused. Each list now keeps the kept heads' norms (query heads for q, key/value heads
    for k), so removing the first head computes what the model computes with it masked."""
    import transformers as tf

    from petra.compress.attention import _same_as_masked, attention_layers, prune_heads

    torch.manual_seed(0)
    model = Tiny(tf.StableLmModel(tf.StableLmConfig(
        vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=16,
        qk_layernorm=True, attn_implementation="eager"))).eval()
    with torch.no_grad():  # norms that differ per head, as trained ones do
        for p in model.llm.layers[0].self_attn.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    ids = (torch.randint(0, 32, (2, 8)),)
    why: dict[str, str] = {}
    (info,) = attention_layers(model, ids, why=why)
    assert why == {} and (info.heads, info.group) == (kv, 4 // kv)
    pruned = copy.deepcopy(model)
    prune_heads(pruned, info, [0])
    attention = pruned.llm.layers[0].self_attn
    assert [len(attention.q_layernorm.norms), len(attention.k_layernorm.norms)] == [
        4 - 4 // kv, kv - 1]
    assert attention.q_layernorm.num_heads == 4 - 4 // kv
    with torch.no_grad():
        assert _same_as_masked(model, ids, info, [0], pruned(*ids))
