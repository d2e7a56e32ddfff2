"""The example rows that verification runs on (:func:`fewer_rows`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from petra.tasks.contract import args, first_tensor

#: Rows of the example batch that verification runs on (:func:`fewer_rows`): its checks run
#: the model hundreds of times (``petra space`` took 11 minutes on a Hugging Face MobileNetV2
#: with a 64-image example, 10 of them in the landing checks), and a few rows tell a channel
#: cut wrongly as well as many.
VERIFY_ROWS = 8


@torch.no_grad()
def fewer_rows(model: nn.Module, example_input: Any, rows: int = VERIFY_ROWS) -> Any:
    """The first ``rows`` of the example batch: axis 0 of each input tensor that has the
    batch's size there, where the model computes on them what it computes on those rows of the
    whole batch; the whole batch otherwise (a model whose axis 0 is not its batch, or that
    mixes the rows)."""
    inputs = args(example_input)
    sizes = [x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim()]
    if not sizes or sizes[0] <= rows:
        return example_input
    cut = tuple(x[:rows] if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == sizes[0]
                else x for x in inputs)
    was = model.training
    try:
        whole, part = (first_tensor(model.eval()(*batch)).float() for batch in (inputs, cut))
    except Exception:  # noqa: BLE001 - the whole batch, as before
        return example_input
    finally:
        model.train(was)
    scale = float(whole.abs().max()) or 1.0
    if whole.dim() == 0 or whole.shape[0] != sizes[0] or part.shape != (rows, *whole.shape[1:]) \
            or not torch.allclose(whole[:rows], part, rtol=1e-3, atol=1e-4 * scale):
        return example_input
    return cut if isinstance(example_input, tuple | list) else cut[0]
