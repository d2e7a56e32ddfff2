"""Built-in task: a MobileNetV2-style CNN on scikit-learn's bundled digits (no download).

The network is built from MobileNetV2's inverted residual blocks: a 1×1 expansion conv, a 3×3
depthwise conv (``groups`` = channels), a linear 1×1 projection, each with BatchNorm, ReLU6
after the first two, and the block's input added back where the shapes match. The 8×8 digits
are upsampled to 16×16 inside the model, as ``digits_cnn`` upsamples them to 32×32.
"""

from __future__ import annotations

from typing import Any

from petra.tasks import TASKS, Task
from petra.tasks.digits import digits_splits, split_batches

# (expansion t, output channels as a multiple of width, stride) per block, MobileNetV2's
# table scaled to 16×16 inputs: 16×16 → 8×8 → 4×4.
BLOCKS = ((1, 1, 1), (4, 1.5, 2), (4, 1.5, 1), (4, 2, 2), (4, 2, 1))


def _mobilenet_digits(width: int = 16, head: int = 128, num_classes: int = 10) -> Any:
    import torch
    from torch import nn
    from torch.nn import functional as F

    class InvertedResidual(nn.Module):
        """MobileNetV2's block: expand (1×1), depthwise (3×3), project (1×1, linear)."""

        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = cin * expand
            self.use_residual = stride == 1 and cin == cout
            self.expand = None
            if expand != 1:
                self.expand = nn.Sequential(
                    nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()
                )
            self.depthwise = nn.Sequential(
                nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                nn.BatchNorm2d(hidden), nn.ReLU6(),
            )
            self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False),
                                         nn.BatchNorm2d(cout))

        def forward(self, x: Any) -> Any:
            out = x if self.expand is None else self.expand(x)
            out = self.project(self.depthwise(out))
            return x + out if self.use_residual else out

    class DigitsMobileNet(nn.Module):
        """Stem conv → inverted residual blocks → 1×1 head conv → global pool → Linear."""

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU6())
            blocks, cin = [], width
            for expand, mult, stride in BLOCKS:
                cout = int(round(mult * width))
                blocks.append(InvertedResidual(cin, cout, stride, expand))
                cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.head = nn.Sequential(nn.Conv2d(cin, head, 1, bias=False),
                                      nn.BatchNorm2d(head), nn.ReLU6())
            self.dropout = nn.Dropout(0.1)
            self.fc = nn.Linear(head, num_classes)

        def forward(self, x: Any) -> Any:
            x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
            x = self.head(self.blocks(self.stem(x)))
            return self.fc(self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))

    return DigitsMobileNet()


@TASKS.register(
    "digits_mobilenet",
    description="MobileNetV2-style CNN (inverted residuals, depthwise convs) on sklearn digits",
)
def digits_mobilenet(
    *, seed: int = 0, width: int = 16, head: int = 128, batch_size: int = 64,
    latency_batch: int = 16, epochs: int = 30, lr: float = 5e-3,
) -> Task:
    """sklearn digits upsampled to 16×16 in the model, a MobileNetV2-style CNN, 60/20/20 splits.

    Args:
        seed: the data split and the model's initialisation.
        width: the stem's channels; the blocks have 1×, 1.5× and 2× as many (expanded 4×).
        head: the channels of the 1×1 conv before pooling.
        batch_size: the training batch size.
        latency_batch: the example batch (tracing, export, latency).
        epochs, lr: the baseline's training recipe.
    """
    import torch

    splits = digits_splits(seed)
    shape = (1, 8, 8)
    train, val, test = split_batches(splits, batch_size=batch_size, shape=shape)
    torch.manual_seed(seed)
    model = _mobilenet_digits(width=width, head=head)
    example = torch.from_numpy(splits["val"][0][:latency_batch].reshape(-1, *shape))
    return Task(
        model=model, train=train, val=val, test=test, example_input=example,
        train_epochs=epochs, train_lr=lr,
        info={"dataset": "sklearn digits", "splits": {k: len(v[1]) for k, v in splits.items()}},
    )
