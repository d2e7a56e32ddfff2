"""Attention heads, and the verification that keeps failing genes out of the space.

Every registered ``heads`` criterion is tested here with no test edits, on a Hugging Face BERT
and on torch's ``nn.TransformerEncoder``, both built as user tasks (tests/user_transformers.py).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import petra.compress  # noqa: F401  (fills the registries)
import petra.registry
from petra.candidate import artifact
from petra.compress.attention import attention_layers, prune_attention, prune_heads
from petra.compress.attention_forms import qkv_layers
from petra.compress.verify import bisect
from petra.config import load_config
from petra.registry import PRUNING
from petra.space import model_space
from petra.tasks import load_task
from petra.tasks.contract import feed

HEADS = [e.name for e in PRUNING if e.meta.get("kind") == "heads"]
TASKS = ["tests.user_transformers:bert_task", "tests.user_transformers:encoder_task",
         "tests.user_transformers:vit_task"]


@pytest.fixture(scope="module", params=TASKS, ids=["bert", "encoder", "hf_vit"])
def task(request):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    return load_task(request.param, {"epochs": 1})


def qkv_rows(model, name):
    module = model.get_submodule(name)
    if qkv_layers(module) is not None:
        return [p.weight.shape[0] for p in qkv_layers(module)]
    if getattr(module, "in_proj_weight", None) is not None:
        return [module.in_proj_weight.shape[0] // 3] * 3
    return [module.qkv.weight.shape[0] // 3] * 3


def test_attention_layers_are_found_with_their_heads(task):
    infos = attention_layers(task.model, task.example_input)
    assert len(infos) == 2 and all(i.heads == 4 and i.head_dim == 8 for i in infos)


@pytest.mark.parametrize("name", HEADS)
def test_heads_criterion_removes_whole_heads_physically(name, task):
    model = copy.deepcopy(task.model).eval()
    infos = attention_layers(model, task.example_input)
    dense = artifact.pack(artifact.export_onnx(model, task.example_input))
    plan = {i.name: (name, 0.5) for i in infos}
    changes = prune_attention(model, plan, infos)
    assert changes == {i.name: (4, 2) for i in infos}
    for info in infos:
        assert qkv_rows(model, info.name) == [2 * info.head_dim] * 3
    with torch.no_grad():
        expected = model(*task.example_input)
    assert expected.shape == task.model(*task.example_input).shape
    data = artifact.pack(artifact.export_onnx(model, task.example_input))
    assert len(data) < 0.9 * len(dense)  # the removed rows leave the artifact
    session = artifact.load(data)
    got = session.run(None, feed(task.example_input, task.input_names))[0]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", HEADS)
def test_heads_criterion_removes_a_head_that_contributes_nothing_first(name, task):
    """A head whose value rows and output columns are zero adds nothing: it goes first, and
    the model's output does not move."""
    model = copy.deepcopy(task.model).eval()
    info = attention_layers(model, task.example_input)[0]
    module = model.get_submodule(info.name)
    d = info.head_dim
    with torch.no_grad():
        if qkv_layers(module) is not None:
            for proj in qkv_layers(module):
                proj.weight[d:2 * d] = 0
                proj.bias[d:2 * d] = 0
            model.get_submodule(info.output).weight[:, d:2 * d] = 0
        else:  # nn.MultiheadAttention
            e = module.embed_dim
            for i in range(3):
                module.in_proj_weight[i * e + d:i * e + 2 * d] = 0
                module.in_proj_bias[i * e + d:i * e + 2 * d] = 0
            module.out_proj.weight[:, d:2 * d] = 0
        before = model(*task.example_input)
    prune_attention(model, {info.name: (name, 0.25)}, [info])
    with torch.no_grad():
        after = model(*task.example_input)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_bisect_finds_the_failing_items_in_few_trials():
    calls = []

    def trial(items):
        calls.append(list(items))
        return "boom" if 5 in items or 11 in items else None

    assert bisect(list(range(16)), trial) == {5: "boom", 11: "boom"}
    assert len(calls) <= 15
    calls.clear()
    assert bisect(list(range(16)), trial=lambda items: calls.append(1)) == {}
    assert len(calls) == 1  # everything works: one trial


def test_bisect_withholds_only_what_completes_a_combination_that_fails_together():
    bad = bisect([1, 2], lambda items: "both" if len(items) == 2 else None)
    assert set(bad) == {2} and "combination" in bad[2]
    # 2 and 4 fail together, in different halves: 1, 2 and 3 are kept
    bad = bisect([1, 2, 3, 4], lambda items: "2+4" if {2, 4} <= set(items) else None)
    assert set(bad) == {4} and bad[4].endswith("(2+4)")
    # a failure that does not come back: the set that failed is withheld, as before
    calls = []
    bad = bisect([1, 2], lambda items: calls.append(1) or ("once" if len(calls) == 1 else None))
    assert set(bad) == {1, 2}


def space_of(task, tmp_path, pruning=("none", "magnitude", "l2_channel", "l2_heads")):
    cfg = load_config({"space": {"pruning": list(pruning), "sparsity": [0.0, 0.8],
                                 "quantization": ["none", "int8_dynamic"]}})
    return model_space(cfg.space, task.model, task.example_input, cache=tmp_path)


