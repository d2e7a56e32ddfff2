"""How repeatable a measured candidate's validation accuracy is: the ceiling on a proxy's ranks.

The scaling issue asks tier 0's accuracy proxy for a Spearman correlation of at least 0.8 with
the final validation accuracy of a racing search's measured (tier-2) candidates
(``benchmarks/search_at_scale.py``). That accuracy comes after a seeded pruning and fine-tune;
measured a second time with another seed, the same genome reads differently. This script
measures how much: every tier-2 candidate of each racing search in search_at_scale's MLflow
store is evaluated again, in full, with the search's config and another seed, and it reports

- ``spearman_val_repeat``: Spearman(first val, second val), the test-retest reliability of what
  the proxy is ranked against. No number read before the fine-tune can be expected to rank the
  first measurement better than a second measurement of the same genome does;
- the tier-0 divergence's (negated) and the calibrated prediction's Spearman against the first
  measurement, the second, and their mean (a less noisy target);
- each candidate's two accuracies, so the spread is there to read.

    python benchmarks/val_repeatability.py --task text_bert --seeds 100 101

``--core`` pins the evaluations to one core (run a second task, or seed, on the other);
``--merge A.json B.json`` joins the seeds of files written so into one, summarized again. Writes
``benchmarks/results/val_repeatability_<task>.json`` with the commit, the machine and the
command (a merge records its own, and keeps each part's). The searches it reads are those search_at_scale.json names
(their commit is recorded too); the second evaluations run at this commit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from provenance import provenance  # noqa: E402
from ranks import spearman  # noqa: E402

STORE = ROOT / "runs" / "benchmarks" / "search_at_scale" / "mlflow.db"
#: Mixed into each second evaluation's seed, so it differs from the search's.
RETEST = 7


def measured_records(uri: str, experiment: str) -> list[dict]:
    """The tier-2 records (complete, with a tier-0 reading) of the newest finished search run
    of ``experiment`` (an interrupted earlier one may sit beside it), from its checkpoint, in
    the order they were measured."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} in {uri}: run search_at_scale.py first")
    parents = [r for r in client.search_runs([exp.experiment_id], max_results=10000)
               if "mlflow.parentRunId" not in r.data.tags and r.info.status == "FINISHED"]
    if not parents:
        raise SystemExit(f"{experiment!r} holds no finished search run")
    newest = max(parents, key=lambda r: r.info.start_time)
    path = client.download_artifacts(newest.info.run_id, "checkpoint.json")
    records = json.loads(Path(path).read_text())["records"]
    return [r for r in records
            if r["status"] == "complete" and "tier0_divergence" in r["metrics"]]


def correlations(rows: list[dict]) -> dict[str, float]:
    """The module docstring's figures over ``rows`` whose second evaluation completed."""
    ok = [r for r in rows if r["val_again"] is not None and np.isfinite(r["val_again"])]
    first = [r["val"] for r in ok]
    again = [r["val_again"] for r in ok]
    mean = [(a + b) / 2 for a, b in zip(first, again, strict=True)]
    proxy = [-r["tier0_divergence"] for r in ok]
    out = {"candidates": len(ok), "spearman_val_repeat": spearman(first, again),
           "median_abs_val_change": float(np.median(np.abs(np.subtract(first, again))))
           if ok else float("nan"),
           "spearman_tier0_vs_val": spearman(proxy, first),
           "spearman_tier0_vs_val_again": spearman(proxy, again),
           "spearman_tier0_vs_val_mean": spearman(proxy, mean)}
    predicted = [r for r in ok if r["predicted_val"] is not None]
    if predicted:
        guess = [r["predicted_val"] for r in predicted]
        out.update({
            "predicted": len(predicted),
            "spearman_predicted_vs_val": spearman(guess, [r["val"] for r in predicted]),
            "spearman_predicted_vs_val_again": spearman(guess,
                                                        [r["val_again"] for r in predicted]),
            "spearman_predicted_vs_val_mean": spearman(
                guess, [(r["val"] + r["val_again"]) / 2 for r in predicted]),
            "spearman_val_repeat_predicted": spearman([r["val"] for r in predicted],
                                                      [r["val_again"] for r in predicted])})
    return out


