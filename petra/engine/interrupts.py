"""Ctrl-C during a search: noted on the search as well as raised."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def ctrl_c_noted(search: Any) -> Iterator[None]:
    """Note Ctrl-C (SIGINT) on ``search.ctrl_c`` as well as raising KeyboardInterrupt.

    A KeyboardInterrupt raised inside library code can be swallowed (a callback or finalizer
    that logs what it catches; with the local executor, candidates run in this process): the
    loop then stops after the result in hand. Off the main thread, signals cannot be handled
    here, and nothing changes.
    """
    search.ctrl_c = False
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def noted(signum: int, frame: Any) -> None:
        search.ctrl_c = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, noted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
