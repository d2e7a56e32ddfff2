"""Block skipping (``blocks.<name>.skip``) and GRU unit pruning (``l2_units``)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import petra.compress  # noqa: F401  (fills the registries)
from petra.candidate import artifact
from petra.compress.blocks import (
    ReluIdentity,
    ShortcutOnly,
    skip_blocks,
    skip_lines,
    skippable_blocks,
)
from petra.compress.recurrent import gru_layers, prune_gru_units, prune_recurrent
from petra.registry import PRUNING
from tests.test_quantize import initializers, int4_marker, manifest_of, quantize


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                         nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (self.downsample(x) if self.downsample is not None else x))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.layer1 = Block(8, 16, 2)
        self.layer2 = Block(16, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(torch.relu(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


class GRUNet(nn.Module):
    def __init__(self, hidden: int = 12, width: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(5, width)
        self.gru = nn.GRU(width, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x):
        out, _ = self.gru(torch.relu(self.proj(x)))
        return self.head(out[:, -1])


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return ResNet().eval(), torch.randn(4, 1, 8, 8)


def test_residual_blocks_are_found_with_their_shortcuts(resnet):
    model, x = resnet
    found = {b.name: b for b in skippable_blocks(model, (x,))}
    assert set(found) == {"layer1", "layer2"}  # the stem changes shape; fc is the output
    assert found["layer1"].kind == "shortcut" and found["layer1"].shortcut == "layer1.downsample"
    assert found["layer2"].kind == "identity" and found["layer2"].shortcut is None
    assert found["layer1"].relu and found["layer2"].relu  # both end in a ReLU
    # Skipping layer1 removes its convs and BNs, not the shortcut that stays.
    shortcut = sum(p.numel() for p in model.layer1.downsample.parameters())
    assert found["layer1"].params == sum(p.numel() for p in model.layer1.parameters()) - shortcut


def test_skipping_keeps_the_shortcut_path_and_shape(resnet):
    model, x = resnet
    blocks = skippable_blocks(model, (x,))
    skipped = copy.deepcopy(model)
    done = skip_blocks(skipped, ["layer2", "layer1"], blocks)
    assert sorted(done) == ["layer1", "layer2"]
    assert isinstance(skipped.layer1, ShortcutOnly) and isinstance(skipped.layer2, ReluIdentity)
    with torch.no_grad():
        stem = torch.relu(skipped.stem(x))
        want = skipped.fc(torch.relu(skipped.layer1.shortcut(stem)).mean(dim=(2, 3)))
        assert torch.allclose(skipped(x), want, atol=1e-6)
    assert sum(p.numel() for p in skipped.parameters()) < sum(p.numel()
                                                              for p in model.parameters())
    # The skipped model still exports and runs as ONNX with the same outputs.
    data = artifact.pack(artifact.export_onnx(skipped, x))
    ort = artifact.load(data).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(ort, skipped(x).detach().numpy(), atol=1e-5)


class Shared(nn.Module):
    """ALBERT's form: one block applied at two depths."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.layer = Block(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.layer(self.layer(torch.relu(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_a_block_shared_across_depths_says_its_one_gene_skips_every_call(resnet):
    torch.manual_seed(0)
    model, x = Shared().eval(), torch.randn(4, 1, 8, 8)
    found = {b.name: b for b in skippable_blocks(model, (x,))}
    assert found["layer"].calls == 2
    assert "layer (2 calls)" in skip_lines(list(found.values()))[-1]
    skipped = copy.deepcopy(model)
    skip_blocks(skipped, ["layer"], list(found.values()))
    with torch.no_grad():  # both calls hand on their input (a ReLU'd one: the block ends in one)
        want = model.fc(torch.relu(model.stem(x)).mean(dim=(2, 3)))
        assert torch.allclose(skipped(x), want, atol=1e-6)
    once = skippable_blocks(resnet[0], (resnet[1],))  # blocks called once say nothing of it
    assert [b.calls for b in once] == [1, 1] and not any("calls" in s for s in skip_lines(once))


class GatedConv(nn.Module):
    """A gated CNN's layer: one grouped conv, padded outside it, then a GLU."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 16, 3, groups=groups)

    def forward(self, x):
        return torch.nn.functional.glu(self.conv(torch.nn.functional.pad(x, (2, 0))), dim=1)


@pytest.mark.parametrize("groups", [1, 2])
def test_a_one_layer_residual_branch_may_be_skipped_grouped_or_not(groups):
    """A gated CNN's branch ``x + glu(conv(pad(x)))`` got a skip gene only where its conv
    was ungrouped: with 2 groups, none, and no line said why."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.l1, self.head = nn.Conv1d(3, 8, 1), GatedConv(groups), nn.Linear(8, 2)

        def forward(self, x):
            h = self.stem(x)
            return self.head((h + self.l1(h)).mean(-1))

    torch.manual_seed(0)
    found = {b.name: b for b in skippable_blocks(Net().eval(), (torch.randn(2, 3, 6),))}
    assert found["l1"].kind == "branch"


