"""Front quality: petra's default search against the by-hand uniform grid and random search.

For each task (search_spaces/<task>.yaml), these searches run at the same budget of evaluations
(population x generations), with each seed, on a local Ray cluster with 2 workers:

1. ``petra``: the config as it is (NSGA-II, multi-fidelity, the full registry, seed recipes);
2. ``petra_racing``: the same with racing on (``search.racing.enabled``);
3. ``grid``: the uniform grid (``search.strategy=grid``: one structured ratio on every layer
   x {fp32, int8_static}, every point with exactly the seed recipes' fine-tune, see
   petra/engine/strategies/grid.py), with multi-fidelity as configured;
4. ``grid_full``: the grid with multi-fidelity off, every point fine-tuned in full;
5. ``random``: uniform random genomes.

For each search it records the hypervolume (objectives normalised to the dense baseline,
reference accuracy = baseline - 0.1, size_ratio = 1, latency_ratio = 1) at equal evaluations,
and its anytime curve (each generation's hypervolume against the seconds since the search run
started, plus what the seed-lr probe of petra.candidate.lr_probe cost where the arm uses it)
for the hypervolume at equal wall-clock: each arm's at the grid's total time. It records the
operating points of petra.engine.operating_points, **picked on validation** (among
front members within 1 point of the baseline's validation accuracy: the smallest, the fastest
and the knee, each one model) and read on test. Latency ratios are timed on ONNX Runtime with
1 thread, against the dense baseline in the same process.

Seeds 0-2 are the tuning seeds of petra's defaults; the reported figures come from held-out
seeds (100-102 by default, the committed run; 103 and up are held out too) that nothing was
tuned on.

    .venv/bin/python benchmarks/front_quality.py [--tasks digits_cnn ...] [--seeds 100 101]
        [--arms petra grid ...] [--population 8] [--generations 4]

Writes benchmarks/results/front_quality.json with its provenance (benchmarks/provenance.py:
commit, dirty tree, date, machine, versions, command), rewritten after every search so a partial
run keeps what it measured; front_quality.md (the tables of docs/benchmarks.md: per task
and arm, the per-seed ratios at equal wall-clock, the goals) and
docs/front_quality_<task>.png and .html (the fronts of the first seed, size and latency against
test accuracy, and the anytime curves). ``--merge`` joins partial runs of one clean commit and
refuses any other. The searches stay in an MLflow store under runs/benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from provenance import provenance, same_commit  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
TASKS = ("digits_cnn", "digits_mlp", "mnist1d_cnn", "events_gru", "text_bert", "digits_vit",
         "digits_mobilenet", "events_lstm")
ARMS = ("petra", "petra_racing", "grid", "grid_full", "random")
#: Each arm's overrides of the task's config.
OVERRIDES = {"petra": [], "petra_racing": ["search.racing.enabled=true"],
             "grid": ["search.strategy=grid"],
             "grid_full": ["search.strategy=grid", "search.multi_fidelity.enabled=false"],
             "random": ["search.strategy=random"]}
HELD_OUT_SEEDS = [100, 101, 102]
#: The goals: a task's knee (size, latency) bounds, PETRA's headline for every task, and the
#: factor over the grid's hypervolume at equal wall-clock where a uniform ratio wastes most.
GOALS = {"digits_cnn": (0.10, 0.20)}
HEADLINE = (0.25, 0.67)
MAX_TEST_DROP = 0.01
HV_FACTOR = 1.10
HV_FACTOR_TASKS = ("text_bert", "digits_vit")
POINT_KEYS = ("size_ratio", "latency_ratio", "val_accuracy", "test_accuracy", "test_drop")


def run_one(task: str, arm: str, seed: int, *, population: int, generations: int,
            workers: int, store: Path) -> dict:
    from petra.config import load_config
    from petra.engine import pareto
    from petra.engine.loop import search
    from petra.engine.operating_points import operating_points
    from petra.space import skipped_blocks
    from petra.tracking.runs import hypervolume_history

    overrides = [f"seed={seed}", f"search.population={population}",
                 f"search.generations={generations}", f"execution.workers={workers}",
                 f"tracking.uri=sqlite:///{store}",
                 f"tracking.experiment=bench-front-{task}-{arm}", *OVERRIDES[arm]]
    cfg = load_config(ROOT / "search_spaces" / f"{task}.yaml", overrides)
    started = time.perf_counter()
    result = search(cfg)
    wall = time.perf_counter() - started
    # The seed-lr probe runs before the search run starts, once per model (then cached): its
    # cost counts in the anytime curve of every arm that uses it.
    probe_s = result.lr_probe.seconds if result.lr_probe else 0.0
    curve = pareto.hypervolume_curve(result.records, cfg.objective_list, result.baseline,
                                     cfg.constraints.model_dump())
    front = [{"id": m["id"], **{k: m["metrics"].get(k) for k in (
        "val_accuracy", "test_accuracy", "size_ratio", "latency_ratio", "artifact_bytes")},
        "quant": m["genome"].get("quant.scheme"),
        "skipped": skipped_blocks(m["genome"]),
        "epochs": m["genome"].get("finetune.epochs")} for m in result.front.members]
    statuses = [r["status"] for r in result.records]
    return {
        "seed": seed, "run_id": result.run_id,
        "hypervolume": curve[-1] if curve else 0.0,
        "evaluations": len(result.records),
        "evaluations_to_95": pareto.evaluations_to_reach(curve, 0.95),
        "wall_s": wall,
        "anytime": [[t + probe_s, hv] for t, hv in hypervolume_history(
            f"sqlite:///{store}", result.run_id)],
        "lr_probe_s": probe_s,
        # picked on validation, read on test: test accuracy never takes part in the choice
        "points": operating_points(front, result.baseline),
        "failed": statuses.count("failed"), "pruned": statuses.count("pruned"),
        "baseline_test_accuracy": result.baseline["test_accuracy"],
        "baseline_val_accuracy": result.baseline["val_accuracy"],
        "front": front,
    }


def hypervolume_at(curve: list[list[float]], seconds: float) -> float:
    """The hypervolume an anytime ``curve`` had reached ``seconds`` into its search (0 before
    its first generation was logged)."""
    reached = [hv for t, hv in curve if t <= seconds + 1e-9]
    return max(reached) if reached else 0.0


def equal_wallclock(runs: dict[str, list[dict]], against: str = "grid") -> dict[str, list]:
    """Per arm, per seed: its hypervolume at the ``against`` arm's total time on that seed
    (the time of its last logged generation)."""
    out: dict[str, list] = {}
    budget = {r["seed"]: max((t for t, _ in r["anytime"]), default=0.0)
              for r in runs.get(against, [])}
    for arm, rs in runs.items():
        out[arm] = [hypervolume_at(r["anytime"], budget[r["seed"]]) if r["seed"] in budget
                    else None for r in rs]
    return out


#: The ratios of hypervolume at equal wall-clock reported per seed: (numerator, denominator).
RATIOS = (("petra", "grid"), ("petra", "random"), ("petra_racing", "petra"))


def per_seed_ratios(runs: dict[str, list[dict]], at_wallclock: dict[str, list]) -> list[dict]:
    """Per seed, each of ``RATIOS`` at equal wall-clock (``None`` where either arm did not run
    that seed, or the denominator found nothing)."""
    by_seed = {arm: dict(zip([r["seed"] for r in rs], at_wallclock.get(arm, []), strict=False))
               for arm, rs in runs.items()}  # no grid: no ratios
    rows = []
    for seed in sorted({s for hv in by_seed.values() for s in hv}):
        row: dict = {"seed": seed}
        for a, b in RATIOS:
            x, y = by_seed.get(a, {}).get(seed), by_seed.get(b, {}).get(seed)
            row[f"{a}_vs_{b}"] = x / y if x is not None and y else None
        rows.append(row)
    return rows


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


def _point_stats(rs: list[dict], point: str) -> dict:
    """Means over seeds of one operating point's fields, with their min and max; ``found``
    counts the seeds where some member was eligible."""
    picked = [r["points"][point] for r in rs if r.get("points", {}).get(point)]
    out = {k: _stat([p.get(k) for p in picked]) for k in POINT_KEYS}
    out["found"] = len(picked)
    return out


def summarise(task: str, runs: dict[str, list[dict]]) -> dict:
    """The issue's JSON shape for one task: per arm, the means over seeds, ``spread`` the min
    and max of each."""
    at_wallclock = equal_wallclock(runs) if runs.get("grid") else {}
    arms = {}
    for arm, rs in runs.items():
        if not rs:
            continue
        stats = {"hypervolume_equal_evaluations": _stat([r["hypervolume"] for r in rs]),
                 "hypervolume_equal_wallclock": _stat(at_wallclock.get(arm, [])),
                 "wall_s": _stat([r["wall_s"] for r in rs]),
                 "evaluations_to_95": _stat([r["evaluations_to_95"] for r in rs])}
        points = {p: _point_stats(rs, p) for p in ("knee", "smallest", "fastest")}
        arms[arm] = {
            **{p: {k: v["mean"] for k, v in s.items() if k != "found"} | {"found": s["found"]}
               for p, s in points.items()},
            **{k: v["mean"] for k, v in stats.items()},
            "spread": {**{k: [v["min"], v["max"]] for k, v in stats.items()},
                       **{f"{p}.{k}": [v["min"], v["max"]] for p, s in points.items()
                          for k, v in s.items() if k != "found"}},
            "seeds": [r["seed"] for r in rs],
        }
    baseline = [r["baseline_test_accuracy"] for rs in runs.values() for r in rs]
    out = {"baseline_test_accuracy": statistics.mean(baseline) if baseline else None,
           "evaluations": max((r["evaluations"] for rs in runs.values() for r in rs), default=0),
           "arms": arms, "ceiling": ceiling({a: rs for a, rs in runs.items()
                                             if a in ("petra", "grid", "random")})}
    out["goals"] = goals(task, out)
    out["per_seed_wallclock"] = per_seed_ratios(runs, at_wallclock)
    return out


def goals(task: str, summary: dict) -> dict:
    """Each goal for this task: met or not, with the measured figure (petra's knee, picked on
    validation; hypervolumes at equal wall-clock)."""
    arms = summary["arms"]
    knee = arms.get("petra", {}).get("knee", {})
    size, latency, drop = knee.get("size_ratio"), knee.get("latency_ratio"), knee.get("test_drop")

    def le(value, bound):
        return value is not None and value <= bound + 1e-12

    out = {"headline_size": {"goal": HEADLINE[0], "measured": size, "met": le(size, HEADLINE[0])},
           "headline_latency": {"goal": HEADLINE[1], "measured": latency,
                                "met": le(latency, HEADLINE[1])},
           "knee_test_drop": {"goal": MAX_TEST_DROP, "measured": drop,
                              "met": le(drop, MAX_TEST_DROP)}}
    if task in GOALS:
        out["size"] = {"goal": GOALS[task][0], "measured": size, "met": le(size, GOALS[task][0])}
        out["latency"] = {"goal": GOALS[task][1], "measured": latency,
                          "met": le(latency, GOALS[task][1])}
    petra = arms.get("petra", {}).get("hypervolume_equal_wallclock")
    for other in ("grid", "random"):
        theirs = arms.get(other, {}).get("hypervolume_equal_wallclock")
        if petra is not None and theirs:
            factor = HV_FACTOR if other == "grid" and task in HV_FACTOR_TASKS else 1.0
            out[f"hv_wallclock_vs_{other}"] = {"goal": factor, "measured": petra / theirs,
                                               "met": petra / theirs >= factor}
    return out


def fmt(value, digits=3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table(results: dict) -> str:
    """The table of docs/benchmarks.md: per task and arm, the three operating points (picked on validation,
    read on test), the hypervolume at equal evaluations and at equal wall-clock, the wall time;
    then each task's goals."""
    lines = [f"Commit {results['provenance']['commit']}, held-out seeds "
             f"{', '.join(map(str, results['seeds']))}; means over seeds (min–max).", "",
             "| task | arm | knee: size / latency / val / test drop | smallest: size / latency "
             "/ test drop | fastest: size / latency / test drop | HV, equal evaluations | HV, "
             "equal wall-clock | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for task, s in results["tasks"].items():
        for arm, a in s["arms"].items():
            def band(key, a=a):
                lo, hi = a["spread"].get(key, [None, None])
                return f"{fmt(a.get(key), 4)} ({fmt(lo, 4)}–{fmt(hi, 4)})"

            k, sm, fa = a["knee"], a["smallest"], a["fastest"]
            lines.append(
                f"| {task} | {arm} | {fmt(k['size_ratio'])} / {fmt(k['latency_ratio'])} / "
                f"{fmt(k['val_accuracy'], 4)} / {fmt(k['test_drop'], 4)} | "
                f"{fmt(sm['size_ratio'])} / {fmt(sm['latency_ratio'])} / "
                f"{fmt(sm['test_drop'], 4)} | {fmt(fa['size_ratio'])} / "
                f"{fmt(fa['latency_ratio'])} / {fmt(fa['test_drop'], 4)} | "
                f"{band('hypervolume_equal_evaluations')} | "
                f"{band('hypervolume_equal_wallclock')} | {fmt(a['wall_s'], 0)} |")
    lines += ["", "Per seed, hypervolume at equal wall-clock: "
              + ", ".join(f"{a} / {b}" for a, b in RATIOS) + ".", "",
              "| task | seed | " + " | ".join(f"{a} / {b}" for a, b in RATIOS) + " |",
              "|---|---|" + "---|" * len(RATIOS)]
    for task, s in results["tasks"].items():
        for row in s.get("per_seed_wallclock", []):
            lines.append(f"| {task} | {row['seed']} | "
                         + " | ".join(fmt(row[f"{a}_vs_{b}"]) for a, b in RATIOS) + " |")
    lines += ["", "| task | goal | target | measured | met |", "|---|---|---|---|---|"]
    for task, s in results["tasks"].items():
        for name, g in s["goals"].items():
            lines.append(f"| {task} | {name} | {fmt(g['goal'], 2)} | {fmt(g['measured'])} | "
                         f"{'yes' if g['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(task: str, runs: dict[str, list[dict]], folder: Path = DOCS) -> None:
    """docs/front_quality_<task>.png and .html: the fronts of the first seed, and every arm's
    anytime curve (hypervolume against seconds) of that seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"petra": "#d62728", "petra_racing": "#ff7f0e", "grid": "#1f77b4",
               "grid_full": "#17becf", "random": "#7f7f7f"}
    fig, all_axes = plt.subplots(1, 3, figsize=(16, 4.2))
    axes, curves = all_axes[:2], all_axes[2]
    for arm, rs in runs.items():
        if rs and rs[0].get("anytime"):
            t, hv = zip(*rs[0]["anytime"], strict=True)
            curves.step(t, hv, where="post", color=colours[arm], label=arm)
    curves.set_xlabel("seconds since the search started")
    curves.set_ylabel("hypervolume")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
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
    fig.suptitle(f"{task}: final fronts at equal evaluations, and hypervolume against time")
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / f"front_quality_{task}.png", dpi=110)
    plt.close(fig)
    body = "".join(f"<tr><td>{r['search']}</td>" + "".join(
        f"<td>{r[k]:.4f}</td>" for k in ("test_accuracy", "val_accuracy", "size_ratio",
                                         "latency_ratio")) + "</tr>" for r in rows)
    (folder / f"front_quality_{task}.html").write_text(
        f"<!doctype html><meta charset=utf-8><title>{task} fronts</title>"
        f"<h1>{task}: the fronts of the first seed</h1>"
        f"<img src='front_quality_{task}.png' alt='fronts'>"
        "<table border=1 cellpadding=4><tr><th>search</th><th>test acc</th><th>val acc</th>"
        f"<th>size ratio</th><th>latency ratio</th></tr>{body}</table>\n")


def write_results(out: Path, results: dict, runs: dict[str, dict[str, list[dict]]]) -> None:
    results["tasks"] = {t: summarise(t, rs) for t, rs in runs.items() if any(rs.values())}
    results["runs"] = runs
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(table(results))


def merge(paths: list[Path], out: Path, plots: Path = DOCS) -> None:
    """One result from several partial runs of this script, of one clean commit (any other
    mix is refused): every run kept, by seed."""
    parts = [json.loads(p.read_text()) for p in paths]
    same_commit(parts, [str(p) for p in paths])
    runs: dict[str, dict[str, list[dict]]] = {}
    for part in parts:
        for task, arms in part["runs"].items():
            for arm, rs in arms.items():
                runs.setdefault(task, {})
                runs[task].setdefault(arm, []).extend(rs)
    for arms in runs.values():
        for rs in arms.values():
            rs.sort(key=lambda r: r["seed"])
    # tasks and arms in the script's order, whatever order the parts came in
    runs = {t: {a: runs[t][a] for a in ARMS if a in runs[t]}
            for t in sorted(runs, key=lambda t: TASKS.index(t) if t in TASKS else len(TASKS))}
    first = parts[0]
    results = {key: first[key] for key in ("population", "generations", "workers",
                                           "reference", "operating_points", "store")}
    results.update({
        "provenance": {**first["provenance"], "merged": provenance()},
        # a part that is itself a merge brings the commands of its own parts
        "merged_from": [entry for p in parts for entry in p.get("merged_from") or [
            {"command": p["provenance"]["command"], "date": p["provenance"]["date"]}]],
        "seeds": sorted({s for p in parts for s in p["seeds"]}),
        "wall_s": sum(p["wall_s"] for p in parts),
    })
    write_results(out, results, runs)
    for task, rs in runs.items():
        if any(rs.values()):
            plot(task, rs, plots)
    print(table(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=HELD_OUT_SEEDS)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "front_quality.json")
    parser.add_argument("--plots", type=Path, default=DOCS,
                        help="where the plots go (docs/, which docs/benchmarks.md shows, by default)")
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="merge the runs of these JSON files (a run done in parts, on one "
                             "clean commit) into --out, and redraw the plots; no search runs")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.out, args.plots)
        return

    store = ROOT / "runs" / "benchmarks" / "front_quality.db"
    store.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs: dict[str, dict[str, list[dict]]] = {t: {a: [] for a in args.arms} for t in args.tasks}
    results: dict = {
        "provenance": provenance(), "population": args.population,
        "generations": args.generations, "workers": args.workers, "seeds": args.seeds,
        "reference": "accuracy = baseline - 0.1, size_ratio = 1, latency_ratio = 1",
        "operating_points": "picked among front members with validation accuracy >= the "
                            "baseline's - 0.01 (petra.engine.operating_points); test read only",
        "store": str(store.relative_to(ROOT)),
    }
    for task in args.tasks:
        for seed in args.seeds:
            for arm in args.arms:
                run = run_one(task, arm, seed, population=args.population,
                              generations=args.generations, workers=args.workers, store=store)
                runs[task][arm].append(run)
                knee = run["points"]["knee"] or {}
                print(f"{task} {arm} seed {seed}: HV {run['hypervolume']:.4f}, knee size "
                      f"{fmt(knee.get('size_ratio'))}, latency {fmt(knee.get('latency_ratio'))}"
                      f", test drop {fmt(knee.get('test_drop'), 4)}, {run['evaluations']} "
                      f"evaluations, {run['wall_s']:.0f} s", flush=True)
                results["wall_s"] = time.perf_counter() - started
                write_results(args.out, results, runs)
        plot(task, runs[task], args.plots)
    print(table(results))


if __name__ == "__main__":
    main()
