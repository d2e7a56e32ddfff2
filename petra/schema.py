"""The config schema: pydantic models of every section, with validators that name the field,
the value and what is allowed (:mod:`petra.config` loads YAML into them).
"""

import hashlib
import json
import math
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from petra.engine.objectives import DIRECTIONS, check_objectives
from petra.registry import REGISTRIES

METRICS: tuple[str, ...] = (
    "val_accuracy",
    "artifact_bytes",
    "size_ratio",
    "latency_ratio",
    "latency_ms",
    "params",
    "macs",
)


# ---------------------------------------------------------------------------------------------
# Validators


def _reject(allowed: str, detail: str = "") -> PydanticCustomError:
    """An error that says ``allowed`` (or the whole ``detail``) whatever the field's description."""
    return PydanticCustomError("petra", "{allowed}", {"allowed": allowed, "detail": detail})


def _registered(kind: str) -> AfterValidator:
    def check(name: str) -> str:
        registry = REGISTRIES[kind]
        if name not in registry:
            choices = ", ".join(registry.names()) or "(nothing registered)"
            raise _reject(
                f"must be one of {choices}",
                f"unknown {registry.kind} {name!r}; choose from {choices}",
            )
        return name

    return AfterValidator(check)


def _objective(value: str) -> str:
    if ":" not in value:
        raise _reject('must be "metric:direction", e.g. "val_accuracy:max"')
    metric, direction = value.partition(":")[0].strip(), value.partition(":")[2].strip()
    if metric not in METRICS:
        choices = ", ".join(METRICS)
        raise _reject(
            f"must be one of {choices}", f"unknown metric {metric!r}; choose from {choices}"
        )
    try:
        ((metric, direction),) = check_objectives([value])
    except ValueError:
        choices = ", ".join(DIRECTIONS)
        raise _reject(
            f"must be one of {choices}", f"unknown direction {direction!r}; choose from {choices}"
        ) from None
    return f"{metric}:{direction}"


def _pair(
    *, low: float, high: float | None = None, open_low: bool = False, integer: bool = False
) -> BeforeValidator:
    """Checks a ``[lo, hi]`` pair: ``low <= lo <= hi <= high`` (``low < lo`` if ``open_low``)."""

    def number(value: Any) -> float | int:
        if isinstance(value, bool) or (integer and not isinstance(value, int)):
            raise ValueError("wrong type")
        try:
            number = value if integer else float(value)  # "1e-3" too: YAML reads it as a str
        except TypeError:
            raise ValueError("not a number") from None
        if not math.isfinite(number):
            raise ValueError("not finite")
        return number

    def check(value: Any) -> tuple[Any, Any]:
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise ValueError("not a pair")
        lo, hi = number(value[0]), number(value[1])
        if not (
            (lo > low if open_low else lo >= low) and lo <= hi and (high is None or hi <= high)
        ):
            raise ValueError("out of range")
        return lo, hi

    return BeforeValidator(check)


# ---------------------------------------------------------------------------------------------
# Schema


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TaskConfig(_Model):
    """The task: a built-in name or ``"package.module:function"``, called with ``params``."""

    name: str = Field(
        "digits_cnn",
        pattern=r"^[^:\s]+(:[^:\s]+)?$",
        description='a built-in task name or "package.module:function"',
    )
    params: dict[str, Any] = Field({}, description="a mapping of keyword arguments for the task")


class LayersConfig(_Model):
    """Globs over module names: a layer is searched if it matches ``include`` and not ``exclude``."""

    include: list[str] = Field(["*"], min_length=1, description="a non-empty list of glob strings")
    exclude: list[str] = Field([], description="a list of glob strings")


class FinetuneConfig(_Model):
    """Ranges of the fine-tuning genes."""

    epochs: Annotated[tuple[int, int], _pair(low=0, high=1000, integer=True)] = Field(
        (0, 4), description="[lo, hi] of integers with 0 <= lo <= hi <= 1000"
    )
    lr: Annotated[tuple[float, float], _pair(low=0.0, high=10.0, open_low=True)] = Field(
        (1e-4, 1e-2), description="[lo, hi] with 0 < lo <= hi <= 10"
    )


class StaticQuantConfig(_Model):
    """Ranges of the static int8 schemes' genes (schemes with registry meta ``static``:
    ``int8_static``, ``int8_static_linear``, ``qat``); a range of one value is no gene."""

    calibration: list[Literal["minmax", "percentile", "entropy"]] = Field(
        ["minmax"], min_length=1,
        description="a non-empty list of minmax, percentile, entropy",
    )
    smooth_alpha: Annotated[tuple[float, float], _pair(low=0.0, high=1.0)] = Field(
        (0.0, 0.0), description="[lo, hi] with 0 <= lo <= hi <= 1 (0: no SmoothQuant)"
    )
    fallback: Annotated[tuple[float, float], _pair(low=0.0, high=1.0)] = Field(
        (0.0, 0.0),
        description="[lo, hi] with 0 <= lo <= hi <= 1 (the share of weight layers kept float)",
    )


