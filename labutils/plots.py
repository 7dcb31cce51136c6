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


# --------------------------------------------------------------------------- chapters 1 to 3
# Grids of small charts, and the few figures of chapters 1-3 that are more than lines: the
# chapters compute the numbers and name the series; the styling lives here.

from collections.abc import Mapping  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ += ["Mark", "grid_chart", "weight_range_chart", "sqnr_band_chart", "channel_outlier_chart",
            "bitlinear_diagram", "heatmap_pair"]


@dataclass(frozen=True)
class Mark:
    """A reference line across one panel: vertical at ``x`` (``axis="x"``) or horizontal at ``y``
    (``axis="y"``), dotted grey, with an optional ``label``."""

    at: float
    label: str = ""
    axis: str = "x"

    def __post_init__(self) -> None:
        if self.axis not in ("x", "y"):
            raise ValueError(f"Mark at {self.at}: axis must be 'x' or 'y', got {self.axis!r}")


def grid_chart(panels: Mapping[str, Sequence[Series]], *, title: str, x_title: str | Sequence[str] = "",
               y_title: str | Sequence[str] = "", rows: int = 1, marks: Mapping[str, Sequence[Mark]] | None = None,
               steps: Sequence[str] = (), x_log: bool = False, percent_y: Sequence[str] = (),
               shared_x: bool = False, height: int = 360, legend_below: bool = False) -> go.Figure:
    """Panels (key: the panel's title) laid out in ``rows`` rows, filled row by row.

    ``x_title``/``y_title`` are one title for every panel or one per panel; ``marks`` draws
    reference lines in the panels it names; series named in ``steps`` are drawn as staircases
    (``line_shape="hv"``); panels named in ``percent_y`` get a percent y axis. A series that
    appears in several panels under one name keeps one colour and one legend entry.
    """
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    if not panels:
        raise ValueError(f"grid_chart({title!r}): no panels")
    if rows < 1 or rows > len(panels):
        raise ValueError(f"grid_chart({title!r}): rows must be 1 to {len(panels)}, got {rows}")
    marks = marks or {}
    unknown = (set(marks) | set(percent_y)) - set(panels)
    if unknown:
        raise ValueError(f"grid_chart({title!r}): marks or percent_y for panels that do not exist: {sorted(unknown)}")
    titles = list(panels)
    per_panel = {}
    for name, value in (("x_title", x_title), ("y_title", y_title)):
        values = [value] * len(titles) if isinstance(value, str) else list(value)
        if len(values) != len(titles):
            raise ValueError(f"grid_chart({title!r}): {name} has {len(values)} entries for {len(titles)} panels")
        per_panel[name] = values
    cols = -(-len(titles) // rows)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, shared_xaxes=shared_x,
                        vertical_spacing=0.12 if rows > 1 else None)
    colours: dict[str, str] = {}
    palette = qualitative.Plotly
    for i, panel in enumerate(titles):
        row, col = i // cols + 1, i % cols + 1
        for s in panels[panel]:
            trace = s.trace()
            first = s.name not in colours
            colour = s.color or colours.setdefault(s.name, palette[len(colours) % len(palette)])
            trace.update(line_color=colour, marker_color=colour, showlegend=s.show_legend and first)
            if s.name in steps:
                trace.update(line_shape="hv")
            fig.add_trace(trace, row=row, col=col)
        for mark in marks.get(panel, ()):
            line = dict(line_dash="dot", line_color="grey", annotation_text=mark.label or None, row=row, col=col)
            (fig.add_vline(x=mark.at, **line) if mark.axis == "x" else fig.add_hline(y=mark.at, **line))
        show_x_title = not shared_x or row == rows
        fig.update_xaxes(title_text=per_panel["x_title"][i] if show_x_title else None, type=_axis_type(x_log),
                         row=row, col=col)
        fig.update_yaxes(title_text=per_panel["y_title"][i], tickformat=".0%" if panel in percent_y else None,
                         row=row, col=col)
    legend = {"orientation": "h", "y": -0.25} if legend_below else {}
    fig.update_layout(title=title, template="plotly_white", height=height, legend=legend, margin={"t": 80})
    return fig


def weight_range_chart(weight: torch.Tensor, *, title: str, bins: int = 120) -> go.Figure:
    """Chapter 1's outlier picture of a weight ``[out, in]``: a histogram of its values (log
    count) beside the largest magnitude of each output channel (row), sorted."""
    import numpy as np
    from plotly.subplots import make_subplots

    if weight.ndim != 2:
        raise ValueError(f"weight_range_chart: expected a weight [out, in], got shape {tuple(weight.shape)}")
    values = weight.detach().flatten().float()
    counts, edges = np.histogram(values.numpy(), bins=bins)
    row_max = weight.detach().abs().amax(dim=1).sort(descending=True).values.numpy()
    fig = make_subplots(rows=1, cols=2, subplot_titles=("weights (log count)", "max |W| of each output channel"))
    fig.add_trace(go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=counts, marker_color="#4c78a8", name="count"), row=1, col=1)
    fig.add_trace(go.Scatter(x=np.arange(len(row_max)), y=row_max, mode="lines", line_color="#e45756",
                             name="row max|W|"), row=1, col=2)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_xaxes(title_text="weight value", row=1, col=1)
    fig.update_xaxes(title_text="output channel, sorted", row=1, col=2)
    fig.update_layout(template="plotly_white", height=360, showlegend=False, bargap=0, title=title, margin={"t": 80})
    return fig


