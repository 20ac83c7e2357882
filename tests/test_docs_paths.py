"""The docs name only files that exist, and README's map names every module: docs and code cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "DEVELOPERS.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
ROOMS = ("model", "app", "cli", "training", "bench", "scripts", "tests", "deploy")
PATH = re.compile(rf"\b((?:{'|'.join(ROOMS)})/[\w/.-]+\.(?:py|sh|yml|yaml|json|md))\b")


def layout_block() -> str:
    """The fenced block under README's "What is where"."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## What is where") :]
    return section[section.index("```") + 3 : section.index("```", section.index("```") + 3)]


@pytest.mark.parametrize("doc", DOCS)
def test_every_path_a_doc_names_exists(doc: str) -> None:
    missing = sorted(path for path in set(PATH.findall((ROOT / doc).read_text())) if not (ROOT / path).exists())
    assert not missing, f"{doc} names files that do not exist: {missing}"


@pytest.mark.parametrize("folder", ["model", "model/convert", "training", "app", "app/routes", "cli", "bench"])
def test_readme_map_names_every_module(folder: str) -> None:
    block = layout_block()
    files = sorted(p.name for p in (ROOT / folder).iterdir() if p.suffix in (".py", ".sh"))
    missing = [name for name in files if name not in ("__init__.py", "__main__.py") and name not in block]
    assert not missing, f"README's 'What is where' map does not name {folder}/{missing}"
