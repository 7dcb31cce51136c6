"""The bit-width explorer: how a weight distribution survives 16, 8, 4, 3, 2, 1.58 and 1 bits.

Two faces of one picture, both built on ``labutils.quant.quantize_weight``:

- ``bitwidth_explorer(weights)``: live ipywidgets (a bit-width slider and a method dropdown)
  driving a plotly ``FigureWidget``: the histogram of the original weights against the
  histogram of their quantized values, with MSE, SQNR and size beside it. Needs a kernel; in
  Colab, displaying it first switches on Colab's custom widget manager (``enable_colab_widgets``).
- ``bitwidth_figure(weights, method=...)``: the static twin for the rendered book, one plotly
  figure with plotly's own slider and one precomputed frame per bit width, so the web page can
  compare bit widths without a kernel.

Both histogram a seeded subsample of the weights (``max_samples``) on fixed bins shared by
every bit width and method, so bars stay comparable as the slider moves; the metrics always
use all the weights. Histograms are sent as bar heights (fractions of the sample), never as raw
samples, which keeps widget messages and the book's HTML small.
"""

from __future__ import annotations

import numbers
import sys

import ipywidgets as ipw
import numpy as np
import plotly.graph_objects as go
import torch

from labutils import quant

__all__ = [
    "BITS_OPTIONS",
    "METHOD_OPTIONS",
    "BitwidthExplorer",
    "bitwidth_explorer",
    "bitwidth_figure",
    "enable_colab_widgets",
    "histogram_fractions",
    "metrics_html",
    "metrics_title",
]

BITS_OPTIONS = (1, 1.58, 2, 3, 4, 8, 16)
METHOD_OPTIONS = (
    ("uniform (asymmetric min/max)", "uniform"),
    ("absmax (symmetric)", "absmax"),
    ("absmean ternary (BitNet b1.58)", "absmean-ternary"),
    ("sign (binary)", "sign"),
)
_METHODS = tuple(value for _, value in METHOD_OPTIONS)
_ORIGINAL_COLOR = "rgba(110, 110, 110, 0.55)"
_QUANTIZED_COLOR = "rgba(214, 39, 40, 0.65)"


# --------------------------------------------------------------------------- checks, sampling


def _as_weight_tensor(weights: object) -> torch.Tensor:
    """``weights`` (torch tensor or numpy array) as a checked floating torch tensor, dtype kept."""
    if isinstance(weights, np.ndarray):
        weights = torch.from_numpy(np.ascontiguousarray(weights))
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor or numpy.ndarray, got {type(weights).__name__}")
    quant._as_float32(weights, "weights")  # raises on non-float, empty, NaN/inf
    return weights.detach()


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_bits_options(bits: object) -> tuple[float, ...]:
    options = tuple(bits) if isinstance(bits, (list, tuple)) else (bits,)
    if not options:
        raise ValueError(f"bits must name at least one bit width from {BITS_OPTIONS}, got {bits!r}")
    for b in options:
        if b not in BITS_OPTIONS:
            raise ValueError(f"bits must be taken from {BITS_OPTIONS}, got {b!r}")
    return options


def _check_method(method: object) -> str:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    return method


def _bits_label(bits: float) -> str:
    return "1.58" if bits == 1.58 else str(int(bits))


def _bits_phrase(bits: float) -> str:
    return "1 bit" if bits == 1 else f"{_bits_label(bits)} bits"


def _sample_indices(numel: int, max_samples: int, seed: int) -> np.ndarray | None:
    """Sorted indices of a seeded subsample of ``max_samples`` elements, or None to keep all."""
    if numel <= max_samples:
        return None
    return np.sort(np.random.default_rng(seed).choice(numel, size=max_samples, replace=False))


def _sample_values(values: torch.Tensor, indices: np.ndarray | None) -> np.ndarray:
    """The flattened subsample of ``values`` as float32 numpy (same positions for every call)."""
    flat = values.detach().reshape(-1)
    if indices is not None:
        flat = flat[torch.from_numpy(indices).to(flat.device)]
    return flat.to(torch.float32).cpu().numpy()


