"""The rendered book, as a reader sees it: every page in a real Chromium.

The book is built once per session (executing every chapter), served on localhost and visited
page by page. Screenshots land in test-artifacts/screenshots/.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from urllib.parse import urljoin, urlparse

import pytest
import yaml

from browser_support import ARTIFACTS, chromium_path, serve_directory

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(chromium_path() is None, reason="Chromium is not installed (.ci/setup installs it)"),
]


def _chapter_pages() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [toc["root"]]
    for part in toc.get("parts", []):
        pages += [c["file"] for c in part.get("chapters", [])]
    return [p + ".html" for p in pages]


PAGES = _chapter_pages()
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())


def _notebook_pages() -> list[str]:
    """The toc's pages that are notebooks (a .md with its .ipynb twin): ``book/01_...``."""
    return [p.removesuffix(".html") for p in PAGES if (ROOT / p).with_suffix(".ipynb").is_file()]


def _source_with_executed_notebooks(folder: Path, executed: Path) -> Path:
    """A copy of the book's sources in ``folder`` whose notebook pages are the notebooks the test
    run has already executed (tests/nbval_outputs.py), rendered as they are (execution off)."""
    skip = shutil.ignore_patterns(".git", ".venv", "_build", "test-artifacts", ".carry", "__pycache__", "*.egg-info")
    shutil.copytree(ROOT, folder, ignore=skip)
    for page in _notebook_pages():
        (folder / page).with_suffix(".md").unlink()
        shutil.copy(executed / (Path(page).name + ".ipynb"), (folder / page).with_suffix(".ipynb"))
    config = yaml.safe_load((folder / "_config.yml").read_text())
    config["exclude_patterns"].remove("book/*.ipynb")
    config["execute"]["execute_notebooks"] = "off"
    (folder / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def _build(source: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(source), "--builder", "html",
           "-W", "--keep-going", "--path-output", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=source)


@pytest.fixture(scope="session")
def book_html(tmp_path_factory) -> Path:
    """Build the executed book (fails the session on any cell error or Sphinx warning).

    Where this run has already executed every chapter stand-alone (``LABBOOK_EXECUTED_DIR``,
    filled by tests/nbval_outputs.py as .ci/test runs the notebooks before these tests), the
    book is built from those executed notebooks: each chapter runs once per test run. Otherwise
    the build executes them. ``LABBOOK_BOOK_HTML`` may name an already built ``_build/html``.
    """
    if os.environ.get("LABBOOK_BOOK_HTML"):
        return Path(os.environ["LABBOOK_BOOK_HTML"])
    out = tmp_path_factory.mktemp("book")
    executed = Path(os.environ.get("LABBOOK_EXECUTED_DIR") or out / "none")
    if all((executed / (Path(page).name + ".ipynb")).is_file() for page in _notebook_pages()):
        source = _source_with_executed_notebooks(tmp_path_factory.mktemp("source") / "book", executed)
        done = _build(source, out)
        if done.returncode == 0:
            return out / "_build" / "html"
        # A chapter that ran stand-alone but does not render from its outputs: say so, keep its log,
        # and test the book as .ci/book builds it (executing) rather than fail on the shortcut.
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "book-from-executed-notebooks.log").write_text(done.stdout[-20000:] + done.stderr[-20000:])
        warnings.warn("the book did not build from the executed notebooks (test-artifacts/book-from-executed-"
                      "notebooks.log); building it by executing every chapter instead", stacklevel=1)
        out = tmp_path_factory.mktemp("book")
    done = _build(ROOT, out)
    assert done.returncode == 0, f"book build failed:\n{done.stdout[-6000:]}\n{done.stderr[-4000:]}"
    return out / "_build" / "html"


@pytest.fixture(scope="session")
def site(book_html):
    with serve_directory(book_html) as base:
        yield base


class PageVisit:
    """A page opened in a fresh context, with its console errors and failed requests."""

    def __init__(self, chromium, url: str):
        self.context = chromium.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.console_errors: list[str] = []
        self.failed: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda e: self.console_errors.append(str(e)))
        self.page.on("requestfailed", lambda r: self.failed.append(f"{r.url} ({r.failure})"))
        self.page.on("response", lambda r: r.status >= 400 and self.failed.append(f"{r.url} ({r.status})"))
        self.page.goto(url, wait_until="networkidle")
        # plotly draws a chart only once MathJax has typeset the page: wait for every chart.
        self.page.wait_for_function(
            "document.querySelectorAll('.plotly-graph-div').length"
            " === document.querySelectorAll('.js-plotly-plot').length",
            timeout=60_000,
        )

    def close(self):
        self.context.close()


def _screenshot(page, name: str) -> None:
    folder = ARTIFACTS / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


