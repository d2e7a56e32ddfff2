"""Racing on against racing off, at equal wall-clock (the scaling issue's benchmark).

For each task config and seed, two searches run with the same ``search.time_budget_s`` and
enough generations that the budget, not the generation count, ends them: one with
``search.racing.enabled`` and one without. Each reports its final front's hypervolume (the
same reference for both arms: the task's dense baseline) and its hypervolume against
wall-clock seconds (each generation's, from MLflow), the candidates screened at tier 0 and
those measured in full per hour, and how many front members lack a full measurement (always
0: the front holds measured candidates only). The racing arm also reports, over its measured
candidates, the Spearman correlation of the tier-0 divergence (negated) and of the calibrated
prediction with the final validation accuracy, and the latency model's median relative error
(each candidate's prediction was made before it was measured).

Per seed, the reference recipe is measured too, as a candidate is: ONNX Runtime's one call of
``quantize_dynamic`` (per-channel int8 weights, MatMul, Gemm and Gather, so the embeddings
too) on the dense model's ONNX, and whether the racing arm's front dominates it.

    python benchmarks/search_at_scale.py --task digits_cnn:180 --task text_bert --seeds 100 101 \
        --factor 16

``--factor`` is the most offspring screened per generation, in populations;
``--screen-share`` overrides ``search.racing.screen_share``, which caps what screening may cost
(the config's default unless given); ``--select`` overrides ``search.racing.select``;
``--arms racing`` (or ``plain``) runs one arm only, for tuning runs of the racing arm's own
models.

``--task NAME:SECONDS`` gives that task's searches their budget; a bare ``NAME`` keeps the
config's own ``time_budget_s`` (text_bert's default config: 780 s).

Writes ``benchmarks/results/search_at_scale.json`` with the commit, the machine and the
command; per task, means over seeds, with ``spread`` holding each figure's min and max.
Seeds 0-2 are tuning seeds; report held-out ones. The MLflow stores stay under
``runs/benchmarks/search_at_scale/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "search_at_scale.json"
sys.path.insert(0, str(ROOT / "benchmarks"))
from provenance import provenance  # noqa: E402
from ranks import spearman  # noqa: E402

STORE = ROOT / "runs" / "benchmarks" / "search_at_scale"


def run_arm(task: str, seed: int, racing: bool, budget: float, factor: int,
            screen_share: str | None = None, select: str | None = None) -> dict:
    from petra.config import load_config
    from petra.engine.loop import search
    from petra.tracking.runs import hypervolume_history

    STORE.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{STORE / 'mlflow.db'}"
    keep_budget = [] if budget <= 0 else [f"search.time_budget_s={budget}"]
    cfg = load_config(ROOT / "search_spaces" / f"{task}.yaml", [
        f"seed={seed}", *keep_budget, "search.generations=100",
        f"search.racing.enabled={'true' if racing else 'false'}",
        f"search.racing.factor={factor}",
        *([] if screen_share is None else [f"search.racing.screen_share={screen_share}"]),
        *([] if select is None else [f"search.racing.select={select}"]),
        f"tracking.uri={uri}",
        f"tracking.experiment=scale-{task}-{seed}-{'racing' if racing else 'plain'}",
    ])
    start = time.monotonic()
    result = search(cfg)
    wall = time.monotonic() - start
    screened = sum(1 for r in result.records if "tier0_divergence" in r["metrics"])
    measured = sum(1 for r in result.records if "latency_ms" in r["metrics"])
    members = result.front.members
    tier2 = [r["metrics"] for r in result.records
             if r["status"] == "complete" and "tier0_divergence" in r["metrics"]]
    predicted = [m for m in tier2 if "tier0_predicted_latency_ratio" in m]
    return {
        "racing": racing, "seed": seed, "search_wall_s": wall,
        "budget_s": cfg.search.time_budget_s, "anytime": hypervolume_history(uri, result.run_id),
        "front": [{k: m["metrics"].get(k) for k in ("val_accuracy", "size_ratio",
                                                     "latency_ratio")} for m in members],
        "spearman_tier0_vs_val": spearman([-m["tier0_divergence"] for m in tier2],
                                          [m["val_accuracy"] for m in tier2]),
        "spearman_predicted_vs_val": spearman(
            [m["tier0_predicted_val_accuracy"] for m in predicted],
            [m["val_accuracy"] for m in predicted]),
        "latency_model_median_rel_error": float(np.median([
            abs(m["tier0_predicted_latency_ratio"] / m["latency_ratio"] - 1)
            for m in predicted])) if predicted else float("nan"),
        "latency_predictions": len(predicted),
        "hypervolume": result.front.hypervolume, "candidates": len(result.records),
        "screened": screened, "measured": measured,
        "screened_per_hour": screened / wall * 3600, "fully_evaluated_per_hour":
            measured / wall * 3600,
        "front_size": len(members),
        "front_members_without_tier2": sum(1 for m in members
                                           if "latency_ms" not in m["metrics"]),
    }


def one_call_int8(task: str, seed: int) -> dict:
    """ONNX Runtime's one-call dynamic int8 of the dense model, measured as a candidate is."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from petra.candidate import artifact
    from petra.candidate.baseline import prepare_baseline
    from petra.candidate.evaluate import Evaluator
    from petra.config import load_config
    from petra.engine.loop import cache_dir
    from petra.tasks import load_task

    cfg = load_config(ROOT / "search_spaces" / f"{task}.yaml", [f"seed={seed}"])
    model = load_task(cfg.task.name, cfg.task.params)
    baseline = prepare_baseline(model, task_name=cfg.task.name, task_params=cfg.task.params,
                                cache_dir=cache_dir(), seed=seed, threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(artifact.unpack(baseline.artifact), src)
        quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm", "Gather"])
        data = artifact.pack(onnx.load(dst))
    # The evaluator pins this process to one core to time; the searches after it start their
    # Ray clusters from this process, whose workers would inherit that one core.
    cores = os.sched_getaffinity(0)
    try:
        evaluator = Evaluator.from_config(cfg, baseline, threads=1, core=0)
        metrics = evaluator.measure(data)
    finally:
        os.sched_setaffinity(0, cores)
    return {k: metrics[k] for k in ("val_accuracy", "size_ratio", "latency_ratio")}


def dominates(front: list[dict], point: dict) -> bool:
    keys = (("val_accuracy", 1), ("size_ratio", -1), ("latency_ratio", -1))
    return any(all(sign * m[k] >= sign * point[k] for k, sign in keys)
               and any(sign * m[k] > sign * point[k] for k, sign in keys) for m in front)


def summarize(rows: list[dict]) -> dict:
    def stat(key: str, racing: bool) -> list[float]:
        return [r[key] for r in rows if r["racing"] == racing]

    def mean(values: list[float]) -> float:
        return float(np.mean(values)) if values else float("nan")

    out = {"hypervolume_equal_wallclock": {
        "racing": mean(stat("hypervolume", True)),
        "no_racing": mean(stat("hypervolume", False))}}
    racing = [r for r in rows if r["racing"]] or rows  # one arm run: its own figures
    for key in ("screened_per_hour", "fully_evaluated_per_hour", "search_wall_s"):
        out[key] = mean([r[key] for r in racing])
    out["front_members_without_tier2"] = int(sum(r["front_members_without_tier2"] for r in rows))
    plain = {r["seed"]: r["hypervolume"] for r in rows if not r["racing"]}
    ratios = [r["hypervolume"] / plain[r["seed"]] for r in rows
              if r["racing"] and plain.get(r["seed"], 0) > 0]
    out["hypervolume_ratio"] = mean(ratios)
    for key in ("spearman_tier0_vs_val", "spearman_predicted_vs_val",
                "latency_model_median_rel_error"):
        out[key] = float(np.nanmean([r[key] for r in racing]))
    refs = [r["one_call_int8_dynamic"] for r in racing]
    out["one_call_int8_dynamic"] = {k: float(np.mean([x[k] for x in refs])) for k in refs[0]}
    out["dominated_by_front"] = all(r["dominated_by_front"] for r in racing)
    out["spread"] = {"hypervolume_ratio": [min(ratios), max(ratios)] if ratios else []}
    for key in ("spearman_tier0_vs_val", "spearman_predicted_vs_val",
                "latency_model_median_rel_error", "screened_per_hour",
                "fully_evaluated_per_hour", "search_wall_s"):
        values = [r[key] for r in racing]
        out["spread"][key] = [float(np.nanmin(values)), float(np.nanmax(values))]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", action="append", default=None,
                        help="NAME or NAME:SECONDS (the budget of its searches)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101])
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--screen-share", default=None,
                        help="search.racing.screen_share (a number, or null); default: the "
                        "config's")
    parser.add_argument("--select", default=None, choices=["rank", "hypervolume"],
                        help="search.racing.select; default: the config's")
    parser.add_argument("--arms", default="both", choices=["both", "racing", "plain"],
                        help="which searches run per seed (tuning runs of the racing arm's "
                        "models need only the racing arm)")
    parser.add_argument("--out", default=str(OUT))
    opts = parser.parse_args()
    prov = provenance()  # before the evaluator pins this process to one core
    tasks = opts.task or ["digits_cnn:180"]
    report: dict = {}
    for spec in tasks:
        task, _, seconds = spec.partition(":")
        budget = float(seconds or 0)
        rows = []
        for seed in opts.seeds:
            reference = one_call_int8(task, seed)
            for racing in {"both": (False, True), "racing": (True,),
                           "plain": (False,)}[opts.arms]:
                row = run_arm(task, seed, racing, budget, opts.factor, opts.screen_share,
                              opts.select)
                row["one_call_int8_dynamic"] = reference
                row["dominated_by_front"] = dominates(row["front"], reference)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("anytime", "front")}),
                      flush=True)
        report[task] = {**summarize(rows), "runs": rows}
        print(json.dumps(report[task], indent=1), flush=True)
    Path(opts.out).write_text(json.dumps({
        "commit": prov["commit"], "provenance": prov, "factor": opts.factor,
        "screen_share": opts.screen_share or "the config's",
        "select": opts.select or "the config's",
        "seeds": opts.seeds, "arms": opts.arms, "tasks": report,
    }, indent=1, default=str))
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
