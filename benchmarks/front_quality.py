"""Front quality: petra's default search against the by-hand uniform grid and random search.

For each built-in task (search_spaces/<task>.yaml), three searches run at the same budget of
evaluations (population x generations), with each seed, on a local Ray cluster with 2 workers:

1. ``petra``: the config as it is (NSGA-II, multi-fidelity, the full registry, seed recipes);
2. ``grid``: the uniform grid (``search.strategy=grid``: one structured ratio on every layer
   x {fp32, int8_static}, every point fine-tuned the same way, see petra/engine/strategies/grid.py);
3. ``random``: uniform random genomes.

For each search it records the hypervolume (objectives normalised to the dense baseline,
reference accuracy = baseline - 0.1, size_ratio = 1, latency_ratio = 1), the evaluations needed
to reach 95% of the final hypervolume, the wall time, and the knee within 1 point of *test*
accuracy: the smallest size_ratio, and separately the smallest latency_ratio, among front
members whose test accuracy is >= baseline - 0.01. Latency ratios are timed on ONNX Runtime
with 1 thread, against the dense baseline in the same process.

    .venv/bin/python benchmarks/front_quality.py [--tasks digits_cnn ...] [--seeds 0 1 2]
        [--population 8] [--generations 4]

Writes benchmarks/results/front_quality.json (rewritten after every search, so a partial run
keeps what it measured), front_quality.md (the README table) and docs/front_quality_<task>.png
and .html (the three fronts of seed 0, size against test accuracy and latency against test
accuracy). The searches stay in an MLflow store under runs/benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
TASKS = ("digits_cnn", "digits_mlp", "mnist1d_cnn", "events_gru")
ARMS = ("petra", "grid", "random")
STRATEGY = {"petra": None, "grid": "grid", "random": "random"}
#: The goals of issue 9.
GOALS = {"digits_cnn": (0.10, 0.20)}
HEADLINE = (0.25, 0.67)
HV_FACTOR = 1.10


def run_one(task: str, arm: str, seed: int, *, population: int, generations: int,
            workers: int, store: Path) -> dict:
    from petra.config import load_config
    from petra.engine import pareto
    from petra.engine.loop import search

    overrides = [f"seed={seed}", f"search.population={population}",
                 f"search.generations={generations}", f"execution.workers={workers}",
                 f"tracking.uri=sqlite:///{store}",
                 f"tracking.experiment=bench-front-{task}-{arm}"]
    if STRATEGY[arm]:
        overrides.append(f"search.strategy={STRATEGY[arm]}")
    cfg = load_config(ROOT / "search_spaces" / f"{task}.yaml", overrides)
    started = time.perf_counter()
    result = search(cfg)
    wall = time.perf_counter() - started
    curve = pareto.hypervolume_curve(result.records, cfg.objective_list, result.baseline,
                                     cfg.constraints.model_dump())
    floor = result.baseline["test_accuracy"] - 0.01
    front = [{"id": m["id"], **{k: m["metrics"].get(k) for k in (
        "val_accuracy", "test_accuracy", "size_ratio", "latency_ratio", "artifact_bytes")},
        "quant": m["genome"].get("quant.scheme"),
        "skipped": [k.split(".")[1] for k, v in m["genome"].items()
                    if k.startswith("blocks.") and v is True],
        "epochs": m["genome"].get("finetune.epochs")} for m in result.front.members]
    within = [m for m in front if m["test_accuracy"] is not None
              and m["test_accuracy"] >= floor]
    statuses = [r["status"] for r in result.records]
    return {
        "seed": seed, "run_id": result.run_id,
        "hypervolume": curve[-1] if curve else 0.0,
        "evaluations": len(result.records),
        "evaluations_to_95": pareto.evaluations_to_reach(curve, 0.95),
        "wall_s": wall,
        "knee_size_ratio": min((m["size_ratio"] for m in within), default=None),
        "knee_latency_ratio": min((m["latency_ratio"] for m in within), default=None),
        "failed": statuses.count("failed"), "pruned": statuses.count("pruned"),
        "baseline_test_accuracy": result.baseline["test_accuracy"],
        "baseline_val_accuracy": result.baseline["val_accuracy"],
        "front": front,
    }


def _stat(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "min": None, "max": None}
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}


def ceiling(runs: dict[str, list[dict]]) -> dict:
    """How much hypervolume was there to find, per seed, by what all three searches found.

    ``best_known``: the hypervolume of the union of the three final fronts (a seed's arms share
    its baseline). ``ideal_box``: the hypervolume of the single ideal point of that union (its
    best validation accuracy, smallest size_ratio and smallest latency_ratio, each reached by
    some candidate); no front built from points within those extremes can exceed it. The goal
    ``1.10 × grid`` is out of reach at a seed where it is above ``ideal_box``, unless a search
    finds a more extreme candidate than any of the three did.
    """
    import numpy as np

    from petra.engine import pareto

    per_seed = []
    seeds = sorted(set.intersection(*[{r["seed"] for r in rs} for rs in runs.values() if rs]
                                    or [set()]))
    for seed in seeds:
        chosen = {arm: next(r for r in rs if r["seed"] == seed)
                  for arm, rs in runs.items() if rs}
        base = next(iter(chosen.values()))["baseline_val_accuracy"]
        points = np.array([(-m["val_accuracy"], m["size_ratio"], m["latency_ratio"])
                           for r in chosen.values() for m in r["front"]
                           if None not in (m["val_accuracy"], m["size_ratio"],
                                           m["latency_ratio"])], dtype=float).reshape(-1, 3)
        ref = (-(base - pareto.ACCURACY_MARGIN), 1.0, 1.0)
        best = pareto.hypervolume(points, ref) if len(points) else 0.0
        ideal = points.min(axis=0) if len(points) else np.array(ref)
        box = pareto.hypervolume(ideal[None, :], ref)
        grid = chosen.get("grid", {}).get("hypervolume")
        per_seed.append({"seed": seed, "best_known": best, "ideal_box": box,
                         "grid_goal": None if grid is None else HV_FACTOR * grid})
    out = {key: _stat([p[key] for p in per_seed])
           for key in ("best_known", "ideal_box", "grid_goal")}
    out["grid_goal_above_ideal_box"] = sum(
        1 for p in per_seed if p["grid_goal"] is not None and p["grid_goal"] > p["ideal_box"])
    out["per_seed"] = per_seed
    return out


def summarise(task: str, runs: dict[str, list[dict]]) -> dict:
    """The issue's JSON shape for one task: means over seeds, ``spread`` the min and max."""
    stats = {arm: {key: _stat([r[key] for r in rs]) for key in (
        "hypervolume", "wall_s", "evaluations_to_95", "knee_size_ratio", "knee_latency_ratio")}
        for arm, rs in runs.items()}
    petra = stats.get("petra", {})
    baseline = [r["baseline_test_accuracy"] for rs in runs.values() for r in rs]
    out = {
        "baseline_test_accuracy": statistics.mean(baseline) if baseline else None,
        "knee_size_ratio": petra.get("knee_size_ratio", {}).get("mean"),
        "knee_latency_ratio": petra.get("knee_latency_ratio", {}).get("mean"),
        "hypervolume": {arm: s["hypervolume"]["mean"] for arm, s in stats.items()},
        "evaluations": max((r["evaluations"] for rs in runs.values() for r in rs), default=0),
        "evaluations_to_95": {arm: s["evaluations_to_95"]["mean"] for arm, s in stats.items()},
        "wall_s": {arm: s["wall_s"]["mean"] for arm, s in stats.items()},
        "knees": {arm: {"size_ratio": s["knee_size_ratio"]["mean"],
                        "latency_ratio": s["knee_latency_ratio"]["mean"]}
                  for arm, s in stats.items()},
        "spread": {arm: {key: [s[key]["min"], s[key]["max"]] for key in s}
                   for arm, s in stats.items()},
        "seeds": {arm: len(rs) for arm, rs in runs.items()},
        "ceiling": ceiling(runs),
    }
    out["goals"] = goals(task, out)
    return out


