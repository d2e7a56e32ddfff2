"""What a search shows while it runs: a live status line on a terminal, plain lines elsewhere.

The loop reports messages (baseline, generation lines, the end) and, after every result, a
:class:`Status`: the generation, candidates done, running, failed and pruned, an ETA, the best
value so far of each objective, and the hypervolume. :class:`ConsoleProgress` keeps one status
line live under the messages with rich (``rich.live.Live``) when its stream is a terminal; when it
is not (a pipe, a CI log), it prints the messages only, one plain line each.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO


@dataclass(frozen=True)
class Status:
    """A search's progress after one more result."""

    generation: int  # 0-based
    generations: int
    done: int
    planned: int
    running: int
    failed: int
    pruned: int
    elapsed_s: float
    eta_s: float | None
    hypervolume: float
    best: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        best = ", ".join(f"{short_name(k)} {v:.4g}" for k, v in self.best.items())
        eta = "-" if self.eta_s is None else duration(self.eta_s)
        return (f"gen {self.generation + 1}/{self.generations} | {self.done}/{self.planned} done,"
                f" {self.running} running, {self.failed} failed, {self.pruned} pruned | ETA {eta}"
                f" | best {best or '-'} | HV {self.hypervolume:.4f}")


class Reporter(Protocol):
    def message(self, text: str) -> None: ...

    def update(self, status: Status) -> None: ...


class ConsoleProgress:
    """Prints messages; on a terminal, also a live status line (rich) redrawn after every
    result, the messages printed above it."""

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self._display: Any = None  # a started rich.live.Live, once there is a status

    def message(self, text: str) -> None:
        if self._display is not None:
            self._display.console.print(text, markup=False, highlight=False, soft_wrap=True)
            return
        self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, status: Status) -> None:
        if not self.live:
            return
        from rich.text import Text

        if self._display is None:
            from rich.console import Console
            from rich.live import Live

            console = Console(file=self.stream, force_terminal=True, highlight=False)
            self._display = Live(console=console, auto_refresh=False, transient=True,
                                 redirect_stdout=False, redirect_stderr=False)
            self._display.start()
        self._display.update(Text(status.line(), no_wrap=True, overflow="ellipsis"),
                             refresh=True)

    def close(self) -> None:
        if self._display is not None:
            self._display.stop()  # transient: the status line is cleared
            self._display = None


class _Messages:
    """A plain callable taking messages, as a Reporter."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.message = say

    def update(self, status: Status) -> None:
        pass


def as_reporter(progress: Reporter | Callable[[str], None] | None) -> Any:
    """A Reporter from a Reporter, a message callable, or None (silent)."""
    if progress is None:
        return _Messages(lambda _text: None)
    if hasattr(progress, "update") and hasattr(progress, "message"):
        return progress
    return _Messages(progress)


def short_name(metric: str) -> str:
    return {"val_accuracy": "val", "artifact_bytes": "bytes", "size_ratio": "size",
            "latency_ratio": "latency", "latency_ms": "ms"}.get(metric, metric)


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


#: Why a front has no hypervolume: every member is outside the reference point.
ZERO_HV = (" (no member is below the dense model on every min objective and within 0.1 of it "
           "on every max one)")


def generation_line(snap: Any, status: Any) -> str:
    """One plain line per generation: counts, front, hypervolume, best values, time and ETA."""

    best = ", ".join(f"{'best' if k == 'val_accuracy' else 'min'} {short_name(k)} {v:.4g}"
                     for k, v in status.best.items())
    eta = "" if status.eta_s is None or status.done >= status.planned else (
        f", ETA {duration(status.eta_s)}")
    return (f"generation {status.generation + 1}/{status.generations}: {status.done} evaluated "
            f"({status.failed} failed, {status.pruned} pruned), front {len(snap.members)}, "
            f"hypervolume {snap.hypervolume:.4f}{ZERO_HV * bool(snap.members and not snap.hypervolume)}"
            f"; {best or 'nothing complete yet'} [{status.elapsed_s:.0f} s{eta}]")


def best_values(records: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]],
                baseline: Mapping[str, float], constraints: Mapping[str, Any] | None
                ) -> dict[str, float]:
    """The best value of each objective over the complete candidates that meet the
    constraints (what the front may hold; an infeasible one showed a best val the front
    lacked), bytes and latency as ratios to the dense model."""
    from petra.engine.objectives import violation

    complete = [r["metrics"] for r in records if r["status"] == "complete"
                and not violation(r["metrics"], baseline, constraints)]
    best = {}
    for metric, direction in objectives:
        shown = {"artifact_bytes": "size_ratio", "latency_ms": "latency_ratio"}.get(metric, metric)
        values = [float(m[shown]) for m in complete
                  if math.isfinite(float(m.get(shown, math.nan)))]
        if values:
            best[shown] = max(values) if direction == "max" else min(values)
    return best
