"""Built-in task on MNIST-1D: the digits as 1-D signals of length 40, generated locally.

The ``mnist1d`` package generates the data from code (``mnist1d.data.make_dataset``); its
``get_dataset`` downloads a pickle and is never used. Generation seeds and draws from the global
``random`` and ``np.random`` states, so they are saved and restored around it; the arrays are
kept in memory for the process, so rebuilding the task (each worker does) is cheap.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from petra.tasks import TASKS, Task
from petra.tasks.digits import split_batches

SEQ_LEN = 40


def mnist1d_arrays(num_samples: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``num_samples`` MNIST-1D signals ``(n, 40)`` float32, standardized, and int64 labels.

    ``num_samples // 10`` signals per digit, in an order shuffled by ``seed``. Generation takes
    about 0.7 ms per sample on one core, plus ~2 s to import ``mnist1d`` (it imports
    matplotlib and scipy); the result is cached in memory, and each call returns fresh copies.
    """
    x, y = _generate(int(num_samples), int(seed))
    return x.copy(), y.copy()


@functools.lru_cache(maxsize=4)
def _generate(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    return x, y


def _cnn1d(width: int = 32, num_classes: int = 10) -> Any:
    from torch import nn
    from torch.nn import functional as F

    class CNN1d(nn.Module):
        """Four Conv1d-BatchNorm-ReLU stages (length 40 → 10), global average pool, Linear."""

        def __init__(self) -> None:
            super().__init__()
            stages = [(1, width, 5, 1), (width, width, 3, 2), (width, 2 * width, 3, 2),
                      (2 * width, 2 * width, 3, 1)]
            for i, (cin, cout, kernel, stride) in enumerate(stages, 1):
                setattr(self, f"conv{i}", nn.Conv1d(cin, cout, kernel, stride, kernel // 2,
                                                    bias=False))
                setattr(self, f"bn{i}", nn.BatchNorm1d(cout))
            self.fc = nn.Linear(2 * width, num_classes)

        def forward(self, x: Any) -> Any:
            x = F.relu(self.bn1(self.conv1(x)))
            x = F.relu(self.bn2(self.conv2(x)))
            x = F.relu(self.bn3(self.conv3(x)))
            x = F.relu(self.bn4(self.conv4(x)))
            return self.fc(x.mean(dim=-1))

    return CNN1d()


@TASKS.register(
    "mnist1d_cnn",
    description="1-D CNN (~23k params) on MNIST-1D signals generated locally by the mnist1d package",
)
def mnist1d_cnn(
    *, seed: int = 0, num_samples: int = 4000, width: int = 32, batch_size: int = 64,
    latency_batch: int = 16, epochs: int = 20, lr: float = 1e-2,
) -> Task:
    """MNIST-1D (10 classes, inputs ``(batch, 1, 40)``), a small 1-D CNN, 70/15/15 splits."""
    import torch

    x, y = mnist1d_arrays(num_samples, seed)
    n_train, n_val = int(0.7 * len(y)), int(0.15 * len(y))
    splits = {
        "train": (x[:n_train], y[:n_train]),
        "val": (x[n_train : n_train + n_val], y[n_train : n_train + n_val]),
        "test": (x[n_train + n_val :], y[n_train + n_val :]),
    }
    shape = (1, SEQ_LEN)
    train, val, test = split_batches(splits, batch_size=batch_size, shape=shape)
    torch.manual_seed(seed)
    model = _cnn1d(width=width)
    example = torch.from_numpy(splits["val"][0][:latency_batch].reshape(-1, *shape))
    return Task(
        model=model, train=train, val=val, test=test, example_input=example,
        train_epochs=epochs, train_lr=lr,
        info={"dataset": "MNIST-1D (generated)", "splits": {k: len(v[1]) for k, v in splits.items()}},
    )
