"""Tests for petra.space: gene types, prunable layers, the space built from a config, hashing."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from petra.config import load_config
from petra.space import (
    Categorical,
    Float,
    Int,
    LayerInfo,
    SearchSpace,
    build_space,
    protected,
    prunable_layers,
    select_layers,
    summarize,
)
from tests.conftest import DIGITS_CNN_CONVS

CONVS = DIGITS_CNN_CONVS


@pytest.fixture(scope="module")
def model_and_input():
    """An untrained digits_cnn (the space depends on the architecture only)."""
    from petra.tasks import load_task

    task = load_task("digits_cnn", {"width": 8})
    return task.model, task.example_input


@pytest.fixture(scope="module")
def layers(model_and_input):
    return prunable_layers(*model_and_input)


def space_of(found, **space):
    return build_space(load_config({"space": space}).space, found)


# --- genes -----------------------------------------------------------------------------------


def test_float_clips_to_bounds_and_rounds_to_step():
    gene = Float("s", 0.0, 0.9, 0.0, step=0.01)
    assert gene.clip(0.123456) == 0.12
    assert gene.clip(0.127) == 0.13
    assert gene.clip(1.5) == 0.9
    assert gene.clip(-0.2) == 0.0
    assert gene.clip("0.5") == 0.5
    assert gene.clip(math.inf) == 0.9


@pytest.mark.parametrize("bad", ["abc", None, math.nan])
def test_float_rejects_non_numbers_naming_the_gene(bad):
    with pytest.raises(ValueError, match="gene s must be a number"):
        Float("s", 0.0, 0.9, 0.0).clip(bad)


def test_float_log_keeps_significant_digits_within_bounds():
    gene = Float("lr", 1e-4, 1e-2, 1e-3, log=True)
    assert gene.clip(0.00123456) == 0.00123
    assert gene.clip(1.0) == 1e-2
    assert gene.clip(1e-9) == 1e-4


def test_float_samples_stay_in_bounds_on_the_step_grid():
    gene = Float("s", 0.1, 0.8, 0.1, step=0.05)
    rng = np.random.default_rng(0)
    values = [gene.sample(rng) for _ in range(300)]
    assert all(0.1 <= v <= 0.8 for v in values)
    assert all(abs(v / 0.05 - round(v / 0.05)) < 1e-9 for v in values)
    assert min(values) < 0.2 and max(values) > 0.7


def test_float_log_samples_are_log_uniform():
    gene = Float("lr", 1e-4, 1e-2, 1e-3, log=True)
    rng = np.random.default_rng(0)
    values = np.array([gene.sample(rng) for _ in range(500)])
    assert values.min() >= 1e-4 and values.max() <= 1e-2
    # log-uniform: the median is near the geometric mean 1e-3 (uniform would give ~5e-3)
    assert 5e-4 < np.median(values) < 2e-3


def test_int_rounds_clips_and_samples_every_value():
    gene = Int("e", 0, 4, 0)
    assert gene.clip(2.6) == 3 and isinstance(gene.clip(2.6), int)
    assert gene.clip("1") == 1
    assert gene.clip(-5) == 0 and gene.clip(99) == 4
    rng = np.random.default_rng(0)
    assert {gene.sample(rng) for _ in range(200)} == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("bad", ["x", None, math.nan, math.inf])
def test_int_rejects_non_numbers_naming_the_gene(bad):
    with pytest.raises(ValueError, match="gene e must be an integer"):
        Int("e", 0, 4, 0).clip(bad)


def test_categorical_rejects_unknown_values_and_samples_its_choices():
    gene = Categorical("q", ("none", "int8_static"), "none")
    assert gene.clip("int8_static") == "int8_static"
    with pytest.raises(ValueError, match=r"gene q must be one of \['none', 'int8_static'\]"):
        gene.clip("int4")
    rng = np.random.default_rng(0)
    assert {gene.sample(rng) for _ in range(50)} == {"none", "int8_static"}


def test_space_rejects_duplicate_gene_names():
    with pytest.raises(ValueError, match="unique"):
        SearchSpace([Int("e", 0, 1, 0), Int("e", 0, 2, 0)])


# --- layers ----------------------------------------------------------------------------------


def test_prunable_layers_in_execution_order_with_the_classifier_not_structured(
    model_and_input, layers
):
    model, _ = model_and_input
    assert [layer.name for layer in layers] == [*CONVS, "fc"]
    modules = dict(model.named_modules())
    for layer in layers:
        module = modules[layer.name]
        assert layer.params == sum(p.numel() for p in module.parameters())
        assert layer.type == type(module).__name__
    by_name = {layer.name: layer for layer in layers}
    assert by_name["fc"].type == "Linear" and by_name["fc"].out_channels == 10
    assert not by_name["fc"].structured
    assert all(by_name[name].structured for name in CONVS)
    assert by_name["layer2.conv1"].out_channels == 16


def test_prunable_layers_restores_training_mode(model_and_input):
    model, example = model_and_input
    model.train()
    try:
        prunable_layers(model, example)
        assert model.training
    finally:
        model.eval()


def test_depthwise_convs_lose_channels_with_their_producer_and_grouped_convs_per_group():
    import copy

    import torch
    from torch import nn

    from petra.compress.structured import prune_channels

    model = nn.Sequential(
        nn.Conv2d(1, 8, 1), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 1),
        nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(), nn.Linear(128, 3)
    )
    x = torch.randn(2, 1, 8, 8)
    layers = prunable_layers(model, x)
    found = {layer.name: layer.structured for layer in layers}
    # depthwise (groups == channels): with the conv that feeds it; grouped (groups 2): the
    # same channels of each group, its own and those of the conv that feeds it
    assert found == {"0": True, "1": True, "2": True, "3": True, "5": False}
    pruned = copy.deepcopy(model)
    changes = prune_channels(pruned, x, {"1": ("l2_channel", 0.5)}, protected=protected(layers))
    assert list(changes.values()) == [(8, 4)]
    assert pruned[0].out_channels == pruned[1].out_channels == pruned[1].groups == 4
    assert pruned[2].in_channels == 4 and pruned(x).shape == (2, 3)
    from petra.space import model_space

    cfg = load_config({"space": {"layers": {"include": ["*"], "exclude": []},
                                 "quantization": ["none"]}}).space
    space = model_space(cfg, model, (x,))
    assert space.withheld == {}
    assert space.kept_whole == {"5": "its output is the model's output"}
    for name in ("1", "2", "3"):
        assert "l2_channel" in space.gene(f"layers.{name}.method").choices


def test_a_grouped_convolution_loses_the_same_channels_of_every_group():
    """A ResNeXt bottleneck: the 1x1 conv feeds a 3x3 conv of 4 groups. torch-pruning narrows
    a grouped conv's input by the offsets kept in its first group, so the conv that feeds it
    was kept whole, and so was the grouped conv. Each now loses the same offsets of every
    group, and the pruned model computes what the dense one does with those channels zeroed."""
    import copy

    import torch
    from torch import nn

    from petra.compress.structured import prune_channels

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1,
                          groups=4), nn.ReLU(), nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 3)).eval()
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6)
    changes = prune_channels(model, x, {"0": ("l2_channel", 0.5), "2": ("l2_channel", 0.25)},
                             protected=["7"])
    assert changes == {"0": (16, 8), "2": (16, 12)}
    assert model[2].groups == 4 and model[2].weight.shape == (12, 2, 3, 3)

    def kept(now: torch.Tensor, before: torch.Tensor) -> list[int]:
        return [i for i in range(len(before)) if any(torch.equal(r, before[i]) for r in now)]

    first = kept(model[0].weight, dense[0].weight)
    second = kept(model[4].weight.transpose(0, 1), dense[4].weight.transpose(0, 1))
    for offsets in ([c % 4 for c in first], [c % 4 for c in second]):  # alike in every group
        assert all(offsets[g * len(offsets) // 4:(g + 1) * len(offsets) // 4]
                   == offsets[:len(offsets) // 4] for g in range(4))
    with torch.no_grad():
        for layer, keep in ((dense[0], first), (dense[2], second)):
            gone = [c for c in range(16) if c not in keep]
            layer.weight[gone] = 0.0
            layer.bias[gone] = 0.0
        torch.testing.assert_close(model(x), dense(x))


def test_select_layers_applies_include_then_exclude_globs(layers):
    def names(include, exclude):
        return [layer.name for layer in select_layers(layers, include, exclude)]

    assert names(["*"], []) == [*CONVS, "fc"]
    assert names(["*"], ["fc"]) == CONVS
    assert names(["layer1.*"], []) == [
        "layer1.conv1", "layer1.conv2", "layer1.downsample.0"
    ]
    assert names(["layer*"], ["*.downsample.*", "layer3.*"]) == [
        "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2"
    ]
    assert names(["nothing*"], []) == []


# --- build_space -----------------------------------------------------------------------------


def test_build_space_from_config_has_the_documented_genes(layers):
    space = space_of(
        layers,
        pruning=["none", "magnitude", "l2_channel"],
        sparsity=[0.1, 0.8],
        round_to=[1, 8],
        quantization=["none", "int8_static"],
        regularizer=["none", "l1"],
        reg_strength=[1e-5, 1e-3],
        finetune={"epochs": [0, 3], "lr": [1e-4, 1e-2]},
    )
    expected_layer_genes = [
        f"layers.{name}.{part}" for name in [*CONVS, "fc"] for part in ("method", "sparsity")
    ]
    assert space.names == [
        *expected_layer_genes,
        "prune.round_to", "quant.scheme", "finetune.epochs", "finetune.lr",
        "reg.kind", "reg.strength",
    ]
    assert space.gene("layers.stem.method").choices == ("none", "magnitude", "l2_channel")
    sparsity = space.gene("layers.stem.sparsity")
    assert (sparsity.low, sparsity.high, sparsity.default) == (0.1, 0.8, 0.1)
    assert space.gene("prune.round_to").choices == (1, 8)
    assert space.gene("quant.scheme").choices == ("none", "int8_static")
    epochs = space.gene("finetune.epochs")
    assert (epochs.low, epochs.high, epochs.default) == (0, 3, 0)
    lr = space.gene("finetune.lr")
    assert lr.log and (lr.low, lr.high) == (1e-4, 1e-2)
    assert space.gene("reg.kind").choices == ("none", "l1")
    assert space.gene("reg.strength").log
    assert [layer.name for layer in space.layers] == [*CONVS, "fc"]


def test_classifier_gets_no_structured_choice(layers):
    space = space_of(layers, pruning=["none", "magnitude", "l2_channel"])
    assert space.gene("layers.fc.method").choices == ("none", "magnitude")
    assert "l2_channel" in space.gene("layers.layer3.conv2.method").choices


def test_a_layer_with_only_structured_choices_left_gets_no_genes(layers):
    space = space_of(layers, pruning=["l2_channel"])
    assert "layers.fc.method" not in space and "layers.fc.sparsity" not in space
    assert space.gene("layers.stem.method").choices == ("none", "l2_channel")


def test_excluded_layers_get_no_genes(layers):
    space = space_of(layers, layers={"exclude": ["fc"]})
    assert not any(name.startswith("layers.fc.") for name in space.names)
    assert [layer.name for layer in space.layers] == CONVS
    assert "layers.layer3.conv2.method" in space


def test_single_choices_and_zero_epochs_drop_their_genes(layers):
    space = space_of(
        layers, pruning=["none", "magnitude"], round_to=[1, 8], quantization=["none"],
        finetune={"epochs": [0, 0]},
    )
    # no structured method: round_to is meaningless; no quantization; no fine-tuning genes
    assert not any(name.split(".")[0] in ("prune", "quant", "finetune", "reg")
                   for name in space.names)


def test_quantization_and_regularizer_genes_always_offer_none(layers):
    space = space_of(layers, quantization=["int8_static"], regularizer=["l1"])
    assert space.gene("quant.scheme").choices == ("none", "int8_static")
    assert space.gene("reg.kind").choices == ("none", "l1")


# --- complete / effective / hash -------------------------------------------------------------


@pytest.fixture(scope="module")
def space(layers):
    return build_space(load_config({}).space, layers)


def test_complete_fills_defaults_and_clips(space):
    genome = space.complete({"layers.stem.method": "l2_channel", "layers.stem.sparsity": 1.7})
    assert list(genome) == space.names
    assert genome["layers.stem.method"] == "l2_channel"
    assert genome["layers.stem.sparsity"] == 0.9
    assert genome["quant.scheme"] == "none" and genome["finetune.epochs"] == 0
    assert {k: v for k, v in genome.items() if not k.startswith("layers.stem.")} == {
        k: v for k, v in space.default().items() if not k.startswith("layers.stem.")
    }


def test_complete_rejects_unknown_genes_and_values(space):
    with pytest.raises(ValueError, match="unknown gene 'layers.nope.method'"):
        space.complete({"layers.nope.method": "magnitude"})
    # A LeViT's 90 genes were all printed on one line: the nearest six are, and the count.
    with pytest.raises(ValueError) as err:
        space.complete({"layers.stem.methd": "magnitude"})
    assert str(err.value).startswith(f"unknown gene 'layers.stem.methd'; the nearest of the "
                                     f"space's {len(space)} genes are layers.stem.method, ")
    assert str(err.value).endswith("(`petra space CONFIG` lists them all)")
    assert str(err.value).count(", ") == 5
    with pytest.raises(ValueError, match="gene quant.scheme must be one of"):
        space.complete({"quant.scheme": "int3"})


def test_complete_of_a_sample_is_the_sample(space):
    rng = np.random.default_rng(1)
    for _ in range(20):
        genome = space.sample(rng)
        assert space.complete(genome) == genome


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # sparsity of a layer that is not pruned
        ({"layers.stem.sparsity": 0.5}, {}),
        # a method with zero sparsity is no pruning
        ({"layers.stem.method": "magnitude", "layers.stem.sparsity": 0.0}, {}),
        # learning rate and regularizer without fine-tuning
        ({"finetune.epochs": 0, "finetune.lr": 0.005, "reg.kind": "l1", "reg.strength": 1e-4},
         {"finetune.epochs": 0}),
        # regularizer strength without a regularizer
        ({"finetune.epochs": 2, "reg.kind": "none", "reg.strength": 1e-4},
         {"finetune.epochs": 2, "reg.kind": "none", "reg.strength": 1e-5}),
        # channel rounding without any structured method
        ({"layers.stem.method": "magnitude", "layers.stem.sparsity": 0.5, "prune.round_to": 8},
         {"layers.stem.method": "magnitude", "layers.stem.sparsity": 0.5, "prune.round_to": 16}),
    ],
    ids=["sparsity-of-none", "zero-sparsity", "no-finetune", "no-regularizer", "no-structured"],
)
def test_genes_without_effect_do_not_change_the_hash(space, a, b):
    assert space.effective(a) == space.effective(b)
    assert space.genome_hash(a) == space.genome_hash(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"layers.stem.method": "magnitude", "layers.stem.sparsity": 0.5},
         {"layers.stem.method": "magnitude", "layers.stem.sparsity": 0.6}),
        ({"layers.stem.method": "magnitude", "layers.stem.sparsity": 0.5},
         {"layers.stem.method": "l2_channel", "layers.stem.sparsity": 0.5}),
        ({"finetune.epochs": 1, "finetune.lr": 0.005},
         {"finetune.epochs": 1, "finetune.lr": 0.001}),
        ({"finetune.epochs": 1, "reg.kind": "l1", "reg.strength": 1e-4},
         {"finetune.epochs": 1, "reg.kind": "l1", "reg.strength": 1e-5}),
        ({"layers.stem.method": "l2_channel", "layers.stem.sparsity": 0.5, "prune.round_to": 1},
         {"layers.stem.method": "l2_channel", "layers.stem.sparsity": 0.5, "prune.round_to": 8}),
        ({}, {"quant.scheme": "int8_static"}),
    ],
    ids=["sparsity", "method", "lr", "strength", "round_to", "quant"],
)
def test_genes_with_effect_change_the_hash(space, a, b):
    assert space.effective(a) != space.effective(b)
    assert space.genome_hash(a) != space.genome_hash(b)


def test_hash_is_stable_and_short(space):
    genome = {"layers.stem.method": "magnitude", "layers.stem.sparsity": 0.5}
    assert space.genome_hash(genome) == space.genome_hash(dict(reversed(list(genome.items()))))
    assert len(space.genome_hash(genome)) == 16


def test_layer_info_is_plain_data():
    info = LayerInfo(name="a", type="Linear", out_channels=3, params=12, structured=True)
    with pytest.raises(AttributeError):
        info.name = "b"  # frozen: safe to send to workers and to hash


def test_the_literature_genes_appear_when_the_space_allows_them(layers):
    space = space_of(layers, pruning=["none", "magnitude", "l2_channel", "equilibrium", "svd"],
                     sparsity_rules=["fixed", "auto_emp"], rank_rules=["energy", "mp"])
    for name in ("prune.sparsity_rule", "prune.emp_beta", "prune.emp_scope", "prune.eq_beta",
                 "prune.eq_gamma", "lowrank.rank_rule"):
        assert name in space
    assert space.gene("prune.sparsity_rule").choices == ("fixed", "auto_emp")
    assert (space.gene("prune.emp_beta").low, space.gene("prune.emp_beta").high) == (0.5, 2.0)
    assert space.gene("lowrank.rank_rule").choices == ("energy", "mp")
    plain = space_of(layers, pruning=["none", "magnitude"])
    assert "prune.sparsity_rule" not in plain and "prune.eq_beta" not in plain


def test_effective_genomes_ignore_what_a_rule_makes_irrelevant(layers):
    space = space_of(layers, pruning=["none", "magnitude", "equilibrium"],
                     sparsity_rules=["fixed", "auto_emp"])
    base = {"layers.stem.method": "magnitude", "prune.sparsity_rule": "auto_emp"}
    # under auto_emp the sparsity genes decide nothing, and a zero one no longer means "none"
    a = space.complete({**base, "layers.stem.sparsity": 0.0})
    b = space.complete({**base, "layers.stem.sparsity": 0.7})
    assert space.genome_hash(a) == space.genome_hash(b)
    assert space.effective(a)["layers.stem.method"] == "magnitude"
    # under the fixed rule, EMP's genes decide nothing; without equilibrium, neither do its own
    fixed = {"layers.stem.method": "magnitude", "layers.stem.sparsity": 0.5}
    c = space.complete({**fixed, "prune.emp_beta": 0.6, "prune.eq_beta": 1.5})
    assert space.genome_hash(c) == space.genome_hash(space.complete(fixed))
    gated = space.complete({"layers.stem.method": "equilibrium", "prune.eq_beta": 1.5})
    assert space.genome_hash(gated) != space.genome_hash(
        space.complete({"layers.stem.method": "equilibrium", "prune.eq_beta": 0.5}))


def test_static_quantization_genes_follow_the_space_static_ranges(layers):
    static = {"calibration": ["minmax", "entropy"], "smooth_alpha": [0.0, 0.8],
              "fallback": [0.0, 0.3]}
    space = space_of(layers, quantization=["int8_dynamic", "int8_static"], static=static)
    assert space.gene("quant.calibration").choices == ("minmax", "entropy")
    assert (space.gene("quant.smooth_alpha").low, space.gene("quant.smooth_alpha").high) == (
        0.0, 0.8)
    assert space.gene("quant.fallback").high == 0.3 and space.gene("quant.fallback").default == 0
    # the defaults (min-max, no smoothing, no fallback) open no gene; no static scheme, none
    assert not any(n in space_of(layers, quantization=["int8_static"])
                   for n in ("quant.calibration", "quant.smooth_alpha", "quant.fallback"))
    assert "quant.fallback" not in space_of(layers, quantization=["int8_dynamic"], static=static)

    # the options decide nothing under a scheme that is not static
    options = {"quant.calibration": "entropy", "quant.fallback": 0.2}
    dynamic = space.complete({"quant.scheme": "int8_dynamic", **options})
    assert space.genome_hash(dynamic) == space.genome_hash(
        space.complete({"quant.scheme": "int8_dynamic"}))
    assert space.genome_hash(space.complete({"quant.scheme": "int8_static", **options})) != \
        space.genome_hash(space.complete({"quant.scheme": "int8_static"}))
    assert summarize(space.complete({"quant.scheme": "int8_static", **options})) == \
        "int8_static[entropy,float0.2]"


@pytest.mark.parametrize("field, value", [
    ("calibration", ["kl"]), ("smooth_alpha", [0.5, 1.5]), ("fallback", [0.4, 0.1])])
def test_bad_static_ranges_name_the_field(field, value):
    from petra.config import ConfigError

    with pytest.raises(ConfigError, match=rf"space\.static\.{field}"):
        load_config({"space": {"static": {field: value}}})


@pytest.mark.parametrize("adapted", [False, True], ids=["module", "task_model"])
@pytest.mark.parametrize("reshape", ["permute", "squeeze"])
def test_a_head_whose_output_is_reshaped_keeps_its_channels(reshape, adapted):
    """The output layer was found by comparing its output's shape with the model's: a head
    whose logits come back channels-last (``permute``) or squeezed was offered channel
    pruning, and removing its channels removed classes. torch-pruning's graph reaches the
    model's output from it, so its channels stay, with the reason."""
    import torch
    from torch import nn

    from petra.layers import prunable_layers
    from petra.space import model_space

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(1, 8, 3, padding=1)
            self.head = nn.Conv2d(8, 3 if reshape == "permute" else 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.head(torch.relu(self.body(x)))
            return out.permute(0, 2, 3, 1) if reshape == "permute" else out.squeeze(1)

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 1, 6, 6)
    if adapted:  # as a task's model, whose other outputs would protect no channels
        from petra import Task
        from petra.tasks.contract import adapt

        model = adapt(Task(model=model, train=[], val=[], test=[], example_input=x,
                           trained=True)).model
    layers = {layer.name: layer for layer in prunable_layers(model, (x,))}
    assert layers["body"].structured and not layers["head"].structured
    cfg = load_config({"space": {"layers": {"include": ["*"], "exclude": []},
                                 "quantization": ["none"]}}).space
    space = model_space(cfg, model, (x,))
    assert space.kept_whole == {"head": "its output channels are the model's output"}
    assert "l2_channel" not in space.gene("layers.head.method").choices


