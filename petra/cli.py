"""The ``petra`` command.

    petra search CONFIG [--set key=value ...]    run a search; prints progress, the front, the run id
    petra space CONFIG [--set ...] [--json]      print the genes decoded from the model's layers
    petra methods [--json]                       list the registered methods

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
    sp = sub.add_parser("space", help="print the genes decoded against the model")
    sp.add_argument("config")
    sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sp.add_argument("--json", action="store_true")
    m = sub.add_parser("methods", help="list the registered methods")
    m.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from petra.config import ConfigError, load_config

    try:
        if args.command == "methods":
            return _methods(args.json)
        cfg = load_config(args.config, args.overrides)
        if args.command == "space":
            return _space(cfg, args.json)
        return _search(cfg)
    except ConfigError as exc:
        print(f"petra: config error: {exc}", file=sys.stderr)
        return 2


def _methods(as_json: bool) -> int:
    import petra.compress  # noqa: F401
    import petra.tasks.digits  # noqa: F401
    from petra.registry import PRUNING, QUANTIZATION, REGULARIZERS
    from petra.strategies import STRATEGIES
    from petra.tasks import TASKS, load_task  # noqa: F401

    registries = {"pruning": PRUNING, "quantization": QUANTIZATION,
                  "regularizer": REGULARIZERS, "strategy": STRATEGIES, "task": TASKS}
    table = {kind: reg.describe() for kind, reg in registries.items()}
    if as_json:
        print(json.dumps(table, indent=2))
    else:
        for kind, entries in table.items():
            print(f"{kind}:")
            for name, text in entries.items():
                print(f"  {name:<14} {text}")
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


def _search(cfg: object) -> int:
    from petra.loop import search

    def say(message: str) -> None:
        print(message, flush=True)

    result = search(cfg, progress=say)
    print()
    print(f"Pareto front ({len(result.front.members)} candidates; knee marked *):")
    print(_front_table(result))
    print()
    print(f"search run: {result.run_id}")
    print(f"tracking:   {cfg.tracking.uri} (experiment {cfg.tracking.experiment!r})")
    print(f"open it:    mlflow ui --backend-store-uri {cfg.tracking.uri} --host 127.0.0.1")
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
        if genome.get("reg.kind", "none") != "none":
            parts.append(f"{genome['reg.kind']}={genome.get('reg.strength', 0):.0e}")
    return " ".join(parts) or "dense"


if __name__ == "__main__":
    sys.exit(main())
