"""Behaviour of the individual pruning criteria (the shared contract is in test_compress.py)."""

import copy

import pytest
import torch
from torch import nn

import petra.compress  # noqa: F401  (fills the registries)
from petra.candidate.evaluate import COMPLETE
from petra.compress.prune import PruneContext
from petra.compress.structured import prune_channels
from petra.registry import PRUNING

#: Every structured criterion that scores channels up front, from the registry: a new one is
#: covered with no test edit. l2_channel runs through every other test file; shapley has its
#: own (tests/test_game.py).
STRUCTURED_NEW = [e.name for e in PRUNING if e.meta["kind"] == "structured"
                  and not e.meta["trained"] and e.name not in ("l2_channel", "shapley")]




def conv_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]






# --- unstructured ----------------------------------------------------------------------------


def test_global_magnitude_prunes_the_layer_of_small_weights_hardest(model_copy, ctx):
    with torch.no_grad():
        model_copy.layer2.conv1.weight.mul_(0.01)
    weights = {n: model_copy.get_submodule(n).weight for n in conv_names(model_copy)}
    masks = PRUNING.get("global_magnitude")(weights, 0.5, ctx)
    frac = {n: float((m == 0).float().mean()) for n, m in masks.items()}
    assert frac["layer2.conv1"] > 0.99
    assert all(frac["layer2.conv1"] > f for n, f in frac.items() if n != "layer2.conv1")
    assert all(int(m.sum()) >= 1 for m in masks.values())
    # one threshold across layers: every pruned |w| is below every kept one, apart from each
    # layer's exempt largest weight
    pruned, kept = [], []
    for n, w in weights.items():
        a = w.detach().abs().flatten()
        pruned.append(a[masks[n].flatten() == 0])
        kept.append(a[masks[n].flatten() == 1].sort().values[:-1])
    assert torch.cat(pruned).max() <= torch.cat(kept).min()


def test_random_mask_is_reproducible_by_seed(model_copy):
    weight = model_copy.layer2.conv2.weight

    def mask(seed):
        gen = torch.Generator().manual_seed(seed)
        return PRUNING.get("random")(weight, 0.5, PruneContext(generator=gen))

    assert torch.equal(mask(1), mask(1))
    assert not torch.equal(mask(1), mask(2))
    assert int((mask(3) == 0).sum()) == round(0.5 * weight.numel())


def test_activation_aware_keeps_small_weights_on_loud_inputs():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False)
    model = nn.Sequential(layer)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.01, 1.0, -0.9, 0.8],
                                         [-0.02, 0.7, 1.1, -1.0],
                                         [0.01, -0.8, 0.9, 1.2]]))
    x = torch.randn(64, 4)
    x[:, 0] *= 1000.0  # feature 0 is loud
    ctx = PruneContext(model=model, batches=[((x,), torch.zeros(64))])
    wanda = PRUNING.get("activation_aware")(layer.weight, 0.25, ctx)
    magnitude = PRUNING.get("magnitude")(layer.weight, 0.25, ctx)
    assert not magnitude[:, 0].any()  # magnitude drops the small weights of feature 0
    assert wanda[:, 0].all()  # Wanda keeps them: |w| * ||x|| is large
    assert (wanda == 0).sum(1).tolist() == [1, 1, 1]  # one per output row


def test_activation_aware_balances_rows_and_needs_the_layer_in_the_model(model_copy, ctx):
    weight = model_copy.layer2.conv2.weight
    mask = PRUNING.get("activation_aware")(weight, 0.3, ctx)
    per_row = (mask == 0).flatten(1).sum(1)
    assert int(per_row.max() - per_row.min()) <= 1
    with pytest.raises(ValueError, match="does not belong"):
        PRUNING.get("activation_aware")(weight.detach().clone(), 0.3, ctx)


def test_nm_2_4_keeps_the_two_largest_of_every_four():
    torch.manual_seed(0)
    weight = torch.randn(8, 16)
    mask = PRUNING.get("nm_2_4")(weight, 0.0, PruneContext())
    groups, kept = weight.abs().view(8, 4, 4), mask.view(8, 4, 4)
    assert kept.sum(-1).eq(2).all()
    smallest_kept = groups.masked_fill(~kept, torch.inf).amin(-1)
    largest_dropped = groups.masked_fill(kept, -torch.inf).amax(-1)
    assert (smallest_kept >= largest_dropped).all()


