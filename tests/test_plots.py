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


# --------------------------------------------------------------------------- chapters 1 to 3


def test_grid_chart_lays_out_panels_and_keeps_one_colour_per_name():
    panels = {"A": [Series("run", [1, 2], [3, 4])], "B": [Series("run", [1, 2], [3, 5]), Series("q", [1, 2], [0, 1])],
              "C": [Series("q", [1], [2])]}
    fig = plots.grid_chart(panels, title="T", x_title=["xa", "xb", "xc"], y_title="Y", rows=3, shared_x=True,
                           marks={"B": [plots.Mark(1.5, "here"), plots.Mark(0.5, axis="y")]}, steps=["q"],
                           percent_y=["C"], legend_below=True)
    assert [(t.name, t.showlegend) for t in fig.data] == [("run", True), ("run", False), ("q", True), ("q", False)]
    assert fig.data[0].line.color == fig.data[1].line.color != fig.data[2].line.color == fig.data[3].line.color
    assert [t.line.shape for t in fig.data] == [None, None, "hv", "hv"]
    assert [t.yaxis for t in fig.data] == ["y", "y2", "y2", "y3"]  # three rows, one panel each
    assert len(fig.layout.shapes) == 2 and fig.layout.yaxis3.tickformat == ".0%"
    assert fig.layout.xaxis3.title.text == "xc" and fig.layout.xaxis.title.text is None  # shared x: bottom title only
    assert [a.text for a in fig.layout.annotations][:3] == ["A", "B", "C"]


def test_grid_chart_refuses_what_it_cannot_draw():
    one = {"A": [Series("s", [1], [1])]}
    with pytest.raises(ValueError, match="no panels"):
        plots.grid_chart({}, title="T")
    with pytest.raises(ValueError, match="rows must be 1 to 1"):
        plots.grid_chart(one, title="T", rows=2)
    with pytest.raises(ValueError, match="do not exist"):
        plots.grid_chart(one, title="T", marks={"Z": [plots.Mark(1.0)]})
    with pytest.raises(ValueError, match="2 entries for 1 panels"):
        plots.grid_chart(one, title="T", x_title=["a", "b"])
    with pytest.raises(ValueError, match="axis must be"):
        plots.Mark(1.0, axis="z")


def test_weight_range_chart_counts_every_weight_and_sorts_the_rows():
    import torch

    w = torch.tensor([[0.0, 1.0, -3.0], [0.5, 0.5, 0.5]])
    fig = plots.weight_range_chart(w, title="T", bins=4)
    assert sum(fig.data[0].y) == w.numel() and fig.layout.yaxis.type == "log"
    assert list(fig.data[1].y) == [3.0, 0.5]
    with pytest.raises(ValueError, match=r"\[out, in\]"):
        plots.weight_range_chart(torch.zeros(3), title="T")


def test_sqnr_band_chart_draws_range_median_and_rule():
    import numpy as np

    table = np.array([[1.0, 7.0, 13.0], [3.0, 9.0, 15.0], [2.0, 8.0, 20.0]])
    fig = plots.sqnr_band_chart([2, 3, 4], table, title="T", db_per_bit=6.0)
    band, median, rule = fig.data
    assert list(band.y) == [3.0, 9.0, 20.0, 13.0, 7.0, 1.0]  # max left to right, then min back
    assert list(median.y) == [2.0, 8.0, 15.0]
    assert list(rule.y) == pytest.approx([3.0, 9.0, 15.0])  # through the median's last point, 6 per bit
    with pytest.raises(ValueError, match="must be"):
        plots.sqnr_band_chart([2, 3], table, title="T", db_per_bit=6.0)


def test_channel_outlier_chart_shows_each_channels_max():
    import torch

    acts = torch.tensor([[1.0, -9.0, 0.5], [-2.0, 3.0, 0.25]])
    fig = plots.channel_outlier_chart(acts, outlier=1, typical=0, title="T")
    assert list(fig.data[0].y) == [2.0, 9.0, 0.5]
    assert [t.name for t in fig.data[1:]] == ["channel 1", "channel 0"] and list(fig.data[1].x) == [-9.0, 3.0]
    with pytest.raises(ValueError, match="channels 5"):
        plots.channel_outlier_chart(acts, outlier=5, typical=0, title="T")


