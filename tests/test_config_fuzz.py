"""Bad input, fuzzed: hundreds of malformed configs, each refused with exit code 2 and one line.

Hypothesis draws a valid config and breaks it one way: a wrong type, an out-of-range value, an
unknown key, a glob that matches no layer, an unknown method or strategy, a bad task import
string, a task that raises, or YAML that does not parse. ``petra search`` runs in process (the
same ``main`` the command runs), so every case is quick; each must end with exit code 2 and a
single line that names the field, and no traceback.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from petra.cli import main
from tests.conftest import TINY_TASK

#: Where a field sits, and values of the wrong type or out of its range.
FIELDS = {
    "seed": ["x", -1, 1.5, [1], {"a": 1}, None],
    "name": ["", 3, [], None],
    "search.population": ["many", -3, 0, 1, 2.5, [4], None, True],
    "search.generations": [0, -1, "6", 1.5, {}, True],
    "search.strategy": ["nsga9", 3, "", None, ["nsga2"]],
    "search.time_budget_s": [0, -5, "soon", [1]],
    "search.multi_fidelity.enabled": [3, "maybe", [True]],
    "search.multi_fidelity.rung_epochs": [0, -1, "one", 2.5],
    "search.multi_fidelity.headroom": [-0.1, 1.5, "lots"],
    "search.racing.enabled": [3, "maybe"],
    "search.racing.factor": [0, 65, 2.5, "four"],
    "search.racing.screen_share": [0, -1, 17, "a quarter"],
    "search.racing.select": ["best", 1, ["rank"]],
    "space.pruning": ["magnitude", [], ["foo"], [1], None, ["none", "l3_channel"]],
    "space.sparsity": [[0.5, 0.2], [-0.1, 0.5], [0.0, 1.5], [0.1], "0.5", [None, 0.5]],
    "space.quantization": [["int9"], [], "int8_static", [None]],
    "space.regularizer": [["l3"], [], 7],
    "space.round_to": [[0], [], ["8"], 8],
    "space.reg_strength": [[0, 1e-3], [1e-3, 1e-6], ["a", "b"]],
    "space.finetune.epochs": [[3, 1], [-1, 2], [0, 2000], [0.5, 2], "0-3"],
    "space.finetune.lr": [[0, 1e-2], [1e-2, 1e-4], [1e-3, 50]],
    "space.layers.include": [[], "stem", [3], None],
    "space.layers.exclude": ["fc", [1]],
    "space.sparsity_rules": [["auto"], [], ["fixed", 2]],
    "space.rank_rules": [["spectral"], []],
    "space.emp_beta": [[0, 1], [2, 1], [1, 20]],
    "space.emp_scope": [["local"], []],
    "space.eq_beta": [[0, 1], [3, 1]],
    "space.shapley_permutations": [0, -2, "four", 1e6],
    "objectives": [[], ["val_accuracy:max"], ["accuracy:max", "artifact_bytes:min"],
                   ["val_accuracy:up", "artifact_bytes:min"], "val_accuracy:max",
                   ["val_accuracy:max", "val_accuracy:min"], ["val_accuracy"] * 2],
    "constraints.max_accuracy_drop": [-0.1, 2, "small"],
    "constraints.max_bytes": [0, -10, "1MB"],
    "constraints.max_latency_ratio": [0, "fast"],
    "execution.workers": [0, -1, "two", 1.5],
    "execution.cpus_per_candidate": [0, "1", 1.0],
    "execution.executor": ["gpu", 1],
    "execution.address": ["127.0.0.1", "http://x:1", 6379, "a b:12"],
    "execution.memory_limit_mb": [10, -1, "1G"],
    "execution.layer_cache_mb": [-1, "256M", None],
    "tracking.uri": ["", 5],
    "tracking.experiment": ["", []],
    "task.name": ["nodigits", "", "has space", "a:b:c", 3],
    "task.params": ["width=8", [8]],
}
SECTIONS = ["space", "search", "execution", "tracking", "constraints", "task", "objectives"]
BAD_TASKS = ["no_such_module_xyz:make", "tests.user_task:no_such_function",
             "tests.user_task:not_a_task", "tests.user_task:raises", "os.path:join"]
BAD_GLOBS = [("include", ["conv*"]), ("include", ["layer9.*"]), ("exclude", ["fc", "head*"]),
             ("include", ["*", "nothing_here"])]
BAD_YAML = ["a: [1, 2", "space: {pruning: [none}", "search:\n  population: 4\n   generations: 2",
            "key: : value", "- - -\n  x: [", "\tname: tab", "name: 'unterminated", "{{{",
            "space:\n  - a\n  b: 1", "search: {population: 4,, generations: 2}"]


def base_config(tmp_path: Path) -> dict:
    return {"name": "fuzz", "task": copy.deepcopy(TINY_TASK),
            "search": {"population": 4, "generations": 1},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'never.db'}"}}


def put(config: dict, dotted: str, value: object) -> dict:
    node = config
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return config


@st.composite
def malformed(draw: st.DrawFn) -> tuple[str, object, str]:
    """``(kind, payload, field)``: how the config is broken, and the field the error must name."""
    kind = draw(st.sampled_from(["value", "value", "value", "unknown_key", "glob", "task",
                                 "yaml", "set"]))
    if kind == "value":
        field = draw(st.sampled_from(sorted(FIELDS)))
        return kind, (field, draw(st.sampled_from(FIELDS[field]))), field
    if kind == "set":  # the same mistakes through --set, as YAML text
        field = draw(st.sampled_from(sorted(FIELDS)))
        value = draw(st.sampled_from(FIELDS[field]))
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        return kind, (field, text), field
    if kind == "unknown_key":
        section = draw(st.sampled_from(SECTIONS[:5] + ["", "search.multi_fidelity"]))
        key = draw(st.from_regex(r"[a-z][a-z_]{2,12}", fullmatch=True))
        known = {"space": ["pruning", "sparsity", "layers", "round_to", "quantization",
                           "regularizer", "reg_strength", "finetune", "sparsity_rules",
                           "emp_beta", "emp_scope", "rank_rules", "eq_beta", "eq_gamma",
                           "shapley_permutations"],
                 "": ["name", "seed", "task", "space", "objectives", "constraints", "search",
                      "execution", "tracking"]}
        if key in known.get(section, []) or key in (
                "population", "generations", "strategy", "workers", "uri", "experiment",
                "address", "executor", "enabled", "headroom", "rung_epochs"):
            key += "_x"
        field = f"{section}.{key}" if section else key
        return kind, (field, draw(st.integers(0, 9))), field
    if kind == "glob":
        which, globs = draw(st.sampled_from(BAD_GLOBS))
        return kind, (which, globs), f"space.layers.{which}"
    if kind == "task":
        return kind, draw(st.sampled_from(BAD_TASKS)), "task"
    return kind, draw(st.sampled_from(BAD_YAML)), "config"


@settings(max_examples=240, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=malformed())
def _exits_2_with_one_line_naming_the_field(case, tmp_path: Path, capsys, kinds: list) -> None:
    kind, payload, field = case
    path = tmp_path / "bad.yaml"
    overrides: list[str] = []
    config = base_config(tmp_path)
    if kind == "value":
        put(config, *payload)
    elif kind == "set":
        overrides = ["--set", f"{payload[0]}={payload[1]}"]
    elif kind == "unknown_key":
        put(config, *payload)
    elif kind == "glob":
        put(config, f"space.layers.{payload[0]}", payload[1])
    elif kind == "task":
        config["task"] = {"name": payload, "params": {}}
    if kind == "yaml":
        path.write_text(payload)
    else:
        path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    code = main(["search", str(path), *overrides])
    out = capsys.readouterr()
    kinds.append(kind)
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert code == 2, (case, out.err, out.out)
    assert len(lines) == 1, (case, out.err)
    assert "Traceback" not in out.err + out.out
    assert lines[0].startswith("petra: config error: ")
    message = lines[0][len("petra: config error: "):]
    # the field comes first, by its dotted path (list items as [i])
    named = re.sub(r"\[\d+\]", "", message.split(":", 1)[0])
    assert named == field or named.startswith(field + ".") or field.startswith(named), (
        case, message)
    assert len(message) > len(named) + 10  # and says what is allowed, or what went wrong


def test_every_malformed_config_exits_2_with_one_line_naming_the_field(tmp_path, capsys):
    """At least 200 cases, of every kind of mistake (one test, so that the count is of this
    run's cases whatever worker of ``pytest -n`` runs it)."""
    kinds: list[str] = []
    _exits_2_with_one_line_naming_the_field(tmp_path=tmp_path, capsys=capsys, kinds=kinds)
    assert len(kinds) >= 200
    assert set(kinds) == {"value", "set", "unknown_key", "glob", "task", "yaml"}
