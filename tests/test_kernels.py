"""Tests for labutils.kernels: exact integer kernels, the packed layer, bad input, the benchmark."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numba
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit
from torch import nn

from labutils import kernels as K
from labutils import packing
from labutils.bitlinear import BitLinear, BitNetConfig, quantize_

THREADS = [1, 2] if numba.config.NUMBA_NUM_THREADS >= 2 else [1]
FAST = settings(max_examples=25, deadline=None)

# --------------------------------------------------------------------------- helpers


def _signs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return np.where(rng.random(shape) < 0.5, -1, 1).astype(np.int8)


def _reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The numpy int64 matmul every kernel must equal: x [M, K] @ w [N, K]^T."""
    return x.astype(np.int64) @ w.astype(np.int64).T


@contextlib.contextmanager
def _kernel_for(threads: int) -> Iterator[None]:
    """threads 1: the serial kernel; more: the parallel kernel, even on inputs this small."""
    old = dict(K._PARALLEL_MIN_MACS)
    if threads > 1:
        K._PARALLEL_MIN_MACS.update(dict.fromkeys(old, 0))
    try:
        yield
    finally:
        K._PARALLEL_MIN_MACS.update(old)


def _run(scheme: str, x: np.ndarray, w: np.ndarray, threads: int) -> np.ndarray:
    """x and w as int8 codes -> the scheme's kernel on their packed forms."""
    with _kernel_for(threads):
        return _run_kernel(scheme, x, w, threads)


def _run_kernel(scheme: str, x: np.ndarray, w: np.ndarray, threads: int) -> np.ndarray:
    k = x.shape[1]
    if scheme == "w1a1":
        packed = K.prepack_w1a1(packing.pack_binary_rows(w), k)
        return K.w1a1_gemm(packing.pack_binary_rows(x), packed, threads=threads)
    if scheme == "w1a8":
        return K.w1a8_gemm(x, K.prepack_w1a8(packing.pack_binary_rows(w), k), threads=threads)
    return K.w158a8_gemm(x, K.prepack_w158a8(w), threads=threads)


def _operands(scheme: str, m: int, k: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = _signs(rng, (m, k)) if scheme == "w1a1" else rng.integers(-128, 128, (m, k), dtype=np.int8)
    w = rng.integers(-1, 2, (n, k), dtype=np.int8) if scheme == "w1.58a8" else _signs(rng, (n, k))
    return x, w


# --------------------------------------------------------------------------- exactness

# Sizes around every block edge: 4-row tiles, 16/32/64-wide k groups, 32/64-column tiles.
SIZES = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129])


@pytest.mark.parametrize("scheme", K.SCHEMES)
@given(m=st.integers(1, 11), k=SIZES, n=SIZES, threads=st.sampled_from(THREADS), seed=st.integers(0, 2**16))
@FAST
def test_gemm_equals_int64_reference(scheme, m, k, n, threads, seed):
    x, w = _operands(scheme, m, k, n, seed)
    out = _run(scheme, x, w, threads)
    assert out.dtype == np.int32 and out.shape == (m, n) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, _reference(x, w))


@pytest.mark.parametrize("scheme", K.SCHEMES)
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 64, 1), (261, 200, 70), (6, 1000, 3), (2, 4096, 130)])
def test_gemm_edge_shapes(scheme, threads, m, k, n):
    x, w = _operands(scheme, m, k, n, seed=m * k * n)
    np.testing.assert_array_equal(_run(scheme, x, w, threads), _reference(x, w))


def test_extreme_values_are_exact():
    """All activations -128 or +127, all weights one sign: the largest sums, no overflow or saturation."""
    k, n = 4096, 64
    for value in (-128, 127):
        x = np.full((5, k), value, dtype=np.int8)
        for sign in (-1, 1):
            w = np.full((n, k), sign, dtype=np.int8)
            np.testing.assert_array_equal(_run("w1a8", x, w, 1), _reference(x, w))
            np.testing.assert_array_equal(_run("w1.58a8", x, w, 1), _reference(x, w))


