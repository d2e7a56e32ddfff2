"""Why a trial of a compression failed: the layer of the model, or the line of its own code,
where the compressed model's forward (or torch-pruning) raised, and whether it runs in train
mode as a fine-tune runs it (:mod:`petra.compress.verify`)."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from petra.errors import a_kind, first_line
from petra.tasks.contract import args, tensors_in


@functools.lru_cache(maxsize=1024)
def _ours(filename: str) -> bool:
    """Whether ``filename`` is torch's, torch-pruning's, petra's or Python's code, not the model's."""
    import os
    import sys
    import sysconfig

    homes = [os.path.dirname(getattr(sys.modules.get(m), "__file__", None) or "/") for m in (
        "torch", "torch_pruning", "petra")]
    stdlib = sysconfig.get_paths()["stdlib"]
    return filename.startswith("<") or any(filename.startswith(h + os.sep) for h in homes) or (
        filename.startswith(stdlib + os.sep) and "site-packages" not in filename)


def _source(tb: Any) -> str:
    """``file:line (`code`)`` of a traceback entry."""
    import linecache
    import os

    code = tb.tb_frame.f_code
    text = re.sub(r"\s+#.*$", "", linecache.getline(code.co_filename, tb.tb_lineno).strip())
    return f"{os.path.basename(code.co_filename)}:{tb.tb_lineno}" + (f" (`{text}`)" if text else "")


def failure(exc: BaseException, model: nn.Module) -> str:
    """The first line of ``exc``, and, where a torch-pruning handler raised it, the layer or
    parameter of ``model`` nearest before the node it failed on: ``TypeError: unsupported
    operand type(s) for +: 'int' and 'NoneType'`` alone (Mixtral's ``o_proj``) said nothing of
    the split after the experts' weights that it came from. Where the pruned model's forward
    raised it, the innermost layer whose forward raised (``bilinear(): input1 size does not
    match weight size``: in an ``nn.Bilinear`` torch-pruning does not narrow)."""
    names = {id(m): n for n, m in model.named_modules()}
    node, module, line = None, None, ""
    tb = exc.__traceback__
    while tb is not None:
        code, this = tb.tb_frame.f_code, tb.tb_frame.f_locals.get("self")
        if code.co_name == "__call__" and "torch_pruning" in code.co_filename:
            node = getattr(this, "target", node)
        elif code.co_name == "forward" and names.get(id(this)):
            module = this  # the innermost layer of the model whose forward raised
        if not _ours(code.co_filename):
            line = _source(tb)  # the innermost line of the model's own code
        tb = tb.tb_next
    if node is None and module is not None:  # its own code: a size written in it, a split?
        return (f"the compressed model's forward fails in {names[id(module)]}, "
                f"{a_kind(type(module).__name__)} ({first_line(exc)})")
    if node is None and line:  # the model's own forward, outside its layers (a bmm, a sum)
        return f"the compressed model's forward fails at {line} ({first_line(exc)})"
    if node is None:
        return first_line(exc)
    names.update({id(p): n for n, p in model.named_parameters()})
    where, seen, todo = names.get(id(node.module)), set(), list(node.inputs)
    while where is None and todo:  # an operation: the nearest layer or weight before it
        up = todo.pop(0)
        if id(up) not in seen:
            seen.add(id(up))
            where = names.get(id(up.module))
            todo.extend(up.inputs)
    op = type(node.module).__name__.strip("_").removesuffix("Op").lower()
    at = where if id(node.module) in names else f"a {op} after {where or 'the input'}"
    return f"torch-pruning fails to carry the channels through {at} ({first_line(exc)})"


def train_run(model: nn.Module, example_input: Sequence[Any]
              ) -> BaseException | tuple[tuple[int, ...], ...]:
    """What a forward of ``model`` in train mode raises, or the shapes of what it returns: the
    fine-tune runs it so, and a layer only training reads (a VAE's log-variance head, a
    deep-supervision head) is not on the eval-mode path the other checks take. Its norms keep
    their statistics (a batch of one would fail a BatchNorm in train mode), and every module's
    mode is put back."""
    import torch

    modes = [(m, m.training) for m in model.modules()]
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.eval()
    try:
        with torch.no_grad():
            return tuple(tuple(t.shape) for t in tensors_in(model(*args(example_input))))
    except Exception as exc:  # noqa: BLE001 - any failure is the reason
        return exc
    finally:
        for m, training in modes:
            m.training = training
