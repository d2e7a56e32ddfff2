"""The config reference, generated from the schema (:mod:`petra.schema`) so that it cannot drift.

Each key's type, default and allowed values come from its pydantic field; what it *means* comes
from :data:`MEANINGS`. ``tests/test_docs.py`` fails when a key of the schema has no meaning here,
or a meaning names a key the schema lacks. ``docs/hooks.py`` writes the page before every
``mkdocs build``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

#: What each config key does, by its dotted path.
MEANINGS: dict[str, str] = {
    "name": "the search run's name in MLflow",
    "seed": "the search's one seed; each candidate's seed derives from (seed, generation, "
            "index)",
    "task.name": "a built-in task (see Tasks), or `package.module:function` returning a "
                 "`petra.Task` (see Your own model)",
    "task.params": "keyword arguments for the task function",
    "space.pruning": "the pruning criteria each layer may use (see Methods); `l2_heads` prunes "
                     "attention heads, `l2_units` the units of a GRU or LSTM",
    "space.sparsity": "the range of each layer's sparsity gene",
    "space.layers.include": "globs over module names: the layers that get pruning genes",
    "space.layers.exclude": "globs over module names left dense (a glob that matches no "
                            "prunable layer is an error that lists the layers)",
    "space.width": "the share of a transformer's hidden size that `prune.width` may remove",
    "space.round_to": "the multiples that structured pruning may round kept channel counts to",
    "space.quantization": "the quantization schemes offered (see Methods); each is verified "
                          "on the model first",
    "space.static.calibration": "the activation-range calibrations offered to the static int8 "
                                "schemes",
    "space.static.smooth_alpha": "the range of SmoothQuant's alpha; 0 is no smoothing",
    "space.static.fallback": "the range of the share of weight layers kept fp32, most "
                             "sensitive first",
    "space.regularizer": "the fine-tune's regularizers offered (`kd` distills from the dense "
                         "model)",
    "space.reg_strength": "the log-uniform range of the regularizer's strength",
    "space.finetune.epochs": "the range of fine-tune epochs after compression",
    "space.finetune.lr": "the log-uniform range of the fine-tune's learning rate",
    "space.sparsity_rules": "how each layer's sparsity is chosen: `fixed` (the gene), or "
                            "`auto_emp` (EMP, from the scores' distribution)",
    "space.emp_beta": "the range of EMP's beta",
    "space.emp_scope": "EMP per layer, or pooled over the layers",
    "space.rank_rules": "how `svd` picks its rank: `energy` (a kept-energy gene) or `mp` "
                        "(Marchenko-Pastur)",
    "space.eq_beta": "the log-uniform range of `equilibrium`'s penalty weight",
    "space.eq_gamma": "the range of `equilibrium`'s L1 weight on its gates",
    "space.skip_blocks": "true: a `blocks.<name>.skip` gene for each skippable residual block",
    "space.shapley_permutations": "the permutations `shapley` may sample per channel group",
    "objectives": "the objectives, `metric:max` or `metric:min`, of val_accuracy, "
                  "artifact_bytes, size_ratio, latency_ratio, latency_ms, params, macs",
    "constraints.max_accuracy_drop": "the most validation accuracy a candidate may lose "
                                     "against the baseline; null: no limit",
    "constraints.max_bytes": "the largest artifact allowed, in bytes; null: no limit",
    "constraints.max_latency_ratio": "the largest latency ratio allowed; null: no limit",
    "search.strategy": "the search strategy (see Methods): DEAP's NSGA-II (default) or "
                       "NSGA-III, NSGA-II with the level switch, Optuna's NSGA-II or TPE, "
                       "random search, or the by-hand grid",
    "search.population": "candidates per generation",
    "search.generations": "generations to run",
    "search.time_budget_s": "seconds after which the search stops what is running and ends "
                            "cleanly; null: no budget",
    "search.multi_fidelity.enabled": "stop candidates the front dominates after a short "
                                     "fine-tune",
    "search.multi_fidelity.rung_epochs": "the epochs of that short fine-tune",
    "search.multi_fidelity.headroom": "the accuracy a candidate may still gain after the rung; "
                                      "null: learned from earlier generations",
    "search.racing.enabled": "screen many offspring at tier 0 and measure only the promising "
                             "ones",
    "search.racing.factor": "the most offspring screened per generation, in populations",
    "search.racing.screen_share": "screening may take at most this share of the time measuring "
                                  "a population takes (sized each generation from the search's "
                                  "median screen and evaluation times; a screen's first timings "
                                  "of new layer shapes, paid once per search, do not count); "
                                  "null: always factor x population",
    "search.racing.select": "which of the candidates the front cannot dominate are measured "
                            "when more are left than a population: `rank` (non-dominated order "
                            "of their predictions, ties in proposal order) or `hypervolume` "
                            "(the default: greedily, by the hypervolume each optimistic "
                            "prediction adds to the front and to those already taken)",
    "execution.address": "null: a local Ray cluster on 127.0.0.1; or `host:port` of a running "
                         "cluster",
    "execution.workers": "candidates evaluated in parallel (Ray actors, kept warm)",
    "execution.cpus_per_candidate": "CPUs reserved per worker, and its torch and ONNX Runtime "
                                    "threads",
    "execution.gpus_per_candidate": "GPUs reserved per worker (Ray's num_gpus; 0.5 puts two "
                                    "workers on one GPU)",
    "execution.device": "where fine-tunes and tier-0 screens run; auto: CUDA when the worker "
                        "has a GPU",
    "execution.executor": "`ray`, or `local` (in-process, for debugging)",
    "execution.memory_limit_mb": "the memory one candidate may add to its worker; past it the "
                                 "candidate fails and the search goes on; null: no limit",
    "execution.layer_cache_mb": "each worker's cache of sorted pruning scores, shared through "
                                "Ray's object store; 0 turns it off",
    "measure.providers": "the ONNX Runtime execution providers latency is timed on, in order "
                         "of preference",
    "tracking.uri": "the MLflow store: `sqlite:///path.db`, or an `http://` server",
    "tracking.experiment": "the MLflow experiment the search run goes in",
}


def leaves(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, pydantic FieldInfo)`` of every leaf key of ``model``, in order."""
    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from leaves(kind, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def reference_markdown() -> str:
    """The config reference page: one table per section, generated."""
    from petra.schema import SearchConfig

    lines = ["# Config reference", "",
             "Generated from `petra/schema.py` and `petra/config_docs.py` at build time: every "
             "key the schema accepts, what it does, its default and what it allows. A bad value "
             "is a one-line error naming the key, the value and what is allowed.", ""]
    sections: dict[str, list[str]] = {}
    for key, info in leaves(SearchConfig):
        default = json.dumps(info.get_default(call_default_factory=True), default=str)
        sections.setdefault(key.split(".")[0] if "." in key else "top level", []).append(
            f"| `{key}` | {MEANINGS.get(key, '')} | `{default}` | "
            f"{(info.description or '').replace('|', '/')} |")
    for section, rows in sections.items():
        lines += ["", f"## {section}", "", "| key | what it does | default | allowed |",
                  "|---|---|---|---|", *rows]
    return "\n".join(lines) + "\n"


def methods_markdown() -> str:
    """The methods page: every registered method of every registry, with its description."""
    import petra.engine.strategies  # noqa: F401 - registers the strategies
    from petra.registry import REGISTRIES

    lines = ["# Methods", "",
             "Generated from petra's registries at build time (`petra methods` prints the same). "
             "A method registered by a plugin appears in `petra methods` the same way; see "
             "[Your own model](../your-model.md) and the criteria in "
             "[Concepts](../concepts.md).", ""]
    for kind, registry in REGISTRIES.items():
        lines += ["", f"## {kind}", "", "| name | what it does |", "|---|---|"]
        for name, text in registry.describe().items():
            lines.append(f"| `{name}` | {text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
