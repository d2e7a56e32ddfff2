"""The evaluating process's resources: a per-candidate memory limit, the candidate's peak
memory, and the CPU it is pinned to (:func:`pin_to_core`).

:func:`memory_limit` caps the address space of the evaluating process at what it uses now plus
``execution.memory_limit_mb``, for the duration of one candidate (``RLIMIT_AS``, Linux and
macOS). An allocation past the cap fails at once inside the candidate (torch raises
``RuntimeError: ... can't allocate memory``, numpy ``MemoryError``), the candidate is recorded as
failed, and the worker lives on with the cap lifted. The cap bounds address space, which is never
less than the resident memory it backs, so resident growth stays under the limit too.

:func:`peak_rss` resets and reads the kernel's high-water mark of resident memory (Linux), so
each candidate logs its own peak.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

#: Phrases of the errors an allocation past the cap raises (torch, numpy, ONNX Runtime, C++).
_ALLOCATION_FAILURES = ("can't allocate memory", "cannot allocate memory", "out of memory",
                        "failed to allocate", "bad_alloc", "not enough memory")


class MemoryLimitExceeded(MemoryError):
    """A candidate tried to allocate past ``execution.memory_limit_mb``."""


def _address_space() -> int | None:
    """This process's address space in bytes (Linux), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def memory_limit(limit_mb: int | None) -> Iterator[None]:
    """Cap this process's address-space growth at ``limit_mb`` MiB inside the block.

    Raises:
        MemoryLimitExceeded: when the block raised an allocation failure while capped; the
            original error is its ``__cause__``.
    """
    if not limit_mb:
        yield
        return
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows has no rlimits: no cap
        yield
        return
    used = _address_space()
    previous = resource.getrlimit(resource.RLIMIT_AS)
    if used is None:  # pragma: no cover - no /proc: no cap
        yield
        return
    cap = used + int(limit_mb) * 1024 * 1024
    hard = previous[1]
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    except Exception as exc:  # ORT's allocation failures are no RuntimeError
        if isinstance(exc, MemoryError) or any(
            p in str(exc).lower() for p in _ALLOCATION_FAILURES
        ):
            raise MemoryLimitExceeded(
                f"memory limit exceeded: the candidate tried to allocate past "
                f"execution.memory_limit_mb={limit_mb} ({type(exc).__name__}: "
                f"{_brief(exc)})"
            ) from exc
        raise
    finally:
        resource.setrlimit(resource.RLIMIT_AS, previous)


def _brief(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return text[:300]


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-memory high-water mark of this process (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """This process's peak resident memory since the last reset, in MiB (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def pin_to_core(index: int) -> int | None:
    """Pin this process to one of the CPUs it may use; returns that CPU (None if unsupported).

    Called before torch and ONNX Runtime create thread pools, so their threads inherit it.
    """
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[index % len(cpus)]
    os.sched_setaffinity(0, {cpu})
    return cpu
