"""Tests for petra.config: defaults, YAML round trips, --set overrides and one-line errors."""

import contextlib
import textwrap

import pytest

from petra.config import (
    ConfigError,
    SearchConfig,
    TaskConfig,
    load_config,
    parse_objectives,
    task_hash,
)
from petra.registry import PRUNING, QUANTIZATION, REGULARIZERS

BUILT_INS = {
    PRUNING: ("none", "magnitude", "l2_channel"),
    QUANTIZATION: ("none", "int8_static"),
    REGULARIZERS: ("none", "l1"),
}

FULL_YAML = """\
name: quickstart
seed: 7
task: {name: "my_pkg.tasks:build", params: {width: 32, data: {root: /tmp/x}}}
space:
  pruning: [none, l2_channel]
  sparsity: [0.1, 0.8]
  layers: {include: ["features.*", "fc*"], exclude: [fc3]}
  round_to: [1, 8]
  quantization: [none, int8_static]
  regularizer: [none, l1]
  reg_strength: [1.0e-5, 1.0e-2]
  finetune: {epochs: [1, 3], lr: [1.0e-3, 1.0e-1]}
objectives: [val_accuracy:max, size_ratio:min, latency_ms:min, macs:min]
constraints: {max_accuracy_drop: 0.02, max_bytes: 1.0e+6, max_latency_ratio: 0.9}
search: {strategy: random, population: 8, generations: 3, time_budget_s: 600}
execution: {address: "10.0.0.5:6379", workers: 4, cpus_per_candidate: 2, executor: local}
tracking: {uri: "http://mlflow:5000", experiment: team}
"""


@pytest.fixture(scope="module", autouse=True)
def built_in_methods():
    """Registers the built-in method names while petra.compress is missing or incomplete."""
    with contextlib.suppress(ImportError):
        import petra.compress  # noqa: F401
    added = []
    for registry, names in BUILT_INS.items():
        for name in names:
            if name not in registry:
                registry.register(name, description="test stand-in")(lambda *a, **k: None)
                added.append((registry, name))
    yield
    for registry, name in added:  # leave the registries as they were for other test modules
        del registry._entries[name]


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(source, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(source, overrides)
    message = str(info.value)
    assert "\n" not in message
    return info.value, message


def test_empty_mapping_gives_the_documented_defaults():
    cfg = load_config({})
    assert cfg.name == "petra" and cfg.seed == 0
    assert (cfg.task.name, cfg.task.params) == ("digits_cnn", {})
    assert cfg.space.pruning == ["none", "magnitude", "l2_channel"]
    assert cfg.space.sparsity == (0.0, 0.9)
    assert (cfg.space.layers.include, cfg.space.layers.exclude) == (["*"], [])
    assert cfg.space.round_to == [1, 8, 16]
    assert cfg.space.quantization == ["none", "int8_static"]
    assert cfg.space.regularizer == ["none", "l1"]
    assert cfg.space.reg_strength == (1e-6, 1e-3)
    assert cfg.space.finetune.epochs == (0, 4) and cfg.space.finetune.lr == (1e-4, 1e-2)
    assert cfg.objective_list == [
        ("val_accuracy", "max"),
        ("artifact_bytes", "min"),
        ("latency_ratio", "min"),
    ]
    assert parse_objectives(cfg) == cfg.objective_list
    assert cfg.constraints.model_dump() == {
        "max_accuracy_drop": None,
        "max_bytes": None,
        "max_latency_ratio": None,
    }
    assert cfg.search.model_dump() == {
        "strategy": "nsga2",
        "population": 16,
        "generations": 6,
        "time_budget_s": None,
        "multi_fidelity": {"enabled": True, "rung_epochs": 1, "headroom": None},
        "racing": {"enabled": False, "factor": 4, "screen_share": 0.25,
                   "select": "hypervolume"},
    }
    assert cfg.execution.model_dump() == {
        "address": None,
        "workers": 2,
        "cpus_per_candidate": 1,
        "gpus_per_candidate": 0.0,
        "device": "auto",
        "executor": "ray",
        "memory_limit_mb": None,
        "layer_cache_mb": 256.0,
    }
    assert cfg.measure.providers == ["CPUExecutionProvider"]
    assert (cfg.tracking.uri, cfg.tracking.experiment) == ("sqlite:///runs/mlflow.db", "petra")
    assert load_config({}) == SearchConfig()


def test_empty_file_and_null_sections_take_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == SearchConfig()
    cfg = load_config(write(tmp_path, "search:\n  # population: 4\nseed: 3\n"))
    assert cfg.search.population == 16 and cfg.seed == 3


def test_full_yaml_file_loads_and_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, FULL_YAML))
    assert cfg.task.params == {"width": 32, "data": {"root": "/tmp/x"}}
    assert cfg.space.layers.exclude == ["fc3"]
    assert cfg.space.finetune.epochs == (1, 3)
    assert cfg.objective_list[-1] == ("macs", "min")
    assert cfg.constraints.max_bytes == 1e6
    assert cfg.search.time_budget_s == 600.0
    assert cfg.execution.executor == "local" and cfg.execution.address == "10.0.0.5:6379"

    again = load_config(write(tmp_path, cfg.to_yaml(), name="again.yaml"))
    assert again == cfg
    assert load_config(cfg.model_dump()) == cfg