def goals(task: str, summary: dict) -> dict:
    """Each goal of issue 9 for this task: met, with the measured figure."""
    size, latency = summary["knee_size_ratio"], summary["knee_latency_ratio"]
    hv = summary["hypervolume"]

    def le(value, bound):
        return value is not None and value <= bound

    out = {"headline_size": {"goal": HEADLINE[0], "measured": size, "met": le(size, HEADLINE[0])},
           "headline_latency": {"goal": HEADLINE[1], "measured": latency,
                                "met": le(latency, HEADLINE[1])}}
    if task in GOALS:
        out["size"] = {"goal": GOALS[task][0], "measured": size, "met": le(size, GOALS[task][0])}
        out["latency"] = {"goal": GOALS[task][1], "measured": latency,
                          "met": le(latency, GOALS[task][1])}
    for other in ("grid", "random"):
        if hv.get("petra") is not None and hv.get(other):
            ratio = hv["petra"] / hv[other]
            out[f"hv_vs_{other}"] = {"goal": HV_FACTOR, "measured": ratio,
                                     "met": ratio >= HV_FACTOR}
    return out


def fmt(value, digits=3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table(results: dict) -> str:
    lines = ["| task | baseline test acc | HV petra | HV grid | HV random | petra/grid | "
             "petra/random | knee size (petra / grid / random) | knee latency "
             "(petra / grid / random) | wall s (petra / grid / random) | HV best known / ideal box / "
             "1.10 × grid | goals met |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, s in results["tasks"].items():
        hv, knees, wall, sp = s["hypervolume"], s["knees"], s["wall_s"], s["spread"]

        def band(arm, hv=hv, sp=sp):
            lo, hi = sp.get(arm, {}).get("hypervolume", [None, None])
            return f"{fmt(hv.get(arm), 4)} ({fmt(lo, 4)}–{fmt(hi, 4)})"

        g = s["goals"]
        met = ", ".join(f"{k} {'✓' if v['met'] else '✗ ' + fmt(v['measured'])}"
                        for k, v in g.items())
        ratio = {o: g.get(f"hv_vs_{o}", {}).get("measured") for o in ("grid", "random")}
        lines.append(
            f"| {task} | {fmt(s['baseline_test_accuracy'], 4)} | {band('petra')} | "
            f"{band('grid')} | {band('random')} | {fmt(ratio['grid'], 2)}× | "
            f"{fmt(ratio['random'], 2)}× | "
            + " / ".join(fmt(knees.get(a, {}).get("size_ratio")) for a in ARMS) + " | "
            + " / ".join(fmt(knees.get(a, {}).get("latency_ratio")) for a in ARMS) + " | "
            + " / ".join(fmt(wall.get(a), 0) for a in ARMS) + " | "
            + " / ".join(fmt(s.get("ceiling", {}).get(k, {}).get("mean"), 4)
                         for k in ("best_known", "ideal_box", "grid_goal")) + f" | {met} |")
    return "\n".join(lines) + "\n"


def plot(task: str, runs: dict[str, list[dict]]) -> None:
    """docs/front_quality_<task>.png and .html: the three fronts of the first seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"petra": "#d62728", "grid": "#1f77b4", "random": "#7f7f7f"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    baseline = None
    rows = []
    for arm, rs in runs.items():
        if not rs:
            continue
        run = rs[0]
        baseline = run["baseline_test_accuracy"]
        pts = [m for m in run["front"] if m["test_accuracy"] is not None]
        for ax, key in zip(axes, ("size_ratio", "latency_ratio"), strict=True):
            ax.scatter([m[key] for m in pts], [m["test_accuracy"] for m in pts], s=28,
                       color=colours[arm], label=f"{arm} (seed {run['seed']})", alpha=0.85)
        rows += [{"search": arm, **{k: m[k] for k in (
            "test_accuracy", "val_accuracy", "size_ratio", "latency_ratio")}} for m in pts]
    for ax, key in zip(axes, ("size ratio (saved artifact / dense)",
                              "latency ratio (ORT, 1 thread, vs dense)"), strict=True):
        if baseline is not None:
            ax.axhline(baseline - 0.01, color="black", lw=0.8, ls="--",
                       label="baseline − 1 point")
        ax.set_xlabel(key)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(max(0.0, (baseline or 1) - 0.12), 1.0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{task}: final fronts at equal evaluations")
    fig.tight_layout()
    DOCS.mkdir(exist_ok=True)
    fig.savefig(DOCS / f"front_quality_{task}.png", dpi=110)
    plt.close(fig)
    body = "".join(f"<tr><td>{r['search']}</td>" + "".join(
        f"<td>{r[k]:.4f}</td>" for k in ("test_accuracy", "val_accuracy", "size_ratio",
                                         "latency_ratio")) + "</tr>" for r in rows)
    (DOCS / f"front_quality_{task}.html").write_text(
        f"<!doctype html><meta charset=utf-8><title>{task} fronts</title>"
        f"<h1>{task}: petra, grid and random fronts (seed 0)</h1>"
        f"<img src='front_quality_{task}.png' alt='fronts'>"
        "<table border=1 cellpadding=4><tr><th>search</th><th>test acc</th><th>val acc</th>"
        f"<th>size ratio</th><th>latency ratio</th></tr>{body}</table>\n")


def merge(paths: list[Path], out: Path) -> None:
    """One result from several partial runs of this script: every run kept, by seed."""
    parts = [json.loads(p.read_text()) for p in paths]
    runs: dict[str, dict[str, list[dict]]] = {}
    for part in parts:
        for task, arms in part["runs"].items():
            for arm, rs in arms.items():
                runs.setdefault(task, {a: [] for a in ARMS})[arm] += rs
    for arms in runs.values():
        for rs in arms.values():
            rs.sort(key=lambda r: r["seed"])
    first = parts[0]
    results = {key: first[key] for key in ("population", "generations", "workers", "seeds",
                                           "reference", "knee", "store")}
    results.update({
        "command": "python benchmarks/front_quality.py",
        "merged_from": [str(p) for p in paths],
        "tasks": {t: summarise(t, rs) for t, rs in runs.items() if any(rs.values())},
        "runs": runs, "wall_s": sum(p["wall_s"] for p in parts),
    })
    out.write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(table(results))
    for task, rs in runs.items():
        if any(rs.values()):
            plot(task, rs)
    print(table(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "front_quality.json")
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="merge the runs of these JSON files (a run done in parts) into "
                             "--out, and redraw the plots; no search runs")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return

    store = ROOT / "runs" / "benchmarks" / "front_quality.db"
    store.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs: dict[str, dict[str, list[dict]]] = {t: {a: [] for a in args.arms} for t in args.tasks}
    results: dict = {}

    def write() -> None:
        results.update({
            "population": args.population, "generations": args.generations,
            "workers": args.workers, "seeds": args.seeds,
            "reference": "accuracy = baseline - 0.1, size_ratio = 1, latency_ratio = 1",
            "knee": "front members with test accuracy >= baseline - 0.01",
            "command": "python benchmarks/front_quality.py " + " ".join(
                f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in (("tasks", args.tasks), ("seeds", args.seeds),
                             ("population", args.population),
                             ("generations", args.generations))),
            "tasks": {t: summarise(t, rs) for t, rs in runs.items() if any(rs.values())},
            "runs": runs, "store": str(store.relative_to(ROOT)),
            "wall_s": time.perf_counter() - started,
        })
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        (args.out.with_suffix(".md")).write_text(table(results))

    for task in args.tasks:
        for seed in args.seeds:
            for arm in args.arms:
                run = run_one(task, arm, seed, population=args.population,
                              generations=args.generations, workers=args.workers, store=store)
                runs[task][arm].append(run)
                print(f"{task} {arm} seed {seed}: HV {run['hypervolume']:.4f}, knee size "
                      f"{fmt(run['knee_size_ratio'])}, latency {fmt(run['knee_latency_ratio'])}, "
                      f"{run['evaluations']} evaluations, {run['wall_s']:.0f} s", flush=True)
                write()
        plot(task, runs[task])
    print(table(results))


if __name__ == "__main__":
    main()
