"""Low-rank factorization: a layer becomes two thin layers (truncated SVD).

- ``Linear(in, out)`` → ``Linear(in, r, bias=False)`` then ``Linear(r, out)``.
- ``Conv(in, out, k)`` → ``Conv(in, r, k)`` (same stride, padding, dilation) then
  ``Conv(r, out, 1)``.
- ``Embedding(n, d)`` → ``Embedding(n, r)`` then ``Linear(r, d, bias=False)``: a vocabulary's
  table is often half a transformer's weights, and its rows share few directions.

The rank ``r`` comes from a registered *rank rule* (the ``lowrank.rank_rule`` gene):

- ``energy``: the smallest rank that keeps ``lowrank.energy`` of the squared singular values;
- ``mp``: the singular values above the Marchenko–Pastur bulk edge of the weight's own noise
  level (:func:`mp_rank`); a layer whose spectrum does not look like signal plus MP noise is left
  alone.

A layer is factorized only when that saves parameters: ``r * (in*k + out) < in*k*out``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from petra.compress.graph import keep_frozen
from petra.registry import PRUNING, RANK_RULES

if TYPE_CHECKING:
    from petra.compress.prune import PruneContext


#: The largest L∞ distance between the bulk's empirical CDF and the fitted MP CDF for which the
#: bulk still counts as MP noise.
MP_FIT_CUTOFF = 0.2
#: Matrices with fewer singular values than this are too small to fit a bulk to.
MP_MIN_SIZE = 16


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest rank whose singular values keep ``energy`` of the total squared energy."""
    power = singular_values.double().pow(2)
    cumulative = torch.cumsum(power, 0) / power.sum().clamp_min(1e-30)
    return int(min(int((cumulative < energy).sum()) + 1, len(singular_values)))


@functools.lru_cache(maxsize=256)
def _mp_cdf_table(gamma: float, points: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """Grid and CDF of the Marchenko–Pastur law with ratio ``gamma`` <= 1 and variance 1."""
    lo, hi = (1 - math.sqrt(gamma)) ** 2, (1 + math.sqrt(gamma)) ** 2
    # A cosine grid is dense at both edges, where the density has its square-root ends (and,
    # for gamma = 1, an integrable 1/sqrt(x) pole at 0, which the first step skips).
    x = lo + (hi - lo) * (1 - np.cos(np.linspace(0, math.pi, points))) / 2
    safe = np.where(x > 0, x, np.inf)
    density = np.sqrt(np.clip((hi - x) * (x - lo), 0, None)) / (2 * math.pi * gamma * safe)
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(x))])
    return x, cdf / cdf[-1]


def mp_cdf(x: np.ndarray, gamma: float) -> np.ndarray:
    """The Marchenko–Pastur CDF (ratio ``gamma`` <= 1, variance 1) at ``x``."""
    grid, cdf = _mp_cdf_table(round(float(gamma), 6))
    return np.interp(x, grid, cdf, left=0.0, right=1.0)


def mp_median(gamma: float) -> float:
    """The median of the Marchenko–Pastur law with ratio ``gamma`` <= 1 and variance 1."""
    grid, cdf = _mp_cdf_table(round(float(gamma), 6))
    return float(np.interp(0.5, cdf, grid))


def mp_rank(singular_values: torch.Tensor | np.ndarray, shape: tuple[int, int]) -> int | None:
    """The number of singular values above the Marchenko–Pastur bulk edge; None when the bulk
    does not fit MP.

    For an ``n x p`` matrix of i.i.d. noise of variance ``sigma**2`` (``n >= p``, ratio
    ``gamma = p / n``), the eigenvalues ``lambda = s**2 / n`` fill
    ``[sigma**2 (1 - sqrt(gamma))**2, sigma**2 (1 + sqrt(gamma))**2]``. Here:

    1. ``sigma**2`` is estimated robustly, as the median eigenvalue over the MP median
       (the few signal eigenvalues barely move a median);
    2. the edge is ``lambda_+ = sigma**2 * (1 + sqrt(gamma))**2`` — the square of the sum, as
       the law has it (METHODS.md warns of a reference that misplaces the parentheses); no
       Tracy–Widom correction is added;
    3. singular values above ``sqrt(n * lambda_+)`` are signal;
    4. the eigenvalues under the edge must follow the fitted MP CDF within an L∞ distance of
       :data:`MP_FIT_CUTOFF`; otherwise the spectrum is not "signal plus noise" (a trained
       layer with a smooth, heavy-tailed spectrum) and None is returned.

    The ``mp`` rank rule leaves a layer whole when this returns None or 0 (no spike: the weight
    looks like its own initial noise, and a rank-0 layer would be no layer).
    """
    s = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1]
    n, p = max(shape), min(shape)
    if p < MP_MIN_SIZE or len(s) < p:
        return None
    s = s[:p]
    gamma = p / n
    eig = s**2 / n
    sigma2 = float(np.median(eig)) / mp_median(gamma)
    if not sigma2 > 0:
        return None
    edge = sigma2 * (1 + math.sqrt(gamma)) ** 2
    rank = int((eig > edge).sum())
    bulk = np.sort(eig[eig <= edge]) / sigma2
    if len(bulk) < MP_MIN_SIZE:
        return None
    empirical = np.arange(1, len(bulk) + 1) / len(bulk)
    fitted = mp_cdf(bulk, gamma)
    distance = float(max(np.abs(empirical - fitted).max(),
                         np.abs(empirical - 1 / len(bulk) - fitted).max()))
    return rank if distance <= MP_FIT_CUTOFF else None


