"""Do the literature's criteria earn their place? EMP, Marchenko–Pastur, equilibrium, Shapley.

Part 1, per task (digits_cnn, events_gru, digits_mlp) and method: bisection on the method's one
knob for the most compression whose validation accuracy stays within 1 point of the dense
baseline, with the same fine-tune for all (3 epochs, the better of lr 3e-4 and 3e-3 by
validation accuracy, no quantization, channels rounded to 8, the task config's layers). The
knobs:

- ``magnitude``, ``l2_channel``, ``shapley``: the sparsity of every layer, in [0, 0.95];
- ``auto_emp+magnitude``, ``auto_emp+l2_channel``: EMP's beta (per layer), in [0.05, 2]: a
  smaller beta keeps fewer;
- ``equilibrium``: the gates' beta, in [0.05, 2] (gamma 0);
- ``mp``: none; SVD with the Marchenko–Pastur rank is measured once.

It reports, at that point, the size ratio, the latency ratio, the validation and the test
accuracy, with a verdict against ``magnitude`` (size) and ``l2_channel`` (latency).

Part 2: a short NSGA-II search on digits_cnn with and without the new criteria in the space, at
the same budget, with 3 seeds: the hypervolumes, and how many front members use each new one.

    .venv/bin/python benchmarks/seed_methods.py [--tasks ...] [--steps 6] [--skip-search]

Writes benchmarks/results/seed_methods.json and seed_methods.md (the table of docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TASKS = ("digits_cnn", "events_gru", "digits_mlp")
FINETUNE = {"finetune.epochs": 3, "prune.round_to": 8}
#: Each point is fine-tuned at both learning rates; the better validation accuracy counts.
LEARNING_RATES = (3e-4, 3e-3)
#: label → (pruning method, how the knob enters the genome, low, high, more compression when)
METHODS = {
    "magnitude": ("magnitude", "sparsity", 0.0, 0.95, "higher"),
    "l2_channel": ("l2_channel", "sparsity", 0.0, 0.95, "higher"),
    "auto_emp+magnitude": ("magnitude", "emp_beta", 0.05, 2.0, "lower"),
    "auto_emp+l2_channel": ("l2_channel", "emp_beta", 0.05, 2.0, "lower"),
    "mp": ("svd", None, None, None, None),
    "equilibrium": ("equilibrium", "eq_beta", 0.05, 2.0, "higher"),
    "shapley": ("shapley", "sparsity", 0.0, 0.95, "higher"),
}
NEW = ("auto_emp", "mp", "equilibrium", "shapley")
DROP = 0.01


class Bench:
    """One task's evaluator, space layers and baseline, kept warm for every evaluation."""

    def __init__(self, task: str) -> None:
        import torch

        from petra.candidate.baseline import prepare_baseline
        from petra.candidate.evaluate import Evaluator
        from petra.config import load_config
        from petra.engine.loop import cache_dir
        from petra.space import model_space
        from petra.tasks import load_task

        torch.set_num_threads(1)
        self.cfg = load_config(ROOT / "search_spaces" / f"{task}.yaml", [
            "space.pruning=[none, magnitude, l2_channel, svd, equilibrium, shapley]",
            "space.sparsity_rules=[fixed, auto_emp]", "space.rank_rules=[energy, mp]",
            # the genes' bounds clip the knobs: open them to the bisection's ranges
            "space.emp_beta=[0.05, 2.0]", "space.eq_beta=[0.05, 2.0]",
            "space.sparsity=[0.0, 0.95]"])
        t = load_task(task, {})
        self.baseline = prepare_baseline(t, task_name=task, task_params={},
                                         cache_dir=cache_dir(), seed=0)
        self.space = model_space(self.cfg.space, t.model, t.example_input)
        self.evaluator = Evaluator(task_name=task, task_params={},
                                   baseline_state=self.baseline.state,
                                   baseline_artifact=self.baseline.artifact, core=0)
        self.floor = self.baseline.metrics["val_accuracy"] - DROP
        self.evaluations = 0

    def genome(self, method: str, knob: str | None, value: float | None) -> dict:
        genome = dict(FINETUNE)
        for layer in self.space.layers:
            gene = f"layers.{layer.name}.method"
            if gene in self.space and method in self.space.gene(gene).choices:
                genome[gene] = method
                genome[f"layers.{layer.name}.sparsity"] = value if knob == "sparsity" else 0.0
        if knob == "emp_beta":
            genome.update({"prune.sparsity_rule": "auto_emp", "prune.emp_beta": value,
                           "prune.emp_scope": "layer"})
        if knob == "eq_beta":
            genome.update({"prune.eq_beta": value, "prune.eq_gamma": 0.0})
        if method == "svd":
            genome["lowrank.rank_rule"] = "mp"
        return genome

    def measure(self, genome: dict) -> dict:
        tries = []
        for lr in LEARNING_RATES:
            result = self.evaluator.evaluate(
                self.space.complete({**genome, "finetune.lr": lr}), seed=0)
            self.evaluations += 1
            tries.append((result.status == "complete",
                          result.metrics.get("val_accuracy", -1.0), lr, result))
        _, _, lr, result = max(tries, key=lambda t: (t[0], t[1]))
        m = dict(result.metrics)
        m["finetune_lr"] = lr
        m["status"] = result.status
        m["error"] = result.error
        m["layers"] = sum(1 for k, v in genome.items() if k.endswith(".method") and v != "none")
        if result.artifact:
            m["test_accuracy"] = self.evaluator.test_accuracy(result.artifact)
        return m

    def feasible(self, m: dict) -> bool:
        return m["status"] == "complete" and m["val_accuracy"] >= self.floor


