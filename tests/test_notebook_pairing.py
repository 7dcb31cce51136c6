"""Every MyST notebook has an .ipynb twin with the same cells and no outputs (README: Contributing)."""

from __future__ import annotations

from pathlib import Path

import jupytext
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _myst_notebooks() -> list[Path]:
    found = []
    for folder in ("book", "labs"):
        for md in sorted((ROOT / folder).rglob("*.md")):
            if "_build" in md.parts or ".ipynb_checkpoints" in md.parts:
                continue
            if md.read_text(encoding="utf-8").startswith("---\njupytext:"):
                found.append(md)
    return found


MYST = _myst_notebooks()


def test_there_are_chapters():
    assert any(p.parent.name == "book" for p in MYST)


@pytest.mark.parametrize("md", MYST, ids=[str(p.relative_to(ROOT)) for p in MYST])
def test_twin_matches(md: Path):
    twin = md.with_suffix(".ipynb")
    assert twin.exists(), f"{twin.relative_to(ROOT)} is missing: run jupytext --sync {md.relative_to(ROOT)}"
    text_nb = jupytext.read(md)
    ipynb = jupytext.read(twin)
    left = [(c.cell_type, c.source.strip()) for c in text_nb.cells]
    right = [(c.cell_type, c.source.strip()) for c in ipynb.cells]
    assert left == right, f"{md.name} and {twin.name} have drifted: run jupytext --sync {md.relative_to(ROOT)}"


@pytest.mark.parametrize("md", MYST, ids=[str(p.relative_to(ROOT)) for p in MYST])
def test_twin_has_no_outputs(md: Path):
    ipynb = jupytext.read(md.with_suffix(".ipynb"))
    with_outputs = [i for i, c in enumerate(ipynb.cells) if c.cell_type == "code" and c.get("outputs")]
    assert not with_outputs, f"{md.with_suffix('.ipynb').name}: clear the outputs of cells {with_outputs}"
