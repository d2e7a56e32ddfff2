"""Products that broadcast a tensor across the channels of another, cut from torch-pruning's
graph before it builds its dependencies.

torch-pruning takes every operand of an element-wise product to carry the product's channels.
An attention pooling's ``softmax(score(h)) * h`` (a weight per position, shape ``(B, T, 1)``),
an MoE's ``gates.unsqueeze(-1) * expert_outputs`` (``(B, E, 1)``) and a gate's
``sigmoid(gate(x)) * shared(x)`` broadcast their narrow operand across the channels of the
other. torch-pruning tied the channels of the whole stream to the 1 or E outputs of the score,
router or gate, mapped them past that width, and every layer of the stream was refused.

:func:`cut_broadcasts` cuts the narrow operand from the product where, in the saved operands of
the product's autograd node, it has size 1 along the other's channel dimension (the one
dimension whose length is the channel count torch-pruning gives the other), and its own count
differs. A squeeze-excitation's ``x * s`` (``(B, C, 1, 1)`` against ``(B, C, H, W)``) has the
channels and stays tied; so does a product whose wide operand has its channel count along two
dimensions (a FiLM's ``h * gamma`` on a 16x16 map of 16 channels, where torch-pruning also
counted the chunked ``gamma`` as 32), or whose counts agree by chance (refused, as before).
The structure checks compare every removal with masking (:mod:`petra.compress.verify`).
"""

from __future__ import annotations

from typing import Any

import torch

#: Autograd nodes of the products (and quotients) whose operands may broadcast.
PRODUCTS = {"MulBackward0", "DivBackward0"}


def cutting_broadcasts(graph: Any) -> Any:
    """``graph``, a torch-pruning ``DependencyGraph`` not yet built, made to cut the products
    that broadcast (:func:`cut_broadcasts`) before it builds its dependencies."""
    build = graph._build_dependency
    graph._build_dependency = lambda nodes: (cut_broadcasts(graph, nodes), build(nodes))
    return graph


def cut_broadcasts(graph: Any, module2node: dict[Any, Any]) -> None:
    """Cut, in place, each product's operand that it broadcasts across the other's channels
    (``graph``: the torch-pruning ``DependencyGraph`` being built). torch-pruning counts an
    operand's channels through the products before it, so the products are visited again
    until none is cut: a gate before an attention pooling first hid the stream's count."""
    products = [n for n in module2node.values()
                if hasattr(n.grad_fn, "name") and n.grad_fn.name() in PRODUCTS]
    while any([_cut(graph, node) for node in products]):
        pass


def _cut(graph: Any, node: Any) -> bool:
    """Whether ``node``'s narrow operand was cut from it (see the module doc)."""
    from torch_pruning.dependency.shape_infer import infer_out_channels_recursively

    fn = node.grad_fn
    saved = (getattr(fn, "_saved_self", None), getattr(fn, "_saved_other", None))
    if len(node.inputs) != 2 or not all(isinstance(t, torch.Tensor) and t.dim() > 1
                                        for t in saved) or saved[0].dim() != saved[1].dim():
        return False
    slots = {id(f[0]): i for i, f in enumerate(fn.next_functions) if f[0] is not None}
    by_slot = {slots.get(id(n.grad_fn)): n for n in node.inputs}
    if set(by_slot) != {0, 1}:
        return False
    for narrow, wide in ((0, 1), (1, 0)):
        try:
            counts = [infer_out_channels_recursively(graph, by_slot[i], [0])
                      for i in (narrow, wide)]
        except Exception:  # noqa: BLE001 - counts torch-pruning cannot infer: left tied
            return False
        # the wide operand's channel dimension, where only one has its channel count
        dims = [d for d in range(saved[wide].dim()) if saved[wide].shape[d] == counts[1]]
        if counts[1] and counts[1] > 1 and counts[0] != counts[1] and len(dims) == 1 and \
                saved[narrow].shape[dims[0]] == 1:
            node.inputs.remove(by_slot[narrow])
            by_slot[narrow].outputs.remove(node)
            return True
    return False