def bisect(bench: Bench, label: str, steps: int) -> dict:
    method, knob, lo, hi, direction = METHODS[label]
    if knob is None:
        m = bench.measure(bench.genome(method, None, None))
        return {"knob": None, "value": None, "feasible": bench.feasible(m), "metrics": m,
                "tried": 1}
    if not bench.space.layers or not any(
            method in bench.space.gene(f"layers.{x.name}.method").choices
            for x in bench.space.layers if f"layers.{x.name}.method" in bench.space):
        return {"knob": knob, "value": None, "feasible": False, "metrics": {},
                "tried": 0, "note": f"no layer of this task can take {method}"}
    # `safe` is feasible (or the end with the least compression), `bold` the other end
    safe, bold = (lo, hi) if direction == "higher" else (hi, lo)
    best = None
    m = bench.measure(bench.genome(method, knob, bold))
    tried = 1
    if bench.feasible(m):
        return {"knob": knob, "value": bold, "feasible": True, "metrics": m, "tried": tried}
    m = bench.measure(bench.genome(method, knob, safe))
    tried += 1
    if bench.feasible(m):
        best = (safe, m)
    for _ in range(steps):
        mid = (safe + bold) / 2
        m = bench.measure(bench.genome(method, knob, mid))
        tried += 1
        if bench.feasible(m):
            safe, best = mid, (mid, m)
        else:
            bold = mid
    if best is None:
        return {"knob": knob, "value": None, "feasible": False, "metrics": m, "tried": tried}
    return {"knob": knob, "value": best[0], "feasible": True, "metrics": best[1],
            "tried": tried}


#: Each new method is judged against the established criterion it stands beside.
REFERENCE = {"auto_emp+magnitude": "magnitude", "auto_emp+l2_channel": "l2_channel",
             "mp": "magnitude", "equilibrium": "l2_channel", "shapley": "l2_channel"}


def verdict(task_rows: dict) -> dict[str, str]:
    """A sentence per new method: its size and latency against its reference's, or why not."""
    def point(label: str) -> dict | None:
        row = task_rows.get(label)
        return row["metrics"] if row and row["feasible"] and row["metrics"] else None

    out = {}
    for label, ref_label in REFERENCE.items():
        if label not in task_rows:
            continue
        m, ref = point(label), point(ref_label)
        row = task_rows[label]
        if m is None:
            last = row.get("metrics") or {}
            out[label] = "no setting stays within 1 point" + (
                f" (the last tried: val {last['val_accuracy']:.4f} at size "
                f"{last['size_ratio']:.3f})" if "val_accuracy" in last and "size_ratio" in last
                else "")
            continue
        if ref is None:
            out[label] = f"size {m['size_ratio']:.3f}, latency {m['latency_ratio']:.3f}"
            continue
        size = m["size_ratio"] - ref["size_ratio"]
        lat = m["latency_ratio"] - ref["latency_ratio"]

        def word(delta: float, tolerance: float, good: str, bad: str) -> str:
            return good if delta < -tolerance else bad if delta > tolerance else "level"

        out[label] = (f"vs {ref_label}: size {m['size_ratio']:.3f} against "
                      f"{ref['size_ratio']:.3f} ({word(size, 0.01, 'smaller', 'larger')}), "
                      f"latency {m['latency_ratio']:.3f} against {ref['latency_ratio']:.3f} "
                      f"({word(lat, 0.03, 'faster', 'slower')})")
    return out


