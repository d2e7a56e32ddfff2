"""Real models: the default search of each task the models users bring resemble.

For each task (by default text_bert, digits_vit, digits_mobilenet, events_lstm), the default
``petra search search_spaces/<task>.yaml`` runs through the CLI, and its search run is read back
from MLflow. Recorded per task:

- the candidates by status (complete, failed, pruned by multi-fidelity) and every failure's
  error; the share that completed or were pruned (not failed);
- the operating points picked on *validation* accuracy (never on test): among final front
  members within 1 point of the baseline's validation accuracy, the smallest-size member and
  the lowest-latency member, each one model with its size, latency, validation and test
  accuracy;
- the goals of the real-models issue: a member within 1 point at size <= 0.30, and one at
  latency <= 0.50;
- the wall time (of the whole command, or the search run's span in MLflow), the search run id
  and the commit that was HEAD when the search started.

    .venv/bin/python benchmarks/real_models.py [--tasks text_bert ...]
    .venv/bin/python benchmarks/real_models.py --runs text_bert=RUN_ID ...   # searches already run

Writes benchmarks/results/real_models.json, with the commit, the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TASKS = ("text_bert", "digits_vit", "digits_mobilenet", "events_lstm")
URI = f"sqlite:///{ROOT / 'runs' / 'mlflow.db'}"
GOALS = {"size_ratio": 0.30, "latency_ratio": 0.50}
WITHIN = 0.01


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor()) \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def run_search(task: str) -> tuple[str, float]:
    import re

    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "petra.cli", "search",
                           str(ROOT / "search_spaces" / f"{task}.yaml"),
                           "--set", f"tracking.uri={URI}"],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{task}: petra search failed:\n{proc.stderr[-3000:]}")
    return re.search(r"search run: (\w+)", proc.stdout).group(1), time.perf_counter() - started


def summarize(task: str, run_id: str, wall_s: float | None) -> dict:
    from mlflow.tracking import MlflowClient

    from petra.tracking.runs import open_search

    search = open_search(URI, run_id)
    client = MlflowClient(URI)
    parent = client.get_run(run_id)
    started = parent.info.start_time / 1000
    commit = git("rev-list", "-1", f"--before={int(started)}", "HEAD")
    if wall_s is None and parent.info.end_time:  # the search run's own span in MLflow
        wall_s = (parent.info.end_time - parent.info.start_time) / 1000
    records = search.records
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    failures = [r.get("error") for r in records if r["status"] == "failed"]
    base = search.baseline
    floor = base["val_accuracy"] - WITHIN
    members = [m for m in search.front().members
               if m["metrics"].get("val_accuracy", -1) >= floor]

    def point(key: str) -> dict | None:
        if not members:
            return None
        best = min(members, key=lambda m: m["metrics"][key])
        m = best["metrics"]
        return {"run": best["id"], "size_ratio": m["size_ratio"],
                "latency_ratio": m["latency_ratio"], "val_accuracy": m["val_accuracy"],
                "test_accuracy": m.get("test_accuracy"),
                "test_drop": (base["test_accuracy"] - m["test_accuracy"]
                              if m.get("test_accuracy") is not None else None)}

    smallest, fastest = point("size_ratio"), point("latency_ratio")
    total = len(records)
    return {
        "run_id": run_id, "commit_at_start": commit, "wall_s": wall_s,
        "baseline": {k: base[k] for k in ("val_accuracy", "test_accuracy", "artifact_bytes",
                                          "latency_ms") if k in base},
        "candidates": total, "statuses": statuses,
        "not_failed_share": (total - len(failures)) / total if total else None,
        "failures": failures,
        "smallest_within_1pt": smallest, "fastest_within_1pt": fastest,
        "goals": {
            "size_le_0.30": bool(smallest and smallest["size_ratio"] <= GOALS["size_ratio"]),
            "latency_le_0.50": bool(fastest and fastest["latency_ratio"]
                                    <= GOALS["latency_ratio"]),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--runs", nargs="+", default=[], metavar="TASK=RUN_ID",
                        help="summarize searches already run (in runs/mlflow.db)")
    parser.add_argument("--out", default=str(RESULTS / "real_models.json"))
    args = parser.parse_args()
    runs = dict(item.split("=", 1) for item in args.runs)
    results = {}
    for task in (list(runs) or args.tasks):
        run_id, wall = (runs[task], None) if task in runs else run_search(task)
        results[task] = summarize(task, run_id, wall)
        print(json.dumps({task: results[task]}, indent=1), flush=True)
    payload = {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain")),
               "machine": machine(), "command": " ".join([sys.executable, *sys.argv]),
               "within_points": WITHIN * 100, "goals": GOALS, "tasks": results}
    Path(args.out).write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