def sqnr_band_chart(bit_widths: Sequence[int], sqnr: np.ndarray, *, title: str, db_per_bit: float) -> go.Figure:
    """Chapter 1's SQNR against bit width: ``sqnr`` [layers, len(bit_widths)] in dB drawn as the
    range over the layers (a band) and the median layer, beside the line of ``db_per_bit``
    through the median's last point."""
    import numpy as np

    table = np.asarray(sqnr, dtype=float)
    bits = [int(b) for b in bit_widths]
    if table.ndim != 2 or table.shape[1] != len(bits):
        raise ValueError(f"sqnr_band_chart: sqnr must be [layers, {len(bits)}], got shape {table.shape}")
    median = np.median(table, axis=0)
    anchor = median[-1] - db_per_bit * bits[-1]
    fig = go.Figure([
        go.Scatter(x=bits + bits[::-1], y=list(table.max(0)) + list(table.min(0)[::-1]), fill="toself",
                   fillcolor="rgba(76,120,168,0.2)", line_width=0, name=f"range over {len(table)} layers",
                   hoverinfo="skip"),
        go.Scatter(x=bits, y=median, mode="lines+markers", name="median layer", line_color="#4c78a8"),
        go.Scatter(x=bits, y=[anchor + db_per_bit * b for b in bits], mode="lines", name=f"{db_per_bit:.2f} dB per bit",
                   line={"dash": "dash", "color": "grey"}),
    ])
    fig.update_layout(template="plotly_white", height=380, title=title, xaxis_title="bits per weight",
                      yaxis_title="SQNR (dB)", legend={"x": 0.02, "y": 0.98})
    return fig


def channel_outlier_chart(acts: torch.Tensor, outlier: int, typical: int, *, title: str) -> go.Figure:
    """Chapter 3's outlier channel: the largest |x| of every channel of ``acts`` [tokens, channels]
    (bars), beside the histograms of channel ``outlier`` (red) and channel ``typical`` (blue)."""
    import numpy as np
    from plotly.subplots import make_subplots

    if acts.ndim != 2 or not (0 <= outlier < acts.shape[1] and 0 <= typical < acts.shape[1]):
        raise ValueError(f"channel_outlier_chart: acts must be [tokens, channels] holding channels {outlier} "
                         f"and {typical}, got shape {tuple(acts.shape)}")
    channel_max = acts.abs().amax(dim=0).numpy()
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4],
                        subplot_titles=("max |x| of each channel", f"x of channel {outlier} (red) vs channel {typical} (blue)"))
    fig.add_trace(go.Bar(x=np.arange(len(channel_max)), y=channel_max, marker_color="#4c78a8", name="max|x|"), row=1, col=1)
    for channel, colour in ((outlier, "#e45756"), (typical, "#4c78a8")):
        fig.add_trace(go.Histogram(x=acts[:, channel].numpy(), nbinsx=60, marker_color=colour, opacity=0.7,
                                   name=f"channel {channel}"), row=1, col=2)
    fig.update_xaxes(title_text="channel", row=1, col=1)
    fig.update_xaxes(title_text="x", row=1, col=2)
    fig.update_layout(template="plotly_white", height=340, barmode="overlay", showlegend=False, title=title)
    return fig