def test_space_offers_heads_and_ffn_channels_and_withholds_what_fails(task, tmp_path):
    space = space_of(task, tmp_path)
    infos = attention_layers(task.model, task.example_input)
    for info in infos:
        assert space.gene(f"layers.{info.name}.method").choices == ("none", "l2_heads")
    structured = {n[len("layers."):-len(".method")] for n in space.names
                  if n.endswith(".method") and "l2_channel" in space.gene(n).choices}
    ffn = {n for n in structured if n.endswith(("intermediate.dense", "linear1", "mlp.fc1"))}
    assert len(ffn) == 2  # FFN neurons, in every block
    withheld = {k[len("layers."):] for k in space.withheld if k.startswith("layers.")}
    assert not withheld & structured
    if "Bert" in repr(task.model) or "ViT" in repr(task.model):
        # q, k and v go a head at a time: kept whole, with the reason, and never tried
        whole = {layer.name: layer.whole for layer in space.layers}
        qkv = {n for n in whole
               if n.endswith((".query", ".key", ".value", ".q_proj", ".k_proj", ".v_proj"))}
        assert len(qkv) == 6 and not qkv & (withheld | structured)
        assert all("its units are the attention's heads" in whole[n] for n in qkv)
    # the residual stream's writers vote no widths of their own: prune.width is the hidden size
    writers = [layer.name for layer in space.layers if layer.residual]
    assert len(writers) >= 2 * 2 and "prune.width" in space
    assert not set(writers) & structured


