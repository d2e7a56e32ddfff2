"""Every registered method at fixed settings, measured on the artifact: is it really smaller/faster?

For each task and each entry of the pruning, quantization and regularizer registries, one genome:

- unstructured criteria: sparsity 0.8 on every prunable layer but the classifier;
- structured criteria: 50% of the channels, rounded to 8;
- N:M and low-rank: their own pattern (2:4; energy 0.95);
- quantization schemes: alone (qat fine-tunes);
- regularizers: with 50% l2_channel, during the fine-tune.

Pruning and regularizer genomes fine-tune 2 epochs at lr 3e-3. Writes
benchmarks/results/methods.json and benchmarks/results/methods.md (the table of docs/benchmarks.md).

    .venv/bin/python benchmarks/methods.py [--tasks digits_cnn events_gru]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = {"finetune.epochs": 2, "finetune.lr": 3e-3}


def genomes_for(layers: list, registries: dict) -> dict[str, dict]:
    """One fixed-setting genome per registered method."""
    pruning, quant, regs = registries["pruning"], registries["quantization"], registries["reg"]
    prunable = [layer for layer in layers if layer.structured]  # every layer but the classifier

    def per_layer(method: str, sparsity: float) -> dict:
        genome = {f"layers.{layer.name}.method": method for layer in prunable}
        genome.update({f"layers.{layer.name}.sparsity": sparsity for layer in prunable})
        return genome

    out: dict[str, dict] = {}
    for entry in pruning:
        if entry.name == "none":
            continue
        kind = entry.meta.get("kind", "unstructured")
        if kind == "structured":
            out[entry.name] = {**per_layer(entry.name, 0.5), "prune.round_to": 8, **FINETUNE}
        elif kind == "lowrank":
            out[entry.name] = {**per_layer(entry.name, 0.0), "lowrank.energy": 0.95, **FINETUNE}
        else:
            out[entry.name] = {**per_layer(entry.name, 0.8), **FINETUNE}
    for entry in quant:
        if entry.name != "none":
            epochs = 2 if entry.meta.get("prepare") else 0
            out[entry.name] = {"quant.scheme": entry.name, "finetune.epochs": epochs,
                               "finetune.lr": 1e-3}
    for entry in regs:
        if entry.name != "none":
            strength = {"l1": 1e-5, "group_lasso": 1e-4, "hoyer": 1e-3}.get(entry.name, 0.0)
            out[f"reg:{entry.name}"] = {
                **per_layer("l2_channel", 0.5), "prune.round_to": 8, **FINETUNE,
                "reg.kind": entry.name, "reg.strength": strength,
            }
    return out


def run_task(task_name: str) -> list[dict]:
    import torch

    import petra.compress  # noqa: F401
    from petra.candidate.baseline import prepare_baseline
    from petra.candidate.evaluate import Evaluator
    from petra.registry import PRUNING, QUANTIZATION, REGULARIZERS
    from petra.space import prunable_layers
    from petra.tasks import load_task

    torch.set_num_threads(1)
    task = load_task(task_name, {})
    baseline = prepare_baseline(task, task_name=task_name, task_params={},
                                cache_dir=ROOT / "runs" / "cache")
    evaluator = Evaluator(task_name=task_name, task_params={}, baseline_state=baseline.state,
                          baseline_artifact=baseline.artifact, core=0)
    layers = prunable_layers(evaluator.task.model, evaluator.example)
    genomes = genomes_for(layers, {"pruning": PRUNING, "quantization": QUANTIZATION,
                                   "reg": REGULARIZERS})
    rows = []
    base_acc = baseline.metrics["val_accuracy"]
    for method, genome in genomes.items():
        result = evaluator.evaluate(genome, seed=0)
        m = result.metrics
        row = {"task": task_name, "method": method, "status": result.status,
               "error": result.error, "genome": genome}
        if result.status == "complete":
            row.update(
                size_ratio=m["size_ratio"], latency_ratio=m["latency_ratio"],
                latency_ratio_iqr=m["latency_ratio_iqr"], val_accuracy=m["val_accuracy"],
                accuracy_drop=base_acc - m["val_accuracy"], effective=result.info["effective"],
            )
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    if row["status"] != "complete":
        return f"| {row['task']} | {row['method']} | failed: {row['error'][:60]} | | | |"
    eff = row["effective"]
    flags = ", ".join(k for k in ("bytes", "latency") if eff[k]) or "neither"
    return (f"| {row['task']} | {row['method']} | {row['size_ratio']:.3f} | "
            f"{row['latency_ratio']:.3f} ± {row['latency_ratio_iqr']:.3f} | "
            f"{row['accuracy_drop'] * 100:+.1f} pt | {flags} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits_cnn", "events_gru"])
    args = parser.parse_args()
    started = time.time()
    rows = []
    for task in args.tasks:
        rows += run_task(task)
    out = ROOT / "benchmarks" / "results"
    (out / "methods.json").write_text(json.dumps(
        {"rows": rows, "wall_s": round(time.time() - started, 1)}, indent=2, default=str))
    header = ("| task | method | size_ratio | latency_ratio (± IQR) | accuracy drop (val) "
              "| effective |\n|---|---|---|---|---|---|\n")
    (out / "methods.md").write_text(header + "\n".join(_line(r) for r in rows) + "\n")
    print(f"wrote benchmarks/results/methods.json and methods.md in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
