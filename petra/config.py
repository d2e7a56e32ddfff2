"""Configs: YAML loading, ``--set`` overrides and one-line errors (the schema is
:mod:`petra.schema`, re-exported here).

A config is a YAML mapping of sections. Every key has a default, so ``{}`` is a valid config::

    name: quickstart
    space: {pruning: [none, magnitude], sparsity: [0.0, 0.9]}
    search: {population: 16, generations: 6}

Every mistake raises :class:`ConfigError`, whose message is one line naming the field, what is
allowed and the value received::

    search.population: must be an integer >= 2; got -3
"""

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from petra.engine.objectives import DIRECTIONS
from petra.errors import ConfigError
from petra.schema import (
    METRICS,
    ConstraintsConfig,
    ExecutionConfig,
    FinetuneConfig,
    LayersConfig,
    MultiFidelityConfig,
    SearchConfig,
    SearchSettings,
    SpaceConfig,
    StaticQuantConfig,
    TaskConfig,
    TrackingConfig,
    _is_model,
    parse_objectives,
    task_hash,
)

# ---------------------------------------------------------------------------------------------
# Loading


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any], overrides: Sequence[str] = ()
) -> SearchConfig:
    """Read, override and validate a config.

    Args:
        source: a path to a YAML file, or a mapping (not changed).
        overrides: ``"dotted.key=value"`` strings applied before validation; the value is read as
            YAML, so ``4`` is an int, ``null`` is None and ``[a, b]`` is a list.

    Raises:
        ConfigError: the file is missing or not YAML, an override is malformed, or a value is not
            allowed. The message is one line naming the field and the value.
    """
    data = copy.deepcopy(dict(source)) if isinstance(source, Mapping) else _read(source)
    if not isinstance(data, dict):
        raise ConfigError(
            "config", data, f"must be a mapping with keys {', '.join(SearchConfig.model_fields)}"
        )
    for override in overrides:
        _apply(data, override)
    try:
        return SearchConfig.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc.errors()[0]) from None


def _read(path: str | os.PathLike[str]) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config", str(path), "file not found") from None
    except OSError as exc:
        raise ConfigError("config", str(path), f"file cannot be read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(
            "config", str(path), f"must be valid YAML ({_yaml_problem(exc)})"
        ) from None
    return {} if data is None else data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = " ".join(str(getattr(exc, "problem", None) or "syntax error").split())
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _apply(data: dict[str, Any], override: str) -> None:
    """Set ``data[a][b] = value`` for ``"a.b=value"``, creating mappings on the way."""
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(
            "--set", override, 'must be "dotted.key=value", e.g. "search.population=4"'
        )
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(
            key.strip(), raw, f"--set value must be YAML ({_yaml_problem(exc)})"
        ) from None
    node = data
    for depth, part in enumerate(parts[:-1], start=1):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError(
                key.strip(),
                node[part],
                f"--set cannot go inside {'.'.join(parts[:depth])!r}, which is not a mapping",
            )
        node = node[part]
    node[parts[-1]] = value


def _config_error(error: ErrorDetails) -> ConfigError:
    """Rewrite pydantic's first error as a one-line :class:`ConfigError`."""
    loc, value, ctx = error["loc"], error.get("input"), error.get("ctx") or {}
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    field = field or "config"
    if error["type"] == "petra":
        return ConfigError(field, value, ctx["allowed"], ctx["detail"] or None)
    owner, info = _lookup(loc)
    if error["type"] == "extra_forbidden" and owner is not None:
        keys = ", ".join(owner.model_fields)
        return ConfigError(
            field, value, f"must be one of {keys}", f"unknown key; allowed keys are {keys}"
        )
    if info is not None and _is_model(info.annotation):
        allowed = f"must be a mapping with keys {', '.join(info.annotation.model_fields)}"
    elif info is not None and info.description:
        allowed = f"must be {info.description}"
    else:
        allowed = error["msg"]
    return ConfigError(field, value, allowed)


def _lookup(loc: tuple[int | str, ...]) -> tuple[type[BaseModel] | None, FieldInfo | None]:
    """The model reached along ``loc`` and the last field on the way."""
    model: type[BaseModel] | None = SearchConfig
    info: FieldInfo | None = None
    for part in loc:
        if model is None or part not in model.model_fields:
            break
        info = model.model_fields[part]
        model = info.annotation if _is_model(info.annotation) else None
    return model, info


__all__ = [
    "DIRECTIONS",
    "METRICS",
    "ConfigError",
    "ConstraintsConfig",
    "ExecutionConfig",
    "FinetuneConfig",
    "LayersConfig",
    "MultiFidelityConfig",
    "SearchConfig",
    "SearchSettings",
    "SpaceConfig",
    "StaticQuantConfig",
    "TaskConfig",
    "TrackingConfig",
    "load_config",
    "parse_objectives",
    "task_hash",
]