def residual_widths(model):
    """The widths of the hidden state: every LayerNorm's, every embedding's, every output
    projection's."""
    from torch import nn

    widths = {m.normalized_shape[0] for m in model.modules() if isinstance(m, nn.LayerNorm)}
    widths |= {m.embedding_dim for m in model.modules() if isinstance(m, nn.Embedding)}
    widths |= {m.embed_dim for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return widths


def test_the_width_gene_prunes_the_hidden_size_consistently(task, tmp_path):
    """One prune.width removes the same channels from the embeddings, every LayerNorm and
    every block; an nn.MultiheadAttention's embed_dim stays divisible by its heads; the
    artifact shrinks and the model still runs (in ONNX Runtime too)."""
    from petra.candidate.evaluate import Recipe
    from petra.compress.structured import prune_channels

    space = space_of(task, tmp_path)
    writers = [layer.name for layer in space.layers if layer.residual]
    genome = space.complete({"prune.width": 0.3, "prune.round_to": 1})
    recipe = Recipe.from_genome(genome)
    assert recipe.width == 0.3 and recipe.width_method == "l2_channel"
    plan = recipe.structured_plan(writers)
    assert set(plan) == set(writers)
    model = copy.deepcopy(task.model).eval()
    (hidden,) = residual_widths(model)
    dense = artifact.pack(artifact.export_onnx(model, task.example_input))
    changes = prune_channels(model, task.example_input, plan, protected=["head"])
    (kept,) = changes.values()  # one group: the residual stream
    assert kept[0] == hidden and kept[1] < hidden
    assert residual_widths(model) == {kept[1]}
    if any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules()):
        assert kept[1] % 4 == 0  # 4 heads: 32 * 0.7 = 22.4 went to 24, not 22
    data = artifact.pack(artifact.export_onnx(model, task.example_input))
    assert len(data) < 0.9 * len(dense)
    with torch.no_grad():
        expected = model(*task.example_input).numpy()
    got = artifact.load(data).run(None, feed(task.example_input, task.input_names))[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


def test_a_search_proposes_no_gene_the_verification_withheld(task, tmp_path):
    """Every structured gene a strategy may propose runs on the model at its largest
    sparsity: seed recipes and random genomes alike."""
    from petra.compress.structured import prune_channels
    from petra.engine.strategies import make_strategy

    space = space_of(task, tmp_path)
    strategy = make_strategy("random", space=space, objectives=[("val_accuracy", "max")],
                             population=6, generations=1, seed=0, initial=[])
    for genome in strategy.ask():
        plan = {k[len("layers."):-len(".method")]: (v, 0.8) for k, v in genome.items()
                if k.endswith(".method") and v == "l2_channel"}
        model = copy.deepcopy(task.model).eval()
        prune_channels(model, task.example_input, plan, protected=["head"])
        with torch.no_grad():
            model(*task.example_input)


def test_verdicts_are_cached_by_model(task, tmp_path):
    first = space_of(task, tmp_path)
    (path,) = tmp_path.glob("verdicts-*.json")
    cached = path.read_text()
    # A changed verdict in the cache is what the next space reads: nothing is re-verified.
    path.write_text(cached.replace('"schemes": {}', '"schemes": {"int8_dynamic": "test"}'))
    second = space_of(task, tmp_path)
    assert "int8_dynamic" in first.gene("quant.scheme").choices
    assert "quant.scheme" not in second  # only "none" is left
    assert second.withheld["quant.scheme=int8_dynamic"] == "test"


def test_a_scheme_that_fails_on_the_model_is_withheld(task, tmp_path, monkeypatch):
    from petra.registry import QUANTIZATION, Entry

    def broken(proto, ctx):
        raise RuntimeError("this scheme cannot run here")

    monkeypatch.setitem(QUANTIZATION._entries, "broken_test_scheme",
                        Entry("broken_test_scheme", broken, "test"))
    cfg = load_config({"space": {"quantization": ["none", "int8_dynamic"]}})
    cfg.space.quantization.append("broken_test_scheme")
    space = model_space(cfg.space, task.model, task.example_input, cache=tmp_path)
    assert space.gene("quant.scheme").choices == ("none", "int8_dynamic")
    assert "cannot run here" in space.withheld["quant.scheme=broken_test_scheme"]


@pytest.mark.parametrize("scheme", [e.name for e in petra.registry.QUANTIZATION
                                    if e.name != "none"])
def test_every_scheme_runs_on_a_transformer_that_lost_heads(scheme, task):
    """With fewer heads, the embedding output of the nn.TransformerEncoder feeds the fused
    q/k/v MatMul directly: int8_dynamic's embedding pass once named a tensor twice there."""
    from petra.compress.quantize import QuantContext
    from petra.registry import QUANTIZATION

    model = copy.deepcopy(task.model).eval()
    infos = attention_layers(model, task.example_input)
    prune_attention(model, {i.name: ("l2_heads", 0.5) for i in infos}, infos)
    proto = artifact.export_onnx(model, task.example_input)
    calibration = [feed(x, task.input_names) for x, _ in list(task.train)[:2]]
    session = artifact.load(artifact.pack(
        QUANTIZATION.get(scheme).fn(proto, QuantContext(calibration=calibration))))
    out = session.run(None, feed(task.example_input, task.input_names))[0]
    with torch.no_grad():
        expected = model(*task.example_input).numpy()
    assert out.shape == expected.shape and np.isfinite(out).all()


def test_an_embedding_table_is_offered_low_rank_only_and_factorizes(task, tmp_path):
    from petra.compress.lowrank import factorize

    space = space_of(task, tmp_path, pruning=("none", "magnitude", "l2_channel", "svd"))
    tables = [layer.name for layer in space.layers if layer.type == "Embedding"]
    if "ViT" in repr(task.model):
        assert not tables  # patch embeddings are convs, positions a parameter
        return
    assert tables
    for name in tables:
        assert space.gene(f"layers.{name}.method").choices == ("none", "svd")
    model = copy.deepcopy(task.model).eval()
    big = max(tables, key=lambda n: model.get_submodule(n).weight.numel())
    weight = model.get_submodule(big).weight
    with torch.no_grad():  # rows that span 4 directions: rank 4 keeps all of the table
        weight.copy_(torch.randn(weight.shape[0], 4) @ torch.randn(4, weight.shape[1]))
        before = model(*task.example_input)
    dense = artifact.pack(artifact.export_onnx(model, task.example_input))
    changes = factorize(model, {big: "svd"}, energy=0.999)
    table = model.get_submodule(big)[0]
    assert isinstance(table, torch.nn.Embedding) and changes[big][1] == table.embedding_dim == 4
    with torch.no_grad():
        after = model(*task.example_input)
    torch.testing.assert_close(after, before, atol=1e-3, rtol=1e-3)
    data = artifact.pack(artifact.export_onnx(model, task.example_input))
    assert len(data) < len(dense)
    got = artifact.load(data).run(None, feed(task.example_input, task.input_names))[0]
    np.testing.assert_allclose(got, after.numpy(), atol=1e-4, rtol=0)


class SeparateInputs(torch.nn.Module):
    """An attention block whose q, k and v are separate tensors (the stream normalized once
    per input), as a user may write it: the pruned attention reaches its q/k/v weight by
    chunks there, which torch-pruning cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        from torch import nn

        self.embed = nn.Linear(8, 32)
        self.norm1 = nn.LayerNorm(32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.norm2 = nn.LayerNorm(32)
        self.ff = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(self.norm1(h), self.norm1(h), self.norm1(h), need_weights=False)[0]
        h = h + self.ff(self.norm2(h))
        return self.head(h.mean(1))


def test_heads_and_the_hidden_size_prune_together_when_q_k_v_are_separate_tensors(tmp_path):
    """Heads, FFN channels and the hidden size are all offered on such a model (they were all
    withheld, as failing together), and removed together the model runs, in ONNX Runtime
    too, with the narrower stream feeding the pruned attention's q/k/v."""
    from petra.candidate.evaluate import Recipe
    from petra.compress.structured import prune_channels

    torch.manual_seed(0)
    model, x = SeparateInputs().eval(), torch.randn(4, 10, 8)
    cfg = load_config({"space": {"pruning": ["none", "l2_channel", "l2_heads"],
                                 "sparsity": [0.0, 0.8], "quantization": ["none"]}})
    space = model_space(cfg.space, model, x, cache=tmp_path)
    assert not space.withheld
    assert "l2_heads" in space.gene("layers.attn.method").choices
    assert "l2_channel" in space.gene("layers.ff.0.method").choices and "prune.width" in space
    recipe = Recipe.from_genome(space.complete({
        "layers.attn.method": "l2_heads", "layers.attn.sparsity": 0.5,
        "layers.ff.0.method": "l2_channel", "layers.ff.0.sparsity": 0.5,
        "prune.width": 0.25, "prune.round_to": 1}))
    infos = attention_layers(model, x)
    assert prune_attention(model, recipe.of_kind("heads"), infos) == {"attn": (4, 2)}
    writers = [layer.name for layer in space.layers if layer.residual]
    changes = prune_channels(model, x, recipe.structured_plan(writers), protected=["head"])
    assert changes and model.attn.qkv.in_features == model.norm1.normalized_shape[0] < 32
    assert model.attn.out_proj.out_features == model.attn.qkv.in_features
    with torch.no_grad():
        expected = model(x).numpy()
    got = artifact.load(artifact.pack(artifact.export_onnx(model, x))).run(
        None, feed((x,), ["input"]))[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


class HandWrittenAttention(nn.Module):
    """Self-attention as users write it: ``q``, ``k``, ``v`` and ``proj`` Linears and a
    ``heads`` count. ``fixed_width`` reshapes the heads back to the input's width (``d``, read
    from ``x.shape``), which no head removal survives; else to ``-1``."""

    def __init__(self, d: int = 16, heads: int = 4, *, fixed_width: bool = False) -> None:
        super().__init__()
        self.heads, self.dh, self.fixed_width = heads, d // heads, fixed_width
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.heads, self.dh).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-2, -1) / self.dh ** 0.5 + self.bias_of(t), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d if self.fixed_width else -1))

    def bias_of(self, t: int) -> torch.Tensor | float:
        """What is added to each head's scores: nothing here."""
        return 0.0


