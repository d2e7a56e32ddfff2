"""Every search strategy at an equal budget on digits_cnn, with multi-fidelity on and off.

Each strategy runs the same config (search_spaces/digits_cnn.yaml) for the same population and
generations, with 3 seeds, on a local Ray cluster with 2 workers; NSGA-II also runs with
multi-fidelity off. The hypervolume is petra's own: objectives normalised to the dense baseline,
reference point (accuracy = baseline - 0.1, size_ratio = 1, latency_ratio = 1). For each run it
records the hypervolume after every evaluation, the evaluations needed to reach 95% of the final
hypervolume, the worker-seconds spent evaluating, and the candidates pruned and failed.

    .venv/bin/python benchmarks/strategies.py [--seeds 0 1 2] [--population 16] [--generations 6]

Writes benchmarks/results/strategies.json (``--name`` for another stem; rewritten after every search, so a partial run
keeps what it measured), strategies.md (the table of docs/benchmarks.md) and strategies.png (hypervolume
against evaluations, mean over seeds). The searches themselves stay in an MLflow store under
runs/benchmarks/, named in the JSON, for a look in the UI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "search_spaces" / "digits_cnn.yaml"
#: (label, strategy, multi-fidelity)
ARMS = [
    ("nsga2", "nsga2", True),
    ("nsga2 (multi-fidelity off)", "nsga2", False),
    ("nsga3", "nsga3", True),
    ("optuna_nsga2", "optuna_nsga2", True),
    ("optuna_tpe", "optuna_tpe", True),
    ("random", "random", True),
    ("nsga2_level_switch", "nsga2_level_switch", True),
]


def run_one(strategy: str, mf: bool, seed: int, *, population: int, generations: int,
            workers: int, store: Path) -> dict:
    from petra.config import load_config
    from petra.engine import pareto
    from petra.engine.loop import search

    cfg = load_config(CONFIG, [
        f"seed={seed}", f"search.strategy={strategy}", f"search.population={population}",
        f"search.generations={generations}", f"search.multi_fidelity.enabled={str(mf).lower()}",
        f"execution.workers={workers}", f"tracking.uri=sqlite:///{store}",
        f"tracking.experiment=bench-strategies-{strategy}-mf{int(mf)}",
    ])
    started = time.perf_counter()
    result = search(cfg)
    wall = time.perf_counter() - started
    curve = pareto.hypervolume_curve(result.records, cfg.objective_list, result.baseline,
                                     cfg.constraints.model_dump())
    statuses = [r["status"] for r in result.records]
    return {
        "seed": seed,
        "run_id": result.run_id,
        "hypervolume": curve[-1] if curve else 0.0,
        "curve": curve,
        "evaluations": len(result.records),
        "evaluations_to_95": pareto.evaluations_to_reach(curve, 0.95),
        "eval_seconds": sum(r["metrics"].get("eval_time_s", 0.0) for r in result.records),
        "wall_s": wall,
        "pruned": statuses.count("pruned"),
        "failed": statuses.count("failed"),
        "front_size": len(result.front.members),
        "baseline_val_accuracy": result.baseline["val_accuracy"],
    }


def summarise(runs: list[dict]) -> dict:
    def stat(key: str) -> dict:
        values = [r[key] for r in runs if r[key] is not None]
        if not values:
            return {"mean": None, "min": None, "max": None}
        return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}

    return {key: stat(key) for key in ("hypervolume", "evaluations", "evaluations_to_95",
                                       "eval_seconds", "wall_s", "pruned", "failed")}


def mean_curve(runs: list[dict]) -> list[float]:
    n = min(len(r["curve"]) for r in runs)
    return [statistics.mean(r["curve"][i] for r in runs) for i in range(n)]


def write_outputs(report: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{report['name']}.json").write_text(json.dumps(report, indent=2))
    lines = [
        "| strategy | hypervolume (mean, min–max) | evaluations | to 95% of final HV | "
        "worker-seconds | pruned | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, arm in report["arms"].items():
        s = arm["summary"]
        if not s or s["hypervolume"]["mean"] is None:
            continue
        h, t = s["hypervolume"], s["evaluations_to_95"]
        to95 = "-" if t["mean"] is None else f"{t['mean']:.0f} ({t['min']:.0f}–{t['max']:.0f})"
        lines.append(
            f"| {label} | {h['mean']:.4f} ({h['min']:.4f}–{h['max']:.4f}) | "
            f"{s['evaluations']['mean']:.0f} | {to95} | {s['eval_seconds']['mean']:.0f} | "
            f"{s['pruned']['mean']:.1f} | {s['failed']['mean']:.1f} |")
    (RESULTS / f"{report['name']}.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, arm in report["arms"].items():
        if arm["runs"]:
            curve = mean_curve(arm["runs"])
            ax.plot(range(1, len(curve) + 1), curve, label=label,
                    linestyle="--" if "off" in label else "-")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("hypervolume (normalised, mean over seeds)")
    ax.set_title(f"digits_cnn: population {report['population']}, "
                 f"{report['generations']} generations, seeds {report['seeds']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{report['name']}.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--generations", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--arms", nargs="+", default=[a[0] for a in ARMS],
                        help="a subset of the arms, by label")
    parser.add_argument("--name", default="strategies",
                        help="the results' file stem under benchmarks/results/")
    args = parser.parse_args()
    report = {
        "name": args.name, "command": " ".join(["python", *sys.argv]),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
            text=True).stdout.strip(),
        "task": "digits_cnn", "config": str(CONFIG.relative_to(ROOT)),
        "population": args.population, "generations": args.generations,
        "workers": args.workers, "seeds": args.seeds,
        "reference": "accuracy = baseline - 0.1, size_ratio = 1, latency_ratio = 1",
        "arms": {label: {"strategy": s, "multi_fidelity": mf, "runs": [], "summary": {}}
                 for label, s, mf in ARMS if label in args.arms},
    }
    started = time.time()
    store = ROOT / "runs" / "benchmarks" / f"strategies-{time.strftime('%Y%m%d-%H%M%S')}.db"
    store.parent.mkdir(parents=True, exist_ok=True)
    report["store"] = f"sqlite:///{store.relative_to(ROOT)}"
    for seed in args.seeds:
        for label, strategy, mf in ARMS:
            if label not in report["arms"]:
                continue
            run = run_one(strategy, mf, seed, population=args.population,
                          generations=args.generations, workers=args.workers, store=store)
            arm = report["arms"][label]
            arm["runs"].append(run)
            arm["summary"] = summarise(arm["runs"])
            report["wall_s"] = round(time.time() - started, 1)
            write_outputs(report)
            print(f"seed {seed} {label:<28} hypervolume {run['hypervolume']:.4f}, "
                  f"{run['evaluations']} evaluations ({run['pruned']} pruned), "
                  f"{run['eval_seconds']:.0f} worker-s, {run['wall_s']:.0f} s", flush=True)
    print(f"wrote {RESULTS.relative_to(ROOT)}/{args.name}.{{json,md,png}}")


if __name__ == "__main__":
    main()
