"""MkDocs hooks: the generated pages, written before every build.

- ``index.md``: the README, its links rewritten for the site (``docs/x.md`` becomes ``x.md``);
- ``reference/config.md``: every config key, from the schema (:mod:`petra.config_docs`);
- ``reference/methods.md``: every registered method, from the registries.

``index.md`` is git-ignored. The two reference pages are committed, so that they read on
GitHub too, and ``tests/test_docs.py`` fails when they differ from what the schema and the
registries generate: the schema and the registries are their only sources.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:  # unchanged files do not retrigger serve
        path.write_text(text)


def on_pre_build(config: Any, **_kwargs: Any) -> None:
    from petra.config_docs import methods_markdown, reference_markdown

    docs = Path(config["docs_dir"])
    readme = (docs.parent / "README.md").read_text()
    _write(docs / "index.md", re.sub(r"\]\(docs/", "](", readme))
    _write(docs / "reference" / "config.md", reference_markdown())
    _write(docs / "reference" / "methods.md", methods_markdown())