def in_a_model(attention: nn.Module) -> tuple[nn.Module, torch.Tensor, list, dict[str, str]]:
    """``attention`` (width 16) before a classifier of 5 tokens, a batch for it, and what
    :func:`attention_layers` finds and says of it."""
    torch.manual_seed(0)
    model = nn.Sequential(attention, nn.Flatten(), nn.Linear(5 * 16, 3)).eval()
    x = torch.randn(2, 5, 16)
    why: dict[str, str] = {}
    return model, x, attention_layers(model, (x,), why=why), why


@pytest.mark.parametrize("fixed_width", [False, True])
def test_a_hand_written_attention_loses_heads_or_says_why_not(fixed_width):
    from petra.compress.attention import prune_heads

    model, x, infos, why = in_a_model(HandWrittenAttention(fixed_width=fixed_width))
    if fixed_width:
        assert infos == []
        assert why["0"].startswith("removing half its heads breaks the model (RuntimeError: ")
        assert "with -1, not from the input's width" in why["0"]
        return
    (info,) = infos
    assert (info.name, info.heads, info.head_dim, info.output) == ("0", 4, 4, "0.proj")
    assert why == {}
    prune_heads(model, info, [1, 3])
    assert model[0].heads == 2 and model[0].q.out_features == 8
    assert model[0].proj.in_features == 8 and model(x).shape == (2, 3)


