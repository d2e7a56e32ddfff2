"""Rank statistics the benchmarks share (numpy only).

    from ranks import spearman
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def average_ranks(x: Sequence[float]) -> np.ndarray:
    """Ranks from 0, tied values sharing the mean of the ranks they span (as
    ``scipy.stats.rankdata(method="average") - 1``)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for v in np.unique(x):
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho with average ranks for ties; NaN under three pairs, or when either side
    is constant. Validation accuracies tie often (a few hundred examples), and breaking their
    ties by input order would make the coefficient depend on that order."""
    if len(a) != len(b):
        raise ValueError(f"spearman: {len(a)} values against {len(b)}")
    if len(a) < 3:
        return float("nan")
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])
