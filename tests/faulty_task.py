"""A user's task whose model misbehaves for some genomes, for the failure tests.

The model is a small MLP on iris. Its forward looks at the width of its hidden layer, which the
genome sets by pruning ``fc1``'s neurons (``l2_channel``), and injects the fault that ``faults``
names for that width (a key is a width, ``"12"``, or a range of widths, ``"4-7"``):

- ``raise``: raises ``ValueError``;
- ``nan``: makes the hidden activations NaN;
- ``memory``: allocates 8 GiB (past any sensible ``execution.memory_limit_mb``);
- ``die``: ends its process at once, as a crash or the OOM killer would;
- ``die_once``: the same the first time only (a file in ``marker_dir`` remembers it);
- ``hang``: sleeps for an hour, as a deadlocked kernel would.

The dense model (every hidden neuron kept) never misbehaves, so its baseline trains normally.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

HIDDEN = 32


def faulty_mlp(*, faults: dict[str, str] | None = None, marker_dir: str | None = None,
               seed: int = 0) -> Any:
    import numpy as np
    import torch
    from sklearn.datasets import load_iris
    from torch import nn

    from petra.tasks import Task

    table: dict[int, str] = {}
    for key, fault in (faults or {}).items():
        lo, _, hi = str(key).partition("-")
        for width in range(int(lo), int(hi or lo) + 1):
            table[width] = fault

    class FaultyMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(4, HIDDEN)
            self.fc2 = nn.Linear(HIDDEN, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc1(x)
            fault = table.get(int(h.shape[-1]))
            if fault == "raise":
                raise ValueError(f"injected fault at width {h.shape[-1]}")
            if fault == "nan":
                h = h * float("nan")
            if fault == "memory":
                block = torch.empty(8 * 1024**3, dtype=torch.uint8)
                h = h + float(block[:1].zero_().sum())
            if fault == "hang":
                time.sleep(3600)
            if fault == "die" or (fault == "die_once" and marker_dir is not None
                                  and _first_time(Path(marker_dir) / f"died-{h.shape[-1]}")):
                os._exit(3)
            return self.fc2(torch.relu(h))

    x, y = load_iris(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    x = torch.from_numpy(((x - x.mean(0)) / x.std(0)).astype(np.float32)[order])
    y = torch.from_numpy(y.astype(np.int64)[order])
    train = [(x[i : i + 30], y[i : i + 30]) for i in range(0, 90, 30)]
    val, test = [(x[90:120], y[90:120])], [(x[120:], y[120:])]
    torch.manual_seed(seed)
    return Task(model=FaultyMLP(), train=train, val=val, test=test, example_input=x[:8],
                train_epochs=30, train_lr=1e-2)


def _first_time(marker: Path) -> bool:
    """True the first time it is asked about ``marker`` (it then creates the file)."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        with open(marker, "x"):
            return True
    except FileExistsError:
        return False
