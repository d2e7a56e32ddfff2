"""Compression methods. Importing this package fills the registries in :mod:`petra.registry`.

Registration order is listing order: ``none`` and the per-layer criteria come first.
"""

from petra.compress import prune, structured  # noqa: F401

# isort: split
from petra.compress import (  # noqa: F401
    attention,
    game,
    int4,
    lowrank,
    quantize,
    recurrent,
    regularize,
    sparsity,
)