class FusedGroupedAttention(nn.Module):
    """One fused ``query_key_value`` to every query head and ``kv`` key/value heads (16 + 2 x
    kv x 4 outputs), read by ``dense``: Falcon's multi-query attention with ``kv=1``."""

    def __init__(self, kv: int, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.kv = heads, d // heads, kv
        self.query_key_value = nn.Linear(d, d + 2 * kv * self.head_dim)
        self.dense = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        kv = self.kv * self.head_dim
        q, k, v = self.query_key_value(x).split([self.num_heads * self.head_dim, kv, kv], -1)
        q, k, v = (z.view(b, t, -1, self.head_dim).transpose(1, 2) for z in (q, k, v))
        k, v = (z.repeat_interleave(self.num_heads // self.kv, dim=1) for z in (k, v))
        att = torch.softmax(q @ k.transpose(-2, -1) / self.head_dim ** 0.5, dim=-1)
        return self.dense((att @ v).transpose(1, 2).reshape(b, t, -1))


def test_a_fused_multi_query_attention_loses_query_heads_and_a_grouped_one_says_why_not():
    """Neither was recognized: their heads were out of reach with no line saying so."""
    model, x, infos, why = in_a_model(FusedGroupedAttention(kv=1))
    assert [(i.heads, i.head_dim, i.shared_kv) for i in infos] == [(4, 4, True)] and not why
    prune_heads(model, infos[0], [0, 3])
    assert model[0].query_key_value.out_features == 8 + 8 and model[0].num_heads == 2
    assert model(x).shape == (2, 3)
    _, _, infos, why = in_a_model(FusedGroupedAttention(kv=2))
    assert infos == [] and list(why) == ["0"]
    assert "'query_key_value'" in why["0"] and "grouped-query" in why["0"]


class DistilAttention(nn.Module):
    """DistilBERT's form: ``q_lin``, ``k_lin``, ``v_lin``, ``out_lin``, ``n_heads`` and ``dim``,
    the head width computed in the forward as ``dim // n_heads``."""

    def __init__(self, dim: int = 16, n_heads: int = 4) -> None:
        super().__init__()
        self.dim, self.n_heads = dim, n_heads
        self.q_lin, self.k_lin, self.v_lin = (nn.Linear(dim, dim) for _ in range(3))
        self.out_lin = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs, dim_per_head = x.shape[0], self.dim // self.n_heads
        q, k, v = (f(x).view(bs, -1, self.n_heads, dim_per_head).transpose(1, 2)
                   for f in (self.q_lin, self.k_lin, self.v_lin))
        att = torch.softmax(q @ k.transpose(-2, -1) / dim_per_head ** 0.5, dim=-1)
        context = (att @ v).transpose(1, 2).reshape(bs, -1, self.n_heads * dim_per_head)
        return self.out_lin(context)


def test_a_distilbert_style_attention_loses_heads_with_its_width_attribute():
    """petra lowers ``n_heads`` and, with it, ``dim`` (the q, k and v width): left at 16, the
    head width would come out 16 // 2 = 8 and the pruned projections would not fit."""
    from petra.compress.attention import prune_heads

    torch.manual_seed(0)
    model = nn.Sequential(DistilAttention(), nn.Flatten(), nn.Linear(5 * 16, 3)).eval()
    x = torch.randn(2, 5, 16)
    why: dict[str, str] = {}
    (info,) = attention_layers(model, (x,), why=why)
    assert (info.heads, info.head_dim, info.output) == (4, 4, "0.out_lin") and why == {}
    prune_heads(model, info, [0, 2])
    assert (model[0].n_heads, model[0].dim, model[0].q_lin.out_features) == (2, 8, 8)
    assert model(x).shape == (2, 3)


class TimmAttention(nn.Module):
    """timm's ``Attention`` (1.0): a fused ``qkv``, ``num_heads``, ``head_dim``, and the heads
    reshaped back to ``attn_dim``, not to the input's width."""

    def __init__(self, dim: int = 16, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_dim = num_heads * self.head_dim
        self.qkv, self.proj = nn.Linear(dim, self.attn_dim * 3), nn.Linear(self.attn_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape  # noqa: N806 - timm's names
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, self.attn_dim))


def test_a_timm_attention_loses_heads_with_its_attn_dim():
    """Its heads were refused: ``attn_dim`` kept 16 after the heads went (``shape '[2, 5, 16]'
    is invalid for input of size 80``). petra lowers it with the heads, and the pruned model
    computes what the dense one does with those heads' columns of ``proj`` zeroed."""
    model, x, infos, why = in_a_model(TimmAttention())
    (info,) = infos
    assert (info.heads, info.head_dim, info.output) == (4, 4, "0.proj") and why == {}
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked[0].proj.weight[:, 4:12] = 0.0
        want = masked(x)
    prune_heads(model, info, [1, 2])
    assert (model[0].num_heads, model[0].attn_dim, model[0].qkv.out_features) == (2, 8, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-4)


class DeitAttention(nn.Module):
    """DeiT's (and MAE's, and timm's before 1.0): the heads' width read as ``C //
    self.num_heads`` and the heads reshaped back to ``C``, where ``C`` is the input's width."""

    def __init__(self, dim: int = 16, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape  # noqa: N806 - DeiT's names
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class DeitBlock(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), DeitAttention(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def test_an_attention_that_reads_its_width_from_its_input_loses_heads_and_stream_channels():
    """DeiT's attention reads the input's width ``C`` as its own: no head could go (``shape
    '[2, 5, 16]' is invalid for input of size 80``), and no channel of the stream, whose
    writers were withheld. Given a forward that reads its own width, it loses both, and a
    head removal computes what the dense model does with those heads' columns zeroed."""
    from petra import Task
    from petra.compress.structured import channel_layers, prune_channels
    from petra.tasks.contract import adapt

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), DeitBlock(), DeitBlock(), nn.AdaptiveAvgPool2d((1, None)),
                          nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        dense = model(x)
    task = adapt(Task(model=model, train=[], val=[], test=[], example_input=x, trained=True))
    assert task.own_width == ("1.attn", "2.attn")
    with torch.no_grad():
        torch.testing.assert_close(task.model(x), dense)
    why: dict[str, str] = {}
    infos = attention_layers(task.model, (x,), why=why)
    assert [(i.name, i.heads) for i in infos] == [("1.attn", 4), ("2.attn", 4)] and why == {}
    masked = copy.deepcopy(task.model)
    with torch.no_grad():
        masked.inner[1].attn.proj.weight[:, 4:12] = 0.0
        want = masked(x)
    prune_heads(task.model, infos[0], [1, 2])
    assert model[1].attn.num_heads == 2 and model[1].attn.petra_width == 8
    with torch.no_grad():
        torch.testing.assert_close(task.model(x), want, atol=1e-5, rtol=1e-4)
    _, stream = channel_layers(task.model, (x,))
    assert "0" in stream
    prune_channels(task.model, (x,), {"0": ("l2_channel", 0.5)}, round_to=1, protected=["5"])
    assert model[0].out_features == 8 and task.model(x).shape == (2, 3)
    artifact.export_onnx(task.model, (x,))

    class ReadsItsInput(HandWrittenAttention):  # C is the input's width too: left as it is
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, d = x.shape
            return HandWrittenAttention.forward(self, x.reshape(b, t, d))

    attention = ReadsItsInput(d=16, heads=4)
    attention.q, attention.k, attention.v = (nn.Linear(16, 8) for _ in range(3))
    attention.proj, attention.dh = nn.Linear(8, 16), 2
    task = adapt(Task(model=nn.Sequential(attention, nn.Flatten(), nn.Linear(80, 3)).eval(),
                      train=[], val=[], test=[], example_input=torch.randn(2, 5, 16),
                      trained=True))
    assert task.own_width == () and "forward" not in vars(attention)


class BiasedAttention(HandWrittenAttention):
    """A Swin-style attention: a learned bias per head on each head's scores, from a
    ``(positions, heads)`` table in a submodule (``shared_column``: one column for every head,
    which is not one slice per head)."""

    def __init__(self, t: int = 5, *, shared_column: bool = False) -> None:
        super().__init__()
        self.bias = nn.Module()
        self.bias.table = nn.Parameter(torch.randn(t * t, 1 if shared_column else self.heads))
        self.bias.register_buffer("index", torch.arange(t * t))  # integers: never sliced
        self.norm = nn.LayerNorm(self.heads)  # per feature: never sliced

    def bias_of(self, t: int) -> torch.Tensor:
        bias = self.bias.table[self.bias.index].view(t, t, -1).permute(2, 0, 1)
        if bias.shape[0] == 1:
            bias = bias * torch.arange(self.heads, 0.0, -1)[:, None, None]
        return bias


@pytest.mark.parametrize("shared_column", [False, True])
def test_an_attention_with_a_bias_per_head_loses_each_heads_slice(shared_column):
    """A Hugging Face Swin written outside the repo had every attention refused: the kept
    heads' scores met a relative-position bias with the old head count (``doesn't match the
    broadcast shape``). The bias table loses the removed heads' columns, and the pruned
    attention computes what the whole one computes with those heads' outputs zeroed; a table
    that is not one column per head is refused with the reason."""
    from petra.compress.attention import prune_heads

    model, x, infos, why = in_a_model(BiasedAttention(shared_column=shared_column))
    if shared_column:  # (25, 1): no dimension of the head count, and the weights differ
        assert infos == [] and "changes what the kept heads compute" in why["0"]
        return
    (info,) = infos
    assert why == {}
    with torch.no_grad():
        masked = copy.deepcopy(model)
        masked[0].proj.weight[:, 4:8] = 0.0
        masked[0].proj.weight[:, 12:16] = 0.0
        want = masked(x)
    prune_heads(model, info, [1, 3])
    assert model[0].bias.table.shape == (25, 2) and model[0].norm.weight.shape == (4,)
    assert model[0].bias.index.shape == (25,)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)


class TokenEncoder(nn.Module):
    """Embedding → ``nn.TransformerEncoder`` of two layers → mean → head, in either layout."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(60, 32)
        self.enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(32, 4, 64, batch_first=batch_first), 2,
            enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        h = self.enc(h if self.batch_first else h.transpose(0, 1))
        return self.head(h.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("method", ["l2_channel", "l1_channel", "fpgm"])
def test_the_width_gene_scores_and_prunes_an_encoder_where_one_attention_lost_heads(
        batch_first, method):
    """With one attention of a ``batch_first`` encoder pruned to fewer heads, torch-pruning
    traced the other attention's internal ops and gave the stream group 96 indices for 32
    channels: every criterion failed with an IndexError. Each attention is one node of the
    graph now: the stream narrows everywhere, once, and the model runs in ONNX Runtime."""
    from petra.compress.graph import dependency_graph
    from petra.compress.structured import (
        channel_groups,
        channel_layers,
        check_indices,
        prune_channels,
    )

    torch.manual_seed(0)
    model, x = TokenEncoder(batch_first).eval(), torch.randint(0, 60, (4, 10))
    infos = {i.name: i for i in attention_layers(model, (x,))}
    assert prune_attention(model, {"enc.layers.1.self_attn": ("l2_heads", 0.5)},
                           list(infos.values())) == {"enc.layers.1.self_attn": (4, 2)}
    graph = dependency_graph(model, (x,))
    for group in channel_groups(graph, [model.head]):
        check_indices(graph, group)
    _, residual = channel_layers(model, (x,))
    assert "emb" in residual
    changes = prune_channels(model, (x,), {residual[0]: (method, 0.25)}, protected=["head"])
    assert list(changes.values()) == [(32, 24)]
    pruned = model.enc.layers[1].self_attn
    assert pruned.qkv.in_features == pruned.out_proj.out_features == 24  # narrowed once
    assert model.enc.layers[0].self_attn.embed_dim == model.emb.embedding_dim == 24
    with torch.no_grad():
        expected = model(x).numpy()
    got = artifact.load(artifact.pack(artifact.export_onnx(model, (x,)))).run(
        None, feed((x,), ["input"]))[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


class Pooled(nn.Module):
    """Pools its sequence with the attention weights it asks for."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.pre(x))
        out, weights = self.attn(h, h, h, average_attn_weights=False)
        return self.head((weights.mean(1) @ out).mean(1))


def test_a_model_that_reads_the_attention_weights_is_still_traced():
    """The attention's stand-in in torch-pruning's graph returns weights of the real shape
    where ``need_weights`` asks for them: a model that pools with them would otherwise fail
    the trace, and every layer would keep its channels."""
    from petra.compress.structured import channel_layers

    errors: list[str] = []
    structured, _ = channel_layers(Pooled().eval(), (torch.randn(2, 5, 6),), errors=errors)
    assert not errors and "pre" in structured


def test_a_pruned_attention_returns_its_weights_as_multihead_attention_does():
    from petra.compress.attention import PrunedMultiheadAttention

    torch.manual_seed(0)
    for batch_first in (True, False):
        source = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
        whole = PrunedMultiheadAttention(source, keep=range(4)).eval()
        x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
        with torch.no_grad():
            for average in (True, False):
                want, want_w = source(x, x, x, average_attn_weights=average)
                got, got_w = whole(x, x, x, average_attn_weights=average)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-4)
            assert whole(x, x, x, need_weights=False)[1] is None
    fewer = PrunedMultiheadAttention(source, keep=[0, 2]).eval()
    with torch.no_grad():
        _, weights = fewer(x, x, x, average_attn_weights=False)
    assert weights.shape == (2, 2, 5, 5)  # (batch, heads kept, queries, keys)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 5))


def test_a_model_that_reads_the_attention_weights_runs_and_exports_with_heads_removed():
    model, x = Pooled().eval(), torch.randn(2, 5, 6)
    [info] = attention_layers(model, (x,))
    prune_heads(model, info, [1, 3])
    assert model.attn.num_heads == 2
    with torch.no_grad():
        expected = model(x).numpy()
    got = artifact.load(artifact.pack(artifact.export_onnx(model, (x,)))).run(
        None, feed((x,), ["input"]))[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


def test_a_pruned_attention_whose_weights_are_read_is_still_traced():
    """Once its heads are pruned, the attention's stand-in returns weights too: a model that
    pools with them traced only while the attention was whole, so channel groups elsewhere in
    it were withheld as failing 'in combination' with the head removal."""
    from petra.compress.graph import dependency_graph
    from petra.compress.structured import remove_channels

    model, x = Pooled().eval(), torch.randn(2, 5, 6)
    [info] = attention_layers(model, (x,))
    prune_heads(model, info, [1, 3])
    graph = dependency_graph(model, (x,))
    remove_channels(graph, model.pre, [0, 1, 2, 3])
    assert model.pre.out_features == 12
    with torch.no_grad():
        assert model(x).shape == (2, 3)


def test_a_failing_forward_is_reported_as_itself_not_as_torch_prunings_retry():
    """torch-pruning calls ``model(inputs)`` when ``model(*inputs)`` fails: its error (a
    wrong argument count) used to hide the model's own."""
    from petra.compress.graph import dependency_graph

    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("the model's own failure")

    with pytest.raises(RuntimeError, match="the model's own failure"):
        dependency_graph(Broken(), (torch.randn(2, 4), torch.randn(2, 4)))


def test_an_encoder_on_torchs_nested_tensor_default_is_read_and_computes_as_its_artifact(
        tmp_path):
    """``enable_nested_tensor`` is on by default: in eval mode with a padding mask torch's
    layers then pass nested tensors, which no hook could read (``petra space`` stopped with
    ``NestedTensorImpl doesn't support sizes``), and zero the padded positions, which the
    exported graph does not. The task's model has it off, so torch computes as the artifact."""
    task = load_task("tests.user_transformers:encoder_task", {"epochs": 1, "nested": True})
    assert task.model.encoder.use_nested_tensor is False
    space = space_of(task, tmp_path)
    assert space.gene("layers.encoder.layers.0.self_attn.method").choices == ("none", "l2_heads")
    hidden = {}
    task.model.encoder.register_forward_hook(lambda m, i, o: hidden.update(out=o))
    tokens, padding = task.example_input
    assert bool(padding.any())
    with torch.no_grad():
        want = task.model(tokens, padding)
    assert not hidden["out"].is_nested
    session = artifact.load(artifact.pack(artifact.export_onnx(task.model, task.example_input)))
    got = session.run(None, feed(task.example_input, task.input_names))[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-3)


class LucidAttention(nn.Module):
    """vit-pytorch's attention: a fused ``to_qkv`` chunked in three, and ``to_out`` a
    Sequential of the output Linear and a Dropout."""

    def __init__(self, dim: int = 16, heads: int = 4, dim_head: int = 6) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2)
                   for t in self.to_qkv(x).chunk(3, dim=-1))
        out = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def test_vit_pytorch_attention_loses_heads():
    """Its heads were not found (``to_qkv`` was no fused name, and ``to_out`` no Linear), and
    the only line about it was torch-pruning's failure on ``to_qkv``'s channels."""
    from petra.compress.attention import _same_as_masked

    torch.manual_seed(0)
    model = nn.Sequential(LucidAttention(), nn.Flatten(), nn.Linear(16 * 5, 3)).eval()
    x = torch.randn(2, 5, 16)
    why: dict[str, str] = {}
    (info,) = attention_layers(model, (x,), why=why)
    assert why == {} and (info.name, info.output, info.fused) == ("0", "0.to_out.0", "0.to_qkv")
    pruned = copy.deepcopy(model)
    prune_heads(pruned, info, [1, 2])
    assert pruned[0].to_qkv.out_features == 3 * 2 * 6 and pruned[0].heads == 2
    with torch.no_grad():
        assert _same_as_masked(model, (x,), info, [1, 2], pruned(x))


class NoNormStream(nn.Module):
    """A residual stream through an ``nn.MultiheadAttention``, with no LayerNorm: removing
    stream channels is then exactly the dense model with those channels zeroed."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))


def test_the_width_gene_keeps_each_attention_head_whole():
    """torch-pruning takes an ``nn.MultiheadAttention``'s embed_dim as one width: narrowing
    the stream cut the attention's q, k and v rows at the stream's indices too, and the
    rebuilt attention split the rows left into heads in order, mixing the heads (a Conformer
    written outside the repo computed no masking of its dense model). The stream's channels
    now leave the attention's input columns and output rows only."""
    from petra.compress.structured import prune_channels

    torch.manual_seed(0)
    model, x = NoNormStream().eval(), torch.randn(4, 10, 8)
    dense = copy.deepcopy(model)
    plan = {name: ("l2_channel", 0.25) for name in ("embed", "attn")}
    (before, after), = prune_channels(model, x, plan, protected=["head"]).values()
    assert (before, after) == (32, 24)
    kept = [next(i for i in range(32) if torch.equal(row, dense.embed.weight[i]))
            for row in model.embed.weight]
    cut = torch.tensor([i for i in range(32) if i not in kept])
    with torch.no_grad():  # the dense model with the removed stream channels zeroed
        dense.embed.weight[cut] = 0
        dense.embed.bias[cut] = 0
        dense.attn.out_proj.weight[cut] = 0
        dense.attn.out_proj.bias[cut] = 0
        want = dense(x)
        got = model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in model.attn.parameters()) < sum(
        p.numel() for p in dense.attn.parameters())
    exported = artifact.load(artifact.pack(artifact.export_onnx(model, (x,))))
    np.testing.assert_allclose(exported.run(None, feed((x,), ["input"]))[0], want.numpy(),
                               atol=1e-4, rtol=1e-3)


