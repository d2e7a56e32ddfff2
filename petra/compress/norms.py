"""Normalization layers torch-pruning does not know, made known to it.

torch-pruning prunes ``nn.LayerNorm``, ``nn.GroupNorm`` and BatchNorm. An RMSNorm (torch's
``nn.RMSNorm``, Llama's ``LlamaRMSNorm``, one written by hand) or T5's ``T5LayerNorm`` was traced
as the bare ``weight`` parameter it multiplies by:

- the residual stream, which petra finds by the norms that follow it, was never found on a
  model normalized so, and its writers (``o_proj``, ``down_proj``) lost channels by votes of
  their own, each cutting the whole stream, with no ``prune.width`` gene;
- ``nn.RMSNorm`` kept its ``normalized_shape`` while its weight lost channels (``Expected
  weight to be of same shape as normalized_shape``), and every writer of the stream was
  withheld.

:func:`norm_pruners` gives each such class a pruner: a norm over the last dimension whose only
parameters are one ``weight`` per channel (and a ``bias`` beside it), which loses the channels
of the layers it normalizes, as a LayerNorm does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

#: The class-name endings of the norms given a pruner.
NORM_NAMES = ("RMSNorm", "LayerNorm")
#: Attributes of such a norm that may hold its width, lowered with it.
WIDTH_ATTRIBUTES = ("hidden_size", "dim", "d_model", "num_features", "size")


def is_channel_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a norm torch-pruning does not know, with a weight per channel."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or \
            not type(module).__name__.endswith(NORM_NAMES) or any(module.children()):
        return False
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    return weight is not None and weight.dim() == 1 and set(params) <= {"weight", "bias"} and \
        all(p.shape == weight.shape for p in params.values())


def norm_width(module: nn.Module) -> int | None:
    """The width :func:`narrow` can narrow ``module`` by: an ``nn.LayerNorm`` with a weight,
    or an :func:`is_channel_norm` norm; None for any other module."""
    weight = getattr(module, "weight", None)
    if (isinstance(module, nn.LayerNorm) and isinstance(weight, torch.Tensor)
            and weight.dim() == 1) or is_channel_norm(module):
        return int(weight.shape[0])
    return None


def norm_pruners(model: nn.Module) -> dict[type, Any]:
    """A torch-pruning pruner for each class of :func:`is_channel_norm` norm in ``model``."""
    return {cls: _pruner(cls) for cls in {type(m) for m in model.modules() if is_channel_norm(m)}}


def narrow(layer: nn.Module, idxs: Sequence[int]) -> None:
    """Remove channels ``idxs`` of a norm with a weight per channel (a LayerNorm, or one of
    :func:`is_channel_norm`), in place: its weight and bias, and the width it holds."""
    width = int(layer.weight.shape[0])
    drop = {int(i) for i in idxs}
    keep = torch.tensor([i for i in range(width) if i not in drop])
    for name in ("weight", "bias"):
        param = getattr(layer, name, None)
        if isinstance(param, nn.Parameter):
            setattr(layer, name, nn.Parameter(param.data[keep].clone(),
                                              requires_grad=param.requires_grad))
    if tuple(getattr(layer, "normalized_shape", ())) == (width,):
        layer.normalized_shape = (len(keep),)
    for attr in WIDTH_ATTRIBUTES:
        value = getattr(layer, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value == width:
            setattr(layer, attr, len(keep))


def _pruner(cls: type[nn.Module]) -> Any:
    import torch_pruning as tp

    class Pruner(tp.pruner.BasePruningFunc):
        TARGET_MODULES = (cls,)

        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            narrow(layer, idxs)
            return layer

        prune_in_channels = prune_out_channels  # one width in and out: the layers it follows

        def get_out_channels(self, layer: nn.Module) -> int:
            return int(layer.weight.shape[0])

        get_in_channels = get_out_channels

    return Pruner()
