"""The ``petra`` command.

    petra search CONFIG [--set key=value ...]    run a search; prints progress, the front, the run id
    petra space CONFIG [--set ...] [--json]      print the genes decoded from the model's layers
    petra methods [--json]                       list the registered methods
    petra resume RUN_ID [--set key=value ...]    continue an interrupted search from its checkpoint
    petra evaluate CONFIG --genome FILE|- [--json] [--export DIR]
                                                 evaluate one recipe (a hand-written genome)

A bad config exits with code 2 and one line naming the field, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="petra", description="Evolutionary multi-objective compression of PyTorch models."
    )
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
    e = sub.add_parser("evaluate", help="evaluate one genome (JSON or YAML; omitted genes = no "
                                        "compression)")
    e.add_argument("config")
    e.add_argument("--genome", required=True, help="a JSON/YAML file of gene: value, or - for stdin")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--json", action="store_true", help="print the Result as JSON")
    e.add_argument("--export", metavar="DIR", help="write the artifact, a loader and a README here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from petra.config import ConfigError, load_config

    try:
        if args.command == "methods":
            return _methods(args.json)
        if args.command == "resume":
            return _resume(args.run_id, args.overrides)
        cfg = load_config(args.config, args.overrides)
        if args.command == "space":
            return _space(cfg, args.json)
        if args.command == "evaluate":
            return _evaluate(cfg, args.genome, as_json=args.json, export=args.export)
        return _search(cfg)
    except ConfigError as exc:
        print(f"petra: config error: {exc}", file=sys.stderr)
        return 2


def _methods(as_json: bool) -> int:
    import petra.compress  # noqa: F401
    from petra.registry import PRUNING, QUANTIZATION, REGULARIZERS
    from petra.strategies import STRATEGIES
    from petra.tasks import TASKS, register_builtin

    register_builtin()
    registries = {"pruning": PRUNING, "quantization": QUANTIZATION,
                  "regularizer": REGULARIZERS, "strategy": STRATEGIES, "task": TASKS}
    table = {kind: reg.describe() for kind, reg in registries.items()}
    if as_json:
        print(json.dumps(table, indent=2))
    else:
        width = max(len(name) for entries in table.values() for name in entries) + 2
        for kind, entries in table.items():
            print(f"{kind}:")
            for name, text in entries.items():
                print(f"  {name:<{width}}{text}")
    return 0


def _space(cfg: object, as_json: bool) -> int:
    from petra.space import build_space, prunable_layers
    from petra.tasks import load_task

    task = load_task(cfg.task.name, cfg.task.params)
    space = build_space(cfg.space, prunable_layers(task.model, task.example_input))
    if as_json:
        print(json.dumps(space.describe(), indent=2))
    else:
        for gene in space.describe():
            span = gene.get("choices") or f"[{gene['low']}, {gene['high']}]"
            print(f"{gene['name']:<40} {gene['kind']:<12} {span}  (default {gene['default']})")
    return 0


def _read_genome(source: str) -> dict:
    import yaml

    from petra.config import ConfigError

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


def _evaluate(cfg: object, source: str, *, as_json: bool, export: str | None) -> int:
    import torch

    from petra.baseline import prepare_baseline
    from petra.config import ConfigError
    from petra.evaluate import Evaluator
    from petra.loop import cache_dir
    from petra.space import build_space, prunable_layers
    from petra.tasks import load_task

    genome = _read_genome(source)
    task = load_task(cfg.task.name, cfg.task.params)
    threads = cfg.execution.cpus_per_candidate
    baseline = prepare_baseline(task, task_name=cfg.task.name, task_params=cfg.task.params,
                                cache_dir=cache_dir(), seed=cfg.seed, threads=threads)
    space = build_space(cfg.space, prunable_layers(task.model, task.example_input))
    try:
        genome = space.complete(genome)
    except ValueError as exc:
        raise ConfigError("genome", source, "", str(exc)) from None
    evaluator = Evaluator(task_name=cfg.task.name, task_params=cfg.task.params,
                          baseline_state=baseline.state, baseline_artifact=baseline.artifact,
                          threads=threads, core=0)
    torch.set_num_threads(threads)
    result = evaluator.evaluate(genome, genome_hash=space.genome_hash(genome), seed=cfg.seed)
    if result.artifact:
        result.metrics["test_accuracy"] = evaluator.test_accuracy(result.artifact)
    payload = {
        "status": result.status,
        "error": result.error,
        "objectives": {m: result.metrics.get(m) for m, _ in cfg.objective_list},
        "metrics": result.metrics,
        "effective": result.info.get("effective", {}),
        "channels": result.info.get("channels", {}),
        "ranks": result.info.get("ranks", {}),
        "genome": result.genome,
        "genome_hash": result.genome_hash,
        "baseline": baseline.metrics,
    }
    if export and result.artifact:
        from petra.export import write_bundle

        write_bundle(export, artifact_bytes=result.artifact, genome=result.genome,
                     metrics=result.metrics, baseline=baseline.metrics,
                     input_shape=list(task.example_input.shape), name=cfg.name)
        payload["export"] = str(export)
    if as_json:
        print(json.dumps(payload, indent=2, default=str))
    else:
        m = result.metrics
        print(f"status: {result.status}" + (f" ({result.error})" if result.error else ""))
        for key in ("val_accuracy", "test_accuracy", "artifact_bytes", "size_ratio",
                    "latency_ms", "latency_ratio", "latency_ratio_iqr", "params", "macs"):
            if key in m:
                print(f"  {key:<18} {m[key]:.6g}   (baseline {baseline.metrics.get(key, '-')})")
        print(f"  effective          {payload['effective']}")
        if export:
            print(f"exported to {export}")
    return 0 if result.status == "complete" else 1


def _say(message: str) -> None:
    print(message, flush=True)


def _resume(run_id: str, overrides: list[str]) -> int:
    from petra.loop import resume

    uri = "sqlite:///runs/mlflow.db"
    rest = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "tracking.uri":
            uri = value.strip()
        else:
            rest.append(item)
    result = resume(run_id, uri=uri, overrides=tuple(rest), progress=_say)
    return _report(result, uri)


def _search(cfg: object) -> int:
    from petra.loop import search

    result = search(cfg, progress=_say)
    return _report(result, cfg.tracking.uri)


def _report(result: object, uri: str) -> int:
    print()
    print(f"Pareto front ({len(result.front.members)} candidates; knee marked *):")
    print(_front_table(result))
    print()
    print(f"search run: {result.run_id}")
    print(f"tracking:   {uri}")
    print(f"open it:    mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
    return 130 if result.interrupted else 0


def _front_table(result: object) -> str:
    head = f"  {'run':<10} {'val_acc':>8} {'test_acc':>8} {'size':>6} {'latency':>8} {'bytes':>9}  recipe"
    lines = [head]
    for member in result.front.members:
        m = member["metrics"]
        mark = "*" if member["id"] == result.knee else " "
        lines.append(
            f"{mark} {member['id'][:8]:<10} {m['val_accuracy']:>8.4f} "
            f"{m.get('test_accuracy', float('nan')):>8.4f} {m['size_ratio']:>6.3f} "
            f"{m['latency_ratio']:>8.3f} {int(m['artifact_bytes']):>9}  {_summary(member['genome'])}"
        )
    return "\n".join(lines)


def _summary(genome: dict) -> str:
    """A one-line recipe: methods with mean sparsity, quantization, fine-tune."""
    methods: dict[str, list[float]] = {}
    for key, value in genome.items():
        if key.endswith(".method") and value != "none":
            methods.setdefault(value, []).append(genome.get(key[:-7] + ".sparsity", 0.0))
    parts = [f"{m}x{len(s)}@{sum(s) / len(s):.2f}" for m, s in methods.items()]
    if genome.get("prune.round_to", 1) != 1 and any(parts):
        parts.append(f"round{genome['prune.round_to']}")
    if genome.get("quant.scheme", "none") != "none":
        parts.append(genome["quant.scheme"])
    if genome.get("finetune.epochs", 0):
        parts.append(f"ft{genome['finetune.epochs']}@{genome.get('finetune.lr', 0):.1e}")
        if genome.get("reg.kind") == "kd":
            parts.append(f"kd(alpha={genome.get('reg.kd_alpha', 0.5):g},"
                         f"T={genome.get('reg.kd_temperature', 4.0):g})")
        elif genome.get("reg.kind", "none") != "none":
            parts.append(f"{genome['reg.kind']}={genome.get('reg.strength', 0):.0e}")
    return " ".join(parts) or "dense"


if __name__ == "__main__":
    sys.exit(main())