def test_a_transposed_conv_is_listed_with_its_reason_and_the_conv_before_it_shrinks():
    """A ``ConvTranspose2d`` was invisible: no gene, no reason. It is listed as kept whole, the
    conv that feeds it still loses channels (torch-pruning narrows the transposed conv's
    input), and the model runs."""
    import copy

    import torch
    from torch import nn

    from petra.compress.structured import prune_channels
    from petra.layers import protected, prunable_layers
    from petra.space import model_space

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, stride=2), nn.ReLU(),
                          nn.ConvTranspose2d(8, 4, 2, stride=2), nn.ReLU(),
                          nn.Conv2d(4, 1, 1)).eval()
    x = torch.randn(2, 1, 8, 8)
    layers = prunable_layers(model, (x,))
    assert [(layer.name, layer.type, layer.structured) for layer in layers] == [
        ("0", "Conv2d", True), ("2", "ConvTranspose2d", False), ("4", "Conv2d", False)]
    assert "2" not in protected(layers)
    cfg = load_config({"space": {"layers": {"include": ["*"], "exclude": []},
                                 "quantization": ["none"]}}).space
    space = model_space(cfg, model, (x,))
    assert space.kept_whole["2"].startswith("a transposed convolution: no gene of its own")
    assert "layers.2.method" not in space
    pruned = copy.deepcopy(model)
    prune_channels(pruned, (x,), {"0": ("l2_channel", 0.5)}, protected=protected(layers))
    assert pruned[0].out_channels == pruned[2].in_channels == 4
    assert pruned(x).shape == (2, 1, 8, 8)


