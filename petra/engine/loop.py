"""The search loop: strategy.ask → executor → tracker → strategy.tell, one generation at a time."""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from petra.candidate.baseline import check_task, describe, prepare_baseline, task_space
from petra.candidate.evaluate import Evaluator, Result, objective_values
from petra.candidate.lr_probe import LrProbe, probe_seed_lr, recorded_probe, run_logs
from petra.candidate.recipes import SEED_SHARE, seed_recipes
from petra.engine import pareto
from petra.engine.executor import Job, make_executor
from petra.engine.fidelity import rung_for_generation
from petra.engine.interrupts import ctrl_c_noted
from petra.engine.racing import Calibration, race, screen_count
from petra.errors import COMPLETE, FAILED, PRUNED, ConfigError
from petra.registry import STRATEGIES
from petra.tasks import load_task
from petra.tracking.journal import Journal
from petra.tracking.progress import Status, as_reporter, best_values, generation_line
from petra.tracking.recorder import PENDING, Recorder
from petra.tracking.store import Tracker

if TYPE_CHECKING:
    from petra.engine.executor import LocalExecutor, RayExecutor
    from petra.schema import SearchConfig


#: A :class:`petra.tracking.progress.Reporter`, or a callable taking message lines.
Progress = Any


@dataclass
class SearchResult:
    """The outcome of a search: its MLflow run, final front, knee and every record."""

    run_id: str
    front: pareto.FrontSnapshot
    knee: str | None
    baseline: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)
    test_accuracy: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    #: The seed-lr probe this search used (petra.candidate.lr_probe), or None.
    lr_probe: LrProbe | None = None


def cache_dir() -> Path:
    """Where baselines are cached: ``$PETRA_CACHE`` or ``runs/cache``."""
    return Path(os.environ.get("PETRA_CACHE", "runs/cache"))


CHECKPOINT = "checkpoint.json"


def search(cfg: SearchConfig, *, progress: Progress | None = None) -> SearchResult:
    """Run the search described by a validated :class:`petra.config.SearchConfig`."""
    state = _Search(cfg, progress)
    return state.run(state.executor(), state.start)


def resume(
    run_id: str, *, uri: str = "sqlite:///runs/mlflow.db", overrides: tuple[str, ...] = (),
    progress: Progress | None = None,
) -> SearchResult:
    """Continue the search of MLflow run ``run_id`` from its checkpoint.

    The config is the run's own ``config.yaml`` (with ``overrides`` applied). Candidates whose
    child runs finished are never evaluated again, even those that finished after the last
    checkpoint; child runs that a kill left unfinished are deleted and their genomes evaluated.
    """
    import yaml

    from petra.config import load_config

    text = Tracker.read_text(uri, run_id, "config.yaml")
    if text is None:
        raise ConfigError("run_id", run_id, "", f"no petra search run {run_id!r} in {uri}")
    cfg = load_config(yaml.safe_load(text), [f"tracking.uri={uri}", *overrides])
    state = _Search(cfg, progress, resume_of=run_id)
    return state.run(state.executor(), state.attach)


#: What a search says when its time budget is spent, with how to go on.
BUDGET_SPENT = ("time budget of {:g} s reached; stopping (petra resume {} --set "
                "search.time_budget_s=S goes on, S counting the time spent)")


