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


# --------------------------------------------------------------------------- line charts (chapters 7 and 8)
# The chapters assemble their data (what a reader should follow) and hand it to these functions,
# which hold the figures' layout (what a reader need not read).

from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402

__all__ += ["Series", "line_chart", "side_by_side_chart", "panels_chart"]


@dataclass(frozen=True)
class Series:
    """One named line or set of markers: ``x`` and ``y`` of equal length (numbers, or category
    names for ``x``); ``error_minus``/``error_plus`` (same length, non-negative) draw asymmetric
    error bars (e.g. a median's per-round spread); ``text`` labels each point."""

    name: str
    x: Sequence
    y: Sequence[float]
    mode: str = "lines+markers"
    dash: str = "solid"
    symbol: str | None = None
    color: str | None = None
    text: Sequence[str] | None = None
    error_minus: Sequence[float] | None = None
    error_plus: Sequence[float] | None = None
    show_legend: bool = True

    def __post_init__(self) -> None:
        n = len(self.x)
        if len(self.y) != n:
            raise ValueError(f"series {self.name!r}: {n} x values but {len(self.y)} y values")
        for field in ("text", "error_minus", "error_plus"):
            values = getattr(self, field)
            if values is not None and len(values) != n:
                raise ValueError(f"series {self.name!r}: {field} has {len(values)} values for {n} points")
        if (self.error_minus is None) != (self.error_plus is None):
            raise ValueError(f"series {self.name!r}: give both error_minus and error_plus, or neither")
        if self.error_minus is not None and min([*self.error_minus, *self.error_plus], default=0) < 0:
            raise ValueError(f"series {self.name!r}: error bars are distances and cannot be negative")

    def trace(self) -> go.Scatter:
        """The plotly trace of this series."""
        marker = {k: v for k, v in (("symbol", self.symbol), ("color", self.color)) if v is not None}
        if "markers" in self.mode:
            marker.setdefault("size", 9)
        error = None
        if self.error_minus is not None:
            error = {"type": "data", "symmetric": False, "array": list(self.error_plus), "arrayminus": list(self.error_minus)}
        return go.Scatter(x=list(self.x), y=list(self.y), name=self.name, mode=self.mode, legendgroup=self.name,
                          line={"dash": self.dash, **({"color": self.color} if self.color else {})}, marker=marker,
                          text=list(self.text) if self.text is not None else None, textposition="top center",
                          error_y=error, showlegend=self.show_legend)


def _axis_type(log: bool) -> str:
    return "log" if log else "linear"


def line_chart(series: Sequence[Series], *, title: str, x_title: str, y_title: str, x_log: bool = False,
               y_log: bool = False, height: int = 380) -> go.Figure:
    """One panel of ``series`` (lines and/or markers) with titled, optionally logarithmic, axes."""
    if not series:
        raise ValueError(f"line_chart({title!r}): no series to draw")
    fig = go.Figure([s.trace() for s in series])
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, xaxis_type=_axis_type(x_log),
                      yaxis_type=_axis_type(y_log), height=height, template="plotly_white")
    return fig


def side_by_side_chart(left: Sequence[Series], right: Sequence[Series], *, title: str, panel_titles: tuple[str, str],
                       x_title: str, y_titles: tuple[str, str], x_log: bool = False, y_log: bool = False,
                       height: int = 420) -> go.Figure:
    """Two panels side by side sharing an x quantity (``left`` and ``right`` series each)."""
    from plotly.subplots import make_subplots

    if not left or not right:
        raise ValueError(f"side_by_side_chart({title!r}): each panel needs at least one series")
    fig = make_subplots(rows=1, cols=2, subplot_titles=panel_titles)
    for col, panel in enumerate((left, right), start=1):
        for s in panel:
            fig.add_trace(s.trace(), row=1, col=col)
        fig.update_yaxes(title_text=y_titles[col - 1], type=_axis_type(y_log), row=1, col=col)
    fig.update_xaxes(title_text=x_title, type=_axis_type(x_log))
    fig.update_layout(title=title, height=height, template="plotly_white")
    return fig


def panels_chart(panels: dict[str, Sequence[Series]], *, title: str, y_title: str,
                 lines: dict[str, tuple[float, str]] | None = None,
                 bands: dict[str, tuple[float, float, str]] | None = None, margin: float = 0.3,
                 height: int = 520) -> go.Figure:
    """One panel per key of ``panels`` (its title), side by side, every y axis spanning the same
    distance, so that equal heights mean equal differences from panel to panel. ``lines`` draws a
    dashed horizontal line ``(y, label)`` in the panels it names, ``bands`` a shaded band
    ``(y0, y1, label)``; ``margin`` is added above and below the largest span. A series that
    appears in several panels under one name gets one legend entry."""
    from plotly.subplots import make_subplots

    if not panels:
        raise ValueError(f"panels_chart({title!r}): no panels")
    lines, bands = lines or {}, bands or {}
    unknown = (set(lines) | set(bands)) - set(panels)
    if unknown:
        raise ValueError(f"panels_chart({title!r}): lines or bands for panels that do not exist: {sorted(unknown)}")
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=list(panels), horizontal_spacing=0.07)
    spans, shown = {}, set()
    for col, (panel, series) in enumerate(panels.items(), start=1):
        ys = [float(y) for s in series for y in s.y]
        ys += [lines[panel][0]] if panel in lines else []
        ys += list(bands[panel][:2]) if panel in bands else []
        if not ys:
            raise ValueError(f"panels_chart({title!r}): panel {panel!r} has nothing to draw")
        spans[panel] = (min(ys), max(ys))
        for s in series:
            trace = s.trace()
            trace.showlegend = s.show_legend and s.name not in shown
            shown.add(s.name)
            fig.add_trace(trace, row=1, col=col)
        if panel in lines:
            y, label = lines[panel]
            fig.add_hline(y=y, line_dash="dash", line_color="grey", annotation_text=label,
                          annotation_position="top left", row=1, col=col)
        if panel in bands:
            y0, y1, label = bands[panel]
            fig.add_hrect(y0=min(y0, y1), y1=max(y0, y1), fillcolor="grey", opacity=0.15, line_width=0,
                          annotation_text=label, annotation_position="inside top right", row=1, col=col)
    span = max(hi - lo for lo, hi in spans.values()) + 2 * margin
    for col, (lo, hi) in enumerate(spans.values(), start=1):
        middle = (lo + hi) / 2
        fig.update_yaxes(range=[middle - span / 2, middle + span / 2], row=1, col=col)
    fig.update_xaxes(tickangle=-40)
    fig.update_yaxes(title_text=y_title, row=1, col=1)
    fig.update_layout(title=title, template="plotly_white", height=height, legend={"orientation": "h", "y": -0.45})
    return fig
