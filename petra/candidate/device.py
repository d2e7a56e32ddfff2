"""Where a candidate's torch work runs: its fine-tune and its tier-0 screen.

Compression (pruning criteria, calibration passes) and the ONNX export stay on the CPU, and
latency is always measured on the deployment runtime (ONNX Runtime with ``measure.providers``):
the device makes the torch work faster, and every objective on the front is still measured where
the model will be deployed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from petra.errors import ConfigError

if TYPE_CHECKING:
    import torch

#: The values of ``execution.device``.
DEVICES = ("auto", "cpu", "cuda")


def resolve(device: str) -> torch.device:
    """The torch device ``execution.device`` names in this process: ``auto`` is CUDA when torch
    sees a CUDA device, else the CPU; ``cuda`` without one is an error that says so."""
    import torch

    if device not in DEVICES:
        raise ConfigError("execution.device", device, f"must be one of {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "execution.device", device, "",
            "'cuda' but torch sees no CUDA device in this process "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
            "use auto or cpu, or a CUDA build of torch on a machine with a GPU")
    return torch.device(device)


def check_providers(providers: Sequence[str]) -> list[str]:
    """``measure.providers`` when this onnxruntime offers every one of them. ONNX Runtime itself
    would fall back to the CPU with a warning, and the latency would be timed on another
    runtime than the one asked for."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise ConfigError(
            "measure.providers", missing[0], "",
            f"{missing[0]!r} is not available in onnxruntime {ort.__version__} here; "
            f"available: {', '.join(available)}")
    return list(providers)


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (nested in tuples, lists and dicts) moved to
    ``device``; anything else as it is."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


class OnDevice:
    """Re-iterable batches moved to ``device`` as they are read (the CPU's batches as they are)."""

    def __init__(self, batches: Iterable[Any], device: torch.device) -> None:
        self.batches, self.device = batches, device

    def __iter__(self) -> Iterator[Any]:
        if self.device.type == "cpu":
            yield from self.batches
            return
        for batch in self.batches:
            yield to_device(batch, self.device)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]
