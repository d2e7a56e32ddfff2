"""A user's task, loaded by import string in test_train_tasks.py: a tiny MLP on sklearn's iris."""

from __future__ import annotations

from typing import Any


def iris_mlp(*, hidden: int = 8, seed: int = 0) -> Any:
    """Iris (150 samples, 4 features, 3 classes) split 90/30/30, with a one-hidden-layer MLP."""
    import numpy as np
    import torch
    from sklearn.datasets import load_iris
    from torch import nn

    from petra.tasks import Task

    x, y = load_iris(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    x = torch.from_numpy(((x - x.mean(0)) / x.std(0)).astype(np.float32)[order])
    y = torch.from_numpy(y.astype(np.int64)[order])
    train = [(x[i : i + 30], y[i : i + 30]) for i in range(0, 90, 30)]
    val, test = [(x[90:120], y[90:120])], [(x[120:], y[120:])]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))
    return Task(model=model, train=train, val=val, test=test, example_input=x[:8],
                train_epochs=30, train_lr=1e-2)


def not_a_task() -> dict:
    """Returns something that is not a petra Task."""
    return {"model": None}


def raises(**params: object) -> None:
    """A task function that fails when it is called."""
    raise RuntimeError("the dataset is not where this task expects it")


def baked_batch(*, how: str = "center") -> Any:
    """iris_mlp, whose forward computes with the example batch's size (8) as a Python number,
    which the export bakes into the graph: ``center`` centres the outputs on the mean of that
    many (the artifact runs on the validation batch of 30, and computes something else), ``add``
    adds a tensor of that many rows (the artifact fails on it)."""
    import torch
    from torch import nn

    task = iris_mlp()

    class Baked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = task.model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, n = self.net(x), int(x.shape[0])  # int(): a constant in the traced graph
            if how == "center":
                return out - out[:n].mean(0)
            return out + torch.zeros(n, 3)

    task.model = Baked()
    task.train_epochs = 1
    return task


def chatty(**params: object) -> Any:
    """iris_mlp with one ReLU instance used twice (as GhostNet ports write it: torch-pruning's
    operation counter prints a warning on stdout for it), whose forward also writes to file
    descriptor 1 the way C++ code does."""
    import os

    import torch
    from torch import nn

    task = iris_mlp()
    act = nn.ReLU()

    class Chatty(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Linear(4, 8), act)
            self.b = nn.Sequential(nn.Linear(8, 8), act)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
                os.write(1, b"chatty forward\n")
            return self.fc(self.b(self.a(x)))

    task.model = Chatty()
    task.train_epochs = 1
    return task
