"""The repository files the book reads (committed benchmark results, assembly listings), found
in a checkout or fetched from the book's repository.

Chapters 6-8 draw what the benchmarks measured: ``results/`` in the repository. Where they run
decides where those files come from (``repo_path(relative)`` tries these in order):

1. ``LABBOOK_REPO_DIR``: a checkout named by the environment variable (an error if it lacks the
   file: a folder asked for is never silently skipped).
2. The checkout the notebook runs in: the working directory or a folder above it that holds
   ``labutils/`` and ``results/`` (the book builds from ``book/``), or the checkout an editable
   ``pip install -e .`` points at.
3. Otherwise (Colab, ``pip install labutils``): fetched once from the repository
   (``LABBOOK_RESULTS_URL``, default the raw files of ``main`` on GitHub) into a cache folder
   (``LABBOOK_CACHE``, default ``~/.cache/labbook``). ``results/MANIFEST.json`` lists every
   such file with its size and SHA-256; a download that does not match is refused, and nothing
   is kept of it, so a cut connection never leaves a truncated file behind.

The manifest is part of the repository and a test checks it against the files; after changing a
result, regenerate it::

    python -m labutils.results write-manifest
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "CACHE_ENV",
    "DEFAULT_URL",
    "MANIFEST",
    "PUBLISHED_PATTERNS",
    "REPO_DIR_ENV",
    "RepoFileError",
    "URL_ENV",
    "build_manifest",
    "find_checkout",
    "repo_path",
]

REPOSITORY = "onebit-lab/1bit-llm-lab-book"
DEFAULT_URL = f"https://raw.githubusercontent.com/{REPOSITORY}/main/"
REPO_DIR_ENV = "LABBOOK_REPO_DIR"
URL_ENV = "LABBOOK_RESULTS_URL"
CACHE_ENV = "LABBOOK_CACHE"
MANIFEST = "results/MANIFEST.json"
# What a reader outside a checkout may fetch: the committed results and the assembly listings
# chapter 6 prints (git-tracked files only: large local outputs are never published).
PUBLISHED_PATTERNS = ("results/**", "tests/data/asm_*.txt")
_CHUNK = 1 << 20


class RepoFileError(FileNotFoundError):
    """A repository file that is neither in a checkout nor fetchable intact."""


def _is_checkout(folder: Path) -> bool:
    return (folder / "labutils").is_dir() and (folder / "results").is_dir()


def find_checkout(start: Path | None = None) -> Path | None:
    """The checkout holding the book's files, or None outside one.

    Args:
        start: where to look from (default: the working directory); its parents are tried too,
            then the checkout of an editable install of labutils.
    """
    env = os.environ.get(REPO_DIR_ENV)
    if env:
        folder = Path(env).expanduser()
        if not _is_checkout(folder):
            raise RepoFileError(f"{REPO_DIR_ENV}={env} is not a checkout of the book (no labutils/ and results/ there)")
        return folder
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents, _installed_from()):
        if _is_checkout(folder):
            return folder
    return None


def _installed_from() -> Path:
    """The folder above the package: the checkout for an editable install, site-packages otherwise."""
    return Path(__file__).resolve().parents[1]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def build_manifest(root: Path) -> dict[str, Any]:
    """Size and SHA-256 of every published, git-tracked file of the checkout ``root``.

    Returns:
        ``{"files": {relative posix path: {"bytes": int, "sha256": str}}}``, sorted by path; the
        manifest itself is not listed.
    """
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "--", *PUBLISHED_PATTERNS], cwd=root, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    files = {}
    for relative in sorted(name for name in tracked if name and name != MANIFEST):
        path = root / relative
        files[relative] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return {"repository": REPOSITORY, "files": files}


def _base_url() -> str:
    url = os.environ.get(URL_ENV, DEFAULT_URL)
    return url if url.endswith("/") else url + "/"


def _cache_root(base_url: str) -> Path:
    # One folder per source, so a fork's or a test server's files never mix with main's.
    root = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "labbook")).expanduser()
    return root / hashlib.sha256(base_url.encode()).hexdigest()[:12]


def _download(url: str, target: Path, expected: dict[str, Any] | None) -> None:
    """Download ``url`` to ``target`` atomically; with ``expected``, refuse a size or hash mismatch."""
    from tqdm.auto import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = expected["bytes"] if expected else None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, leave=False, disable=(total or 0) < 4 * _CHUNK) as bar:
                for block in iter(lambda: response.read(_CHUNK), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        if expected:
            size = os.path.getsize(partial)
            if size != expected["bytes"] or digest.hexdigest() != expected["sha256"]:
                raise RepoFileError(
                    f"{url} arrived corrupt or truncated ({size:,} bytes, sha256 {digest.hexdigest()[:12]}…; "
                    f"the manifest says {expected['bytes']:,} bytes, {expected['sha256'][:12]}…): nothing was kept"
                )
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


@functools.lru_cache(maxsize=4)
def _manifest(base_url: str) -> dict[str, Any]:
    """The source's manifest: fetched once per process, else the cached copy (offline)."""
    cached = _cache_root(base_url) / MANIFEST
    try:
        _download(base_url + MANIFEST, cached, None)
    except (urllib.error.URLError, OSError) as err:
        if not cached.is_file():
            raise RepoFileError(
                f"not in a checkout of the book, and its results could not be fetched from {base_url} ({err}). "
                f"Run inside a clone of https://github.com/{REPOSITORY}, set {REPO_DIR_ENV} to one, "
                f"or connect to the network."
            ) from err
    try:
        manifest = json.loads(cached.read_text())
        manifest["files"]  # noqa: B018 - the one key everything below reads
    except (ValueError, KeyError, TypeError) as err:
        cached.unlink(missing_ok=True)
        raise RepoFileError(f"{base_url + MANIFEST} is not a results manifest ({err}); the cached copy was removed") from err
    return manifest