def search_part(seeds: list[int], population: int, generations: int) -> dict:
    from petra.config import load_config
    from petra.engine.loop import search
    from petra.space import summarize

    store = ROOT / "runs" / "benchmarks" / f"seed_methods-{time.strftime('%Y%m%d-%H%M%S')}.db"
    store.parent.mkdir(parents=True, exist_ok=True)
    arms = {
        "without": ["space.pruning=[none, magnitude, l2_channel, svd]"],
        "with": ["space.pruning=[none, magnitude, l2_channel, svd, equilibrium, shapley]",
                 "space.sparsity_rules=[fixed, auto_emp]", "space.rank_rules=[energy, mp]"],
    }
    out: dict = {"store": f"sqlite:///{store.relative_to(ROOT)}", "population": population,
                 "generations": generations, "seeds": seeds, "arms": {}}
    for arm, sets in arms.items():
        runs = []
        for seed in seeds:
            cfg = load_config(ROOT / "search_spaces" / "digits_cnn.yaml", [
                *sets, f"seed={seed}", f"search.population={population}",
                f"search.generations={generations}", "space.quantization=[none, int8_static]",
                f"tracking.uri=sqlite:///{store}", f"tracking.experiment=seed-methods-{arm}"])
            result = search(cfg)
            uses = {k: 0 for k in NEW}
            for member in result.front.members:
                text = summarize(member["genome"])
                genome = member["genome"]
                uses["auto_emp"] += genome.get("prune.sparsity_rule") == "auto_emp"
                uses["mp"] += "svd" in text and genome.get("lowrank.rank_rule") == "mp"
                uses["equilibrium"] += "equilibrium" in text
                uses["shapley"] += "shapley" in text
            runs.append({"seed": seed, "run_id": result.run_id,
                         "hypervolume": result.front.hypervolume,
                         "front_size": len(result.front.members), "front_uses": uses})
            print(f"search {arm} seed {seed}: hypervolume {result.front.hypervolume:.4f}, "
                  f"front {len(result.front.members)}, new criteria on it {uses}", flush=True)
        hv = [r["hypervolume"] for r in runs]
        out["arms"][arm] = {"runs": runs, "hypervolume": {
            "mean": statistics.mean(hv), "min": min(hv), "max": max(hv)}}
    return out


def markdown(report: dict) -> str:
    lines = ["| task | method | knob | size_ratio | latency_ratio | val acc (drop) | test acc | "
             "verdict |", "|---|---|---|---|---|---|---|---|"]
    for task, data in report["tasks"].items():
        base = data["baseline_val_accuracy"]
        for label, row in data["methods"].items():
            m = row["metrics"]
            knob = "-" if row["knob"] is None else (
                f"{row['knob']}={row['value']:.3g}" if row["value"] is not None else row["knob"])
            if not row["feasible"] or not m:
                why = row.get("note") or data["verdict"].get(label, "none within 1 point")
                lines.append(f"| {task} | {label} | {knob} | - | - | - | - | {why} |")
                continue
            lines.append(
                f"| {task} | {label} | {knob} | {m['size_ratio']:.3f} | "
                f"{m['latency_ratio']:.3f} | {m['val_accuracy']:.4f} "
                f"({100 * (base - m['val_accuracy']):+.1f} pt) | "
                f"{m.get('test_accuracy', float('nan')):.4f} | "
                f"{data['verdict'].get(label, 'reference')} |")
    if "search" in report:
        s = report["search"]
        lines += ["", "| digits_cnn search | hypervolume (mean, min–max) | front members using "
                      "auto_emp / mp / equilibrium / shapley (sum over seeds) |", "|---|---|---|"]
        for arm, data in s["arms"].items():
            h = data["hypervolume"]
            uses = {k: sum(r["front_uses"][k] for r in data["runs"]) for k in NEW}
            lines.append(f"| {arm} the new criteria | {h['mean']:.4f} ({h['min']:.4f}–"
                         f"{h['max']:.4f}) | {' / '.join(str(uses[k]) for k in NEW)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--population", type=int, default=12)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild seed_methods.md from seed_methods.json")
    args = parser.parse_args()
    if args.report_only:
        report = json.loads((RESULTS / "seed_methods.json").read_text())
        for data in report["tasks"].values():
            data["verdict"] = verdict(data["methods"])
        (RESULTS / "seed_methods.json").write_text(json.dumps(report, indent=2, default=str))
        (RESULTS / "seed_methods.md").write_text(markdown(report))
        print(markdown(report))
        return
    started = time.time()
    report: dict = {"drop": DROP, "finetune": FINETUNE, "tasks": {}}
    for task in args.tasks:
        bench = Bench(task)
        rows = {}
        for label in METHODS:
            rows[label] = bisect(bench, label, args.steps)
            m = rows[label]["metrics"]
            print(f"{task:<11} {label:<20} feasible={rows[label]['feasible']} "
                  f"value={rows[label]['value']} size={m.get('size_ratio', float('nan')):.3f} "
                  f"latency={m.get('latency_ratio', float('nan')):.3f} "
                  f"val={m.get('val_accuracy', float('nan')):.4f}", flush=True)
        report["tasks"][task] = {
            "baseline_val_accuracy": bench.baseline.metrics["val_accuracy"],
            "baseline_test_accuracy": bench.baseline.metrics["test_accuracy"],
            "evaluations": bench.evaluations, "methods": rows, "verdict": verdict(rows)}
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "seed_methods.json").write_text(json.dumps(report, indent=2, default=str))
    if not args.skip_search:
        report["search"] = search_part(args.seeds, args.population, args.generations)
    report["wall_s"] = round(time.time() - started, 1)
    (RESULTS / "seed_methods.json").write_text(json.dumps(report, indent=2, default=str))
    (RESULTS / "seed_methods.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