def test_overrides_apply_before_validation_with_yaml_types(tmp_path):
    path = write(tmp_path, FULL_YAML)
    cfg = load_config(path, ["search.population=4", "execution.workers=1"])
    assert cfg.search.population == 4 and type(cfg.search.population) is int
    assert cfg.execution.workers == 1 and type(cfg.execution.workers) is int

    cfg = load_config(
        {},
        [
            "tracking.uri=sqlite:///x.db",
            "execution.address=null",
            "space.pruning=[none, magnitude]",
            "constraints.max_accuracy_drop=0.05",
            "task.params.depth=3",
        ],
    )
    assert cfg.tracking.uri == "sqlite:///x.db" and isinstance(cfg.tracking.uri, str)
    assert cfg.execution.address is None
    assert cfg.space.pruning == ["none", "magnitude"]
    assert cfg.constraints.max_accuracy_drop == 0.05
    assert cfg.task.params == {"depth": 3}


def test_overrides_leave_the_callers_mapping_alone():
    data = {"search": {"population": 8}}
    load_config(data, ["search.population=4"])
    assert data == {"search": {"population": 8}}


def test_numbers_that_yaml_reads_as_strings_are_accepted():
    cfg = load_config({"space": {"reg_strength": ["1e-6", "1e-3"]}}, ["search.time_budget_s=1e3"])
    assert cfg.space.reg_strength == (1e-6, 1e-3)
    assert cfg.search.time_budget_s == 1000.0


def test_flat_gives_dotted_string_params():
    cfg = load_config({"task": {"params": {"width": 32}}}, ["search.population=4"])
    flat = cfg.flat()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in flat.items())
    assert flat["search.population"] == "4"
    assert flat["task.params.width"] == "32"
    assert flat["space.pruning"] == '["none", "magnitude", "l2_channel"]'
    assert flat["space.sparsity"] == "[0.0, 0.9]"
    assert flat["execution.address"] == "null"
    assert flat["tracking.uri"] == "sqlite:///runs/mlflow.db"


