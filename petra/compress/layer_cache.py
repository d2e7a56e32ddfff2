"""A content-addressed cache of the part of compressing a layer that every level shares.

EvoPress (ICML 2025) keeps a database of compressed layers, so that a candidate is an index
vector and not a re-compression. petra's sparsities are continuous, so the cache holds what
every level of a layer has in common: the stable ascending order of its pruning scores. The
mask at any sparsity is then a slice of that order (:meth:`LayerCache.keep_mask`, behind
:func:`petra.compress.prune.keep_top`).

On one core, for one 384 x 1536 matrix: a stable sort takes 68 ms, a hash 1.3 ms, and a mask
without a sort (a k-th value threshold, ties broken by position as the sort breaks them) 8 ms.
So a layer seen for the first time gets the threshold mask and is only remembered; the second
time it is sorted and cached, and from then on its masks are slices. A search whose structured
genes reshape most layers (a hidden-width gene) sees a layer's exact content again seldom, and
pays the threshold; one that prunes the dense layers at many levels, as EvoPress does, reads
them all off the cache.

Entries are addressed by content: a SHA-1 of the scores' bytes, dtype and shape. The scores
carry the layer's weights, the criterion and its calibration data (activations, the random
criterion's seed), so the same layer under the same criterion gets the same key on every worker
and for every candidate, and a layer whose weights moved (after a fine-tune) gets a new one.
Orders below :data:`MIN_SIZE` elements are not cached: sorting them costs less than the hash.

Each process holds its own entries, least recently used evicted past ``max_mb``. Under Ray the
workers share them through the object store: the executor starts a :class:`Directory` actor
(key → object reference), a worker that sorts a layer puts the order in the object store and
registers it, and a worker that misses locally asks the directory before sorting. An entry whose
owner died (a replaced worker) is simply sorted again.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import torch

#: Score tensors smaller than this are sorted every time.
MIN_SIZE = 4096
#: The default bound of each process's entries, in MiB.
DEFAULT_MB = 256
#: The most latency times the directory holds (a key and a float each: a few hundred bytes).
MAX_TIMES = 200_000


class LayerCache:
    """The score orders of one process, bounded by bytes, optionally shared through Ray."""

    def __init__(self, max_mb: float = DEFAULT_MB) -> None:
        self.max_bytes = int(max_mb * 1024**2)
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._directory: Any = None
        self._seen: OrderedDict[str, None] = OrderedDict()  # keys met once, not yet sorted
        self.hits = self.shared_hits = self.misses = self.first = 0

    @property
    def directory(self) -> Any:
        """The :class:`Directory` actor handle entries are shared through, or None."""
        return self._directory

    def share(self, directory: Any) -> None:
        """Share entries with the other workers through ``directory`` (a :class:`Directory`
        actor handle; None stops sharing)."""
        self._directory = directory

    def clear(self) -> None:
        """Forget every entry and reset the counters."""
        with self._lock:
            self._entries.clear()
            self._seen.clear()
            self._bytes = 0
            self.hits = self.shared_hits = self.misses = self.first = 0

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "shared_hits": self.shared_hits, "misses": self.misses,
                "first_seen": self.first, "entries": len(self._entries), "bytes": self._bytes}

    def _cacheable(self, flat: torch.Tensor) -> bool:
        return flat.numel() >= MIN_SIZE and self.max_bytes > 0 and flat.device.type == "cpu"

    def keep_mask(self, scores: torch.Tensor, n_prune: int) -> torch.Tensor:
        """A flat 0/1 mask of ``scores`` that zeroes the ``n_prune`` lowest, ties by position
        (a stable sort's order): from the cached order when there is one, by a threshold the
        first time these scores are met, and by a sort, then cached, the second time."""
        flat = scores.detach().flatten()
        if n_prune <= 0:
            return torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
        if not self._cacheable(flat):
            return threshold_mask(flat, n_prune)
        key = content_key(flat)
        order = self._lookup(key)
        if order is None and self._first_time(key):
            return threshold_mask(flat, n_prune)
        return mask_from_order(order if order is not None else self._sort(key, flat), n_prune,
                               flat)

    def ascending_order(self, scores: torch.Tensor) -> torch.Tensor:
        """``torch.argsort(scores.flatten(), stable=True)``, from the cache when these exact
        scores were sorted before (here or, shared, on another worker), else sorted and cached."""
        flat = scores.detach().flatten()
        if not self._cacheable(flat):
            return torch.argsort(flat, stable=True)
        key = content_key(flat)
        order = self._lookup(key)
        return (order if order is not None else self._sort(key, flat)).long()

    def _lookup(self, key: str) -> torch.Tensor | None:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
        order = self._from_directory(key)
        if order is not None:
            self.shared_hits += 1
            self._keep(key, order)
        return order

    def _first_time(self, key: str) -> bool:
        with self._lock:
            if key in self._seen:
                return False
            self._seen[key] = None
            if len(self._seen) > 4096:
                self._seen.popitem(last=False)
            self.first += 1
            return True

    def _sort(self, key: str, flat: torch.Tensor) -> torch.Tensor:
        self.misses += 1
        order = torch.argsort(flat, stable=True).to(_index_dtype(flat.numel()))
        self._publish(key, order)
        self._keep(key, order)
        return order

    def _keep(self, key: str, order: torch.Tensor) -> None:
        size = order.numel() * order.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = order
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()

    def _from_directory(self, key: str) -> torch.Tensor | None:
        if self._directory is None:
            return None
        import ray

        try:
            found = ray.get(self._directory.lookup.remote(key))
            return torch.from_numpy(ray.get(found[0]).copy()) if found else None
        except Exception:  # noqa: BLE001 - an owner that died, a directory gone: sort again
            return None

    def _publish(self, key: str, order: torch.Tensor) -> None:
        if self._directory is None:
            return
        import ray

        try:
            # wrapped in a list, so that the reference itself reaches the directory
            self._directory.register.remote(key, [ray.put(order.numpy())],
                                            order.numel() * order.element_size())
        except Exception:  # noqa: BLE001 - sharing is an optimization; never a failure
            return


class Directory:
    """The Ray actor that maps content keys to object references of score orders, up to
    ``max_mb`` of them (later registrations are dropped: the object store is bounded too).
    It also holds the workers' per-layer latency times
    (:class:`petra.candidate.latency_table.LatencyTable`), up to :data:`MAX_TIMES` of them."""

    def __init__(self, max_mb: float = DEFAULT_MB) -> None:
        self._refs: dict[str, list[Any]] = {}
        self._left = int(max_mb * 1024**2)
        self._times: dict[Any, float] = {}

    def times(self, keys: list[Any]) -> dict[Any, float]:
        """The latency times registered for any of ``keys``."""
        return {k: self._times[k] for k in keys if k in self._times}

    def add_times(self, times: dict[Any, float]) -> None:
        for key, seconds in times.items():
            if len(self._times) < MAX_TIMES:
                self._times.setdefault(key, seconds)

    def time_count(self) -> int:
        return len(self._times)

    def lookup(self, key: str) -> list[Any] | None:
        return self._refs.get(key)

    def register(self, key: str, ref: list[Any], size: int) -> None:
        if key not in self._refs and size <= self._left:
            self._refs[key] = ref
            self._left -= size

    def size(self) -> int:
        return len(self._refs)


def threshold_mask(flat: torch.Tensor, n_prune: int) -> torch.Tensor:
    """The mask of :meth:`LayerCache.keep_mask` without a sort: everything below the
    ``n_prune``-th smallest value goes, and of the values equal to it, the first by position.
    Scores with NaN (which a sort puts last) are sorted."""
    if torch.isnan(flat).any():
        return mask_from_order(torch.argsort(flat, stable=True), n_prune, flat)
    cut = torch.kthvalue(flat.cpu(), n_prune).values.to(flat.device)
    mask = flat >= cut
    ties = torch.nonzero(flat == cut).flatten()
    mask[ties[: n_prune - int((~mask).sum())]] = False
    return mask


def mask_from_order(order: torch.Tensor, n_prune: int, flat: torch.Tensor) -> torch.Tensor:
    """A flat 0/1 mask of ``flat`` that zeroes the first ``n_prune`` indices of ``order``."""
    mask = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[order[:n_prune].long()] = False
    return mask


def content_key(tensor: torch.Tensor) -> str:
    """A digest of ``tensor``'s values, dtype and shape."""
    data = tensor.detach().contiguous().cpu()
    digest = hashlib.sha1(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(memoryview(data.view(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def _index_dtype(n: int) -> torch.dtype:
    return torch.int32 if n < 2**31 else torch.int64


#: This process's cache: each Ray worker, or the driver with the local executor, has one.
CACHE = LayerCache()


def configure(max_mb: float, directory: Any = None) -> LayerCache:
    """Bound this process's cache to ``max_mb`` (0 turns it off) and share it through
    ``directory``; returns it."""
    CACHE.max_bytes = int(max_mb * 1024**2)
    CACHE.share(directory)
    return CACHE
