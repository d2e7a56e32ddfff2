"""Channel gates: one multiplier per output channel of a dependency group, by forward hooks.

A torch-pruning dependency group couples layers that share a channel set (a conv, its
BatchNorm, a residual branch's last conv and its shortcut). :class:`ChannelGates` multiplies the
group's channels by a vector ``s`` where that is exact and survives normalisation:

- on the outputs of the group's BatchNorms, when it has any (scaling a conv's output before a
  BatchNorm would be normalised away); folding ``s`` then scales the BatchNorms' weight and bias;
- otherwise on the outputs of its Conv / Linear layers; folding scales their weight rows and
  bias.

The ``shapley`` criterion uses gates as 0/1 masks, to switch channels off; the ``equilibrium``
criterion trains them during the fine-tune (:class:`EquilibriumGates`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from petra.compress.channel_counts import kept_channels
from petra.compress.kinds import WEIGHTED_LAYERS
from petra.compress.structured import GATED_NORMS, remove_gated_channels
from petra.tasks.contract import args

_BN, _LAYERS = GATED_NORMS, WEIGHTED_LAYERS


def _channel_dim(module: nn.Module, output: torch.Tensor) -> int:
    return output.dim() - 1 if isinstance(module, nn.Linear) else 1


class ChannelGates:
    """A gate vector on a group's channels (see the module docstring).

    Args:
        members: the group's out-channel modules (:func:`petra.compress.structured.out_channel_members`).
        n: the number of channels.
        init: the gates' initial value.
        trainable: whether ``s`` gets gradients.
    """

    def __init__(self, members: Iterable[nn.Module], n: int, *, init: float = 1.0,
                 trainable: bool = False) -> None:
        members = list(members)
        norms = [m for m in members if isinstance(m, _BN)]
        self.gated = norms or [m for m in members if isinstance(m, _LAYERS)]
        self.members = members
        if not self.gated:
            raise ValueError("the group has no BatchNorm, Conv or Linear layer to gate")
        self.n = int(n)
        self.s = torch.full((self.n,), float(init), requires_grad=trainable)
        self._hooks = [m.register_forward_hook(self._hook) for m in self.gated]

    def _hook(self, module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        dim = _channel_dim(module, output)
        shape = [1] * output.dim()
        shape[dim] = self.n
        return output * self.s.view(shape).to(output.device, output.dtype)  # s stays on the CPU

    def set(self, values: torch.Tensor) -> None:
        with torch.no_grad():
            self.s.copy_(values.to(self.s.dtype))

    def remove(self) -> None:
        """Take the hooks off; the model computes as if every gate were 1."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @torch.no_grad()
    def fold(self) -> None:
        """Write the gates into the gated layers' parameters, then take the hooks off: the
        model computes exactly what it computed with the gates."""
        s = self.s.detach()
        for module in self.gated:
            shape = [-1] + [1] * (module.weight.dim() - 1)
            module.weight.mul_(s.view(shape).to(module.weight.device, module.weight.dtype))
            if module.bias is not None:
                module.bias.mul_(s.to(module.bias.device, module.bias.dtype))
        self.remove()

    def channel_sq_norms(self) -> torch.Tensor:
        """``||theta_i||^2``: the squared norm of every parameter slice of channel ``i`` over the
        group's out-channel members (weight rows, biases, BatchNorm weight and bias)."""
        total = torch.zeros(self.n)
        for module in self.members:
            for param in (module.weight, getattr(module, "bias", None)):
                if param is not None and param.shape[0] == self.n:
                    total += param.detach().float().pow(2).reshape(self.n, -1).sum(1).cpu()
        return total


