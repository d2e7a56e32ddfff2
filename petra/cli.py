"""The ``petra`` command.

    petra search CONFIG [--set key=value ...]    run a search; prints progress, the front, the run id
    petra resume RUN_ID [--set key=value ...]    continue an interrupted search from its checkpoint
    petra front RUN_ID [--json]                  print a search's front
    petra compare RUN_ID RUN_ID ... [--out DIR]  overlay several searches' fronts; log the comparison
    petra export RUN_ID CANDIDATE --out DIR      write a candidate's (or the knee's) deployable bundle
    petra register RUN_ID CANDIDATE --name NAME [--alias ALIAS]
                                                 a candidate (or `knee`) as a registered MLflow model
    petra ui [--port N]                          the MLflow UI over the store, on 127.0.0.1
    petra space CONFIG [--set ...] [--json]      print the genes decoded from the model's layers
    petra methods [--json]                       list the registered methods
    petra evaluate CONFIG --genome FILE|- [--json] [--export DIR] [--seed N]
                                                 evaluate one recipe (a hand-written genome)

Commands that read existing runs (resume, front, compare, export, register, ui) use the store
sqlite:///runs/mlflow.db unless given ``--set tracking.uri=URI``.

A bad config or argument exits with code 2 and one line naming the field, the value and what is
allowed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from collections.abc import Iterator, Sequence

from petra.candidate.baseline import check_task, prepare_baseline, task_space
from petra.candidate.evaluate import Evaluator
from petra.candidate.export import export_candidate, write_bundle
from petra.compress.blocks import skip_lines
from petra.engine.loop import cache_dir, resume, search
from petra.errors import COMPLETE, ConfigError
from petra.genes import check_range
from petra.registry import REGISTRIES
from petra.space import summarize
from petra.tasks import load_task
from petra.tracking import compare
from petra.tracking.progress import ConsoleProgress
from petra.tracking.runs import DEFAULT_URI, full_id, open_search, open_searches, split_store
from petra.tracking.ui import serve


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="petra", description="Evolutionary multi-objective "
                                     "compression of PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("search", help="run a search from a YAML config")
    s.add_argument("config", help="path to a YAML config (see search_spaces/)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set search.population=4 (repeatable)")
    r = sub.add_parser("resume", help="continue an interrupted search from its checkpoint")
    r.add_argument("run_id", help="the search run's MLflow run id")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="tracking.uri=URI picks the store (default sqlite:///runs/mlflow.db); "
                        "other keys override the run's config")
    sp = sub.add_parser("space", help="print the genes decoded against the model")
    sp.add_argument("config")
    sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sp.add_argument("--json", action="store_true")
    m = sub.add_parser("methods", help="list the registered methods")
    m.add_argument("--json", action="store_true")
    e = sub.add_parser("evaluate", help="evaluate one genome (JSON or YAML; omitted: none)")
    e.add_argument("config")
    e.add_argument("--genome", required=True, help="a JSON/YAML file of gene: value, or - for stdin")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--json", action="store_true", help="print the Result as JSON")
    e.add_argument("--seed", type=int, default=None, help="the pruning and fine-tune seed "
                   "(default: the config's); a search's candidate logs its own (petra.seed)")
    e.add_argument("--export", metavar="DIR", help="write its bundle here (as petra export)")
    store_help = "tracking.uri=URI picks the store (default sqlite:///runs/mlflow.db)"
    f = sub.add_parser("front", help="print the Pareto front of a search")
    f.add_argument("run_id", help="the search run's MLflow run id")
    f.add_argument("--json", action="store_true", help="print the front as JSON")
    f.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=store_help)
    c = sub.add_parser("compare", help="overlay the fronts of several searches")
    c.add_argument("run_ids", nargs="+", metavar="RUN_ID", help="two or more search run ids")
    c.add_argument("--out", metavar="DIR", default=None,
                   help="where to write compare.{html,png,csv,md,json} (default runs/compare/ID)")
    c.add_argument("--no-log", action="store_true", help="do not log a comparison run")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=store_help)
    x = sub.add_parser("export", help="write a candidate's deployable bundle")
    x.add_argument("run_id", help="the search run's MLflow run id")
    x.add_argument("candidate", help="the candidate's run id (or a unique prefix, as "
                                     "`petra front` prints it), or `knee`")
    x.add_argument("--out", metavar="DIR", required=True)
    x.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=store_help)
    g = sub.add_parser("register", help="register a candidate in MLflow's Model Registry")
    g.add_argument("run_id", help="the search run's MLflow run id")
    g.add_argument("candidate", help="the candidate's run id (or a unique prefix), or `knee`")
    g.add_argument("--name", required=True, help="the registered model's name")
    g.add_argument("--alias", default=None, help="an alias for the new version, e.g. knee")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=store_help)
    u = sub.add_parser("ui", help="start the MLflow UI over the store, on 127.0.0.1")
    u.add_argument("--port", type=int, default=None, help="default 5000, or a free port")
    u.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=store_help)
    return parser


#: The fields of :class:`ConfigError` that name a command's argument, not a config's key.
ARGUMENTS = ("run_id", "run_ids", "candidate", "genome")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with json_only(getattr(args, "json", False)):
            return _command(args)
    except ConfigError as exc:  # a command's own argument is no config's
        kind = "error" if exc.field in ARGUMENTS or exc.field.startswith("--") else "config error"
        print(f"petra: {kind}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # a reader that stopped early (`petra front RUN --json | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141


#: Where ``--json`` output goes while :func:`json_only` holds stdout for it.
_JSON_OUT: list[io.TextIOBase] = []


@contextlib.contextmanager
def json_only(active: bool) -> Iterator[None]:
    """While a ``--json`` command runs, what else reaches stdout goes to stderr (a library's
    ``print``, a C++ write to file descriptor 1, a model that prints): only :func:`_emit`
    writes to the real stdout, so it holds nothing but the JSON."""
    if not active:
        yield
        return
    real = sys.stdout
    real.flush()
    try:
        fd, err, saved = real.fileno(), sys.stderr.fileno(), os.dup(real.fileno())
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        fd = saved = None  # a captured stream (pytest; either of the two): in Python alone
    out = real if saved is None else open(os.dup(saved), "w", encoding="utf-8")
    if fd is not None:
        os.dup2(err, fd)
    _JSON_OUT.append(out)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _JSON_OUT.pop()
        real.flush()  # what was written to it went to stderr
        if saved is not None:
            try:
                out.close()  # a reader gone (`| head`): BrokenPipeError, once stdout is back
            finally:
                os.dup2(saved, fd)
                os.close(saved)


def _emit(payload: object) -> None:
    """Print ``payload`` as JSON on the real stdout (:func:`json_only`)."""
    out = _JSON_OUT[-1] if _JSON_OUT else sys.stdout
    print(json.dumps(payload, indent=2, default=str), file=out, flush=True)


def _command(args: argparse.Namespace) -> int:
    from petra.config import load_config

    if args.command == "methods":
        return _methods(args.json)
    if args.command == "resume":
        return _resume(args.run_id, args.overrides)
    if args.command in ("front", "compare", "export", "register", "ui"):
        return _runs_command(args)
    cfg = load_config(args.config, args.overrides)
    if args.command == "space":
        return _space(cfg, args.json)
    if args.command == "evaluate":
        return _evaluate(cfg, args.genome, as_json=args.json, export=args.export,
                         seed=args.seed)
    return _search(cfg)


def _methods(as_json: bool) -> int:
    registries = REGISTRIES
    table = {kind: reg.describe() for kind, reg in registries.items()}
    if as_json:
        _emit(table)
    else:
        width = max(len(name) for entries in table.values() for name in entries) + 2
        for kind, entries in table.items():
            print(f"{kind}:")
            for name, text in entries.items():
                print(f"  {name:<{width}}{text}")
    return 0


def _space(cfg: object, as_json: bool) -> int:
    task = load_task(cfg.task.name, cfg.task.params)
    check_task(task, cfg.task.name)
    space = task_space(cfg.space, task, cache_dir())
    if as_json:
        _emit({"genes": space.describe(), "withheld": space.withheld,
               "kept_whole": space.kept_whole})
    else:
        for gene in space.describe():
            span = gene.get("choices") or f"[{gene['low']}, {gene['high']}]"
            print(f"{gene['name']:<40} {gene['kind']:<12} {span}  (default {gene['default']})")
        if space.withheld:
            print("withheld (verified on the model: they fail, or gain nothing on it):")
            for what, reason in space.withheld.items():
                label = (f"{what}: structured removal" if what.startswith("layers.")
                         and ".method=" not in what else what)
                print(f"  {label}: {reason}")
        residual = [layer.name for layer in space.layers if layer.residual]
        if residual and "prune.width" in space:
            print(f"prune.width removes the hidden size, written by: {', '.join(residual)}")
        for line in skip_lines(space.blocks):
            print(line)
        if space.kept_whole:
            print("kept whole (no gene removes their units):")
            for name, reason in space.kept_whole.items():
                print(f"  layers.{name}: {reason}")
    return 0


def _read_genome(source: str) -> dict:
    import yaml

    try:
        text = sys.stdin.read() if source == "-" else open(source).read()
    except OSError as exc:
        raise ConfigError("genome", source, "", f"cannot read {source!r} ({exc.strerror})") from None
    try:
        genome = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("genome", source, "", f"must be JSON or YAML ({exc})") from None
    if not isinstance(genome, dict):
        raise ConfigError("genome", genome, "must be a mapping of gene name to value")
    return genome


def _count(n: int) -> str:
    return f"{n} candidate" + "s" * (n != 1)


def metric_rows(metrics: dict[str, float], baseline: dict[str, float]) -> list[str]:
    """``petra evaluate``'s lines of a candidate's metrics, each beside the baseline's: for
    ``latency_ms``, the dense model timed beside the candidate (what the ratio divides by)."""
    base = {**baseline, "latency_ms": metrics.get("baseline_latency_ms", "-")}
    rows = []
    for key in ("val_accuracy", "test_accuracy", "artifact_bytes", "size_ratio", "latency_ms",
                "latency_ratio", "latency_ratio_iqr", "params", "macs"):
        if key in metrics:
            shown = base.get(key, "-")
            rows.append(f"  {key:<18} {metrics[key]:.6g}   (baseline "
                        f"{shown if isinstance(shown, str) else format(shown, '.6g')})")
    return rows


def _evaluate(cfg: object, source: str, *, as_json: bool, export: str | None,
              seed: int | None = None) -> int:
    import torch

    genome = _read_genome(source)
    task = load_task(cfg.task.name, cfg.task.params)
    check_task(task, cfg.task.name)
    threads = cfg.execution.cpus_per_candidate
    space = task_space(cfg.space, task, cache_dir())
    try:  # before the baseline trains
        for name, value in genome.items():
            if name in space:
                check_range(space.gene(name), value)
        genome = space.complete(genome)
    except ValueError as exc:
        raise ConfigError("genome", source, "", str(exc)) from None
    baseline = prepare_baseline(task, task_name=cfg.task.name, task_params=cfg.task.params,
                                cache_dir=cache_dir(), seed=cfg.seed, threads=threads)
    evaluator = Evaluator.from_config(cfg, baseline, threads=threads, core=0)
    torch.set_num_threads(threads)
    result = evaluator.evaluate(genome, genome_hash=space.genome_hash(genome),
                                seed=cfg.seed if seed is None else seed)
    if result.artifact:
        result.metrics["test_accuracy"] = evaluator.test_accuracy(result.artifact)
    payload = {
        "status": result.status,
        "error": result.error,
        "objectives": {m: result.metrics.get(m) for m, _ in cfg.objective_list},
        "metrics": result.metrics,
        "effective": result.info.get("effective", {}),
        "channels": result.info.get("channels", {}),
        "heads": result.info.get("heads", {}),
        "ranks": result.info.get("ranks", {}),
        "genome": result.genome,
        "genome_hash": result.genome_hash,
        "baseline": baseline.metrics,
    }
    if export and result.artifact:
        from petra.tasks.contract import feed

        write_bundle(export, artifact_bytes=result.artifact, genome=result.genome,
                     metrics=result.metrics, baseline=baseline.metrics,
                     example=feed(task.example_input, task.input_names), name=cfg.name)
        payload["export"] = str(export)
    if as_json:
        _emit(payload)
    else:
        m = result.metrics
        print(f"status: {result.status}" + (f" ({result.error})" if result.error else ""))
        print("\n".join(metric_rows(m, baseline.metrics)))
        print(f"  effective          {payload['effective']}")
        if export:
            print(f"exported to {export}")
    return 0 if result.status == COMPLETE else 1


def _resume(run_id: str, overrides: list[str]) -> int:
    uri, rest = split_store(overrides)
    run_id, progress = full_id(uri, run_id), ConsoleProgress()
    try:
        result = resume(run_id, uri=uri, overrides=tuple(rest), progress=progress)
    finally:
        progress.close()
    return _report(result, uri)


def _search(cfg: object) -> int:
    progress = ConsoleProgress()
    try:
        result = search(cfg, progress=progress)
    finally:
        progress.close()
    return _report(result, cfg.tracking.uri)


def _report(result: object, uri: str) -> int:
    print()
    print(f"Pareto front ({_count(len(result.front.members))}; knee marked *):")
    print(front_table(result.front.members, result.knee))
    print()
    print(f"search run: {result.run_id}")
    print(f"tracking:   {uri}")
    store = "" if uri == DEFAULT_URI else f" --set tracking.uri={uri}"  # where readers look
    print(f"see it:     petra front {result.run_id}{store}   |   petra ui{store}")
    return 130 if result.interrupted else 0


def front_table(members: Sequence[dict], knee: str | None) -> str:
    """The front as fixed-width text: run, accuracies, size, latency, bytes and the recipe."""

    def num(m: dict, key: str, width: int, digits: int) -> str:
        v = m.get(key)
        return f"{'-':>{width}}" if v is None else f"{float(v):>{width}.{digits}f}"

    head = (f"  {'run':<10} {'val_acc':>8} {'test_acc':>8} {'size':>6} {'latency':>8} "
            f"{'bytes':>9}  recipe")
    lines = [head]
    for member in members:
        m = member["metrics"]
        mark = "*" if member["id"] == knee else " "
        lines.append(
            f"{mark} {member['id'][:8]:<10} {num(m, 'val_accuracy', 8, 4)} "
            f"{num(m, 'test_accuracy', 8, 4)} {num(m, 'size_ratio', 6, 3)} "
            f"{num(m, 'latency_ratio', 8, 3)} {num(m, 'artifact_bytes', 9, 0)}  "
            f"{summarize(member['genome'], member.get('metrics'))}")
    if not members:
        lines.append("  (no complete, feasible candidate yet)")
    return "\n".join(lines)


def _runs_command(args: argparse.Namespace) -> int:
    """front, compare, export, register and ui: the commands that read existing runs."""

    uri, rest = split_store(args.overrides)
    if rest:
        raise ConfigError("--set", rest[0], "", f"petra {args.command} takes only "
                          f"--set tracking.uri=URI; got {rest[0]!r}")
    if args.command == "front":
        return _front(uri, args.run_id, as_json=args.json)
    if args.command == "compare":
        return _compare(uri, args.run_ids, out=args.out, log=not args.no_log)
    if args.command == "export":
        out = export_candidate(uri, args.run_id, args.candidate, args.out)
        print(f"exported to {out}: model.petra, load_petra.py, example.py, example.npz, "
              "MODEL_CARD.md, genome.json, metrics.json")
        print(f"try it:     cd {out} && python example.py   (needs numpy, onnx, onnxruntime)")
        return 0
    if args.command == "register":
        from petra.tracking.model_registry import register_candidate

        done = register_candidate(uri, args.run_id, args.candidate, args.name, args.alias)
        print(f"registered {done.name} version {done.version} in {uri}")
        print(f"load it:    mlflow.pyfunc.load_model({done.uri!r})")
        print(f"serve it:   MLFLOW_TRACKING_URI={uri} mlflow models serve -m {done.uri} "
              "--env-manager local -h 127.0.0.1 -p 5001")
        return 0

    return serve(uri, args.port, say=_say)


def _front(uri: str, run_id: str, *, as_json: bool) -> int:
    search = open_search(uri, run_id)
    snap = search.front()
    if as_json:
        payload = {"run_id": search.run_id, "name": search.name, "status": search.status,
                   "knee": search.knee, "baseline": search.baseline, **snap.to_dict()}
        _emit(payload)
        return 0
    b = search.baseline
    print(f"search {search.label} ({search.status}), task {search.config.task.name}: "
          f"{snap.evaluated} evaluated, {snap.failed} failed, {snap.pruned} pruned; "
          f"hypervolume {snap.hypervolume:.4f}")
    print(f"dense baseline: val {b.get('val_accuracy', float('nan')):.4f}, test "
          f"{b.get('test_accuracy', float('nan')):.4f}, {int(b.get('artifact_bytes', 0))} bytes")
    print(f"Pareto front ({_count(len(snap.members))}; knee marked *):")
    print(front_table(snap.members, search.knee))
    return 0


def _compare(uri: str, run_ids: list[str], *, out: str | None, log: bool) -> int:
    from pathlib import Path

    comparison = compare.compare(open_searches(uri, run_ids))
    folder = Path(out) if out else Path("runs") / "compare" / "-".join(r[:8] for r in run_ids)
    files = compare.write(comparison, folder)
    print(comparison.table())
    print()
    print(f"wrote {', '.join(str(p) for p in files.values())}")
    if log:
        run_id = compare.log_comparison(comparison, uri, files)
        print(f"comparison run: {run_id} (experiment {compare.EXPERIMENT!r} in {uri})")
    return 0


def _say(message: str) -> None:
    print(message, flush=True)


if __name__ == "__main__":
    sys.exit(main())
