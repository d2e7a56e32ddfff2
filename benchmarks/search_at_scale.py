"""Racing on against racing off, at equal wall-clock (the scaling issue's benchmark, first part).

For each task config and seed, two searches run with the same ``search.time_budget_s`` and
enough generations that the budget, not the generation count, ends them: one with
``search.racing.enabled`` and one without. Each reports its final front's hypervolume (the
same reference for both arms: the task's dense baseline), the candidates screened at tier 0
and those measured in full per hour, and how many front members lack a full measurement
(always 0: the front holds measured candidates only).

    python benchmarks/search_at_scale.py --task digits_cnn --seeds 100 101 --budget 240

Writes ``benchmarks/results/search_at_scale.json`` with the commit, the machine and the
command; per task, means over seeds, with ``spread`` holding each figure's min and max.
Seeds 0-2 are tuning seeds; report held-out ones. The MLflow stores stay under
``runs/benchmarks/search_at_scale/``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "search_at_scale.json"


def run_arm(task: str, seed: int, racing: bool, budget: float, factor: int) -> dict:
    from petra.config import load_config
    from petra.engine.loop import search

    store = ROOT / "runs" / "benchmarks" / "search_at_scale"
    store.mkdir(parents=True, exist_ok=True)
    cfg = load_config(ROOT / "search_spaces" / f"{task}.yaml", [
        f"seed={seed}", f"search.time_budget_s={budget}", "search.generations=100",
        f"search.racing.enabled={'true' if racing else 'false'}",
        f"search.racing.factor={factor}",
        f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
        f"tracking.experiment=scale-{task}-{seed}-{'racing' if racing else 'plain'}",
    ])
    start = time.monotonic()
    result = search(cfg)
    wall = time.monotonic() - start
    screened = sum(1 for r in result.records if "tier0_divergence" in r["metrics"])
    measured = sum(1 for r in result.records if "latency_ms" in r["metrics"])
    members = result.front.members
    return {
        "racing": racing, "seed": seed, "search_wall_s": wall,
        "hypervolume": result.front.hypervolume, "candidates": len(result.records),
        "screened": screened, "measured": measured,
        "screened_per_hour": screened / wall * 3600, "fully_evaluated_per_hour":
            measured / wall * 3600,
        "front_size": len(members),
        "front_members_without_tier2": sum(1 for m in members
                                           if "latency_ms" not in m["metrics"]),
    }


def summarize(rows: list[dict]) -> dict:
    def stat(key: str, racing: bool) -> list[float]:
        return [r[key] for r in rows if r["racing"] == racing]

    out = {"hypervolume_equal_wallclock": {
        "racing": float(np.mean(stat("hypervolume", True))),
        "no_racing": float(np.mean(stat("hypervolume", False)))}}
    for key in ("screened_per_hour", "fully_evaluated_per_hour", "search_wall_s"):
        out[key] = float(np.mean(stat(key, True)))
    out["front_members_without_tier2"] = int(sum(r["front_members_without_tier2"] for r in rows))
    ratios = [a / b for a, b in zip(stat("hypervolume", True), stat("hypervolume", False),
                                    strict=True) if b > 0]
    out["hypervolume_ratio"] = float(np.mean(ratios)) if ratios else float("nan")
    out["spread"] = {"hypervolume_ratio": [min(ratios), max(ratios)] if ratios else []}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", action="append", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101])
    parser.add_argument("--budget", type=float, default=240.0)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--out", default=str(OUT))
    opts = parser.parse_args()
    tasks = opts.task or ["digits_cnn"]
    report: dict = {}
    for task in tasks:
        rows = [run_arm(task, seed, racing, opts.budget, opts.factor)
                for seed in opts.seeds for racing in (False, True)]
        report[task] = {**summarize(rows), "runs": rows}
        print(json.dumps(report[task], indent=1), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    Path(opts.out).write_text(json.dumps({
        "commit": commit, "machine": f"{platform.node()} {platform.machine()}, "
        f"{len(__import__('os').sched_getaffinity(0))} cores",
        "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "budget_s": opts.budget, "factor": opts.factor, "seeds": opts.seeds, "tasks": report,
    }, indent=1, default=str))
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
