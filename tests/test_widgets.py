"""Tests for labutils.widgets: drive the live explorer from Python, inspect the static twin."""

from __future__ import annotations

import json
import math

import ipywidgets as ipw
import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from labutils import quant, widgets


def gaussian(*shape: int, seed: int = 0, std: float = 0.02) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


@pytest.fixture(scope="module")
def weights() -> torch.Tensor:
    return gaussian(48, 96)  # 4608 weights, more than max_samples below: the histogram subsamples


def expected_bars(explorer: widgets.BitwidthExplorer, weights: torch.Tensor, method: str, bits: float):
    dequantized, info = quant.quantize_weight(weights, method, bits)
    return widgets.histogram_fractions(explorer.sample(dequantized), explorer.edges), info


def assert_shows(explorer: widgets.BitwidthExplorer, weights: torch.Tensor, method: str, bits: float) -> None:
    """The figure and the metrics are those of quantize_weight(weights, method, bits)."""
    bars, info = expected_bars(explorer, weights, method, bits)
    np.testing.assert_array_equal(np.asarray(explorer.figure.data[1].y), bars)
    assert explorer.info == info
    text = explorer.metrics.value
    assert f"{info['mse']:.3e}" in text
    assert f"{info['sqnr_db']:.2f} dB" in text
    assert f"{info['size_bytes'] / 1024:,.1f} KiB" in text
    assert f"{method}, {'1 bit' if bits == 1 else widgets._bits_label(bits) + ' bits'}" in text
    assert f"SQNR {info['sqnr_db']:.2f} dB" in explorer.figure.layout.title.text


# --------------------------------------------------------------------------- live explorer


def test_explorer_structure(weights):
    explorer = widgets.bitwidth_explorer(weights, max_samples=1000)
    assert isinstance(explorer.slider, ipw.SelectionSlider)
    assert list(explorer.slider.options) == [(widgets._bits_label(b), b) for b in widgets.BITS_OPTIONS]
    assert [value for _, value in explorer.method.options] == list(quant.WEIGHT_METHODS)
    assert isinstance(explorer.figure, go.FigureWidget)
    assert isinstance(explorer.metrics, ipw.HTML)
    assert isinstance(explorer.widget, ipw.VBox)
    children = [child for box in explorer.widget.children for child in box.children]
    assert children == [explorer.slider, explorer.method, explorer.figure, explorer.metrics]
    assert [trace.name for trace in explorer.figure.data] == ["original", "quantized"]
    assert explorer.figure.layout.barmode == "overlay"


