"""The one training loop, used for the dense baseline and for every candidate's fine-tune."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from petra.tasks.contract import args, batch_size

#: Steps a run needs for the one-cycle schedule; a shorter one trains at the peak lr.
MIN_SCHEDULED_STEPS = 8

Penalty = Callable[[nn.Module, Any, Any, Any], torch.Tensor]


def train(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]],
    *,
    epochs: int,
    lr: float,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    penalty: Penalty | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    weight_decay: float = 1e-4,
    seed: int = 0,
    report: Callable[[int, float], bool | None] | None = None,
    after_step: Callable[[], None] | None = None,
) -> nn.Module:
    """Train ``model`` in place with AdamW and a one-cycle LR schedule (the peak lr throughout
    for a run of fewer than :data:`MIN_SCHEDULED_STEPS` steps).

    Args:
        batches: re-iterable ``(inputs, targets)`` batches; one pass is one epoch.
        epochs, lr: passes (0 returns the model unchanged); the one-cycle schedule's peak lr.
        loss_fn, penalty: ``(outputs, targets) -> loss``; an optional regularizer
            ``(model, inputs, outputs, targets) -> tensor`` added to it.
        masks: parameter name → 0/1 mask. Masked weights are kept at zero throughout, so
            unstructured sparsity survives the fine-tune.
        weight_decay, seed: AdamW's weight decay; the torch seed (dropout, etc.) of this run.
        report: called after each epoch with ``(epoch, mean_loss)``; training stops early
            when it returns True (the multi-fidelity rung, :mod:`petra.engine.fidelity`). It may
            evaluate the model: training mode is restored after it.
        after_step: called after every optimiser step (equilibrium gates step there).
    """
    if epochs <= 0:
        return model
    torch.manual_seed(seed)
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied weight by each name
    masks = {k: v.to(params[k].device, params[k].dtype) for k, v in (masks or {}).items()}
    steps = epochs * max(1, _length(batches))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = _one_cycle(optimizer, lr, steps)
    _apply_masks(params, masks)
    model.train()
    step = 0
    for epoch in range(epochs):
        total, count = 0.0, 0
        for inputs, targets in batches:
            loss = _step(model, inputs, targets, loss_fn, penalty, optimizer)
            if schedule is not None and step < steps - 1:
                schedule.step()
            step += 1
            _apply_masks(params, masks)
            if after_step is not None:
                after_step()
            n = batch_size(targets)
            total += loss * n
            count += n
        if report is not None:
            if report(epoch, total / max(count, 1)):
                break
            model.train()
    model.eval()
    return model


def _one_cycle(optimizer: Any, lr: float, steps: int) -> Any:
    """The one-cycle schedule of a run of ``steps`` steps; None for a run too short for one
    (OneCycleLR divides by zero below 5 steps), which keeps the peak lr throughout."""
    if steps < MIN_SCHEDULED_STEPS:
        return None
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps,
                                               pct_start=0.25)


def _length(batches: Iterable[Any]) -> int:
    """Batches per epoch; 1 for an iterable that cannot say."""
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return 1


@torch.no_grad()
def _apply_masks(params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        params[name].mul_(mask)


@torch.no_grad()
def evaluate_metric(
    model: nn.Module, batches: Iterable[tuple[Any, Any]], metric: Callable[[Any, Any], float]
) -> float:
    """The batch-size-weighted mean of ``metric`` over ``batches`` in eval mode."""
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in batches:
        n = batch_size(targets)
        total += metric(model(*args(inputs)), targets) * n
        count += n
    return total / max(count, 1)


def _step(model: nn.Module, inputs: Any, targets: Any, loss_fn: Callable[[Any, Any], Any],
          penalty: Penalty | None, optimizer: Any) -> float:
    """One optimiser step on a batch; returns its loss (the penalty included)."""
    outputs = model(*args(inputs))
    loss = loss_fn(outputs, targets)
    if penalty is not None:
        loss = loss + penalty(model, inputs, outputs, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
