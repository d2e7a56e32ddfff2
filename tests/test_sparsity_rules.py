"""EMP (auto_emp): the effective count, its clamps, both scopes, and its composition with every
criterion that has scores, through whole evaluations."""

from __future__ import annotations

import math

import pytest
import torch

from petra.candidate.evaluate import COMPLETE
from petra.compress.sparsity import SparsityRule, effective_count, emp_keep
from petra.registry import PRUNING, SPARSITY_RULES
from tests.conftest import DIGITS_CNN_CONVS


def test_the_effective_count_is_n_for_uniform_and_one_for_one_hot_scores():
    assert effective_count(torch.ones(50)) == pytest.approx(50)
    assert effective_count(torch.tensor([0.0, 0.0, 3.0, 0.0])) == pytest.approx(1.0)
    # two equal spikes among zeros: two effective components
    assert effective_count(torch.tensor([0.0, 5.0, 0.0, 5.0])) == pytest.approx(2.0)
    # signed scores are shifted by their minimum first
    assert effective_count(torch.tensor([-1.0, 1.0])) == pytest.approx(1.0)


def test_emp_keeps_floor_beta_n_eff_clamped_to_one_and_n_minus_one():
    scores = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    n_eff = effective_count(scores)  # 100 / 30 = 3.33
    assert n_eff == pytest.approx(100 / 30)
    assert emp_keep(scores, 1.0) == math.floor(n_eff) == 3
    assert emp_keep(scores, 2.0) == 6
    assert emp_keep(scores, 0.01) == 1  # at least one survives
    assert emp_keep(torch.ones(10), 2.0) == 9  # never all of them


def test_layer_scope_is_per_tensor_and_global_scope_pools_them():
    flat, peaked = torch.linspace(1.0, 2.0, 100), torch.tensor([10.0] * 5 + [0.01] * 95)
    per_layer = SparsityRule("auto_emp", beta=1.0, scope="layer").sparsities([flat, peaked])
    assert per_layer[0] < 0.05  # nearly uniform scores: nearly all kept
    assert 0.9 < per_layer[1] < 0.96  # about 5 of 100 kept
    pooled = SparsityRule("auto_emp", beta=1.0, scope="global").sparsities([flat, peaked])
    # pooled, the flat layer's scores are small next to the peaked layer's tens
    assert pooled[0] > 0.3 > per_layer[0] and pooled[1] <= per_layer[1]
    assert all(0.0 <= s < 1.0 for s in pooled)


def test_an_unknown_rule_or_scope_is_an_error():
    with pytest.raises(ValueError, match="unknown sparsity rule"):
        SparsityRule("auto_something")
    with pytest.raises(ValueError, match="scope"):
        SparsityRule("auto_emp", scope="local")


#: Every criterion whose amount is the sparsity gene and that scores channels or weights (the
#: registry refuses an unstructured one without scores=, so none is left out silently).
SCORED = [e.name for e in PRUNING if e.meta["uses_sparsity"]
          and e.meta["kind"] in ("structured", "unstructured")]
AUTOMATIC = [name for name in SPARSITY_RULES.names() if name != "fixed"]


@pytest.mark.parametrize("rule", AUTOMATIC)
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("method", SCORED)
def test_an_automatic_rule_composes_with_every_criterion(evaluator, rule, scope, method):
    genome = {"prune.sparsity_rule": rule, "prune.emp_beta": 1.0, "prune.emp_scope": scope,
              "prune.round_to": 1}
    for name in DIGITS_CNN_CONVS:
        genome[f"layers.{name}.method"] = method
        genome[f"layers.{name}.sparsity"] = 0.0  # ignored: the rule decides
    result = evaluator.evaluate(genome, seed=0)
    assert result.status == COMPLETE, result.error
    chosen = result.info["sparsity"]
    assert chosen and all(0.0 <= v < 1.0 for v in chosen.values())
    assert any(v > 0.0 for v in chosen.values())
    assert result.metrics["size_ratio"] < 1.0
    assert {f"sparsity.{k}" for k in chosen} <= set(result.metrics)  # logged per layer
