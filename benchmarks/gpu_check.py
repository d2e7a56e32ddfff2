"""Checks the GPU path end to end on a machine that has one: fine-tunes and tier-0 screens on
CUDA, Ray workers that reserve a GPU each, and latency on the ONNX Runtime providers asked for.

    python benchmarks/gpu_check.py                      # on a GPU machine: device cuda
    python benchmarks/gpu_check.py --device cpu         # the same checks on CPUs (a dry run)
    python benchmarks/gpu_check.py --config search_spaces/text_bert.yaml   # and a real model

Writes ``benchmarks/results/gpu_check_<device>.json`` with the commit, the machine and the
command, and exits non-zero when a check fails. Nothing here is timed for a claim: the
fine-tune's wall time per device is recorded for information only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import provenance  # noqa: E402

TASK = {"name": "digits_cnn", "params": {"width": 16, "epochs": 4}}
CONVS = ["stem", "layer1.conv1", "layer2.conv1", "layer3.conv1"]


def genome(epochs: int) -> dict:
    return {"finetune.epochs": epochs, "finetune.lr": 5e-3, "reg.kind": "kd", "reg.strength": 1.0,
            "quant.scheme": "int8_static",
            **{f"layers.{n}.method": "l2_channel" for n in CONVS},
            **{f"layers.{n}.sparsity": 0.5 for n in CONVS}}


def run_checks(evaluator, candidate: dict, device: str, *, seed: int,
               prefix: str = "") -> dict[str, dict]:
    """``candidate`` evaluated on ``device`` and on the CPU (the fine-tune, and its distillation
    teacher, on each), then screened at tier 0 on ``device`` without its fine-tune."""
    import torch

    checks: dict[str, dict] = {}
    for where in dict.fromkeys([device, "cpu"]):
        evaluator.device = torch.device(where)
        evaluator._teacher = None
        start = time.perf_counter()
        result = evaluator.evaluate(candidate, seed=seed)
        checks[f"{prefix}evaluate_on_{where}"] = {
            "ok": result.status == "complete", "error": result.error,
            "threads": evaluator.threads, "wall_s": round(time.perf_counter() - start, 2),
            **{k: result.metrics.get(k) for k in ("val_accuracy", "size_ratio", "latency_ratio",
                                                  "eval_time_s")}}
    evaluator.device = torch.device(device)
    screen = evaluator.screen({**candidate, "finetune.epochs": 0}, seed=seed)
    checks[f"{prefix}screen"] = {
        "ok": screen.status == "complete", "error": screen.error,
        "divergence": screen.metrics.get("tier0_divergence"),
        "tier0_time_s": screen.metrics.get("tier0_time_s")}
    return checks


def model_checks(config: str, device: str, providers: list[str]) -> dict[str, dict]:
    """A config's own model through the same path: one candidate (int8_dynamic, one epoch of
    fine-tune with distillation) evaluated on ``device`` and on the CPU, and a tier-0 screen."""
    from petra.candidate.baseline import prepare_baseline
    from petra.candidate.evaluate import Evaluator
    from petra.config import load_config
    from petra.engine.loop import cache_dir
    from petra.tasks import load_task

    cfg = load_config(config)
    threads = cfg.execution.cpus_per_candidate
    task = load_task(cfg.task.name, cfg.task.params)
    baseline = prepare_baseline(task, task_name=cfg.task.name, task_params=cfg.task.params,
                                cache_dir=cache_dir(), seed=cfg.seed, threads=threads)
    evaluator = Evaluator.from_config(cfg, baseline, threads=threads, core=0,
                                      device=device, providers=providers)
    return run_checks(evaluator, {"finetune.epochs": 1, "finetune.lr": 3e-4, "reg.kind": "kd",
                                  "reg.strength": 1e-5, "quant.scheme": "int8_dynamic"},
                      device, seed=cfg.seed, prefix=f"{cfg.task.name}_")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--providers", default="",
                        help="comma-separated ORT providers (default: CUDA's when the device is "
                             "cuda and onnxruntime offers it, else the CPU's)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="")
    parser.add_argument("--config", default="",
                        help="also fine-tune (1 epoch, with distillation) and screen this config's "
                             "model on the device and on the CPU, e.g. "
                             "search_spaces/text_bert.yaml")
    opts = parser.parse_args()
    for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                       "RAY_USAGE_STATS_ENABLED": "0"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PETRA_CACHE", str(ROOT / "runs" / "cache"))
    prov = provenance()
    if os.environ.get("PETRA_COMMIT"):
        # A lent GPU machine gets a copy of the working tree whose .git may be older than the
        # tree: the sender names the commit the tree is, and git's view there is kept beside it.
        prov["git_on_machine"] = {"commit": prov["commit"], "dirty": prov["dirty"]}
        prov["commit"], prov["dirty"] = os.environ["PETRA_COMMIT"], "as sent (PETRA_COMMIT)"

    import onnxruntime as ort
    import torch

    from petra.candidate.baseline import prepare_baseline
    from petra.candidate.evaluate import Evaluator
    from petra.engine.executor import Job, RayExecutor
    from petra.engine.loop import cache_dir
    from petra.tasks import load_task

    providers = [p for p in opts.providers.split(",") if p] or (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if opts.device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        else ["CPUExecutionProvider"])
    task = load_task(TASK["name"], TASK["params"])
    baseline = prepare_baseline(task, task_name=TASK["name"], task_params=TASK["params"],
                                cache_dir=cache_dir(), seed=0, threads=2)
    kwargs = {"task_name": TASK["name"], "task_params": TASK["params"],
              "baseline_state": baseline.state, "baseline_artifact": baseline.artifact,
              "device": opts.device, "providers": providers}

    evaluator = Evaluator(**kwargs, threads=2)
    checks = run_checks(evaluator, genome(opts.epochs), opts.device, seed=0)
    session = evaluator.baseline_session
    checks["providers"] = {"ok": session.get_providers()[0] == providers[0],
                           "asked": providers, "session": session.get_providers()}

    if opts.config:
        checks.update(model_checks(opts.config, opts.device, providers))

    gpus = 0.5 if opts.device == "cuda" else 0.0
    executor = RayExecutor(evaluator_kwargs={**kwargs, "device": "auto"}, workers=2,
                           cpus_per_candidate=1, gpus_per_candidate=gpus)
    try:
        jobs = [Job(i, genome(1), f"h{i}", i) for i in range(2)]
        results = [r for _, r in executor.run(jobs)]
    finally:
        executor.close()
    checks["ray_workers"] = {
        "ok": all(r.status == "complete" and r.info.get("device") == opts.device
                  for r in results),
        "gpus_per_candidate": gpus, "devices": [r.info.get("device") for r in results],
        "errors": [r.error for r in results if r.error]}

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    payload = {"commit": prov["commit"], "provenance": prov,
               "machine": f"{platform.node()} {platform.machine()}, "
               f"{os.cpu_count()} cores, GPU: {gpu}", "versions": {
                   "torch": torch.__version__, "onnxruntime": ort.__version__},
               "command": prov["command"], "device": opts.device,
               "ok": all(c["ok"] for c in checks.values()), "checks": checks}
    out = Path(opts.out or ROOT / "benchmarks" / "results" / f"gpu_check_{opts.device}.json")
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps(payload, indent=1))
    return 0 if payload["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
