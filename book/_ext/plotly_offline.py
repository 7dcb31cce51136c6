"""Serve plotly.js from the installed plotly package, so charts draw with no network.

Chapters emit figures as HTML that expects ``window.Plotly`` (see ``labutils.plots``);
this extension copies ``plotly.min.js`` from the installed package into ``_static`` and
adds it to every page ahead of other scripts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import plotly


def _copy_plotly_js(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    source = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    target = Path(app.outdir) / "_static" / "plotly.min.js"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def setup(app):
    # Loaded before require.js (which myst-nb adds for widgets): plotly's UMD bundle would
    # otherwise register itself as an AMD module and never set window.Plotly.
    app.add_js_file("plotly.min.js", priority=100)
    app.connect("build-finished", _copy_plotly_js)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