@pytest.mark.parametrize("scheme", K.SCHEMES)
def test_gemv_and_packed_matmul_agree_with_gemm(scheme):
    x, w = _operands(scheme, 3, 150, 70, seed=1)
    gemm = _run(scheme, x, w, 1)
    if scheme == "w1a1":
        packed, xs = K.prepack_w1a1(packing.pack_binary_rows(w), 150), packing.pack_binary_rows(x)
        gemv = K.w1a1_gemv
    elif scheme == "w1a8":
        packed, xs, gemv = K.prepack_w1a8(packing.pack_binary_rows(w), 150), x, K.w1a8_gemv
    else:
        packed, xs, gemv = K.prepack_w158a8(w), x, K.w158a8_gemv
    for i in range(3):
        np.testing.assert_array_equal(gemv(xs[i], packed), gemm[i])
        np.testing.assert_array_equal(K.packed_matmul(xs[i], packed), gemm[i])
    np.testing.assert_array_equal(K.packed_matmul(xs, packed, threads=1), gemm)
    np.testing.assert_array_equal(K.packed_matmul(torch.from_numpy(xs), packed), gemm)  # torch in


def test_simple_kernel_equals_reference():
    rng = np.random.default_rng(2)
    x, w = _signs(rng, (7, 130)), _signs(rng, (9, 130))
    out = K.w1a1_gemm_simple(packing.pack_binary_rows(x), packing.pack_binary_rows(w), 130)
    np.testing.assert_array_equal(out, _reference(x, w))


@njit
def _popcounts(words):
    out = np.empty(words.size, dtype=np.int64)
    for i in range(words.size):
        out[i] = K.popcount(words[i])
    return out


@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=50))
@FAST
def test_popcount_intrinsic(values):
    words = np.array(values, dtype=np.uint64)
    assert _popcounts(words).tolist() == [v.bit_count() for v in values]


@njit
def _dpbusd_both(u8, s8, acc):
    fast = K._dpbusd(acc, u8, s8)
    portable = K._dpbusd_portable(acc, u8, s8)
    out = np.empty((2, 16), dtype=np.int32)
    K._store_affine(out, 0, fast, 1, 0)
    K._store_affine(out, 16, portable, 1, 0)
    return out


@njit
def _vnni_once(u8, s8_bytes):
    return _dpbusd_both(K._vload(u8, 0), K._vload(s8_bytes, 0), K._vzeros_i32())


def test_dpbusd_fallback_equals_vnni():
    """The portable widen-multiply-add gives what vpdpbusd gives (both: u8 x s8, groups of 4)."""
    rng = np.random.default_rng(3)
    u8 = rng.integers(0, 256, 64, dtype=np.uint8)
    s8 = rng.integers(-128, 128, 64, dtype=np.int8)
    out = _vnni_once(u8, s8.view(np.uint8))
    expected = (u8.astype(np.int64) * s8.astype(np.int64)).reshape(16, 4).sum(axis=1)
    np.testing.assert_array_equal(out[0], expected)
    np.testing.assert_array_equal(out[1], expected)


# --------------------------------------------------------------------------- assembly


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags = [line for line in text.splitlines() if line.startswith("flags")]
    return set(flags[0].split(":", 1)[1].split()) if flags else set()


@pytest.mark.slow
def test_assembly_has_popcount_and_vnni():
    lines = K.popcount_asm_lines("w1a1")
    assert lines and all("popcnt" in line for line in lines)
    if "avx512_vpopcntdq" in _cpu_flags():
        assert any(line.startswith("vpopcntq") for line in lines)
    vnni = K.vnni_asm_lines(K.w158a8_gemm)
    assert K.HAS_VNNI == ("avx512_vnni" in _cpu_flags() or not _cpu_flags())
    if K.HAS_VNNI:
        assert any(line.startswith("vpdpbusd") for line in vnni)


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def packed_all():
    rng = np.random.default_rng(4)
    w = _signs(rng, (40, 70))
    rows = packing.pack_binary_rows(w)
    return {
        "w1a1": K.prepack_w1a1(rows, 70),
        "w1a8": K.prepack_w1a8(rows, 70),
        "w1.58a8": K.prepack_w158a8(rng.integers(-1, 2, (40, 70), dtype=np.int8)),
        "rows": rows,
        "signs": w,
    }