def test_a_3d_convolution_loses_channels_physically():
    """A video or volume model's ``nn.Conv3d`` was kept whole (no gene pruned the type): its
    channels are removed with their BatchNorm3d and the next conv's inputs, and it exports."""
    import torch
    from torch import nn

    from petra.candidate import artifact
    from petra.compress.structured import prune_channels
    from petra.space import model_space

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
                          nn.Conv3d(8, 8, 3, padding=1), nn.AdaptiveAvgPool3d(1),
                          nn.Flatten(), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 1, 4, 6, 6)
    cfg = load_config({"space": {"pruning": ["none", "magnitude", "l2_channel"],
                                 "quantization": ["none"]}}).space
    space = model_space(cfg, model, (x,))
    assert space.gene("layers.0.method").choices == ("none", "magnitude", "l2_channel")
    assert "0" not in space.kept_whole and not space.withheld
    assert prune_channels(model, (x,), {"0": ("l2_channel", 0.5)}, protected=["6"]) == {
        "0": (8, 4)}
    assert (model[0].out_channels, model[1].num_features, model[3].in_channels) == (4, 4, 4)
    with torch.no_grad():
        want = model(x).numpy()
    out = artifact.load(artifact.pack(artifact.export_onnx(model, (x,)))).run(
        None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_a_weight_layer_of_a_type_no_gene_handles_is_named_with_the_reason():
    """A layer type petra does not prune (a hand-written layer) is listed as kept
    whole with why, not left out of ``petra space`` unmentioned; a parameter that is no
    layer's weight (a positional table) is not, nor a per-channel weight shaped to broadcast
    (ConvNeXt-V2's GRN, ``(1, 1, 1, C)``: it loses channels with its group). A bank of
    matrices by another name (Mixtral's experts' ``gate_up_proj``) was not listed at all, nor
    an ``nn.LSTMCell`` stepped in a Python loop (``weight_ih``, ``weight_hh``), 96% of a
    model written outside the repo."""
    import torch
    from torch import nn

    from petra.space import model_space

    class TransposedLinear(nn.Module):  # weight (in, out), as GPT-2's Conv1D
        def __init__(self, n_in: int, n_out: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.1)
            self.bias = nn.Parameter(torch.zeros(n_out))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight + self.bias

    class Scale(nn.Module):  # a per-channel weight shaped to broadcast, as ConvNeXt-V2's GRN
        def __init__(self, n: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(1, 1, n))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight

    class Experts(nn.Module):  # one matrix an expert, the token's expert picked by its sign
        def __init__(self, n: int) -> None:
            super().__init__()
            self.up = nn.Parameter(torch.randn(2, n, n) * 0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.where(x[..., :1] > 0, x @ self.up[0], x @ self.up[1])

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(4, 8))
            self.experts = Experts(8)
            self.fc = nn.Linear(8, 8)
            self.scale = Scale(8)
            self.proj = TransposedLinear(8, 8)
            self.cell = nn.LSTMCell(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.scale(torch.relu(self.fc(x + self.pos))) + self.experts(x)
            state = None
            for step in range(h.shape[1]):
                state = self.cell(h[:, step], state)
            return self.head(torch.relu(self.proj(h)).mean(1) + state[0])

    torch.manual_seed(0)
    x = torch.randn(2, 4, 8)
    cfg = load_config({"space": {"layers": {"include": ["*"], "exclude": []},
                                 "quantization": ["none"]}}).space
    space = model_space(cfg, Net().eval(), (x,))
    assert space.kept_whole["proj"].startswith("a TransposedLinear: no gene prunes this type")
    assert "layers.fc.method" in space and "layers.proj.method" not in space
    assert space.kept_whole["experts"].startswith("an Experts: no gene prunes this type")
    assert space.kept_whole["cell"].startswith("an LSTMCell: no gene prunes this type")
    assert set(space.kept_whole) == {"proj", "head", "experts", "cell"}


def test_a_layer_the_model_never_calls_is_kept_whole_for_that_reason():
    """A Hugging Face T5 encoder written outside the repo holds its table twice: ``shared``,
    which the forward never calls, and ``encoder.embed_tokens``, with the same weight. The first
    was listed as 'an Embedding: no gene prunes this type (petra prunes ... embeddings ...)'."""
    import torch
    from torch import nn

    from petra.space import model_space

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Embedding(20, 8)
            self.embed = nn.Embedding(20, 8)
            self.embed.weight = self.shared.weight
            self.unused = nn.Linear(8, 8)
            self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.fc(self.embed(ids))).mean(1))

    cfg = load_config({"space": {"layers": {"include": ["*"], "exclude": []},
                                 "quantization": ["none"]}}).space
    space = model_space(cfg, Net().eval(), (torch.randint(0, 20, (2, 5)),))
    assert space.kept_whole["shared"] == "an Embedding that holds the weight of embed, which is listed"
    assert space.kept_whole["unused"].startswith("a Linear the model does not call on the example")