class _BiasedAttention(nn.Module):
    """A T5-style attention: the relative-position bias of its scores is handed to it."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.n_heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x, position_bias):
        b, t, _ = x.shape

        def split(z):
            return z.view(b, t, self.n_heads, -1).transpose(1, 2)

        scores = split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) + position_bias
        y = (scores.softmax(-1) @ split(self.v(x))).transpose(1, 2).reshape(b, t, -1)
        return self.o(y)


class _SharedBias(nn.Module):
    """The stack computes the bias once, from a table it holds, for every layer (T5's)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.rel_bias = nn.Embedding(12, 16), nn.Embedding(9, 4)
        self.attn = nn.ModuleList([_BiasedAttention(), _BiasedAttention()])
        self.norm = nn.ModuleList([nn.LayerNorm(16), nn.LayerNorm(16)])
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1])
        bias = self.rel_bias((pos[None] - pos[:, None]).clamp(-4, 4) + 4).permute(2, 0, 1)
        x = self.emb(ids)
        for attn, norm in zip(self.attn, self.norm, strict=True):
            x = x + attn(norm(x), bias.unsqueeze(0))
        return self.head(x.mean(1))


def test_heads_refused_for_a_bias_handed_in_say_so():
    """A T5-style stack hands every attention one bias made from a table it holds: no removal
    of one attention's heads can cut it. The reason was a bare broadcast error (``The size of
    tensor a (2) must match the size of tensor b (4)``), and q, k and v were withheld as
    ``torch-pruning ties this group to channel 31 of rel_bias``: neither said why."""
    cfg = load_config({"space": {"pruning": ["none", "l2_channel", "l2_heads"],
                                 "quantization": ["none"], "layers": {"include": ["*"]}}}).space
    space = model_space(cfg, _SharedBias().eval(), (torch.randint(0, 12, (2, 6)),))
    why = space.kept_whole["attn.0"]
    assert why.startswith("removing half its heads breaks the model (RuntimeError: ")
    assert "handed position_bias (1, 4, 6, 6), a per-head term made outside it" in why
    assert space.withheld["layers.attn.0.q"].startswith(
        "torch-pruning maps this group's channels past the width of rel_bias, an Embedding "
        "with 4 channels (to channel 15)")
    assert "attn.0.q" not in space.kept_whole  # said once, where it was withheld
    assert "prune.width" in space and "emb" not in space.kept_whole  # the width narrows it



