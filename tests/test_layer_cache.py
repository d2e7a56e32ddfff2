"""The compressed-layer cache: sorted pruning scores by content, per process and through Ray."""

from __future__ import annotations

import pytest
import torch

from petra.compress.layer_cache import (
    MIN_SIZE,
    Directory,
    LayerCache,
    content_key,
    threshold_mask,
)
from petra.compress.prune import keep_top


def reference(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    mask = torch.ones(scores.numel(), dtype=torch.bool)
    mask[torch.argsort(scores.flatten(), stable=True)[:n_prune]] = False
    return mask


@pytest.mark.parametrize("n_prune", [1, 7, 500, 999])
def test_the_threshold_mask_is_the_stable_sort_s_with_ties_and_nan(n_prune) -> None:
    ties = torch.randint(0, 5, (1000,)).float()
    ties[::97] = torch.inf
    assert torch.equal(threshold_mask(ties, n_prune), reference(ties, n_prune))
    nan = torch.rand(1000)
    nan[::13] = torch.nan
    assert torch.equal(threshold_mask(nan, n_prune), reference(nan, n_prune))


def test_a_cached_order_is_argsort_s_and_is_sorted_once() -> None:
    cache = LayerCache(max_mb=16)
    scores = torch.randint(0, 50, (MIN_SIZE * 2,)).float()  # many ties: the order must be stable
    first = cache.ascending_order(scores)
    again = cache.ascending_order(scores.clone())  # the same content, another tensor
    assert torch.equal(first, torch.argsort(scores, stable=True))
    assert torch.equal(again, first) and again.dtype == torch.int64
    assert (cache.misses, cache.hits) == (1, 1)
    moved = scores.clone()
    moved[0] += 1  # a weight that moved (after a fine-tune) is another entry
    assert torch.equal(cache.ascending_order(moved), torch.argsort(moved, stable=True))
    assert cache.misses == 2


def test_small_tensors_and_a_zero_bound_are_not_cached() -> None:
    small = torch.rand(MIN_SIZE - 1)
    cache = LayerCache(max_mb=16)
    cache.ascending_order(small)
    off = LayerCache(max_mb=0)
    off.ascending_order(torch.rand(MIN_SIZE))
    assert cache.stats()["entries"] == off.stats()["entries"] == 0


def test_the_oldest_entries_are_evicted_past_the_bound() -> None:
    n = 64 * 1024  # 256 KiB of int32 indices each
    cache = LayerCache(max_mb=0.6)
    tensors = [torch.rand(n) for _ in range(3)]
    for t in tensors:
        cache.ascending_order(t)
    assert cache.stats()["entries"] == 2 and cache.stats()["bytes"] <= 0.6 * 1024**2
    cache.ascending_order(tensors[2])
    cache.ascending_order(tensors[0])  # evicted: sorted again
    assert (cache.hits, cache.misses) == (1, 4)


def test_the_content_key_covers_dtype_and_shape() -> None:
    t = torch.arange(12, dtype=torch.float32)
    assert content_key(t) == content_key(t.clone())
    assert content_key(t) != content_key(t.view(3, 4))
    assert content_key(t) != content_key(t.double())


def test_a_layer_is_thresholded_once_sorted_the_second_time_then_sliced() -> None:
    from petra.compress import layer_cache

    weight = torch.randn(128, 64).round(decimals=1)  # ties
    before = layer_cache.CACHE.stats()
    levels = (0.3, 0.5, 0.7, 0.9)
    masks = [keep_top(weight.abs(), s) for s in levels]
    after = layer_cache.CACHE.stats()
    # the first level by threshold, the second by the one sort, the rest off the cache
    assert after["first_seen"] - before["first_seen"] == 1
    assert after["misses"] - before["misses"] == 1 and after["hits"] - before["hits"] == 2
    for mask, s in zip(masks, levels, strict=True):
        n_prune = round(s * weight.numel())
        assert torch.equal(mask.flatten(), reference(weight.abs(), n_prune))


class _Holder:
    """A Ray actor with a cache of its own, as a worker has."""

    def __init__(self, directory) -> None:
        self.cache = LayerCache(max_mb=16)
        self.cache.share(directory)

    def order(self, seed: int) -> tuple[list[int], dict[str, int]]:
        scores = torch.rand(MIN_SIZE * 4, generator=torch.Generator().manual_seed(seed))
        return self.cache.ascending_order(scores).tolist(), self.cache.stats()


@pytest.mark.integration
def test_workers_share_orders_through_the_object_store_and_survive_a_dead_owner(local_ray) -> None:
    import time

    ray = local_ray
    directory = ray.remote(num_cpus=0)(Directory).remote(16)
    holder = ray.remote(num_cpus=1)(_Holder)
    a, b = holder.remote(directory), holder.remote(directory)
    order_a, stats_a = ray.get(a.order.remote(7))
    assert stats_a["misses"] == 1
    deadline = time.monotonic() + 30
    while ray.get(directory.size.remote()) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)  # A's registration is on its way
    order_b, stats_b = ray.get(b.order.remote(7))
    assert order_b == order_a and stats_b["shared_hits"] == 1 and stats_b["misses"] == 0
    ray.kill(a)  # the owner of the shared entry dies: the next worker sorts again
    c = holder.remote(directory)
    order_c, stats_c = ray.get(c.order.remote(7))
    assert order_c == order_a and stats_c["misses"] == 1
