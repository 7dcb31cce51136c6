"""Show plotly figures so that they draw in JupyterLab, Colab and the offline book alike.

The rendered book loads ``plotly.min.js`` once per page from the installed plotly package
(``book/_ext/plotly_offline.py``), so figures are emitted as HTML that expects
``window.Plotly`` instead of embedding 4 MB of JavaScript per chart or fetching it from a CDN.
JupyterLab prefers the ``application/vnd.plotly.v1+json`` entry of the same output; Colab,
which renders neither, gets plotly's own ``colab`` renderer.
"""

from __future__ import annotations

import json
import sys

import plotly.graph_objects as go

__all__ = ["show", "figure_html"]


def figure_html(fig: go.Figure, *, div_id: str | None = None) -> str:
    """HTML for ``fig`` that draws with a page-wide ``window.Plotly`` (no script embedded)."""
    return fig.to_html(
        include_plotlyjs=False,
        full_html=False,
        div_id=div_id,
        # A page must open on the first frame: plotly would otherwise play every frame on load.
        auto_play=False,
        config={"displaylogo": False, "responsive": True},
    )


def show(fig: go.Figure) -> None:
    """Display ``fig`` in the current notebook (Jupyter, Colab, or a book build)."""
    from IPython.display import display

    if "google.colab" in sys.modules:
        fig.show(renderer="colab")
        return
    bundle = {
        "application/vnd.plotly.v1+json": json.loads(fig.to_json()),
        "text/html": figure_html(fig),
        "text/plain": f"<plotly figure: {fig.layout.title.text or 'untitled'}>",
    }
    display(bundle, raw=True)
