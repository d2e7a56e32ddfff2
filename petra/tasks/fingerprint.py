"""What a cache of a user's task must be keyed by, beyond the task's name and params.

The baseline cache was keyed by the task's name, params and seed alone. A model edited under
the same name loaded the old weights and died in a traceback (``size mismatch for
blocks.0.conv1.bias``), and a dataset relabelled under it reused the weights trained on the old
labels: the baseline read val 0.0, and the whole front was measured against it, with no
warning. The verdicts' cache hashed the modules' repr and parameter shapes, so a forward edited
alone kept the verdicts of the old one.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from petra.tasks.contract import tensors_in


def code_of(model: nn.Module) -> str:
    """A hash of the source of every class of module in ``model`` (its qualified name where the
    source cannot be read): what its forward computes."""
    h = hashlib.sha256()
    # a TaskModel holds the user's model as ``inner``, outside its modules
    classes = {type(m) for m in (*model.modules(), getattr(model, "inner", model))}
    for cls in sorted(classes, key=lambda c: (c.__module__, c.__qualname__)):
        h.update(f"{cls.__module__}.{cls.__qualname__}".encode())
        try:
            h.update(inspect.getsource(cls).encode())
        except (OSError, TypeError):
            pass
    return h.hexdigest()[:16]


def _tensor(h: Any, t: torch.Tensor, *, values: bool) -> None:
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    if values:
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")


def _first(batches: Iterable[Any]) -> Any:
    return next(iter(batches), None)


def fingerprint(task: Any, *, weights: bool) -> str:
    """A hash of ``task``'s model (its classes' source, its repr, its state's names, shapes and
    dtypes, and with ``weights`` their values), of its first validation and test batches and
    its splits' lengths, and of its training recipe (``train_epochs``, ``train_lr``, the loss).
    The training batches are left out: a shuffled loader gives another first batch each time."""
    h = hashlib.sha256()
    model = task.model
    h.update(code_of(model).encode())
    h.update(repr(getattr(model, "inner", model)).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        _tensor(h, t, values=weights)
    for split in ("train", "val", "test"):
        batches = getattr(task, split)
        h.update(f"{split}:{len(batches) if hasattr(batches, '__len__') else '-'}".encode())
        if split != "train" and (batch := _first(batches)) is not None:
            for t in tensors_in(batch):
                _tensor(h, t, values=True)
    loss = getattr(task.loss, "__qualname__", type(task.loss).__qualname__)
    try:
        loss += inspect.getsource(task.loss)
    except (OSError, TypeError):
        pass
    h.update(f"{task.train_epochs}|{task.train_lr}|{loss}".encode())
    return h.hexdigest()[:16]