def test_unpacked_weights_are_refused(packed_all):
    x8 = np.zeros((2, 70), dtype=np.int8)
    with pytest.raises(TypeError, match="prepack_w1a1"):
        K.w1a1_gemm(np.zeros((2, 2), np.uint64), packed_all["rows"])
    with pytest.raises(TypeError, match="PackedWeights"):
        K.w1a8_gemm(x8, packed_all["signs"])
    with pytest.raises(TypeError, match="PackedWeights"):
        K.packed_matmul(x8, packed_all["signs"])
    with pytest.raises(ValueError, match="prepacked for 'w1a8'"):
        K.w158a8_gemm(x8, packed_all["w1a8"])
    with pytest.raises(TypeError, match="uint64"):
        K.prepack_w1a1(packed_all["signs"], 70)  # int8 signs, not pack_binary_rows words
    with pytest.raises(TypeError, match="uint64"):
        K.prepack_w1a8(packed_all["signs"].astype(np.int64), 70)


def test_mismatched_k_and_dtypes(packed_all):
    with pytest.raises(ValueError, match=r"\[M, 70\]"):
        K.w1a8_gemm(np.zeros((2, 71), np.int8), packed_all["w1a8"])
    with pytest.raises(ValueError, match=r"\[M, 2\]"):
        K.w1a1_gemm(np.zeros((2, 3), np.uint64), packed_all["w1a1"])
    with pytest.raises(TypeError, match="int8"):
        K.w158a8_gemm(np.zeros((2, 70), np.uint8), packed_all["w1.58a8"])
    with pytest.raises(TypeError, match="int8"):
        K.w1a8_gemm(np.zeros((2, 70), np.float32), packed_all["w1a8"])
    with pytest.raises(TypeError, match="uint64"):
        K.w1a1_gemm(np.zeros((2, 2), np.int64), packed_all["w1a1"])
    with pytest.raises(ValueError, match="shape"):
        K.prepack_w1a1(packed_all["rows"], 200)  # K disagrees with the words
    with pytest.raises(ValueError, match="1-D"):
        K.w1a8_gemv(np.zeros((2, 70), np.int8), packed_all["w1a8"])
    with pytest.raises(ValueError, match=r"\[M, 70\]"):
        K.w1a8_gemm(np.zeros(70, np.int8), packed_all["w1a8"])
    with pytest.raises(TypeError, match="numpy array"):
        K.w1a8_gemm([[0] * 70], packed_all["w1a8"])


