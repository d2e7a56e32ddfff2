"""Tasks: a model with its data and metric, built-in or loaded from ``"package.module:function"``.

A user's task is written against the same contract as the built-in ones (see :class:`Task`).
Loading a task from an import string runs code the user chose to run.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from petra.errors import ConfigError, first_line
from petra.registry import TASKS


def accuracy(outputs: Any, targets: Any) -> float:
    """Top-1 accuracy of logits ``outputs`` against integer ``targets`` (torch tensors; numpy
    arrays are accepted too)."""
    import numpy as np

    out = np.asarray(outputs.detach().cpu() if hasattr(outputs, "detach") else outputs)
    tgt = np.asarray(targets.detach().cpu() if hasattr(targets, "detach") else targets)
    return float((out.argmax(axis=-1) == tgt).mean()) if len(tgt) else 0.0


def cross_entropy(outputs: Any, targets: Any) -> Any:
    import torch.nn.functional as F

    return F.cross_entropy(outputs, targets)


@dataclass
class Task:
    """What petra needs to compress a model.

    Attributes:
        model: the ``nn.Module`` to compress.
        train, val, test: re-iterable collections of ``(inputs, targets)`` batches.
        example_input: one batch of inputs, used for tracing, export and latency: a tensor, a
            tuple of tensors, or a dict of tensors (passed to the model as keywords, e.g.
            ``input_ids`` and ``attention_mask``). Each becomes a named ONNX input with a
            dynamic batch axis; every batch's inputs take the same form.
        output: ``model output -> tensor``, for a model that returns a tuple, a dict or a
            ``ModelOutput``. None (the default) takes a tensor as it is, else ``logits``, else
            ``last_hidden_state``, else the first tensor.
        metric: ``(outputs, targets) -> float`` on torch tensors, higher is better; averaged
            over batches weighted by batch size.
        loss: ``(outputs, targets) -> tensor`` on torch tensors, the training loss;
            cross-entropy by default.
        trained: when False, petra trains the baseline itself and caches it.
        train_epochs, train_lr: the baseline's training recipe when ``trained`` is False.
    """

    model: Any
    train: Iterable[Any]
    val: Iterable[Any]
    test: Iterable[Any]
    example_input: Any
    output: Callable[[Any], Any] | None = None
    metric: Callable[[Any, Any], float] = accuracy
    loss: Callable[[Any, Any], Any] = cross_entropy
    trained: bool = False
    train_epochs: int = 20
    train_lr: float = 3e-3
    info: dict[str, Any] = field(default_factory=dict)
    #: The ONNX input names, set by :func:`petra.tasks.contract.adapt`.
    input_names: tuple[str, ...] = ()
    #: The layers :func:`petra.tasks.stand_ins.linear_stand_ins` replaced by an ``nn.Linear``.
    linear_stand_ins: tuple[str, ...] = ()
    #: The frozen BatchNorms :func:`petra.tasks.stand_ins.frozen_norms` replaced.
    frozen_norms: tuple[str, ...] = ()
    #: The buffers :func:`petra.tasks.stand_ins.buffers_as_parameters` made frozen parameters.
    buffer_parameters: tuple[str, ...] = ()
    #: The layers whose weight norm or spectral norm :func:`petra.tasks.stand_ins.plain_weights`
    #: baked into a plain weight.
    plain_weights: tuple[str, ...] = ()
    #: The attentions :func:`petra.tasks.widths.own_width_forwards` gave a forward that sizes
    #: their heads from their own width, not their input's.
    own_width: tuple[str, ...] = ()
    #: The dtype (float16, bfloat16, float64) of a model :func:`petra.tasks.contract.adapt`
    #: computes in float32, or "".
    cast_from: str = ""


def load_task(name: str, params: Mapping[str, Any] | None = None) -> Task:
    """Build a task from a built-in name or a ``"package.module:function"`` import string."""

    params = dict(params or {})
    if ":" in name:
        module_name, _, attr = name.partition(":")
        if os.getcwd() not in sys.path:  # a module beside the config, as `python -m` finds it
            sys.path.append(os.getcwd())
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except Exception as exc:  # noqa: BLE001 - importing user code can raise anything
            raise ConfigError(
                "task.name", name, "", f"cannot import {name!r} ({type(exc).__name__}: "
                f"{first_line(exc, typed=False)})") from exc
    elif name in TASKS:
        fn = TASKS.get(name).fn
    else:
        raise ConfigError("task.name", name, "", f"unknown task {name!r}; choose from "
                          f"{', '.join(TASKS.names())}, or give 'package.module:function'")
    if not callable(fn):
        raise ConfigError("task.name", name, "", f"{name!r} is not a function; got "
                          f"{type(fn).__name__}")
    try:
        task = fn(**params)
    except TypeError as exc:
        raise ConfigError("task.params", params, "",
                          f"{name} rejected its params ({first_line(exc, typed=False)})") from exc
    except Exception as exc:  # noqa: BLE001 - a user's task can raise anything
        raise ConfigError("task.name", name, "", f"the task {name!r} raised "
                          f"{type(exc).__name__}: {first_line(exc, typed=False)}") from exc
    if not isinstance(task, Task):
        raise ConfigError("task.name", name, "",
                          f"{name!r} must return a petra.Task; got {type(task).__name__}")
    from petra.tasks.contract import adapt

    try:
        return adapt(task)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError("task.name", name, "", f"the task {name!r} is outside the task "
                          f"contract: {first_line(exc, typed=False)}") from exc