@RANK_RULES.register("energy", description="the smallest rank that keeps lowrank.energy of the "
                                           "squared singular values (PETRA's thresholds)")
def energy_rule(singular_values: torch.Tensor, shape: tuple[int, int], energy: float) -> int:
    return energy_rank(singular_values, energy)


@RANK_RULES.register("mp", description="Marchenko-Pastur: the singular values above the noise "
                                       "bulk's edge; layers whose bulk is not MP are left alone")
def mp_rule(singular_values: torch.Tensor, shape: tuple[int, int],
            energy: float) -> int | None:
    rank = mp_rank(singular_values, shape)
    # No spike above the edge: nothing to keep a factorization of; the layer stays whole.
    return None if not rank else rank


def _factorized(module: nn.Module, energy: float, rule: str = "energy") -> nn.Module | None:
    weight = module.weight.detach()
    out_features = weight.shape[0]
    matrix = weight.reshape(out_features, -1)
    fan_in = matrix.shape[1]
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = RANK_RULES.get(rule).fn(s, (out_features, fan_in), energy)
    if rank is None or rank * (fan_in + out_features) >= fan_in * out_features:
        return None  # the rule leaves it alone, or factorizing would not save parameters
    root = s[:rank].sqrt()
    first_w = (root[:, None] * vh[:rank]).float()
    second_w = (u[:, :rank] * root[None, :]).float()
    if isinstance(module, nn.Embedding):  # W = (U√S)(√S Vh): the table, then a projection
        table = nn.Embedding(module.num_embeddings, rank, padding_idx=module.padding_idx)
        project = nn.Linear(rank, fan_in, bias=False)
        with torch.no_grad():
            table.weight.copy_(second_w)
            project.weight.copy_(first_w.T)
        return nn.Sequential(table, project)
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
    model: nn.Module, plan: Mapping[str, str], *, energy: float, rule: str = "energy",
    ctx: PruneContext | None = None,
) -> dict[str, tuple[int, int]]:
    """Replace each layer of ``plan`` (name → low-rank method) in place by its factorization.

    Args:
        energy: the energy kept by the ``energy`` rank rule.
        rule: a name in :data:`petra.registry.RANK_RULES`.

    Returns:
        layer name → (full rank, kept rank) for the layers actually factorized.
    """
    changes = {}
    for name, method in plan.items():
        module = model.get_submodule(name)
        if getattr(module, "groups", 1) != 1:
            continue
        replacement = PRUNING.get(method).fn(module, energy, ctx, rule=rule)
        if replacement is None:
            continue
        with keep_frozen(model, [name]):  # a frozen layer's factors stay frozen
            model.set_submodule(name, replacement)
        full = min(module.weight.shape[0], module.weight[0].numel())
        first = replacement[0]
        changes[name] = (full, first.embedding_dim if isinstance(first, nn.Embedding)
                         else first.weight.shape[0])
    return changes


@PRUNING.register(
    "svd",
    description="low-rank: truncated SVD into two thin layers, rank by the lowrank.rank_rule "
                "gene (energy or mp)",
    kind="lowrank", uses_sparsity=False,
)
def svd(module: nn.Module, energy: float, ctx: PruneContext | None = None, *, rule: str = "energy") -> nn.Module | None:
    """The factorized replacement of ``module``, or None when it would not save parameters
    (or the rank rule leaves it alone)."""
    return _factorized(module, energy, rule)
