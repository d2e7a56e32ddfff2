"""Tier 0 (petra.candidate.screen): a torch-only reading that ranks candidates before they are
measured. Its numbers are checked against what the measured evaluation finds."""

import pytest

from petra.candidate.evaluate import COMPLETE, FAILED
from petra.registry import QUANTIZATION
from tests.conftest import DIGITS_CNN_CONVS


def every_conv(method, sparsity, **extra):
    genome = dict(extra)
    for name in DIGITS_CNN_CONVS:
        genome[f"layers.{name}.method"] = method
        genome[f"layers.{name}.sparsity"] = sparsity
    return genome


def test_the_dense_model_reads_as_itself(evaluator):
    result = evaluator.screen({})
    assert result.status == COMPLETE, result.error
    assert result.metrics["tier0_divergence"] == pytest.approx(0.0, abs=1e-6)
    assert result.metrics["tier0_size_ratio"] == pytest.approx(1.0)
    assert result.metrics["tier0_macs_ratio"] == pytest.approx(1.0)


def test_more_pruning_diverges_more_and_shrinks_more(evaluator):
    light = evaluator.screen(every_conv("magnitude", 0.3)).metrics
    heavy = evaluator.screen(every_conv("magnitude", 0.9)).metrics
    assert heavy["tier0_divergence"] > light["tier0_divergence"] > 0
    assert heavy["tier0_size_ratio"] < light["tier0_size_ratio"] < 1
    channels = evaluator.screen(every_conv("l2_channel", 0.5)).metrics
    assert channels["tier0_macs_ratio"] < 0.6  # half the channels of every conv: ~1/4 the MACs


@pytest.mark.parametrize("genome", [
    every_conv("magnitude", 0.7),
    every_conv("l2_channel", 0.5, **{"quant.scheme": "int8_static"}),
    every_conv("l2_channel", 0.25, **{"quant.scheme": "int4_weight"}),
    {"quant.scheme": "fp16"},
], ids=["sparse", "channels-int8", "channels-int4", "fp16"])
def test_the_size_estimate_is_close_to_the_saved_artifact(evaluator, genome):
    """The packing rules, applied without writing the artifact, land within 15% of its bytes
    (the zip's deflate and the ONNX graph's own bytes are what they leave out)."""
    estimate = evaluator.screen(genome).metrics["tier0_size_ratio"]
    measured = evaluator.evaluate(genome).metrics["size_ratio"]
    assert estimate == pytest.approx(measured, rel=0.15)


def test_weight_rounding_moves_the_outputs_by_its_precision(evaluator):
    """int4 rounding moves the outputs more than int8, and int8 more than fp16."""
    div = {s: evaluator.screen({"quant.scheme": s}).metrics["tier0_divergence"]
           for s in ("fp16", "int8_static", "int4_weight")}
    assert 0 <= div["fp16"] < div["int8_static"] < div["int4_weight"]


def test_a_failing_screen_is_a_failed_result(evaluator):
    result = evaluator.screen({"layers.stem.method": "no_such_method",
                               "layers.stem.sparsity": 0.5})
    assert result.status == FAILED and "no_such_method" in result.error
    assert result.metrics["tier0_time_s"] >= 0


def test_every_scheme_says_how_it_stores_weights():
    with pytest.raises(ValueError, match="weights must be one of"):
        QUANTIZATION.register("test_bad_weights", description="x", weights="int3")(len)
    assert {e.meta["weights"] for e in QUANTIZATION} >= {"fp32", "fp16", "int8", "int4"}


def test_the_divergence_reads_each_kind_of_output_on_its_own_axis():
    """A one-output regression read as ``1 - cosine`` compared signs only (0 for any change
    that kept them); it reads as the increase of its task loss. A segmentation's classes are
    its dimension 1, not the last."""
    import torch

    from petra import Task
    from petra.candidate.screen import divergence

    torch.manual_seed(0)
    mse = Task(model=torch.nn.Identity(), train=[], val=[], test=[], example_input=None,
               loss=torch.nn.functional.mse_loss)
    targets = torch.randn(8, 1)
    dense = targets + 0.1 * torch.randn(8, 1)
    assert divergence(mse, dense, dense * 2, targets) > 0.01  # signs unchanged, values not
    assert divergence(mse, dense, dense, targets) == 0.0
    logits, labels = torch.randn(4, 3, 5, 6), torch.zeros(4, 5, 6, dtype=torch.long)
    assert divergence(mse, logits, logits + torch.arange(6.0), labels) == pytest.approx(
        0.0, abs=1e-6)  # shifted along the width: the class probabilities are the same
    assert divergence(mse, logits, logits.flip(1), labels) > 0.01
