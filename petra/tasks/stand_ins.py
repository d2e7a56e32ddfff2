"""Swapping a user's layers for modules that compute the same, only where nothing changes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def swap_if_unchanged(model: nn.Module, inputs: Sequence[torch.Tensor],
                      found: Sequence[tuple[str, nn.Module]],
                      build: Callable[[nn.Module], nn.Module], *, rtol: float, atol: float
                      ) -> tuple[str, ...]:
    """Replace, in place, each ``(name, module)`` of ``found`` by ``build(module)`` (in the
    module's train mode), and return their names. Where ``model`` (which takes ``inputs``
    positionally) then raises a ``ValueError`` or computes anything else, every module is put
    back and nothing is replaced."""
    if not found:
        return ()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        before = model(*inputs)
        for name, module in found:
            model.set_submodule(name, build(module).train(module.training))
        try:
            same = torch.allclose(model(*inputs), before, rtol=rtol, atol=atol)
        except ValueError:
            same = False
    if not same:
        for name, module in found:
            model.set_submodule(name, module)
    model.train(was_training)
    return tuple(name for name, _ in found) if same else ()