def _shared_edges(weights: torch.Tensor, bins: int) -> np.ndarray:
    """``bins + 1`` bin edges wide enough for every method and bit width of ``quantize_weight``.

    Sign, ternary and absmax levels all lie in [-max|w|, max|w|]. Only the asymmetric
    ("uniform") grid can step past the data, by up to half a step: its extreme levels depend on
    min(w) and max(w) alone, so quantizing the two-element tensor [min, max] finds them.
    """
    w = weights.to(torch.float32).reshape(-1)
    radius = float(w.abs().max())
    low, high = -radius, radius
    extremes = torch.stack([w.min(), w.max()])
    for bits in range(quant.MIN_BITS, quant.MAX_BITS + 1):
        levels = quant.fake_quantize(extremes, bits, symmetric=False)
        low, high = min(low, float(levels.min())), max(high, float(levels.max()))
    if high <= low:  # all-zero weights: any bins will do
        low, high = -1.0, 1.0
    return np.linspace(low, high, bins + 1)


def histogram_fractions(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Fraction of ``values`` in each bin of ``edges``: float32 [len(edges) - 1], sums to 1.

    Values outside the edges count in the end bins (a level a rounding error past the last
    edge must not vanish from the picture).
    """
    values = np.clip(np.asarray(values, dtype=np.float64), edges[0], edges[-1])
    counts, _ = np.histogram(values, bins=edges)
    return (counts / max(len(values), 1)).astype(np.float32)


# --------------------------------------------------------------------------- text


def _kib(n_bytes: float) -> str:
    return f"{n_bytes / 1024:,.1f} KiB"


def metrics_title(info: dict, reference_bytes: int) -> str:
    """One-line plotly title (with a second, smaller line) stating the metrics of ``info``.

    ``info`` comes from ``quant.quantize_weight``; ``reference_bytes`` is the unquantized size.
    """
    ratio = reference_bytes / info["size_bytes"]
    return (
        f"{info['method']} · {_bits_phrase(info['bits'])} → "
        f"SQNR {info['sqnr_db']:.2f} dB · MSE {info['mse']:.3e} · {_kib(info['size_bytes'])} "
        f"({ratio:.1f}× smaller)<br><sup>{info['scheme']}</sup>"
    )


def metrics_html(info: dict, reference_bytes: int, reference_dtype: str = "float32") -> str:
    """A small HTML table of the metrics in ``info`` (from ``quant.quantize_weight``)."""
    rows = [
        ("MSE", f"{info['mse']:.3e}"),
        ("SQNR", f"{info['sqnr_db']:.2f} dB"),
        ("zeros", f"{info['sparsity']:.1%}"),
        ("entropy", f"{info['entropy_bits']:.3f} bits"),
        ("bits/weight", f"{info['bits_per_weight']:.3f}"),
        ("size", _kib(info["size_bytes"])),
        (reference_dtype, _kib(reference_bytes)),
        ("ratio", f"{reference_bytes / info['size_bytes']:.1f}× smaller"),
    ]
    body = "".join(
        f"<tr><td style='padding-right:1em'>{name}</td><td style='text-align:right'>{value}</td></tr>"
        for name, value in rows
    )
    return (
        f"<div style='min-width:17em'><b>{info['method']}, {_bits_phrase(info['bits'])}</b>"
        f"<br><small>{info['scheme']}</small><table>{body}</table></div>"
    )


# --------------------------------------------------------------------------- figures


def _base_figure(
    edges: np.ndarray, original: np.ndarray, quantized: np.ndarray, title: str, log_y: bool
) -> go.Figure:
    """Two overlaid bar traces on shared bins: 0 = original, 1 = quantized."""
    centers = ((edges[:-1] + edges[1:]) / 2).astype(np.float32)
    width = float(edges[1] - edges[0])
    bar = dict(x=centers, width=width, hovertemplate="%{x:.4g}: %{y:.3%}<extra>%{fullData.name}</extra>")
    fig = go.Figure(
        data=[
            go.Bar(y=original, name="original", marker_color=_ORIGINAL_COLOR, **bar),
            go.Bar(y=quantized, name="quantized", marker_color=_QUANTIZED_COLOR, **bar),
        ]
    )
    axis = dict(showgrid=True, gridcolor="#e5e5e5", zeroline=False, linecolor="#444", ticks="outside")
    fig.update_layout(
        template="none",  # the default template adds ~6 KB of JSON to every figure
        title=dict(text=title, font_size=13, x=0.01, xanchor="left"),
        barmode="overlay",
        bargap=0,
        height=400,
        margin=dict(l=60, r=20, t=70, b=50),
        legend=dict(orientation="h", x=1, xanchor="right", y=1.0, yanchor="bottom"),
        xaxis=dict(title="weight value", **axis),
        yaxis=dict(
            title="fraction of weights" + (" (log)" if log_y else ""),
            **(dict(type="log", dtick=1, exponentformat="power") if log_y else {}),
            **axis,
        ),
        plot_bgcolor="white",
        paper_bgcolor="white",
    )
    return fig


class BitwidthExplorer:
    """Live bit-width explorer; build it with ``bitwidth_explorer``.

    Attributes:
        slider: ipywidgets.SelectionSlider over ``BITS_OPTIONS`` (values 1, 1.58, 2, ...).
        method: ipywidgets.Dropdown over the methods of ``quant.quantize_weight``.
        figure: plotly FigureWidget; ``data[0]`` the original histogram, ``data[1]`` the quantized.
        metrics: ipywidgets.HTML with the metrics table of the current setting.
        widget: the ipywidgets.VBox to display (``display(explorer)`` shows it too).
        info: the ``quantize_weight`` info dict of the current setting.
        edges: float64 [bins + 1] histogram bin edges, shared by every setting.
    """

    def __init__(
        self,
        weights: torch.Tensor | np.ndarray,
        *,
        method: str = "uniform",
        bits: float = 1.58,
        bins: int = 80,
        max_samples: int = 20_000,
        seed: int = 0,
        log_y: bool = True,
    ) -> None:
        self.weights = _as_weight_tensor(weights)
        _check_bits_options(bits)
        _check_method(method)
        bins = _check_positive_int(bins, "bins")
        max_samples = _check_positive_int(max_samples, "max_samples")
        self._indices = _sample_indices(self.weights.numel(), max_samples, seed)
        self._reference_bytes = self.weights.numel() * self.weights.element_size()
        self._reference_dtype = str(self.weights.dtype).removeprefix("torch.")
        self.edges = _shared_edges(self.weights, bins)
        original = histogram_fractions(self.sample(self.weights), self.edges)

        self.slider = ipw.SelectionSlider(
            options=[(_bits_label(b), b) for b in BITS_OPTIONS], value=bits, description="bits",
            continuous_update=True,
        )
        self.method = ipw.Dropdown(options=METHOD_OPTIONS, value=method, description="method")
        self.figure = go.FigureWidget(_base_figure(self.edges, original, np.zeros_like(original), "", log_y))
        self.figure.layout.width = 700  # a fixed width: an autosized plot can collapse inside an HBox
        self.metrics = ipw.HTML()
        self.widget = ipw.VBox(
            [ipw.HBox([self.slider, self.method]), ipw.HBox([self.figure, self.metrics])]
        )
        self.info: dict = {}
        self.update()
        self.slider.observe(self.update, names="value")
        self.method.observe(self.update, names="value")

    def sample(self, values: torch.Tensor) -> np.ndarray:
        """The histogram's subsample of ``values`` (shape of the weights): float32 [n_samples]."""
        return _sample_values(values, self._indices)

    def update(self, change: dict | None = None) -> None:
        """Quantize with the current slider and dropdown values; redraw figure and metrics."""
        dequantized, info = quant.quantize_weight(self.weights, self.method.value, self.slider.value)
        quantized = histogram_fractions(self.sample(dequantized), self.edges)
        with self.figure.batch_update():
            self.figure.data[1].y = quantized
            self.figure.layout.title.text = metrics_title(info, self._reference_bytes)
        self.metrics.value = metrics_html(info, self._reference_bytes, self._reference_dtype)
        self.info = info

    def _ipython_display_(self) -> None:
        from IPython.display import display

        enable_colab_widgets()
        display(self.widget)


def enable_colab_widgets() -> bool:
    """In Colab, switch on its custom widget manager, without which third-party widgets such as
    plotly's ``FigureWidget`` draw nothing; elsewhere do nothing.

    Returns:
        True where the manager was switched on (Colab), False elsewhere.
    """
    if "google.colab" not in sys.modules:
        return False
    from google.colab import output  # type: ignore[import-not-found]  # only exists in Colab

    output.enable_custom_widget_manager()
    return True


def bitwidth_explorer(
    weights: torch.Tensor | np.ndarray,
    *,
    method: str = "uniform",
    bits: float = 1.58,
    bins: int = 80,
    max_samples: int = 20_000,
    seed: int = 0,
    log_y: bool = True,
) -> BitwidthExplorer:
    """A live explorer of ``quant.quantize_weight(weights, method, bits)``.

    Args:
        weights: float tensor or array, any shape (a Linear weight [out, in], say).
        method: initial dropdown value: "uniform", "absmax", "absmean-ternary" or "sign".
        bits: initial slider value, one of ``BITS_OPTIONS``.
        bins: histogram bins (shared by every setting).
        max_samples: histogram at most this many weights, a subsample seeded by ``seed``;
            the metrics use all of them.
        log_y: log-scale counts, so the original's tails stay visible beside 1-bit spikes.

    Returns:
        BitwidthExplorer; display it, or drive it from Python (``explorer.slider.value = 4``).
    """
    return BitwidthExplorer(
        weights, method=method, bits=bits, bins=bins, max_samples=max_samples, seed=seed, log_y=log_y
    )


def bitwidth_figure(
    weights: torch.Tensor | np.ndarray,
    method: str = "uniform",
    *,
    bits: tuple[float, ...] = BITS_OPTIONS,
    bins: int = 80,
    max_samples: int = 20_000,
    seed: int = 0,
    log_y: bool = True,
) -> go.Figure:
    """The static twin of the explorer: one figure, one frame per bit width, plotly's own slider.

    Each frame holds the quantized histogram (precomputed bar heights on the shared bins) and
    a title with that bit width's SQNR, MSE and size, so the page needs no kernel.

    Args:
        weights: float tensor or array, any shape.
        method: "uniform", "absmax", "absmean-ternary" or "sign".
        bits: the bit widths to offer, from ``BITS_OPTIONS``; the first is shown first.
        bins, max_samples, seed, log_y: as for ``bitwidth_explorer``.

    Returns:
        go.Figure with 2 bar traces (original, quantized), ``len(bits)`` frames named by bit
        width ("1", "1.58", ...) and a slider stepping through them.
    """
    w = _as_weight_tensor(weights)
    _check_method(method)
    bits = _check_bits_options(bits)
    bins = _check_positive_int(bins, "bins")
    indices = _sample_indices(w.numel(), _check_positive_int(max_samples, "max_samples"), seed)
    edges = _shared_edges(w, bins)
    reference_bytes = w.numel() * w.element_size()

    labels, heights, titles = [], [], []
    for b in bits:
        dequantized, info = quant.quantize_weight(w, method, b)
        labels.append(_bits_label(b))
        heights.append(histogram_fractions(_sample_values(dequantized, indices), edges))
        titles.append(metrics_title(info, reference_bytes))

    original = histogram_fractions(_sample_values(w, indices), edges)
    fig = _base_figure(edges, original, heights[0], titles[0], log_y)
    # Every frame names both traces: plotly.js hides the traces a frame leaves out (plotly.js#4596).
    fig.frames = [
        go.Frame(name=label, data=[go.Bar(visible=True), go.Bar(y=y)], traces=[0, 1], layout=dict(title_text=title))
        for label, y, title in zip(labels, heights, titles, strict=True)
    ]
    step_args = dict(mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0))
    fig.update_layout(
        sliders=[
            dict(
                active=0,
                currentvalue=dict(prefix="bits: "),
                pad=dict(t=45),
                steps=[dict(label=label, method="animate", args=[[label], step_args]) for label in labels],
            )
        ],
        height=480,
    )
    return fig
