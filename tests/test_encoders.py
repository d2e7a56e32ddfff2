"""Attention-bearing user models beyond BERT. DeBERTa-v2 (Hugging Face): its ``query_proj``,
``key_proj`` and ``value_proj`` are the attention's q, k and v, and its relative-position
projections (``pos_key_proj``, ``pos_query_proj``) lose the removed heads' rows with them.
ModernBERT: a fused ``Wqkv`` read by ``Wo``; its attention is a residual branch that a skip
removes, and its encoder reads each layer's ``attention_type``, which a skipped layer keeps.
A T5 encoder: its first layer makes the position bias that every later layer reads and hands on.
A Perceiver: its latents cross-attend to inputs of another width."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from petra.compress.attention import attention_layers, prune_attention
from petra.compress.blocks import skip_blocks, skippable_blocks

pytest.importorskip("transformers")


class Encoder(nn.Module):
    """A tiny encoder (built from a config: nothing downloaded) with a mean-pooled head."""

    def __init__(self, kind: str) -> None:
        import transformers as tf

        super().__init__()
        torch.manual_seed(0)
        if kind == "deberta":
            self.enc = tf.DebertaV2Model(tf.DebertaV2Config(
                vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=16, relative_attention=True,
                pos_att_type=["p2c", "c2p"], position_buckets=4, max_relative_positions=8,
                attn_implementation="eager"))
        elif kind == "t5":  # relative position bias: made by layer 0, handed on by the rest
            self.enc = tf.T5EncoderModel(tf.T5Config(
                vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4,
                relative_attention_num_buckets=8, attn_implementation="eager"))
        else:
            self.enc = tf.ModernBertModel(tf.ModernBertConfig(
                vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=16, global_attn_every_n_layers=2,
                local_attention=4, attn_implementation="eager", pad_token_id=0,
                bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2))
        self.head = nn.Linear(32, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(input_ids=input_ids).last_hidden_state.mean(1))


@torch.no_grad()
def zeroed(model: nn.Module, ids: torch.Tensor, output: str, columns: slice) -> torch.Tensor:
    masked = copy.deepcopy(model)
    masked.get_submodule(output).weight[:, columns] = 0.0
    return masked(ids)


@pytest.mark.parametrize("kind, attention, output", [
    ("deberta", "enc.encoder.layer.0.attention.self", "enc.encoder.layer.0.attention.output.dense"),
    ("modernbert", "enc.layers.0.attn", "enc.layers.0.attn.Wo"),
])
def test_an_encoders_heads_are_removed_as_its_masked_model_computes(kind, attention, output):
    model, ids = Encoder(kind).eval(), torch.randint(3, 50, (2, 8))
    dense = copy.deepcopy(model)
    why: dict[str, str] = {}
    infos = {i.name: i for i in attention_layers(model, (ids,), why=why)}
    assert attention in infos and not why, why
    changes = prune_attention(model, {attention: ("l2_heads", 0.5)}, list(infos.values()))
    assert changes == {attention: (4, 2)}
    assert model.get_submodule(output).in_features == 16
    if kind == "deberta":
        self_attn = model.get_submodule(attention)
        assert self_attn.pos_key_proj.out_features == self_attn.pos_query_proj.out_features == 16
    # The pruned model computes what the dense one does with the removed heads' columns of
    # the output projection zeroed: find which heads went by the kept output columns.
    dense_w = dense.get_submodule(output).weight
    got_w = model.get_submodule(output).weight
    kept_heads = [h for h in range(4) if any(
        torch.equal(got_w[:, c * 8:(c + 1) * 8], dense_w[:, h * 8:(h + 1) * 8]) for c in range(2))]
    assert len(kept_heads) == 2
    removed = [h for h in range(4) if h not in kept_heads]
    want = zeroed(dense, ids, output, torch.tensor([h * 8 + i for h in removed for i in range(8)]))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want, rtol=1e-4, atol=1e-5)


def test_modernberts_attention_and_layers_can_be_skipped():
    model, ids = Encoder("modernbert").eval(), torch.randint(3, 50, (2, 8))
    blocks = {b.name: b for b in skippable_blocks(model, (ids,))}
    assert blocks["enc.layers.0.attn"].kind == "branch"
    assert {"enc.layers.0", "enc.layers.1", "enc.layers.1.mlp"} <= set(blocks)
    want = zeroed(model, ids, "enc.layers.0.attn.Wo", slice(None))
    skipped = copy.deepcopy(model)
    skip_blocks(skipped, ["enc.layers.0.attn"], list(blocks.values()))
    with torch.no_grad():
        torch.testing.assert_close(skipped(ids), want)
    skip_blocks(model, ["enc.layers.0"], list(blocks.values()))
    assert model.enc.layers[0].attention_type == "full_attention"
    with torch.no_grad():
        assert model(ids).shape == (2, 3)


def test_a_t5_layer_hands_on_the_position_bias_when_skipped_and_the_first_is_kept():
    """Skipped, a T5 layer returned None for the position bias it was given, and every later
    layer then ran with none; the first layer, which computes the bias, cannot be skipped."""
    model, ids = Encoder("t5").eval(), torch.randint(3, 50, (2, 8))
    why: dict[str, str] = {}
    blocks = {b.name: b for b in skippable_blocks(model, (ids,), why)}
    first = ["enc.encoder.block.0", "enc.encoder.block.0.layer.0",
             "enc.encoder.block.0.layer.0.SelfAttention"]
    assert set(why) == set(first) and not set(first) & set(blocks)
    assert "position bias" in why[first[0]]
    attn = "enc.encoder.block.1.layer.0.SelfAttention"
    assert blocks[attn].kind == "branch" and blocks[attn].passthrough
    want = zeroed(model, ids, f"{attn}.o", slice(None))
    skipped = copy.deepcopy(model)
    skip_blocks(skipped, [attn], list(blocks.values()))
    with torch.no_grad():
        torch.testing.assert_close(skipped(ids), want)
    skip_blocks(model, ["enc.encoder.block.1"], list(blocks.values()))
    seen = {}
    model.enc.encoder.block[2].layer[0].SelfAttention.register_forward_pre_hook(
        lambda mod, a, k: seen.update(bias=k.get("position_bias")), with_kwargs=True)
    with torch.no_grad():
        model(ids)
    assert seen["bias"] is not None and seen["bias"].abs().sum() > 0


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


class WithPooler(nn.Module):
    """A pre-norm encoder whose pooler (a LayerNorm on the first token, as CLIP's
    ``post_layernorm``) the task never reads: the head reads the mean of the tokens."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, 16)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(
            16, 2, 32, dropout=0.0, batch_first=True, norm_first=True) for _ in range(2))
        self.post = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        self.post(h[:, 0])  # a pooled output, computed and never read
        return self.head(h.mean(1))


