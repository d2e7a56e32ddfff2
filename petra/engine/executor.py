"""Executors run candidate evaluations: Ray actors (local cluster or ``address``), or in-process.

Each Ray worker is an actor holding one warm :class:`petra.candidate.evaluate.Evaluator` (task, baseline
weights, baseline ONNX Runtime session), so torch is imported and the baseline loaded once per
worker, not once per candidate. Workers receive plain genome dicts and return plain
:class:`Result` objects; only the driver talks to MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from petra.candidate.device import check_providers
from petra.candidate.evaluate import Evaluator, Result
from petra.engine.fidelity import Rung
from petra.errors import FAILED, ConfigError

# Ray 2.60 binds to the machine's network address and turns on token auth unless told
# otherwise; with these every listener is on 127.0.0.1 (see STACK.md). Usage stats are off so
# nothing is sent anywhere.
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


#: How many times a candidate whose Ray worker died is run again on a fresh worker.
WORKER_RETRIES = 1


@dataclass(frozen=True)
class Job:
    """One evaluation to run: a genome with its hash, seed, a caller-chosen key and its rung;
    ``tier`` 0 screens it (:meth:`Evaluator.screen`), 2 measures it in full."""

    key: Any
    genome: dict[str, Any]
    genome_hash: str
    seed: int
    rung: Rung | None = None
    tier: int = 2
    tier0: Mapping[str, float] | None = None  # the reading that let it through racing


def _run(evaluator: Evaluator, genome: dict[str, Any], genome_hash: str, seed: int,
         rung: Rung | None, tier: int) -> Result:
    """One job on ``evaluator``, with its wall-clock start and end (``started_at``,
    ``ended_at``: the child run's real times) and the process that ran it (``worker_pid``, a
    screen's too)."""
    started = time.time()
    if tier == 0:
        result = evaluator.screen(genome, genome_hash=genome_hash, seed=seed)
    else:
        result = evaluator.evaluate(genome, genome_hash=genome_hash, seed=seed, rung=rung)
    result.info.update(started_at=started, ended_at=time.time(), worker_pid=os.getpid())
    return result


class LocalExecutor:
    """Evaluates candidates one by one in this process (for debugging and exact resume tests)."""

    kind = "local"
    workers = 1

    def __init__(self, *, evaluator_kwargs: Mapping[str, Any]) -> None:
        self._evaluator = Evaluator(**evaluator_kwargs)

    def run(self, jobs: Iterable[Job], deadline: float | None = None,
            meanwhile: Iterable[Callable[[], Any]] = ()) -> Iterator[tuple[Job, Result]]:
        """Run the ``meanwhile`` tasks, then yield ``(job, result)`` one by one; none is started
        after ``deadline`` (a :func:`time.monotonic` time): an evaluation in this process cannot
        be stopped."""
        for task in meanwhile:
            task()
        return self._results(jobs, deadline)

    def _results(self, jobs: Iterable[Job], deadline: float | None
                 ) -> Iterator[tuple[Job, Result]]:
        for job in jobs:
            if _past(deadline):
                return
            yield job, _run(self._evaluator, job.genome, job.genome_hash, job.seed, job.rung,
                            job.tier)

    def test_accuracy(self, artifacts: list[bytes]) -> list[float]:
        return [self._evaluator.test_accuracy(a) for a in artifacts]

    def close(self) -> None:
        pass


class _Worker:
    """The Ray actor body: one warm Evaluator."""

    def __init__(self, **kwargs: Any) -> None:
        self._evaluator = Evaluator(**kwargs)

    def evaluate(
        self, genome: dict[str, Any], genome_hash: str, seed: int, rung: Rung | None,
        tier: int = 2,
    ) -> Result:
        return _run(self._evaluator, genome, genome_hash, seed, rung, tier)

    def test_accuracy(self, artifact: bytes) -> float:
        return self._evaluator.test_accuracy(artifact)


class RayExecutor:
    """Evaluates candidates in parallel on Ray actors.

    Args:
        evaluator_kwargs: passed to each worker's :class:`Evaluator`; large byte values (the
            baseline) travel once through the object store.
        address: ``host:port`` of an existing cluster, or None to start a local one on
            127.0.0.1 with ``workers * cpus_per_candidate`` CPUs.
        workers: number of actors.
        cpus_per_candidate: CPUs reserved per actor, and its torch / ONNX Runtime threads.
        gpus_per_candidate: GPUs reserved per actor (Ray's ``num_gpus``; a fraction shares one).
            The cluster must hold ``workers * gpus_per_candidate`` of them.
    """

    kind = "ray"

    def __init__(
        self, *, evaluator_kwargs: Mapping[str, Any], address: str | None = None,
        workers: int = 2, cpus_per_candidate: int = 1, gpus_per_candidate: float = 0.0,
    ) -> None:
        for key, value in LOOPBACK_ENV.items():
            os.environ.setdefault(key, value)
        import ray

        self._ray = ray
        self._owns_cluster = False
        self._directory = None
        if not ray.is_initialized():
            if address:
                _check_address(address)
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            else:
                # address="local": always a new cluster of petra's own, never one that
                # happens to be running (or whose stale address file lingers in /tmp/ray).
                ray.init(
                    address="local", num_cpus=workers * cpus_per_candidate,
                    include_dashboard=False,
                    log_to_driver=False, logging_level=logging.WARNING,
                    object_store_memory=256 * 1024**2,
                )
                self._owns_cluster = True
        try:
            _check_gpus(ray, workers, gpus_per_candidate)
            _check_cpus(ray, cpus_per_candidate)
        except ConfigError:
            if self._owns_cluster:
                ray.shutdown()
            raise
        kwargs = dict(evaluator_kwargs)
        kwargs["threads"] = cpus_per_candidate
        from petra.compress.layer_cache import Directory

        # the workers' sorted scores (shared through the object store, none with a zero
        # layer_cache_mb) and layer latency times, on no CPU of its own
        self._directory = ray.remote(num_cpus=0)(Directory).remote(
            kwargs.get("layer_cache_mb", 256.0))
        kwargs["layer_cache"] = self._directory
        # Ray shows a worker only the GPUs it reserved: ``auto`` means CUDA exactly when it
        # reserved some.
        if kwargs.get("device", "auto") == "auto":
            kwargs["device"] = "cuda" if gpus_per_candidate else "cpu"
        self._kwargs = {
            k: ray.put(v) if isinstance(v, bytes) and len(v) > 100_000 else v
            for k, v in kwargs.items()
        }
        self._actor_cls = ray.remote(num_cpus=cpus_per_candidate,
                                     num_gpus=gpus_per_candidate)(_Worker)
        # On a local cluster each single-threaded actor gets a core of its own, so that its
        # interleaved latency measurements do not share a core with another actor's.
        self.workers = workers
        self._pin = self._owns_cluster and cpus_per_candidate == 1
        self._cores: dict[Any, int | None] = {}
        self._actors = [self._new_actor(i) for i in range(workers)]

    def _new_actor(self, core: int) -> Any:
        actor = self._actor_cls.remote(**self._kwargs, core=core if self._pin else None)
        self._cores[actor] = core
        return actor

    def run(self, jobs: Iterable[Job], deadline: float | None = None,
            meanwhile: Iterable[Callable[[], Any]] = ()) -> Iterator[tuple[Job, Result]]:
        """``(job, result)`` pairs, as results complete.

        The first jobs go to the workers at this call. The caller's ``meanwhile`` tasks (logging
        what racing screened out) then run here, while the workers evaluate; after each, a
        worker that has finished is given its next job, so that none waits on them (at 240
        screened-out candidates, ~7 s of logging, each worker waited 1-3 s per generation
        before). Otherwise a worker that finishes is given its next job before its result is
        yielded. A job whose worker dies is run again on a fresh worker,
        :data:`WORKER_RETRIES` times, then failed; the dead worker is replaced either way.

        At ``deadline`` (a :func:`time.monotonic` time), or when the caller closes the iterator,
        nothing more is started and the workers still evaluating are killed and replaced by
        fresh ones, so that nothing left running delays what the caller asks next (the front's
        test accuracy). Those jobs are not yielded.
        """
        queue = deque(jobs)
        idle = list(self._actors)
        pending: dict[Any, tuple[Job, Any]] = {}
        attempts: dict[int, int] = {}

        def dispatch() -> None:
            while queue and idle and not _past(deadline):
                actor, job = idle.pop(), queue.popleft()
                ref = actor.evaluate.remote(job.genome, job.genome_hash, job.seed, job.rung,
                                            job.tier)
                pending[ref] = (job, actor)

        def stop() -> None:
            while pending:
                self._replace(pending.popitem()[1][1])

        early: deque[tuple[Job, Result]] = deque()  # finished while ``meanwhile`` ran

        def results() -> Iterator[tuple[Job, Result]]:
            try:
                while early:
                    yield early.popleft()
                yield from self._collect(pending, queue, idle, attempts, dispatch, deadline)
            finally:
                stop()

        dispatch()
        try:
            for task in meanwhile:
                task()
                early.extend(self._collect(pending, queue, idle, attempts, dispatch, deadline,
                                           wait=False))
        except BaseException:
            stop()
            raise
        return _Results(results(), stop)

    def _collect(self, pending: dict[Any, tuple[Job, Any]], queue: deque[Job], idle: list[Any],
                 attempts: dict[int, int], dispatch: Any, deadline: float | None,
                 wait: bool = True) -> Iterator[tuple[Job, Result]]:
        """The results of :meth:`run` as they complete, until none is pending or ``deadline``
        (without ``wait``: those complete already)."""
        ray = self._ray
        while pending:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout if wait else 0)
            if not ready:  # the deadline passed (run() replaces the workers still busy),
                return  # or, without ``wait``, nothing more is complete
            job, actor = pending.pop(ready[0])
            tries = attempts.get(id(job), 0) + 1
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                actor = self._replace(actor)
                if tries <= WORKER_RETRIES:
                    attempts[id(job)] = tries
                    queue.appendleft(job)
                    idle.append(actor)
                    dispatch()
                    continue
                result = _failed(job, f"worker died {tries} times running this candidate "
                                      f"(last: {_brief(exc)})")
            except ray.exceptions.RayError as exc:
                result = _failed(job, f"{type(exc).__name__}: {_brief(exc)}")
            result.info["attempts"] = tries
            idle.append(actor)
            dispatch()
            yield job, result

    def _replace(self, actor: Any) -> Any:
        """A fresh worker, on the same core, in place of one that died or is killed."""
        self._actors.remove(actor)
        with contextlib.suppress(Exception):
            self._ray.kill(actor)
        fresh = self._new_actor(self._cores.pop(actor))
        self._actors.append(fresh)
        return fresh

    def test_accuracy(self, artifacts: list[bytes]) -> list[float]:
        refs = [
            self._actors[i % len(self._actors)].test_accuracy.remote(a)
            for i, a in enumerate(artifacts)
        ]
        return [float(x) for x in self._ray.get(refs)]

    def close(self) -> None:
        for actor in [*self._actors, *([self._directory] if self._directory else [])]:
            self._ray.kill(actor)
        self._actors, self._directory = [], None
        if self._owns_cluster:
            self._ray.shutdown()