def test_non_contiguous_and_padding_bits(packed_all):
    x = np.zeros((2, 140), dtype=np.int8)[:, ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        K.w1a8_gemm(x, packed_all["w1a8"])
    rows = packing.pack_binary_rows(_signs(np.random.default_rng(0), (3, 70)))
    rows[1, -1] |= np.uint64(1) << np.uint64(63)  # a bit beyond column 70
    with pytest.raises(ValueError, match="padding bits"):
        K.w1a1_gemm(rows, packed_all["w1a1"])
    with pytest.raises(ValueError, match="padding bits"):
        K.prepack_w1a1(rows, 70)


def test_bad_prepack_and_threads(packed_all):
    with pytest.raises(ValueError, match="-1, 0, \\+1"):
        K.prepack_w158a8(np.full((3, 4), 2, dtype=np.int8))
    with pytest.raises(TypeError, match="integer"):
        K.prepack_w158a8(np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        K.prepack_w158a8(np.zeros(4, dtype=np.int8))
    with pytest.raises(ValueError, match="k must be"):
        K.prepack_w1a1(packed_all["rows"], 0)
    with pytest.raises(ValueError, match="data must be"):
        K.PackedWeights("w1a1", 40, 70, np.zeros((1, 2, 32), np.uint64))  # 40 rows need 2 tiles
    with pytest.raises(ValueError, match="scheme"):
        K.PackedWeights("w2a8", 40, 70, packed_all["w1a1"].data)
    for threads in (0, numba.config.NUMBA_NUM_THREADS + 1, 1.5):
        with pytest.raises(ValueError, match="threads"):
            K.w1a8_gemm(np.zeros((1, 70), np.int8), packed_all["w1a8"], threads=threads)
    with pytest.raises(ValueError, match="kernel name"):
        K.popcount_asm_lines("w3a3")


def test_zero_rows(packed_all):
    assert K.w1a8_gemm(np.zeros((0, 70), np.int8), packed_all["w1a8"]).shape == (0, 40)


# --------------------------------------------------------------------------- the packed layer

CONFIGS = [
    BitNetConfig(weight_bits=1.58, per_channel=False, norm="rms"),
    BitNetConfig(weight_bits=1.58, per_channel=True, norm=None),
    BitNetConfig(weight_bits=1, per_channel=False, norm="layer"),
    BitNetConfig(weight_bits=1, per_channel=True, norm="rms", act_bits=4),
]


def _bitlinear(config: BitNetConfig, k: int = 70, n: int = 33, bias: bool = True, seed: int = 0) -> BitLinear:
    torch.manual_seed(seed)
    layer = BitLinear(k, n, bias=bias, config=config)
    if layer.norm is not None:  # non-trivial norm parameters
        with torch.no_grad():
            layer.norm.weight.uniform_(0.5, 1.5)
    return layer.eval()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
@pytest.mark.parametrize("bias", [True, False])
def test_packed_bitlinear_matches_bitlinear(config, bias):
    layer = _bitlinear(config, bias=bias)
    packed = K.PackedBitLinear.from_bitlinear(layer)
    x = torch.randn(2, 5, 70, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        expected = layer(x)
    got = packed(x)
    assert got.shape == (2, 5, 33) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    scheme = "w1.58a8" if config.weight_bits == 1.58 else "w1a8"
    assert packed.weights.scheme == scheme
    assert "packed" in packed.state_dict() and ("bias" in packed.state_dict()) == bias


def test_packed_bitlinear_binary_activations():
    layer = _bitlinear(BitNetConfig(weight_bits=1, norm="rms"))
    packed = K.PackedBitLinear.from_bitlinear(layer, act="binary")
    assert packed.weights.scheme == "w1a1"
    x = torch.randn(7, 70, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = layer.norm(x)
        x_q = torch.where(h >= 0, 1.0, -1.0) * h.abs().mean(dim=-1, keepdim=True)
        codes, scale = layer.quantized_weight()
        expected = nn.functional.linear(x_q, codes.float() * scale, layer.bias)
    torch.testing.assert_close(packed(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@given(st.integers(1, 5), st.integers(1, 200), st.integers(0, 2**16))
@FAST
def test_pack_signs_equals_pack_binary_rows(m, k, seed):
    x = np.random.default_rng(seed).standard_normal((m, k)).astype(np.float32)
    x[:, ::7] = 0.0  # zero maps to +1
    x[:, 1::11] = -0.0
    expected = packing.pack_binary_rows(np.where(x >= 0, 1, -1).astype(np.int8))
    np.testing.assert_array_equal(K._pack_signs(x), expected)


def test_packed_bitlinear_dtype_and_errors():
    layer = _bitlinear(BitNetConfig())
    packed = K.PackedBitLinear.from_bitlinear(layer)
    assert packed(torch.randn(3, 70, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="in_features"):
        packed(torch.randn(3, 71))
    with pytest.raises(TypeError, match="float"):
        packed(torch.zeros(3, 70, dtype=torch.int64))
    binary = K.PackedBitLinear.from_bitlinear(_bitlinear(BitNetConfig(weight_bits=1)), act="binary")
    for bad in (float("nan"), float("inf")):
        x = torch.randn(3, 70)
        x[1, 5] = bad
        with pytest.raises(ValueError, match="finite"):
            packed(x)
        with pytest.raises(ValueError, match="finite"):
            binary(x)
    with pytest.raises(ValueError, match="binary weights"):
        K.PackedBitLinear.from_bitlinear(layer, act="binary")
    with pytest.raises(ValueError, match="weight_bits"):
        K.PackedBitLinear.from_bitlinear(_bitlinear(BitNetConfig(weight_bits=4)))
    with pytest.raises(ValueError, match="act_bits"):
        K.PackedBitLinear.from_bitlinear(_bitlinear(BitNetConfig(act_bits=None)))
    with pytest.raises(TypeError, match="BitLinear"):
        K.PackedBitLinear.from_bitlinear(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="act must be"):
        K.PackedBitLinear.from_bitlinear(layer, act="int4")


def _small_model(config: BitNetConfig) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(70, 48), nn.GELU(), nn.Linear(48, 20), nn.GELU(), nn.Linear(20, 3))
    quantize_(model, config, skip=())
    return model.eval()


@pytest.mark.parametrize("config", CONFIGS[:3], ids=lambda c: c.describe())
def test_pack_model_matches_unpacked(config):
    model = _small_model(config)
    packed = K.pack_model(model)
    assert all(isinstance(m, BitLinear) for m in (model[0], model[2], model[4]))  # a copy by default
    assert all(isinstance(m, K.PackedBitLinear) for m in (packed[0], packed[2], packed[4]))
    x = torch.randn(6, 70, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(packed(x), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_pack_model_follows_binary_activations():
    """A W1A1 BitLinear model (act_bits=1) packs onto the XNOR-popcount kernels by default and
    computes what it computed before packing."""
    model = _small_model(BitNetConfig(weight_bits=1, act_bits=1, norm=None))
    packed = K.pack_model(model)
    assert all(m.weights.scheme == "w1a1" for m in (packed[0], packed[2], packed[4]))
    x = torch.randn(6, 70, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(packed(x), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    with pytest.raises(ValueError, match="act_bits"):
        K.pack_model(model, act="int8")


def test_pack_model_inplace_and_errors():
    model = _small_model(BitNetConfig(weight_bits=1))
    same = K.pack_model(model, act="binary", inplace=True)
    assert same is model and isinstance(model[0], K.PackedBitLinear) and model[0].weights.scheme == "w1a1"
    assert model(torch.randn(2, 70)).shape == (2, 3)
    with pytest.raises(ValueError, match="no BitLinear"):
        K.pack_model(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="binary weights"):
        K.pack_model(_small_model(BitNetConfig(weight_bits=1.58)), act="binary")
    assert isinstance(K.pack_model(_bitlinear(BitNetConfig())), K.PackedBitLinear)


# --------------------------------------------------------------------------- the benchmark


def test_bench_quick_writes_json(tmp_path, capsys):
    from labutils import bench

    out = tmp_path / "kernels.json"
    assert bench.main(["kernels", "--quick", "--threads", "1", "--repeat", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["command"] == "kernels" and result["threads"] == 1
    assert {"frequency_ghz", "notes"} <= set(result["peak"])
    assert result["results"], "no shapes measured"
    for row in result["results"]:
        assert {"w1a1", "w1a8", "w1.58a8", "torch_f32", "torch_int8"} <= set(row["kernels"])
        for timing in row["kernels"].values():
            assert timing["seconds"] > 0 and timing["gmac_per_s"] > 0
    assert "GMAC/s" in capsys.readouterr().out
