"""The stand-alone stage's shared Numba cache (tests/standalone_support.py, used by .ci/test)."""

from __future__ import annotations

import shutil

import pytest
from numba.core.caching import UserProvidedCacheLocator

import standalone_support as S


def test_cache_subpath_is_numbas_own(tmp_path):
    """share_numba_cache links the folders Numba itself picks: if a Numba upgrade changes its
    naming, the notebooks would silently compile everything again."""
    module = S.ROOT / "labutils" / "kernels" / "generic.py"
    assert UserProvidedCacheLocator.get_suitable_cache_subpath(str(module)) == S._numba_cache_subpath(module.parent)


def test_site_modules_find_the_checkouts_cache(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(S.ROOT / "labutils", site / "labutils", ignore=shutil.ignore_patterns("__pycache__"))
    cache = tmp_path / "cache"
    assert S.share_numba_cache(site, cache) > 1
    for module in ("kernels/generic.py", "engine/__init__.py", "__init__.py"):
        origin, copy = S.ROOT / "labutils" / module, site / "labutils" / module
        assert (cache / S._numba_cache_subpath(copy.parent)).resolve() == (cache / S._numba_cache_subpath(origin.parent))
        assert copy.stat().st_mtime == origin.stat().st_mtime  # Numba's freshness stamp: mtime and size


def test_a_wheel_that_is_not_this_checkout_is_refused(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(S.ROOT / "labutils", site / "labutils", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "labutils" / "quant.py").write_text("# edited\n")
    with pytest.raises(ValueError, match="quant.py differs"):
        S.share_numba_cache(site, tmp_path / "cache")