def test_skipping_an_unknown_block_names_the_ones_there_are(resnet):
    model, x = resnet
    with pytest.raises(ValueError, match="unknown block 'layer9'.*layer1, layer2"):
        skip_blocks(model, ["layer9"], skippable_blocks(model, (x,)))


def test_built_in_models_offer_their_blocks():
    from petra.tasks import load_task

    task = load_task("digits_cnn", {})
    found = {b.name: b.kind for b in skippable_blocks(task.model, task.example_input)}
    assert found == {"layer1": "shortcut", "layer2": "shortcut", "layer3": "identity"}
    task = load_task("digits_mlp", {})
    assert [b.name for b in skippable_blocks(task.model, task.example_input)] == ["fc2"]


def test_a_square_linear_layer_outside_blocks_may_become_the_identity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 2)).eval()
    x = torch.randn(8, 6)
    blocks = skippable_blocks(model, (x,))
    assert [b.name for b in blocks] == ["2"]  # not the output layer, not 0 (6 -> 16)
    skip_blocks(model, ["2"], blocks)
    with torch.no_grad():
        assert torch.allclose(model(x), model[4](model[3](model[1](model[0](x)))))


class PreNorm(nn.Module):
    """A pre-norm residual: ``x + mlp(norm(x))``, or, ``parallel``, GPT-NeoX's
    ``x + mlp(norm(x)) + fc(norm2(x))``."""

    def __init__(self, parallel: bool = False) -> None:
        super().__init__()
        self.norm, self.norm2 = nn.LayerNorm(8), nn.LayerNorm(8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.fc = nn.Linear(8, 8)
        self.parallel = parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel:
            return self.mlp(self.norm(x)) + self.fc(self.norm2(x)) + x
        return x + self.mlp(self.norm(x))


@pytest.mark.parametrize("parallel", [False, True])
def test_a_residual_branch_is_skipped_as_zeros_and_a_block_as_the_identity(parallel):
    """As the identity, a skipped ``mlp`` of ``x + mlp(norm(x))`` gave ``x + norm(x)``: a
    residual branch's replacement outputs zeros, so the stream goes on alone, in torch and
    in the exported graph. The block around it is still skipped as the identity."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), PreNorm(parallel), PreNorm(parallel),
                          nn.Linear(8, 3)).eval()
    x = torch.randn(5, 4)
    kinds = {b.name: b.kind for b in skippable_blocks(model, (x,))}
    assert kinds["1.mlp"] == kinds["2.mlp"] == "branch"
    assert kinds["1"] == kinds["2"] == "identity"
    with torch.no_grad():
        h = model[0](x)
        if parallel:
            h = h + model[1].fc(model[1].norm2(h))
        want = model[3](model[2](h))
    skip_blocks(model, ["1.mlp"], skippable_blocks(model, (x,)))
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)
    got = artifact.load(artifact.pack(artifact.export_onnx(model, (x,)))).run(
        None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-4)


class TokenMixing(nn.Module):
    """An MLP-Mixer block's token mixing, behind a layer scale:
    ``x + gamma * mlp(norm(x).transpose(1, 2)).transpose(1, 2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.mlp = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6))
        self.gamma = nn.Parameter(torch.full((8,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.mlp(self.norm(x).transpose(1, 2)).transpose(1, 2)


def test_a_branch_seen_through_a_transpose_and_a_layer_scale_is_skipped_as_zeros():
    """An MLP-Mixer written outside the repo: its token ``mlp`` reads the stream transposed,
    and its output reaches the sum transposed back. It was skipped as the identity, which gave
    ``x + gamma * norm(x)``; without the block, the stream goes on alone."""
    torch.manual_seed(0)
    model = nn.Sequential(TokenMixing(), nn.Flatten(), nn.Linear(48, 3)).eval()
    x = torch.randn(5, 6, 8)
    assert {b.name: b.kind for b in skippable_blocks(model, (x,))}["0.mlp"] == "branch"
    with torch.no_grad():
        want = model[2](model[1](x))
    skip_blocks(model, ["0.mlp"], skippable_blocks(model, (x,)))
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)


class Modulated(nn.Module):
    """A DiT block: the ``mlp`` reads the stream normalized and modulated by a condition
    (``norm(x) * (1 + scale) + shift``), and its gated output is added back."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8, elementwise_affine=False)
        self.ada = nn.Linear(4, 24)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(cond).unsqueeze(1).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


def test_a_branch_that_reads_the_stream_modulated_is_skipped_as_zeros():
    """A DiT written outside the repo: its ``mlp`` read ``norm(x) * (1 + scale) + shift``,
    which no module made, so it was skipped as the identity (``x + gate * modulated(x)``)."""
    torch.manual_seed(0)
    model = Modulated().eval()
    x, cond = torch.randn(3, 5, 8), torch.randn(3, 4)
    assert {b.name: b.kind for b in skippable_blocks(model, (x, cond))}["mlp"] == "branch"
    skip_blocks(model, ["mlp"], skippable_blocks(model, (x, cond)))
    with torch.no_grad():
        torch.testing.assert_close(model(x, cond), x)


class AddsItsResidual(nn.Module):
    """BLOOM's MLP: given the stream as ``residual``, it returns ``residual + mlp(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return residual + self.down(torch.nn.functional.gelu(self.up(x)))


class CarriesTheStream(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.norm = nn.Linear(8, 16), nn.LayerNorm(16)
        self.mlp, self.head = AddsItsResidual(), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head(self.mlp(self.norm(h), h).mean(1))


def test_a_block_that_adds_the_stream_it_is_given_hands_on_the_stream():
    """Skipped, BLOOM's MLP handed on its first argument, the normed stream, and the model
    lost its residual stream (the artifact matched ``mlp(x, r) = x``, not ``= r``)."""
    torch.manual_seed(0)
    model, x = CarriesTheStream().eval(), torch.randn(4, 6, 8)
    blocks = skippable_blocks(model, (x,))
    (mlp,) = [b for b in blocks if b.name == "mlp"]
    assert mlp.carried == 1 and mlp.kind == "identity"
    skip_blocks(model, ["mlp"], blocks)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(model.embed(x).mean(1)))


def test_gru_units_are_removed_with_their_readers_columns():
    torch.manual_seed(0)
    model, x = GRUNet().eval(), torch.randn(3, 7, 5)
    (info,) = gru_layers(model, (x,))
    assert info.name == "gru" and info.hidden == 12 and info.consumers == ("head",)
    original = copy.deepcopy(model)
    keep = [0, 3, 4, 9, 11]
    prune_gru_units(model, info, keep)
    assert model.gru.hidden_size == 5 and model.head.in_features == 5
    assert model.gru.weight_ih_l0.shape == (15, 8) and model.gru.weight_hh_l0.shape == (15, 5)
    assert model(x).shape == (3, 3)
    h = 12
    rows = [g * h + k for g in range(3) for k in keep]
    assert torch.equal(model.gru.weight_hh_l0, original.gru.weight_hh_l0[rows][:, keep])
    assert torch.equal(model.head.weight, original.head.weight[:, keep])


def test_gru_units_whose_weights_are_zero_change_nothing_when_removed():
    torch.manual_seed(0)
    model, x = GRUNet().eval(), torch.randn(3, 7, 5)
    dead = [1, 2, 5, 6, 7, 8, 10]
    with torch.no_grad():
        # A unit that reads nothing, starts at zero and never updates stays zero: its new-gate
        # rows are zero and its update gate holds it (z = 1 through a large bias).
        for unit in dead:
            for weight in (model.gru.weight_ih_l0, model.gru.weight_hh_l0):
                weight[[unit, h_row(unit, 1), h_row(unit, 2)]] = 0
            model.gru.weight_hh_l0[:, unit] = 0
            model.gru.bias_ih_l0[h_row(unit, 1)] = 50.0
            model.gru.bias_ih_l0[h_row(unit, 2)] = 0
            model.gru.bias_hh_l0[h_row(unit, 2)] = 0
        reference = model(x)
    (info,) = gru_layers(model, (x,))
    changes = prune_recurrent(model, {"gru": ("l2_units", 7 / 12)}, [info])
    assert changes == {"gru": (12, 5)}
    assert model.gru.hidden_size == 5
    with torch.no_grad():
        assert torch.allclose(model(x), reference, atol=1e-5)


def h_row(unit: int, gate: int, hidden: int = 12) -> int:
    return gate * hidden + unit


def test_l2_units_is_a_registered_recurrent_method():
    method = PRUNING.get("l2_units")
    assert method.meta["kind"] == "recurrent" and method.meta["structured"]


def test_int4_packs_a_gru_s_weights_and_round_trips_them():
    torch.manual_seed(0)
    model, x = GRUNet(hidden=96, width=32).eval(), torch.randn(4, 6, 5)
    proto = artifact.export_onnx(model, x)
    dense = len(artifact.pack(proto))
    out = quantize("int4_weight", proto)
    data = artifact.pack(out)
    assert len(data) <= 0.3 * dense
    marked = int4_marker(out)
    packed = {e["name"] for e in manifest_of(data)["int4"]}
    assert packed == set(marked)
    recurrent = [name for name, spec in marked.items() if spec["axis"] == 1]
    assert len(recurrent) >= 2  # the GRU's input (W) and recurrent (R) weights
    expected, got = initializers(out), initializers(artifact.unpack(data))
    for name in expected:
        assert expected[name].tobytes() == got[name].tobytes(), name
    result = artifact.load(data).run(None, {"input": x.numpy()})[0]
    reference = model(x).detach().numpy()
    assert np.abs(result - reference).max() < 0.1 * (np.ptp(reference) + 1e-6)


def test_block_genes_are_offered_only_when_asked_for():
    from petra.config import load_config
    from petra.space import model_space
    from petra.tasks import load_task

    task = load_task("digits_cnn", {"width": 8})
    plain = model_space(load_config({}).space, task.model, task.example_input)
    assert not [g for g in plain.genes if g.name.startswith("blocks.")]
    space = model_space(load_config({"space": {"skip_blocks": True}}).space, task.model,
                        task.example_input)
    names = [g.name for g in space.genes if g.name.startswith("blocks.")]
    assert names == ["blocks.layer1.skip", "blocks.layer2.skip", "blocks.layer3.skip"]
    # A skipped block's layers are gone with it: their genes have no effect, so two genomes
    # that differ only there are the same candidate.
    layer = next(g.name for g in space.genes if g.name.startswith("layers.layer3.")
                 and g.name.endswith(".method"))
    sparsity = layer.replace(".method", ".sparsity")
    a = {"blocks.layer3.skip": True, layer: "l2_channel", sparsity: 0.5}
    b = {"blocks.layer3.skip": True, layer: "none"}
    assert space.effective(a) == space.effective(b)
    assert space.effective({**a, "blocks.layer3.skip": False}) != space.effective(
        {**b, "blocks.layer3.skip": False})


def test_recurrent_methods_are_offered_on_grus_and_only_there():
    from petra.config import load_config
    from petra.space import model_space
    from petra.tasks import load_task

    task = load_task("events_gru", {})
    space = model_space(load_config({"space": {"pruning": ["l2_channel", "l2_units"]}}).space,
                        task.model, task.example_input)
    choices = {g.name: set(g.choices) for g in space.genes if g.name.endswith(".method")}
    assert "l2_units" in choices["layers.gru.method"]
    assert "l2_channel" not in choices["layers.gru.method"]
    assert all("l2_units" not in c for name, c in choices.items() if name != "layers.gru.method")


@pytest.mark.slow  # a GRU baseline trained, two candidates evaluated (~15 s): in make test's second run
def test_a_gru_whose_reader_is_skipped_loses_units_from_the_next_reader(tmp_path):
    """events_gru's ``hidden`` layer reads the GRU; skipped, the classifier reads it instead."""
    from petra.candidate.baseline import prepare_baseline
    from petra.candidate.evaluate import Evaluator
    from petra.tasks import load_task

    task = load_task("events_gru", {})
    (info,) = gru_layers(task.model, task.example_input)
    assert info.consumers == ("hidden",)
    baseline = prepare_baseline(task, task_name="events_gru", task_params={},
                                cache_dir=tmp_path)
    evaluator = Evaluator(task_name="events_gru", task_params={},
                          baseline_state=baseline.state, baseline_artifact=baseline.artifact)
    result = evaluator.evaluate({"blocks.hidden.skip": True, "layers.gru.method": "l2_units",
                                 "layers.gru.sparsity": 0.5, "quant.scheme": "int8_static",
                                 "finetune.epochs": 0})
    assert result.status == "complete", result.error
    assert result.info["skipped"] == ["hidden"]
    before, after = result.info["channels"]["gru"]
    assert after < before
    assert result.metrics["size_ratio"] < 1.0
    # 84% of the units gone leaves no int4 target that reads anything but the graph input;
    # the bias correction's probe then fetches nothing (ORT would return every output).
    result = evaluator.evaluate({"blocks.hidden.skip": True, "layers.gru.method": "l2_units",
                                 "layers.gru.sparsity": 0.84, "quant.scheme": "int4_weight",
                                 "finetune.epochs": 0})
    assert result.status == "complete", result.error
    assert result.metrics["size_ratio"] < 0.25


def test_the_first_layer_of_a_transformer_encoder_can_be_skipped():
    """``nn.TransformerEncoder`` reads ``self.layers[0].self_attn.batch_first`` before it runs
    its layers: with the first layer skipped, that was an AttributeError, and the verification
    withheld the gene. The skipped model runs, and exports to ONNX Runtime."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    model = nn.Sequential(nn.TransformerEncoder(layer, 3), nn.Flatten(), nn.Linear(5 * 16, 3))
    model.eval()
    x = torch.randn(2, 5, 16)
    blocks = skippable_blocks(model, (x,))
    assert "0.layers.0" in [b.name for b in blocks]
    skip_blocks(model, ["0.layers.0"], blocks)
    with torch.no_grad():
        reference = model(x).numpy()
    proto = artifact.export_onnx(model, (x,))
    out = artifact.load(artifact.pack(proto)).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(out, reference, atol=1e-5)


class Seq2Seq(nn.Module):
    """``nn.TransformerDecoder`` over the memory of an encoder, both of two layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        enc = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
        dec = nn.TransformerDecoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
        self.encoder, self.decoder = nn.TransformerEncoder(enc, 2), nn.TransformerDecoder(dec, 2)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(x, self.encoder(x)).mean(1))


def test_the_first_layer_of_a_transformer_decoder_can_be_skipped():
    """``nn.TransformerDecoder`` reads its first layer's ``self_attn`` too: the gene was
    withheld with ``'ReluIdentity' object has no attribute 'self_attn'``."""
    model, x = Seq2Seq().eval(), torch.randn(2, 5, 16)
    blocks = skippable_blocks(model, (x,))
    assert "decoder.layers.0" in [b.name for b in blocks]
    # A stack of layers is not a block: skipping it skips them all, which their genes reach.
    assert {"encoder", "decoder"}.isdisjoint(b.name for b in blocks)
    assert {"encoder.layers.1", "decoder.layers.1"} <= {b.name for b in blocks}
    skip_blocks(model, ["decoder.layers.0"], blocks)
    with torch.no_grad():
        assert model(x).shape == (2, 3)


class MhaBlock(nn.Module):
    """A GPT block written with torch's ``nn.MultiheadAttention``: ``x + attn(ln(x))``."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.ln, self.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(x)


def test_a_multihead_attention_that_is_a_residual_branch_can_be_skipped():
    """Its one Linear is ``out_proj`` (q, k and v are a raw parameter), so it was never a block:
    a GPT written outside the repo with it had no attention skip. Skipped, it gives what the
    model gives with ``out_proj`` zeroed."""
    torch.manual_seed(0)
    model = nn.Sequential(MhaBlock(), MhaBlock(), nn.Flatten(), nn.Linear(5 * 16, 3)).eval()
    x = torch.randn(2, 5, 16)
    blocks = {b.name: b for b in skippable_blocks(model, (x,))}
    assert blocks["0.attn"].kind == "branch" and blocks["0.attn"].outputs == 2
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked[0].attn.out_proj.weight.zero_()
        masked[0].attn.out_proj.bias.zero_()
        want = masked(x)
    skip_blocks(model, ["0.attn"], list(blocks.values()))
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)


class Res(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.relu(self.a(x)))


class Stage(nn.Module):
    """Two residual blocks, with a projection of its own when ``own`` (MobileViT's convs
    around its transformer)."""

    def __init__(self, own: bool) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Res(), Res())
        self.proj = nn.Linear(8, 8) if own else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.blocks(x))


@pytest.mark.parametrize("own", [False, True])
def test_a_stack_of_blocks_is_no_block_unless_it_holds_layers_of_its_own(own):
    model = nn.Sequential(nn.Linear(4, 8), Stage(own), nn.ReLU(), nn.Linear(8, 3)).eval()
    names = {b.name for b in skippable_blocks(model, (torch.randn(2, 4),))}
    assert {"1.blocks.0", "1.blocks.1"} <= names and "1.blocks" not in names
    assert ("1" in names) == own


class Tagged(nn.Module):
    """A residual layer with a tag its encoder reads to pick its input (ModernBERT's layers
    carry ``attention_type``, which picks their mask)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.attn, self.mlp = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x) * scale
        return x + self.mlp(x)


class TaggedEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Tagged("local"), Tagged("global")])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = {"local": torch.ones(1), "global": torch.full((1,), 0.5)}
        for layer in self.layers:
            x = layer(x, scales[layer.kind])
        return self.head(x)


def test_a_skipped_block_keeps_the_attributes_its_model_reads():
    """ModernBERT's encoder reads each layer's ``attention_type``: with a layer skipped, that
    was ``'ReluIdentity' object has no attribute 'attention_type'``, and every layer's skip
    was withheld. The stand-in keeps the block's plain attributes; the model runs as with
    the layer's work removed."""
    torch.manual_seed(0)
    model = TaggedEncoder().eval()
    x = torch.randn(4, 8)
    blocks = skippable_blocks(model, (x,))
    assert "layers.0" in [b.name for b in blocks]
    skip_blocks(model, ["layers.0"], blocks)
    assert model.layers[0].kind == "local"
    with torch.no_grad():
        h = x + model.layers[1].attn(x) * 0.5
        torch.testing.assert_close(model(x), model.head(h + model.layers[1].mlp(h)))


def test_the_norm_before_a_skipped_branch_keeps_the_residual_width():
    """The skipped branch's zeros are ``x * 0``: as ``zeros_like`` they cut the traced graph,
    torch-pruning left out the norm that feeds the branch, and the model failed once the
    residual width shrank (``normalized_shape=[32] ... got input of size [16, 17, 24]``)."""
    from petra.compress.structured import prune_channels

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), PreNorm(), PreNorm(), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 4)
    skip_blocks(model, ["1.mlp"], skippable_blocks(model, (x,)))
    changes = prune_channels(model, (x,), {"0": ("l2_channel", 0.5)}, round_to=1,
                             protected=["3"])
    assert list(changes.values()) == [(8, 4)] and model[0].out_features == 4
    assert model[1].norm.weight.numel() == model[2].norm.weight.numel() == 4
    assert model(x).shape == (5, 3)