def test_a_pooler_the_task_never_reads_loses_the_streams_channels_with_it(tmp_path):
    """torch-pruning traces from the model's outputs, which the unread pooler's LayerNorm does
    not reach: it kept its 16 channels while the stream lost some (``Given
    normalized_shape=[48] ... got input of size [16, 10]`` on CLIP's vision encoder), and every
    writer of the stream, and so the width gene, was withheld."""
    from petra import Task
    from petra.candidate.recipes import Recipe
    from petra.compress.structured import channel_layers, prune_channels
    from petra.config import load_config
    from petra.space import model_space
    from petra.tasks.contract import adapt

    x = torch.randn(4, 5, 6)
    batch = (x, torch.zeros(4, dtype=torch.long))
    task = adapt(Task(model=WithPooler().eval(), train=[batch], val=[batch], test=[batch],
                      example_input=x, trained=True))
    cfg = load_config({"space": {"pruning": ["none", "l2_channel"], "sparsity": [0.0, 0.8],
                                 "quantization": ["none"]}})
    space = model_space(cfg.space, task.model, task.example_input, cache=tmp_path)
    assert "prune.width" in {g.name for g in space.genes} and not space.withheld
    _, residual = channel_layers(task.model, task.example_input)
    plan = Recipe.from_genome({"prune.width": 0.5, "prune.width_method": "l2_channel"}
                              ).structured_plan(residual)
    prune_channels(task.model, task.example_input, plan)
    assert task.model.inner.post.normalized_shape == (8,)
    assert task.model(*task.example_input).shape == (4, 3)


def test_beits_heads_take_their_bias_table_beside_the_attention():
    """BEiT's layer holds its attention's relative-position bias table (positions, heads) in a
    module beside the attention: removing heads left the table at 4 heads (``The size of
    tensor a (2) must match the size of tensor b (4)``), and its heads were refused."""
    import transformers as tf

    class Beit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.enc = tf.BeitModel(tf.BeitConfig(
                image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=1,
                num_attention_heads=4, intermediate_size=64, use_relative_position_bias=True,
                use_mean_pooling=True))
            with torch.no_grad():  # a table that tells the heads apart
                self.enc.layers[0].relative_position_bias.relative_position_bias_table \
                    .normal_()

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.enc(pixel_values=pixel_values).last_hidden_state

    model, x = Beit().eval(), torch.randn(2, 1, 8, 8)
    dense = copy.deepcopy(model)
    why: dict[str, str] = {}
    infos = attention_layers(model, (x,), why=why)
    assert [i.name for i in infos] == ["enc.layers.0.attention"] and not why, why
    prune_attention(model, {infos[0].name: ("l2_heads", 0.5)}, infos)
    table = model.enc.layers[0].relative_position_bias.relative_position_bias_table
    assert table.shape[1] == 2
    out = "enc.layers.0.attention.o_proj"
    kept = [h for h in range(4) if any(torch.equal(
        model.get_submodule(out).weight[:, c * 8:(c + 1) * 8],
        dense.get_submodule(out).weight[:, h * 8:(h + 1) * 8]) for c in range(2))]
    gone = torch.tensor([h * 8 + i for h in range(4) if h not in kept for i in range(8)])
    with torch.no_grad():
        torch.testing.assert_close(model(x), zeroed(dense, x, out, gone), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["deberta", "torch"])
def test_a_frozen_attention_stays_frozen_when_it_loses_heads(kind):
    """torch-pruning's new parameters require grad: a user's frozen attention (a frozen
    backbone) became trainable in petra's fine-tune once it lost heads."""
    if kind == "deberta":
        model, x = Encoder("deberta").eval(), torch.randint(3, 50, (2, 8))
        attention = "enc.encoder.layer.0.attention.self"
        frozen = [model.enc.encoder.layer[0].attention]
    else:
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        model, x = nn.Sequential(layer, nn.Linear(16, 3)).eval(), torch.randn(2, 5, 16)
        attention, frozen = "0.self_attn", [layer.self_attn]
    for module in frozen:
        module.requires_grad_(False)
    infos = attention_layers(model, (x,))
    prune_attention(model, {attention: ("l2_heads", 0.5)}, infos)
    assert not any(p.requires_grad for p in model.get_submodule(attention).parameters())
    if kind == "deberta":  # its output projection, outside the attention, too
        assert not any(p.requires_grad for p in frozen[0].parameters())
    assert any(p.requires_grad for p in model.parameters())  # the rest still trains
