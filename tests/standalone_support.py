"""Run every chapter and lab as a Colab user does: its .ipynb alone, no checkout around it.

``stage DIR`` prepares, under DIR:

- ``wheel/``: labutils built as a wheel from the package sources, and ``site/``, that wheel
  unpacked: the only labutils the kernel can import (it precedes the editable install on
  ``sys.path``; the first cell of every staged notebook asserts so).
- ``www/``: the files ``results/MANIFEST.json`` publishes, served by ``serve DIR`` on 127.0.0.1 as
  a stand-in for GitHub's raw files (this machine has no network), so ``labutils.results``
  fetches and verifies them as it would in Colab.
- ``notebooks/``: a copy of each ``book/*.ipynb`` and ``labs/source/*/*.ipynb``, each alone in
  its own folder, with that first assertion cell added.
- ``jupyter/kernels/labbook-standalone/``: a kernel of this Python whose environment points at
  ``site/``, the server and an empty cache.
- One Numba cache serves the checkout and ``site/`` when the run sets ``NUMBA_CACHE_DIR`` (``.ci/test``
  does; ``share_numba_cache`` links ``site/``'s folders in it): the wheel holds the same sources, so
  a kernel compiled by a test is loaded by the notebooks, and the other way round, instead of
  being compiled twice (the compiles were minutes of the run). What the notebooks import, and
  what they compute, is unchanged: the wheel's modules, and machine code Numba built from the
  same source for this same CPU.

``.ci/test`` stages, serves, and runs nbval on ``notebooks/`` with that kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "labbook-standalone"
PACKAGE_SOURCES = ("pyproject.toml", "README.md", "labutils")

FIRST_CELL = """\
# Added by tests/standalone_support.py: this run must see the wheel, not the checkout.
import os
import labutils
from labutils.results import find_checkout

assert labutils.__file__.startswith(os.environ["LABBOOK_STANDALONE_SITE"]), labutils.__file__
assert find_checkout() is None, find_checkout()
"""


def build_site(stage: Path) -> Path:
    """Build labutils' wheel from a clean copy of its sources and unpack it into ``stage/site``."""
    source = stage / "src"
    for name in PACKAGE_SOURCES:
        origin = ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            source.mkdir(parents=True, exist_ok=True)
            shutil.copy(origin, source / name)
    wheels = stage / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "--wheel-dir", str(wheels), str(source)],
        check=True,
    )
    (wheel,) = wheels.glob("labutils-*.whl")
    site = stage / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def _numba_cache_subpath(folder: Path) -> str:
    """The folder under ``NUMBA_CACHE_DIR`` where Numba keeps the cache of the modules in ``folder``
    (``numba.core.caching.UserProvidedCacheLocator.get_suitable_cache_subpath``: the folder's name and the
    SHA-1 of its absolute path)."""
    import hashlib

    folder = Path(os.path.abspath(folder))
    return f"{folder.name}_{hashlib.sha1(str(folder).encode()).hexdigest()}"


def share_numba_cache(site: Path, cache: Path) -> int:
    """Point every package folder of ``site/labutils`` at its checkout twin's folder in the Numba
    cache ``cache`` (symbolic links), and give each of its modules the modification time of the
    checkout's, which Numba compares (with the size) before it loads a cached kernel. Returns the
    number of folders linked; ValueError if a module of the wheel differs from the checkout's."""
    packages = sorted({module.parent for module in (ROOT / "labutils").rglob("*.py")})
    for origin in packages:
        twin = site / origin.relative_to(ROOT)
        for module in origin.glob("*.py"):
            copy = twin / module.name
            if copy.read_bytes() != module.read_bytes():
                raise ValueError(f"{copy} differs from {module}: the wheel is not this checkout")
            os.utime(copy, ns=(module.stat().st_atime_ns, module.stat().st_mtime_ns))
        shared = cache / _numba_cache_subpath(origin)
        shared.mkdir(parents=True, exist_ok=True)
        (cache / _numba_cache_subpath(twin)).symlink_to(shared, target_is_directory=True)
    return len(packages)


def publish(stage: Path) -> Path:
    """Copy the manifest and every file it lists into ``stage/www``."""
    www = stage / "www"
    manifest = ROOT / "results" / "MANIFEST.json"
    for name in [*json.loads(manifest.read_text())["files"], "results/MANIFEST.json"]:
        (www / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, www / name)
    return www


def stage_notebooks(stage: Path) -> list[Path]:
    """Copy each notebook into a folder of its own, with ``FIRST_CELL`` in front."""
    import nbformat

    staged = []
    for notebook in [*sorted((ROOT / "book").glob("*.ipynb")), *sorted((ROOT / "labs" / "source").glob("*/*.ipynb"))]:
        nb = nbformat.read(notebook, as_version=4)
        nb.cells.insert(0, nbformat.v4.new_code_cell(FIRST_CELL))
        target = stage / "notebooks" / notebook.stem / notebook.name
        target.parent.mkdir(parents=True)
        nbformat.write(nb, target)
        staged.append(target)
    return staged


