"""Attentions that size their heads from the input's width, made to size them from their own.

Many hand-written attentions (DeiT's, MAE's, DINO's, Swin's, timm's before 1.0) begin with
``B, N, C = x.shape`` and read ``C`` where they mean the attention's own width: the heads'
width as ``C // self.num_heads``, and the heads' output reshaped back with
``reshape(B, N, C)``. The two widths are one in the dense model, and part ways the moment
either is pruned: no head could be removed (``shape '[2, 5, 16]' is invalid for input of size
80``), and no channel of the stream that the attention reads (its writers withheld).

:func:`own_width_forwards` gives such an attention a forward of its own, the same source with
``C = self.petra_width`` after that line: ``petra_width`` is the attention's q width (its heads
times their width), which head removal lowers with the heads
(:data:`petra.compress.attention_forms.WIDTH_NAMES`). It is done where the model computes the
same on the example batch afterwards; elsewhere the forward is left as it is (and the heads are
then refused with the reason, as before).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types
from typing import Any

import torch
from torch import nn

#: The attribute that holds a rewritten attention's own width.
WIDTH = "petra_width"


def _shape_of(value: ast.expr, name: str) -> bool:
    """Whether ``value`` is ``name.shape`` or ``name.size()``."""
    if isinstance(value, ast.Call) and not value.args and isinstance(value.func, ast.Attribute):
        value = value.func if value.func.attr == "size" else value
    return (isinstance(value, ast.Attribute) and value.attr in ("shape", "size")
            and isinstance(value.value, ast.Name) and value.value.id == name)


def _reshaped_by(fn: ast.FunctionDef, name: str) -> bool:
    """Whether ``name`` is read in the arguments of a ``reshape`` or ``view`` in ``fn``."""
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("reshape", "view"):
            if any(isinstance(n, ast.Name) and n.id == name
                   for arg in node.args for n in ast.walk(arg)):
                return True
    return False


def _rewritten(module: nn.Module) -> Any:
    """``type(module).forward`` with ``C = self.petra_width`` after ``B, N, C = x.shape``, or
    None where its source is not of that form (or cannot be read and compiled alone)."""
    forward = type(module).forward
    if forward.__code__.co_freevars:  # a closure (zero-argument super()) compiles apart
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    fn = tree.body[0]
    if not isinstance(fn, ast.FunctionDef) or fn.decorator_list or len(fn.args.args) < 2:
        return None
    this, x = fn.args.args[0].arg, fn.args.args[1].arg
    for i, stmt in enumerate(fn.body):
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and \
                isinstance(stmt.targets[0], ast.Tuple) and _shape_of(stmt.value, x):
            last = stmt.targets[0].elts[-1]
            if not isinstance(last, ast.Name) or last.id == "_" or not _reshaped_by(fn, last.id):
                return None
            fn.body.insert(i + 1, ast.parse(f"{last.id} = {this}.{WIDTH}").body[0])
            namespace: dict[str, Any] = {}
            try:  # its annotations or defaults may name what only its class's scope held
                exec(compile(ast.fix_missing_locations(tree),  # noqa: S102 - its own source
                             f"<petra: {type(module).__qualname__}.forward>", "exec"),
                     forward.__globals__, namespace)
            except Exception:  # noqa: BLE001 - left as it is
                return None
            return namespace[fn.name]
    return None


def _own_width(module: nn.Module) -> int | None:
    """The q width of an attention petra removes heads from, or None."""
    from petra.compress.attention_forms import count_attribute, fused_names, qkv_layers

    if count_attribute(module) is None:
        return None
    fused = fused_names(module)
    if fused is not None:
        return int(module.get_submodule(fused[1]).in_features)
    qkv = qkv_layers(module)
    return int(qkv[0].out_features) if qkv is not None else None


def own_width_forwards(model: nn.Module, example_input: tuple[Any, ...]) -> tuple[str, ...]:
    """Give each attention of ``model`` that sizes its heads from its input's width a forward
    that sizes them from :data:`WIDTH` (see the module's doc); the names of those given one."""
    found = {}
    for name, module in model.named_modules():
        width = _own_width(module)
        if width is not None and WIDTH not in vars(module) and (fn := _rewritten(module)):
            found[name] = (module, width, fn)
    if not found:
        return ()
    training = model.training
    model.eval()
    same = False
    with torch.no_grad():
        try:
            want = model(*example_input)
            for module, width, fn in found.values():
                setattr(module, WIDTH, width)
                module.forward = types.MethodType(fn, module)
            same = torch.allclose(model(*example_input), want, rtol=1e-4, atol=1e-5)
        except Exception:  # noqa: BLE001 - a forward that fails: the model as it was
            pass
    model.train(training)
    if not same:
        for module, _, _ in found.values():
            vars(module).pop("forward", None)
            vars(module).pop(WIDTH, None)
        return ()
    return tuple(found)
