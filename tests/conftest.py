"""Shared test settings: offline, seeded, quiet."""

from __future__ import annotations

import os
from pathlib import Path

# The tests never reach a hub: everything comes from installed packages or the repo.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run ("Deterministic": a red CI is reproducible);
# HYPOTHESIS_PROFILE=explore draws fresh ones, to hunt for new counterexamples.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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
