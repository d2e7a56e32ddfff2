"""The ground floor: petra's config error, how any error is told in one line, and the
statuses a candidate ends in.

Nothing here imports the rest of petra, so every layer may import it.
"""

from __future__ import annotations

import re
from typing import Any


class ConfigError(ValueError):
    """A config mistake, told in one line: ``<field>: <what is allowed>; got <value>``.

    Attributes:
        field: the dotted path of the field, with list indices as ``[i]``.
        value: the value received.
        allowed: what the field accepts, e.g. ``"must be an integer >= 2"``.
    """

    def __init__(self, field: str, value: Any, allowed: str, detail: str | None = None) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}: {detail or f'{allowed}; got {show(value)}'}")


class Refused(RuntimeError):
    """petra's own reason that a change to a model cannot be made as asked (a channel group
    torch-pruning maps wrongly, a removal that removes nothing): told without its type's name,
    which adds nothing to a sentence petra wrote."""


def show(value: Any, limit: int = 120) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_error(exc: BaseException, limit: int = 2000) -> str:
    """``Type: message`` of the error's root cause, naming the wrapper it was raised inside.

    torch.export, for one, wraps a model's own error in a long ``TorchExportError``; the root
    cause is what the user needs to read first. petra's own errors (the memory limit) already
    say what happened, and are told as they are.
    """
    if type(exc).__module__.startswith("petra."):
        return f"{type(exc).__name__}: {exc}"[:limit]
    root, seen = exc, {id(exc)}
    while (nxt := root.__cause__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        root = nxt
    text = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(root).__name__}: {root}").strip()
    if root is not exc:
        text += f" (raised inside {type(exc).__name__})"
    return text[:limit]


def a_kind(name: str) -> str:
    """``name`` with its article: "an Embedding", "an LSTMCell" (an acronym read by its
    letters), "a GRUCell"."""
    vowel = name[:1] in "AEIOU" or (name[:2].isupper() and name[:1] in "FHLMNRSX")
    return f"{'an' if vowel else 'a'} {name}"


def first_line(exc: BaseException, limit: int = 300, *, typed: bool = True) -> str:
    """The first non-blank line of :func:`describe_error` (``typed``), or of the bare message,
    at most ``limit`` characters; the type's name where the message is empty."""
    text = describe_error(exc) if typed and not isinstance(exc, Refused) else str(exc)
    lines = [line for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]


#: How a candidate ended: measured in full, failed (an exception, NaN, out of memory), or
#: stopped early by multi-fidelity (measured in part).
COMPLETE, FAILED, PRUNED = "complete", "failed", "pruned"
STATUSES = (COMPLETE, FAILED, PRUNED)


def raised_in(exc: BaseException, package: str) -> str:
    """The function of ``package`` where ``exc`` was raised (the innermost frame of that
    package, with the autograd name of the node it was at, where it held one in a local
    ``node*``), as ``; raised in torch_pruning's infer_channels_between, at splitwithsizes``;
    empty if none."""
    tb, frame = exc.__traceback__, None
    while tb is not None:  # a comprehension's frame names its function's
        if f"/{package}/" in tb.tb_frame.f_code.co_filename and not \
                tb.tb_frame.f_code.co_name.startswith("<"):
            frame = tb.tb_frame
        tb = tb.tb_next
    if frame is None:
        return ""
    grads = [getattr(v, "grad_fn", None) for k, v in frame.f_locals.items() if k.startswith("node")]
    names = [g.name() for g in grads if g is not None and hasattr(g, "name")]
    op = names[0].removesuffix("Backward0").lower() if names else ""
    name = frame.f_code.co_name  # a callable object's: its class (an index mapping's)
    if name == "__call__" and "self" in frame.f_locals:
        name = type(frame.f_locals["self"]).__name__
    return f"; raised in {package}'s {name}" + (f", at {op}" if op else "")
