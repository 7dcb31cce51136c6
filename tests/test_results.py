"""labutils.results: repository files from the checkout, or fetched and verified."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest

from labutils import results


@pytest.fixture(autouse=True)
def _fresh_manifest_cache():
    results._manifest.cache_clear()
    yield
    results._manifest.cache_clear()


def test_committed_manifest_matches_the_tracked_files(repo_root):
    if not (repo_root / ".git").exists():
        pytest.skip("needs the git checkout (the manifest lists git-tracked files)")
    committed = json.loads((repo_root / results.MANIFEST).read_text())
    assert committed == results.build_manifest(repo_root), (
        "results/MANIFEST.json is stale: run `python -m labutils.results write-manifest` and commit it"
    )
    assert "results/lm/full/w1.58a8-l.packed" in committed["files"]  # chapter 8's model is published
    assert not any(name.endswith(".gguf") for name in committed["files"])  # untracked outputs are not


def test_in_the_checkout_files_are_read_in_place(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root / "book")
    assert results.find_checkout() == repo_root
    assert results.repo_path("results/kernels") == repo_root / "results" / "kernels"
    with pytest.raises(results.RepoFileError, match="not in the checkout"):
        results.repo_path("results/no-such-run/x.json")


def test_paths_outside_the_repository_are_refused():
    for bad in ("/etc/passwd", "../secrets", "results/../../x"):
        with pytest.raises(ValueError, match="inside the repository"):
            results.repo_path(bad)


def test_a_named_checkout_that_is_not_one_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(results.REPO_DIR_ENV, str(tmp_path))
    with pytest.raises(results.RepoFileError, match="not a checkout"):
        results.repo_path("results/kernels")


# --- outside a checkout: a local HTTP server stands in for GitHub's raw files -------------------


@pytest.fixture()
def server(tmp_path, repo_root, monkeypatch):
    """Serve a copy of a few published files and a manifest of them; no checkout in sight."""
    site = tmp_path / "site"
    names = ["results/kernels/README.md", "results/profile/before-zen3.json", "results/profile/after-zen3.json"]
    for name in names:
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(repo_root / name, site / name)
    manifest = {"files": {n: {"bytes": (site / n).stat().st_size, "sha256": results._sha256(site / n)} for n in names}}
    (site / results.MANIFEST).write_text(json.dumps(manifest))
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.delenv(results.REPO_DIR_ENV, raising=False)
    monkeypatch.setenv(results.URL_ENV, f"http://127.0.0.1:{httpd.server_address[1]}")
    monkeypatch.setenv(results.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(results, "_installed_from", lambda: tmp_path)  # as from a wheel
    yield site
    httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_outside_a_checkout_files_are_fetched_verified_and_cached(server, repo_root):
    assert results.find_checkout() is None
    folder = results.repo_path("results/profile")
    assert sorted(p.name for p in folder.iterdir()) == ["after-zen3.json", "before-zen3.json"]
    assert (folder / "before-zen3.json").read_bytes() == (repo_root / "results/profile/before-zen3.json").read_bytes()
    (server / "results/profile/before-zen3.json").unlink()  # cached: no second download needed
    assert results.repo_path("results/profile/before-zen3.json") == folder / "before-zen3.json"


def test_a_corrupt_download_is_refused_and_nothing_is_kept(server):
    served = server / "results/kernels/README.md"
    served.write_bytes(served.read_bytes()[:-10])  # truncated in transit
    with pytest.raises(results.RepoFileError, match="corrupt or truncated"):
        results.repo_path("results/kernels/README.md")
    cache = Path(results._cache_root(results._base_url()))
    assert not list(cache.rglob("README.md*"))  # neither the file nor a .part


def test_a_cached_file_that_went_bad_is_fetched_again(server):
    path = results.repo_path("results/kernels/README.md")
    good = path.read_bytes()
    path.write_bytes(b"damaged")
    assert results.repo_path("results/kernels/README.md").read_bytes() == good


def test_unpublished_paths_say_so(server):
    with pytest.raises(results.RepoFileError, match="not among the repository's published files"):
        results.repo_path("labutils/quant.py")


def test_offline_without_a_checkout_says_what_to_do(server, monkeypatch):
    monkeypatch.setenv(results.URL_ENV, "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(results.RepoFileError, match=results.REPO_DIR_ENV):
        results.repo_path("results/profile")


def test_offline_after_one_fetch_the_cached_manifest_serves(server, monkeypatch):
    first = results.repo_path("results/profile/after-zen3.json")
    port_url = results._base_url()
    results._manifest.cache_clear()
    for child in server.iterdir():  # the server's files are gone: as if the network went away
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    monkeypatch.setenv(results.URL_ENV, port_url)
    assert results.repo_path("results/profile/after-zen3.json") == first


def test_a_manifest_that_is_not_one_is_an_error(server):
    (server / results.MANIFEST).write_text("<html>rate limited</html>")
    with pytest.raises(results.RepoFileError, match="not a results manifest"):
        results.repo_path("results/profile")