class SpaceConfig(_Model):
    """What may be searched; each list narrows the genes of :func:`petra.space.build_space`."""

    pruning: list[Annotated[str, _registered("pruning")]] = Field(
        ["none", "magnitude", "l2_channel"],
        min_length=1,
        description="a non-empty list of registered pruning method names",
    )
    sparsity: Annotated[tuple[float, float], _pair(low=0.0, high=0.99)] = Field(
        (0.0, 0.9), description="[lo, hi] with 0 <= lo <= hi <= 0.99"
    )
    layers: LayersConfig = LayersConfig()
    width: Annotated[tuple[float, float], _pair(low=0.0, high=0.99)] = Field(
        (0.0, 0.5), description="[lo, hi] with 0 <= lo <= hi <= 0.99 (the share of the "
        "residual stream's channels removed; [0, 0] offers no width gene; set on a model with "
        "no stream, `petra space` lists prune.width as withheld, with why)"
    )
    round_to: list[Annotated[StrictInt, Field(ge=1)]] = Field(
        [1, 8, 16], min_length=1, description="a non-empty list of integers >= 1"
    )
    quantization: list[Annotated[str, _registered("quantization")]] = Field(
        ["none", "int8_static"],
        min_length=1,
        description="a non-empty list of registered quantization scheme names",
    )
    static: StaticQuantConfig = StaticQuantConfig()
    regularizer: list[Annotated[str, _registered("regularizer")]] = Field(
        ["none", "l1"], min_length=1, description="a non-empty list of registered regularizer names"
    )
    reg_strength: Annotated[tuple[float, float], _pair(low=0.0, open_low=True)] = Field(
        (1e-6, 1e-3), description="[lo, hi] with 0 < lo <= hi"
    )
    finetune: FinetuneConfig = FinetuneConfig()
    sparsity_rules: list[Annotated[str, _registered("sparsity_rule")]] = Field(
        ["fixed"], min_length=1,
        description="a non-empty list of registered sparsity rules (fixed, auto_emp)",
    )
    emp_beta: Annotated[tuple[float, float], _pair(low=0.0, high=10.0, open_low=True)] = Field(
        (0.5, 2.0), description="[lo, hi] with 0 < lo <= hi <= 10"
    )
    emp_scope: list[Literal["layer", "global"]] = Field(
        ["layer", "global"], min_length=1, description="a non-empty list of layer, global"
    )
    rank_rules: list[Annotated[str, _registered("rank_rule")]] = Field(
        ["energy"], min_length=1,
        description="a non-empty list of registered rank rules (energy, mp)",
    )
    eq_beta: Annotated[tuple[float, float], _pair(low=0.0, high=100.0, open_low=True)] = Field(
        (0.05, 2.0), description="[lo, hi] with 0 < lo <= hi <= 100"
    )
    eq_gamma: Annotated[tuple[float, float], _pair(low=0.0, high=10.0)] = Field(
        (0.0, 0.05), description="[lo, hi] with 0 <= lo <= hi <= 10"
    )
    skip_blocks: StrictBool = Field(
        False, description="true or false (whether whole residual blocks may be skipped)"
    )
    shapley_permutations: StrictInt = Field(
        4, ge=1, le=1000, description="an integer in [1, 1000]"
    )


class ConstraintsConfig(_Model):
    """Optional limits; a candidate that breaks one is not on the feasible front."""

    max_accuracy_drop: float | None = Field(
        None, ge=0.0, le=1.0, description="null or a number in [0, 1]"
    )
    max_bytes: float | None = Field(None, gt=0.0, description="null or a number > 0")
    max_latency_ratio: float | None = Field(None, gt=0.0, description="null or a number > 0")


class MultiFidelityConfig(_Model):
    """Stopping candidates after a short fine-tune when they cannot reach the front."""

    enabled: StrictBool = Field(True, description="true or false")
    rung_epochs: StrictInt = Field(1, ge=1, le=1000, description="an integer in [1, 1000]")
    headroom: float | None = Field(
        None, ge=0.0, le=1.0,
        description="null (learned from the search's survivors) or a number in [0, 1]",
    )


class RacingConfig(_Model):
    """Screening many offspring at tier 0 and measuring only the promising ones
    (:mod:`petra.engine.racing`)."""

    enabled: StrictBool = Field(False, description="true or false")
    factor: StrictInt = Field(
        4, ge=1, le=64,
        description="an integer in [1, 64]: the most offspring screened per generation, in "
        "populations")
    screen_share: float | None = Field(
        0.25, gt=0.0, le=16.0,
        description="null or a number in (0, 16]: screening may take at most this share of the "
        "time measuring takes each generation (the count sized from the search's median screen "
        "and evaluation times; a screen's first timings of new layer shapes, paid once per "
        "search, do not count); null screens factor x population every generation")
    select: Literal["rank", "hypervolume"] = Field(
        "hypervolume", description="one of rank, hypervolume: which of the candidates the front does "
        "not dominate are measured, when more are left than a population (rank: in "
        "non-dominated order of their predictions; hypervolume: greedily by the hypervolume "
        "their optimistic predictions add to the front)")


