"""Regularizers: exact values, and the properties each one is chosen for."""

import copy

import pytest
import torch

import petra.compress  # noqa: F401
from petra.compress.regularize import RegContext
from petra.registry import REGULARIZERS


@pytest.fixture
def model(tiny_task):
    return copy.deepcopy(tiny_task[0].model)


def weights(model):
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]


def test_group_lasso_is_the_sum_of_channel_norms(model):
    value = REGULARIZERS.get("group_lasso")(RegContext(strength=0.1))(model, None, None, None)
    expected = 0.1 * sum(w.flatten(1).norm(dim=1).sum() for w in weights(model))
    assert torch.isclose(value, expected)


def test_hoyer_is_scale_invariant_and_lower_for_sparser_weights(model):
    hoyer = REGULARIZERS.get("hoyer")(RegContext(strength=1.0))
    before = hoyer(model, None, None, None)
    with torch.no_grad():
        for w in weights(model):
            w.mul_(3.0)
    assert torch.isclose(hoyer(model, None, None, None), before, rtol=1e-5)
    with torch.no_grad():
        for w in weights(model):
            w[w.abs() < w.abs().median()] = 0.0
    assert hoyer(model, None, None, None) < before


def test_kd_is_zero_at_the_teacher_and_positive_elsewhere(tiny_task, model):
    task, _ = tiny_task
    inputs, targets = next(iter(task.val))
    kd = REGULARIZERS.get("kd")(RegContext(teacher=task.model, loss=task.loss,
                                           params={"reg.kd_alpha": 0.5, "reg.kd_temperature": 4.0}))
    student = copy.deepcopy(task.model).eval()
    with torch.no_grad():
        at_teacher = kd(student, inputs, student(*inputs), targets)
        assert float(at_teacher) == pytest.approx(0.0, abs=1e-6)
        noisy = student(*inputs) + torch.randn(len(targets), 10)
        assert float(kd(student, inputs, noisy, targets)) > 0.0


def test_kd_needs_a_teacher():
    with pytest.raises(ValueError, match="teacher"):
        REGULARIZERS.get("kd")(RegContext())


@pytest.mark.parametrize(("outputs", "targets", "dim"), [
    ((8, 10), (8,), 1),              # a classifier
    ((8, 5, 32), (8, 5), 2),         # a language model: classes last
    ((8, 3, 4, 6), (8, 4, 6), 1),    # a segmentation: classes first, as cross_entropy takes
    ((8, 1), None, None),            # a regression: float targets
    ((8, 16), None, None),           # an embedding
])
def test_the_class_dimension_is_the_one_the_integer_targets_lack(outputs, targets, dim):
    from petra.compress.regularize import class_dim

    labels = torch.zeros(targets, dtype=torch.long) if targets else torch.randn(outputs)
    assert class_dim(torch.randn(outputs), labels) == dim


def test_kd_distills_a_regression_and_a_segmentation_along_their_own_axes():
    """A softmax over the last axis distilled nothing from a one-output regression (always
    0), and compared a segmentation's logits across its width, not its classes."""
    torch.manual_seed(0)
    params = {"reg.kd_alpha": 0.5, "reg.kd_temperature": 2.0}
    regressor = torch.nn.Linear(4, 1).eval()
    kd = REGULARIZERS.get("kd")(RegContext(teacher=regressor, params=params))
    x = torch.randn(8, 4)
    with torch.no_grad():
        assert float(kd(regressor, (x,), regressor(x), torch.randn(8, 1))) == 0.0
        assert float(kd(regressor, (x,), regressor(x) + 1.0, torch.randn(8, 1))) == \
            pytest.approx(0.5)  # alpha * MSE
    segmenter = torch.nn.Conv2d(2, 3, 1).eval()
    kd = REGULARIZERS.get("kd")(RegContext(teacher=segmenter, params=params))
    x, labels = torch.randn(4, 2, 5, 6), torch.zeros(4, 5, 6, dtype=torch.long)
    with torch.no_grad():
        shifted = segmenter(x) + torch.arange(6.0)  # the same along the classes: no change
        assert float(kd(segmenter, (x,), shifted, labels)) == pytest.approx(0.0, abs=1e-6)
        swapped = segmenter(x).flip(1)  # the classes exchanged: a change
        assert float(kd(segmenter, (x,), swapped, labels)) > 0.01