class Attention(nn.Module):
    """A hand-written self-attention outside any block: its projections are square."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 2
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.out_proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.num_heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


def test_an_attentions_square_projections_are_not_skippable_layers():
    """Its q, k, v and output projections were offered as square layers to skip: as the
    identity a key projection is nonsense, and head removal then failed on the missing
    weight (``'ReluIdentity' object has no attribute 'weight'``, 16 of 36 candidates)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), Attention(), nn.Linear(8, 8), nn.Linear(8, 3)).eval()
    assert [b.name for b in skippable_blocks(model, (torch.randn(2, 5, 4),))] == ["2"]


class Bottlenecked(nn.Module):
    """MobileBERT's shape: a Linear computes the attention's input from the stream, and the
    attention block takes it beside the stream."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.to_query = nn.Linear(16, 8)
        self.attention = Mixer()
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head(h + self.attention(h, self.to_query(h)))


class Mixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(8, 16)

    def forward(self, h: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return self.fc1(h) * torch.sigmoid(self.fc2(q))


def test_a_layer_whose_output_only_a_skipped_block_read_loses_the_streams_channels():
    """With MobileBERT's attention skipped, the Linear that computes its query input still
    runs, and nothing reads its output: torch-pruning, tracing from the model's outputs, left
    it out, and the stream's channels went without it (``mat1 and mat2 shapes cannot be
    multiplied (1280x32 and 64x32)``: 8 of 36 candidates failed)."""
    from petra import Task
    from petra.compress.structured import prune_channels
    from petra.tasks.contract import adapt

    torch.manual_seed(0)
    x = torch.randn(4, 4)
    batch = (x, torch.zeros(4, dtype=torch.long))
    task = adapt(Task(model=Bottlenecked().eval(), train=[batch], val=[batch], test=[batch],
                      example_input=x, trained=True))
    model = task.model
    skip_blocks(model, ["attention"], skippable_blocks(model, task.example_input))
    assert prune_channels(model, task.example_input, {"embed": ("l2_channel", 0.5)},
                          protected=["head"]) == {"embed": (16, 8)}
    assert model.inner.to_query.in_features == 8
    assert model(*task.example_input).shape == (4, 3)


def test_a_skip_that_runs_alone_is_withheld_where_the_channels_around_it_break_it():
    """Skipping SqueezeBERT's post-attention conv hands its values straight to the stream:
    torch-pruning then cuts the values with the stream's channels, and their head reshape
    fails. Each skip ran alone in verification, and such candidates failed in the search."""
    from petra.compress.verify import AROUND
    from petra.config import load_config
    from petra.space import model_space

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.v, self.post = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16)
            self.norm, self.ff, self.out = nn.LayerNorm(16), nn.Linear(16, 16), nn.Linear(16, 2)

        def forward(self, x):
            h = self.emb(x)
            v = self.v(h)
            b, t, _ = v.shape
            v = v.view(b, t, 4, 4).transpose(1, 2).transpose(1, 2).reshape(b, t, 16)  # heads
            h = self.norm(h + self.post(v))
            return self.out((h + self.ff(h)).mean(1))

    x = (torch.randn(2, 3, 8),)
    skipped = Net().eval()
    skip_blocks(skipped, ["post"], skippable_blocks(skipped, x))
    skipped(*x)  # alone, the skip runs
    cfg = load_config({"space": {
        "pruning": ["none", "l2_channel"], "quantization": ["none"], "skip_blocks": True,
        "layers": {"include": ["*"], "exclude": []}}}).space
    space = model_space(cfg, Net().eval(), x)
    assert space.withheld["blocks.post.skip"].startswith(
        f"{AROUND} (the compressed model's forward fails at test_blocks_recurrent.py:")
    assert "(RuntimeError: shape" in space.withheld["blocks.post.skip"]
    assert space.gene("blocks.ff.skip") and space.gene("layers.emb.method")


def test_a_shortcut_called_with_more_than_the_input_is_not_a_skip_path():
    """Swin's stage hands its ``downsample`` (patch merging) the resolution too: skipped to its
    shortcut, it was called on the input alone and failed with petra's own TypeError."""

    class Merge(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)  # it halves the width, as merging does

        def forward(self, x, dims):
            return self.fc(x) * dims[0]

    class Stage(nn.Module):
        def __init__(self, merge: nn.Module) -> None:
            super().__init__()
            self.a, self.b, self.downsample = nn.Linear(8, 8), nn.Linear(8, 8), merge

        def forward(self, x):
            h = x + self.b(torch.relu(self.a(x)))
            return self.downsample(h, (1, 1)) if isinstance(self.downsample, Merge) \
                else self.downsample(h)

    class Net(nn.Module):
        def __init__(self, merge: nn.Module) -> None:
            super().__init__()
            self.stage, self.out = Stage(merge), nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.stage(x))

    x = (torch.randn(2, 8),)
    assert [b.kind for b in skippable_blocks(Net(nn.Linear(8, 4)), x)
            if b.name == "stage"] == ["shortcut"]
    assert "stage" not in [b.name for b in skippable_blocks(Net(Merge()), x)]


