"""Game-theoretic criteria: equilibrium gates and Shapley values, on models whose answer is known
by construction, and the trained-criterion contract through whole evaluations."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from petra.candidate.evaluate import COMPLETE
from petra.candidate.train import train
from petra.compress.gates import ChannelGates, EquilibriumGates
from petra.registry import PRUNING
from tests.conftest import DIGITS_CNN_CONVS

USEFUL, DEAD = [0, 1, 2, 3], [4, 5, 6, 7]


def known_mlp(seed: int = 0):
    """4 -> 8 -> 3 on a linearly separable task: hidden neurons 0-3 carry the signal, 4-7 are
    dead by construction (a bias of -50 keeps them under ReLU's threshold)."""
    torch.manual_seed(seed)
    x = torch.randn(256, 4)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1.0).long()
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].bias[DEAD] = -50.0
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    train(model, batches, epochs=20, lr=3e-2, loss_fn=nn.functional.cross_entropy)
    with torch.no_grad():
        model[0].bias[DEAD] = -50.0
    return model, batches


def test_equilibrium_removes_the_dead_neurons_and_keeps_the_useful_ones():
    model, batches = known_mlp()
    gates = EquilibriumGates([model[0]], 8, beta=0.2, gamma=0.0)
    train(model, batches, epochs=3, lr=1e-3, loss_fn=nn.functional.cross_entropy,
          after_step=gates.step)
    removed = set(gates.removable().tolist())
    assert removed == set(DEAD), gates.s
    assert all(gates.s[i] > 0.3 for i in USEFUL), gates.s


def test_a_gate_survives_when_its_neuron_lowers_the_loss():
    # The sign of the benefit: without any penalty, a neuron that lowers the loss keeps its
    # gate at 1 (the projection caps it), whatever the learning rate.
    model, batches = known_mlp(seed=1)
    gates = EquilibriumGates([model[0]], 8, beta=0.0, gamma=0.0)
    train(model, batches, epochs=2, lr=1e-3, loss_fn=nn.functional.cross_entropy,
          after_step=gates.step)
    assert all(gates.s[i] > 0.95 for i in USEFUL), gates.s
    assert not len(gates.removable())


def test_folding_the_gates_changes_no_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    x = torch.randn(4, 3, 6, 6)
    conv_gates = ChannelGates([model[0], model[1]], 6)  # gated on the BatchNorm's outputs
    conv_gates.set(torch.tensor([1.0, 0.5, 0.0, 0.25, 2.0, 1.0]))
    fc_gates = ChannelGates([model[4]], 5)  # no BatchNorm: on the Linear's outputs
    fc_gates.set(torch.tensor([0.1, 1.0, 0.0, 3.0, 1.0]))
    with torch.no_grad():
        gated = model(x)
        conv_gates.fold()
        fc_gates.fold()
        folded = model(x)
    assert torch.allclose(gated, folded, atol=1e-6)
    assert conv_gates.gated == [model[1]] and fc_gates.gated == [model[4]]


def test_shapley_values_rank_useful_channels_above_useless_ones():
    import torch_pruning as tp

    from petra.compress.prune import PruneContext
    from petra.compress.structured import channel_groups

    model, batches = known_mlp(seed=2)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=batches[0][0])
    [group] = [g for g in channel_groups(graph, [model[2]]) if g[0].dep.target.module is model[0]]
    ctx = PruneContext(model=model, val_batches=batches[:2], loss=nn.functional.cross_entropy,
                       shapley_permutations=6)
    phi = PRUNING.get("shapley").fn(group, ctx)
    assert phi.shape == (8,)
    assert torch.all(phi[DEAD] == 0)  # a dead neuron never changes the loss
    assert phi[USEFUL].sum() > 0 and phi[USEFUL].max() > 0.01
    before = copy.deepcopy(model.state_dict())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model[0]._forward_hooks  # the masks are gone


TRAINED = [e.name for e in PRUNING if e.meta.get("trained")]


@pytest.mark.parametrize("name", TRAINED)
@pytest.mark.parametrize("round_to", [1, 4])
def test_a_trained_criterion_removes_channels_physically_in_an_evaluation(evaluator, name,
                                                                          round_to):
    genome = {"finetune.epochs": 2, "finetune.lr": 3e-3, "prune.round_to": round_to,
              **PRUNING.get(name).meta.get("example_genes", {})}
    for layer in DIGITS_CNN_CONVS:
        genome[f"layers.{layer}.method"] = name
    result = evaluator.evaluate(genome, seed=0)
    assert result.status == COMPLETE, result.error
    channels = result.info["channels"]
    assert channels and all(after < before for before, after in channels.values())
    assert all(after % round_to == 0 for _, after in channels.values())
    assert result.metrics["size_ratio"] < 1.0 and result.artifact
    # and without a fine-tune the gates never move: nothing is removed
    untrained = evaluator.evaluate({**genome, "finetune.epochs": 0}, seed=0)
    assert untrained.status == COMPLETE and not untrained.info["channels"]
