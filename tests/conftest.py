"""Shared test settings: offline, seeded, quiet."""

from __future__ import annotations

import os
from pathlib import Path

# The tests never reach a hub: everything comes from installed packages or the repo.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(autouse=True)
def _seeded():
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(scope="session")
def chromium():
    """One headless Chromium for every browser test (Playwright's sync API allows one loop)."""
    from browser_support import browser

    with browser() as b:
        yield b