class _Search:
    """One search's state: everything a checkpoint holds, and what it is rebuilt from."""

    def __init__(self, cfg: SearchConfig, progress: Progress | None,
                 resume_of: str | None = None) -> None:
        from petra.engine.strategies import make_strategy

        self.cfg = cfg
        self.reporter = as_reporter(progress)
        self.say = self.reporter.message
        self.objectives = cfg.objective_list
        self.task = load_task(cfg.task.name, cfg.task.params)
        check_task(self.task, cfg.task.name)
        # The space first: a glob that matches no layer is found before any training.
        self.space = task_space(cfg.space, self.task, cache_dir())
        self.say(f"baseline: preparing {cfg.task.name} ...")
        self.baseline = prepare_baseline(
            self.task, task_name=cfg.task.name, task_params=cfg.task.params,
            cache_dir=cache_dir(), seed=cfg.seed, threads=cfg.execution.cpus_per_candidate)
        self.say(describe(self.baseline, self.task.metric, self.task.cast_from))
        self.say(self.space.overview())
        # Every strategy but the baselines (random search, the uniform grid: registry meta
        # baseline=True) starts from a few hand-style recipes.
        meta = STRATEGIES.get(cfg.search.strategy).meta
        baseline_strategy = meta.get("baseline")
        # Their fine-tune lr (and the grid's), probed on this model (petra.candidate.lr_probe);
        # a resumed search keeps the one its run recorded.
        self.resume_of = resume_of
        self.lr_probe: LrProbe | None = None
        if resume_of is not None:
            self.lr_probe = recorded_probe(Tracker.read_text(
                cfg.tracking.uri, resume_of, "lr_probe.json"), self.space, self.say)
        elif meta.get("seed_finetune", not baseline_strategy):
            self.lr_probe = probe_seed_lr(cfg, self.space, self.baseline, self.task,
                                          cache=cache_dir(), say=self.say)
        initial = [] if baseline_strategy else seed_recipes(self.space)
        # Racing (petra.engine.racing) asks for more offspring than it measures.
        self.racing = cfg.search.racing.enabled and not baseline_strategy
        self.calibration = Calibration()
        self.strategy = make_strategy(
            cfg.search.strategy, space=self.space, objectives=self.objectives,
            population=cfg.search.population, generations=cfg.search.generations,
            seed=cfg.seed, initial=initial[: int(cfg.search.population * SEED_SHARE)],
            offspring=cfg.search.population * (cfg.search.racing.factor if self.racing else 1),
        )
        self.tracker = Tracker(uri=cfg.tracking.uri, experiment=cfg.tracking.experiment)
        self.records: list[dict[str, Any]] = []
        self.results: dict[str, dict[str, Any]] = {}  # genome hash → record (the genome cache)
        self.artifacts: dict[str, bytes] = {}  # genome hash → artifact, evaluated here
        self.recorder: Recorder | None = None  # once the search run exists
        self.generation = 0
        self.elapsed_before = 0.0
        self.logged_generations: set[int] = set()
        self.started = time.monotonic()
        self.ctrl_c = False  # set by Ctrl-C while the loop runs (see ctrl_c_noted)
        self.done_at_start = 0

    # -- starting and resuming --------------------------------------------------------------
    def start(self) -> _Search:
        b = self.baseline.metrics
        probe = run_logs(self.lr_probe)
        run_id = self.tracker.start_search(
            name=self.cfg.name, params=self.cfg.flat(), config_yaml=self.cfg.to_yaml(),
            baseline={
                "val_accuracy": b["val_accuracy"], "test_accuracy": b["test_accuracy"],
                "bytes": b["artifact_bytes"], "latency_ms": b["latency_ms"],
                "params": b["params"], "macs": b["macs"],
            },
            tags={"petra.task": self.cfg.task.name, "petra.strategy": self.cfg.search.strategy,
                  "petra.driver_pid": str(os.getpid()), **probe["tags"]},
            texts=probe["texts"], metrics=probe["metrics"],
        )
        self.say(f"search run {run_id} in {self.cfg.tracking.uri} "
                 f"(experiment {self.cfg.tracking.experiment!r})")
        self._open_recorder(run_id)
        self._checkpoint()
        return self

    def _open_recorder(self, run_id: str) -> None:
        self.journal = Journal(run_id)
        self.recorder = Recorder(self.tracker, self.journal, executor=self.cfg.execution.executor,
                                 say=self.say)

    def attach(self) -> _Search:
        import yaml

        run_id = self.resume_of
        self.tracker.attach(run_id, driver_pid=os.getpid())
        self._open_recorder(run_id)
        # The newer of the two checkpoints: MLflow's, or the journal's (written even when
        # MLflow was away).
        states = [json.loads(t) for t in (
            self.tracker.read_text(self.cfg.tracking.uri, run_id, CHECKPOINT),
            self.journal.checkpoint()) if t]
        if states:
            state = max(states, key=lambda st: len(st["records"]))
            self.strategy.load_state_dict(state["strategy"])
            self.records = state["records"]
            self.generation = state["generation"]
            self.elapsed_before = state["elapsed_s"]
        self.results = {r["genome_hash"]: r for r in self.records}
        self.calibration = Calibration.from_records(self.records)
        recovered = dropped = relogged = 0
        for child in self.tracker.children():
            tags = child.data.tags
            if child.info.status == "RUNNING" or "petra.status" not in tags:
                self.tracker.client.delete_run(child.info.run_id)  # killed mid-log: no result
                dropped += 1
                continue
            key = tags["petra.genome_hash"]
            if key in self.results:
                self.results[key]["id"] = child.info.run_id  # a provisional id, now logged
                continue
            genome = self.space.complete(
                {k: yaml.safe_load(v) for k, v in child.data.params.items() if k in self.space})
            record = {"id": child.info.run_id, "genome": genome,
                      "metrics": dict(child.data.metrics), "status": tags["petra.status"],
                      "generation": int(tags["petra.generation"]), "genome_hash": key}
            self.records.append(record)
            self.results[key] = record
            recovered += 1
        # Finished candidates that MLflow does not hold (killed while logging, or logged
        # nowhere while the store was away) are logged from the journal: never evaluated again.
        for entry in self.journal.entries():
            record = self.results.get(entry["genome_hash"])
            if record is not None and not str(record["id"]).startswith(PENDING):
                continue
            self.recorder.requeue(entry, self.records)
            self.results[entry["genome_hash"]] = next(
                r for r in self.records if r["genome_hash"] == entry["genome_hash"])
            relogged += 1
        self.recorder.flush(self.records)
        self.logged_generations = self.tracker.logged_steps("hypervolume")
        self.done_at_start = len(self.records)
        self.say(f"resuming search run {run_id}: {len(self.records)} candidates done "
                 f"({recovered} recovered from MLflow, {relogged} from the journal, {dropped} "
                 f"unfinished runs dropped), " + (
                     f"generation {self.generation + 1}/{self.cfg.search.generations}"
                     if self.generation < self.cfg.search.generations else
                     f"all {self.cfg.search.generations} generations done (--set "
                     "search.generations=N adds more)"))
        self._checkpoint()
        return self

    def _checkpoint(self) -> None:
        self.recorder.checkpoint({
            "version": 1, "generation": self.generation,
            "strategy": self.strategy.state_dict(), "records": self.records,
            "elapsed_s": self.elapsed(),
        }, self.records)

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    # -- the loop ---------------------------------------------------------------------------
    def executor(self) -> Any:
        """The config's executor, made before any run is: a cluster that cannot run the
        candidates stops the command and leaves no search run behind."""
        e = self.cfg.execution
        return make_executor(e.executor, evaluator_kwargs=Evaluator.options(self.cfg, self.baseline),
                             address=e.address, workers=e.workers,
                             cpus_per_candidate=e.cpus_per_candidate,
                             gpus_per_candidate=e.gpus_per_candidate)

    def run(self, executor: Any, begin: Callable[[], Any]) -> SearchResult:
        """``begin`` (start or attach), then the generations on ``executor``, closed after."""
        try:
            begin()
        except BaseException:
            executor.close()
            raise
        interrupted = False
        try:
            with ctrl_c_noted(self):
                self._generations(executor)
        except KeyboardInterrupt:
            interrupted = True
            self.say("interrupted; logging the front found so far (resume with petra resume)")
        try:
            return self._finish(executor, interrupted)
        finally:
            executor.close()

    def _rung(self) -> Any:
        """This generation's multi-fidelity rung (None when multi-fidelity is off)."""

        mf = self.cfg.search.multi_fidelity
        if not mf.enabled:
            return None
        return rung_for_generation(
            records=self.records, generation=self.generation, epochs=mf.rung_epochs,
            objectives=self.objectives, baseline=self.baseline.metrics,
            constraints=self.cfg.constraints.model_dump(), headroom=mf.headroom)

    def _status(self, *, running: int) -> Any:
        """The progress after the latest result (see petra.tracking.progress)."""

        cfg = self.cfg
        snap = pareto.snapshot(self.records, self.objectives, self.baseline.metrics,
                               self.generation, cfg.constraints.model_dump())
        done = len(self.records)
        # with racing, each generation after the first records its offspring, all screened
        per_generation = self.strategy.offspring
        planned = max(done, cfg.search.population + per_generation * (cfg.search.generations - 1))
        here = done - self.done_at_start
        spent = time.monotonic() - self.started
        best = best_values(self.records, self.objectives, self.baseline.metrics,
                           cfg.constraints.model_dump())
        return Status(
            generation=self.generation, generations=cfg.search.generations, done=done,
            planned=planned, running=running,
            failed=sum(r["status"] == FAILED for r in self.records),
            pruned=sum(r["status"] == PRUNED for r in self.records), elapsed_s=self.elapsed(),
            eta_s=spent / here * (planned - done) if here else None,
            hypervolume=snap.hypervolume, best=best)

    def _over_budget(self) -> bool:
        budget = self.cfg.search.time_budget_s
        return bool(budget) and self.elapsed() > budget

    def _deadline(self) -> float | None:
        """When the time budget runs out, as a :func:`time.monotonic` time (None: no budget)."""
        budget = self.cfg.search.time_budget_s
        return time.monotonic() + budget - self.elapsed() if budget else None

    def _generations(self, executor: LocalExecutor | RayExecutor) -> None:
        from petra.engine.strategies import Told, candidate_seed

        cfg, space, racing = self.cfg, self.space, self.cfg.search.racing
        parallel = getattr(executor, "workers", 1)
        while not self.strategy.done:
            if self.racing:  # as many screened and measured as time affords (a batch stays)
                self.strategy.offspring, keep = screen_count(
                    self.records, cfg.search.population, racing.factor, racing.screen_share,
                    self._deadline(), parallel)
            genomes = self.strategy.ask()
            rung = self._rung()
            jobs: list[Job] = []
            for index, genome in enumerate(genomes):
                key = space.genome_hash(genome)
                if key in self.results or any(j.genome_hash == key for j in jobs):
                    continue  # identical recipes are evaluated once
                jobs.append(Job(index, space.complete(genome), key,
                                candidate_seed(cfg.seed, self.generation, index), rung))
            jobs, screened_out = self._race(executor, jobs, keep) if self.racing else (jobs, [])
            # the screened-out are logged while the workers measure (and fed in between)
            results = executor.run(jobs, deadline=self._deadline(), meanwhile=[
                functools.partial(self._record, job, result, checkpoint=i == len(screened_out))
                for i, (job, result) in enumerate(screened_out, start=1)])
            for finished, (job, result) in enumerate(results, start=1):
                if job.tier0:
                    result.metrics.update(job.tier0)
                    if result.status == COMPLETE:
                        self.calibration.observe(result.genome, job.tier0, result.metrics)
                self._record(job, result)
                self.reporter.update(self._status(running=min(parallel, len(jobs) - finished)))
                if self.ctrl_c:
                    raise KeyboardInterrupt  # one a library swallowed: stop all the same
                if self._over_budget():
                    break
            results.close()  # the candidates still running at the deadline are stopped
            snap = pareto.snapshot(self.records, self.objectives, self.baseline.metrics,
                                   self.generation, cfg.constraints)
            if self.generation not in self.logged_generations:
                self.recorder.generation(self.generation, functools.partial(
                    self._generation_front, self.generation, len(self.records)), self.records)
                self.logged_generations.add(self.generation)
            self.say(generation_line(snap, self._status(running=0)))
            if self._over_budget():
                return self.say(BUDGET_SPENT.format(self.cfg.search.time_budget_s,
                                                    self.tracker.run_id))
            told = []
            constraints = cfg.constraints.model_dump()
            for genome in genomes:
                record = self.results.get(space.genome_hash(genome))
                if record is not None:
                    values = pareto.constrained_values(
                        objective_values(record["status"], record["metrics"], self.objectives),
                        self.objectives,
                        record["metrics"], self.baseline.metrics, constraints)
                    told.append(Told(genome=genome, status=record["status"], values=values))
            self.strategy.tell(told)
            self.generation += 1
            self._checkpoint()

    def _record(self, job: Job, result: Result, *, checkpoint: bool = True) -> None:
        """Make one finished candidate durable (in the journal) and log it; checkpoint the
        search unless told not to (a batch checkpoints once, after its last)."""
        entry = {"genome_hash": job.genome_hash, "generation": self.generation,
                 "index": job.key, "genome": result.genome, "metrics": result.metrics,
                 "status": result.status, "error": result.error, "info": result.info}
        record = self.recorder.record(entry, result.artifact, self.records)
        self.results[job.genome_hash] = record
        if result.artifact:
            self.artifacts[job.genome_hash] = result.artifact
        if checkpoint:
            self._checkpoint()

    def _race(self, executor: LocalExecutor | RayExecutor, jobs: list[Job], keep: int
              ) -> tuple[list[Job], list[tuple[Job, Result]]]:
        """Screen this generation's ``jobs`` at tier 0; returns the ones to measure (at most
        ``keep``; all of them in the first generation: it feeds the calibration) and those
        screened out, with their results, to record."""
        snap = pareto.snapshot(self.records, self.objectives, self.baseline.metrics,
                               self.generation, self.cfg.constraints.model_dump())
        keep = keep if self.generation else len(jobs)
        reference = pareto.reference_point(self.objectives, self.baseline.metrics) \
            if self.cfg.search.racing.select == "hypervolume" else None
        measured, out = race(executor, jobs, self.calibration,
                             [m["metrics"] for m in snap.members], keep, self.objectives,
                             deadline=self._deadline(), reference=reference)
        if out:
            self.say(f"racing: {len(jobs)} screened at tier 0, {len(measured)} to measure")
        return measured, out

    def _generation_front(self, generation: int, count: int) -> tuple[Any, list[Any], Any]:
        """The front after ``generation`` (its first ``count`` records), built when logged."""

        records = self.records[:count]
        snap = pareto.snapshot(records, self.objectives, self.baseline.metrics, generation,
                               self.cfg.constraints)
        return snap, records, self.baseline.metrics

    def _finish(self, executor: LocalExecutor | RayExecutor, interrupted: bool) -> SearchResult:
        b = self.baseline.metrics
        self.recorder.drain(self.records)  # every record has its child run id from here on
        snap = pareto.snapshot(self.records, self.objectives, b,
                               max(self.generation - 1, 0), self.cfg.constraints)
        knee = pareto.knee_point(snap)
        hashes = {r["id"]: r["genome_hash"] for r in self.records}
        artifacts = {i: self.artifacts.get(hashes[i]) or self.journal.artifact(hashes[i])
                     or self.tracker.download(i, "model.petra") for i in snap.ids}
        front_ids = [i for i in snap.ids if artifacts[i]]
        accs = executor.test_accuracy([artifacts[i] for i in front_ids])
        test_acc = dict(zip(front_ids, accs, strict=True))
        for member in snap.members:
            if member["id"] in test_acc:
                member["metrics"]["test_accuracy"] = test_acc[member["id"]]
        self._checkpoint()
        self.recorder.finish(lambda: self.tracker.finish(
            snap, test_accuracy=test_acc, knee=knee, records=self.records, baseline=b,
            status="KILLED" if interrupted else "FINISHED"), self.records)
        self.journal.release()  # what MLflow now holds
        return SearchResult(run_id=self.tracker.run_id, front=snap, knee=knee, baseline=dict(b),
                            records=self.records, test_accuracy=test_acc,
                            interrupted=interrupted, lr_probe=self.lr_probe)