class _Results:
    """The iterator :meth:`RayExecutor.run` returns: its ``close`` stops the workers still
    evaluating even when iteration never began (a generator's own ``close`` would not)."""

    def __init__(self, results: Iterator[tuple[Job, Result]], stop: Any) -> None:
        self._results, self._stop = results, stop

    def __iter__(self) -> _Results:
        return self

    def __next__(self) -> tuple[Job, Result]:
        return next(self._results)

    def close(self) -> None:
        self._results.close()
        self._stop()


def _check_gpus(ray: Any, workers: int, gpus_per_candidate: float) -> None:
    """Fail at once, not wait forever, when the cluster cannot place every GPU worker."""
    have = float(ray.cluster_resources().get("GPU", 0.0)) if gpus_per_candidate else 0.0
    need = workers * gpus_per_candidate
    if have < need:
        raise ConfigError(
            "execution.gpus_per_candidate", gpus_per_candidate,
            f"needs workers * gpus_per_candidate = {need:g} GPUs and this Ray cluster has "
            f"{have:g}; lower it (0 runs on CPUs) or the number of workers")


def _check_cpus(ray: Any, cpus_per_candidate: int) -> None:
    """Fail at once, not wait forever with no word, where no node of the cluster has the CPUs
    one worker reserves."""
    nodes = [float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]
    if nodes and max(nodes) < cpus_per_candidate:
        raise ConfigError(
            "execution.cpus_per_candidate", cpus_per_candidate,
            f"each worker reserves {cpus_per_candidate} CPUs on one node, and this Ray "
            f"cluster's largest node has {max(nodes):g}; lower it")