def test_channels_mapped_past_a_loose_parameter_say_so():
    """torch-pruning maps a Funnel attention's q_head channels (heads x d_head) onto the last
    dimension of its loose ``seg_embed`` (2, heads, d_head): the reason was ``IndexError: index
    16 is out of bounds for dimension 2 with size 16``, which named nothing."""
    transformers = pytest.importorskip("transformers")
    config = transformers.FunnelConfig(vocab_size=32, block_sizes=[1], num_decoder_layers=0,
                                       d_model=32, n_head=2, d_head=16, d_inner=64)
    model = transformers.FunnelBaseModel(config).eval()
    cfg = load_config({"space": {"pruning": ["none", "l2_channel"], "quantization": ["none"],
                                 "layers": {"include": ["*.q_head"]}}}).space
    space = model_space(cfg, model, (torch.randint(0, 32, (2, 8)),))
    assert space.withheld["layers.encoder.blocks.0.0.attention.q_head"].startswith(
        "torch-pruning maps this group's channels past the width of encoder.blocks.0.0.attention.seg_embed, a parameter of shape (2, 2, 16) "
        "cut along its dimension 2 (to channel 31)")


class _PositionMLP(_BiasedAttention):
    """Swin V2's continuous position bias: an MLP inside the attention maps each pair of
    positions' offset to one bias per head."""

    def __init__(self) -> None:
        super().__init__()
        self.bias_mlp = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x):
        pos = torch.arange(x.shape[1], dtype=torch.float32)
        bias = self.bias_mlp((pos[None] - pos[:, None])[..., None]).permute(2, 0, 1)
        return super().forward(x, bias.unsqueeze(0))


