"""Executors run candidate evaluations: Ray actors (local cluster or ``address``), or in-process.

Each Ray worker is an actor holding one warm :class:`petra.evaluate.Evaluator` (task, baseline
weights, baseline ONNX Runtime session), so torch is imported and the baseline loaded once per
worker, not once per candidate. Workers receive plain genome dicts and return plain
:class:`Result` objects; only the driver talks to MLflow.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from petra.evaluate import FAILED, Evaluator, Result

# Ray 2.60 binds to the machine's network address and turns on token auth unless told
# otherwise; with these every listener is on 127.0.0.1 (see STACK.md). Usage stats are off so
# nothing is sent anywhere.
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


@dataclass(frozen=True)
class Job:
    """One evaluation to run: a genome with its hash, seed and a caller-chosen key."""

    key: Any
    genome: dict[str, Any]
    genome_hash: str
    seed: int


class LocalExecutor:
    """Evaluates candidates one by one in this process (for debugging and exact resume tests)."""

    kind = "local"

    def __init__(self, *, evaluator_kwargs: Mapping[str, Any]) -> None:
        self._evaluator = Evaluator(**evaluator_kwargs)

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, Result]]:
        for job in jobs:
            yield job, self._evaluator.evaluate(job.genome, genome_hash=job.genome_hash,
                                                seed=job.seed)

    def test_accuracy(self, artifacts: list[bytes]) -> list[float]:
        return [self._evaluator.test_accuracy(a) for a in artifacts]

    def close(self) -> None:
        pass


class _Worker:
    """The Ray actor body: one warm Evaluator."""

    def __init__(self, **kwargs: Any) -> None:
        self._evaluator = Evaluator(**kwargs)

    def evaluate(self, genome: dict[str, Any], genome_hash: str, seed: int) -> Result:
        return self._evaluator.evaluate(genome, genome_hash=genome_hash, seed=seed)

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
    """

    kind = "ray"

    def __init__(
        self, *, evaluator_kwargs: Mapping[str, Any], address: str | None = None,
        workers: int = 2, cpus_per_candidate: int = 1,
    ) -> None:
        for key, value in LOOPBACK_ENV.items():
            os.environ.setdefault(key, value)
        import ray

        self._ray = ray
        self._owns_cluster = False
        if not ray.is_initialized():
            if address:
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
        kwargs = dict(evaluator_kwargs)
        kwargs["threads"] = cpus_per_candidate
        self._kwargs = {
            k: ray.put(v) if isinstance(v, bytes) and len(v) > 100_000 else v
            for k, v in kwargs.items()
        }
        self._actor_cls = ray.remote(num_cpus=cpus_per_candidate)(_Worker)
        # On a local cluster each single-threaded actor gets a core of its own, so that its
        # interleaved latency measurements do not share a core with another actor's.
        self._pin = self._owns_cluster and cpus_per_candidate == 1
        self._cores: dict[Any, int | None] = {}
        self._actors = [self._new_actor(i) for i in range(workers)]

    def _new_actor(self, core: int) -> Any:
        actor = self._actor_cls.remote(**self._kwargs, core=core if self._pin else None)
        self._cores[actor] = core
        return actor

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, Result]]:
        """Yield ``(job, result)`` as results complete. A dead worker fails its job, and is
        replaced."""
        ray = self._ray
        queue = deque(jobs)
        idle = list(self._actors)
        pending: dict[Any, tuple[Job, Any]] = {}
        while queue or pending:
            while queue and idle:
                actor, job = idle.pop(), queue.popleft()
                ref = actor.evaluate.remote(job.genome, job.genome_hash, job.seed)
                pending[ref] = (job, actor)
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job, actor = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    result = _failed(job, f"worker died: {exc}")
                    self._actors.remove(actor)
                    actor = self._new_actor(self._cores.pop(actor))
                    self._actors.append(actor)
                except ray.exceptions.RayError as exc:
                    result = _failed(job, f"{type(exc).__name__}: {exc}")
                idle.append(actor)
                yield job, result

    def test_accuracy(self, artifacts: list[bytes]) -> list[float]:
        refs = [
            self._actors[i % len(self._actors)].test_accuracy.remote(a)
            for i, a in enumerate(artifacts)
        ]
        return [float(x) for x in self._ray.get(refs)]

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        if self._owns_cluster:
            self._ray.shutdown()


def _failed(job: Job, error: str) -> Result:
    return Result(genome=job.genome, genome_hash=job.genome_hash, status=FAILED, error=error)


def make_executor(
    kind: str, *, evaluator_kwargs: Mapping[str, Any], address: str | None = None,
    workers: int = 2, cpus_per_candidate: int = 1,
) -> LocalExecutor | RayExecutor:
    """The executor named by ``execution.executor`` (``ray`` or ``local``)."""
    if kind == "local":
        kwargs = {**evaluator_kwargs, "threads": cpus_per_candidate}
        return LocalExecutor(evaluator_kwargs=kwargs)
    if kind == "ray":
        return RayExecutor(evaluator_kwargs=evaluator_kwargs, address=address, workers=workers,
                           cpus_per_candidate=cpus_per_candidate)
    raise ValueError(f"unknown executor {kind!r}; choose from ray, local")
