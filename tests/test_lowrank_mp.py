"""The Marchenko–Pastur rank rule: planted ranks are recovered, noise and non-MP bulks are not
factorized, and every registered rank rule honours the low-rank contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from petra.compress.lowrank import factorize, mp_cdf, mp_median, mp_rank
from petra.registry import RANK_RULES


def planted(n: int, p: int, rank: int, *, strength: float = 2.5, seed: int = 0) -> np.ndarray:
    """Unit Gaussian noise plus ``rank`` orthogonal spikes ``strength`` times the bulk edge."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p))
    if rank:
        u = np.linalg.qr(rng.standard_normal((n, rank)))[0]
        v = np.linalg.qr(rng.standard_normal((p, rank)))[0]
        edge = math.sqrt(n) + math.sqrt(p)
        x = x + u @ np.diag(np.linspace(strength + 1, strength, rank) * edge) @ v.T
    return x


@pytest.mark.parametrize("shape, rank", [((200, 100), 5), ((256, 64), 3), ((64, 576), 4),
                                         ((120, 120), 7), ((32, 288), 2)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_planted_rank_is_recovered(shape, rank, seed):
    s = np.linalg.svd(planted(*shape, rank, seed=seed), compute_uv=False)
    assert mp_rank(s, shape) == rank


def test_noise_alone_has_no_spike_and_is_left_whole():
    for seed in range(3):
        s = np.linalg.svd(planted(150, 90, 0, seed=seed), compute_uv=False)
        assert mp_rank(s, (150, 90)) == 0
    assert RANK_RULES.get("mp").fn(torch.from_numpy(s), (150, 90), 0.99) is None


def test_a_bulk_that_is_not_marchenko_pastur_is_left_alone():
    # A smooth power-law spectrum (no noise bulk at all): the fit fails.
    s = 100.0 * np.arange(1, 65) ** -1.0
    assert mp_rank(s, (64, 256)) is None
    # too few singular values to fit a bulk
    assert mp_rank(np.linalg.svd(planted(64, 10, 1), compute_uv=False), (64, 10)) is None


def test_the_edge_is_the_square_of_one_plus_root_gamma():
    # The MP law's support for gamma = 1/4 is [(1 - 1/2)^2, (1 + 1/2)^2] = [0.25, 2.25].
    assert mp_cdf(np.array([0.25, 2.25]), 0.25) == pytest.approx([0.0, 1.0], abs=1e-6)
    assert 0.0 < mp_cdf(np.array([1.0]), 0.25)[0] < 1.0
    assert mp_median(1.0) == pytest.approx(0.6498, abs=0.01)  # the quarter-circle law's median
    # a spike just above (1 + sqrt(gamma))^2, not (1 + gamma)^2 nor 1 + sqrt(gamma)^2
    n, p = 400, 100
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n, p))
    s = np.linalg.svd(x, compute_uv=False)
    assert s[0] ** 2 / n < (1 + math.sqrt(p / n)) ** 2 * 1.05


@pytest.mark.parametrize("rule", RANK_RULES.names())
def test_every_rank_rule_factorizes_to_fewer_parameters_or_leaves_the_layer(rule):
    torch.manual_seed(0)
    layer = nn.Linear(96, 128)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(planted(128, 96, 4).astype(np.float32)) * 0.05)
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(128, 10))
    x = torch.randn(8, 96)
    before = model(x)
    changes = factorize(model, {"0": "svd"}, energy=0.999, rule=rule)
    after = model(x)
    assert after.shape == before.shape and torch.isfinite(after).all()
    if changes:
        full, kept = changes["0"]
        assert kept < full
        assert sum(p.numel() for p in model[0].parameters()) < 96 * 128 + 128
    if rule == "mp":
        assert changes == {"0": (96, 4)}  # the four planted directions, nothing else


def test_a_frozen_layer_factorized_stays_frozen_and_the_others_train():
    """The new thin layers required grad, so the fine-tune trained a user's frozen backbone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(),
                          nn.Linear(96, 10))
    with torch.no_grad():
        for i in (0, 2):
            model[i].weight.copy_(torch.randn_like(model[i].weight) * 0.05)
            model[i].weight[:, :4] += 1.0  # a dominant direction to keep: low rank saves
    model[0].requires_grad_(False)
    changes = factorize(model, {"0": "svd", "2": "svd"}, energy=0.9)
    assert set(changes) == {"0", "2"}
    assert not any(p.requires_grad for p in model[0].parameters())
    assert all(p.requires_grad for p in model[2].parameters())