def _fetch(relative: str) -> Path:
    base_url = _base_url()
    files = _manifest(base_url)["files"]
    wanted = {name: meta for name, meta in files.items() if name == relative or name.startswith(relative.rstrip("/") + "/")}
    if not wanted:
        raise RepoFileError(f"{relative} is not among the repository's published files ({base_url + MANIFEST})")
    root = _cache_root(base_url)
    for name, meta in wanted.items():
        local = root / name
        if local.is_file() and local.stat().st_size == meta["bytes"] and _sha256(local) == meta["sha256"]:
            continue
        _download(base_url + urllib.parse.quote(name), local, meta)
    return root / relative


def repo_path(relative: str) -> Path:
    """A file or folder of the book's repository, as a local path.

    Args:
        relative: a repository path with forward slashes, e.g. ``"results/lm/full"`` (a folder:
            every published file under it is made local) or ``"results/kernels/kernels.json"``.

    Returns:
        The path in the checkout (read in place), or in the cache after fetching and verifying.

    Raises:
        RepoFileError: the path is missing from the checkout, is not published, or cannot be
            fetched intact (the message says which and what to do).
    """
    relative = PurePosixPath(relative).as_posix()
    if relative.startswith(("/", "../")) or "/../" in relative:
        raise ValueError(f"{relative!r} is not a path inside the repository")
    checkout = find_checkout()
    if checkout is not None:
        path = checkout / relative
        if not path.exists():
            raise RepoFileError(f"{relative} is not in the checkout {checkout}")
        return path
    return _fetch(relative)


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m labutils.results", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write-manifest", help=f"rewrite {MANIFEST} from the checkout's tracked files")
    write.add_argument("--root", type=Path, default=Path.cwd())
    args = parser.parse_args(argv)
    root = find_checkout(args.root)
    if root is None:
        parser.error(f"{args.root} is not inside a checkout of the book")
    manifest = build_manifest(root)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"{MANIFEST}: {len(manifest['files'])} files, {sum(f['bytes'] for f in manifest['files'].values()):,} bytes")


if __name__ == "__main__":
    _main()