class _WithPositionMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.attn, self.head = nn.Embedding(12, 16), _PositionMLP(), nn.Linear(16, 3)

    def forward(self, ids):
        x = self.emb(ids)
        return self.head((x + self.attn(x)).mean(1))


def test_heads_kept_whole_for_a_per_head_layer_inside_say_so():
    """Swin V2's heads were kept whole "because its forward mixes heads, or sizes a per-head
    term from its head count (logit_scale was cut ...)", or with a hint to size the heads from
    its attributes: the term it does not cut is its position MLP's one output per head."""
    cfg = load_config({"space": {"pruning": ["none", "l2_heads"], "quantization": ["none"],
                                 "layers": {"include": ["*"]}}}).space
    space = model_space(cfg, _WithPositionMLP().eval(), (torch.randint(0, 12, (2, 6)),))
    assert space.kept_whole["attn"].endswith(
        "; bias_mlp.2 writes one output per head, a per-head term petra does not cut with the "
        "heads")


def test_a_conv_over_the_heads_loses_the_removed_heads_groups():
    """Nystromformer's attention runs a depthwise conv over its values' heads (``groups`` =
    heads). Its weight was sliced to the kept heads, but not its groups and channels, so the
    trial failed on petra's own edit (``Given groups=4, expected weight to be at least 4 at
    dimension 0``) and the heads were kept whole."""
    from petra.compress.per_head import slice_per_head

    class WithConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query, self.key, self.value = (nn.Linear(16, 16) for _ in range(3))
            self.num_attention_heads = 4
            self.conv = nn.Conv2d(4, 4, (3, 1), padding=(1, 0), groups=4, bias=False)

    torch.manual_seed(0)
    attention, values = WithConv(), torch.randn(2, 4, 5, 4)  # (batch, heads, tokens, head dim)
    with torch.no_grad():
        want = attention.conv(values)[:, [0, 2]]
    slice_per_head(attention, 4, [0, 2])
    conv = attention.conv
    assert conv.groups == conv.in_channels == conv.out_channels == 2
    with torch.no_grad():
        torch.testing.assert_close(conv(values[:, [0, 2]]), want)


class _ConvOverHeads(nn.Module):
    """Nystromformer's form: a depthwise conv over the values' heads, added to the context."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(d, d) for _ in range(3))
        self.num_attention_heads, self.attention_head_size = heads, d // heads
        self.conv = nn.Conv2d(heads, heads, (3, 1), padding=(1, 0), groups=heads, bias=False)
        self.dense = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.num_attention_heads, -1).transpose(1, 2)
                   for p in (self.query, self.key, self.value))
        att = torch.softmax(q @ k.transpose(-2, -1) / self.attention_head_size ** 0.5, dim=-1)
        return self.dense((att @ v + self.conv(v)).transpose(1, 2).reshape(b, t, -1))


def test_a_layer_whose_channels_are_a_head_projections_is_kept_whole_with_it():
    """Nystromformer's conv over the heads was offered ``l2_channel``, but its channel group
    holds the value projection, kept whole for ``l2_heads``: every candidate with the gene
    removed nothing (``channels {}``, size 1.000). It is kept whole, and says why."""
    torch.manual_seed(0)
    model = nn.Sequential(_ConvOverHeads(), nn.Flatten(), nn.Linear(5 * 16, 3)).eval()
    cfg = load_config({"space": {"pruning": ["none", "l2_channel", "l2_heads"],
                                 "quantization": ["none"], "layers": {"include": ["*"]}}}).space
    space = model_space(cfg, model, (torch.randn(2, 5, 16),))
    genes = {g.name for g in space.genes}
    assert "layers.0.method" in genes and "layers.0.conv.method" not in genes
    assert space.kept_whole["0.conv"].startswith(
        "its channels are also 0.value's, which keeps them (a q, k or v projection of 0: ")