def write_kernel(stage: Path, site: Path, port: int) -> None:
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "labutils from its wheel, no checkout",
        "language": "python",
        "env": {
            "PYTHONPATH": str(site),
            "LABBOOK_STANDALONE_SITE": str(site),
            "LABBOOK_RESULTS_URL": f"http://127.0.0.1:{port}/",
            "LABBOOK_CACHE": str(stage / "cache"),
        },
    }
    folder = stage / "jupyter" / "kernels" / KERNEL
    folder.mkdir(parents=True)
    (folder / "kernel.json").write_text(json.dumps(spec, indent=1))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stage(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    site = build_site(folder)
    if os.environ.get("NUMBA_CACHE_DIR"):
        share_numba_cache(site, Path(os.environ["NUMBA_CACHE_DIR"]))
    publish(folder)
    notebooks = stage_notebooks(folder)
    port = free_port()
    write_kernel(folder, site, port)
    (folder / "port").write_text(str(port))
    print(f"staged {len(notebooks)} notebooks in {folder / 'notebooks'}; labutils from {site}; results on port {port}")


def serve(folder: Path) -> None:
    import functools
    import http.server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    port = int((folder / "port").read_text())
    handler = functools.partial(Quiet, directory=str(folder / "www"))
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as httpd:
        httpd.serve_forever()


def notebook_times(junit_xml: Path) -> dict[str, float]:
    """Seconds per staged notebook (its cells' setup, call and teardown summed), from the JUnit XML
    report of a run (``bash .ci/test --junitxml=FILE``), in the order they ran."""
    import xml.etree.ElementTree as ET

    times: dict[str, float] = {}
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        name = case.get("classname", "")  # nbval: "<path with dots>.<notebook>.ipynb"
        if name.endswith(".ipynb"):
            notebook = name.removesuffix(".ipynb").replace("/", ".").split(".")[-1]
            times[notebook] = times.get(notebook, 0.0) + float(case.get("time", 0))
    return times


def timing_record(times: dict[str, float], commit: str = "HEAD") -> dict:
    """``times`` with what they were measured on: CPU, cores, commit, date (for results/timing/)."""
    import datetime
    import os
    import platform

    from labutils.kernels import cpu_features

    features = cpu_features()
    commit = subprocess.run(["git", "rev-parse", commit], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "command": "bash .ci/test --junitxml=junit.xml && python tests/standalone_support.py times junit.xml --json results/timing/<cpu>.json",
        "what": "seconds per notebook under nbval in .ci/test: each alone outside the checkout, one at a time, "
        "after the book build of the same run (so tokenized IMDb was cached), nothing else running",
        "seconds": {name: round(value, 1) for name, value in times.items()},
        "cpu": f"{features.get('cpu')} ({features.get('llvm_cpu')})",
        "kernel_path": features.get("path"),
        "cores": os.cpu_count(),
        "commit": commit,
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
    }


def notebook_title(stem: str) -> str:
    """The first heading of a book page (``book/<stem>.md``) or a lab (``labs/source/<stem>/``)."""
    import nbformat

    page = ROOT / "book" / f"{stem}.md"
    lab = ROOT / "labs" / "source" / stem / f"{stem}.ipynb"
    if page.is_file():
        lines, fenced = [], False
        for line in page.read_text().splitlines():  # headings of the Markdown, not comments in code cells
            fenced ^= line.startswith("```")
            if not fenced:
                lines.append(line)
    elif lab.is_file():
        lines = [line for cell in nbformat.read(lab, as_version=4).cells if cell.cell_type == "markdown"
                 for line in cell.source.splitlines()]
    else:
        return stem
    return next((line[2:].strip() for line in lines if line.startswith("# ")), stem)


def timing_table(record: dict) -> str:
    """A Markdown table of ``timing_record``'s seconds, for the book's introduction to include."""
    rows = ["| notebook | wall time |", "|:---|---:|"]
    for stem, seconds in record["seconds"].items():
        minutes, rest = divmod(round(seconds), 60)
        rows.append(f"| {notebook_title(stem)} | {f'{minutes} min ' if minutes else ''}{rest} s |")
    return (
        "\n".join(rows)
        + f"\n\nMeasured on {record['date']} at commit {record['commit'][:7]}: {record['what']}; "
        f"{record['cpu']}, {record['cores']} cores, {record['kernel_path']} kernels, Python {record['python']}. "
        f"Written by `{record['command']}`.\n"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["stage", "serve", "times"])
    parser.add_argument("path", type=Path, help="the stage folder (stage, serve) or a JUnit XML report (times)")
    parser.add_argument("--json", type=Path, help="times: also write the seconds and the machine to this file")
    parser.add_argument("--commit", default="HEAD", help="times: the commit the report measured (default HEAD)")
    args = parser.parse_args()
    if args.command == "times":
        times = notebook_times(args.path)
        for notebook, seconds in times.items():
            print(f"{notebook:40s} {int(seconds) // 60:3d} min {seconds % 60:4.1f} s")
        if args.json:  # and the table beside it, FILE with .md, which book/intro.md includes
            record = timing_record(times, args.commit)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(record, indent=1) + "\n")
            args.json.with_suffix(".md").write_text(timing_table(record))
    else:
        stage(args.path) if args.command == "stage" else serve(args.path)