def retest(task_name: str, seed: int, core: int, uri: str) -> dict:
    import torch

    from petra.candidate.baseline import prepare_baseline
    from petra.candidate.evaluate import Evaluator
    from petra.config import load_config
    from petra.engine.loop import cache_dir
    from petra.tasks import load_task

    records = measured_records(uri, f"scale-{task_name}-{seed}-racing")
    cfg = load_config(ROOT / "search_spaces" / f"{task_name}.yaml", [f"seed={seed}"])
    task = load_task(cfg.task.name, cfg.task.params)
    baseline = prepare_baseline(task, task_name=cfg.task.name, task_params=cfg.task.params,
                                cache_dir=cache_dir(), seed=cfg.seed, threads=1)
    evaluator = Evaluator.from_config(cfg, baseline, threads=1, core=core)
    torch.set_num_threads(1)
    rows = []
    for i, r in enumerate(records):
        again_seed = int(np.random.SeedSequence([seed, RETEST, i]).generate_state(1)[0])
        result = evaluator.evaluate(r["genome"], genome_hash=r["genome_hash"], seed=again_seed)
        again = result.metrics.get("val_accuracy") if result.status == "complete" else None
        rows.append({"genome_hash": r["genome_hash"], "val": r["metrics"]["val_accuracy"],
                     "val_again": again, "status_again": result.status,
                     "tier0_divergence": r["metrics"]["tier0_divergence"],
                     "predicted_val": r["metrics"].get("tier0_predicted_val_accuracy"),
                     "seed_again": again_seed})
        print(f"{task_name} {seed} {i + 1}/{len(records)} val {rows[-1]['val']:.4f} "
              f"-> {again if again is not None else float('nan'):.4f}", flush=True)
    return {"seed": seed, **correlations(rows), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task")
    parser.add_argument("--merge", nargs="+", metavar="FILE",
                        help="join these results files of one task (each part keeps its "
                        "provenance)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101])
    parser.add_argument("--core", type=int, default=0)
    parser.add_argument("--store", default=str(STORE))
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()
    if opts.merge:
        parts = [json.loads(Path(f).read_text()) for f in opts.merge]
        tasks = {p["task"] for p in parts}
        if len(tasks) != 1:
            raise SystemExit(f"--merge: the files hold tasks {sorted(tasks)}; join one task's")
        write(Path(opts.out or ROOT / "benchmarks" / "results"
                   / f"val_repeatability_{tasks.pop()}.json"), {
            "task": parts[0]["task"], "provenance": provenance(),  # the merge's own
            "searches_from": parts[0]["searches_from"],
            "merged_from": [{"provenance": p["provenance"], "wall_s": p["wall_s"],
                             "seeds": [s["seed"] for s in p["seeds"]]} for p in parts],
            "seeds": sorted((s for p in parts for s in p["seeds"]), key=lambda s: s["seed"])})
        return
    if not opts.task:
        parser.error("--task is required (or --merge)")
    searched = json.loads((ROOT / "benchmarks" / "results" / "search_at_scale.json").read_text())
    start = time.monotonic()
    per_seed = [retest(opts.task, s, opts.core, f"sqlite:///{opts.store}") for s in opts.seeds]
    write(Path(opts.out or ROOT / "benchmarks" / "results"
               / f"val_repeatability_{opts.task}.json"), {
        "task": opts.task, "provenance": provenance(), "searches_from": {
            "file": "benchmarks/results/search_at_scale.json",
            "commit": searched.get("provenance", searched).get("commit")},
        "wall_s": time.monotonic() - start, "seeds": per_seed})


def write(out: Path, data: dict) -> None:
    """``data`` with its summary over seeds (means, and ``spread``: min and max) to ``out``."""
    per_seed = data["seeds"]
    keys = [k for k in per_seed[0] if k not in ("seed", "rows")]
    summary = {k: float(np.mean([p[k] for p in per_seed])) for k in keys}
    summary["spread"] = {k: [float(min(p[k] for p in per_seed)),
                             float(max(p[k] for p in per_seed))] for k in keys}
    out.write_text(json.dumps({**data, "summary": summary}, indent=1, default=str))
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
