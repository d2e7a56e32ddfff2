"""petra's NSGA-II adapter on ZDT1 through the same ask/tell loop the search uses, in process.

30 variables, population 100, 100 generations (the first is the random initial population).
Writes {"hypervolume": ...} against reference (11, 11) to benchmarks/results/zdt1.json; the
maximum is 120.667.

    .venv/bin/python benchmarks/zdt1.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = (11.0, 11.0)


def zdt1(x: list[float]) -> tuple[float, float]:
    f1 = x[0]
    g = 1.0 + 9.0 * sum(x[1:]) / (len(x) - 1)
    return f1, g * (1.0 - math.sqrt(f1 / g))


def run(seed: int, *, n_vars: int = 30, population: int = 100, generations: int = 100,
        strategy: str = "nsga2") -> float:
    from petra.pareto import hypervolume
    from petra.space import Float, SearchSpace
    from petra.strategies import Told, make_strategy

    space = SearchSpace([Float(f"x{i}", 0.0, 1.0, 0.0) for i in range(n_vars)])
    search = make_strategy(strategy, space=space, objectives=[("f1", "min"), ("f2", "min")],
                           population=population, generations=generations, seed=seed)
    points = []
    while not search.done:
        batch = search.ask()
        values = [zdt1([g[f"x{i}"] for i in range(n_vars)]) for g in batch]
        points += values
        search.tell([Told(g, v, "complete") for g, v in zip(batch, values, strict=True)])
    return hypervolume(np.array(points), REFERENCE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    started = time.time()
    volumes = {seed: run(seed) for seed in args.seeds}
    report = {
        "hypervolume": statistics.mean(volumes.values()),
        "by_seed": volumes, "min": min(volumes.values()), "max": max(volumes.values()),
        "reference": REFERENCE, "maximum": 121 - 1 / 3,
        "setup": "ZDT1, 30 variables, population 100, 100 generations, nsga2 via ask/tell",
        "wall_s": round(time.time() - started, 1),
    }
    out = ROOT / "benchmarks" / "results" / "zdt1.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"hypervolume {report['hypervolume']:.3f} (seeds {volumes}); wrote "
          f"{out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