def bitlinear_diagram(steps: Sequence[tuple[str, str, str]], weight_step: tuple[str, str, str], *,
                      joins_at: int, title: str) -> go.Figure:
    """A block diagram: ``steps`` ``(name, what it computes, where in the code)`` as boxes left to
    right joined by arrows, and ``weight_step`` (the same triple) above step ``joins_at``, fed by
    the latent weights. Newlines in the texts break lines."""
    if not steps or not 0 <= joins_at < len(steps):
        raise ValueError(f"bitlinear_diagram: joins_at must index one of the {len(steps)} steps, got {joins_at}")

    def html(text: str) -> str:
        return text.replace("\n", "<br>")

    def code(text: str) -> str:
        return f"<span style='font-family:monospace'>{html(text)}</span>"

    def arrow(x0: float, y0: float, x1: float, y1: float) -> None:
        fig.add_annotation(x=x1, y=y1, ax=x0, ay=y0, xref="x", yref="y", axref="x", ayref="y", showarrow=True,
                           arrowhead=2, arrowwidth=1.5, text="")

    fig = go.Figure()
    box_x = [0.5 + 2.2 * i for i in range(len(steps))]
    for (name, what, where), bx in zip(steps, box_x):
        fig.add_shape(type="rect", x0=bx - 0.95, x1=bx + 0.95, y0=0.2, y1=1.8, line_color="#4c78a8",
                      fillcolor="rgba(76,120,168,0.12)")
        fig.add_annotation(x=bx, y=1.45, text=f"<b>{name}</b>", showarrow=False)
        fig.add_annotation(x=bx, y=0.85, text=html(what), showarrow=False, font_size=11)
        if where:
            fig.add_annotation(x=bx, y=-0.35, text=code(where), showarrow=False, font_size=10, font_color="#555")
    for left, right in zip(box_x[:-1], box_x[1:]):
        arrow(left + 0.95, 1.0, right - 0.95, 1.0)
    wx = box_x[joins_at]
    name, what, where = weight_step
    fig.add_shape(type="rect", x0=wx - 0.95, x1=wx + 0.95, y0=2.6, y1=4.0, line_color="#e45756",
                  fillcolor="rgba(228,87,86,0.10)")
    fig.add_annotation(x=wx, y=3.65, text=f"<b>{name}</b>", showarrow=False)
    fig.add_annotation(x=wx, y=3.05, text=html(what), showarrow=False, font_size=11)
    fig.add_annotation(x=wx + 2.0, y=3.3, text=code(where), showarrow=False, font_size=10, font_color="#555",
                       xanchor="left")
    fig.add_annotation(x=wx - 2.2, y=3.3, text="latent W [d_out, d_in]<br>float (trained)", showarrow=False, font_size=11)
    arrow(wx - 1.6, 3.3, wx - 0.95, 3.3)
    arrow(wx, 2.6, wx, 1.8)
    fig.update_xaxes(visible=False, range=[-0.6, box_x[-1] + 1.1])
    fig.update_yaxes(visible=False, range=[-1.0, 4.2])
    fig.update_layout(template="plotly_white", height=380, margin={"l": 10, "r": 10, "t": 50, "b": 10}, title=title)
    return fig


def heatmap_pair(left: np.ndarray, right: np.ndarray, *, x: Sequence[str], y: Sequence[str],
                 titles: tuple[str, str], formats: tuple[str, str], title: str) -> go.Figure:
    """Two annotated heatmaps side by side, ``left`` and ``right`` [len(y), len(x)]: the left in
    reds (a damage, from 0 up), the right in red-blue centred on 0 (a change, either way)."""
    import numpy as np
    from plotly.subplots import make_subplots

    grids = [np.asarray(left, dtype=float), np.asarray(right, dtype=float)]
    for grid in grids:
        if grid.shape != (len(y), len(x)):
            raise ValueError(f"heatmap_pair: each grid must be [{len(y)}, {len(x)}], got {grid.shape}")
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.16, subplot_titles=titles)
    for col, (z, fmt, scale) in enumerate(zip(grids, formats, ("Reds", "RdBu")), start=1):
        fig.add_trace(go.Heatmap(z=z, x=list(x), y=list(y), colorscale=scale, texttemplate=f"%{{z:{fmt}}}",
                                 showscale=False, zmid=0 if scale == "RdBu" else None), row=1, col=col)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(template="plotly_white", height=380, margin={"t": 80}, title=title)
    return fig


# --------------------------------------------------------------------------- packed bytes and file sizes (chapter 5)

__all__ += ["VALUE_COLORS", "packed_bytes_chart", "stacked_size_chart"]

VALUE_COLORS = {-1: "#e45756", 0: "#bab0ac", 1: "#4c78a8"}  # a weight's colour by its value: red, grey, blue


def _signed(w: int) -> str:
    return f"{int(w):+d}" if w else "0"


