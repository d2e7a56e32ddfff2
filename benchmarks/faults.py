"""Reliability under faults, measured: kills, dead workers, bad candidates, an MLflow outage,
two searches at once, and what listens where.

Each scenario runs real components (local or `ray start` clusters, sqlite stores, a real
`mlflow server` on 127.0.0.1) and writes what it saw to benchmarks/results/faults.json:

- ``driver_killed``: a search SIGKILLed at random points (after a random number of finished
  candidates, plus a random delay, so kills land in evaluations, in logging and in
  checkpoints), each followed by `petra resume`, until it completes. Counted from the journal
  (one line per finished evaluation) and the store: candidates evaluated again, lost, and
  logged twice; and whether the front equals an uninterrupted run's with the same seed
  (in-process executor; accuracy and bytes, which are deterministic).
- ``worker_killed``: a search on 2 Ray workers; one worker is SIGKILLed mid-candidate.
- ``candidate_faults``: a search over a task whose model raises, returns NaN, allocates past
  ``execution.memory_limit_mb``, or kills its worker (always, or once) for some genomes.
- ``mlflow_down``: a search logging to a real `mlflow server`, which is stopped for 30 s and
  restarted mid-search.
- ``concurrent``: two searches at once into one sqlite store and one `ray start` cluster.
- ``exposure``: every TCP listener of the Ray and MLflow processes these scenarios started.

    .venv/bin/python benchmarks/faults.py [--kills 10] [--outage-s 30] [--only NAME ...]

tests/test_faults.py runs the same scenarios, smaller.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the faulty task lives in tests/
TINY = {"name": "digits_cnn", "params": {"width": 8, "epochs": 6, "lr": 5e-3}}
FAULTY = "tests.faulty_task:faulty_mlp"
LOOPBACK = ("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
       "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).strip(
           os.pathsep)}
SEEN_PIDS: set[int] = set()  # every server process started here, for the exposure check


# -- helpers ------------------------------------------------------------------------------------
def interruptible() -> None:
    """Run in a child before its exec (``preexec_fn``): SIGINT back to its default. A job that a
    script starts in the background (CI's) inherits SIGINT ignored, and a `ray start --block`
    head that ignores it only stops on SIGTERM, which waits ~33 s once a driver ran actors."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def ray_head(log: Path, *, cpus: int = 2, start_s: float = 120) -> Iterator[str]:
    """`ray start --head --block` on 127.0.0.1 for the ``with`` body; yields its address once
    its port listens. It runs in its own process group and is stopped as ctrl-c stops it
    (SIGINT: about 2 s, where SIGTERM took 33 s once a driver had run actors on it), killed if
    it has not gone in 60 s. `ray stop` is not used: it stops every Ray cluster on the machine.
    """
    from petra.tracking.ui import free_port, port_free

    port = free_port()
    with open(log, "w") as sink:
        head = subprocess.Popen(
            [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
             "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={cpus}",
             "--include-dashboard=false", "--disable-usage-stats"],
            env=ENV, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=interruptible)
        SEEN_PIDS.add(head.pid)
        try:
            deadline = time.monotonic() + start_s
            while port_free(port):  # until the head listens on it
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Ray head did not start in {start_s:.0f} s: "
                                       f"{log.read_text()[-2000:]}")
                time.sleep(0.5)
            yield f"127.0.0.1:{port}"
        finally:
            os.killpg(head.pid, signal.SIGINT)
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait(timeout=30)


def write_config(folder: Path, name: str, **sections: Any) -> Path:
    config = {
        "name": name, "seed": 5, "task": TINY,
        "space": {"pruning": ["none", "magnitude", "l2_channel"], "sparsity": [0.0, 0.8],
                  "layers": {"exclude": ["fc"]}, "quantization": ["none", "int8_static"],
                  "finetune": {"epochs": [0, 2]}},
        "objectives": ["val_accuracy:max", "artifact_bytes:min"],
        "search": {"strategy": "nsga2", "population": 6, "generations": 5},
        "execution": {"executor": "local"},
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": name},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def petra(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "petra.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def client(uri: str):
    from petra.tracking.store import open_client

    return open_client(uri)


def runs(uri: str, experiment: str) -> tuple[list, list]:
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return [], []
    found = c.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in found if "mlflow.parentRunId" in r.data.tags]


def finished(children) -> list:
    return [c for c in children if c.info.status in ("FINISHED", "FAILED")
            and "petra.status" in c.data.tags]


def front_hashes(children) -> set[str]:
    return {c.data.tags["petra.genome_hash"] for c in children
            if c.data.tags.get("petra.on_front") == "true"}