def test_a_module_that_only_wraps_one_block_is_not_a_second_gene():
    """ALBERT's layer group holds one layer: skipping either was the same change, offered as
    two genes (as was a stage of one block). The inner block keeps its gene."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    class Group(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block()])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.group, self.out = Group(), nn.Linear(8, 2)

        def forward(self, x):
            return self.out(self.group(x))

    names = [b.name for b in skippable_blocks(Net(), (torch.randn(2, 8),))]
    assert "group.layers.0" in names and "group" not in names


def test_a_block_whose_one_layer_changes_the_shape_is_skippable():
    """A TCN's last block, ``x + relu(conv(F.pad(x, (p, 0))))``, holds one conv that its
    padding outside makes non-square: it had no skip gene, and no line said why. Such a
    block is skippable as the identity; a block of one square layer still is not a second
    gene beside that layer's own."""
    import torch.nn.functional as F

    class LeftPad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(8, 8, 3, dilation=2)

        def forward(self, x):
            return x + F.relu(self.conv(F.pad(x, (4, 0))))

    class Square(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Conv1d(8, 8, 1)

        def forward(self, x):
            return torch.relu(self.fc(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.pad, self.sq = nn.Conv1d(3, 8, 1), LeftPad(), Square()
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            return self.out(self.sq(self.pad(self.inp(x))).mean(-1))

    model, x = Net().eval(), torch.randn(2, 3, 12)
    blocks = {b.name: b for b in skippable_blocks(model, (x,))}
    assert set(blocks) == {"pad", "sq.fc"}
    twin = copy.deepcopy(model)
    assert skip_blocks(twin, ["pad"], list(blocks.values())) == ["pad"]
    with torch.no_grad():
        assert torch.allclose(twin(x), model.out(model.sq(model.inp(x)).mean(-1)))


@pytest.mark.parametrize("act", [torch.relu, nn.functional.gelu, torch.tanh])
def test_a_branch_seen_through_an_activation_is_skipped_as_zeros(act):
    """``h = relu(c2(h)) + h`` (a CoordConv net written outside the repo): the activation
    keeps a zero branch zero, so skipping c2 removes the branch; as the identity it gave
    ``relu(h) + h``."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.inp(x)
            return self.out(act(self.fc(h)) + h)

    model, x = Net().eval(), torch.randn(3, 4)
    blocks = skippable_blocks(model, (x,))
    assert [(b.name, b.kind) for b in blocks] == [("fc", "branch")]
    skip_blocks(model, ["fc"], blocks)
    with torch.no_grad():
        assert torch.allclose(model(x), model.out(model.inp(x)))


def test_a_skip_that_joins_two_channel_groups_is_verified_with_one_removal_of_them():
    """Skipping the second separable conv of a Jasper block (QuartzNet) hands the first one's
    channels to the block's sum, so its group and the residual conv's become one. Verification
    removed that group's channels once per former group, 0.9 of them twice, and the depthwise
    conv after the block was left with no group (``non-positive groups``): three skip genes were
    withheld that a search runs."""
    from petra.compress.structured import prune_channels
    from petra.config import load_config
    from petra.space import model_space

    def separable(ci: int, co: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv1d(ci, ci, 3, padding=1, groups=ci, bias=False),
                             nn.Conv1d(ci, co, 1, bias=False), nn.BatchNorm1d(co))

    class Jasper(nn.Module):
        def __init__(self, ci: int, co: int) -> None:
            super().__init__()
            self.first, self.second, self.res = separable(ci, co), separable(co, co), \
                nn.Conv1d(ci, co, 1)

        def forward(self, x):
            return torch.relu(self.second(torch.relu(self.first(x))) + self.res(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv1d(4, 16, 1)
            self.b0, self.b1, self.out = Jasper(16, 16), Jasper(16, 24), nn.Linear(24, 2)

        def forward(self, x):
            return self.out(self.b1(self.b0(torch.relu(self.stem(x)))).mean(-1))

    x = (torch.randn(2, 4, 12),)
    cfg = load_config({"space": {
        "pruning": ["none", "l2_channel"], "quantization": ["none"], "skip_blocks": True,
        "layers": {"include": ["*"], "exclude": []}}}).space
    space = model_space(cfg, Net().eval(), x)
    assert not [gene for gene in space.withheld if gene.endswith(".skip")], space.withheld
    assert space.gene("blocks.b0.second.skip") and space.gene("layers.b0.res.method")
    model = Net().eval()
    skip_blocks(model, ["b0.second"], skippable_blocks(model, x))
    removed = prune_channels(model, x, {"b0.res": ("l2_channel", 0.9),
                                        "b0.first.1": ("l2_channel", 0.9)}, protected=["out"])
    assert removed["b0.res"] == (16, 2) and model.b1.first[0].groups == 2
    assert model(*x).shape == (2, 2)


class TwoStreams(nn.Module):
    """An HRNet stage: it takes high- and low-resolution features and returns both, each
    computed from the two."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.high, self.low = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.up, self.down = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, h: torch.Tensor, lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, lo = torch.relu(self.high(h)), torch.relu(self.low(lo))
        up = nn.functional.interpolate(self.up(lo), scale_factor=2.0)
        return torch.relu(h + up), torch.relu(lo + self.down(h))


class HRNet(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.split = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.stages = nn.ModuleList(TwoStreams(c) for _ in range(2))
        self.fc = nn.Linear(2 * c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        lo = torch.relu(self.split(h))
        for stage in self.stages:
            h, lo = stage(h, lo)
        return self.fc(torch.cat([h.mean((2, 3)), lo.mean((2, 3))], 1))


def test_a_block_of_two_streams_is_skipped_handing_on_both():
    """An HRNet stage returns its two streams: the low one was taken for a tensor the block
    made and the model reads after it (a WaveNet's skip output), and no stage could be
    skipped. Skipped, it hands on the two streams it was given."""
    torch.manual_seed(0)
    model, x = HRNet().eval(), torch.randn(2, 1, 8, 8)
    why: dict[str, str] = {}
    blocks = {b.name: b for b in skippable_blocks(model, (x,), why)}
    assert {"stages.0", "stages.1"} <= set(blocks) and not why
    assert blocks["stages.0"].passthrough == ((1, 1),)
    twin = copy.deepcopy(model)

    class Hands(nn.Module):
        def forward(self, h: torch.Tensor, lo: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return h, lo

    twin.stages[0] = Hands()
    assert skip_blocks(model, ["stages.0"], list(blocks.values())) == ["stages.0"]
    with torch.no_grad():
        assert torch.allclose(model(x), twin(x)) and not torch.allclose(model(x), HRNet()(x))
    artifact.export_onnx(model, (x,))  # and it exports


def test_a_block_that_returns_a_tensor_of_its_inputs_shape_beside_it_is_not_skipped():
    """A WaveNet block returns its stream and a skip output of the same shape: the skip output
    is no stream it was given, so the block stays (skipped, it would return None there)."""
    from tests.test_compress import GatedStack

    why: dict[str, str] = {}
    names = [b.name for b in skippable_blocks(GatedStack().eval(), (torch.randn(2, 1, 6),), why)]
    assert "blocks.0" not in names and "return None there" in why["blocks.0"]