@pytest.mark.parametrize("page_path", PAGES)
def test_page_renders_cleanly(chromium, site, book_html, page_path):
    visit = PageVisit(chromium, f"{site}/{page_path}")
    page = visit.page
    try:
        # Every plotly chart is drawn: an SVG with data in it.
        charts = page.locator(".js-plotly-plot")
        for i in range(charts.count()):
            chart = charts.nth(i)
            chart.scroll_into_view_if_needed()
            chart.locator(".main-svg").first.wait_for(state="attached", timeout=15_000)
            n_items = chart.evaluate(
                "el => (el.data || []).length + (el.layout.shapes || []).length"
                " + (el.layout.annotations || []).length")
            assert n_items > 0, f"chart {i} on {page_path} has no data"
            drawn = ".main-svg g.trace, .main-svg g.table, .main-svg .shapelayer path, .main-svg g.annotation"
            assert chart.locator(drawn).count() > 0, (
                f"chart {i} on {page_path} drew nothing")
        # Every image loaded.
        broken_images = page.evaluate(
            "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
        assert not broken_images, f"broken images on {page_path}: {broken_images}"
        # Every local link points at a file of the build (anchors too).
        hrefs = page.evaluate("Array.from(document.querySelectorAll('a[href]')).map(a => a.href)")
        broken = []
        for href in hrefs:
            url = urlparse(href)
            if url.scheme not in ("http", "https") or url.hostname != "127.0.0.1":
                continue
            target = book_html / url.path.lstrip("/")
            if url.path.endswith("/"):
                target = target / "index.html"
            if not target.exists():
                broken.append(href)
            elif url.fragment and target.suffix == ".html":
                html = target.read_text(encoding="utf-8")
                if f'id="{url.fragment}"' not in html:
                    broken.append(href)
        assert not broken, f"broken links on {page_path}: {sorted(set(broken))}"
        assert not visit.failed, f"failed requests on {page_path}: {visit.failed}"
        assert not visit.console_errors, f"console errors on {page_path}: {visit.console_errors}"
        _screenshot(page, page_path.replace("/", "_").removesuffix(".html"))
    finally:
        visit.close()


def _expected_launch_links(page_path: str) -> dict[str, str]:
    repo = CONFIG["repository"]["url"].rstrip("/")
    branch = CONFIG["repository"].get("branch", "main")
    org_repo = urlparse(repo).path.strip("/")
    notebook = page_path.removesuffix(".html") + ".ipynb"
    colab = CONFIG["launch_buttons"]["colab_url"].rstrip("/")
    binder = CONFIG["launch_buttons"]["binderhub_url"].rstrip("/")
    return {
        "colab": f"{colab}/github/{org_repo}/blob/{branch}/{notebook}",
        "binder": f"{binder}/v2/gh/{org_repo}/{branch}?urlpath=lab/tree/{notebook}",
        "repository": repo,
    }


# Every notebook page (chapters and appendices); the intro is plain Markdown, with nothing to launch.
@pytest.mark.parametrize("page_path", [p for p in PAGES if (ROOT / p).with_suffix(".ipynb").is_file()])
def test_launch_buttons_point_at_the_repository(chromium, site, page_path):
    visit = PageVisit(chromium, f"{site}/{page_path}")
    try:
        hrefs = visit.page.evaluate("Array.from(document.querySelectorAll('a[href]')).map(a => a.href)")
        for name, link in _expected_launch_links(page_path).items():
            assert link in hrefs, f"{name} launch link {link} missing on {page_path}"
    finally:
        visit.close()


def test_static_bitwidth_slider_changes_the_chart(chromium, site):
    page_path = next(p for p in PAGES if "01_" in p)
    visit = PageVisit(chromium, f"{site}/{page_path}")
    page = visit.page
    try:
        slider_charts = page.locator(".js-plotly-plot:has(.slider-container)")
        assert slider_charts.count() >= 1, "chapter 1 has no chart with a plotly slider"
        chart = slider_charts.first
        chart.scroll_into_view_if_needed()
        before = chart.evaluate("el => JSON.stringify(el._fullData.map(t => Array.from(t.y)))")
        title_before = chart.evaluate("el => JSON.stringify(el.layout.title)")
        _screenshot(page, "slider_before")
        rail = chart.locator(".slider-rail-touch-rect").first
        rail.scroll_into_view_if_needed()  # the full-page screenshot may have scrolled the page
        box = rail.bounding_box()
        # Click near the right end of the rail: the last step (16 bits).
        page.mouse.click(box["x"] + box["width"] - 4, box["y"] + box["height"] / 2)
        page.wait_for_timeout(1500)
        after = chart.evaluate("el => JSON.stringify(el._fullData.map(t => Array.from(t.y)))")
        title_after = chart.evaluate("el => JSON.stringify(el.layout.title)")
        _screenshot(page, "slider_after")
        assert after != before, "moving the slider did not change the chart's data"
        assert title_after != title_before, "moving the slider did not change the metrics in the title"
    finally:
        visit.close()


def test_search_finds_a_chapter_term(chromium, site):
    visit = PageVisit(chromium, f"{site}/search.html?q=ternary")
    try:
        results = visit.page.locator("#search-results ul.search li")
        results.first.wait_for(timeout=15_000)
        text = " ".join(results.all_inner_texts())
        assert re.search(r"[Tt]ernary", text), text
    finally:
        visit.close()
