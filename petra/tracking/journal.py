"""A search's write-ahead journal on local disk: every result lands here first, then in MLflow.

The driver appends each finished candidate — its record and its artifact — to
``runs/journal/<search run id>/`` and flushes it to disk *before* it logs the candidate to
MLflow. A kill between the two, or an MLflow store that is down, then loses nothing:

- while MLflow is unreachable, results wait here (``pending``) and the search goes on; they are
  logged, in order, once it answers again;
- ``petra resume`` reads the journal as well as MLflow: a candidate that finished but was not (or
  not completely) logged is logged from the journal, never evaluated again.

The checkpoint is mirrored here too (``checkpoint.json``, replaced atomically), so it survives
an MLflow outage. A journal is a plain folder: a JSON-lines file (``results.jsonl``) and one
file per artifact. A line cut short by a kill is ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Where journals live unless ``PETRA_JOURNAL`` says otherwise.
DEFAULT_ROOT = Path("runs") / "journal"


def journal_root() -> Path:
    return Path(os.environ.get("PETRA_JOURNAL", DEFAULT_ROOT))


def _fsync_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (a temporary file, fsync, rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Journal:
    """The journal of one search run (see the module docstring)."""

    def __init__(self, run_id: str, root: Path | None = None) -> None:
        self.folder = (root or journal_root()) / run_id
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "artifacts").mkdir(exist_ok=True)
        self.results = self.folder / "results.jsonl"

    # -- writing ----------------------------------------------------------------------------
    def _append(self, line: dict[str, Any]) -> None:
        text = json.dumps(line, default=str, allow_nan=True) + "\n"
        if self.results.exists() and self.results.stat().st_size:
            with open(self.results, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    text = "\n" + text  # a line cut short by a kill ends here
        with open(self.results, "ab") as f:
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())

    def add(self, entry: dict[str, Any], artifact: bytes | None) -> None:
        """Record a finished candidate (``entry["genome_hash"]`` is its key), durably."""
        if artifact:
            _fsync_write(self.artifact_path(entry["genome_hash"]), artifact)
        self._append({"kind": "result", **entry, "has_artifact": bool(artifact)})

    def logged(self, genome_hash: str, run_id: str) -> None:
        """Mark the candidate ``genome_hash`` as logged to MLflow as child run ``run_id``."""
        self._append({"kind": "logged", "genome_hash": genome_hash, "run_id": run_id})

    def release(self) -> int:
        """Delete the artifacts of the candidates logged to MLflow, which holds them (MBs
        each on a real model, for every candidate of every search); returns how many."""
        done = [e["genome_hash"] for e in self.entries() if e.get("run_id")]
        for genome_hash in done:
            self.artifact_path(genome_hash).unlink(missing_ok=True)
        return len(done)

    def save_checkpoint(self, text: str) -> None:
        _fsync_write(self.folder / "checkpoint.json", text.encode())

    # -- reading ----------------------------------------------------------------------------
    def artifact_path(self, genome_hash: str) -> Path:
        return self.folder / "artifacts" / f"{genome_hash}.petra"

    def artifact(self, genome_hash: str) -> bytes | None:
        path = self.artifact_path(genome_hash)
        return path.read_bytes() if path.exists() else None

    def _lines(self) -> Iterator[dict[str, Any]]:
        if not self.results.exists():
            return
        for raw in self.results.read_bytes().splitlines():
            try:
                yield json.loads(raw)
            except ValueError:
                continue  # a line cut short by a kill

    def entries(self) -> list[dict[str, Any]]:
        """Every finished candidate, in the order it finished, with ``run_id`` once logged."""
        by_hash: dict[str, dict[str, Any]] = {}
        for line in self._lines():
            if line.get("kind") == "result":
                entry = {k: v for k, v in line.items() if k != "kind"}
                entry.setdefault("run_id", None)
                by_hash.setdefault(line["genome_hash"], entry)
            elif line.get("kind") == "logged" and line.get("genome_hash") in by_hash:
                by_hash[line["genome_hash"]]["run_id"] = line["run_id"]
        return list(by_hash.values())

    def pending(self) -> list[dict[str, Any]]:
        """The finished candidates not yet logged to MLflow."""
        return [e for e in self.entries() if not e.get("run_id")]

    def checkpoint(self) -> str | None:
        path = self.folder / "checkpoint.json"
        return path.read_text() if path.exists() else None
