"""Candidates per hour with 1 and with 2 Ray workers, and the per-candidate overhead.

The workload is the same for both: random search (its proposals do not depend on results) over
search_spaces/digits_cnn.yaml with a fixed seed, multi-fidelity off, so both runs evaluate the
same genomes, each in full. Each run goes through the whole search loop: Ray actors, MLflow
child runs into a sqlite store, a checkpoint after every result.

- **Throughput** is measured in steady state, from the first candidate's result to the last
  (start-up, the baseline and the final front are left out), and end to end.
- **Overhead** is the time the workers were not evaluating, as a fraction of the time they were,
  over the steady-state window: ``(workers * window - busy) / busy``. It holds Ray's dispatch,
  waiting for the driver, and each generation's tail, when a worker has no job left until the
  slowest candidate of the generation finishes.
- **The driver's bookkeeping** (MLflow logging and the checkpoint) is timed per candidate.

    .venv/bin/python benchmarks/scaling.py [--population 16] [--generations 4] [--repeats 2]

Writes benchmarks/results/scaling.json; the searches stay in MLflow stores under
runs/benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "search_spaces" / "digits_cnn.yaml"


@contextmanager
def timed(cls: type, name: str, sink: list[float]):
    """Time every call of ``cls.name`` into ``sink`` (this benchmark's own instrumentation)."""
    original = getattr(cls, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - t0)

    setattr(cls, name, wrapper)
    try:
        yield
    finally:
        setattr(cls, name, original)


def run_one(workers: int, *, population: int, generations: int, seed: int, store: Path) -> dict:
    from mlflow.tracking import MlflowClient

    from petra.config import load_config
    from petra.engine.loop import _Search, search
    from petra.tracking.store import Tracker

    cfg = load_config(CONFIG, [
        f"seed={seed}", "search.strategy=random", f"search.population={population}",
        f"search.generations={generations}", "search.multi_fidelity.enabled=false",
        f"execution.workers={workers}", f"tracking.uri=sqlite:///{store}",
        f"tracking.experiment=bench-scaling-{workers}w",
    ])
    logging_s: list[float] = []
    checkpoint_s: list[float] = []
    started = time.perf_counter()
    with timed(Tracker, "log_candidate", logging_s), timed(_Search, "_checkpoint", checkpoint_s):
        result = search(cfg)
    wall = time.perf_counter() - started
    client = MlflowClient(f"sqlite:///{store}")
    children = client.search_runs(
        [client.get_run(result.run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'", max_results=10000)
    # A child run is created when its result reaches the driver, so a candidate was evaluated
    # over about [created - eval_time, created]. The steady-state window runs from the first
    # result to the last; a worker's busy time is the part of its candidates' intervals inside.
    spans = [(c.info.start_time / 1000 - c.data.metrics["eval_time_s"], c.info.start_time / 1000)
             for c in children]
    first, last = min(e for _, e in spans), max(e for _, e in spans)
    window = last - first
    busy = sum(max(0.0, min(e, last) - max(s, first)) for s, e in spans)
    n = len(children)
    evals = [c.data.metrics["eval_time_s"] for c in children]
    return {
        "workers": workers,
        "candidates": n,
        "genome_hashes": sorted(c.data.tags["petra.genome_hash"] for c in children),
        "wall_s": wall,
        "steady_window_s": window,
        "candidates_per_hour": (n - 1) / window * 3600,
        "candidates_per_hour_end_to_end": n / wall * 3600,
        "mean_eval_s": statistics.mean(evals),
        "overhead_fraction": (workers * window - busy) / busy,
        "driver_logging_s_per_candidate": sum(logging_s) / n,
        "driver_checkpoint_s_per_candidate": sum(checkpoint_s) / max(len(checkpoint_s), 1),
        "driver_bookkeeping_fraction": (sum(logging_s) + sum(checkpoint_s))
        / sum(evals),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    runs = []
    folder = ROOT / "runs" / "benchmarks" / f"scaling-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    for repeat in range(args.repeats):
        for workers in (1, 2):
            run = run_one(workers, population=args.population,
                          generations=args.generations, seed=args.seed,
                          store=folder / f"r{repeat}-{workers}.db")
            run["repeat"] = repeat
            runs.append(run)
            print(f"repeat {repeat}, {workers} worker(s): {run['candidates']} candidates, "
                  f"{run['candidates_per_hour']:.0f}/h steady "
                  f"({run['candidates_per_hour_end_to_end']:.0f}/h end to end), mean eval "
                  f"{run['mean_eval_s']:.2f} s, overhead {100 * run['overhead_fraction']:.1f}%"
                  f", driver bookkeeping {100 * run['driver_bookkeeping_fraction']:.1f}%",
                  flush=True)

    def mean(workers: int, key: str) -> float:
        return statistics.mean(r[key] for r in runs if r["workers"] == workers)

    same = len({tuple(r["genome_hashes"]) for r in runs}) == 1
    report = {
        "task": "digits_cnn", "workload": f"random search, seed {args.seed}, population "
        f"{args.population} x {args.generations} generations, multi-fidelity off",
        "same_genomes_in_every_run": same,
        "candidates_per_hour": {w: mean(w, "candidates_per_hour") for w in (1, 2)},
        "candidates_per_hour_end_to_end": {
            w: mean(w, "candidates_per_hour_end_to_end") for w in (1, 2)},
        "speedup_1_to_2": mean(2, "candidates_per_hour") / mean(1, "candidates_per_hour"),
        "speedup_1_to_2_end_to_end": mean(2, "candidates_per_hour_end_to_end")
        / mean(1, "candidates_per_hour_end_to_end"),
        "mean_eval_s": {w: mean(w, "mean_eval_s") for w in (1, 2)},
        "overhead_fraction": {w: mean(w, "overhead_fraction") for w in (1, 2)},
        "driver_bookkeeping_fraction": {
            w: mean(w, "driver_bookkeeping_fraction") for w in (1, 2)},
        "runs": [{k: v for k, v in r.items() if k != "genome_hashes"} for r in runs],
    }
    out = ROOT / "benchmarks" / "results" / "scaling.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"speed-up 1 -> 2 workers: {report['speedup_1_to_2']:.2f}x steady, "
          f"{report['speedup_1_to_2_end_to_end']:.2f}x end to end; overhead "
          f"{100 * report['overhead_fraction'][2]:.1f}% (2 workers); wrote "
          f"{out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
