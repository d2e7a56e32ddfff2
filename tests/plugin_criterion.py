"""A pruning criterion added the documented way: one function, one decorator, nothing else.

Loaded as a pytest plugin (``pytest -p tests.plugin_criterion``) it registers before the test
modules are collected, so the contract suites parametrize over it like a built-in criterion.
This is the worked example of docs/criteria.md (*Adding a pruning criterion*), verbatim.
"""

import torch

from petra.compress.prune import keep_top
from petra.registry import PRUNING


def row_scaled_scores(weight, ctx):
    # |w| scaled by its output row's L2 norm: weights of strong rows survive longer
    rows = weight.detach().flatten(1).norm(dim=1).view(-1, *[1] * (weight.dim() - 1))
    return weight.detach().abs() * rows


@PRUNING.register("row_scaled", description="unstructured: zero the smallest |w| x row norm",
                  kind="unstructured", scores=row_scaled_scores)
def row_scaled(weight: torch.Tensor, sparsity: float, ctx) -> torch.Tensor:
    return keep_top(row_scaled_scores(weight, ctx), sparsity)
