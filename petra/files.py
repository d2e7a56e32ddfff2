"""Files that other processes read while they may be written: the caches under ``runs/cache``
(baselines, space verdicts, learning-rate probes), which concurrent searches and their workers
share."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` whole or not at all.

    A reader sees the old file or the new one, never a part of one, and two writers at once
    leave one of their two files whole: each writes a temporary file of its own (named by its
    process and thread) beside ``path``, then renames it over ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