def _check_address(address: str) -> None:
    """Fail at once where nothing listens at a ``host:port`` address: Ray retried for
    minutes, printing its own warnings, until Ctrl-C."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", or a form Ray reads its own way
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigError("execution.address", address, "", (
            f"no Ray cluster answers at {address} ({exc.strerror or type(exc).__name__}); "
            "start one (ray start --head, see docs/ray.md), or leave execution.address out "
            "for a local cluster of petra's own")) from None


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _brief(exc: BaseException, limit: int = 500) -> str:
    """The first line of an error, shortened."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def _failed(job: Job, error: str) -> Result:
    return Result(genome=job.genome, genome_hash=job.genome_hash, status=FAILED, error=error)


def make_executor(
    kind: str, *, evaluator_kwargs: Mapping[str, Any], address: str | None = None,
    workers: int = 2, cpus_per_candidate: int = 1, gpus_per_candidate: float = 0.0,
) -> LocalExecutor | RayExecutor:
    """The executor named by ``execution.executor`` (``ray`` or ``local``)."""
    if kind == "ray" and evaluator_kwargs.get("device") == "cuda" and not gpus_per_candidate:
        raise ConfigError("execution.device", "cuda",
                          "needs execution.gpus_per_candidate > 0 under the ray executor (Ray "
                          "shows a worker only the GPUs it reserves)")
    if kind == "ray" and address is None and "providers" in evaluator_kwargs:
        check_providers(evaluator_kwargs["providers"])  # the workers share this machine
    if kind == "local":
        kwargs = {**evaluator_kwargs, "threads": cpus_per_candidate}
        return LocalExecutor(evaluator_kwargs=kwargs)
    if kind == "ray":
        return RayExecutor(evaluator_kwargs=evaluator_kwargs, address=address, workers=workers,
                           cpus_per_candidate=cpus_per_candidate,
                           gpus_per_candidate=gpus_per_candidate)
    raise ValueError(f"unknown executor {kind!r}; choose from ray, local")
