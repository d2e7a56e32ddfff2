"""Tests for petra.candidate.measure: interleaved latency, accuracy on the artifact, MACs and parameters."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import petra.compress  # noqa: F401
from petra.candidate import artifact
from petra.candidate.measure import (
    interleaved_latency,
    macs_and_params,
    median_latency_ms,
    session_accuracy,
)
from petra.candidate.train import evaluate_metric
from petra.compress.prune import PruneContext
from petra.compress.structured import prune_channels
from petra.registry import PRUNING

X = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)


def session_of(model):
    return artifact.load(artifact.pack(artifact.export_onnx(model.eval(), torch.from_numpy(X))))


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return session_of(nn.Sequential(nn.Linear(64, 10)))


@pytest.fixture(scope="module")
def big():
    torch.manual_seed(0)
    return session_of(nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                                    nn.ReLU(), nn.Linear(1024, 10)))


# --- latency ---------------------------------------------------------------------------------


def test_latency_of_a_session_against_itself_is_about_one(small):
    result = interleaved_latency(small, small, X, rounds=9, block_s=0.02)
    assert 0.7 <= result.ratio <= 1.4  # loose: shared VMs are noisy
    assert result.rounds == 9
    for value in (result.ratio, result.candidate_ms, result.baseline_ms):
        assert math.isfinite(value) and value > 0
    assert math.isfinite(result.ratio_iqr) and result.ratio_iqr >= 0


def test_small_model_is_faster_than_a_big_one(small, big):
    result = interleaved_latency(small, big, X, rounds=7, block_s=0.02)
    assert result.ratio < 0.5  # ~1000x fewer MACs
    assert result.candidate_ms < result.baseline_ms
    reverse = interleaved_latency(big, small, X, rounds=5, block_s=0.02)
    assert reverse.ratio > 2


def test_median_latency_is_positive_and_finite(small):
    value = median_latency_ms(small, X, runs=10, warmup=2)
    assert math.isfinite(value) and value > 0


# --- accuracy --------------------------------------------------------------------------------


def test_session_accuracy_equals_torch_accuracy(tiny_task):
    task, _ = tiny_task
    model = copy.deepcopy(task.model).eval()
    session = artifact.load(artifact.pack(artifact.export_onnx(model, task.example_input)))
    expected = evaluate_metric(model, task.val, task.metric)
    assert 0.5 < expected <= 1.0
    assert session_accuracy(session, task.val, task.metric) == pytest.approx(expected, abs=1e-6)


def test_session_accuracy_weights_batches_by_size(small):
    x = np.random.default_rng(3).standard_normal((12, 64)).astype(np.float32)
    predicted = small.run(None, {"input": x})[0].argmax(1)
    wrong = (predicted + 1) % 10
    # a batch of 2 right answers, then 10 wrong ones: weighted 2/12, not the mean 0.5
    batches = [(x[:2], predicted[:2]), (x[2:], wrong[2:])]

    def metric(outputs, targets):
        return float((np.asarray(outputs).argmax(1) == np.asarray(targets)).mean())

    assert session_accuracy(small, batches, metric) == pytest.approx(2 / 12)


def test_non_finite_outputs_raise_floating_point_error():
    model = nn.Sequential(nn.Linear(64, 10))
    with torch.no_grad():
        model[0].weight.fill_(math.nan)
    session = session_of(model)
    batches = [(torch.from_numpy(X), torch.zeros(len(X), dtype=torch.int64))]
    with pytest.raises(FloatingPointError):
        session_accuracy(session, batches, lambda outputs, targets: 1.0)


# --- MACs and parameters ---------------------------------------------------------------------


def test_macs_and_params_of_a_linear_layer():
    macs, params, nonzero = macs_and_params(nn.Sequential(nn.Linear(64, 10)), torch.zeros(8, 64))
    assert params == 64 * 10 + 10
    assert 640 <= macs <= 650  # per sample, not per batch (whether the bias counts is a detail)
    assert nonzero <= params


def test_structured_pruning_reduces_macs_and_params(tiny_task):
    task, _ = tiny_task
    model = copy.deepcopy(task.model).eval()
    macs, params, nonzero = macs_and_params(model, task.example_input)
    assert macs > 0 and params == sum(p.numel() for p in model.parameters())
    assert macs_and_params(model, (task.example_input[0][:3],))[0] == macs  # per sample
    method = next(e.name for e in PRUNING if e.meta.get("structured"))
    plan = {n: (method, 0.5) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    prune_channels(model, task.example_input, plan, protected=["fc"], ctx=PruneContext())
    pruned_macs, pruned_params, _ = macs_and_params(model, task.example_input)
    assert pruned_macs < 0.5 * macs
    assert pruned_params < 0.5 * params


def test_masked_weights_lower_nonzero_params_only(tiny_task):
    task, _ = tiny_task
    model = copy.deepcopy(task.model).eval()
    macs, params, nonzero = macs_and_params(model, task.example_input)
    with torch.no_grad():
        model.layer3.conv2.weight[:, : model.layer3.conv2.in_channels // 2] = 0.0
    after = macs_and_params(model, task.example_input)
    assert after[:2] == (macs, params)  # dense shapes are unchanged
    assert after[2] == nonzero - model.layer3.conv2.weight.numel() // 2


def test_timing_in_stages_adds_up_to_one_measurement(small, big):
    from petra.candidate.measure import InterleavedTimer

    timer = InterleavedTimer(small, big, X, block_s=0.01)
    first = timer.run(3).result()
    assert first.rounds == 3 and first.ratio < 1.0
    total = timer.run(4).result()
    assert total.rounds == 7 and total.ratio < 1.0
    with pytest.raises(ValueError, match="no rounds"):
        InterleavedTimer(small, big, X, block_s=0.01).result()


def test_a_layer_subclass_with_its_own_forward_counts_its_macs():
    """torch-pruning's counter matches layers by exact type: Falcon's ``FalconLinear`` (an
    ``nn.Linear`` with a forward of its own) counted no MACs, so a model whose FFN had lost
    half its channels reported the dense model's 9411."""

    class OwnLinear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight.T + self.bias

    macs, params, _ = macs_and_params(nn.Sequential(OwnLinear(64, 32), nn.Linear(32, 10)),
                                      torch.zeros(8, 64))
    assert params == 64 * 32 + 32 + 32 * 10 + 10
    assert 64 * 32 + 32 * 10 <= macs <= params  # the biases may count: a detail
