"""Results made durable: the journal first, then MLflow, with buffering while MLflow is away.

:class:`Recorder` stands between the search loop and :class:`petra.tracking.store.Tracker`. Each
finished candidate is written to the search's :class:`petra.tracking.journal.Journal` before anything
is sent to MLflow. Logging then goes through :meth:`Recorder._attempt`: an error that says the
store is unreachable or busy (a stopped server, a locked sqlite file) leaves the result pending,
and the search goes on; pending results, generation metrics and the checkpoint are sent, in
order, at the next opportunity. :meth:`Recorder.drain` waits for the store at the end of a search,
up to :data:`DRAIN_TIMEOUT_S`, and otherwise says how to resume.

A record logged late keeps a provisional id (``pending:<genome hash>``) until its child run
exists; :meth:`flush` then rewrites it in place, so fronts and checkpoints name real runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from petra.candidate.evaluate import Result
from petra.tracking.store import transient_errors

if TYPE_CHECKING:
    from petra.tracking.journal import Journal
    from petra.tracking.store import Tracker


#: How long the end of a search waits for an unreachable store before giving up.
DRAIN_TIMEOUT_S = 600.0
PENDING = "pending:"


class StoreUnavailable(RuntimeError):
    """The MLflow store stayed unreachable; everything is in the journal."""


class Recorder:
    """Durable, buffered logging of one search (see the module docstring)."""

    def __init__(self, tracker: Tracker, journal: Journal, *, executor: str,
                 say: Callable[[str], None]) -> None:
        self.tracker = tracker
        self.journal = journal
        self.executor = executor
        self.say = say
        self.pending: list[dict[str, Any]] = []  # journal entries waiting for MLflow
        self.generations: dict[int, Callable[[], tuple[Any, list[Any], Mapping[str, float]]]] = {}
        self.checkpoint_text: str | None = None
        self.checkpoint_sent = True
        self.offline_since: float | None = None
        self._errors = transient_errors()

    # -- the store, tried once --------------------------------------------------------------
    def _attempt(self, fn: Callable[[], Any]) -> tuple[bool, Any]:
        try:
            value = fn()
        except self._errors as exc:
            if self.offline_since is None:
                self.offline_since = time.monotonic()
                said = " ".join(str(exc).split())  # urllib3's reason follows a line break
                self.say(f"MLflow store unreachable ({type(exc).__name__}: "
                         f"{said[:400]}); results are "
                         f"kept in {self.journal.folder} and logged when it answers")
            return False, None
        if self.offline_since is not None:
            self.say(f"MLflow store back after {time.monotonic() - self.offline_since:.0f} s")
            self.offline_since = None
        return True, value

    # -- results ----------------------------------------------------------------------------
    def record(self, entry: dict[str, Any], artifact: bytes | None,
               records: list[dict[str, Any]]) -> dict[str, Any]:
        """Make a finished candidate durable and log it (or queue it); returns its record.

        Args:
            entry: ``genome_hash``, ``generation``, ``index``, ``genome``, ``metrics``,
                ``status``, ``error`` and ``info`` of the result.
            artifact: the candidate's artifact, if any.
            records: the search's records; the new record is appended, and records logged
                late are rewritten in place with their child run's id.
        """
        self.journal.add(entry, artifact)
        record = {"id": PENDING + entry["genome_hash"], "genome": entry["genome"],
                  "metrics": entry["metrics"], "status": entry["status"],
                  "generation": entry["generation"], "genome_hash": entry["genome_hash"]}
        records.append(record)
        self.pending.append(entry)
        self.flush(records)
        return record

    def requeue(self, entry: dict[str, Any], records: list[dict[str, Any]]) -> None:
        """Queue a journal entry (already durable) for logging, adding its record if missing
        (for resume)."""
        if not any(r["genome_hash"] == entry["genome_hash"] for r in records):
            records.append({"id": PENDING + entry["genome_hash"], "genome": entry["genome"],
                            "metrics": entry["metrics"], "status": entry["status"],
                            "generation": entry["generation"],
                            "genome_hash": entry["genome_hash"]})
        if all(e["genome_hash"] != entry["genome_hash"] for e in self.pending):
            self.pending.append(entry)

    def flush(self, records: list[dict[str, Any]]) -> bool:
        """Send what waits, in order: results, then generations, then the checkpoint.
        Returns whether nothing is left waiting."""
        by_hash = {r["genome_hash"]: r for r in records}
        while self.pending:
            entry = self.pending[0]
            ok, child = self._attempt(lambda e=entry: self._log(e))
            if not ok:
                return False
            self.journal.logged(entry["genome_hash"], child)
            record = by_hash.get(entry["genome_hash"])
            if record is not None:
                record["id"] = child
            self.pending.pop(0)
        for generation in sorted(self.generations):
            snap, recs, baseline = self.generations[generation]()  # built now: real run ids
            ok, _ = self._attempt(lambda s=snap, r=recs, b=baseline:
                                  self.tracker.log_generation(s, r, b))
            if not ok:
                return False
            del self.generations[generation]
        if not self.checkpoint_sent and self.checkpoint_text is not None:
            ok, _ = self._attempt(lambda: self.tracker.checkpoint(self.checkpoint_text,
                                                                  "checkpoint.json"))
            if not ok:
                return False
            self.checkpoint_sent = True
        return True

    def _log(self, entry: dict[str, Any]) -> str:
        result = Result(genome=entry["genome"], genome_hash=entry["genome_hash"],
                        status=entry["status"], metrics=dict(entry["metrics"]),
                        error=entry.get("error"),
                        artifact=self.journal.artifact(entry["genome_hash"]),
                        info=dict(entry.get("info") or {}))
        return self.tracker.log_candidate(result, generation=entry["generation"],
                                          index=entry["index"], executor=self.executor)

    # -- generations and checkpoints ---------------------------------------------------------
    def generation(self, generation: int,
                   build: Callable[[], tuple[Any, list[Any], Mapping[str, float]]],
                   records: list[dict[str, Any]]) -> None:
        """Log a generation's metrics and front (later, if the store is away). ``build`` makes
        ``(snapshot, records, baseline)`` when it is sent, so late runs have their real ids."""
        self.generations[generation] = build
        self.flush(records)

    def checkpoint(self, state: Mapping[str, Any], records: list[dict[str, Any]]) -> None:
        """Write the checkpoint to the journal (always) and to MLflow (when it answers)."""
        self.checkpoint_text = json.dumps(state, default=str)
        self.journal.save_checkpoint(self.checkpoint_text)
        self.checkpoint_sent = False
        self.flush(records)

    def drain(self, records: list[dict[str, Any]], *, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Wait until everything waiting is logged, up to ``timeout_s``.

        Raises:
            StoreUnavailable: the store did not answer in time (the journal keeps everything).
        """
        deadline = time.monotonic() + timeout_s
        delay = 1.0
        while not self.flush(records):
            if time.monotonic() > deadline:
                raise StoreUnavailable(
                    f"the MLflow store {self.tracker.uri} did not answer for {timeout_s:.0f} s; "
                    f"{len(self.pending)} results wait in {self.journal.folder}. When it is "
                    f"back, run: petra resume {self.tracker.run_id}")
            time.sleep(delay)
            delay = min(delay * 1.5, 15.0)

    def finish(self, fn: Callable[[], Any], records: list[dict[str, Any]],
               *, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Run the search's last logging step ``fn`` once the store answers."""
        self.drain(records, timeout_s=timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            ok, _ = self._attempt(fn)
            if ok:
                return
            if time.monotonic() > deadline:
                raise StoreUnavailable(
                    f"the MLflow store {self.tracker.uri} did not answer for {timeout_s:.0f} s "
                    f"at the end of the search; run: petra resume {self.tracker.run_id}")
            time.sleep(2.0)
