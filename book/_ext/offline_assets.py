"""Serve the book's JavaScript from installed packages, so every page works with no network.

- ``plotly.min.js`` from the installed ``plotly`` package: chapters emit figures as HTML that
  expects ``window.Plotly`` (see ``labutils.plots``).
- MathJax 3 from the ``django-static-mathjax`` package (the ``[book]`` extra), in place of
  Sphinx's default CDN copy: the combined TeX/MathML component, its fonts and the extensions
  it loads on demand.
"""

from __future__ import annotations

import shutil
from pathlib import Path

MATHJAX_KEEP = ("tex-mml-chtml.js", "input", "output", "a11y", "ui", "sre", "adaptors", "core.js", "startup.js")


def _plotly_js() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def _mathjax_root() -> Path:
    import mathjax  # django-static-mathjax installs it under this name

    return Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"


def _copy_assets(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    static = Path(app.outdir) / "_static"
    static.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_plotly_js(), static / "plotly.min.js")
    source, target = _mathjax_root(), static / "mathjax"
    for name in MATHJAX_KEEP:
        item = source / name
        if item.is_dir():
            shutil.copytree(item, target / name, dirs_exist_ok=True)
        elif item.exists():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(item, target / name)


def _drop_duplicate_scripts(app, pagename, templatename, context, doctree) -> None:
    """sphinx-thebe registers its inline config twice; a repeated ``const`` is a page error."""
    seen, unique = set(), []
    for script in context.get("script_files", []):
        # One copy is registered with filename None, the other with "": same script.
        key = (getattr(script, "filename", None) or "", repr(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    if "script_files" in context:
        context["script_files"][:] = unique


def setup(app):
    # Loaded before require.js (if a page ever adds it): plotly's UMD bundle would otherwise
    # register itself as an AMD module and never set window.Plotly.
    app.add_js_file("plotly.min.js", priority=100)
    app.config.mathjax_path = "mathjax/tex-mml-chtml.js"
    app.connect("build-finished", _copy_assets)
    app.connect("html-page-context", _drop_duplicate_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
