"""The search loop: strategy.ask → executor → tracker → strategy.tell, one generation at a time."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from petra.evaluate import COMPLETE, FAILED

Progress = Callable[[str], None]


@dataclass
class SearchResult:
    """The outcome of a search: its MLflow run, final front, knee and every record."""

    run_id: str
    front: Any  # petra.pareto.FrontSnapshot
    knee: str | None
    baseline: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)
    test_accuracy: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False


def cache_dir() -> Path:
    """Where baselines are cached: ``$PETRA_CACHE`` or ``runs/cache``."""
    return Path(os.environ.get("PETRA_CACHE", "runs/cache"))


def seed_recipes(space: Any) -> list[dict[str, Any]]:
    """Sensible hand-style recipes for the first generation, restricted to the space.

    Uniform recipes over every layer gene that allows them: int8 alone; half and three
    quarters of the channels removed, rounded to 8, int8 and the longest fine-tune; 80%
    magnitude sparsity with int8. The rest of the first generation is random.
    """
    def allowed(name: str, value: Any) -> bool:
        return name in space and value in getattr(space.gene(name), "choices", (value,))

    def uniform(method: str, sparsity: float) -> dict[str, Any]:
        genome: dict[str, Any] = {}
        for layer in space.layers:
            if allowed(f"layers.{layer.name}.method", method):
                genome[f"layers.{layer.name}.method"] = method
                genome[f"layers.{layer.name}.sparsity"] = sparsity
        return genome

    extra: dict[str, Any] = {}
    if allowed("quant.scheme", "int8_static"):
        extra["quant.scheme"] = "int8_static"
    if "finetune.epochs" in space:
        extra["finetune.epochs"] = space.gene("finetune.epochs").high
    if allowed("prune.round_to", 8):
        extra["prune.round_to"] = 8
    recipes = [{k: v for k, v in extra.items() if k == "quant.scheme"}]
    for method, sparsity in (("l2_channel", 0.5), ("l2_channel", 0.75), ("magnitude", 0.8)):
        genome = uniform(method, sparsity)
        if genome:
            recipes.append({**genome, **extra})
    out, seen = [], set()
    for recipe in recipes:
        genome = space.complete(recipe)
        key = space.genome_hash(genome)
        if recipe and key not in seen:
            seen.add(key)
            out.append(genome)
    return out


def search(cfg: Any, *, progress: Progress | None = None) -> SearchResult:
    """Run the search described by a validated :class:`petra.config.SearchConfig`."""
    from petra import pareto
    from petra.baseline import prepare_baseline
    from petra.executor import make_executor
    from petra.space import build_space, prunable_layers
    from petra.strategies import Told, candidate_seed, make_strategy
    from petra.tasks import load_task
    from petra.tracking import Tracker

    say = progress or (lambda _msg: None)
    started = time.monotonic()
    objectives = cfg.objective_list
    task = load_task(cfg.task.name, cfg.task.params)
    say(f"baseline: {'loading' if not task.trained else 'measuring'} {cfg.task.name} ...")
    baseline = prepare_baseline(task, task_name=cfg.task.name, task_params=cfg.task.params,
                                cache_dir=cache_dir(), seed=cfg.seed,
                                threads=cfg.execution.cpus_per_candidate)
    b = baseline.metrics
    say(f"baseline: val {b['val_accuracy']:.4f}, test {b['test_accuracy']:.4f}, "
        f"{int(b['artifact_bytes'])} bytes, {b['latency_ms']:.2f} ms/batch"
        f"{' (cached)' if baseline.cached else ''}")
    space = build_space(cfg.space, prunable_layers(task.model, task.example_input))
    say(f"space: {len(space)} genes over {len(space.layers)} layers")
    # Every strategy but random search starts from a few hand-style recipes.
    initial = seed_recipes(space) if cfg.search.strategy != "random" else []
    strategy = make_strategy(
        cfg.search.strategy, space=space, objectives=objectives,
        population=cfg.search.population, generations=cfg.search.generations,
        seed=cfg.seed, initial=initial[: cfg.search.population // 2],
    )
    tracker = Tracker(uri=cfg.tracking.uri, experiment=cfg.tracking.experiment)
    run_id = tracker.start_search(
        name=cfg.name, params=cfg.flat(), config_yaml=cfg.to_yaml(),
        baseline={
            "val_accuracy": b["val_accuracy"], "test_accuracy": b["test_accuracy"],
            "bytes": b["artifact_bytes"], "latency_ms": b["latency_ms"],
            "params": b["params"], "macs": b["macs"],
        },
        tags={"petra.task": cfg.task.name, "petra.strategy": cfg.search.strategy,
              "petra.driver_pid": str(os.getpid())},
    )
    say(f"search run {run_id} in {cfg.tracking.uri} (experiment {cfg.tracking.experiment!r})")
    executor = make_executor(
        cfg.execution.executor,
        evaluator_kwargs={"task_name": cfg.task.name, "task_params": dict(cfg.task.params),
                          "baseline_state": baseline.state,
                          "baseline_artifact": baseline.artifact},
        address=cfg.execution.address, workers=cfg.execution.workers,
        cpus_per_candidate=cfg.execution.cpus_per_candidate,
    )
    records: list[dict[str, Any]] = []
    results: dict[str, Any] = {}  # genome hash → (run id, Result), for the genome cache
    snap = pareto.snapshot([], objectives, b, -1, cfg.constraints)
    interrupted = False
    budget = cfg.search.time_budget_s
    generation = 0
    try:
        while not strategy.done:
            from petra.executor import Job

            genomes = strategy.ask()
            jobs, told = [], {}
            for index, genome in enumerate(genomes):
                key = space.genome_hash(genome)
                if key in results or any(j.genome_hash == key for j in jobs):
                    continue  # identical recipes are evaluated once
                jobs.append(Job(index, space.complete(genome), key,
                                candidate_seed(cfg.seed, generation, index)))
            for job, result in executor.run(jobs):
                child = tracker.log_candidate(result, generation=generation, index=job.key,
                                              executor=executor.kind)
                results[job.genome_hash] = (child, result)
                records.append({"id": child, "genome": result.genome,
                                "metrics": result.metrics, "status": result.status,
                                "generation": generation, "genome_hash": job.genome_hash})
                if budget and time.monotonic() - started > budget:
                    break
            for genome in genomes:
                key = space.genome_hash(genome)
                if key in results:
                    result = results[key][1]
                    told[key] = Told(genome=genome, status=result.status,
                                     values=result.objective_values(objectives))
            snap = pareto.snapshot(records, objectives, b, generation, cfg.constraints)
            tracker.log_generation(snap)
            say(_generation_line(generation, cfg.search.generations, snap, records, started))
            if budget and time.monotonic() - started > budget:
                say(f"time budget of {budget:g} s reached; stopping")
                break
            strategy.tell([told[space.genome_hash(g)] for g in genomes
                           if space.genome_hash(g) in told])
            generation += 1
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted; logging the front found so far")
    snap = pareto.snapshot(records, objectives, b, max(generation, 0), cfg.constraints)
    knee = pareto.knee_point(snap)
    by_id = {run: res for run, res in results.values()}
    test_acc: dict[str, float] = {}
    try:
        front_ids = [i for i in snap.ids if by_id[i].artifact]
        accs = executor.test_accuracy([by_id[i].artifact for i in front_ids])
        test_acc = dict(zip(front_ids, accs, strict=True))
    finally:
        executor.close()
    for member in snap.members:
        if member["id"] in test_acc:
            member["metrics"]["test_accuracy"] = test_acc[member["id"]]
    tracker.finish(snap, test_accuracy=test_acc, knee=knee, records=records, baseline=b,
                   status="KILLED" if interrupted else "FINISHED")
    return SearchResult(run_id=run_id, front=snap, knee=knee, baseline=dict(b),
                        records=records, test_accuracy=test_acc, interrupted=interrupted)


def _generation_line(generation: int, total: int, snap: Any, records: list[Mapping[str, Any]],
                     started: float) -> str:
    done = [r for r in records if r["status"] == COMPLETE]
    failed = sum(r["status"] == FAILED for r in records)

    def best(metric: str, fn: Callable[..., float]) -> str:
        values = [r["metrics"][metric] for r in done if math.isfinite(r["metrics"].get(metric, math.nan))]
        return f"{fn(values):.3f}" if values else "-"

    return (
        f"generation {generation + 1}/{total}: {len(records)} evaluated ({failed} failed), "
        f"front {len(snap.members)}, hypervolume {snap.hypervolume:.4f}; best val "
        f"{best('val_accuracy', max)}, min size {best('size_ratio', min)}, min latency "
        f"{best('latency_ratio', min)} [{time.monotonic() - started:.0f} s]"
    )
