"""Quantizers for weights and activations, and the metrics that judge them.

Everything here maps a float tensor ``x`` onto a small set of levels ``codes * scale`` and back:

- **uniform affine** (``quantize`` / ``dequantize`` / ``fake_quantize``): integer codes of 2 to
  16 bits, symmetric (``x ≈ q·s``) or asymmetric (``x ≈ (q - z)·s``), one scale per tensor, per
  channel or per group, rounded to nearest or stochastically;
- **binary** (``binarize_sign``): ``x ≈ sign(x)·mean|x|`` (XNOR-Net; ``centered=True``:
  ``sign(x - mean x)·mean|x|``, BitNet);
- **ternary** (``ternarize_absmean``, BitNet b1.58, and ``ternarize_twn``, Ternary Weight
  Networks): ``x ≈ t·s`` with ``t ∈ {-1, 0, +1}``;
- **activations** (``quantize_activations_absmax``): per-token absmax to k bits, as BitNet does;
- **metrics**: ``mse``, ``sqnr_db``, ``sparsity``, ``entropy_bits``, ``storage_bytes``;
- ``quantize_weight(w, method, bits)``: the one-stop helper the chapters and the widgets use.

Inputs may be float32, float16 or bfloat16 (float64 is accepted too), on any device. The
arithmetic is done in float32 whatever the input dtype, so that a bf16 weight and its fp32 copy
get the same codes; dequantized tensors come back in the input dtype. Codes are ``torch.int8``
for up to 8 bits and ``torch.int16`` above; scales are float32.

Integer grids. A symmetric b-bit grid uses the *restricted* range ``-Qp..Qp`` with
``Qp = 2^(b-1) - 1`` (so 0 is a level and the grid is mirror-symmetric; 2 bits gives the ternary
grid ``{-1, 0, 1}``). An asymmetric b-bit grid uses the full signed range ``-2^(b-1)..2^(b-1)-1``
(so 8-bit codes fit ``int8``) with an integer zero point, and its min/max range is widened to
include 0 so that 0 is exactly representable, as PyTorch's observers do.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "QuantizedTensor",
    "integer_range",
    "quantize",
    "dequantize",
    "fake_quantize",
    "binarize_sign",
    "ternarize_absmean",
    "ternarize_twn",
    "quantize_activations_absmax",
    "binarize_activations",
    "mse",
    "sqnr_db",
    "sparsity",
    "entropy_bits",
    "storage_bytes",
    "quantize_weight",
    "WEIGHT_METHODS",
    "WEIGHT_BITS",
    "TERNARY_BITS",
]

Granularity = Literal["tensor", "channel", "group"]
Rounding = Literal["nearest", "stochastic"]

GRANULARITIES = ("tensor", "channel", "group")
ROUNDINGS = ("nearest", "stochastic")
MIN_BITS, MAX_BITS = 2, 16
WEIGHT_METHODS = ("uniform", "absmax", "absmean-ternary", "sign")
WEIGHT_BITS = (1, 1.58, 2, 3, 4, 8, 16)
TERNARY_BITS = math.log2(3)  # information content of one trit: 1.585 bits

# A scale of exactly 0 (an all-zero block) would turn x / scale into 0/0 = NaN. Any positive
# scale maps zeros to code 0, so zero scales are lifted to the smallest normal float32.
_TINY = torch.finfo(torch.float32).tiny


# --------------------------------------------------------------------------- input checks


def _as_float32(x: object, name: str = "x") -> torch.Tensor:
    """Check that ``x`` is a non-empty, finite, floating-point tensor; return it as float32."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, float16 or bfloat16), "
            f"got dtype={x.dtype}"
        )
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    x32 = x.to(torch.float32)
    if not math.isfinite(float(x32.abs().amax())):  # amax propagates NaN; one cheap reduction
        n_nan = int(torch.isnan(x32).sum())
        n_inf = int(torch.isinf(x32).sum())
        raise ValueError(
            f"{name} must be finite, got {n_nan} NaN and {n_inf} inf value(s) "
            f"in a tensor of shape {tuple(x.shape)}"
        )
    return x32