def journal_counts(folder: Path, run_id: str) -> Counter:
    """Finished evaluations per genome hash, from the journal (one line each)."""
    counts: Counter = Counter()
    path = folder / "runs" / "journal" / run_id / "results.jsonl"
    for raw in path.read_bytes().splitlines() if path.exists() else []:
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if line.get("kind") == "result":
            counts[line["genome_hash"]] += 1
    return counts


def listeners(pids: set[int]) -> list[str]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    return [line.split()[3] for line in out.splitlines()
            if any(f"pid={pid}," in line for pid in pids)]


def process_tree(root: int, with_args: str = "") -> set[int]:
    """``root`` and every process descended from it, those whose command line holds
    ``with_args`` only."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    args: dict[int, str] = {}
    for line in out.splitlines()[1:]:
        pid, ppid, *rest = line.split(None, 2)
        children.setdefault(int(ppid), []).append(int(pid))
        args[int(pid)] = rest[0] if rest else ""
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    return {pid for pid in found if with_args in args.get(pid, "")}


def ray_pids() -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    names = ("ray::", "raylet", "gcs_server", "/ray/", "dashboard", "mlflow")
    return {int(line.split()[0]) for line in out.splitlines()[1:] if any(n in line for n in names)}


def watch_exposure(stop: threading.Event, found: set[str]) -> None:
    while not stop.is_set():
        pids = ray_pids() | SEEN_PIDS
        found.update(a for a in listeners(pids))
        stop.wait(1.0)


# -- scenarios ----------------------------------------------------------------------------------
def driver_killed(folder: Path, *, kills: int = 10, seed: int = 0,
                  search: dict | None = None) -> dict:
    """``search`` overrides the config's search section (the tests' smaller runs)."""
    rng = random.Random(seed)
    ref = petra("search", str(write_config(folder, "reference", search=search or {})),
                cwd=folder)
    assert ref.returncode == 0, ref.stderr[-2000:]
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    _, ref_children = runs(uri, "reference")
    path = write_config(folder, "killed", search=search or {})
    run_id, points, restarts = None, [], 0
    while len(points) < kills:
        args = ["resume", run_id, "--set", f"tracking.uri={uri}"] if run_id else ["search",
                                                                                 str(path)]
        proc = subprocess.Popen([sys.executable, "-m", "petra.cli", *args], cwd=folder, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, before = runs(uri, "killed")
        target = len(finished(before)) + rng.randint(0, 2)
        extra = rng.uniform(0.0, 0.8)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            _, now = runs(uri, "killed")
            if len(finished(now)) >= target:
                break
            time.sleep(0.1)
        time.sleep(extra)
        if proc.poll() is not None:  # it finished first: this kill point was past the end
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        parents, now = runs(uri, "killed")
        points.append({"after_finished": len(finished(now)), "extra_delay_s": round(extra, 2)})
        if parents:
            run_id = parents[0].info.run_id
        else:
            restarts += 1  # killed before the search run existed: start it again
    final = petra("resume", run_id, "--set", f"tracking.uri={uri}", cwd=folder) if run_id else (
        petra("search", str(path), cwd=folder))
    parents, children = runs(uri, "killed")
    run_id = parents[0].info.run_id
    done = finished(children)
    logged = Counter(c.data.tags["petra.genome_hash"] for c in done)
    evaluated = journal_counts(folder, run_id)
    reference = {c.data.tags["petra.genome_hash"] for c in ref_children}
    return {
        "kills": len(points), "kill_points": points, "restarts_before_the_run_existed": restarts,
        "final_rc": final.returncode, "status": parents[0].info.status,
        "re_evaluated": sum(n - 1 for n in evaluated.values() if n > 1),
        "lost": len(set(evaluated) - set(logged)),
        "duplicated": sum(n - 1 for n in logged.values() if n > 1),
        "children": len(done), "reference_children": len(ref_children),
        "same_evaluations_as_uninterrupted": set(logged) == reference,
        "front_equals_uninterrupted": front_hashes(children) == front_hashes(ref_children),
    }


def candidate_faults(folder: Path, *, executor: str = "ray") -> dict:
    """Random search over the faulty task: every fault appears, the search completes."""
    faults = {"3-8": "memory", "9-13": "raise", "14-18": "nan", "19-22": "die",
              "23-26": "die_once"}
    markers = folder / "markers"
    path = write_config(
        folder, "faults", task={"name": FAULTY, "params": {"faults": faults,
                                                         "marker_dir": str(markers)}},
        space={"pruning": ["none", "l2_channel"], "sparsity": [0.0, 0.9], "layers": {},
               "quantization": ["none"], "finetune": {"epochs": [0, 1]}, "round_to": [1]},
        search={"strategy": "random", "population": 16, "generations": 3,
                "multi_fidelity": {"enabled": False}},
        execution={"executor": executor, "workers": 2, "memory_limit_mb": 512})
    proc = petra("search", str(path), cwd=folder)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    parents, children = runs(uri, "faults")
    by_fault: dict[str, list[dict]] = {}
    from petra.tasks import load_task

    task = load_task(FAULTY, {"faults": {}})
    hidden = task.model.fc1.out_features
    for c in finished(children):
        sparsity = float(c.data.params.get("layers.fc1.sparsity", 0.0))
        method = c.data.params.get("layers.fc1.method", "none")
        width = hidden - int(round(sparsity * hidden)) if method == "l2_channel" else hidden
        fault = next((f for k, f in faults.items()
                      if int(k.split("-")[0]) <= width <= int(k.split("-")[1])), "healthy")
        by_fault.setdefault(fault, []).append({
            "status": c.data.tags["petra.status"], "error": c.data.tags.get("petra.error", ""),
            "attempts": int(c.data.tags.get("petra.attempts", 1)),
            "val_accuracy": c.data.metrics.get("val_accuracy")})
    expected = {"memory": "memory limit exceeded", "raise": "injected fault",
                "nan": "FloatingPointError", "die": "worker died 2 times"}
    checks = {}
    for fault, error in expected.items():
        rows = by_fault.get(fault, [])
        checks[fault] = {"candidates": len(rows),
                         "all_failed_with_their_error": bool(rows) and all(
                             r["status"] == "failed" and error in r["error"] for r in rows)}
    once = by_fault.get("die_once", [])
    # The first candidate of such a width kills its worker once and completes on the retry;
    # later ones of the same width find the marker and complete at once.
    checks["die_once"] = {"candidates": len(once), "all_complete_one_after_a_retry": bool(once)
                          and all(r["status"] == "complete" for r in once)
                          and any(r["attempts"] == 2 for r in once)}
    healthy = by_fault.get("healthy", [])
    checks["healthy"] = {"candidates": len(healthy), "all_complete": bool(healthy) and all(
        r["status"] == "complete" for r in healthy)}
    return {"rc": proc.returncode, "status": parents[0].info.status if parents else None,
            "children": len(finished(children)), "checks": checks,
            "completed": proc.returncode == 0 and all(
                all(v for k, v in c.items() if k != "candidates") for c in checks.values())}


def worker_killed(folder: Path) -> dict:
    """One of two Ray workers is SIGKILLed while it evaluates a candidate."""
    path = write_config(folder, "workerkill", execution={"executor": "ray", "workers": 2},
                        search={"population": 6, "generations": 3})
    proc = subprocess.Popen([sys.executable, "-m", "petra.cli", "search", str(path)], cwd=folder,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    killed = None
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and killed is None:
        _, children = runs(uri, "workerkill")
        if len(finished(children)) >= 3:
            # this search's own workers (its local cluster descends from it), not those of
            # another search on the machine (pytest -n runs two tests at once)
            ours = process_tree(proc.pid, with_args="ray::_Worker.evaluate")
            workers = sorted(ours)
            if workers:
                killed = workers[0]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    out, err = proc.communicate(timeout=600)
    parents, children = runs(uri, "workerkill")
    done = finished(children)
    retried = [c for c in done if int(c.data.tags.get("petra.attempts", 1)) > 1]
    return {"rc": proc.returncode, "status": parents[0].info.status if parents else None,
            "killed_worker_pid": killed, "children": len(done),
            "retried": [{"status": c.data.tags["petra.status"],
                         "attempts": int(c.data.tags["petra.attempts"])} for c in retried],
            "failed": sum(c.data.tags["petra.status"] == "failed" for c in done),
            "completed": proc.returncode == 0 and killed is not None and bool(retried) and all(
                c.data.tags["petra.status"] == "complete" for c in retried)}


def mlflow_down(folder: Path, *, outage_s: float = 30.0, search: dict | None = None) -> dict:
    """A real `mlflow server` on 127.0.0.1, stopped for ``outage_s`` mid-search (after 4
    candidates finished); ``search`` overrides the search section."""
    from petra.tracking.ui import free_port, start, stop, wait_ready

    db = folder / "server.db"
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start(f"sqlite:///{db}", port, log=folder / "server.log")
    SEEN_PIDS.add(server.pid)
    assert wait_ready(uri), "the MLflow server did not start"
    path = write_config(folder, "outage", tracking={"uri": uri, "experiment": "outage"},
                        search={"population": 6, "generations": 6, **(search or {})})
    proc = subprocess.Popen([sys.executable, "-m", "petra.cli", "search", str(path)],
                            cwd=folder, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if len(finished(runs(uri, "outage")[1])) >= 4:
            break
        time.sleep(0.3)
    stop(server)
    down_at = time.monotonic()
    time.sleep(outage_s)
    server = start(f"sqlite:///{db}", port, log=folder / "server.log")
    SEEN_PIDS.add(server.pid)
    wait_ready(uri)
    outage = time.monotonic() - down_at
    try:
        out, _ = proc.communicate(timeout=900)
        parents, children = runs(uri, "outage")
        run = parents[0]
        done = finished(children)
        logged = Counter(c.data.tags["petra.genome_hash"] for c in done)
        evaluated = journal_counts(folder, run.info.run_id)
        local = client(uri).download_artifacts(run.info.run_id, "checkpoint.json", str(folder))
        state = json.loads(Path(local).read_text())
        return {"rc": proc.returncode, "status": run.info.status,
                "outage_s": round(outage, 1), "children": len(done),
                "lost": len(set(evaluated) - set(logged)),
                "duplicated": sum(n - 1 for n in logged.values() if n > 1),
                "checkpoint_records": len(state["records"]),
                "checkpoint_holds_every_child": {r["id"] for r in state["records"]}
                >= {c.info.run_id for c in done},
                "saw_the_outage": "unreachable" in out and "back after" in out,
                "outage_line_whole": "Max retries exceeded with url" in out,
                "mlflow_url_lines": out.count("View run "),
                "hint_names_the_store": f"petra front {run.info.run_id} --set "
                                        f"tracking.uri={uri}" in out,
                "completed": proc.returncode == 0 and len(done) == len(evaluated)}
    finally:
        stop(server)


def concurrent(folder: Path, *, search: dict | None = None) -> dict:
    """Two searches at once into one sqlite store and one `ray start --head` cluster;
    ``search`` overrides their search sections."""
    with ray_head(folder / "ray-head.log") as address:
        procs = {}
        for name in ("first", "second"):
            path = write_config(folder, name, execution={
                "executor": "ray", "workers": 1, "address": address},
                search={"population": 4, "generations": 3, **(search or {})})
            procs[name] = subprocess.Popen([sys.executable, "-m", "petra.cli", "search",
                                            str(path)], cwd=folder, env=ENV,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                           text=True)
        codes = {name: p.wait(timeout=900) for name, p in procs.items()}
        errors = {name: p.stderr.read()[-1500:] for name, p in procs.items() if codes[name]}
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    trees = {}
    for name in procs:
        parents, children = runs(uri, name)
        ids = {p.info.run_id for p in parents}
        trees[name] = {"search_runs": len(parents), "children": len(finished(children)),
                       "status": parents[0].info.status if parents else None,
                       "children_of_this_search_only": all(
                           c.data.tags["mlflow.parentRunId"] in ids for c in children)}
    return {"rc": codes, "trees": trees, "errors": errors,
            "completed": all(c == 0 for c in codes.values()) and all(
                t["search_runs"] == 1 and t["status"] == "FINISHED"
                and t["children_of_this_search_only"] for t in trees.values())}


SCENARIOS = ("driver_killed", "worker_killed", "candidate_faults", "mlflow_down", "concurrent")


def run(only: list[str], *, kills: int, outage_s: float) -> dict:
    stop, found = threading.Event(), set()
    watcher = threading.Thread(target=watch_exposure, args=(stop, found), daemon=True)
    watcher.start()
    report: dict = {}
    try:
        for name in only:
            started = time.time()
            with tempfile.TemporaryDirectory(prefix=f"petra-faults-{name}-") as tmp:
                folder = Path(tmp)
                if name == "driver_killed":
                    report[name] = driver_killed(folder, kills=kills)
                elif name == "mlflow_down":
                    report[name] = mlflow_down(folder, outage_s=outage_s)
                else:
                    report[name] = globals()[name](folder)
            report[name]["wall_s"] = round(time.time() - started, 1)
            print(f"{name}: {json.dumps(report[name], default=str)[:600]}", flush=True)
    finally:
        stop.set()
        watcher.join(timeout=5)
    report["exposure"] = {"listeners_seen": sorted(found),
                          "non_loopback": sorted(a for a in found if not a.startswith(LOOPBACK))}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--outage-s", type=float, default=30.0)
    parser.add_argument("--only", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    args = parser.parse_args()
    report = run(args.only, kills=args.kills, outage_s=args.outage_s)
    out = ROOT / "benchmarks" / "results" / "faults.json"
    if set(args.only) != set(SCENARIOS) and out.exists():  # rerun some: keep the others
        previous = json.loads(out.read_text())
        seen = set(previous.get("exposure", {}).get("listeners_seen", []))
        seen |= set(report["exposure"]["listeners_seen"])
        report = {**previous, **report, "exposure": {
            "listeners_seen": sorted(seen),
            "non_loopback": sorted(a for a in seen if not a.startswith(LOOPBACK))}}
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
