"""Swapping a user's layers for modules that compute the same, only where nothing changes; baking
its weights' reparametrizations into the plain weights they compute."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F


def swap_if_unchanged(model: nn.Module, inputs: Sequence[torch.Tensor],
                      found: Sequence[tuple[str, nn.Module]],
                      build: Callable[[nn.Module], nn.Module], *, rtol: float, atol: float
                      ) -> tuple[str, ...]:
    """Replace, in place, each ``(name, module)`` of ``found`` by ``build(module)`` (in the
    module's train mode), and return their names. Where ``model`` (which takes ``inputs``
    positionally) then raises a ``ValueError`` or computes anything else, the modules are tried
    one at a time, and each that changes what it computes is put back (a DLRM's bag called
    with offsets kept every other bag from its stand-in)."""
    if not found:
        return ()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        before = model(*inputs)

        def same() -> bool:
            try:
                return torch.allclose(model(*inputs), before, rtol=rtol, atol=atol)
            except ValueError:
                return False

        for name, module in found:
            model.set_submodule(name, build(module).train(module.training))
        swapped = [name for name, _ in found]
        if not same():
            for name, module in found:
                model.set_submodule(name, module)
            swapped = []
            for name, module in found if len(found) > 1 else ():  # each alone, on the kept
                model.set_submodule(name, build(module).train(module.training))
                if same():
                    swapped.append(name)
                else:
                    model.set_submodule(name, module)
    model.train(was_training)
    return tuple(swapped)


def plain_weights(model: nn.Module) -> tuple[str, ...]:
    """Bake every weight reparametrization of ``model`` into the plain tensor it computes, in
    place, and return the layers' names: ``torch.nn.utils.parametrizations.weight_norm`` and
    ``spectral_norm`` (``parametrize``), the older hook forms ``weight_norm`` and
    ``spectral_norm``, and the masks of ``torch.nn.utils.prune`` (``weight_orig`` times
    ``weight_mask``, as ``prune.remove`` makes them permanent). The layers compute what they
    computed (a spectral norm as in eval mode); a fine-tune then trains the plain weight.
    torch-pruning assigns a pruned layer a new ``weight`` parameter, which a parametrized layer
    refuses (``attribute 'weight' already exists``)."""
    from torch.nn.utils import parametrize, prune, remove_spectral_norm, remove_weight_norm
    from torch.nn.utils.spectral_norm import SpectralNorm, SpectralNormLoadStateDictPreHook
    from torch.nn.utils.weight_norm import WeightNorm

    baked = []
    for name, module in list(model.named_modules()):
        hooks = [h for h in module._forward_pre_hooks.values()
                 if isinstance(h, WeightNorm | SpectralNorm | prune.BasePruningMethod)]
        for hook in hooks:
            {WeightNorm: remove_weight_norm, SpectralNorm: remove_spectral_norm}.get(
                type(hook), prune.remove)(module, hook._tensor_name if isinstance(
                    hook, prune.BasePruningMethod) else hook.name)
        # torch's remove_spectral_norm leaves its state-dict loading hook (it looks for the
        # hook unwrapped), which then asks for weight_orig and weight_u on every load
        for key, wrapped in list(module._load_state_dict_pre_hooks.items()) if hooks else ():
            if isinstance(getattr(wrapped, "hook", wrapped), SpectralNormLoadStateDictPreHook):
                del module._load_state_dict_pre_hooks[key]
        if parametrize.is_parametrized(module):
            module.parametrizations.eval()  # a spectral norm in train mode iterates once more
            for tensor in list(module.parametrizations):
                parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
        elif not hooks:
            continue
        baked.append(name)
    return tuple(baked)


def _is_transposed_linear(module: nn.Module) -> bool:
    """A Hugging Face ``Conv1D``: ``x @ weight + bias``, ``weight`` of shape ``(nx, nf)``."""
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and weight is not None and weight.dim() == 2 and weight.shape[1] == module.nf
            and (bias is None or tuple(bias.shape) == (module.nf,)) and not module._modules)


def linear_stand_ins(model: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[str, ...]:
    """Replace, in place, each Hugging Face ``Conv1D`` of ``model`` (a :class:`TaskModel`, or any
    model that takes ``inputs`` positionally and returns a tensor) by the ``nn.Linear`` that
    computes the same (its weight transposed), and return their names.

    The model's outputs on ``inputs`` must not change: where they do (a ``Conv1D`` that is not
    the plain transposed Linear), every layer is put back and nothing is replaced.
    """
    found = [(name, module) for name, module in model.named_modules()
             if name and _is_transposed_linear(module)]
    return swap_if_unchanged(model, inputs, found, _linear_of, rtol=1e-4, atol=1e-5)


def _linear_of(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` a Hugging Face ``Conv1D`` computes: its weight transposed."""
    weight, bias = module.weight, module.bias
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.T)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


class FrozenNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm that normalizes by its running statistics in train mode too, and never
    re-estimates them: what a ``FrozenBatchNorm2d`` computes from its four buffers. As a
    BatchNorm, torch-pruning removes its channels with its conv's, and the exporter writes a
    BatchNormalization that ONNX Runtime folds into the conv; its weight and bias are frozen
    parameters (buffers, which torch-pruning does not cut, left the conv's group withheld)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 - torch's name
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D input)")

    def reset_running_stats(self) -> None:
        """Nothing: the statistics are the model's (a BatchNorm re-estimation leaves them)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's name
        self._check_input_dim(input)
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)


_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def _frozen_norm_of(module: nn.Module) -> FrozenNorm:
    width = module.weight.numel()
    norm = FrozenNorm(width, eps=float(getattr(module, "eps", 1e-5)))
    with torch.no_grad():
        for name in _FROZEN_BUFFERS:
            getattr(norm, name).copy_(getattr(module, name))
    norm.weight.requires_grad_(False)
    norm.bias.requires_grad_(False)
    return norm.to(module.weight.device)


def frozen_norms(model: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[str, ...]:
    """Replace, in place, each frozen BatchNorm of ``model`` (a module with no parameters or
    children, whose floating buffers are ``weight``, ``bias``, ``running_mean`` and
    ``running_var`` of one length, as torchvision's ``FrozenBatchNorm2d``) by the
    :class:`FrozenNorm` that computes the same, and return their names; none where the model's
    outputs on ``inputs`` change."""
    found = [(name, module) for name, module in model.named_modules()
             if name and not isinstance(module, nn.modules.batchnorm._BatchNorm)
             and not module._parameters and not module._modules
             and {n for n, b in module._buffers.items() if b is not None and b.is_floating_point()}
             == set(_FROZEN_BUFFERS)
             and len({tuple(module._buffers[n].shape) for n in _FROZEN_BUFFERS}) == 1
             and module._buffers["weight"].dim() == 1]
    return swap_if_unchanged(model, inputs, found, _frozen_norm_of, rtol=1e-4, atol=1e-5)


def buffers_as_parameters(model: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[str, ...]:
    """Make each persistent floating buffer of ``model`` with a dimension longer than 1, outside
    its norms' statistics, a frozen ``nn.Parameter`` of the same name, in place, and return
    their names. torch-pruning follows parameters through the forward and cuts them with the
    channels they meet; a buffer it does not see, so the sinusoidal table a transformer adds
    to its stream (the PyTorch tutorial's ``PositionalEncoding``) kept its width while the
    stream's shrank, and every writer of the stream was withheld. A parameter that needs no
    grad stays frozen in every fine-tune. Where a forward in train mode then fails (one that
    assigns the buffer a new tensor), nothing is changed."""
    found = [(f"{owner}.{name}".lstrip("."), module, name)
             for owner, module in model.named_modules()
             if not isinstance(module, nn.modules.batchnorm._NormBase)
             for name, buffer in module._buffers.items()
             if buffer is not None and buffer.is_floating_point()
             and name not in module._non_persistent_buffers_set
             and any(size > 1 for size in buffer.shape)]
    if not found:
        return ()
    for _, module, name in found:
        module.register_parameter(name, nn.Parameter(module._buffers.pop(name),
                                                     requires_grad=False))
    try:
        with torch.no_grad():
            copy.deepcopy(model).train()(*inputs)
    except Exception:  # noqa: BLE001 - any failure puts every buffer back
        for _, module, name in found:
            module.register_buffer(name, module._parameters.pop(name).data)
        return ()
    return tuple(full for full, _, _ in found)
