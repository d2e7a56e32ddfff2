"""Sparsity rules: how much of each layer a criterion removes (the ``prune.sparsity_rule`` gene).

- ``fixed``: the per-layer ``layers.<name>.sparsity`` gene.
- ``auto_emp``: Effective Model Pruning (arXiv 2509.25606). The criterion's own scores decide:
  with ``w_i = |s_i| / sum_j |s_j|`` and the inverse Simpson index
  ``N_eff = 1 / sum_i w_i**2`` (N for uniform scores, 1 for one-hot ones), the top
  ``floor(beta * N_eff)`` scores are kept, clamped to [1, N - 1]. Signed scores are first
  shifted by their minimum. ``beta`` is the ``prune.emp_beta`` gene, in [0.5, 2].
  With ``prune.emp_scope = layer`` each layer (or channel group) gets its own count; with
  ``global`` the scores of every layer that chose a criterion are pooled, and one threshold on
  the pool sets each layer's sparsity (at least one survivor each).

It composes with every criterion that has scores: per weight for the unstructured ones
(``meta["scores"]``), per channel for the structured ones (their function). The sparsity it
chose is reported per layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from petra.registry import SPARSITY_RULES

SCOPES = ("layer", "global")


def _shifted(scores: torch.Tensor) -> torch.Tensor:
    s = scores.detach().flatten().double()
    s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    return s - s.min() if s.numel() and s.min() < 0 else s.abs()


def effective_count(scores: torch.Tensor) -> float:
    """``N_eff``: the inverse Simpson index of the normalised score magnitudes."""
    s = _shifted(scores)
    total = s.sum()
    if s.numel() == 0:
        return 0.0
    if not total > 0:
        return float(s.numel())  # all-equal (zero) scores carry no preference: uniform
    w = s / total
    return float(1.0 / (w * w).sum())


def emp_keep(scores: torch.Tensor, beta: float) -> int:
    """How many of the scores EMP keeps: ``floor(beta * N_eff)`` clamped to [1, N - 1]."""
    n = scores.numel()
    if n <= 1:
        return n
    return int(min(max(math.floor(beta * effective_count(scores)), 1), n - 1))


@dataclass(frozen=True)
class SparsityRule:
    """A sparsity rule with its genes; :meth:`sparsities` turns score tensors into sparsities."""

    name: str = "fixed"
    beta: float = 1.0
    scope: str = "layer"

    def __post_init__(self) -> None:
        SPARSITY_RULES.get(self.name)
        if self.scope not in SCOPES:
            raise ValueError(f"emp scope must be one of {list(SCOPES)}; got {self.scope!r}")

    @property
    def automatic(self) -> bool:
        return self.name != "fixed"

    def sparsities(self, score_list: Sequence[torch.Tensor]) -> list[float]:
        """One sparsity per score tensor (a layer's weights, or a group's channels)."""
        return SPARSITY_RULES.get(self.name).fn(list(score_list), self)


@SPARSITY_RULES.register("fixed", description="the layers.<name>.sparsity gene of each layer")
def fixed(score_list: list[torch.Tensor], rule: SparsityRule) -> list[float]:
    raise ValueError("the fixed sparsity rule takes the sparsity genes; it has no scores to use")


@SPARSITY_RULES.register(
    "auto_emp",
    description="EMP: keep floor(beta * N_eff) of each layer's criterion scores (inverse "
                "Simpson index), per layer or pooled; beta is the prune.emp_beta gene",
)
def auto_emp(score_list: list[torch.Tensor], rule: SparsityRule) -> list[float]:
    if not score_list:
        return []
    if rule.scope == "layer":
        return [1.0 - emp_keep(s, rule.beta) / max(s.numel(), 1) for s in score_list]
    pooled = torch.cat([_shifted(s) for s in score_list])
    total = pooled.numel()
    keep = int(min(max(math.floor(rule.beta * effective_count(pooled)), len(score_list)),
                   total - len(score_list)))
    threshold = torch.sort(pooled, descending=True).values[keep - 1]
    out = []
    for s in score_list:
        kept = int((_shifted(s) >= threshold).sum()) if s.numel() else 0
        kept = min(max(kept, 1), max(s.numel() - 1, 1))
        out.append(1.0 - kept / max(s.numel(), 1))
    return out
