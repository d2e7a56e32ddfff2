"""How well tier 0 (petra.candidate.screen) ranks candidates before their measured evaluation.

For one config, ``--n`` genomes (the seed recipes, at the fine-tune lr a search probes for them,
then random ones from the space, seeded) are each screened at tier 0 and then evaluated in
full, in one process. The script reports the Spearman rank correlation between each tier-0
number and its measured counterpart:

- the divergence from the dense model against the final validation accuracy (negated, so a
  good proxy correlates positively);
- the estimated size ratio against the artifact's measured size ratio;
- the MACs ratio, and the per-layer latency table's estimate, against the measured latency
  ratio (and the table's own median relative error);

and the time of a screen against the time of a full evaluation. Then it replays the candidates
in order through racing's calibration (petra.engine.racing.Calibration), each predicted from the
ones measured before it, as in a search: the Spearman correlation of the predicted and measured
validation accuracy, and the median relative error of the latency and size predictions.

    python benchmarks/tier0.py search_spaces/digits_cnn.yaml --n 40 --seed 0

Writes ``benchmarks/results/tier0_<config name>.json`` with the commit, the machine and the
command. Seeds 0-2 are tuning seeds; report held-out ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from ranks import spearman  # noqa: E402


def replay(rows: list[dict]) -> dict[str, float]:
    """Racing's calibration, fed the measured candidates in order: each is predicted from those
    before it once the calibration is ready."""
    from petra.engine.racing import Calibration

    cal = Calibration()
    predicted, measured = [], []
    for r in rows:
        if cal.ready:
            predicted.append(cal.predict(r["genome"], r["tier0"]))
            measured.append(r["measured"])
        cal.observe(r["genome"], r["tier0"], r["measured"])

    def error(key: str) -> float:
        return float(np.median([abs(p[key] / m[key] - 1)
                                for p, m in zip(predicted, measured, strict=True)]))

    return {"predicted": len(predicted),
            "spearman_calibrated_vs_val": spearman([p["val_accuracy"] for p in predicted],
                                                   [m["val_accuracy"] for m in measured]),
            "latency_model_median_rel_error": error("latency_ratio"),
            "size_model_median_rel_error": error("size_ratio")}


def summarize(rows: list[dict]) -> dict[str, float]:
    """The figures of the module docstring, over the rows screened and measured without
    failure; the accuracy proxy's correlation also apart for the candidates without a fine-tune
    (which tier 0 reads as they are) and with one (whose outcome the fine-tune decides)."""
    ok = [r for r in rows if r["status"] == "complete" and r["tier0_status"] == "complete"]

    def rho(t0: str, measured: str, sign: float = 1.0, among: list[dict] = ok) -> float:
        return spearman([sign * r["tier0"][t0] for r in among],
                        [r["measured"][measured] for r in among])

    tuned = [r for r in ok if int(r["genome"].get("finetune.epochs", 0)) > 0]
    untuned = [r for r in ok if int(r["genome"].get("finetune.epochs", 0)) == 0]
    summary = {
        "candidates": len(ok),
        "spearman_tier0_vs_val": rho("tier0_divergence", "val_accuracy", -1.0),
        "spearman_tier0_vs_val_without_finetune": rho("tier0_divergence", "val_accuracy", -1.0,
                                                      untuned),
        "spearman_tier0_vs_val_with_finetune": rho("tier0_divergence", "val_accuracy", -1.0,
                                                   tuned),
        "candidates_without_finetune": len(untuned),
        "spearman_size": rho("tier0_size_ratio", "size_ratio"),
        "spearman_macs_vs_latency": rho("tier0_macs_ratio", "latency_ratio"),
        "spearman_table_vs_latency": rho("tier0_latency_ratio", "latency_ratio"),
        "latency_table_median_rel_error": float(np.median([
            abs(r["tier0"]["tier0_latency_ratio"] / r["measured"]["latency_ratio"] - 1)
            for r in ok])),
        "median_tier0_s": float(np.median([r["tier0"]["tier0_time_s"] for r in ok])),
        "median_full_s": float(np.median([r["measured"]["eval_time_s"] for r in ok])),
        "size_median_rel_error": float(np.median([
            abs(r["tier0"]["tier0_size_ratio"] / r["measured"]["size_ratio"] - 1) for r in ok])),
    }
    summary.update(replay(ok))
    return summary


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()


def resummarize(path: Path) -> None:
    """Replace a results file's summary by this commit's, from its rows, recording when, by
    which commit and command (the measurements keep their own provenance)."""
    data = json.loads(path.read_text())
    data["summary"] = summarize(data["rows"])
    data["summarized"] = {"commit": _commit(), "command": " ".join(["python", *sys.argv]),
                          "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    path.write_text(json.dumps(data, indent=1, default=str))
    print(json.dumps(data["summary"], indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="a search config, or with --summarize a results file")
    parser.add_argument("--summarize", action="store_true",
                        help="recompute the summary of a results file from its stored rows "
                        "(what this commit's summary adds, with no new measurement)")
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--out", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, as petra search's --set")
    parser.add_argument("--core", type=int, default=0, help="the core the measurements run on")
    opts = parser.parse_args()
    if opts.summarize:
        resummarize(Path(opts.config))
        return
    cores = len(os.sched_getaffinity(0))  # before the evaluator pins this process to one

    import torch

    from petra.candidate.baseline import prepare_baseline
    from petra.candidate.evaluate import Evaluator
    from petra.candidate.lr_probe import probe_seed_lr
    from petra.candidate.recipes import seed_recipes
    from petra.config import load_config
    from petra.engine.loop import cache_dir
    from petra.space import model_space
    from petra.tasks import load_task

    cfg = load_config(opts.config, [f"seed={opts.seed}", *opts.set])
    task = load_task(cfg.task.name, cfg.task.params)
    space = model_space(cfg.space, task.model, task.example_input, cache=cache_dir())
    baseline = prepare_baseline(task, task_name=cfg.task.name, task_params=cfg.task.params,
                                cache_dir=cache_dir(), seed=cfg.seed, threads=1)
    # the seed recipes fine-tune at the lr a search would probe for them
    probe_seed_lr(cfg, space, baseline, task, cache=cache_dir())
    evaluator = Evaluator.from_config(cfg, baseline, threads=1, core=opts.core)
    torch.set_num_threads(1)
    rng = np.random.default_rng(opts.seed)
    genomes = space.distinct(seed_recipes(space), limit=opts.n)
    while len(genomes) < opts.n:
        genomes += space.distinct([space.sample(rng)], {space.genome_hash(g) for g in genomes})
    rows = []
    for i, genome in enumerate(genomes):
        key = space.genome_hash(genome)
        screened = evaluator.screen(genome, genome_hash=key, seed=opts.seed + i)
        full = evaluator.evaluate(genome, genome_hash=key, seed=opts.seed + i)
        rows.append({"genome_hash": key, "genome": genome, "status": full.status,
                     "tier0": screened.metrics,
                     "tier0_status": screened.status,
                     "measured": {k: full.metrics.get(k) for k in (
                         "val_accuracy", "size_ratio", "latency_ratio", "eval_time_s")}})
        print(f"{i + 1}/{len(genomes)} {screened.metrics.get('tier0_divergence', float('nan')):.4f}"
              f" -> val {full.metrics.get('val_accuracy', float('nan')):.4f}", flush=True)
    summary = summarize(rows)
    print(json.dumps(summary, indent=2))
    commit = _commit()
    out = Path(opts.out or ROOT / "benchmarks" / "results" / f"tier0_{cfg.name}.json")
    out.write_text(json.dumps({
        "commit": commit, "machine": f"{platform.node()} {platform.machine()}, "
        f"{cores} cores (the measurements pinned to one)", "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "summary": summary, "rows": rows,
    }, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