class SearchSettings(_Model):
    """The search strategy and its budget."""

    strategy: Annotated[str, _registered("strategy")] = Field(
        "nsga2", description="a registered search strategy (petra methods lists them)"
    )
    population: StrictInt = Field(16, ge=2, description="an integer >= 2")
    generations: StrictInt = Field(6, ge=1, description="an integer >= 1")
    time_budget_s: float | None = Field(None, gt=0.0, description="null or a number of seconds > 0")
    multi_fidelity: MultiFidelityConfig = MultiFidelityConfig()
    racing: RacingConfig = RacingConfig()


class ExecutionConfig(_Model):
    """Where candidates run: a Ray cluster (local when ``address`` is null) or in-process."""

    address: str | None = Field(
        None,
        pattern=r"^(ray://)?[\w.-]+:\d{1,5}$",
        description='null (a local cluster) or "host:port" of a Ray cluster',
    )
    workers: StrictInt = Field(2, ge=1, description="an integer >= 1")
    cpus_per_candidate: StrictInt = Field(1, ge=1, description="an integer >= 1")
    gpus_per_candidate: float = Field(
        0.0, ge=0.0, le=64.0,
        description="a number in [0, 64]: Ray's num_gpus per worker (fractions share a GPU)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="one of auto, cpu, cuda: where fine-tunes and tier-0 screens run "
        "(auto: cuda when the worker has a GPU)")
    executor: Literal["ray", "local"] = Field("ray", description="one of ray, local")
    memory_limit_mb: StrictInt | None = Field(
        None, ge=64, description="null (no limit) or an integer number of MiB >= 64"
    )
    layer_cache_mb: float = Field(
        256.0, ge=0.0, description="a number of MiB >= 0: each worker's cache of sorted pruning "
        "scores, shared through Ray's object store (0 turns it off)")


class MeasureConfig(_Model):
    """The deployment runtime that latency is measured on."""

    providers: list[Annotated[str, Field(pattern=r"^[A-Za-z]+ExecutionProvider$")]] = Field(
        ["CPUExecutionProvider"], min_length=1,
        description="a non-empty list of ONNX Runtime execution providers (names ending in "
        "ExecutionProvider) in order of preference, e.g. [CUDAExecutionProvider, "
        "CPUExecutionProvider]")


class TrackingConfig(_Model):
    """The MLflow store and experiment."""

    uri: str = Field("sqlite:///runs/mlflow.db", min_length=1, description="a non-empty string")
    experiment: str = Field("petra", min_length=1, description="a non-empty string")


class SearchConfig(_Model):
    """A whole search: the task, the space, the objectives and how to run and track it."""

    name: str = Field("petra", min_length=1, description="a non-empty string")
    seed: StrictInt = Field(0, ge=0, description="an integer >= 0")
    task: TaskConfig = TaskConfig()
    space: SpaceConfig = SpaceConfig()
    objectives: list[Annotated[str, AfterValidator(_objective)]] = Field(
        ["val_accuracy:max", "artifact_bytes:min", "latency_ratio:min"],
        min_length=2,
        max_length=4,
        description='a list of 2 to 4 "metric:direction" strings, no metric twice, '
        'e.g. "val_accuracy:max"',
    )
    constraints: ConstraintsConfig = ConstraintsConfig()
    search: SearchSettings = SearchSettings()
    execution: ExecutionConfig = ExecutionConfig()
    measure: MeasureConfig = MeasureConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        # A YAML section whose keys are all commented out reads as null: take the defaults.
        if not isinstance(data, dict):
            return data
        sections = {k for k, f in cls.model_fields.items() if _is_model(f.annotation)}
        return {k: {} if v is None and k in sections else v for k, v in data.items()}

    @field_validator("objectives")
    @classmethod
    def _distinct_metrics(cls, objectives: list[str]) -> list[str]:
        metrics = [o.partition(":")[0] for o in objectives]
        if len(set(metrics)) != len(metrics):
            raise ValueError("a metric twice")
        return objectives

    @property
    def objective_list(self) -> list[tuple[str, str]]:
        """The objectives as ``(metric, direction)`` pairs, e.g. ``("val_accuracy", "max")``."""
        return [tuple(o.split(":")) for o in self.objectives]  # type: ignore[misc]

    def flat(self) -> dict[str, str]:
        """The config as dotted keys and string values, for MLflow params."""
        return _flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        """The config as YAML text that :func:`load_config` reads back to an equal config."""
        return yaml.safe_dump(
            self.model_dump(mode="json"), sort_keys=False, default_flow_style=None
        )


def parse_objectives(cfg: SearchConfig) -> list[tuple[str, str]]:
    """The objectives of ``cfg`` as ``(metric, direction)`` pairs."""
    return cfg.objective_list


def task_hash(task: TaskConfig) -> str:
    """The first 16 hex digits of the sha256 of the task's canonical JSON (name and params)."""
    payload = json.dumps(
        {"name": task.name, "params": task.params},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _flatten(value: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value if isinstance(value, str) else json.dumps(value, sort_keys=True)}


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)
