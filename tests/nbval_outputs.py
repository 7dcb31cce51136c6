"""pytest plugin: keep what nbval executed, so that each chapter runs once per test run.

nbval executes every code cell of a notebook and keeps the cell's outputs on its test item
(``test_outputs``). This plugin writes them into the notebook, and when every cell of a notebook
ran without an error, saves the executed notebook as ``$LABBOOK_EXECUTED_DIR/<stem>.ipynb``,
minus the first cell that tests/standalone_support.py added. tests/test_book_browser.py then
builds the book from those notebooks instead of executing every chapter a second time.

It also fails a cell that glues a numpy scalar (``numpy_glue``), whose text the book's prose
cannot format. ``.ci/test`` loads it with ``-p nbval_outputs``; without ``LABBOOK_EXECUTED_DIR``
it saves nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

FOLDER = os.environ.get("LABBOOK_EXECUTED_DIR")
STAGED_FIRST_LINE = "# Added by tests/standalone_support.py"


def _is_nbval_cell(item: pytest.Item) -> bool:
    return hasattr(item, "cell") and hasattr(item, "test_outputs") and hasattr(item.parent, "nb")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """nbval's cells carry the ``notebooks`` marker (``-m "not notebooks"`` leaves them out)."""
    for item in items:
        if _is_nbval_cell(item):
            item.add_marker(pytest.mark.notebooks)


def numpy_glue(outputs: list[dict]) -> list[str]:
    """``"name = text"`` for each value a cell glued (myst-nb's ``glue``) whose text is a numpy
    scalar's repr, e.g. ``np.float64(4.48)``: the prose's ``{glue:text}`name:.2f``` cannot format
    that text, and the book build, which turns warnings into errors, fails on it."""
    bad = []
    for out in outputs:
        glued = out.get("metadata", {}).get("scrapbook", {})
        data = out.get("data", {})  # display=False files the text under the record's MIME prefix
        name, text = glued.get("name"), "".join(data.get(glued.get("mime_prefix", "") + "text/plain", data.get("text/plain", "")))
        if name and text.startswith(("np.", "numpy.")):
            bad.append(f"{name} = {text}")
    return bad


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if not _is_nbval_cell(item) or report.when != "call":
        return
    bad = numpy_glue(item.test_outputs or []) if report.passed else []
    if bad:  # caught here, in the cell that glued it, not minutes later by the book build
        report.outcome = "failed"
        report.longrepr = "glued numpy scalars (glue float(x) or int(x) instead): " + "; ".join(bad)
    if not FOLDER:
        return
    notebook = item.parent
    if report.passed:
        item.cell.outputs = list(item.test_outputs or [])
        notebook.labbook_count = getattr(notebook, "labbook_count", 0) + 1
        item.cell.execution_count = notebook.labbook_count
    else:
        notebook.labbook_failed = True


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if not FOLDER or not _is_nbval_cell(item):
        return
    notebook = item.parent
    if nextitem is not None and nextitem.parent is notebook:
        return  # not the notebook's last cell yet
    code_cells = [c for c in notebook.nb.cells if c.cell_type == "code"]
    if getattr(notebook, "labbook_failed", False) or getattr(notebook, "labbook_count", 0) != len(code_cells):
        return  # a cell failed or was skipped: the book build executes this one itself
    nb = notebook.nb
    if nb.cells and nb.cells[0].cell_type == "code" and nb.cells[0].source.startswith(STAGED_FIRST_LINE):
        nb.cells = nb.cells[1:]
    target = Path(FOLDER) / Path(str(notebook.fspath)).name
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(target))
