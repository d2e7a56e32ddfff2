"""Layers the model calls but whose outputs never reach its output.

A WaveNet's last residual conv computes a stream that nothing reads (only the skip outputs are
summed); the ONNX exporter drops it, so a gene on it changes nothing that is saved or timed.
:func:`unreached_layers` finds such layers on the example batch in two steps:

1. **the autograd graph**: one forward with gradients on, and a walk from the outputs' grad
   functions to the parameters they reach. A layer none of whose own parameters is reached is a
   suspect. No backward pass is run.
2. **a perturbation**: each suspect's output is replaced by noise of its own scale, and the
   model's outputs must stay bit for bit what they were. A layer that decides only an index (a
   router whose argmax picks the expert, with no gradient through it) changes the outputs
   here, and stays.

Only a layer both steps find is reported: neither alone would do (a zero gate keeps step 2's
outputs, a hard router fails step 1's walk).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from petra.tasks.contract import args, tensors_in

#: What ``petra space`` says of such a layer, in place of its genes.
UNREACHED = ("its output never reaches the model's output (the model computes it and discards "
             "it; the exported graph drops it): no gene of it would change the artifact")


def _reached(outputs: Sequence[torch.Tensor]) -> set[int]:
    """The ids of the leaf tensors (parameters) the outputs' autograd graph reaches."""
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    seen: set[Any] = set()
    leaves: set[int] = set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # an AccumulateGrad node
        if variable is not None:
            leaves.add(id(variable))
        stack.extend(f for f, _ in fn.next_functions)
    return leaves


def unreached_layers(model: nn.Module, example_input: Any, names: Sequence[str]
                     ) -> dict[str, str]:
    """Of the layers ``names`` (each called on the example batch), those whose outputs do not
    reach ``model``'s outputs, each with :data:`UNREACHED`. The model is left as it was."""
    modules = dict(model.named_modules())
    own = {n: [p for p in modules[n].parameters() if p.is_floating_point()] for n in names}
    params = [p for ps in own.values() for p in ps]
    needs = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                reached = _reached(tensors_in(model(*args(example_input))))
        except Exception:  # noqa: BLE001 - a forward that needs no_grad: nothing is told
            return {}
        suspects = [n for n, ps in own.items() if ps and not any(id(p) in reached for p in ps)]
        if not suspects:
            return {}
        with torch.no_grad():
            plain = tensors_in(model(*args(example_input)))
            return {n: UNREACHED for n in suspects
                    if _unchanged(model, modules[n], example_input, plain)}
    finally:
        for p, need in zip(params, needs, strict=True):
            p.requires_grad_(need)
        model.train(was_training)


def _unchanged(model: nn.Module, layer: nn.Module, example_input: Any,
               plain: Sequence[torch.Tensor]) -> bool:
    """Whether ``model``'s outputs stay exactly ``plain`` with ``layer``'s outputs replaced by
    noise of their own scale."""
    generator = torch.Generator().manual_seed(0)

    def noise(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            scale = float(t.abs().mean()) + 1.0
            return torch.randn(t.shape, generator=generator).to(t) * scale
        if isinstance(t, (tuple, list)):
            return type(t)(noise(x) for x in t)
        return t

    handle = layer.register_forward_hook(lambda _m, _i, out: noise(out))
    try:
        perturbed = tensors_in(model(*args(example_input)))
    except Exception:  # noqa: BLE001 - a model that fails on it reads the layer
        return False
    finally:
        handle.remove()
    return len(perturbed) == len(plain) and all(
        a.shape == b.shape and torch.equal(a, b) for a, b in zip(perturbed, plain, strict=True))
