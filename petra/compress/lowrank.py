"""Low-rank factorization: a layer becomes two thin layers (truncated SVD).

- ``Linear(in, out)`` → ``Linear(in, r, bias=False)`` then ``Linear(r, out)``.
- ``Conv(in, out, k)`` → ``Conv(in, r, k)`` (same stride, padding, dilation) then
  ``Conv(r, out, 1)``.

The rank ``r`` is the smallest that keeps ``energy`` of the squared singular values. A layer is
factorized only when that saves parameters: ``r * (in*k + out) < in*k*out``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from petra.registry import PRUNING


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest rank whose singular values keep ``energy`` of the total squared energy."""
    power = singular_values.double().pow(2)
    cumulative = torch.cumsum(power, 0) / power.sum().clamp_min(1e-30)
    return int(min(int((cumulative < energy).sum()) + 1, len(singular_values)))


def _factorized(module: nn.Module, energy: float) -> nn.Module | None:
    weight = module.weight.detach()
    out_features = weight.shape[0]
    matrix = weight.reshape(out_features, -1)
    fan_in = matrix.shape[1]
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = energy_rank(s, energy)
    if rank * (fan_in + out_features) >= fan_in * out_features:
        return None  # factorizing would not save parameters
    root = s[:rank].sqrt()
    first_w = (root[:, None] * vh[:rank]).float()
    second_w = (u[:, :rank] * root[None, :]).float()
    bias = module.bias is not None
    if isinstance(module, nn.Linear):
        first = nn.Linear(module.in_features, rank, bias=False)
        second = nn.Linear(rank, out_features, bias=bias)
    else:
        conv = type(module)
        first = conv(module.in_channels, rank, module.kernel_size, stride=module.stride,
                     padding=module.padding, dilation=module.dilation, bias=False)
        second = conv(rank, out_features, 1, bias=bias)
    with torch.no_grad():
        first.weight.copy_(first_w.reshape(first.weight.shape))
        second.weight.copy_(second_w.reshape(second.weight.shape))
        if bias:
            second.bias.copy_(module.bias.detach())
    return nn.Sequential(first, second)


def factorize(
    model: nn.Module, plan: Mapping[str, str], *, energy: float, ctx: Any = None
) -> dict[str, tuple[int, int]]:
    """Replace each layer of ``plan`` (name → low-rank method) in place by its factorization.

    Returns:
        layer name → (full rank, kept rank) for the layers actually factorized.
    """
    changes = {}
    for name, method in plan.items():
        module = model.get_submodule(name)
        if getattr(module, "groups", 1) != 1:
            continue
        replacement = PRUNING.get(method).fn(module, energy, ctx)
        if replacement is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement)
        full = min(module.weight.shape[0], module.weight[0].numel())
        changes[name] = (full, replacement[0].weight.shape[0])
    return changes


@PRUNING.register(
    "svd",
    description="low-rank: truncated SVD into two thin layers, rank by the lowrank.energy gene",
    kind="lowrank", structured=False, uses_sparsity=False,
)
def svd(module: nn.Module, energy: float, ctx: Any = None) -> nn.Module | None:
    """The factorized replacement of ``module``, or None when it would not save parameters."""
    return _factorized(module, energy)
