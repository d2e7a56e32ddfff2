"""Where a benchmark's figures come from: the commit (and whether the tree was dirty), the date,
the machine, the versions of the stack and the exact command. Every results file carries it.

    from provenance import provenance, same_commit
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "onnxruntime", "ray", "mlflow", "deap", "optuna", "petra")


def _git(*args: str, where: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=where, capture_output=True,
                          text=True).stdout.strip()


def petra_source() -> Path:
    """The checkout whose ``petra`` this process imports: with an editable install, that can be
    another clone than the one holding these scripts."""
    import petra

    return Path(petra.__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """This run's provenance. ``dirty`` is whether tracked files differed from the commit, in
    the scripts' checkout or in the one petra is imported from, or whether those two checkouts
    are at different commits."""
    source = petra_source()
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    if source != ROOT:
        dirty = dirty or _git("rev-parse", "--short", "HEAD", where=source) != commit or bool(
            _git("status", "--porcelain", "--untracked-files=no", where=source))
    return {
        "commit": commit,
        "dirty": dirty,
        "petra_source": str(source),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"node": platform.node(), "cpu": cpu_model(), "cores": os.cpu_count(),
                    "usable_cores": len(os.sched_getaffinity(0)),
                    "python": platform.python_version()},
        "versions": versions(),
        "command": " ".join(["python", *(sys.argv if argv is None else argv)]),
    }


def same_commit(results: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    """The one clean commit that every results file in ``results`` (named ``names``) came from;
    raises ``SystemExit`` naming the files otherwise, so that runs of different code are
    never merged into one table."""
    seen: dict[str, list[str]] = {}
    for data, name in zip(results, names, strict=True):
        prov = data.get("provenance") or {}
        commit = prov.get("commit") or "unknown"
        if prov.get("dirty", True):
            commit += " (dirty or unrecorded)"
        seen.setdefault(commit, []).append(name)
    if len(seen) != 1 or next(iter(seen)).endswith(")") or "unknown" in seen:
        detail = "; ".join(f"{c}: {', '.join(n)}" for c, n in seen.items())
        raise SystemExit(f"refusing to merge results of different or unknown code: {detail}")
    return next(iter(seen))
