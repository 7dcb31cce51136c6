"""labutils.engine.ops: each compiled primitive against the torch (or labutils) function it
replaces: exact where the math is integer, float32 rounding elsewhere."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numba import njit

from labutils import quant
from labutils import kernels as K
from labutils.engine import ops
from labutils.kernels.dispatch import kernel_for
from labutils.lm.model import apply_rope, attend, rope_tables


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def test_rmsnorm_equals_torch():
    x, gain = rand(5, 96), rand(96, seed=1)
    out = np.zeros_like(x)
    ops.rmsnorm(x, 4, gain, np.float32(1e-5), out)  # rows 0..3 only
    norm = torch.nn.RMSNorm(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(gain))
        expected = norm(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out[:4], expected[:4], rtol=2e-6, atol=2e-6)
    assert not out[4].any()
    inplace = x.copy()
    ops.rmsnorm(inplace, 5, gain, np.float32(1e-5), inplace)
    np.testing.assert_allclose(inplace, expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_absmax_is_bit_exact_with_quant(bits):
    x = rand(6, 70, scale=3.0)
    x[2] = 0.0  # an all-zero token: scale eps / Qp, codes 0
    x[3, 5] = 1e-3  # a token below eps
    codes, scales, rowsum = np.full((6, 80), 99, np.int8), np.zeros(6, np.float32), np.zeros(6, np.int32)
    ops.quantize_absmax(x, 6, np.float32(2 ** (bits - 1) - 1), np.float32(1e-5), codes, scales, rowsum)
    expected, scale = quant.quantize_activations_absmax(torch.from_numpy(x), bits, eps=1e-5)
    assert np.array_equal(codes[:, :70], expected.numpy()) and not codes[:, 70:].any()
    assert np.array_equal(scales, scale.numpy().reshape(-1))
    assert np.array_equal(rowsum, expected.numpy().astype(np.int64).sum(1))


def test_quantize_absmax_propagates_nan_to_the_scale():
    x = rand(2, 32)
    x[1, 3] = np.nan
    codes, scales, rowsum = np.zeros((2, 32), np.int8), np.zeros(2, np.float32), np.zeros(2, np.int32)
    ops.quantize_absmax(x, 2, np.float32(127), np.float32(1e-5), codes, scales, rowsum)
    assert np.isfinite(scales[0]) and np.isnan(scales[1])


@pytest.mark.parametrize("path", K.available_paths())
@pytest.mark.parametrize("m", [1, 5])
def test_ternary_matmul_is_exact_on_every_path(path, m):
    """The kernel's dots equal an integer matmul; the rescale is PackedBitLinear's order."""
    rng = np.random.default_rng(3)
    n, k = 130, 200  # neither a multiple of the tile (64) nor of the group (16)
    trits = rng.integers(-1, 2, (n, k)).astype(np.int8)
    w = K.prepack_w158a8(trits)
    x = rand(m, k, seed=4)
    kp = ops.padded_width(k)
    codes, xs, rowsum = np.zeros((m, kp), np.int8), np.zeros(m, np.float32), np.zeros(m, np.int32)
    ops.quantize_absmax(x, m, np.float32(127), np.float32(1e-5), codes, xs, rowsum)
    dots, out = np.zeros((m, w.data.shape[0] * 64), np.int32), np.zeros((m, n), np.float32)
    w_scale = np.full(n, 0.37, np.float32)
    with K.use(path):
        for min_macs in (0, 1 << 40):  # the parallel and the serial kernel
            ops.ternary_matmul(kernel_for("w1.58a8"), kernel_for("w1.58a8", parallel=False), codes, m, w.data,
                               rowsum, dots, xs, w_scale, out, min_macs)  # fmt: skip
            exact = codes[:, :k].astype(np.int64) @ trits.T.astype(np.int64)
            assert np.array_equal(dots[:, :n], exact)
            expected = (torch.from_numpy(exact.astype(np.int32)).float() * torch.from_numpy(xs)[:, None]) * torch.tensor(0.37)
            assert np.array_equal(out, expected.numpy())


@pytest.mark.parametrize("head", [ops.float_matmul_8, ops.float_matmul_16])
def test_float_matmul_equals_numpy(head):
    x, w = rand(3, 200), rand(1100, 200, seed=2)  # K not a multiple of 4 vectors: a scalar tail
    out = np.zeros((3, 1100), np.float32)
    head(x, 2, w, out)
    np.testing.assert_allclose(out[:2], x[:2].astype(np.float64) @ w.T, rtol=1e-5, atol=1e-5)
    assert not out[2].any()
    assert ops.float_matmul_for("avx512") is ops.float_matmul_16 and ops.float_matmul_for("generic") is ops.float_matmul_8


@pytest.mark.parametrize("head", [ops.float_matmul_8, ops.float_matmul_16])
def test_float_matmul_reads_an_int8_table_as_its_float32_widening(head):
    """An int8 table (the decode engine's int8 head, its scales applied by the caller) gives the
    result of its float32 copy: each code widened exactly, the same dot products (either width:
    LLVM splits 16 lanes into two registers on AVX2)."""
    x = rand(3, 200)
    codes = np.random.default_rng(4).integers(-127, 128, (1100, 200)).astype(np.int8)
    out, wide = np.zeros((3, 1100), np.float32), np.zeros((3, 1100), np.float32)
    head(x, 3, codes, out)
    head(x, 3, codes.astype(np.float32), wide)
    assert np.array_equal(out, wide)
    assert ops.widen(np.int8(-7)) == np.float32(-7.0)


def test_bfloat16_table_is_torchs_rounding_and_widens_exactly():
    """to_bfloat16 rounds as torch does (ties to even); the head on a bfloat16 table equals the
    head on its widened float32 copy bit for bit (widening is exact), at half the bytes."""
    w = rand(1100, 200, seed=3)
    w[0, :4] = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 0.0]  # ties: to even, both ways
    table = ops.to_bfloat16(w)
    expected = torch.from_numpy(w).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert table.dtype == np.uint16 and np.array_equal(table, expected)
    widened = torch.from_numpy(table.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert ops.widen(table[0, 1]) == widened[0, 1] == 1 + 4 * 2**-8
    assert np.array_equal(ops.from_bfloat16(table), widened)
    x = rand(2, 200)
    for head in (ops.float_matmul_8, ops.float_matmul_16):
        out, ref = np.zeros((2, 1100), np.float32), np.zeros((2, 1100), np.float32)
        head(x, 2, table, out)
        head(x, 2, np.ascontiguousarray(widened), ref)
        assert np.array_equal(out, ref)
    with pytest.raises(ValueError, match="finite"):
        ops.to_bfloat16(np.array([np.inf], np.float32))
    with pytest.raises(ValueError, match="overflows"):
        ops.to_bfloat16(np.array([3.4e38], np.float32))


def test_rope_equals_apply_rope():
    heads, hd, pos0, m = 3, 8, 5, 4
    cos, sin = rope_tables(hd, 16, 10000.0)
    row = rand(m, 2 + heads * hd)  # two columns before the heads
    x = row.copy()
    ops.rope(x, m, 2, heads, hd, cos.numpy(), sin.numpy(), pos0)
    q = torch.from_numpy(row[:, 2:]).view(m, heads, hd).transpose(0, 1)[None]  # [1, H, T, hd]
    expected = apply_rope(q, cos[pos0 : pos0 + m], sin[pos0 : pos0 + m])[0].transpose(0, 1).reshape(m, -1)
    np.testing.assert_allclose(x[:, 2:], expected.numpy(), rtol=1e-6, atol=1e-6)
    assert np.array_equal(x[:, :2], row[:, :2])


@pytest.mark.parametrize("n_head, n_kv", [(4, 4), (4, 2), (4, 1)])
def test_attend_cached_equals_causal_sdpa(n_head, n_kv):
    """M new tokens at positions past.. over the cache, grouped-query, against lm.model.attend."""
    hd, past, m, max_len = 8, 3, 4, 10
    length = past + m
    q = rand(m, n_head * hd, seed=5)
    k, v = rand(n_kv, max_len, hd, seed=6), rand(n_kv, max_len, hd, seed=7)
    qkv = np.concatenate([q, np.zeros((m, 2 * n_kv * hd), np.float32)], axis=1)
    scores, out = np.zeros((n_head * m, max_len), np.float32), np.zeros((m, n_head * hd), np.float32)
    ops.attend_cached(qkv, m, n_head, n_kv, hd, k, v, past, scores, out)
    tq = torch.from_numpy(q).view(m, n_head, hd).transpose(0, 1)[None]
    group = n_head // n_kv
    tk = torch.from_numpy(k[:, :length]).repeat_interleave(group, dim=0)[None]
    tv = torch.from_numpy(v[:, :length]).repeat_interleave(group, dim=0)[None]
    expected = attend(tq, tk, tv, past, "eager")[0].transpose(0, 1).reshape(m, -1)
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_attend_cached_on_a_bfloat16_cache_reads_its_widened_copy():
    """A bfloat16 cache (uint16) gives the attention of its exactly widened float32 copy, up to
    the order fastmath sums in; narrow_like rounds into it as to_bfloat16 does."""
    n_head, n_kv, hd, past, m, max_len = 4, 2, 16, 5, 2, 9
    qkv = rand(m, (n_head + 2 * n_kv) * hd, seed=8)
    k, v = rand(n_kv, max_len, hd, seed=9), rand(n_kv, max_len, hd, seed=10)
    kb, vb = ops.to_bfloat16(k), ops.to_bfloat16(v)
    out = {name: np.zeros((m, n_head * hd), np.float32) for name in ("bf16", "widened")}
    scores = np.zeros((n_head * m, max_len), np.float32)
    ops.attend_cached(qkv, m, n_head, n_kv, hd, kb, vb, past, scores, out["bf16"])
    ops.attend_cached(qkv, m, n_head, n_kv, hd, ops.from_bfloat16(kb), ops.from_bfloat16(vb), past, scores, out["widened"])
    np.testing.assert_allclose(out["bf16"], out["widened"], rtol=1e-6, atol=1e-6)
    values = np.array([1 + 2**-8, 1 + 3 * 2**-8, -2.5e-3, 0.0, -0.0, 7e20, np.nan], np.float32)
    narrowed = np.array([_narrow(np.float32(x), kb) for x in values], np.uint16)
    assert np.array_equal(narrowed[:-1], ops.to_bfloat16(values[:-1])) and np.isnan(ops.from_bfloat16(narrowed[-1:]))[0]
    assert _narrow(np.float32(1.5), k) == np.float32(1.5)


@njit
def _narrow(x, table):
    return ops.narrow_like(x, table)


def test_swiglu_and_add():
    gu = rand(2, 12)
    out = np.zeros((2, 6), np.float32)
    ops.swiglu(gu, 2, 6, out)
    g, u = torch.from_numpy(gu).split(6, dim=1)
    np.testing.assert_allclose(out, (torch.nn.functional.silu(g) * u).numpy(), rtol=1e-6, atol=1e-6)
    x, y = rand(3, 5), rand(3, 5, seed=1)
    before = x.copy()
    ops.add_(x, 2, y)
    assert np.array_equal(x[:2], before[:2] + y[:2]) and np.array_equal(x[2], before[2])


def test_swiglu_over_the_whole_float_range():
    """The vectorized exp holds silu to torch's across gates from -1000 to 1000: no overflow to
    NaN where exp(-g) leaves float32's range, silu -> 0 there, and -> g for large g."""
    gate = np.concatenate([np.linspace(-1000, 1000, 2001), np.linspace(-20, 20, 999)]).astype(np.float32)[None]
    up = np.linspace(-3, 3, gate.shape[1]).astype(np.float32)[None]
    out = np.zeros_like(gate)
    ops.swiglu(np.concatenate([gate, up], axis=1), 1, gate.shape[1], out)
    want = (torch.nn.functional.silu(torch.from_numpy(gate)) * torch.from_numpy(up)).numpy()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want, rtol=2e-6, atol=1e-30)


def test_padded_width():
    assert [ops.padded_width(k) for k in (1, 16, 17, 1536)] == [16, 16, 32, 1536]
    assert ops.KERNEL_WIDTH * math.ceil(70 / ops.KERNEL_WIDTH) == ops.padded_width(70)