def test_explorer_displays_its_widget(weights, monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    explorer = widgets.bitwidth_explorer(weights, max_samples=1000)
    explorer._ipython_display_()
    assert shown == [explorer.widget]


def test_in_colab_displaying_switches_on_the_custom_widget_manager(weights, monkeypatch):
    import sys
    import types

    import IPython.display

    calls = []
    output = types.SimpleNamespace(enable_custom_widget_manager=lambda: calls.append("enabled"))
    colab = types.ModuleType("google.colab")
    colab.output = output
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setattr(IPython.display, "display", lambda obj: calls.append(obj))
    explorer = widgets.bitwidth_explorer(weights, max_samples=1000)
    explorer._ipython_display_()
    assert calls == ["enabled", explorer.widget]  # before the widget, or Colab draws nothing


def test_outside_colab_no_widget_manager_is_touched():
    assert "google.colab" not in __import__("sys").modules
    assert widgets.enable_colab_widgets() is False


def test_explorer_initial_state(weights):
    explorer = widgets.bitwidth_explorer(weights, max_samples=1000)
    assert (explorer.slider.value, explorer.method.value) == (1.58, "uniform")
    assert_shows(explorer, weights, "uniform", 1.58)
    original = widgets.histogram_fractions(explorer.sample(weights), explorer.edges)
    np.testing.assert_array_equal(np.asarray(explorer.figure.data[0].y), original)


def test_moving_the_slider_updates_figure_and_metrics(weights):
    explorer = widgets.bitwidth_explorer(weights, max_samples=1000)
    before_bars = np.asarray(explorer.figure.data[1].y).copy()
    before_original = np.asarray(explorer.figure.data[0].y).copy()
    before_text = explorer.metrics.value

    explorer.slider.value = 4

    assert_shows(explorer, weights, "uniform", 4)
    assert not np.array_equal(np.asarray(explorer.figure.data[1].y), before_bars)
    assert explorer.metrics.value != before_text
    np.testing.assert_array_equal(np.asarray(explorer.figure.data[0].y), before_original)
    # more bits: the quantized histogram spreads over more bins, the error drops
    assert np.count_nonzero(explorer.figure.data[1].y) > np.count_nonzero(before_bars)
    assert explorer.info["sqnr_db"] > quant.quantize_weight(weights, "uniform", 1.58)[1]["sqnr_db"]


def test_changing_the_method_updates_figure_and_metrics(weights):
    explorer = widgets.bitwidth_explorer(weights, bits=2, max_samples=1000)
    explorer.method.value = "absmax"
    assert_shows(explorer, weights, "absmax", 2)
    explorer.method.value = "sign"
    assert_shows(explorer, weights, "sign", 2)
    assert np.count_nonzero(explorer.figure.data[1].y) == 2  # two levels: ±mean|w|


@pytest.mark.parametrize("method", quant.WEIGHT_METHODS)
def test_every_setting_draws_a_full_histogram(weights, method):
    explorer = widgets.bitwidth_explorer(weights, method=method, max_samples=1000)
    for bits in widgets.BITS_OPTIONS:
        explorer.slider.value = bits
        bars = np.asarray(explorer.figure.data[1].y)
        assert bars.shape == (80,) and np.isfinite(bars).all()
        assert bars.sum() == pytest.approx(1.0, abs=1e-5)
        assert explorer.info["bits"] == bits and explorer.info["method"] == method


def test_shared_bins_hold_every_quantized_value():
    """No level of any method or bit width falls off the histogram, even for skewed weights."""
    cases = [gaussian(32, 64), gaussian(32, 64) + 0.05, gaussian(32, 64).abs(), -gaussian(16, 8).abs() - 1.0]
    for w in cases:
        edges = widgets._shared_edges(w, 80)
        for method in quant.WEIGHT_METHODS:
            for bits in widgets.BITS_OPTIONS:
                values = quant.quantize_weight(w, method, bits)[0]
                assert edges[0] <= float(values.min()) and float(values.max()) <= edges[-1] * (1 + 1e-6)


def test_histogram_subsample_is_seeded_and_metrics_use_every_weight():
    w = gaussian(64, 128, seed=3)
    first = widgets.bitwidth_explorer(w, max_samples=500, seed=1)
    second = widgets.bitwidth_explorer(w, max_samples=500, seed=1)
    other = widgets.bitwidth_explorer(w, max_samples=500, seed=2)
    assert first.sample(w).shape == (500,)
    np.testing.assert_array_equal(first.sample(w), second.sample(w))
    assert not np.array_equal(first.sample(w), other.sample(w))
    np.testing.assert_array_equal(np.asarray(first.figure.data[1].y), np.asarray(second.figure.data[1].y))
    # the metrics are those of the whole tensor, whatever the subsample
    assert first.info == other.info == quant.quantize_weight(w, "uniform", 1.58)[1]
    # a small tensor is histogrammed whole
    assert widgets.bitwidth_explorer(w[:2], max_samples=500).sample(w[:2]).shape == (256,)


def test_explorer_accepts_numpy_and_low_precision():
    w = gaussian(16, 32)
    from_numpy = widgets.bitwidth_explorer(w.numpy(), bits=8)
    assert from_numpy.info == quant.quantize_weight(w, "uniform", 8)[1]
    bf16 = widgets.bitwidth_explorer(w.to(torch.bfloat16), bits=4)
    assert_shows(bf16, w.to(torch.bfloat16), "uniform", 4)
    assert "bfloat16" in bf16.metrics.value


def test_explorer_on_all_zero_weights():
    explorer = widgets.bitwidth_explorer(torch.zeros(8, 8))
    for bits in widgets.BITS_OPTIONS:
        explorer.slider.value = bits
        assert np.isfinite(np.asarray(explorer.figure.data[1].y)).all()
        assert explorer.info["sqnr_db"] == math.inf and "inf dB" in explorer.metrics.value


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(weights=[1.0, 2.0]), TypeError, r"weights must be a torch.Tensor or numpy.ndarray, got list"),
        (dict(weights=torch.arange(6)), TypeError, r"weights must be a floating-point tensor .*int64"),
        (dict(weights=torch.tensor([1.0, math.nan])), ValueError, r"weights must be finite, got 1 NaN"),
        (dict(weights=torch.zeros(0)), ValueError, r"weights must not be empty"),
        (dict(method="round"), ValueError, r"method must be one of .*'round'"),
        (dict(bits=5), ValueError, r"bits must be taken from .*got 5"),
        (dict(bins=0), ValueError, r"bins must be a positive int, got 0"),
        (dict(max_samples=-3), ValueError, r"max_samples must be a positive int, got -3"),
    ],
)
@pytest.mark.parametrize("build", [widgets.bitwidth_explorer, widgets.bitwidth_figure])
def test_bad_input_names_the_argument_and_value(build, kwargs, error, message):
    kwargs = {"weights": gaussian(4, 4), **kwargs}
    with pytest.raises(error, match=message):
        build(kwargs.pop("weights"), **kwargs)