def test_the_recipe_line_leaves_out_what_changes_nothing():
    """On a ConvNeXt written outside the repo the front read ``skip[stage1.0,stage1,stage2.1]
    magnitudex4@0.00``: a block inside a skipped stage, and four layers at sparsity 0 (or
    inside skipped blocks), which the genome's effective form already drops."""
    genome = {"blocks.stage1.0.skip": True, "blocks.stage1.skip": True,
              "blocks.stage2.1.skip": True, "blocks.stage2.skip": False,
              "layers.stem.method": "magnitude", "layers.stem.sparsity": 0.0,
              "layers.stage1.0.fc.method": "magnitude", "layers.stage1.0.fc.sparsity": 0.5,
              "layers.stage2.0.fc.method": "magnitude", "layers.stage2.0.fc.sparsity": 0.4,
              "layers.stage2.10.fc.method": "l2_channel", "layers.stage2.10.fc.sparsity": 0.2,
              "quant.scheme": "int8_dynamic"}
    assert summarize(genome) == ("skip[stage1,stage2.1] magnitudex1@0.40 l2_channelx1@0.20 "
                                 "int8_dynamic")
    # svd takes no sparsity: its mean is not shown (a tabular front read svdx2@0.14)
    assert summarize({"layers.a.method": "svd", "layers.a.sparsity": 0.3}) == "svdx1"
    # a method that takes no sparsity counts at 0, as does any under an automatic rule
    assert summarize({"layers.a.method": "none", "layers.b.method": "magnitude",
                      "layers.b.sparsity": 0.0, "prune.sparsity_rule": "emp"}) == "magnitudex1@0.00"
    # channel rounding only with a structured method or the width (a CodeGen front read
    # ``skip[...] round8 int8_static``)
    rounded = {"blocks.b.skip": True, "prune.round_to": 8, "layers.a.method": "magnitude",
               "layers.a.sparsity": 0.5}
    assert summarize(rounded) == "skip[b] magnitudex1@0.50"
    assert summarize({**rounded, "prune.width": 0.25, "prune.width_method": "l2_channel"}) == \
        "skip[b] magnitudex1@0.50 width-0.25(l2_channel) round8"
    assert summarize({**rounded, "layers.c.method": "l2_channel", "layers.c.sparsity": 0.3}) == \
        "skip[b] magnitudex1@0.50 l2_channelx1@0.30 round8"