def _check_bits(bits: object, name: str = "bits") -> int:
    """An integer bit width in [2, 16] (bools and floats are refused)."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"{name} must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"{name} must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    return int(bits)


def _check_choice(value: object, name: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    return float(eps)


def _code_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits <= 8 else torch.int16


def _channel_rows(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``x`` as [1, N] (per tensor) or [C, N/C] (per channel: one row per slice ``x[i]``)."""
    if not per_channel:
        return x.reshape(1, -1)
    if x.dim() == 0:
        raise ValueError("per_channel=True needs a tensor with at least 1 dim, got a 0-d tensor")
    return x.reshape(x.shape[0], -1)


def _row_stat_shape(x: torch.Tensor, per_channel: bool) -> tuple[int, ...]:
    """Shape of a per-row statistic: [] per tensor, [C, 1, ..., 1] (x.dim() dims) per channel."""
    return (x.shape[0],) + (1,) * (x.dim() - 1) if per_channel else ()


def _mean_abs(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """mean|x| over the whole tensor (shape []) or over all dims but dim 0 (shape [C, 1, ...])."""
    rows = _channel_rows(x, per_channel)
    return rows.abs().mean(dim=1).reshape(_row_stat_shape(x, per_channel))


# --------------------------------------------------------------------------- binary, ternary


def binarize_sign(
    w: torch.Tensor, *, per_channel: bool = False, centered: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-bit weights: ``w ≈ codes * scale`` with ``codes = sign(w)`` and ``scale = mean|w|``.

    mean|w| is the scale that minimises ``||w - s·sign(w)||²`` (XNOR-Net). Zero (and -0.0) maps
    to +1, so every weight gets one of two codes.

    ``centered=True`` is BitNet's form (Wang et al., 2023): ``codes = sign(w - mean(w))``, the
    sign taken after centring the weights on their mean (per tensor, or per row with
    ``per_channel``), so that the codes are balanced between -1 and +1; the scale stays
    ``mean|w|`` (the paper's β = ||W||₁ / nm). The book and ``BitLinear`` use the uncentred
    XNOR-Net form: for trained weights, whose mean is tiny next to mean|w|, the two give almost
    the same codes (chapter 2 measures how few differ), and the uncentred codes are exactly the
    signs the popcount kernels store.

    Args:
        w: float tensor, any shape (per_channel needs at least 1 dim; channels are dim 0).
        per_channel: one scale (and one mean, if centered) per slice ``w[i]`` instead of one for
            the whole tensor.
        centered: subtract the mean of ``w`` before taking the sign (BitNet).

    Returns:
        codes: int8, shape of ``w``, values in {-1, +1}.
        scale: float32, shape [] per tensor, or [C, 1, ..., 1] (``w.dim()`` dims) per channel.
    """
    x = _as_float32(w, "w")
    if not isinstance(centered, bool):
        raise TypeError(f"centered must be a bool, got {centered!r}")
    scale = _mean_abs(x, per_channel)
    if centered:
        mean = _channel_rows(x, per_channel).mean(dim=1).reshape(_row_stat_shape(x, per_channel))
        x = x - mean
    codes = torch.where(x >= 0, 1, -1).to(torch.int8)
    return codes, scale


def ternarize_absmean(
    w: torch.Tensor,
    *,
    per_channel: bool = False,
    eps: float = 1e-5,
    rounding: Rounding = "nearest",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58 weights: ``codes = round(clip(w / (γ + eps), -1, 1))``, ``γ = mean|w|``.

    ``w ≈ codes * γ``. Weights smaller than about γ/2 in magnitude become 0. ``eps`` only keeps
    an all-zero tensor from dividing by zero (its codes are all 0); the returned scale is γ
    itself, not γ + eps.

    ``rounding="stochastic"`` rounds ``v = clip(w / (γ + eps), -1, 1)`` up with probability equal
    to its fractional part, ``floor(v + u)`` with ``u ~ U[0, 1)``, so that ``E[codes] = v``: the
    unbiased ternary rounding used to study stochastic rounding in QAT (chapter 3).

    Args:
        w: float tensor, any shape (per_channel needs at least 1 dim; channels are dim 0).
        per_channel: one γ per slice ``w[i]`` (reduced over all dims but dim 0).
        eps: positive float added to γ in the division.
        rounding: "nearest" (ties to even) or "stochastic".
        generator: torch.Generator for stochastic rounding (on ``w``'s device); None uses a new
            one seeded with 0, so a call is reproducible either way.

    Returns:
        codes: int8, shape of ``w``, values in {-1, 0, +1}.
        scale: float32 γ, shape [] per tensor, or [C, 1, ..., 1] per channel.
    """
    x = _as_float32(w, "w")
    eps = _check_eps(eps)
    _check_choice(rounding, "rounding", ROUNDINGS)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if rounding == "stochastic" and generator is None:
        generator = torch.Generator(device=x.device).manual_seed(0)
    gamma = _mean_abs(x, per_channel)
    codes = _round(torch.clamp(x / (gamma + eps), -1.0, 1.0), rounding, generator).to(torch.int8)
    return codes, gamma


def ternarize_twn(w: torch.Tensor, *, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary Weight Networks (Li, Zhang & Liu, 2016, arXiv:1605.04711): threshold at ``Δ = 0.7·mean|w|``.

    ``codes = sign(w)·[|w| > Δ]`` and ``scale = mean(|w| over |w| > Δ)`` (0 where no weight
    passes), the closed-form approximation TWN derives for Gaussian-like weights.

    Args:
        w: float tensor, any shape (per_channel needs at least 1 dim; channels are dim 0).
        per_channel: one Δ and one scale per slice ``w[i]``.

    Returns:
        codes: int8, shape of ``w``, values in {-1, 0, +1}.
        scale: float32, shape [] per tensor, or [C, 1, ..., 1] per channel.
    """
    x = _as_float32(w, "w")
    delta = 0.7 * _mean_abs(x, per_channel)
    kept = x.abs() > delta
    codes = (torch.sign(x) * kept).to(torch.int8)
    kept_abs = _channel_rows(x.abs() * kept, per_channel)
    kept_count = _channel_rows(kept, per_channel).sum(dim=1)
    scale = torch.where(kept_count > 0, kept_abs.sum(dim=1) / kept_count.clamp_min(1), 0.0)
    scale = scale.reshape(_row_stat_shape(x, per_channel))
    return codes, scale.to(torch.float32)


# --------------------------------------------------------------------------- activations


def quantize_activations_absmax(
    x: torch.Tensor, bits: int = 8, *, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric absmax quantization (BitNet's activations).

    For every token (every slice along the last dim): ``scale = max(max|x|, eps) / Qp`` with
    ``Qp = 2^(bits-1) - 1`` and ``codes = clamp(round(x / scale), -Qp, Qp)``; ``x ≈ codes *
    scale``. (BitNet clips to ``-Qp-1..Qp``; we keep the grid symmetric.)

    Args:
        x: float tensor [..., d] with at least 1 dim.
        bits: int in [2, 16].
        eps: positive floor on max|x|, so an all-zero token gets codes 0, not NaN.

    Returns:
        codes: int8 (bits <= 8) or int16, shape of ``x``.
        scale: float32, shape [..., 1].
    """
    x32 = _as_float32(x, "x")
    bits = _check_bits(bits)
    eps = _check_eps(eps)
    if x32.dim() == 0:
        raise ValueError("x must have at least 1 dim (tokens along the last dim), got a 0-d tensor")
    qp = 2 ** (bits - 1) - 1
    scale = x32.abs().amax(dim=-1, keepdim=True).clamp_min(eps) / qp
    codes = torch.clamp(torch.round(x32 / scale), -qp, qp).to(_code_dtype(bits))
    return codes, scale


def binarize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token binary activations (XNOR-Net's input binarization, the W1A1 layers).

    For every token (slice along the last dim): ``codes = sign(x)`` with 0 -> +1 (the bit the
    popcount kernels store), ``scale = mean|x|`` (the least-squares scale of ±1 codes), so
    ``x ≈ codes * scale``.

    Args:
        x: float tensor [..., d] with at least 1 dim.

    Returns:
        codes: int8 in {-1, +1}, shape of ``x``.
        scale: float32, shape [..., 1].
    """
    x32 = _as_float32(x, "x")
    if x32.dim() == 0:
        raise ValueError("x must have at least 1 dim (tokens along the last dim), got a 0-d tensor")
    codes = torch.where(x32 >= 0, 1, -1).to(torch.int8)
    return codes, x32.abs().mean(dim=-1, keepdim=True)


# --------------------------------------------------------------------------- uniform affine


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Integer codes plus what ``dequantize`` needs to map them back: ``x ≈ (codes - zero_point) * scale``.

    Attributes:
        codes: int8 (bits <= 8) or int16, same shape as the input.
        scale: float32. Per tensor: shape []. Per channel: the input's number of dims, all 1
            except ``shape[axis]`` (broadcasts against the input). Per group: [C, G, 1] with
            C = ``shape[axis]`` and G groups per channel; it broadcasts against
            ``x.movedim(axis, 0).reshape(C, G, group_size)``.
        zero_point: int32, shape of ``scale``; all zeros when symmetric.
        bits, symmetric, granularity, axis, group_size: the settings used.
        shape, dtype: the input's shape and dtype (``dequantize`` returns that dtype).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    symmetric: bool
    granularity: str
    axis: int
    group_size: int | None
    shape: torch.Size
    dtype: torch.dtype


def integer_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the integer grid: ``±(2^(b-1)-1)`` symmetric, ``-2^(b-1)..2^(b-1)-1`` else."""
    bits = _check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _check_layout(
    x: torch.Tensor, granularity: str, axis: object, group_size: object
) -> tuple[int, int | None]:
    """Validate axis and group_size for ``granularity``; return them normalised."""
    _check_choice(granularity, "granularity", GRANULARITIES)
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {axis!r}")
    if granularity != "group" and group_size is not None:
        raise ValueError(
            f"group_size is only used with granularity='group', got group_size={group_size!r} "
            f"with granularity={granularity!r}"
        )
    if granularity == "tensor":
        return 0, None
    if x.dim() == 0:
        raise ValueError(f"granularity={granularity!r} needs a tensor with at least 1 dim, got a 0-d tensor")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis must be in [{-x.dim()}, {x.dim() - 1}] for shape {tuple(x.shape)}, got {axis}")
    axis = int(axis) % x.dim()
    if granularity == "channel":
        return axis, None
    if group_size is None:
        raise ValueError("group_size must be given when granularity='group', got group_size=None")
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    per_channel = x.numel() // x.shape[axis]
    if per_channel % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the {per_channel} elements of each channel "
            f"(shape {tuple(x.shape)}, axis={axis})"
        )
    return axis, int(group_size)


def _to_blocks(x: torch.Tensor, granularity: str, axis: int, group_size: int | None) -> torch.Tensor:
    """View ``x`` as [C, G, S]: one scale per row of S elements (C channels, G groups each)."""
    if granularity == "tensor":
        return x.reshape(1, 1, -1)
    moved = x.movedim(axis, 0)
    channels = moved.shape[0]
    return moved.reshape(channels, 1, -1) if granularity == "channel" else moved.reshape(channels, -1, group_size)


def _from_blocks(blocks: torch.Tensor, shape: torch.Size, granularity: str, axis: int) -> torch.Tensor:
    """Inverse of ``_to_blocks``."""
    if granularity == "tensor":
        return blocks.reshape(shape)
    moved_shape = (shape[axis],) + tuple(shape[:axis]) + tuple(shape[axis + 1 :])
    return blocks.reshape(moved_shape).movedim(0, axis)


def _public_scale(blocks_param: torch.Tensor, shape: torch.Size, granularity: str, axis: int) -> torch.Tensor:
    """Scale/zero point [C, G, 1] in the layout documented on ``QuantizedTensor``."""
    if granularity == "tensor":
        return blocks_param.reshape(())
    if granularity == "channel":
        return blocks_param.reshape([shape[d] if d == axis else 1 for d in range(len(shape))])
    return blocks_param


def _round(values: torch.Tensor, rounding: str, generator: torch.Generator) -> torch.Tensor:
    """Round to nearest (ties to even), or stochastically: floor(v + u), u ~ U[0, 1), unbiased."""
    if rounding == "nearest":
        return torch.round(values)
    noise = torch.rand(values.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return torch.floor(values + noise.to(values.device))


def quantize(
    x: torch.Tensor,
    bits: int,
    *,
    symmetric: bool = True,
    granularity: Granularity = "tensor",
    axis: int = 0,
    group_size: int | None = None,
    rounding: Rounding = "nearest",
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> QuantizedTensor:
    """Uniform affine quantization to ``bits``-bit integer codes.

    Symmetric: ``s = max|x| / Qp``, ``q = clamp(round(x / s), -Qp, Qp)``, ``x ≈ q·s``.
    Asymmetric: ``s = (max(x, 0) - min(x, 0)) / (2^b - 1)``, ``z = qmin - round(min(x, 0) / s)``,
    ``q = clamp(round(x / s) + z, qmin, qmax)``, ``x ≈ (q - z)·s``.
    Either way every element within the block's range is reconstructed within ``s/2``.

    The statistics (max|x| or min/max) are taken per block: the whole tensor (``"tensor"``),
    each slice along ``axis`` (``"channel"``; axis 0 is the output channel of a Linear weight
    [out, in]), or each run of ``group_size`` consecutive elements inside a channel
    (``"group"``; for a 2-D weight with axis 0, groups run along the input dim of each row).

    Args:
        x: float32/float16/bfloat16 tensor, any shape, any device; finite, non-empty.
        bits: int in [2, 16].
        symmetric: symmetric (no zero point) or asymmetric (min/max with zero point).
        granularity: "tensor", "channel" or "group".
        axis: the channel dim for "channel" and "group".
        group_size: elements per group (must divide the elements of each channel); only "group".
        rounding: "nearest" (ties to even) or "stochastic" (floor(v + u): unbiased for values
            inside the grid's span; an asymmetric grid's integer zero point can leave min or max
            up to s/2 outside the span, and those values are clamped to the end level).
        generator: torch.Generator for stochastic rounding (any device); if None, a new one
            seeded with ``seed`` is used, so the result is reproducible either way.
        seed: seed of that default generator.

    Returns:
        QuantizedTensor with int8/int16 codes of ``x.shape`` and float32 scales.
    """
    x32 = _as_float32(x, "x")
    bits = _check_bits(bits)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
    axis, group_size = _check_layout(x32, granularity, axis, group_size)
    _check_choice(rounding, "rounding", ROUNDINGS)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if rounding == "stochastic" and generator is None:
        generator = torch.Generator(device=x32.device).manual_seed(seed)

    qmin, qmax = integer_range(bits, symmetric)
    blocks = _to_blocks(x32, granularity, axis, group_size)
    if symmetric:
        scale = (blocks.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(_TINY)
        zero_point = torch.zeros_like(scale)
    else:
        low = blocks.amin(dim=-1, keepdim=True).clamp(max=0.0)
        high = blocks.amax(dim=-1, keepdim=True).clamp(min=0.0)
        scale = ((high - low) / (qmax - qmin)).clamp_min(_TINY)
        zero_point = torch.clamp(qmin - torch.round(low / scale), qmin, qmax)

    codes = torch.clamp(_round(blocks / scale, rounding, generator) + zero_point, qmin, qmax)
    return QuantizedTensor(
        codes=_from_blocks(codes, x32.shape, granularity, axis).to(_code_dtype(bits)),
        scale=_public_scale(scale, x32.shape, granularity, axis),
        zero_point=_public_scale(zero_point, x32.shape, granularity, axis).to(torch.int32),
        bits=bits,
        symmetric=symmetric,
        granularity=granularity,
        axis=axis,
        group_size=group_size,
        shape=x.shape,
        dtype=x.dtype,
    )


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """``(codes - zero_point) * scale``, computed in float32, returned in ``qt.dtype`` and ``qt.shape``."""
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    codes = _to_blocks(qt.codes.to(torch.float32), qt.granularity, qt.axis, qt.group_size)
    n_blocks = codes.shape[0]
    scale = qt.scale.reshape(n_blocks, -1, 1)
    zero_point = qt.zero_point.reshape(n_blocks, -1, 1).to(torch.float32)
    values = (codes - zero_point) * scale
    return _from_blocks(values, qt.shape, qt.granularity, qt.axis).to(qt.dtype)


def fake_quantize(x: torch.Tensor, bits: int, **kwargs) -> torch.Tensor:
    """``dequantize(quantize(x, bits, **kwargs))``: x rounded onto the grid, same shape and dtype."""
    return dequantize(quantize(x, bits, **kwargs))


# --------------------------------------------------------------------------- metrics


def _check_pair(reference: object, approx: object) -> None:
    for name, t in (("reference", reference), ("approx", approx)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be a real numeric tensor, got dtype={t.dtype}")
    if reference.shape != approx.shape:
        raise ValueError(
            f"reference and approx must have the same shape, got reference {tuple(reference.shape)} "
            f"and approx {tuple(approx.shape)}"
        )
    if reference.numel() == 0:
        raise ValueError(f"reference must not be empty, got shape {tuple(reference.shape)}")
    for name, t in (("reference", reference), ("approx", approx)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} must be finite, got {int((~torch.isfinite(t)).sum())} NaN/inf value(s)")


def _signal_noise(reference: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    """(Σ reference², Σ (reference - approx)²), accumulated in float64."""
    ref = reference.detach().to(torch.float64)
    err = ref - approx.detach().to(device=ref.device, dtype=torch.float64)
    return float(ref.square().sum()), float(err.square().sum())


def _sqnr_from(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def mse(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Mean squared error ``mean((reference - approx)²)`` of two same-shape tensors (float64 sum)."""
    _check_pair(reference, approx)
    return _signal_noise(reference, approx)[1] / reference.numel()


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σ reference² / Σ (reference - approx)²)`` in dB.

    Higher is better; each extra bit of a uniform grid adds about 6.02 dB. A perfect
    reconstruction (zero noise, including all-zero in and out) gives ``+inf``; noise on a zero
    signal gives ``-inf``. Never NaN.
    """
    _check_pair(reference, approx)
    return _sqnr_from(*_signal_noise(reference, approx))


def sparsity(codes: torch.Tensor) -> float:
    """Fraction of elements equal to 0 (codes, or dequantized values), in [0, 1]."""
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.numel() == 0:
        raise ValueError(f"codes must not be empty, got shape {tuple(codes.shape)}")
    return float((codes == 0).sum()) / codes.numel()


def entropy_bits(codes: torch.Tensor) -> float:
    """Empirical Shannon entropy ``-Σ p·log2 p`` of the distinct values of ``codes``, bits/element.

    A lower bound on the bits per weight any lossless entropy coder can reach on these codes:
    log2(3) = 1.585 for equiprobable trits, less when one code (0, say) dominates.
    """
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.numel() == 0:
        raise ValueError(f"codes must not be empty, got shape {tuple(codes.shape)}")
    flat = codes.detach().reshape(-1)
    if flat.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
        counts = torch.bincount(flat.to(torch.int32) - int(flat.min()))  # far faster than unique
        counts = counts[counts > 0]
    else:
        _, counts = torch.unique(flat, return_counts=True)
    p = counts.to(torch.float64) / flat.numel()
    return max(0.0, float(-(p * torch.log2(p)).sum()))


def storage_bytes(numel: int, bits_per_weight: float, *, n_scales: int = 1, scale_bytes: int = 4) -> int:
    """Bytes to store ``numel`` weights at ``bits_per_weight`` plus ``n_scales`` scales.

    ``ceil(numel·bits_per_weight / 8) + n_scales·scale_bytes`` (ideal packing, no padding).
    """
    if isinstance(numel, bool) or not isinstance(numel, numbers.Integral) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    if isinstance(bits_per_weight, bool) or not isinstance(bits_per_weight, numbers.Real) or not (
        0 < bits_per_weight < math.inf
    ):
        raise ValueError(f"bits_per_weight must be a positive finite number, got {bits_per_weight!r}")
    for name, value in (("n_scales", n_scales), ("scale_bytes", scale_bytes)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    # the 1e-9 keeps 1.58-bit products such as 12.000000000000002 from rounding up a byte
    return math.ceil(numel * bits_per_weight / 8 - 1e-9) + n_scales * scale_bytes


# --------------------------------------------------------------------------- one-stop helper


def _check_weight_choice(method: object, bits: object) -> float:
    _check_choice(method, "method", WEIGHT_METHODS)
    if isinstance(bits, bool) or not isinstance(bits, numbers.Real):
        raise TypeError(f"bits must be 1, 1.58 or an int in [2, 16], got {bits!r}")
    if bits in (1, 1.58) or (float(bits).is_integer() and MIN_BITS <= bits <= MAX_BITS):
        return float(bits)
    raise ValueError(f"bits must be 1, 1.58 or an int in [2, 16] (the explorer uses {WEIGHT_BITS}), got {bits!r}")


def quantize_weight(w: torch.Tensor, method: str, bits: float) -> tuple[torch.Tensor, dict]:
    """Quantize a weight tensor per tensor and report how well it went.

    ``method`` picks how the scale is chosen, ``bits`` how many bits each weight gets:

    ============== ============================ ======================= ===================
    bits           "uniform"                    "absmax"                "absmean-ternary",
                                                                        "sign"
    ============== ============================ ======================= ===================
    1              sign·mean|w|                 sign·mean|w|            sign·mean|w|
    1.58           ternary·mean|w| (BitNet)     ternary·mean|w|         ternary / sign
    2 .. 16 (int)  asymmetric min/max, 2^b lv.  symmetric absmax,       ternary / sign
                                                2^b - 1 levels
    ============== ============================ ======================= ===================

    Below 2 bits an integer grid has no room for zero and both signs, so 1 bit always means
    ``binarize_sign`` and 1.58 bits ``ternarize_absmean``. "absmean-ternary" and "sign" are
    fixed-width methods: with more bits they give the same ternary (1.58-bit) or binary (1-bit)
    result (except "absmean-ternary" at 1 bit, which is sign), and ``bits_per_weight`` reports
    the width actually used. Note that symmetric 2-bit absmax is also ternary, with max|w| as
    its scale: compare it with absmean at 1.58 bits.

    Args:
        w: float32/float16/bfloat16 tensor, any shape and device.
        method: "uniform", "absmax", "absmean-ternary" or "sign".
        bits: 1, 1.58 or an int in [2, 16] (the book uses 1, 1.58, 2, 3, 4, 8, 16).

    Returns:
        (dequantized tensor, same shape and dtype as ``w``; info dict) with info keys
        ``mse``, ``sqnr_db`` (vs ``w``), ``sparsity`` (fraction of weights that became exactly
        0), ``entropy_bits`` (of the codes), ``bits_per_weight`` (1, log2(3) or b),
        ``size_bytes`` (packed codes + float32 scale, + zero point if asymmetric),
        ``n_levels``, ``method``, ``bits`` and ``scheme`` (a short description).
    """
    x = _as_float32(w, "w")
    bits = _check_weight_choice(method, bits)
    if bits == 1 or method == "sign":
        codes, scale = binarize_sign(x)
        approx, bits_per_weight, n_levels, n_params = codes * scale, 1.0, 2, 1
        scheme = "sign · mean|w| (binary)"
    elif bits == 1.58 or method == "absmean-ternary":
        codes, scale = ternarize_absmean(x)
        approx, bits_per_weight, n_levels, n_params = codes * scale, TERNARY_BITS, 3, 1
        scheme = "round(clip(w / mean|w|, -1, 1)) · mean|w| (ternary, BitNet b1.58)"
    else:
        symmetric = method == "absmax"
        qt = quantize(x, int(bits), symmetric=symmetric)
        codes, approx = qt.codes, dequantize(qt)
        bits_per_weight = bits
        n_levels = 2 ** int(bits) - 1 if symmetric else 2 ** int(bits)
        n_params = 1 if symmetric else 2  # a scale, plus a zero point when asymmetric
        scheme = (
            f"symmetric {int(bits)}-bit absmax: round(w / s) · s, s = max|w| / {2 ** (int(bits) - 1) - 1}"
            if symmetric
            else f"asymmetric {int(bits)}-bit min/max: (q - z) · s, s = (max - min) / {2 ** int(bits) - 1}"
        )

    dequantized = approx.to(w.dtype)
    signal, noise = _signal_noise(x, dequantized)
    info = {
        "mse": noise / x.numel(),
        "sqnr_db": _sqnr_from(signal, noise),
        "sparsity": sparsity(dequantized),
        "entropy_bits": entropy_bits(codes),
        "bits_per_weight": float(bits_per_weight),
        "size_bytes": storage_bytes(x.numel(), bits_per_weight, n_scales=n_params),
        "n_levels": n_levels,
        "method": method,
        "bits": bits if bits == 1.58 else int(bits),
        "scheme": scheme,
    }
    return dequantized, info