def test_bitlinear_diagram_draws_one_box_per_step():
    steps = [("x", "input", ""), ("norm", "RMSNorm", "BitLinear.norm"), ("matmul", "int", "F.linear")]
    fig = plots.bitlinear_diagram(steps, ("quantize W", "ternary", "quant.ternarize_absmean"), joins_at=2, title="T")
    assert len(fig.layout.shapes) == len(steps) + 1
    texts = [a.text for a in fig.layout.annotations]
    assert "<b>norm</b>" in texts and "<b>quantize W</b>" in texts
    assert sum(1 for a in fig.layout.annotations if a.showarrow) == len(steps) - 1 + 2  # chain, latent W, join
    with pytest.raises(ValueError, match="joins_at"):
        plots.bitlinear_diagram(steps, ("w", "", ""), joins_at=3, title="T")


def test_heatmap_pair_checks_the_grid_shape():
    import numpy as np

    fig = plots.heatmap_pair(np.ones((2, 3)), -np.ones((2, 3)), x=["a", "b", "c"], y=["r0", "r1"], titles=("L", "R"),
                             formats=(".2f", "+.1f"), title="T")
    assert fig.data[1].zmid == 0 and fig.data[0].zmid is None and fig.data[0].texttemplate == "%{z:.2f}"
    with pytest.raises(ValueError, match=r"\[2, 3\]"):
        plots.heatmap_pair(np.ones((3, 2)), np.ones((2, 3)), x=["a", "b", "c"], y=["r0", "r1"], titles=("L", "R"),
                           formats=("", ""), title="T")


def test_packed_bytes_chart_labels_each_weight_where_its_bits_are():
    fig = plots.packed_bytes_chart([0x46], [1, 0, -1, 0], 2, title="one byte", positions=[0, 32, 64, 96])
    texts = [a.text for a in fig.layout.annotations]
    assert texts[:8] == ["<b>0</b>", "<b>1</b>", "<b>1</b>", "<b>0</b>", "<b>0</b>", "<b>0</b>", "<b>1</b>", "<b>0</b>"]
    assert "w0<br>+1 → 10" in texts and "w96<br>0 → 01" in texts  # w0 in bits 0-1, labelled by its position
    assert any("0x46" in t for t in texts)
    bit0 = fig.layout.shapes[0]  # bit 0 is drawn rightmost and coloured by the weight it belongs to
    assert bit0.x0 == 7 and bit0.fillcolor == plots.VALUE_COLORS[1]
    padded = plots.packed_bytes_chart([0b1], [1], 1, title="padding")
    assert sum(a.text == "pad" for a in padded.layout.annotations) == 7
    with pytest.raises(ValueError, match="do not fit"):
        plots.packed_bytes_chart([0], [1] * 5, 2, title="too many")
    with pytest.raises(ValueError, match="bits_per_weight"):
        plots.packed_bytes_chart([0], [1], 3, title="three bits")


def test_stacked_size_chart_stacks_the_parts_in_megabytes():
    parts = [("a", "part a", "red"), ("b", "part b", "blue")]
    fig = plots.stacked_size_chart({"x": {"a": 1_000_000, "b": 500_000, "file": 1_500_000}}, parts, title="sizes")
    assert [t.name for t in fig.data[:2]] == ["part a", "part b"] and fig.layout.barmode == "stack"
    assert list(fig.data[0].y) == [1.0] and list(fig.data[1].y) == [0.5] and list(fig.data[2].text) == ["1.5 MB"]
    with pytest.raises(ValueError, match=r"needs the parts \['b'\]"):
        plots.stacked_size_chart({"x": {"a": 1, "file": 1}}, parts, title="missing")


def test_short_layer_name():
    assert plots.short_layer_name("encoder.layer.0.attention.self.query") == "L0.query"
    assert plots.short_layer_name("encoder.layer.5.attention.output.dense") == "L5.attn_out"
    assert plots.short_layer_name("encoder.layer.2.intermediate.dense") == "L2.ffn_up"
    assert plots.short_layer_name("encoder.layer.2.output.dense") == "L2.ffn_down"