def test_layers_whose_widths_must_match_but_torch_pruning_keeps_apart_are_withheld():
    """Two convs joined through ``detach()``: torch-pruning's trace sees no edge between them,
    so each is a channel group of its own. At one sparsity everywhere both lose the same count
    and the verification passed; a search that pruned them to different widths failed every
    such candidate (``The size of tensor a (6) must match the size of tensor b (16)``). Each
    unit is now tried at a sparsity of its own as well, and both are withheld."""
    import torch
    from torch import nn

    from petra.compress.verify import UNEQUAL
    from petra.space import model_space

    class StopGradient(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv1d(1, 16, 1), nn.Conv1d(1, 16, 1)
            self.c, self.tail = nn.Conv1d(1, 16, 1), nn.Linear(16, 3)
            self.head, self.aux = nn.Linear(16, 3), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, z = self.a(x), self.b(x)
            return (self.head((y + z.detach()).mean(-1)) + self.aux(z.mean(-1))
                    + self.tail(self.c(x).mean(-1)))

    cfg = load_config({"space": {"layers": {"include": ["*"], "exclude": []},
                                 "quantization": ["none"]}}).space
    space = model_space(cfg, StopGradient().eval(), (torch.randn(2, 1, 10),))
    assert set(space.withheld) == {"layers.a", "layers.b"}
    assert all(reason.startswith(UNEQUAL) for reason in space.withheld.values())
    # c's width is its own: it still loses channels
    assert "l2_channel" in space.gene("layers.c.method").choices


def test_an_nn_transformer_takes_its_streams_new_width_as_d_model():
    """A seq2seq ``nn.Transformer`` written outside the repo: its forward checks both inputs'
    width against ``d_model``, so every writer of the stream failed its check (``the feature
    number of src and tgt must be equal to d_model``) and there was no width gene."""
    import torch
    from torch import nn

    from petra.compress.structured import prune_channels
    from petra.space import model_space

    class Seq2Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = nn.Embedding(20, 32), nn.Linear(32, 3)
            self.tf = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=1,
                                     num_decoder_layers=1, dim_feedforward=64, dropout=0.0,
                                     batch_first=True)

        def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
            return self.head(self.tf(self.emb(src), self.emb(tgt)).mean(1))

    torch.manual_seed(0)
    model, x = Seq2Seq().eval(), (torch.randint(0, 20, (2, 6)), torch.randint(0, 20, (2, 5)))
    cfg = load_config({"space": {"layers": {"include": ["*"], "exclude": []},
                                 "quantization": ["none"]}}).space
    space = model_space(cfg, model, x)
    assert space.withheld == {} and "prune.width" in {g.name for g in space.genes}
    prune_channels(model, x, {"tf.encoder.layers.0.linear2": ("l2_channel", 0.5)}, round_to=1,
                   protected=["head"])
    assert model.tf.d_model == model.emb.embedding_dim == 16
    assert model(*x).shape == (2, 3)
    # skipped, the encoder has no norm to read d_model from ("'ReluIdentity' object has no
    # attribute 'norm'"), and a skipped decoder leaves the encoder unread (its layers are in
    # no traced group: KeyError): each skip was withheld with the width, blaming the model
    torch.manual_seed(0)
    cfg = load_config({"space": {"layers": {"include": ["*"], "exclude": []}, "skip_blocks": True,
                                 "quantization": ["none"]}}).space
    space = model_space(cfg, Seq2Seq().eval(), x)
    assert {"blocks.tf.encoder.skip", "blocks.tf.decoder.skip"} <= {g.name for g in space.genes}
    assert space.withheld == {}