def test_task_hash_is_short_stable_and_depends_on_name_and_params():
    a = task_hash(TaskConfig(name="digits_cnn", params={"a": 1, "b": [1, 2]}))
    assert len(a) == 16 and int(a, 16) >= 0
    assert a == task_hash(TaskConfig(name="digits_cnn", params={"b": [1, 2], "a": 1}))
    assert a != task_hash(TaskConfig(name="digits_cnn", params={"a": 2, "b": [1, 2]}))
    assert a != task_hash(TaskConfig(name="other", params={"a": 1, "b": [1, 2]}))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # unknown keys, listing the keys of that section
        (
            {"populaton": 4},
            "populaton: unknown key; allowed keys are name, seed, task, space, objectives,",
        ),
        (
            {"search": {"populaton": 4}},
            "search.populaton: unknown key; allowed keys are "
            "strategy, population, generations, time_budget_s",
        ),
        (
            {"space": {"finetune": {"epoch": [0, 1]}}},
            "space.finetune.epoch: unknown key; allowed keys are epochs, lr",
        ),
        # wrong types
        (
            {"search": {"population": "abc"}},
            "search.population: must be an integer >= 2; got 'abc'",
        ),
        ({"space": {"pruning": "magnitude"}}, "space.pruning: must be a non-empty list of"),
        ({"search": 5}, "search: must be a mapping with keys strategy, population,"),
        # out of range
        ({"search": {"population": -3}}, "search.population: must be an integer >= 2; got -3"),
        (
            {"space": {"sparsity": [0.5, 0.2]}},
            "space.sparsity: must be [lo, hi] with 0 <= lo <= hi",
        ),
        ({"space": {"sparsity": [0, 1.2]}}, "space.sparsity: must be [lo, hi] with 0 <= lo <= hi"),
        ({"space": {"sparsity": [0.1]}}, "space.sparsity: must be [lo, hi]"),
        ({"space": {"sparsity": [None, [1]]}}, "space.sparsity: must be [lo, hi]"),
        ({"space": {"sparsity": ["a", 0.5]}}, "space.sparsity: must be [lo, hi]"),
        (
            {"space": {"finetune": {"epochs": [0, 2.5]}}},
            "space.finetune.epochs: must be [lo, hi] of",
        ),
        (
            {"space": {"reg_strength": [0, 1e-3]}},
            "space.reg_strength: must be [lo, hi] with 0 < lo",
        ),
        (
            {"space": {"round_to": [8, 0]}},
            "space.round_to[1]: must be a non-empty list of integers",
        ),
        ({"constraints": {"max_accuracy_drop": 1.5}}, "constraints.max_accuracy_drop: must be"),
        ({"name": ""}, "name: must be a non-empty string; got ''"),
        # unknown choices
        (
            {"space": {"pruning": ["none", "foo"]}},
            "space.pruning[1]: unknown pruning method 'foo'; choose from none, magnitude",
        ),
        (
            {"space": {"quantization": ["int4"]}},
            "space.quantization[0]: unknown quantization scheme 'int4'; choose from none,",
        ),
        ({"search": {"strategy": "cmaes"}}, "search.strategy: unknown search strategy 'cmaes'; choose from "),
        ({"execution": {"executor": "dask"}}, "execution.executor: must be one of ray, local"),
        ({"execution": {"address": "localhost"}}, "execution.address: must be null (a local"),
        ({"execution": {"device": "gpu"}}, "execution.device: must be one of auto, cpu, cuda"),
        ({"execution": {"gpus_per_candidate": -1}}, "execution.gpus_per_candidate: must be a "
                                                    "number in [0, 64]"),
        ({"measure": {"providers": ["cuda"]}}, "measure.providers[0]: must be a non-empty list of ONNX"),
        ({"measure": {"providers": []}}, "measure.providers: must be a non-empty list of ONNX"),
        # objectives
        (
            {"objectives": ["val_accuracy:max", "flops:min"]},
            "objectives[1]: unknown metric 'flops'; choose from val_accuracy, artifact_bytes,",
        ),
        (
            {"objectives": ["val_accuracy:up", "params:min"]},
            "objectives[0]: unknown direction 'up'; choose from max, min",
        ),
        (
            {"objectives": ["val_accuracy", "params:min"]},
            'objectives[0]: must be "metric:direction", e.g. "val_accuracy:max"; '
            "got 'val_accuracy'",
        ),
        ({"objectives": ["val_accuracy:max"]}, "objectives: must be a list of 2 to 4"),
        (
            {"objectives": ["params:min", "params:max"]},
            'objectives: must be a list of 2 to 4 "metric:direction" strings, no metric twice',
        ),
    ],
)
def test_each_mistake_is_one_line_naming_field_and_value(data, expected):
    error, message = error_of(data)
    assert message.startswith(expected)
    assert message.startswith(f"{error.field}: ")
    assert error.allowed


def test_error_attributes():
    error, message = error_of({"search": {"population": -3}})
    assert (error.field, error.value, error.allowed) == (
        "search.population",
        -3,
        "must be an integer >= 2",
    )
    assert message == "search.population: must be an integer >= 2; got -3"
    assert isinstance(error, ValueError)


def test_only_the_first_error_is_reported():
    _, message = error_of({"seed": -1, "search": {"population": -3}})
    assert message == "seed: must be an integer >= 0; got -1"


def test_mistakes_in_overrides_are_reported_like_file_mistakes(tmp_path):
    path = write(tmp_path, FULL_YAML)
    _, message = error_of(path, ["search.population=-3"])
    assert message == "search.population: must be an integer >= 2; got -3"
    _, message = error_of(path, ["search.populaton=4"])
    assert message.startswith("search.populaton: unknown key; allowed keys are strategy,")


@pytest.mark.parametrize("override", ["search.population", "=4", "search..population=4"])
def test_override_syntax_errors_name_the_override(override):
    error, message = error_of({}, [override])
    assert error.field == "--set" and error.value == override
    assert (
        message
        == f'--set: must be "dotted.key=value", e.g. "search.population=4"; got {override!r}'
    )


def test_override_that_crosses_a_non_mapping_names_it():
    error, message = error_of({"seed": 3}, ["seed.value=1"])
    assert error.field == "seed.value" and error.value == 3
    assert message == "seed.value: --set cannot go inside 'seed', which is not a mapping; got 3"


def test_missing_file(tmp_path):
    error, message = error_of("x.yaml")
    assert message == "config: file not found; got 'x.yaml'"
    error, message = error_of(tmp_path / "nope.yaml")
    assert error.field == "config" and "nope.yaml" in message


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = write(tmp_path, "name: ok\nsearch:\n  population: [4\n  generations: 2\n")
    error, message = error_of(path)
    assert error.field == "config" and error.value == str(path)
    assert message.startswith("config: must be valid YAML (")
    assert "line 4, column" in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    error, message = error_of(write(tmp_path, text))
    assert message.startswith("config: must be a mapping with keys name, seed, task,")
