"""Built-in tasks on scikit-learn's bundled digits (1797 8×8 images, 10 classes; no download)."""

from __future__ import annotations

from typing import Any

import numpy as np

from petra.tasks import TASKS, Task


def digits_splits(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stratified 60/20/20 train/val/test splits of sklearn's digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, stratify=y, random_state=seed
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
    )
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


class Batches:
    """A re-iterable sequence of ``(inputs, targets)`` tensor batches.

    With ``shuffle``, each pass draws its order from torch's global generator, as a DataLoader
    does. :func:`petra.candidate.train.train` seeds that generator per run, so a candidate's fine-tune
    sees the same batch order whatever the worker evaluated before it.
    """

    def __init__(
        self, x: np.ndarray, y: np.ndarray, *, batch_size: int, shuffle: bool = False,
        shape: tuple[int, ...] = (),
    ) -> None:
        import torch

        self.x = torch.from_numpy(x.reshape(len(x), *shape) if shape else x)
        self.y = torch.from_numpy(y)
        self.batch_size = batch_size
        self.shuffle = shuffle

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self) -> Any:
        import torch

        n = len(self.x)
        order = torch.randperm(n) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.x[idx], self.y[idx]


def split_batches(splits: dict[str, tuple[np.ndarray, np.ndarray]], *, batch_size: int,
                  shape: tuple[int, ...] = (), eval_batch_size: int = 256,
                  ) -> tuple[Batches, Batches, Batches]:
    """The train (shuffled), val and test :class:`Batches` of ``splits``."""
    return (Batches(*splits["train"], batch_size=batch_size, shuffle=True, shape=shape),
            Batches(*splits["val"], batch_size=eval_batch_size, shape=shape),
            Batches(*splits["test"], batch_size=eval_batch_size, shape=shape))


def _resnet_digits(width: int = 32, num_classes: int = 10) -> Any:
    from torch import nn
    from torch.nn import functional as F

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x: Any) -> Any:
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            skip = x if self.downsample is None else self.downsample(x)
            return F.relu(out + skip)

    class DigitsResNet(nn.Module):
        """A small residual CNN: 8×8 digits upsampled to 32×32 inside the model."""

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, width, 3, 2, 1, bias=False)  # 16×16
            self.bn = nn.BatchNorm2d(width)
            self.layer1 = BasicBlock(width, width, 2)  # 8×8
            self.layer2 = BasicBlock(width, 2 * width, 2)  # 4×4
            self.layer3 = BasicBlock(2 * width, 2 * width, 1)  # 4×4
            self.fc = nn.Linear(2 * width, num_classes)

        def forward(self, x: Any) -> Any:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
            x = F.relu(self.bn(self.stem(x)))
            x = self.layer3(self.layer2(self.layer1(x)))
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
            return self.fc(x)

    return DigitsResNet()


@TASKS.register(
    "digits_cnn",
    description="residual CNN (~160k params) on sklearn digits upsampled to 32x32 in the model",
)
def digits_cnn(
    *, seed: int = 0, width: int = 32, batch_size: int = 64, latency_batch: int = 16,
    epochs: int = 20, lr: float = 3e-3,
) -> Task:
    """sklearn digits, a residual CNN with BatchNorm, 60/20/20 splits."""
    import torch

    splits = digits_splits(seed)
    shape = (1, 8, 8)
    train, val, test = split_batches(splits, batch_size=batch_size, shape=shape)
    torch.manual_seed(seed)
    model = _resnet_digits(width=width)
    example = torch.from_numpy(splits["val"][0][:latency_batch].reshape(-1, *shape))
    return Task(
        model=model, train=train, val=val, test=test, example_input=example,
        train_epochs=epochs, train_lr=lr,
        info={"dataset": "sklearn digits", "splits": {k: len(v[1]) for k, v in splits.items()}},
    )


@TASKS.register("digits_mlp", description="MLP 64-256-256-10 with ReLU on sklearn digits (8x8 pixels)")
def digits_mlp(
    *, seed: int = 0, hidden: int = 256, batch_size: int = 64, latency_batch: int = 16,
    epochs: int = 20, lr: float = 3e-3,
) -> Task:
    """sklearn digits as flat 64-pixel vectors, a two-hidden-layer MLP, 60/20/20 splits."""
    from collections import OrderedDict

    import torch
    from torch import nn

    splits = digits_splits(seed)
    train, val, test = split_batches(splits, batch_size=batch_size)
    torch.manual_seed(seed)
    model = nn.Sequential(OrderedDict(
        fc1=nn.Linear(64, hidden), relu1=nn.ReLU(),
        fc2=nn.Linear(hidden, hidden), relu2=nn.ReLU(),
        fc=nn.Linear(hidden, 10),
    ))
    example = torch.from_numpy(splits["val"][0][:latency_batch])
    return Task(
        model=model, train=train, val=val, test=test, example_input=example,
        train_epochs=epochs, train_lr=lr,
        info={"dataset": "sklearn digits", "splits": {k: len(v[1]) for k, v in splits.items()}},
    )