@pytest.mark.parametrize("norm", ["hand", "torch"])
def test_a_stream_normalized_by_rmsnorm_is_found_and_loses_width(norm):
    """torch-pruning traced an RMSNorm as the bare weight it multiplies by: the stream that
    RMSNorms follow was never found, so there was no ``prune.width``, and its writers lost
    channels by votes of their own, each cutting the whole stream; ``nn.RMSNorm`` kept its
    ``normalized_shape`` (``Expected weight to be of same shape as normalized_shape``), and
    every writer was withheld."""
    import torch
    from torch import nn

    from petra.compress.structured import channel_layers, prune_channels
    from petra.space import model_space

    class RMSNorm(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(d)), 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    make = RMSNorm if norm == "hand" else nn.RMSNorm

    class Block(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.norm, self.up, self.down = make(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.down(torch.relu(self.up(self.norm(x))))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.blocks = nn.Embedding(20, 16), nn.Sequential(Block(16), Block(16))
            self.norm, self.head = make(16), nn.Linear(16, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(self.blocks(self.emb(ids))).mean(1))

    torch.manual_seed(0)
    model, x = Net().eval(), (torch.randint(0, 20, (2, 5)),)
    _, residual = channel_layers(model, x)
    assert set(residual) == {"emb", "blocks.0.down", "blocks.1.down", "norm", "blocks.0.norm",
                             "blocks.1.norm"}  # as with nn.LayerNorm
    cfg = load_config({"space": {"layers": {"include": ["*"], "exclude": []},
                                 "quantization": ["none"]}}).space
    space = model_space(cfg, model, x)
    assert space.withheld == {} and "prune.width" in {g.name for g in space.genes}
    prune_channels(model, x, {"blocks.0.down": ("l2_channel", 0.5)}, round_to=1,
                   protected=["head"])
    assert model.norm.weight.shape == (8,) and model.blocks[1].down.out_features == 8
    assert model(*x).shape == (2, 3)


def test_a_selected_layer_no_method_takes_is_listed_with_the_reason():
    """A tabular model's embeddings, with no low-rank method in ``space.pruning``, were neither
    offered, withheld nor listed as kept whole."""
    import torch
    from torch import nn

    from petra.space import model_space

    class Tabular(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc, self.out = nn.Embedding(10, 4), nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.fc(self.emb(ids).mean(1))))

    x = (torch.randint(0, 10, (2, 3)),)
    for pruning, listed in ((["none", "magnitude"], True), (["none", "magnitude", "svd"], False)):
        cfg = load_config({"space": {"pruning": pruning, "quantization": ["none"],
                                     "layers": {"include": ["*"], "exclude": []}}}).space
        space = model_space(cfg, Tabular().eval(), x)
        if listed:
            assert space.kept_whole["emb"].startswith(
                "no method in space.pruning takes Embedding layers (")
            assert "svd" in space.kept_whole["emb"]
        else:
            assert "emb" not in space.kept_whole and space.gene("layers.emb.method")


def test_an_embedding_subclass_is_offered_what_an_embedding_is():
    """RoFormer's sinusoidal positions (an ``nn.Embedding`` subclass) were offered magnitude
    pruning, as a Linear is, while its word embeddings were offered low-rank only."""
    import torch
    from torch import nn

    from petra.space import model_space

    class Positions(nn.Embedding):
        pass

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc = Positions(10, 4), nn.Linear(4, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.fc(self.emb(ids).mean(1))

    cfg = load_config({"space": {"pruning": ["none", "magnitude"], "quantization": ["none"],
                                 "layers": {"include": ["*"], "exclude": []}}}).space
    space = model_space(cfg, Net().eval(), (torch.randint(0, 10, (2, 3)),))
    assert space.kept_whole["emb"].startswith("no method in space.pruning takes Embedding")


def test_a_layer_whose_class_has_its_own_forward_is_not_offered_svd():
    """svd swaps a layer for two thin ones, which run torch's forward: RoFormer's sinusoidal
    positions (an ``nn.Embedding`` whose forward takes a shape) then failed every candidate
    that factorized them. A subclass that only inherits torch's forward is still offered it."""
    import torch
    from torch import nn

    from petra.compress.lowrank import factorize
    from petra.space import model_space

    class Positions(nn.Embedding):
        def forward(self, shape: torch.Size) -> torch.Tensor:  # type: ignore[override]
            return super().forward(torch.arange(shape[1]))

    class Plain(nn.Linear):
        pass

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.pos = nn.Embedding(10, 16), Positions(8, 16)
            self.fc, self.out = Plain(16, 16), nn.Linear(16, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.out(self.fc(self.emb(ids) + self.pos(ids.shape)).mean(1))

    x = (torch.randint(0, 10, (2, 8)),)
    with pytest.raises(TypeError, match="indices"):  # what the gene did: a shape as indices
        broken = Net().eval()
        factorize(broken, {"pos": "svd"}, energy=0.5)
        broken(*x)
    cfg = load_config({"space": {"pruning": ["none", "magnitude", "svd"], "quantization": ["none"],
                                 "layers": {"include": ["*"], "exclude": []}}}).space
    space = model_space(cfg, Net().eval(), x)
    assert space.kept_whole["pos"] == ("Positions has a forward of its own, which svd's thin "
                                       "layers would not run")
    assert "svd" in space.gene("layers.emb.method").choices
    assert "svd" in space.gene("layers.fc.method").choices


def test_a_grouped_conv_is_not_offered_svd():
    """svd factorizes one weight matrix: a depthwise conv was offered it, and the gene changed
    nothing (factorize leaves grouped convs alone), a choice the search spent evaluations on."""
    import torch
    from torch import nn

    from petra.space import model_space

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                        nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 16, 2))
    cfg = load_config({"space": {"pruning": ["none", "magnitude", "l2_channel", "svd"],
                                 "quantization": ["none"],
                                 "layers": {"include": ["*"], "exclude": []}}}).space
    space = model_space(cfg, net.eval(), (torch.randn(2, 3, 4, 4),))
    assert "svd" not in space.gene("layers.2.method").choices
    assert "magnitude" in space.gene("layers.2.method").choices
    assert "svd" in space.gene("layers.4.method").choices


def test_the_search_names_what_was_withheld_from_the_config():
    """A scheme the config asked for, withheld because it fails on the model (MPNet's static
    int8, which quantized its relative-position buckets), was said by ``petra space`` only:
    the search's line on its space now names it too."""
    from petra.genes import Categorical
    from petra.space import SearchSpace

    space = SearchSpace([Categorical("quant.scheme", ("none",), "none")])
    assert space.overview() == ("space: 1 genes over 0 layers; kept whole: none "
                                "(`petra space` says why)")
    space.withheld = {"quant.scheme=int8_static": "InvalidArgument: ...",
                      **{f"layers.l{i}": "..." for i in range(5)}}
    space.kept_whole = {"head": "its output is the model's output"}
    assert space.overview() == (
        "space: 1 genes over 0 layers; kept whole: head; withheld: quant.scheme=int8_static, "
        "layers.l0, layers.l1, layers.l2 and 2 more (`petra space` says why)")


def test_svd_is_withheld_from_a_layer_whose_attributes_the_model_reads():
    """Whisper sizes its positions by ``embed_positions.num_embeddings``: factorized, the table
    is a Sequential without it, and 3 of 12 candidates failed. Each layer offered svd is now
    factorized once, before the search, at the least energy the space keeps."""
    import torch
    from torch import nn

    from petra.space import model_space

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.pos = nn.Embedding(10, 16), nn.Embedding(64, 16)
            self.fc, self.out = nn.Linear(16, 16), nn.Linear(16, 2)
            with torch.no_grad():  # sinusoid-like: low rank, so svd does factorize it
                self.pos.weight.copy_(torch.randn(64, 2) @ torch.randn(2, 16))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            pos = self.pos(torch.arange(self.pos.num_embeddings))[: ids.shape[1]]
            return self.out(self.fc(self.emb(ids) + pos).mean(1))

    cfg = load_config({"space": {"pruning": ["none", "magnitude", "svd"], "quantization": ["none"],
                                 "layers": {"include": ["*"], "exclude": []}}}).space
    space = model_space(cfg, Net().eval(), (torch.randint(0, 10, (2, 8)),))
    reason = space.withheld["layers.pos.method=svd"]
    assert reason.startswith("svd: the model reads the layer's `num_embeddings` itself, which "
                             "its factors (two thin layers) lack (the compressed model's forward "
                             "fails at test_space.py:")
    assert reason.endswith("(AttributeError: 'Sequential' object has no attribute "
                           "'num_embeddings'))")
    assert space.kept_whole["pos"] == reason
    assert "svd" in space.gene("layers.emb.method").choices
    assert "svd" in space.gene("layers.fc.method").choices


def test_kd_temperature_is_no_gene_for_float_targets():
    """For float targets kd is an MSE to the teacher, and no softmax reads its temperature:
    the gene was searched anyway, and a regression's front held members that differed by it
    alone."""
    import torch
    from torch import nn

    from petra.compress.regularize import fit_to_targets
    from petra.space import model_space

    cfg = load_config({"space": {"pruning": ["none", "magnitude"], "quantization": ["none"],
                                 "regularizer": ["none", "kd"], "finetune": {"epochs": [0, 1]},
                                 "layers": {"include": ["*"], "exclude": []}}}).space
    x = torch.randn(4, 8)
    for targets, kept in ((torch.randn(4), False), (torch.tensor([0, 1, 1, 0]), True)):
        space = model_space(cfg, nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval(),
                            (x,))
        assert "reg.kd_temperature" in space and "reg.kd_alpha" in space
        fit_to_targets(space, [(x, targets)])
        assert ("reg.kd_temperature" in space) is kept and "reg.kd_alpha" in space


def test_a_scheme_that_quantizes_nothing_in_the_model_is_withheld():
    """Dynamic int8 quantizes Linear, LSTM and embedding weights: a convolutional
    autoencoder written outside the repo was offered it, and each candidate that drew it got
    an artifact 0.5% larger than the fp32 one. A scheme that adds no quantized operator,
    weight type or marker to the model's graph is withheld with that reason."""
    import torch
    from torch import nn

    from petra.space import model_space

    convs = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
    with_linear = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(),
                                nn.Linear(8 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 2))
    cfg = load_config({"space": {"pruning": ["none", "magnitude"],
                                 "quantization": ["none", "int8_static", "int8_dynamic"],
                                 "layers": {"include": ["*"], "exclude": []}}}).space
    space = model_space(cfg, convs.eval(), (torch.randn(2, 3, 6, 6),))
    assert space.withheld == {"quant.scheme=int8_dynamic": "it quantizes no operator of this "
                              "model: its graph and weights are the fp32 ones"}
    assert space.gene("quant.scheme").choices == ("none", "int8_static")
    space = model_space(cfg, with_linear.eval(), (torch.randn(2, 3, 6, 6),))
    assert space.gene("quant.scheme").choices == ("none", "int8_static", "int8_dynamic")


def test_a_scheme_that_gains_nothing_on_the_model_is_withheld():
    """Four convolutional nets written outside the repo (a DenseNet, a TCN, an EfficientNet,
    an FPN) were offered dynamic int8 for their small Linear heads: the artifact came out
    0.1-1.4% larger than fp32's, and no faster. A scheme whose artifact of the dense model is
    not 2% smaller is withheld, with its size."""
    import torch
    from torch import nn

    from petra.space import model_space

    convs = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 3))
    cfg = load_config({"space": {"pruning": ["none", "l2_channel"],
                                 "quantization": ["none", "int8_dynamic", "fp16"],
                                 "layers": {"include": ["*"], "exclude": []}}}).space
    space = model_space(cfg, convs.eval(), (torch.randn(4, 3, 8, 8),))
    assert space.gene("quant.scheme").choices == ("none", "fp16")
    why = space.withheld["quant.scheme=int8_dynamic"]
    assert why.startswith("it gains nothing on this model: its artifact is 1.0"), why
    assert why.endswith("x the fp32 one's (a scheme must make it at least 2% smaller)"), why


