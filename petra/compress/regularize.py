"""Penalties used while fine-tuning, one registered function each.

``fn(ctx) -> penalty or None`` where ``penalty(model, inputs, outputs, targets)`` returns a scalar
added to the task loss (see :func:`petra.candidate.train.train`). ``ctx`` is a :class:`RegContext`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from petra.compress.kinds import WEIGHTED_LAYERS
from petra.genes import Categorical, Float
from petra.registry import REGULARIZERS
from petra.tasks.contract import args

if TYPE_CHECKING:
    from petra.schema import SpaceConfig




@dataclass
class RegContext:
    """What a regularizer may use: its strength, the dense teacher, the task loss, extra genes."""

    strength: float = 0.0
    teacher: nn.Module | None = None
    loss: Callable[[Any, Any], torch.Tensor] | None = None
    params: Mapping[str, Any] = field(default_factory=dict)  # the genes it declares, by name


def weighted_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, WEIGHTED_LAYERS)]


@REGULARIZERS.register("none", description="no penalty")
def none(ctx: RegContext) -> None:
    return None


def weight_penalty(ctx: RegContext, term: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """The penalty ``strength * sum(term(w))`` over the Linear/Conv weights of the model."""
    strength = ctx.strength

    def penalty(model: nn.Module, inputs: Any, outputs: Any, targets: Any) -> torch.Tensor:
        return strength * sum(term(m.weight) for m in weighted_modules(model))

    return penalty


@REGULARIZERS.register(
    "l1", description="strength * sum |w| over Linear/Conv weights (drives weights to zero)"
)
def l1(ctx: RegContext) -> Any:
    return weight_penalty(ctx, lambda w: w.abs().sum())


@REGULARIZERS.register(
    "group_lasso",
    description="strength * sum over output channels of ||w_c||_2 (drives whole channels to zero)",
)
def group_lasso(ctx: RegContext) -> Any:
    return weight_penalty(ctx, lambda w: w.flatten(1).norm(dim=1).sum())


@REGULARIZERS.register(
    "hoyer",
    description="strength * sum over layers of ||w||_1 / ||w||_2 (scale-invariant sparsity)",
)
def hoyer(ctx: RegContext) -> Any:
    return weight_penalty(ctx, lambda w: w.abs().sum() / w.norm().clamp_min(1e-12))


def kd_genes(space_cfg: SpaceConfig) -> list[Any]:
    """``reg.kd_alpha`` (the distillation term's weight) and ``reg.kd_temperature``."""

    return [Float("reg.kd_alpha", 0.1, 0.9, 0.5, step=0.05),
            Categorical("reg.kd_temperature", (1.0, 2.0, 4.0, 8.0), 4.0)]


@REGULARIZERS.register(
    "kd",
    description="distillation from the dense baseline: kd_alpha * T^2 * KL(teacher_T || student_T) "
    "over the class dimension (kd_alpha * MSE to the teacher's outputs for float targets)",
    genes=kd_genes,
    class_genes=("reg.kd_temperature",),  # read by the softmax of class targets only
)
def kd(ctx: RegContext) -> Any:
    """Knowledge distillation (Hinton et al.) added to the task loss.

    The total is ``loss + alpha * T² * KL(softmax(t/T) || softmax(s/T))``, the KL summed over
    the class dimension and averaged over the rest: the task loss keeps its weight, so the
    penalty is non-negative, and the teacher is the dense baseline in eval mode. The class
    dimension is the one the integer targets lack (``(B, C)`` against ``(B,)``, a sequence's
    ``(B, T, V)`` against ``(B, T)``, a segmentation's ``(B, C, H, W)`` against
    ``(B, H, W)``). Where there is none (float targets: a regression, an embedding), the
    penalty is ``alpha * MSE`` to the teacher's outputs, for a softmax over one output or over
    the wrong axis distills nothing.
    """
    import torch.nn.functional as F

    if ctx.teacher is None:
        raise ValueError("kd needs the dense teacher in its context")
    teacher = ctx.teacher.eval()
    alpha = float(ctx.params.get("reg.kd_alpha", 0.5))
    temperature = float(ctx.params.get("reg.kd_temperature", 4.0))

    def penalty(model: nn.Module, inputs: Any, outputs: Any, targets: Any) -> torch.Tensor:
        with torch.no_grad():
            taught = teacher(*args(inputs))
        dim = class_dim(outputs, targets)
        if dim is None:
            return alpha * F.mse_loss(outputs, taught.to(outputs.dtype))
        log_teacher = F.log_softmax(taught / temperature, dim=dim)
        log_student = F.log_softmax(outputs / temperature, dim=dim)
        kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=dim).mean()
        return alpha * temperature**2 * kl

    return penalty


def fit_to_targets(space: Any, batches: Any) -> None:
    """Drop from ``space`` the genes that decide nothing for targets like ``batches``' first:
    with float targets (a regression), a regularizer's ``class_genes`` (kd is an MSE to the
    teacher there, and its temperature was a gene the search spent evaluations on)."""
    first = next(iter(batches), None)
    targets = first[1] if isinstance(first, tuple | list) and len(first) == 2 else None
    if isinstance(targets, torch.Tensor) and targets.is_floating_point():
        space.drop(gene for entry in REGULARIZERS for gene in entry.meta.get("class_genes", ()))


def class_dim(outputs: torch.Tensor, targets: Any) -> int | None:
    """The dimension of ``outputs`` that holds the classes: the one whose removal leaves the
    integer ``targets``' shape (torch's ``cross_entropy`` convention, dimension 1, first), or
    None where the targets are not integer class labels of that shape."""
    if not (isinstance(targets, torch.Tensor) and not targets.is_floating_point()
            and outputs.dim() == targets.dim() + 1 and outputs.dim() >= 2):
        return None
    shape = tuple(outputs.shape)
    return next((d for d in (1, *range(2, outputs.dim())) if shape[:d] + shape[d + 1:]
                 == tuple(targets.shape)), None)