# --------------------------------------------------------------------------- static twin


def test_static_figure_has_one_frame_per_bit_width(weights):
    fig = widgets.bitwidth_figure(weights, "absmax", max_samples=1000)
    labels = [widgets._bits_label(b) for b in widgets.BITS_OPTIONS]
    assert [frame.name for frame in fig.frames] == labels
    (slider,) = fig.layout.sliders
    assert [step.label for step in slider.steps] == labels
    assert [list(step.args[0]) for step in slider.steps] == [[label] for label in labels]
    assert all(step.method == "animate" for step in slider.steps)
    # the same subsample and bins as the live explorer with the same settings
    explorer = widgets.bitwidth_explorer(weights, method="absmax", max_samples=1000)
    for bits, frame in zip(widgets.BITS_OPTIONS, fig.frames):
        bars, info = expected_bars(explorer, weights, "absmax", bits)
        np.testing.assert_array_equal(np.asarray(frame.data[1].y), bars)
        assert frame.data[0].visible is True
        assert frame.layout.title.text == widgets.metrics_title(info, weights.numel() * 4)
        assert f"SQNR {info['sqnr_db']:.2f} dB" in frame.layout.title.text
    # the figure opens on the first frame
    np.testing.assert_array_equal(np.asarray(fig.data[1].y), np.asarray(fig.frames[0].data[1].y))
    assert fig.layout.title.text == fig.frames[0].layout.title.text


def test_static_figure_subset_of_bit_widths(weights):
    fig = widgets.bitwidth_figure(weights, "absmean-ternary", bits=(1.58, 8))
    assert [frame.name for frame in fig.frames] == ["1.58", "8"]
    # absmean-ternary is fixed-width: 8 bits gives the same ternary weights
    np.testing.assert_array_equal(np.asarray(fig.frames[0].data[1].y), np.asarray(fig.frames[1].data[1].y))


def test_static_figure_html_is_small():
    """Bars on shared bins, not raw samples: a 384x1536 weight is a few KB of page."""
    w = gaussian(384, 1536)
    fig = widgets.bitwidth_figure(w, "uniform")
    html = fig.to_html(include_plotlyjs=False, full_html=False)
    assert len(html) < 20_000
    spec = json.loads(fig.to_json())
    assert all(len(frame["data"]) == 2 for frame in spec["frames"])
    assert len(spec["frames"]) == len(widgets.BITS_OPTIONS)