def test_svd_is_tried_at_rank_one_whatever_the_untrained_spectrum():
    """WavLM reads its position-bias table's ``weight`` (for its device): untrained, the
    32x2 table kept both ranks at the space's least energy and was not factorized, so the
    trial passed; trained, it was, and every candidate with that gene failed."""
    import torch
    from torch import nn

    from petra.space import model_space

    class Biased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.bias = nn.Embedding(10, 16), nn.Embedding(32, 2)
            self.out = nn.Linear(16, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            device = self.bias.weight.device  # as WavLM's compute_bias does
            pos = self.bias(torch.arange(ids.shape[1], device=device) % 32)
            return self.out(self.emb(ids).mean(1)) + pos.mean(0)

    torch.manual_seed(0)
    cfg = load_config({"space": {"pruning": ["none", "svd"], "quantization": ["none"],
                                 "layers": {"include": ["*"], "exclude": []}}}).space
    space = model_space(cfg, Biased().eval(), (torch.randint(0, 10, (2, 8)),))
    assert "`weight`" in space.withheld["layers.bias.method=svd"]
    assert "svd" in space.gene("layers.emb.method").choices


def test_a_width_range_set_where_the_model_has_no_stream_is_said_not_dropped():
    """``space.width`` on a convolutional net gave no ``prune.width`` gene and no word of why;
    left at its default, it says nothing (most models have no stream)."""
    import torch

    from petra.compress.verify import NO_WIDTH
    from petra.layers import model_space

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 4 * 4, 3)).eval()
    x = (torch.randn(2, 1, 6, 6),)
    space = {"pruning": ["none", "l2_channel"], "quantization": ["none"]}
    asked = model_space(load_config({"space": {**space, "width": [0.1, 0.3]}}).space, net, x)
    assert asked.withheld == {"prune.width": NO_WIDTH} and "prune.width" not in asked
    assert model_space(load_config({"space": space}).space, net, x).withheld == {}


class FixedWidth(nn.Module):
    """A residual stream whose end reshapes to its width as a number (a Segformer's stages
    reshape to ``config.hidden_sizes``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Linear(4, 16), nn.Linear(16, 3)
        self.n1, self.n2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.f1, self.f2 = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        h = self.emb(x)
        h = h + self.f1(self.n1(h))
        h = h + self.f2(self.n2(h))
        return self.head(h.reshape(x.shape[0], -1, 16).mean(1))


def test_a_width_whose_stream_fails_its_checks_names_its_writers():
    """A Segformer's width was refused as "no residual stream to narrow", beside its streams'
    writers, withheld for the reshape that breaks: it names them."""
    from petra.layers import model_space

    cfg = load_config({"space": {"pruning": ["none", "l2_channel"], "quantization": ["none"],
                                 "width": [0.1, 0.3]}})
    space = model_space(cfg.space, FixedWidth().eval(), (torch.randn(4, 5, 4),))
    assert "layers.emb" in space.withheld and "prune.width" not in space
    assert space.withheld["prune.width"] == ("the writers of its residual streams fail the "
                                             "structure checks (withheld: emb, f1, f2)")


def test_a_removal_that_breaks_the_models_own_forward_names_the_line():
    """PointNet's T-Net reads its features into a (k, k) transform with a view and applies it
    with torch.bmm in the model's forward, outside any layer: such a refusal read as a bare
    ``RuntimeError: shape '[-1, 8, 8]' is invalid for input of size 16``."""
    import torch
    from torch import nn

    from petra.space import model_space

    class TNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.f = nn.Conv1d(3, 8, 1), nn.Linear(8, 64)
            self.c2, self.out = nn.Conv1d(8, 16, 1), nn.Linear(16, 2)

        def forward(self, x):
            h = torch.relu(self.c1(x))
            t = self.f(h.max(-1).values).view(-1, 8, 8)
            return self.out(torch.relu(self.c2(torch.bmm(t, h))).max(-1).values)

    cfg = load_config({"space": {"pruning": ["none", "l2_channel"], "quantization": ["none"]}})
    space = model_space(cfg.space, TNet().eval(), (torch.randn(2, 3, 10),))
    why = space.withheld["layers.c1"]
    assert why.startswith("the compressed model's forward fails at test_space.py:"), why
    assert "(`t = self.f(h.max(-1).values).view(-1, 8, 8)`) (RuntimeError: shape" in why


def test_svd_is_not_offered_where_no_rank_could_pay():
    """DeepFM's first-order term is an ``nn.Embedding(20, 1)``: two thin layers of any rank
    hold more than it, so ``svd`` on it changed nothing, bytes and parameters alike."""
    import torch
    from torch import nn

    from petra.space import model_space

    class FM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.emb = nn.Embedding(20, 1), nn.Embedding(20, 8)
            self.fc, self.out = nn.Linear(8, 8), nn.Linear(9, 2)

        def forward(self, ids):
            deep = self.fc(self.emb(ids)).mean(1)
            return self.out(torch.cat([deep, self.lin(ids).mean(1)], -1))

    cfg = load_config({"space": {"pruning": ["none", "svd"], "quantization": ["none"]}})
    space = model_space(cfg.space, FM().eval(), (torch.randint(0, 20, (2, 5)),))
    assert "layers.lin.method" not in space and "layers.emb.method" in space
    assert space.kept_whole["lin"] == ("a 20x1 weight: two thin layers, even of rank 1, would "
                                       "hold more than it")


class Gram(nn.Module):
    """A style-transfer head: the Gram matrix of a conv's channels (C x C), flattened."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 16, 4)

    def forward(self, x):
        f = torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(2)
        return self.fc((f @ f.transpose(1, 2) / f.shape[1]).flatten(1))


def test_a_channel_group_whose_indices_outgrow_the_model_stops_there():
    """torch-pruning maps a Gram matrix's channels round and round, each turn multiplying its
    indices: ``petra space`` took 179 s on a small model, and called it a cycle "as through
    Llama's grouped key/value heads". It stops once they outnumber the model's widest
    dimension, and says so."""
    from petra.compress.structured import channel_layers

    why: dict[str, str] = {}
    found, _ = channel_layers(Gram().eval(), (torch.randn(2, 3, 8, 8),), why=why)
    assert "c1" in found and "c2" not in found
    assert why["c2"].startswith("torch-pruning maps its channels to ")
    assert why["c2"].endswith("indices, more than any dimension of the model has: it follows "
                              "them wrongly through the operations between them (relu, reshape, "
                              "expand)")


class Shuffled(nn.Module):
    """Two ShuffleNetV2 units: a channel split, a branch, a concat and a channel shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.out = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 16, 1)
        self.branches = nn.ModuleList(nn.Conv2d(8, 8, 1) for _ in range(2))

    def forward(self, x):
        h = self.stem(x)
        for branch in self.branches:
            a, b = h.chunk(2, 1)
            h = torch.cat([a, torch.relu(branch(b))], 1)
            h = h.view(-1, 2, 8, *h.shape[2:]).transpose(1, 2).reshape(h.shape)
        return self.out(h)


def test_a_group_that_outgrows_the_model_names_the_operations_it_followed():
    """A channel shuffle's groups outgrew the model too, and were refused as "a Gram matrix, an
    outer product": the reason names what torch-pruning followed, not a guess."""
    from petra.compress.structured import channel_layers

    why: dict[str, str] = {}
    channel_layers(Shuffled().eval(), (torch.randn(2, 1, 6, 6),), why=why)
    assert why["branches.0"].endswith("it follows them wrongly through the operations between "
                                      "them (relu, concat, reshape, transpose)"), why


