"""What a skipped block becomes (:func:`petra.compress.blocks.skip_blocks`): a stand-in that
takes the block's input as the block did and hands on what the block handed on."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _StandIn(nn.Module):
    """What a skipped block becomes: it takes its input as the block did (the first positional
    argument, or the keyword ``keyword``) and ignores the rest (masks, position embeddings),
    but hands on, in the tuple it returns, the arguments the block handed on."""

    def __init__(self, outputs: int = 0, keyword: str = "",
                 passthrough: tuple[tuple[int, int | str], ...] = ()) -> None:
        super().__init__()
        self.outputs = outputs
        self.keyword = keyword
        self.passthrough = passthrough
        self.carried: int | str | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = kwargs[self.keyword] if self.keyword and not args else args[0]
        if self.carried is not None:  # the argument the block added to its result
            x = kwargs[self.carried] if isinstance(self.carried, str) else args[self.carried]
        out = self.compute(x)
        if not self.outputs:
            return out
        returned: list[Any] = [out, *([None] * (self.outputs - 1))]
        for slot, source in self.passthrough:
            returned[slot] = kwargs.get(source) if isinstance(source, str) else (
                args[source] if source < len(args) else None)
        return tuple(returned)


class ShortcutOnly(_StandIn):
    """A residual block reduced to its shortcut path (and its final ReLU)."""

    def __init__(self, shortcut: nn.Module, relu: bool, outputs: int = 0, keyword: str = "",
                 passthrough: tuple[tuple[int, int | str], ...] = ()) -> None:
        super().__init__(outputs, keyword, passthrough)
        self.shortcut = shortcut
        self.relu = relu

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shortcut(x)
        return torch.relu(out) if self.relu else out


class ReluIdentity(_StandIn):
    """The identity, or a ReLU where the skipped block ended in one."""

    def __init__(self, relu: bool, outputs: int = 0, keyword: str = "",
                 passthrough: tuple[tuple[int, int | str], ...] = ()) -> None:
        super().__init__(outputs, keyword, passthrough)
        self.relu = relu

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) if self.relu else x


class Zero(_StandIn):
    """A residual branch removed: zeros of its input's shape, as ``x * 0``. ``zeros_like``
    would cut the traced graph there, and torch-pruning would then leave out the norm that
    feeds the branch (it still runs): the residual width would shrink around it."""

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.0


class BatchFirst:
    """What ``nn.TransformerEncoder`` reads of its first layer's attention when that layer was
    skipped: whether it is batch-first."""

    def __init__(self, batch_first: bool) -> None:
        self.batch_first = batch_first