class EquilibriumGates(ChannelGates):
    """Participation gates trained by projected gradient ascent on each channel's utility.

    "Pruning as a Game" (arXiv 2512.22106): channel ``i`` is a player with participation
    ``s_i`` in [0, 1], and after each optimiser step on the weights

        s_i <- clip(s_i + lr * dU_i/ds_i, 0, 1)
        dU_i/ds_i = -alpha * dL/ds_i - 2 * beta * ||theta_i||^2 * s_i - gamma * sign(s_i)

    with alpha = 1 and eta = 0, as in practice. ``dL/ds_i`` comes from the same backward pass as
    the weights' gradients, through the gates; it equals ``<grad_theta_i L, theta_i>`` at the
    effective weights ``s_i * theta_i``. METHODS.md writes the benefit as
    ``+alpha * <grad L, theta_i>``; read with the loss's gradient that would shrink the gate of a
    channel that lowers the loss, so the benefit here is the loss's *decrease*, which is the
    reading under which "a gate survives when its group lowers the loss" (tested).
    ``||theta_i||^2`` is divided by its mean over the group, so beta means the same on layers of
    any scale. Gates under :data:`REMOVE_BELOW` are removed physically after the fine-tune.

    One more reading, for networks with BatchNorm: a BatchNorm downstream normalises away any
    scale that all the gates share, so the loss cannot defend it, and the penalty alone would
    shrink every gate together (the model breaks, nothing falls under 0.01). After each step
    the gates are therefore divided by their maximum: the game is played on *relative*
    participation, the strongest channel stays at 1, and the others keep only what their benefit
    defends against the penalty. On a network without BatchNorm (the paper's MLP) this only
    rescales the gates, which the next layer's weights absorb.
    """

    REMOVE_BELOW = 0.01
    #: The step size of the gates' ascent: large enough that a gate can cross [0, 1] within the
    #: few dozen steps of a short fine-tune (the projection keeps it in range).
    LR = 0.5

    def __init__(self, members: Iterable[nn.Module], n: int, *, beta: float, gamma: float,
                 alpha: float = 1.0, lr: float | None = None) -> None:
        super().__init__(members, n, init=1.0, trainable=True)
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.lr = self.LR if lr is None else float(lr)

    @torch.no_grad()
    def step(self) -> None:
        """One projected ascent step, from the gradient the last backward pass left on ``s``."""
        grad = self.s.grad if self.s.grad is not None else torch.zeros_like(self.s)
        norms = self.channel_sq_norms()
        norms = norms / norms.mean().clamp_min(1e-12)
        ascent = (-self.alpha * grad - 2 * self.beta * norms * self.s
                  - self.gamma * torch.sign(self.s))
        self.s.add_(self.lr * ascent).clamp_(0.0, 1.0)
        top = self.s.max()
        if top > 0:
            self.s.div_(top)  # relative participation: the strongest player stays at 1
        self.s.grad = None

    def removable(self) -> torch.Tensor:
        """Indices of the channels whose gate ended under :data:`REMOVE_BELOW`."""
        return torch.nonzero(self.s.detach() < self.REMOVE_BELOW).flatten()


def remove_gated(model: nn.Module, example_input: Sequence[Any], gated: Mapping[str, ChannelGates],
                 round_to: int, batches: Iterable[Any]) -> dict[str, tuple[int, int]]:
    """Fold the trained gates into the weights, remove the channels under 0.01 (the kept count
    rounded to ``round_to``, as for every structured criterion), then re-estimate the
    BatchNorm statistics on ``batches``; returns group root → (channels before, after)."""

    removals = {}
    for name, gates in gated.items():
        n = gates.n
        keep = kept_channels(n, len(gates.removable()) / n, round_to)
        removals[name] = torch.argsort(gates.s.detach(), stable=True)[: n - keep].tolist()
        gates.fold()
    changes = remove_gated_channels(model, example_input, removals)
    recalibrate_batchnorm(model, batches)
    return changes


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any]) -> None:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (a cumulative average).

    The gates moved during the fine-tune, faster than the running statistics' momentum follows;
    without this, the model that was trained is not the model that is measured.
    """

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for inputs, _ in batches:
            model(*args(inputs))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)
    model.eval()
