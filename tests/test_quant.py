"""Unit and property tests for labutils.quant."""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labutils import quant

# per test, not a global profile: other test modules keep their own settings
PROPERTY = settings(deadline=None, max_examples=60)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
LOW_PRECISION = [torch.float16, torch.bfloat16]


def finite_floats(max_abs: float = 1e3):
    return st.floats(-max_abs, max_abs, width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def float_tensors(min_dims: int = 1, max_dims: int = 3, max_side: int = 8, max_abs: float = 1e3):
    """Small float32 tensors with finite, normal (or zero) entries."""
    shapes = hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=max_side)
    return hnp.arrays(np.float32, shapes, elements=finite_floats(max_abs)).map(torch.from_numpy)


def gaussian(*shape: int, seed: int = 0, std: float = 0.02) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def rounding_tolerance(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Half a step, plus float32 slack for x / s and q * s."""
    return scale / 2 + 1e-6 * (x.abs().max() + scale)


# --------------------------------------------------------------------------- ternary, binary


def test_ternarize_absmean_worked_example():
    w = torch.tensor([[0.1, -0.5, 0.02, 1.0], [0.0, 0.0, 0.3, -0.3]])
    codes, scale = quant.ternarize_absmean(w)
    gamma = w.abs().mean()
    assert scale.shape == () and scale.dtype == torch.float32
    assert scale == pytest.approx(float(gamma))  # gamma itself, not gamma + eps
    expected = torch.round(torch.clamp(w / (gamma + 1e-5), -1, 1)).to(torch.int8)
    assert codes.dtype == torch.int8
    assert torch.equal(codes, expected)
    assert torch.equal(codes, torch.tensor([[0, -1, 0, 1], [0, 0, 1, -1]], dtype=torch.int8))


def test_ternarize_absmean_per_channel_matches_rows():
    w = gaussian(6, 10)
    codes, scale = quant.ternarize_absmean(w, per_channel=True)
    assert scale.shape == (6, 1)
    for row in range(6):
        row_codes, row_scale = quant.ternarize_absmean(w[row])
        assert torch.equal(codes[row], row_codes)
        assert scale[row, 0] == pytest.approx(float(row_scale), rel=1e-6)


@PROPERTY
@given(float_tensors())
def test_ternary_codes_are_trits(w):
    for per_channel in (False, True):
        for ternarize in (quant.ternarize_absmean, quant.ternarize_twn):
            codes, scale = ternarize(w, per_channel=per_channel)
            assert codes.dtype == torch.int8 and codes.shape == w.shape
            assert set(codes.unique().tolist()) <= {-1, 0, 1}
            assert torch.isfinite(scale).all() and (scale >= 0).all()


def test_ternarize_twn_worked_example():
    w = torch.tensor([1.0, -2.0, 0.1, -0.2, 0.5, 0.0])
    delta = 0.7 * w.abs().mean()  # 0.7 * 0.6333 = 0.4433
    codes, scale = quant.ternarize_twn(w)
    assert float(delta) == pytest.approx(0.44333, rel=1e-4)
    assert codes.tolist() == [1, -1, 0, 0, 1, 0]
    assert float(scale) == pytest.approx((1.0 + 2.0 + 0.5) / 3)


def test_ternarize_twn_per_channel_row_with_no_survivors_has_zero_scale():
    w = torch.tensor([[0.0, 0.0], [1.0, -3.0]])
    codes, scale = quant.ternarize_twn(w, per_channel=True)
    assert scale.shape == (2, 1)
    assert scale[0, 0] == 0 and scale[1, 0] == pytest.approx(3.0)  # row 1: Δ = 0.7·2 = 1.4, only -3 passes
    assert codes.tolist() == [[0, 0], [0, -1]]


def test_binarize_sign_maps_zero_to_plus_one():
    w = torch.tensor([-0.5, -0.0, 0.0, 0.25, 1.25])
    codes, scale = quant.binarize_sign(w)
    assert codes.dtype == torch.int8
    assert codes.tolist() == [-1, 1, 1, 1, 1]
    assert float(scale) == pytest.approx(0.4)


@PROPERTY
@given(float_tensors(min_dims=2))
def test_binarize_sign_scale_is_l2_optimal(w):
    """mean|w| minimises ||w - s·sign(w)||² over s (XNOR-Net)."""
    codes, scale = quant.binarize_sign(w, per_channel=True)
    assert scale.shape == (w.shape[0],) + (1,) * (w.dim() - 1)
    assert set(codes.unique().tolist()) <= {-1, 1}
    error = lambda s: ((w - codes * s) ** 2).sum()  # noqa: E731
    assert error(scale) <= error(scale * 1.01) * (1 + 1e-5) + 1e-12
    assert error(scale) <= error(scale * 0.99) * (1 + 1e-5) + 1e-12


def test_binarize_sign_centered_is_bitnets_sign_of_w_minus_mean():
    # mean = 0.5: the uncentred signs are all +1 but 0.1 and 0.2 fall below the mean.
    w = torch.tensor([[0.1, 0.2, 0.7, 1.0], [-1.0, -0.5, 0.5, 1.0]])
    codes, scale = quant.binarize_sign(w[0], centered=True)
    assert codes.tolist() == [-1, -1, 1, 1]
    assert quant.binarize_sign(w[0])[0].tolist() == [1, 1, 1, 1]
    assert float(scale) == pytest.approx(0.5)  # β = mean|w|, as in BitNet, not mean|w - mean|
    # Per channel, each row is centred on its own mean; row 1 has mean 0 and keeps its signs.
    codes_pc, scale_pc = quant.binarize_sign(w, per_channel=True, centered=True)
    assert codes_pc.tolist() == [[-1, -1, 1, 1], [-1, -1, 1, 1]]
    assert scale_pc.shape == (2, 1)
    assert torch.allclose(scale_pc[:, 0], w.abs().mean(dim=1))


def test_binarize_sign_centered_balances_the_codes_of_shifted_weights():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=gen) + 0.3  # a mean far from 0
    plain, _ = quant.binarize_sign(w)
    centered, _ = quant.binarize_sign(w, centered=True)
    assert float(plain.float().mean()) > 0.2  # mostly +1
    assert abs(float(centered.float().mean())) < 0.01  # balanced
    with pytest.raises(TypeError, match="centered must be a bool"):
        quant.binarize_sign(w, centered=1)


def test_ternarize_absmean_stochastic_rounding_is_unbiased_and_ternary():
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    gamma = w.abs().mean()
    draws = torch.stack([
        quant.ternarize_absmean(w, rounding="stochastic", generator=torch.Generator().manual_seed(s))[0].float()
        for s in range(200)
    ])
    assert set(draws.unique().tolist()) <= {-1.0, 0.0, 1.0}
    target = torch.clamp(w / (gamma + 1e-5), -1, 1)
    # E[codes] = clip(w / gamma): the mean over 200 draws is within a few standard errors everywhere
    assert float((draws.mean(0) - target).abs().max()) < 0.2
    assert abs(float((draws.mean(0) - target).mean())) < 0.002
    nearest, _ = quant.ternarize_absmean(w)
    assert torch.equal(nearest, quant.ternarize_absmean(w, rounding="nearest")[0])
    again = quant.ternarize_absmean(w, rounding="stochastic")[0]  # default generator: seeded, reproducible
    assert torch.equal(again, quant.ternarize_absmean(w, rounding="stochastic")[0])
    assert not torch.equal(again, nearest)
    with pytest.raises(ValueError, match="rounding must be one of"):
        quant.ternarize_absmean(w, rounding="up")


# --------------------------------------------------------------------------- activations


def test_activation_absmax_per_token():
    x = torch.tensor([[[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]], [[4.0, 3.0, -1.0], [0.1, 0.2, 0.3]]])
    codes, scale = quant.quantize_activations_absmax(x)
    assert codes.dtype == torch.int8 and scale.shape == (2, 2, 1)
    assert scale[0, 0, 0] == pytest.approx(2.0 / 127)
    assert codes[0, 0].tolist() == [64, -127, 32]  # 63.5 rounds to even: 64
    assert codes[0, 1].tolist() == [0, 0, 0]  # an all-zero token: no NaN
    assert torch.isfinite(scale).all()
    assert (codes.abs() <= 127).all()


@PROPERTY
@given(float_tensors(min_dims=1), st.integers(2, 16))
def test_activation_absmax_error_within_half_step(x, bits):
    codes, scale = quant.quantize_activations_absmax(x, bits)
    qp = 2 ** (bits - 1) - 1
    assert codes.dtype == (torch.int8 if bits <= 8 else torch.int16)
    assert (codes.abs() <= qp).all()
    assert ((x - codes.float() * scale).abs() <= rounding_tolerance(x, scale)).all()


def test_activation_absmax_fp16_and_bf16_match_float32_copy():
    for dtype in LOW_PRECISION:
        x = gaussian(4, 32, std=3.0).to(dtype)
        codes, scale = quant.quantize_activations_absmax(x, 8)
        ref_codes, ref_scale = quant.quantize_activations_absmax(x.float(), 8)
        assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
        assert scale.dtype == torch.float32


def test_binarize_activations_per_token():
    x = torch.tensor([[[1.0, -2.0, 0.0], [-0.0, -3.0, 3.0]]])
    codes, scale = quant.binarize_activations(x)
    assert codes.dtype == torch.int8 and scale.shape == (1, 2, 1) and scale.dtype == torch.float32
    assert codes[0].tolist() == [[1, -1, 1], [1, -1, 1]]  # 0 and -0 map to +1, like the popcount bits
    torch.testing.assert_close(scale[0, :, 0], torch.tensor([1.0, 2.0]))


@PROPERTY
@given(float_tensors(min_dims=1))
def test_binarize_activations_scale_is_least_squares(x):
    codes, scale = quant.binarize_activations(x)
    assert set(codes.unique().tolist()) <= {-1, 1}
    # d/ds |x - s·c|² = 0 at s = <x, c> / <c, c> = mean|x| for c = sign(x)
    torch.testing.assert_close(scale, (x.float() * codes).mean(-1, keepdim=True), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="1 dim"):
        quant.binarize_activations(torch.tensor(1.0))


# --------------------------------------------------------------------------- uniform quantize


def test_integer_range():
    assert quant.integer_range(2, True) == (-1, 1)
    assert quant.integer_range(8, True) == (-127, 127)
    assert quant.integer_range(8, False) == (-128, 127)
    assert quant.integer_range(16, False) == (-32768, 32767)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 9, 16])
def test_codes_dtype_and_range(bits, symmetric):
    x = gaussian(16, 24)
    qt = quant.quantize(x, bits, symmetric=symmetric)
    qmin, qmax = quant.integer_range(bits, symmetric)
    assert qt.codes.dtype == (torch.int8 if bits <= 8 else torch.int16)
    assert int(qt.codes.min()) >= qmin and int(qt.codes.max()) <= qmax
    assert qt.scale.dtype == torch.float32 and qt.scale.shape == ()
    assert qt.zero_point.dtype == torch.int32
    assert qt.shape == x.shape and qt.dtype == x.dtype
    if symmetric:
        assert int(qt.zero_point) == 0
        assert float(qt.scale) == pytest.approx(float(x.abs().max()) / qmax)
    else:
        # the full range is used: min and max land on the end codes
        assert int(qt.codes.min()) == qmin and int(qt.codes.max()) == qmax


def test_symmetric_worked_example():
    x = torch.tensor([-1.0, -0.3, 0.0, 0.2, 0.5])
    qt = quant.quantize(x, 3)  # Qp = 3, s = 1/3
    assert qt.codes.tolist() == [-3, -1, 0, 1, 2]  # 0.6 -> 1, 1.5 -> 2 (ties to even)
    assert torch.allclose(quant.dequantize(qt), torch.tensor([-1.0, -1 / 3, 0.0, 1 / 3, 2 / 3]))


def test_asymmetric_worked_example():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    qt = quant.quantize(x, 2, symmetric=False)  # s = 3 / 3 = 1, z = -2 - round(-1) = -1
    assert float(qt.scale) == pytest.approx(1.0)
    assert int(qt.zero_point) == -1
    assert qt.codes.tolist() == [-2, -1, 0, 1]
    assert torch.equal(quant.dequantize(qt), x)


def test_asymmetric_range_includes_zero():
    x = torch.tensor([2.0, 3.0, 4.0])  # min > 0: the grid still holds 0 exactly
    qt = quant.quantize(x, 4, symmetric=False)
    assert float(qt.scale) == pytest.approx(4.0 / 15)
    assert int(qt.zero_point) == -8
    assert float(quant.dequantize(quant.quantize(torch.tensor([0.0, 4.0]), 4, symmetric=False))[0]) == 0.0


@PROPERTY
@given(float_tensors(), st.integers(2, 16), st.booleans())
def test_rtn_error_at_most_half_a_step(x, bits, symmetric):
    qt = quant.quantize(x, bits, symmetric=symmetric)
    error = (x - quant.dequantize(qt)).abs()
    assert (error <= rounding_tolerance(x, qt.scale)).all()


@st.composite
def nested_bit_pairs(draw):
    """(b, b') with b' > b and (b - 1) | (b' - 1): the b'-bit symmetric grid contains the b-bit grid."""
    low = draw(st.integers(2, 8))
    factor = draw(st.integers(2, 15 // (low - 1)))
    return low, (low - 1) * factor + 1


@PROPERTY
@given(float_tensors(), nested_bit_pairs())
def test_more_bits_never_increase_error_on_nested_grids(x, bits_pair):
    """Symmetric per-tensor RTN: levels k·max|x|/(2^(b-1)-1). When 2^(b-1)-1 divides
    2^(b'-1)-1 (e.g. 2 -> anything, 3 -> 5, 4 -> 7) the finer grid holds every coarser level,
    so no element's error can grow. Below max|x| = Qp * tiny the scale is floored at float32's
    smallest normal (``quant`` keeps scales normal), the grids stop being nested, and an error
    may grow by up to half that floor: hypothesis found x = [2e-38] at 2 vs 13 bits."""
    low, high = bits_pair
    error_low = (x - quant.fake_quantize(x, low)).abs()
    error_high = (x - quant.fake_quantize(x, high)).abs()
    floor = torch.finfo(torch.float32).tiny
    assert (error_high <= error_low + 1e-6 * x.abs().max() + floor / 2).all()


def test_a_scale_floored_at_the_smallest_normal_costs_at_most_half_of_it():
    x = torch.tensor([2e-38])  # max|x| / 4095 would be subnormal: the 13-bit scale is floored
    assert quant.quantize(x, 13).scale == torch.finfo(torch.float32).tiny
    assert (x - quant.fake_quantize(x, 2)).abs() == 0  # at 2 bits the scale is x itself
    assert 0 < (x - quant.fake_quantize(x, 13)).abs() <= torch.finfo(torch.float32).tiny / 2


@PROPERTY
@given(float_tensors(), st.integers(2, 15))
def test_error_bound_shrinks_with_every_extra_bit(x, bits):
    """The worst-case error s/2 = max|x| / (2·(2^(b-1) - 1)) falls with each bit, on any tensor."""
    coarse, fine = quant.quantize(x, bits), quant.quantize(x, bits + 1)
    assert float(fine.scale) <= float(coarse.scale)
    assert float((x - quant.dequantize(fine)).abs().max()) <= float(coarse.scale) / 2 * (1 + 1e-5) + 1e-30


def test_more_bits_can_increase_error_when_grids_are_not_nested():
    """Why the property above needs nested grids: 1/3 is a 3-bit level but no 4-bit level."""
    x = torch.tensor([1.0, 1.0 / 3])
    assert quant.mse(x, quant.fake_quantize(x, 3)) < 1e-12
    assert quant.mse(x, quant.fake_quantize(x, 4)) > 1e-3


def test_mse_falls_with_bits_on_gaussian_weights():
    w = gaussian(64, 256)
    errors = [quant.mse(w, quant.fake_quantize(w, b)) for b in range(2, 17)]
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_per_channel_equals_per_tensor_on_each_slice():
    x = gaussian(5, 7, 3)
    for axis in (0, 1, -1):
        qt = quant.quantize(x, 4, symmetric=False, granularity="channel", axis=axis)
        expected_shape = [1, 1, 1]
        expected_shape[axis] = x.shape[axis]
        assert list(qt.scale.shape) == expected_shape
        deq = quant.dequantize(qt)
        for i in range(x.shape[axis]):
            slice_ = x.select(axis, i)
            assert torch.equal(deq.select(axis, i), quant.fake_quantize(slice_, 4, symmetric=False))


@st.composite
def grouped_tensors(draw):
    channels, groups, group_size = draw(st.integers(1, 5)), draw(st.integers(1, 4)), draw(st.integers(1, 8))
    values = draw(hnp.arrays(np.float32, (channels, groups * group_size), elements=finite_floats()))
    return torch.from_numpy(values), group_size


@PROPERTY
@given(grouped_tensors(), st.integers(2, 16), st.booleans())
def test_per_group_equals_per_tensor_on_each_group(x_and_group, bits, symmetric):
    x, group_size = x_and_group
    qt = quant.quantize(x, bits, symmetric=symmetric, granularity="group", group_size=group_size)
    n_groups = x.shape[1] // group_size
    assert qt.scale.shape == (x.shape[0], n_groups, 1)
    deq = quant.dequantize(qt)
    grouped = x.reshape(x.shape[0], n_groups, group_size)
    error = (grouped - deq.reshape(grouped.shape)).abs()
    assert (error <= rounding_tolerance(x, qt.scale)).all()
    row, group = x.shape[0] - 1, n_groups - 1
    chunk = slice(group * group_size, (group + 1) * group_size)
    assert torch.equal(deq[row, chunk], quant.fake_quantize(x[row, chunk], bits, symmetric=symmetric))


def test_group_of_whole_channel_equals_per_channel():
    x = gaussian(4, 12)
    by_group = quant.fake_quantize(x, 3, granularity="group", group_size=12)
    by_channel = quant.fake_quantize(x, 3, granularity="channel")
    assert torch.equal(by_group, by_channel)


def test_group_along_axis_1_of_3d_tensor_roundtrips_shape():
    x = gaussian(2, 6, 4)
    qt = quant.quantize(x, 8, granularity="group", axis=1, group_size=4)
    assert qt.codes.shape == x.shape and qt.scale.shape == (6, 2, 1)
    assert quant.dequantize(qt).shape == x.shape
    assert quant.mse(x, quant.dequantize(qt)) < 1e-8


# --------------------------------------------------------------------------- stochastic rounding


def test_stochastic_rounding_is_reproducible_with_a_seed():
    x = gaussian(32, 32)
    run = lambda seed: quant.quantize(x, 3, rounding="stochastic", generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(7).codes, run(7).codes)
    assert not torch.equal(run(7).codes, run(8).codes)
    assert torch.equal(
        quant.quantize(x, 3, rounding="stochastic").codes, quant.quantize(x, 3, rounding="stochastic", seed=0).codes
    )


@settings(deadline=None, max_examples=15)
@given(hnp.arrays(np.float32, 64, elements=finite_floats(1.0)), st.integers(2, 6), st.booleans(), st.integers(0, 2**31))
def test_stochastic_rounding_is_unbiased(values, bits, symmetric, seed):
    x = torch.from_numpy(values)
    draws = 4000
    # repeating x keeps min/max (so the scale) unchanged; each row is an independent draw
    repeated = x.expand(draws, -1).contiguous()
    qt = quant.quantize(repeated, bits, symmetric=symmetric, rounding="stochastic", seed=seed)
    deq = quant.dequantize(qt)
    scale = float(qt.scale)
    # each draw lands on one of the two levels around x
    assert ((deq - repeated).abs() <= scale * (1 + 1e-5) + 1e-6).all()
    # The mean converges on x: per-draw std <= s/2, so 6 sigma of the mean is 3 s / sqrt(draws).
    # Only inside the grid's span: an asymmetric grid's integer zero point can leave min or max
    # up to s/2 outside it, where every draw is clamped to the end level.
    qmin, qmax = quant.integer_range(bits, symmetric)
    zero_point = int(qt.zero_point)
    inside = (x >= (qmin - zero_point) * scale) & (x <= (qmax - zero_point) * scale)
    assert ((deq.mean(dim=0) - x).abs()[inside] <= 3 * scale / math.sqrt(draws) + 1e-6).all()


def test_nearest_rounding_is_biased_where_stochastic_is_not():
    x = torch.full((20_000,), 0.3)
    x[0] = 1.0  # the scale: s = 1/3 at 3 bits, so 0.3 sits 0.9 of a step above 0
    nearest = quant.fake_quantize(x, 3)[1:].mean()
    stochastic = quant.fake_quantize(x, 3, rounding="stochastic")[1:].mean()
    assert float(nearest) == pytest.approx(1 / 3)
    assert float(stochastic) == pytest.approx(0.3, abs=0.01)


# --------------------------------------------------------------------------- dtypes, zeros, devices


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_inputs_are_quantized_in_float32(dtype):
    x = gaussian(8, 64).to(dtype)
    for kwargs in (dict(), dict(symmetric=False, granularity="group", group_size=16)):
        qt = quant.quantize(x, 4, **kwargs)
        reference = quant.quantize(x.float(), 4, **kwargs)
        assert torch.equal(qt.codes, reference.codes) and torch.equal(qt.scale, reference.scale)
        assert qt.scale.dtype == torch.float32
        deq = quant.dequantize(qt)
        assert deq.dtype == dtype and deq.shape == x.shape
        assert torch.equal(deq, quant.dequantize(reference).to(dtype))
    for quantizer in (quant.ternarize_absmean, quant.ternarize_twn, quant.binarize_sign):
        codes, scale = quantizer(x)
        ref_codes, ref_scale = quantizer(x.float())
        assert torch.equal(codes, ref_codes) and scale.dtype == torch.float32
        assert float(scale) == pytest.approx(float(ref_scale), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
def test_all_zero_tensor_quantizes_to_zeros(dtype):
    x = torch.zeros(4, 8, dtype=dtype)
    for kwargs in (
        dict(),
        dict(symmetric=False),
        dict(granularity="channel"),
        dict(symmetric=False, granularity="group", group_size=4),
        dict(rounding="stochastic"),
    ):
        qt = quant.quantize(x, 4, **kwargs)
        assert torch.isfinite(qt.scale).all()
        deq = quant.dequantize(qt)
        assert deq.dtype == dtype and torch.equal(deq, x)
    for quantizer in (quant.ternarize_absmean, quant.ternarize_twn):
        codes, scale = quantizer(x, per_channel=True)
        assert torch.equal(codes, torch.zeros_like(codes)) and torch.equal(scale, torch.zeros_like(scale))
    codes, scale = quant.binarize_sign(x)
    assert torch.equal(codes * scale, torch.zeros(4, 8)) and float(scale) == 0
    codes, scale = quant.quantize_activations_absmax(x)
    assert torch.equal(codes, torch.zeros_like(codes)) and torch.isfinite(scale).all()
    for method in quant.WEIGHT_METHODS:
        for bits in quant.WEIGHT_BITS:
            deq, info = quant.quantize_weight(x, method, bits)
            assert torch.equal(deq, x)
            assert info["mse"] == 0 and info["sqnr_db"] == math.inf and info["sparsity"] == 1.0
            assert not any(isinstance(v, float) and math.isnan(v) for v in info.values())


@CUDA
def test_cuda_matches_cpu():
    x = gaussian(64, 128)
    gpu = x.cuda()
    for kwargs in (dict(), dict(symmetric=False, granularity="group", group_size=32), dict(granularity="channel")):
        qt = quant.quantize(gpu, 4, **kwargs)
        assert qt.codes.is_cuda and qt.scale.is_cuda
        assert torch.equal(qt.codes.cpu(), quant.quantize(x, 4, **kwargs).codes)
    for dtype in LOW_PRECISION:
        deq = quant.fake_quantize(gpu.to(dtype), 8)
        assert deq.is_cuda and deq.dtype == dtype
    codes, _ = quant.ternarize_absmean(gpu, per_channel=True)
    assert torch.equal(codes.cpu(), quant.ternarize_absmean(x, per_channel=True)[0])
    # stochastic rounding with a CPU generator on a GPU tensor: same draws as on the CPU
    cpu_sr = quant.quantize(x, 3, rounding="stochastic", generator=torch.Generator().manual_seed(1))
    gpu_sr = quant.quantize(gpu, 3, rounding="stochastic", generator=torch.Generator().manual_seed(1))
    assert torch.equal(gpu_sr.codes.cpu(), cpu_sr.codes)
    cuda_gen = torch.Generator(device="cuda").manual_seed(1)
    assert quant.quantize(gpu, 3, rounding="stochastic", generator=cuda_gen).codes.is_cuda
    deq, info = quant.quantize_weight(gpu.to(torch.bfloat16), "absmean-ternary", 1.58)
    assert deq.is_cuda and deq.dtype == torch.bfloat16 and info["sqnr_db"] > 0


# --------------------------------------------------------------------------- metrics


def test_metrics_worked_examples():
    ref = torch.tensor([1.0, 1.0, 0.0, 0.0])
    approx = torch.tensor([1.0, 0.9, 0.0, 0.1])
    assert quant.mse(ref, approx) == pytest.approx(0.02 / 4)
    assert quant.sqnr_db(ref, approx) == pytest.approx(10 * math.log10(2 / 0.02))
    assert quant.sqnr_db(ref, ref) == math.inf
    assert quant.sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf
    assert quant.sparsity(torch.tensor([0, 1, 0, -1], dtype=torch.int8)) == 0.5
    assert quant.entropy_bits(torch.tensor([0, 0, 1, 1], dtype=torch.int8)) == pytest.approx(1.0)
    assert quant.entropy_bits(torch.tensor([-1, 0, 1], dtype=torch.int8)) == pytest.approx(math.log2(3))
    assert quant.entropy_bits(torch.ones(10, dtype=torch.int16)) == 0.0
    assert quant.entropy_bits(torch.tensor([0.5, 0.5, -0.5, 2.0])) == pytest.approx(1.5)


def test_sqnr_gains_six_db_per_bit():
    """The 6.02 dB/bit rule of uniform quantization (high-resolution regime)."""
    w = gaussian(128, 512)
    gain = quant.sqnr_db(w, quant.fake_quantize(w, 16)) - quant.sqnr_db(w, quant.fake_quantize(w, 8))
    assert gain == pytest.approx(8 * 20 * math.log10(2), abs=0.3)


@PROPERTY
@given(hnp.arrays(np.int8, st.integers(1, 200), elements=st.integers(-8, 7)))
def test_entropy_of_integer_codes_matches_unique_counts(codes):
    _, counts = np.unique(codes, return_counts=True)
    p = counts / codes.size
    expected = float(-(p * np.log2(p)).sum())
    assert quant.entropy_bits(torch.from_numpy(codes)) == pytest.approx(expected, abs=1e-12)
    assert quant.entropy_bits(torch.from_numpy(codes).float()) == pytest.approx(expected, abs=1e-12)


def test_storage_bytes():
    assert quant.storage_bytes(1000, 1.58) == 198 + 4  # ceil(197.5) + one float32 scale
    assert quant.storage_bytes(384 * 1536, 1) == 73_728 + 4
    assert quant.storage_bytes(10, 8, n_scales=2) == 18
    assert quant.storage_bytes(8, 1.5, n_scales=0) == 2
    assert quant.storage_bytes(100, 4, n_scales=10, scale_bytes=2) == 70


# --------------------------------------------------------------------------- quantize_weight


def test_quantize_weight_dispatch_table():
    w = gaussian(32, 48)
    sign_codes, sign_scale = quant.binarize_sign(w)
    trit_codes, trit_scale = quant.ternarize_absmean(w)
    for method in quant.WEIGHT_METHODS:
        assert torch.equal(quant.quantize_weight(w, method, 1)[0], sign_codes * sign_scale)
    for method in ("uniform", "absmax", "absmean-ternary"):
        assert torch.equal(quant.quantize_weight(w, method, 1.58)[0], trit_codes * trit_scale)
    for bits in (2, 3, 4, 8, 16):
        assert torch.equal(quant.quantize_weight(w, "uniform", bits)[0], quant.fake_quantize(w, bits, symmetric=False))
        assert torch.equal(quant.quantize_weight(w, "absmax", bits)[0], quant.fake_quantize(w, bits))
        assert torch.equal(quant.quantize_weight(w, "absmean-ternary", bits)[0], trit_codes * trit_scale)
        assert torch.equal(quant.quantize_weight(w, "sign", bits)[0], sign_codes * sign_scale)


def test_quantize_weight_info():
    w = gaussian(40, 50)
    deq, info = quant.quantize_weight(w, "uniform", 4)
    assert set(info) >= {"mse", "sqnr_db", "sparsity", "entropy_bits", "bits_per_weight", "size_bytes"}
    assert info["mse"] == pytest.approx(quant.mse(w, deq), rel=1e-12)
    assert info["sqnr_db"] == pytest.approx(quant.sqnr_db(w, deq), rel=1e-12)
    assert info["sparsity"] == quant.sparsity(deq)
    assert info["entropy_bits"] == pytest.approx(quant.entropy_bits(quant.quantize(w, 4, symmetric=False).codes))
    assert info["bits_per_weight"] == 4 and info["n_levels"] == 16
    assert info["size_bytes"] == 2000 * 4 // 8 + 2 * 4  # codes + scale + zero point
    _, ternary = quant.quantize_weight(w, "absmean-ternary", 1.58)
    assert ternary["bits_per_weight"] == pytest.approx(math.log2(3))
    assert ternary["size_bytes"] == math.ceil(2000 * math.log2(3) / 8) + 4
    assert 0 < ternary["sparsity"] < 1 and ternary["entropy_bits"] <= math.log2(3)
    _, binary = quant.quantize_weight(w, "sign", 8)
    assert binary["bits_per_weight"] == 1 and binary["size_bytes"] == 250 + 4 and binary["sparsity"] == 0


def test_quantize_weight_sqnr_rises_with_bits():
    w = gaussian(64, 128)
    for method in ("uniform", "absmax"):
        sqnrs = [quant.quantize_weight(w, method, b)[1]["sqnr_db"] for b in (3, 4, 8, 16)]
        assert all(a < b for a, b in zip(sqnrs, sqnrs[1:]))
    # absmean beats absmax at three levels: BitNet's reason for mean|W|
    assert quant.quantize_weight(w, "absmean-ternary", 1.58)[1]["mse"] < quant.quantize_weight(w, "absmax", 2)[1]["mse"]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_quantize_weight_returns_input_dtype(dtype):
    w = gaussian(16, 16).to(dtype)
    for method in quant.WEIGHT_METHODS:
        deq, info = quant.quantize_weight(w, method, 4)
        assert deq.dtype == dtype and deq.shape == w.shape
        assert math.isfinite(info["sqnr_db"])


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: quant.quantize(torch.arange(4), 4), TypeError, r"x must be a floating-point tensor .*dtype=torch.int64"),
        (lambda: quant.quantize([1.0, 2.0], 4), TypeError, r"x must be a torch.Tensor, got list"),
        (lambda: quant.quantize(torch.tensor([1.0, math.nan]), 4), ValueError, r"x must be finite, got 1 NaN and 0 inf"),
        (lambda: quant.quantize(torch.tensor([math.inf, 1.0]), 4), ValueError, r"x must be finite, got 0 NaN and 1 inf"),
        (lambda: quant.quantize(torch.zeros(0), 4), ValueError, r"x must not be empty"),
        (lambda: quant.quantize(torch.ones(4), 1), ValueError, r"bits must be in \[2, 16\], got 1"),
        (lambda: quant.quantize(torch.ones(4), 17), ValueError, r"bits must be in \[2, 16\], got 17"),
        (lambda: quant.quantize(torch.ones(4), 4.5), TypeError, r"bits must be an int .*got 4.5"),
        (lambda: quant.quantize(torch.ones(4), True), TypeError, r"bits must be an int .*got True"),
        (lambda: quant.quantize(torch.ones(3, 12), 4, granularity="group", group_size=5), ValueError,
         r"group_size=5 does not divide the 12 elements"),
        (lambda: quant.quantize(torch.ones(3, 12), 4, granularity="group"), ValueError, r"group_size must be given"),
        (lambda: quant.quantize(torch.ones(3, 12), 4, granularity="group", group_size=0), ValueError,
         r"group_size must be a positive int, got 0"),
        (lambda: quant.quantize(torch.ones(3, 12), 4, group_size=4), ValueError, r"group_size is only used with"),
        (lambda: quant.quantize(torch.ones(3, 12), 4, granularity="row"), ValueError, r"granularity must be one of .*'row'"),
        (lambda: quant.quantize(torch.ones(3, 12), 4, granularity="channel", axis=2), ValueError, r"axis must be in \[-2, 1\].*got 2"),
        (lambda: quant.quantize(torch.ones(3), 4, rounding="up"), ValueError, r"rounding must be one of .*'up'"),
        (lambda: quant.quantize(torch.ones(3), 4, symmetric=1), TypeError, r"symmetric must be a bool, got 1"),
        (lambda: quant.quantize(torch.ones(3), 4, rounding="stochastic", generator=3), TypeError, r"generator must be"),
        (lambda: quant.dequantize(torch.ones(3)), TypeError, r"qt must be a QuantizedTensor, got Tensor"),
        (lambda: quant.ternarize_absmean(torch.ones(3, dtype=torch.int8)), TypeError, r"w must be a floating-point .*int8"),
        (lambda: quant.ternarize_absmean(torch.tensor([math.nan])), ValueError, r"w must be finite"),
        (lambda: quant.ternarize_absmean(torch.ones(3), eps=0), ValueError, r"eps must be a positive number, got 0"),
        (lambda: quant.ternarize_twn(torch.tensor(1.0), per_channel=True), ValueError, r"per_channel=True needs"),
        (lambda: quant.binarize_sign(torch.tensor([1, 2])), TypeError, r"w must be a floating-point"),
        (lambda: quant.quantize_activations_absmax(torch.ones(2, 3), 1), ValueError, r"bits must be in \[2, 16\], got 1"),
        (lambda: quant.quantize_activations_absmax(torch.tensor(1.0)), ValueError, r"x must have at least 1 dim"),
        (lambda: quant.quantize_activations_absmax(torch.tensor([math.inf])), ValueError, r"x must be finite"),
        (lambda: quant.mse(torch.ones(3), torch.ones(4)), ValueError, r"same shape, got reference \(3,\) and approx \(4,\)"),
        (lambda: quant.sqnr_db(torch.ones(3), torch.tensor([1.0, math.nan, 1.0])), ValueError, r"approx must be finite"),
        (lambda: quant.mse(torch.ones(3), [1, 1, 1]), TypeError, r"approx must be a torch.Tensor"),
        (lambda: quant.sparsity([0, 1]), TypeError, r"codes must be a torch.Tensor"),
        (lambda: quant.entropy_bits(torch.zeros(0)), ValueError, r"codes must not be empty"),
        (lambda: quant.storage_bytes(-1, 4), ValueError, r"numel must be a non-negative int, got -1"),
        (lambda: quant.storage_bytes(10, 0), ValueError, r"bits_per_weight must be a positive finite number, got 0"),
        (lambda: quant.storage_bytes(10, 4, n_scales=-2), ValueError, r"n_scales must be a non-negative int, got -2"),
        (lambda: quant.quantize_weight(torch.ones(3), "round", 4), ValueError, r"method must be one of .*'round'"),
        (lambda: quant.quantize_weight(torch.ones(3), "uniform", 5.5), ValueError, r"bits must be 1, 1.58 or an int .*got 5.5"),
        (lambda: quant.quantize_weight(torch.ones(3), "uniform", 32), ValueError, r"bits must be 1, 1.58 .*got 32"),
        (lambda: quant.quantize_weight(torch.ones(3), "uniform", "4"), TypeError, r"bits must be 1, 1.58 .*got '4'"),
        (lambda: quant.quantize_weight(torch.arange(3), "sign", 1), TypeError, r"w must be a floating-point"),
        (lambda: quant.quantize_weight(torch.tensor([1.0, -math.inf]), "sign", 1), ValueError, r"w must be finite"),
    ],
)
def test_bad_input_names_the_argument_and_value(call, error, message):
    with pytest.raises(error, match=message):
        call()
