"""The live bit-width explorer in a real JupyterLab, driven by keyboard in Chromium.

JupyterLab runs on localhost with a token in a temporary directory; the test opens a small
notebook, runs all cells, moves the slider with the keyboard and checks that the chart's data
and the MSE/SQNR text become the values labutils computes for the new bit width.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from browser_support import ARTIFACTS, chromium_path, free_port

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(chromium_path() is None, reason="Chromium is not installed (.ci/setup installs it)"),
]

SETUP = """\
import torch
from labutils.widgets import bitwidth_explorer
torch.manual_seed(0)
weights = torch.randn(256, 384)
explorer = bitwidth_explorer(weights, method="uniform", bits=2)
explorer"""


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(SETUP)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "explorer.ipynb")
    port, token = free_port(), "labbook-test-token"
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(root / ".jupyter"), JUPYTER_RUNTIME_DIR=str(root / ".runtime"))
    cmd = [
        sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.port={port}",
        "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--allow-root", "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    log = open(root / "jupyterlab.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                json.load(r)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail("JupyterLab did not start:\n" + (root / "jupyterlab.log").read_text()[-3000:])
            time.sleep(0.5)
    yield base, token
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


def _expected(bits: float) -> tuple[list[float], str]:
    """What the explorer shows for ``bits``, computed in this process."""
    import torch

    from labutils.widgets import bitwidth_explorer

    torch.manual_seed(0)
    weights = torch.randn(256, 384)
    ex = bitwidth_explorer(weights, method="uniform", bits=bits)
    quantized = [list(t.y) for t in ex.figure.data if t.name and "quantized" in t.name.lower()][0]
    return [float(v) for v in quantized], ex.info


def _chart_state(page) -> tuple[list[float], str]:
    data = page.evaluate(
        """() => {
            const gd = document.querySelector('.jp-OutputArea .js-plotly-plot');
            const t = gd.data.find(t => (t.name || '').toLowerCase().includes('quantized'));
            return Array.from(t.y, Number);
        }"""
    )
    metrics = page.locator(".jp-OutputArea .widget-html-content").all_inner_texts()
    return data, " ".join(metrics)


def _run_first_cell(page) -> None:
    """Shift+Enter on the first cell, again if the kernel's socket was not up yet."""
    cell = page.locator(".jp-Notebook .jp-Cell").first
    for _ in range(4):
        page.wait_for_timeout(2000)
        cell.click()
        page.keyboard.press("Escape")
        page.keyboard.press("Shift+Enter")
        try:
            page.wait_for_function(
                "() => !document.querySelector('.jp-Notebook .jp-Cell .jp-InputPrompt')"
                "  .innerText.includes('[ ]')",
                timeout=15_000,
            )
            return
        except Exception:
            continue
    raise AssertionError("JupyterLab never ran the cell")


def _shot(page, name):
    (ARTIFACTS / "screenshots").mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "screenshots" / f"{name}.png"))


def test_slider_moves_chart_and_metrics(jupyterlab, chromium):
    base, token = jupyterlab
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{base}/lab/tree/explorer.ipynb?token={token}")
    page.locator(".jp-Notebook").wait_for(timeout=60_000)
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=60_000)
    _run_first_cell(page)
    try:
        page.locator(".jp-OutputArea .js-plotly-plot .main-svg").first.wait_for(timeout=90_000)
    except Exception:
        _shot(page, "jupyterlab_explorer_failed")
        raise AssertionError(f"the explorer did not draw; page errors: {errors}") from None
    page.locator(".jp-OutputArea .widget-html-content").first.wait_for(timeout=30_000)
    page.wait_for_timeout(1000)

    data_before, text_before = _chart_state(page)
    expected_2, info_2 = _expected(2)
    assert data_before == pytest.approx(expected_2, abs=1e-12)
    assert f"{info_2['sqnr_db']:.2f}" in text_before, text_before
    _shot(page, "jupyterlab_explorer_before")

    handle = page.locator(".jp-OutputArea .widget-slider .noUi-handle").first
    handle.focus()
    page.keyboard.press("ArrowRight")  # 2 -> 3 bits
    expected_3, info_3 = _expected(3)
    page.wait_for_function(
        "(sqnr) => Array.from(document.querySelectorAll('.jp-OutputArea .widget-html-content'))"
        "  .some(el => el.innerText.includes(sqnr))",
        arg=f"{info_3['sqnr_db']:.2f}",
        timeout=30_000,
    )
    page.wait_for_timeout(500)  # the figure's update message follows the metrics'
    data_after, text_after = _chart_state(page)
    _shot(page, "jupyterlab_explorer_after")
    assert data_after != data_before, "the chart did not change when the slider moved"
    assert data_after == pytest.approx(expected_3, abs=1e-12)
    assert f"{info_3['sqnr_db']:.2f}" in text_after, text_after
    assert text_after != text_before
    assert not errors, errors
    context.close()
