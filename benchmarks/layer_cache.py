"""What the compressed-layer cache saves: the compression step of a candidate, four ways.

For each space, the same random genomes are compressed (:meth:`Evaluator._compress`: skipped
blocks, heads, channels, width, then the unstructured masks) on one core, in arms:

- ``sort``: every mask from a stable sort of the layer's scores (petra before the cache);
- ``threshold``: the cache off (``execution.layer_cache_mb: 0``), masks by a k-th value
  threshold;
- ``cache pass 1..3``: the cache on and empty at pass 1; the genomes passed three times, so
  pass 1 meets each layer first (threshold), pass 2 sorts what repeats, pass 3 reads the cache.

Spaces: the config's own (text_bert: heads, channels and a hidden-width gene reshape most
layers), and an EvoPress-like one on the same model: per-layer magnitude levels of the dense
layers, no structured gene.

Usage: python benchmarks/layer_cache.py --config search_spaces/text_bert.yaml --genomes 24

Writes ``benchmarks/results/layer_cache_<config name>.json`` with the commit, the machine and
the command. The genomes are sampled with seed 0: nothing is tuned here.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LEVELS_ONLY = {"pruning": ["none", "magnitude"], "width": [0.0, 0.0], "skip_blocks": False,
               "quantization": ["none"]}


def sort_always(self: Any, scores: Any, n_prune: int) -> Any:
    import torch

    flat = scores.detach().flatten()
    mask = torch.ones(flat.numel(), dtype=torch.bool)
    if n_prune > 0:
        mask[torch.argsort(flat, stable=True)[:n_prune]] = False
    return mask


def arms(raw: dict, genomes_n: int) -> dict[str, Any]:
    import torch

    from petra.candidate.baseline import prepare_baseline
    from petra.candidate.evaluate import Evaluator
    from petra.candidate.recipes import Recipe
    from petra.compress import layer_cache
    from petra.config import load_config
    from petra.engine.loop import cache_dir
    from petra.layers import model_space
    from petra.tasks import load_task

    cfg = load_config(raw)
    task = load_task(cfg.task.name, cfg.task.params)
    space = model_space(cfg.space, task.model, task.example_input, cache=cache_dir())
    baseline = prepare_baseline(task, task_name=cfg.task.name, task_params=cfg.task.params,
                                cache_dir=cache_dir(), seed=cfg.seed, threads=1)
    evaluator = Evaluator(**{**Evaluator.options(cfg, baseline), "layer_cache_mb": 0})
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    genomes = [space.complete(space.sample(rng)) for _ in range(genomes_n)]

    def timed() -> dict[str, float]:
        times = []
        for genome in genomes:
            model = copy.deepcopy(evaluator.task.model)
            start = time.perf_counter()
            evaluator._compress(model, Recipe.from_genome(genome), 0)
            times.append(time.perf_counter() - start)
        return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times)}

    out: dict[str, Any] = {}
    keep_mask = layer_cache.LayerCache.keep_mask
    layer_cache.LayerCache.keep_mask = sort_always
    try:
        timed()  # warm: imports, allocator, dependency-graph code paths
        out["sort"] = timed()
    finally:
        layer_cache.LayerCache.keep_mask = keep_mask
    layer_cache.configure(0)
    out["threshold"] = timed()
    layer_cache.configure(256)
    layer_cache.CACHE.clear()
    for i in (1, 2, 3):
        out[f"cache pass {i}"] = {**timed(), **layer_cache.CACHE.stats()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "search_spaces" / "text_bert.yaml"))
    parser.add_argument("--genomes", type=int, default=24)
    parser.add_argument("--out")
    opts = parser.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    raw = yaml.safe_load(Path(opts.config).read_text())
    results = {"config's space": arms(raw, opts.genomes)}
    levels = copy.deepcopy(raw)
    levels["space"].update(LEVELS_ONLY)
    results["per-layer magnitude levels"] = arms(levels, opts.genomes)
    print(json.dumps(results, indent=1))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    out = Path(opts.out or ROOT / "benchmarks" / "results" / f"layer_cache_{raw['name']}.json")
    out.write_text(json.dumps({
        "commit": commit, "machine": f"{platform.node()} {platform.machine()}, "
        f"{os.cpu_count()} cores (pinned to one)", "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "genomes": opts.genomes,
        "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