def test_nm_2_4_groups_conv_input_channels_and_keeps_half_of_a_tail(model_copy):
    weight = model_copy.layer2.conv2.weight  # (16, 16, 3, 3)
    mask = PRUNING.get("nm_2_4")(weight, 0.0, PruneContext())
    assert mask.view(16, 4, 4, 3, 3).sum(2).eq(2).all()  # 2 of 4 input channels per position
    tail = PRUNING.get("nm_2_4")(torch.randn(5, 6), 0.0, PruneContext())
    assert tail.sum(1).tolist() == [3] * 5  # 2 of the first 4, 1 of the last 2


# --- structured ------------------------------------------------------------------------------


def test_structured_criteria_score_every_channel_and_rank_differently(tiny_task, model_copy, ctx):
    import torch_pruning as tp

    task, _ = tiny_task
    graph = tp.DependencyGraph().build_dependency(model_copy, example_inputs=task.example_input)
    groups = list(graph.get_all_groups(ignored_layers=[model_copy.fc],
                                       root_module_types=(nn.Conv2d,)))
    assert groups
    rankings = {name: [] for name in STRUCTURED_NEW}
    for group in groups:
        n = graph.get_out_channels(group[0].dep.target.module)
        for name in STRUCTURED_NEW:
            scores = PRUNING.get(name)(group, ctx)
            assert scores.shape == (n,) and torch.isfinite(scores).all()
            rankings[name].append(tuple(torch.argsort(scores, stable=True).tolist()))
    distinct = {tuple(r) for r in rankings.values()}
    assert len(distinct) == len(STRUCTURED_NEW)


def test_taylor_needs_batches(model_copy, tiny_task):
    task, _ = tiny_task
    plan = {"layer2.conv1": ("taylor", 0.5)}
    with pytest.raises(ValueError, match="batches"):
        prune_channels(model_copy, task.example_input, plan, protected=["fc"],
                       ctx=PruneContext(model=model_copy, loss=task.loss))


def test_taylor_uses_gradients_from_the_context_batches(tiny_task, model_copy, ctx):
    task, _ = tiny_task
    assert model_copy.stem.weight.grad is None
    prune_channels(model_copy, task.example_input, {"stem": ("taylor", 0.5)}, protected=["fc"],
                   ctx=ctx)
    assert model_copy.stem.weight.grad is not None
    assert model_copy.stem.out_channels == 4


def test_bn_scale_removes_the_channels_of_smallest_gamma(tiny_task, model_copy):
    task, _ = tiny_task
    gammas = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.05, 4.0, 0.3, 2.0])
    with torch.no_grad():
        model_copy.bn.weight.copy_(gammas)
    prune_channels(model_copy, task.example_input, {"stem": ("bn_scale", 0.5)},
                   protected=["fc"], ctx=PruneContext())
    assert model_copy.bn.weight.detach().tolist() == [-5.0, 3.0, 4.0, 2.0]


def test_bn_scale_falls_back_to_l1_without_batchnorm():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    changes = {}
    for name in ("bn_scale", "l1_channel"):
        torch.manual_seed(0)
        copy_ = copy.deepcopy(model)
        prune_channels(copy_, torch.randn(2, 6), {"0": (name, 0.5)}, protected=["2"])
        changes[name] = copy_[0].weight.detach()
    assert changes["bn_scale"].shape == (4, 6)
    assert torch.equal(changes["bn_scale"], changes["l1_channel"])


@pytest.mark.parametrize("name", STRUCTURED_NEW)
def test_structured_criterion_end_to_end(name, evaluator):
    genome = {"prune.round_to": 1, "finetune.epochs": 0}
    for layer in conv_names(evaluator.task.model):
        genome[f"layers.{layer}.method"] = name
        genome[f"layers.{layer}.sparsity"] = 0.5
    result = evaluator.evaluate(genome)
    assert result.status == COMPLETE, result.error
    assert result.metrics["size_ratio"] < 0.6


def test_bn_scale_is_offered_only_where_the_layers_group_holds_a_batchnorm():
    from petra.layers import offered, prunable_layers

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.normed = nn.Conv2d(1, 8, 3)
            self.bn = nn.BatchNorm2d(8)
            self.bare = nn.Conv2d(8, 8, 3)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            x = self.bare(torch.relu(self.bn(self.normed(x))))
            return self.fc(x.mean(dim=(2, 3)))

    layers = {layer.name: layer for layer in prunable_layers(Net().eval(),
                                                             (torch.randn(2, 1, 8, 8),))}
    assert layers["normed"].batchnorm is True and layers["bare"].batchnorm is False
    bn, l1 = PRUNING.get("bn_scale"), PRUNING.get("l1_channel")
    assert offered(layers["normed"], bn) and offered(layers["normed"], l1)
    assert not offered(layers["bare"], bn) and offered(layers["bare"], l1)
