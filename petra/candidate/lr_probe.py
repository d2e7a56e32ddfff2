"""The fine-tune lr of a search's seed recipes and of the by-hand grid, probed on the model.

The seed recipes (:func:`petra.candidate.recipes.seed_recipes`) fine-tune at lr 5e-3 clipped to
the space's range, the value tuned on the built-in toy tasks' tuning seeds. A model that cannot
take that lr is damaged by it: a pretrained transformer under AdamW is the usual case. On
text_bert (tuning seed 0) the first and third seed recipes reached validation accuracy 0.977 and
0.960 at lr 1e-3 (the top of its space), against 0.997 and 0.993 at 3e-4.

So before a search, the first seed recipe's compressed model is fine-tuned briefly at that lr
and at half-decade steps below it (:data:`STEPS_DOWN` of them, within the space's range), each
run from the same compressed weights with its own one-cycle schedule over :func:`probe_steps`
batches (a quarter of an epoch, 20 to 200 steps), and its validation loss is read. The seed lr
is the **highest** lr whose validation loss is at most :data:`TOLERANCE` times the lowest: the
probe lowers the lr only where the higher one does damage. A short run favours low lrs: on
events_gru's and digits_cnn's tuning seeds a quarter epoch preferred lrs that the full
fine-tune did not (within 1.5x of the best loss), while on text_bert the loss at 1e-3 was 5.6x
the best.

Validation data only; the test split is never read. The outcome is cached under the search's
cache folder (by the baseline, the probed recipe, the lrs and the steps), so another search of
the same model reuses it; its own cost is kept with it. The search run records it
(:func:`run_logs`), and a resumed search takes the lr its run recorded (:func:`recorded_probe`),
never a new probe. A space whose lr has one value, or no fine-tune, is not probed; nor is a
failure fatal: the search then keeps the default lr, and says why.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from petra.candidate.recipes import DEFAULT_SEED_LR, Recipe, seed_finetune, seed_recipes
from petra.errors import describe_error
from petra.files import write_atomic
from petra.tasks.contract import copy_model

if TYPE_CHECKING:
    from petra.candidate.baseline import Baseline
    from petra.schema import SearchConfig
    from petra.space import SearchSpace
    from petra.tasks import Task

#: The lrs probed below the default: each a factor sqrt(10) lower.
STEPS_DOWN = 2
#: The seed lr is the highest whose probe loss is at most this many times the lowest.
TOLERANCE = 2.0
#: A probe trains on this share of an epoch, within [MIN_STEPS, MAX_STEPS] batches.
SHARE, MIN_STEPS, MAX_STEPS = 0.25, 20, 200
#: Bump when the probe changes, so stale cached outcomes are not reused.
VERSION = 1


@dataclass
class LrProbe:
    """One probe's outcome: each lr with its validation loss and metric, the chosen lr."""

    lrs: list[float]
    val_loss: list[float]
    val_metric: list[float]
    steps: int
    chosen: float
    seconds: float
    cached: bool = field(default=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("cached")
        return out


def candidate_lrs(space: SearchSpace) -> list[float]:
    """The lrs a probe tries, highest first: the default seed lr clipped to the space's range,
    then :data:`STEPS_DOWN` half-decade steps below that, clipped too; empty when the space's
    lr has a single value or it offers no fine-tune."""
    if "finetune.lr" not in space or "finetune.epochs" not in space:
        return []
    lr = space.gene("finetune.lr")
    if space.gene("finetune.epochs").high <= 0 or lr.low >= lr.high:
        return []
    top = float(lr.clip(DEFAULT_SEED_LR))
    out: list[float] = []
    for k in range(STEPS_DOWN + 1):
        value = float(lr.clip(top * 10 ** (-k / 2)))
        if not any(math.isclose(value, v, rel_tol=1e-6) for v in out):
            out.append(value)
    return out if len(out) > 1 else []


def probe_steps(batches_per_epoch: int | None) -> int:
    """Batches a probe trains on: :data:`SHARE` of an epoch within [MIN_STEPS, MAX_STEPS],
    never more than an epoch (:data:`MIN_STEPS` when the epoch's length is unknown)."""
    if not batches_per_epoch:
        return MIN_STEPS
    steps = min(max(round(SHARE * batches_per_epoch), MIN_STEPS), MAX_STEPS)
    return max(1, min(steps, batches_per_epoch))


def choose(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The highest lr whose loss is at most :data:`TOLERANCE` times the lowest finite one;
    the lowest lr when none is finite."""
    finite = [loss for loss in losses if math.isfinite(loss)]
    if not finite:
        return min(lrs)
    best = min(finite)
    return max(lr for lr, loss in zip(lrs, losses, strict=True)
               if math.isfinite(loss) and loss <= TOLERANCE * best)


def run_probe(evaluator: Any, genome: Mapping[str, Any], lrs: Sequence[float], *, steps: int,
              seed: int) -> LrProbe:
    """For each lr: compress ``genome`` on ``evaluator`` (an
    :class:`petra.candidate.evaluate.Evaluator`), fine-tune it at that lr on the first
    ``steps`` training batches, and read its validation loss and metric."""
    from petra.candidate.train import evaluate_metric

    start = time.perf_counter()
    task = evaluator.task
    batches = list(itertools.islice(task.train, steps))
    losses, metrics = [], []
    for lr in lrs:
        recipe = Recipe.from_genome({**genome, "finetune.lr": lr, "finetune.epochs": 1})
        model = copy_model(task.model)
        _, masks, gated = evaluator.compress(model, recipe, seed)
        evaluator.finetune(model, recipe, seed, masks, gated, batches=batches)
        loss = evaluate_metric(model, task.val, lambda out, y: float(task.loss(out, y)))
        losses.append(loss if math.isfinite(loss) else math.inf)
        metrics.append(evaluate_metric(model, task.val, task.metric))
    return LrProbe(lrs=list(lrs), val_loss=losses, val_metric=metrics, steps=steps,
                   chosen=choose(lrs, losses), seconds=time.perf_counter() - start)


def _key(baseline_key: str, genome: Mapping[str, Any], lrs: Sequence[float], steps: int,
         seed: int) -> str:
    text = json.dumps({"baseline": baseline_key, "genome": dict(genome), "lrs": list(lrs),
                       "steps": steps, "seed": seed, "version": VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def probe_seed_lr(cfg: SearchConfig, space: SearchSpace, baseline: Baseline, task: Task, *,
                  cache: str | Path, say: Callable[[str], None] = print) -> LrProbe | None:
    """Probe the seed lr for this search (see the module docstring) and set
    ``space.seed_lr`` to it; returns the outcome, or None where nothing was probed. ``task`` is
    the search's loaded task (its training set's length sets the steps); the model is only
    compressed and trained on a cache miss."""
    lrs = candidate_lrs(space)
    if not lrs:
        return None
    recipes = seed_recipes(space)
    genome = recipes[0] if recipes else seed_finetune(space)
    train = task.train
    steps = probe_steps(len(train) if hasattr(train, "__len__") else None)
    path = Path(cache) / f"lr-probe-{_key(baseline.key, genome, lrs, steps, cfg.seed)}.json"
    if path.exists():
        return _use(LrProbe(**json.loads(path.read_text()), cached=True), space, say)
    from petra.candidate.evaluate import Evaluator

    say(f"fine-tune lr: probing {', '.join(f'{lr:.3g}' for lr in lrs)} on the first seed "
        f"recipe, {steps} batches each ...")
    try:
        evaluator = Evaluator.from_config(cfg, baseline, threads=cfg.execution.cpus_per_candidate)
        probe = run_probe(evaluator, genome, lrs, steps=steps, seed=cfg.seed)
    except Exception as exc:  # noqa: BLE001 - the search goes on with the default lr
        say(f"fine-tune lr: the probe failed ({describe_error(exc)}); keeping {lrs[0]:.3g}")
        return None
    write_atomic(path, json.dumps(probe.to_dict()))
    return _use(probe, space, say)


def recorded_probe(text: str | None, space: SearchSpace,
                   say: Callable[[str], None] = print) -> LrProbe | None:
    """The probe a search run recorded (its ``lr_probe.json``, ``text``) set on ``space``: a
    resumed search fine-tunes its seeds and grid points as it did before, even where the cache
    is gone. None, and the default lr, where the run recorded none (nothing was probed)."""
    if text is None:
        return None
    return _use(LrProbe(**json.loads(text), cached=True), space, say, recorded=True)


def _use(probe: LrProbe, space: SearchSpace, say: Callable[[str], None], *,
         recorded: bool = False) -> LrProbe:
    space.seed_lr = probe.chosen
    losses = ", ".join(f"{lr:.3g}: {loss:.4f}" for lr, loss in zip(
        probe.lrs, probe.val_loss, strict=True))
    how = ", as the run recorded" if recorded else ", cached" if probe.cached else ""
    say(f"fine-tune lr: {probe.chosen:.3g} for the seed recipes (val loss {losses}; "
        f"{probe.seconds:.0f} s{how})")
    return probe


def run_logs(probe: LrProbe | None) -> dict[str, dict[str, Any]]:
    """What the search run logs of ``probe``: the tag ``petra.seed_lr``, the artifact
    ``lr_probe.json`` and the metric ``lr_probe_s`` (its cost); all empty for None."""
    if probe is None:
        return {"tags": {}, "texts": {}, "metrics": {}}
    return {"tags": {"petra.seed_lr": f"{probe.chosen:.6g}"},
            "texts": {"lr_probe.json": json.dumps(probe.to_dict())},
            "metrics": {"lr_probe_s": probe.seconds}}
