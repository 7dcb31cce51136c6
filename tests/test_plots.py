"""labutils.plots: the chapters' figure builders draw what they are given, on the axes asked for."""

from __future__ import annotations

import pytest

from labutils import plots
from labutils.plots import Series


def test_series_checks_its_lengths():
    with pytest.raises(ValueError, match="2 x values but 3 y values"):
        Series("s", [1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="text has 1 values"):
        Series("s", [1, 2], [1, 2], text=["a"])
    with pytest.raises(ValueError, match="both error_minus and error_plus"):
        Series("s", [1], [1], error_minus=[0.1])
    with pytest.raises(ValueError, match="cannot be negative"):
        Series("s", [1], [1], error_minus=[-0.1], error_plus=[0.1])


def test_series_trace_carries_data_style_and_error_bars():
    trace = Series("ratio", [1, 10], [2.0, 3.0], dash="dot", symbol="x", error_minus=[0.5, 1.0],
                   error_plus=[0.25, 0.0]).trace()
    assert list(trace.x) == [1, 10] and list(trace.y) == [2.0, 3.0]
    assert trace.line.dash == "dot" and trace.marker.symbol == "x" and trace.name == "ratio"
    assert list(trace.error_y.array) == [0.25, 0.0] and list(trace.error_y.arrayminus) == [0.5, 1.0]
    assert trace.error_y.symmetric is False
    assert Series("plain", [1], [1]).trace().error_y.array is None


def test_line_chart_axes_and_titles():
    fig = plots.line_chart([Series("a", [1, 2], [3, 4]), Series("b", [1, 2], [5, 6], mode="lines")], title="T",
                           x_title="X", y_title="Y", x_log=True, height=300)
    assert [t.name for t in fig.data] == ["a", "b"]
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "linear"
    assert fig.layout.title.text == "T" and fig.layout.xaxis.title.text == "X" and fig.layout.height == 300
    with pytest.raises(ValueError, match="no series"):
        plots.line_chart([], title="T", x_title="X", y_title="Y")


def test_side_by_side_chart_puts_each_panel_on_its_axes():
    fig = plots.side_by_side_chart([Series("l", [1], [1])], [Series("r1", [1], [2]), Series("r2", [1], [3])], title="T",
                                   panel_titles=("left", "right"), x_title="X", y_titles=("YL", "YR"), x_log=True, y_log=True)
    assert [(t.name, t.xaxis) for t in fig.data] == [("l", "x"), ("r1", "x2"), ("r2", "x2")]
    assert fig.layout.yaxis.title.text == "YL" and fig.layout.yaxis2.title.text == "YR"
    assert fig.layout.xaxis.type == fig.layout.xaxis2.type == fig.layout.yaxis2.type == "log"
    with pytest.raises(ValueError, match="each panel"):
        plots.side_by_side_chart([], [Series("r", [1], [1])], title="T", panel_titles=("a", "b"), x_title="X",
                                 y_titles=("a", "b"))


def test_panels_chart_gives_every_panel_the_same_span():
    panels = {"A": [Series("run", ["u", "v"], [88.0, 89.5])], "B": [Series("run", ["w"], [85.0])]}
    fig = plots.panels_chart(panels, title="T", y_title="Y", lines={"B": (83.0, "target")}, bands={"A": (88.5, 89.2, "noise")},
                             margin=0.25)
    spans = [fig.layout[axis].range[1] - fig.layout[axis].range[0] for axis in ("yaxis", "yaxis2")]
    # A spans 88.0-89.5, B 83.0 (its line)-85.0: the larger (2.0) plus the margin on each side, in both
    assert spans == pytest.approx([2.5, 2.5])
    assert fig.layout.yaxis2.range[0] == pytest.approx(84.0 - 1.25)
    assert [t.showlegend for t in fig.data] == [True, False]  # one legend entry per series name
    assert len(fig.layout.shapes) == 2  # the target line and the band


def test_panels_chart_refuses_lines_for_missing_panels():
    with pytest.raises(ValueError, match="do not exist"):
        plots.panels_chart({"A": [Series("s", [1], [1])]}, title="T", y_title="Y", lines={"Z": (1.0, "x")})
    with pytest.raises(ValueError, match="no panels"):
        plots.panels_chart({}, title="T", y_title="Y")