def packed_bytes_chart(packed: Sequence[int], weights: Sequence[int], bits_per_weight: int, *, title: str,
                       first: int = 0, positions: Sequence[int] | None = None) -> go.Figure:
    """Bytes drawn as rows of 8 bit cells (bit 7 on the left, as numbers are written), each bit
    coloured by the value (-1, 0, +1) of the weight that owns it and labelled with that weight.

    ``packed``: the bytes (ints 0..255, e.g. a uint8 array). ``bits_per_weight``: 1 (binary, 8
    weights a byte) or 2 (ternary 2-bit codes ``w + 1``, 4 a byte). ``weights[s]`` is the weight
    in slot ``s`` (byte ``s // per_byte``, bits from ``bits_per_weight * (s % per_byte)``), and
    ``positions[s]`` its index in the tensor (default ``first + s``: consecutive weights);
    slots past ``len(weights)`` are drawn as padding.
    """
    if bits_per_weight not in (1, 2):
        raise ValueError(f"bits_per_weight must be 1 or 2, got {bits_per_weight!r}")
    per_byte = 8 // bits_per_weight
    packed = [int(b) for b in packed]
    weights = [int(w) for w in weights]
    if len(weights) > per_byte * len(packed):
        raise ValueError(f"{len(weights)} weights do not fit in {len(packed)} bytes of {per_byte}")
    positions = [first + s for s in range(len(weights))] if positions is None else [int(p) for p in positions]
    if len(positions) != len(weights):
        raise ValueError(f"{len(positions)} positions for {len(weights)} weights")
    fig = go.Figure()
    for j, byte in enumerate(packed):
        top = -2.0 * j
        for bit in range(8):
            slot = per_byte * j + bit // bits_per_weight  # the weight that owns this bit
            value = weights[slot] if slot < len(weights) else None
            x = 7 - bit
            fig.add_shape(type="rect", x0=x, x1=x + 1, y0=top - 1, y1=top,
                          fillcolor=VALUE_COLORS.get(value, "white"), line={"color": "white", "width": 3})
            fig.add_annotation(x=x + 0.5, y=top - 0.5, text=f"<b>{(byte >> bit) & 1}</b>", showarrow=False,
                               font={"size": 18, "color": "black" if value in (0, None) else "white"})
        for k in range(per_byte):
            slot = per_byte * j + k
            if slot < len(weights):
                code = "" if bits_per_weight == 1 else f" → {weights[slot] + 1:02b}"
                label = f"w{positions[slot]}<br>{_signed(weights[slot])}{code}"
            else:
                label = "pad"
            fig.add_annotation(x=8 - (k + 0.5) * bits_per_weight, y=top + 0.45, text=label, showarrow=False,
                               font={"size": 11})
        fig.add_annotation(x=8.3, y=top - 0.5, xanchor="left", showarrow=False, font={"size": 13},
                           text=f"byte {j} = 0b{byte:08b} = 0x{byte:02x} = {byte}")
    fig.update_xaxes(range=[-0.1, 13.5], showgrid=False, zeroline=False, tickmode="array",
                     tickvals=[x + 0.5 for x in range(8)], ticktext=[f"bit {7 - x}" for x in range(8)])
    fig.update_yaxes(visible=False, range=[-2.0 * len(packed) + 0.7, 1.1])
    fig.update_layout(template="plotly_white", title=title, height=130 + 110 * len(packed),
                      margin={"l": 20, "r": 20, "t": 50, "b": 30}, showlegend=False)
    return fig


def stacked_size_chart(sizes: dict[str, dict[str, int]], parts: Sequence[tuple[str, str, str]], *, title: str,
                       y_title: str = "bytes on disk (MB = 10⁶ bytes)", height: int = 420) -> go.Figure:
    """One stacked bar per entry of ``sizes`` ({label: {part: bytes, ..., "file": total bytes}}),
    stacked in the order of ``parts`` ((key, legend label, colour) each), in MB (10⁶ bytes), with
    each bar's ``"file"`` size written above it."""
    if not sizes:
        raise ValueError(f"stacked_size_chart({title!r}): no bars to draw")
    missing = sorted({key for s in sizes.values() for key, _, _ in parts if key not in s} |
                     {"file" for s in sizes.values() if "file" not in s})
    if missing:
        raise ValueError(f"stacked_size_chart({title!r}): every bar needs the parts {missing}")
    fig = go.Figure()
    labels = list(sizes)
    for key, label, color in parts:
        fig.add_bar(name=label, x=labels, y=[s[key] / 1e6 for s in sizes.values()], marker_color=color,
                    hovertemplate="%{x}: %{y:.3f} MB<extra>" + label + "</extra>")
    fig.add_scatter(x=labels, y=[s["file"] / 1e6 for s in sizes.values()], mode="text", showlegend=False,
                    text=[f"{s['file'] / 1e6:.1f} MB" for s in sizes.values()], textposition="top center",
                    hoverinfo="skip")
    fig.update_layout(barmode="stack", template="plotly_white", title=title, height=height, yaxis_title=y_title,
                      legend={"orientation": "h", "y": -0.15, "traceorder": "normal"})
    return fig


def short_layer_name(name: str) -> str:
    """A BERT linear layer's name short enough for an axis: "encoder.layer.0.attention.self.query"
    becomes "L0.query", the feed-forward pair "L0.ffn_up" and "L0.ffn_down"."""
    for long, short in (("encoder.layer.", "L"), ("attention.self.", ""), ("attention.output.dense", "attn_out"),
                        ("intermediate.dense", "ffn_up"), ("output.dense", "ffn_down")):
        name = name.replace(long, short)
    return name


__all__ += ["short_layer_name"]