class Gated(nn.Module):
    """A mixture of two experts on a residual stream: a router's top-1 gates, scattered over the
    experts, weight their stacked outputs (the broadcast product of (B, 2, 1) and (B, 2, 8))."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.router, self.head = nn.Linear(5, 8), nn.Linear(8, 2), nn.Linear(8, 3)
        self.experts = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

    def forward(self, x):
        h = self.inp(x)
        logits = self.router(h)
        w, idx = torch.topk(logits, 1, dim=-1)
        gates = torch.zeros_like(logits).scatter(1, idx, torch.softmax(w, -1))
        outs = torch.stack([e(h) for e in self.experts], 1)
        return self.head(h + (gates.unsqueeze(-1) * outs).sum(1))


class TokenMixer(nn.Module):
    """An MLP-Mixer's token mixing: a Linear over the 6 tokens of the 8-channel stream."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm, self.tok, self.head = nn.Linear(5, 8), nn.LayerNorm(8), \
            nn.Linear(6, 6), nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.tok(self.norm(h).transpose(1, 2)).transpose(1, 2)
        return self.head(h.mean(1))


def test_channels_mapped_past_a_width_name_the_operations_between():
    """torch-pruning takes a token-mixing Linear's 6 tokens for the stream's 8 channels through
    a transpose. The reason guessed "a split, or a reshape into heads"; it names the operations
    it followed. The router's gates of an MoE (the broadcast product of (B, 2, 1) and
    (B, 2, 8)) were refused the same way; they no longer tie the stream to the router."""
    cfg = load_config({"space": {"pruning": ["none", "l2_channel"], "quantization": ["none"],
                                 "layers": {"include": ["*"]}}}).space
    from petra.space import model_space

    space = model_space(cfg, TokenMixer().eval(), (torch.randn(4, 6, 5),))
    assert space.withheld["layers.inp"] == (
        "torch-pruning maps this group's channels past the width of tok, a Linear with 6 "
        "channels (to channel 7): it follows them wrongly through the operations between them "
        "(transpose, clone, reshape, mm, reshape)")
    space = model_space(cfg, Gated().eval(), (torch.randn(4, 5),))
    assert "layers.inp" not in space.withheld
    assert "l2_channel" in space.gene("layers.inp.method").choices


class _MixesRows(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x - x.mean(0))  # each row reads the others


def test_verification_runs_on_a_few_rows_only_where_they_compute_the_same():
    """Verification runs the model hundreds of times: on the first 8 rows of the example batch,
    where those rows compute on their own what they compute in the whole batch; on the whole
    batch where they do not (rows mixed, or an axis 0 that is not the batch)."""
    from petra.compress.verify_rows import fewer_rows

    torch.manual_seed(0)
    x = torch.randn(32, 4)
    assert fewer_rows(nn.Linear(4, 3), x).shape == (8, 4)
    ids, extra = torch.randint(0, 5, (32, 6)), torch.randn(1, 4)  # extra: no batch axis
    pair = fewer_rows(_TwoInputs(), (ids, extra))
    assert pair[0].shape == (8, 6) and pair[1] is extra
    assert fewer_rows(_MixesRows(), x) is x
    assert fewer_rows(nn.Linear(4, 3), x[:6]).shape == (6, 4)  # already small


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(5, 4), nn.Linear(4, 3)

    def forward(self, ids, extra):
        return self.fc(self.emb(ids).mean(1) + extra)


def test_a_trace_failure_names_where_in_torch_pruning_it_was_raised(tmp_path, monkeypatch):
    """CvT's cls-token split stopped torch-pruning's trace with a bare ``IndexError: list index
    out of range``, and every layer was kept whole with it. The reason now names the
    function of torch-pruning that raised, and the autograd node it was at."""
    import torch

    from petra.errors import raised_in

    package = tmp_path / "fake_pruning"  # where the frames come from is all that is read
    package.mkdir()
    (package / "shape_infer.py").write_text(
        "def infer_channels_between(node_1, sizes):\n    return sizes[len(sizes)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from fake_pruning import shape_infer

    node = type("Node", (), {})()
    node.grad_fn = (torch.ones(2, requires_grad=True) * 2).grad_fn
    with pytest.raises(IndexError) as err:
        shape_infer.infer_channels_between(node, [1])
    assert raised_in(err.value, "fake_pruning") == (
        "; raised in fake_pruning's infer_channels_between, at mul")
    assert raised_in(err.value, "torch_pruning") == ""


def test_a_group_torch_pruning_fails_to_build_keeps_its_layers_whole_with_its_error():
    """A GAT's heads, expanded over node pairs: torch-pruning divides by zero in its grouped
    key/value mapping. ``petra space``, ``evaluate`` and ``search`` died with its traceback."""
    from petra.space import model_space

    class PairHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W, self.head = nn.Linear(4, 32), nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, _ = x.shape
            z = self.W(x).view(b, n, 4, 8).transpose(1, 2)
            e = (z.unsqueeze(3).expand(b, 4, n, n, 8) + z.unsqueeze(2).expand(b, 4, n, n, 8))
            att = torch.softmax(e.sum(-1), -1) @ z
            return self.head(att.transpose(1, 2).reshape(b, n, 32).mean(1))

    torch.manual_seed(0)
    cfg = load_config({"space": {"layers": {"include": ["*"], "exclude": []},
                                 "quantization": ["none", "fp16"]}}).space
    space = model_space(cfg, PairHeads().eval(), (torch.randn(4, 6, 4),))
    assert space.kept_whole["W"] == (
        "torch-pruning fails to build its channel group (ZeroDivisionError: integer division or "
        "modulo by zero; raised in torch_pruning's _GQAIndexMapping)")
    assert "magnitude" in space.gene("layers.W.method").choices
    assert "fp16" in space.gene("quant.scheme").choices


class Branches(nn.Module):
    """An Inception module's two branches, concatenated and added to a shortcut: one group,
    each branch a span of it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(1, 4, 1)
        self.short, self.mix, self.fc = nn.Conv2d(1, 12, 1), nn.Conv2d(12, 4, 1), nn.Linear(4, 3)
        with torch.no_grad():
            self.b.weight.mul_(1e-3)  # the lowest l2: all four of b's go first
            self.short.weight[8:].mul_(1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(torch.cat([self.a(x), self.b(x)], 1) + self.short(x))
        return self.fc(self.mix(h).mean((2, 3)))


def test_a_removal_leaves_each_concatenated_branch_a_channel():
    """The structure checks removed the last channels, which emptied the last branch (a conv
    of ``[0, 6, 5, 5]``): the whole group was withheld. A removal by importance could empty it
    too: 9 of 12 by l2 would take all of ``b``'s."""
    from petra.compress.structured import prune_channels
    from petra.space import model_space

    torch.manual_seed(0)
    model, x = Branches().eval(), torch.randn(2, 1, 6, 6)
    cfg = load_config({"space": {"pruning": ["none", "l2_channel"], "sparsity": [0.0, 0.75],
                                 "layers": {"include": ["*"], "exclude": []},
                                 "quantization": ["none"]}}).space
    space = model_space(cfg, model, (x,))
    assert "l2_channel" in space.gene("layers.b.method").choices, space.withheld
    pruned = copy.deepcopy(model)
    (changes,) = prune_channels(pruned, (x,), {"a": ("l2_channel", 0.75)}).values()
    assert pruned.short.out_channels == 3 and pruned.a.out_channels == 2
    assert pruned.b.out_channels == 1 and pruned(x).shape == (2, 3), changes
