"""The documentation: a short README, a config reference that documents every key and matches
the schema, and a methods page that matches the registries."""

from __future__ import annotations

from pathlib import Path

from petra.config_docs import MEANINGS, leaves, methods_markdown, reference_markdown
from petra.schema import SearchConfig

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_key_is_documented_and_every_documented_key_exists():
    keys = [key for key, _ in leaves(SearchConfig)]
    assert [k for k in keys if not MEANINGS.get(k, "").strip()] == []
    assert sorted(set(MEANINGS) - set(keys)) == []
    page = reference_markdown()
    assert all(f"| `{k}` |" in page for k in keys)


def test_the_committed_reference_pages_are_what_the_schema_and_registries_generate():
    # regenerate with: .venv/bin/mkdocs build (docs/hooks.py writes them)
    assert (ROOT / "docs" / "reference" / "config.md").read_text() == reference_markdown()
    assert (ROOT / "docs" / "reference" / "methods.md").read_text() == methods_markdown()


def test_the_readme_is_a_short_front_page_whose_links_resolve():
    import re

    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target
