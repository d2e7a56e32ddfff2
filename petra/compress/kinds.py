"""The torch layer types that petra's weight genes act on, and torch-pruning's own graph nodes,
named once."""

from torch import nn

#: The convolutions: channel pruning, grouped-conv offsets and square-layer skips treat them alike.
CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: The layers with a weight that pruning, regularizers and quantization act on: the classes named
#: by :data:`petra.layers.PRUNABLE_TYPES`.
WEIGHTED_LAYERS = (nn.Linear, *CONV_LAYERS)


def is_op_node(module: object) -> bool:
    """Whether a torch-pruning dependency-graph node stands for one of its own operations (a
    reshape, a concat, an add), not for a layer or a parameter of the model."""
    return type(module).__module__.startswith("torch_pruning")
