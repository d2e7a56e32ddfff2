"""The torch layer types that petra's weight genes act on, named once."""

from torch import nn

#: The convolutions: channel pruning, grouped-conv offsets and square-layer skips treat them alike.
CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: The layers with a weight that pruning, regularizers and quantization act on: the classes named
#: by :data:`petra.layers.PRUNABLE_TYPES`.
WEIGHTED_LAYERS = (nn.Linear, *CONV_LAYERS)
