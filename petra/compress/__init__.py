"""Compression methods. Importing this package fills the registries in :mod:`petra.registry`."""

from petra.compress import prune, quantize, regularize, structured  # noqa: F401
