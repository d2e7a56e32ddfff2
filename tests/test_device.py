"""Where the torch work runs (``execution.device``, ``gpus_per_candidate``) and which ONNX
Runtime providers latency is measured with (``measure.providers``): the plumbing, on CPUs.

A GPU run is checked with ``benchmarks/gpu_check.py`` on a machine that has one."""

from __future__ import annotations

import time

import pytest
import torch

from petra.candidate.device import OnDevice, check_providers, resolve, to_device
from petra.errors import ConfigError
from tests.conftest import DIGITS_CNN_CONVS as CONVS
from tests.conftest import TINY_TASK

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def test_auto_and_cpu_resolve_to_a_torch_device() -> None:
    assert resolve("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve("auto").type == expected
    with pytest.raises(ConfigError, match="execution.device: must be one of auto, cpu, cuda"):
        resolve("gpu")


@NO_CUDA
def test_cuda_without_a_gpu_is_a_one_line_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        resolve("cuda")
    message = str(info.value)
    assert message.startswith("execution.device: 'cuda' but torch sees no CUDA device")
    assert "\n" not in message


def test_every_tensor_of_a_nested_batch_moves_and_the_rest_stays() -> None:
    meta = torch.device("meta")
    batch = ({"ids": torch.ones(2, 3), "mask": [torch.zeros(2), 5]}, torch.arange(2))
    moved = to_device(batch, meta)
    assert moved[0]["ids"].device == meta and moved[0]["mask"][0].device == meta
    assert moved[0]["mask"][1] == 5 and moved[1].device == meta
    assert isinstance(moved, tuple) and isinstance(moved[0]["mask"], list)
    batches = [batch, batch]
    assert len(OnDevice(batches, meta)) == 2
    assert all(b[1].device == meta for b in OnDevice(batches, meta))
    assert next(iter(OnDevice(batches, torch.device("cpu")))) is batch  # the CPU: untouched


def test_providers_must_be_available_to_this_onnxruntime() -> None:
    import onnxruntime as ort

    assert check_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    absent = next(p for p in ("TensorrtExecutionProvider", "ROCMExecutionProvider",
                              "CUDAExecutionProvider") if p not in ort.get_available_providers())
    with pytest.raises(ConfigError, match=f"measure.providers: '{absent}' is not available"):
        check_providers([absent, "CPUExecutionProvider"])


def evaluator_kwargs(baseline, **extra):
    return {"task_name": TINY_TASK["name"], "task_params": TINY_TASK["params"],
            "baseline_state": baseline.state, "baseline_artifact": baseline.artifact, **extra}


def test_a_fine_tune_with_distillation_runs_on_the_resolved_device(tiny_task) -> None:
    from petra.candidate.evaluate import Evaluator

    _task, baseline = tiny_task
    evaluator = Evaluator(**evaluator_kwargs(baseline, device="cpu",
                                             providers=["CPUExecutionProvider"]))
    genome = {"finetune.epochs": 1, "finetune.lr": 3e-3, "reg.kind": "kd",
              "reg.strength": 1.0, **{f"layers.{n}.method": "magnitude" for n in CONVS},
              **{f"layers.{n}.sparsity": 0.5 for n in CONVS}}
    result = evaluator.evaluate(genome, seed=0)
    assert result.status == "complete", result.error
    assert 0.45 < result.metrics[f"sparsity.{CONVS[0]}"] < 0.55
    assert evaluator.teacher() is evaluator.task.model  # on the CPU, no copy
    assert all(p.device.type == "cpu" for p in evaluator.task.model.parameters())


@NO_CUDA
def test_an_evaluator_asked_for_cuda_says_there_is_none(tiny_task) -> None:
    from petra.candidate.evaluate import Evaluator

    _task, baseline = tiny_task
    with pytest.raises(ConfigError, match="execution.device: 'cuda' but torch sees no CUDA"):
        Evaluator(**evaluator_kwargs(baseline, device="cuda"))


def test_cuda_under_ray_must_reserve_gpus(tiny_task) -> None:
    from petra.engine.executor import make_executor

    _task, baseline = tiny_task
    with pytest.raises(ConfigError, match="execution.device: needs execution.gpus_per_candidate"):
        make_executor("ray", evaluator_kwargs=evaluator_kwargs(baseline, device="cuda"))


@pytest.mark.integration
def test_gpu_workers_on_a_cluster_without_gpus_fail_at_once(tiny_task) -> None:
    """Ray would keep an actor that asks for a missing GPU pending forever."""
    import ray

    from petra.engine.executor import RayExecutor

    _task, baseline = tiny_task
    if ray.is_initialized():
        ray.shutdown()
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        RayExecutor(evaluator_kwargs=evaluator_kwargs(baseline), workers=2,
                    gpus_per_candidate=0.5)
    assert time.monotonic() - start < 120
    assert str(info.value).startswith(
        "execution.gpus_per_candidate: needs workers * gpus_per_candidate = 1 GPUs and this "
        "Ray cluster has 0")
    assert not ray.is_initialized()  # petra's own cluster is shut down again
