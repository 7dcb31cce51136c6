"""Tests for labutils.kernels: bad input, the packed layer (PackedBitLinear, pack_model), the benchmark.

(Exactness of the kernels on every path, the dispatch and the assembly: tests/test_kernels.py.)
"""

from __future__ import annotations

import copy

import numba
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from labutils import kernels as K
from labutils import packing
from labutils.bitlinear import BitLinear, BitNetConfig, quantize_
from labutils.kernels.layer import _pack_signs

FAST = settings(max_examples=25, deadline=None)


def _signs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return np.where(rng.random(shape) < 0.5, -1, 1).astype(np.int8)


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


@pytest.mark.parametrize("scheme", K.SCHEMES)
def test_zero_rows(packed_all, scheme):
    """An empty batch gives an empty int32 [0, N] (GEMM) on every path this CPU runs."""
    x = np.zeros((0, 2), np.uint64) if scheme == "w1a1" else np.zeros((0, 70), np.int8)
    for path in K.available_paths():
        with K.use(path):
            out = K.packed_matmul(x, packed_all[scheme])
        assert out.shape == (0, 40) and out.dtype == np.int32


@pytest.mark.parametrize("act", ["int8", "binary"])
def test_packed_bitlinear_empty_batch(act):
    """Like nn.Linear: [0, in] -> [0, out], and [2, 0, in] -> [2, 0, out]."""
    layer = _bitlinear(BitNetConfig(weight_bits=1 if act == "binary" else 1.58))
    packed = K.PackedBitLinear.from_bitlinear(layer, act=act)
    for shape in ((0, 70), (2, 0, 70)):
        out = packed(torch.empty(shape))
        assert out.shape == (*shape[:-1], 33) and out.dtype == torch.float32


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
    np.testing.assert_array_equal(_pack_signs(x), expected)


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




# --------------------------------------------------------------------------- the fused layer


@pytest.mark.parametrize("weight_bits,act_bits", [(1.58, 8), (1, 8), (1.58, 4), (1, 1)])
@pytest.mark.parametrize("m,k,n", [(1, 70, 40), (33, 100, 130), (300, 384, 200)])
def test_fused_layer_equals_the_unfused_steps(weight_bits, act_bits, m, k, n):
    """Quantization, kernel, rescale and bias in one compiled call give the unfused layer's
    outputs bit for bit (A8); W1A1's mean|x| is summed in float64, so to float rounding."""
    torch.manual_seed(m + k + n)
    lin = BitLinear(k, n, bias=True, config=BitNetConfig(weight_bits, act_bits, per_channel=True, norm=None)).eval()
    packed = K.PackedBitLinear.from_bitlinear(lin)
    x = torch.randn(2, m, k) * 3
    fused = packed(x)
    packed.fused = False
    unfused = packed(x)
    if act_bits == 1:
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5 * float(unfused.abs().max()))
    else:
        assert torch.equal(fused, unfused)
    torch.testing.assert_close(fused, lin(x).detach(), rtol=1e-4, atol=1e-4 * float(unfused.abs().max()))


def test_fused_layer_refuses_nan_and_keeps_no_float_weights():
    lin = BitLinear(64, 64, config=BitNetConfig(1.58, 8, per_channel=False, norm=None)).eval()
    packed = K.PackedBitLinear.from_bitlinear(lin)
    x = torch.randn(20, 64)
    x[3, 5] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        packed(x)
    floats = [b for b in packed.buffers() if b.is_floating_point()]
    assert sum(b.numel() for b in floats) <= 2 * 64 + 1  # scales and bias, no weight matrix



@pytest.mark.parametrize("per_channel", [True, False])
def test_fused_layer_follows_buffers_changed_after_a_call(per_channel):
    """The fused call keeps its scale and bias arrays between calls; a buffer written in place
    (load_state_dict), replaced, or a layer moved to another dtype must still be read."""
    torch.manual_seed(7)
    lin = BitLinear(96, 48, bias=True, config=BitNetConfig(1.58, 8, per_channel=per_channel, norm=None)).eval()
    packed = K.PackedBitLinear.from_bitlinear(lin)
    x = torch.randn(5, 96)
    before = packed(x)
    state = {name: t.clone() for name, t in packed.state_dict().items()}
    state["weight_scale"] *= 2
    state["bias"] += 1
    packed.load_state_dict(state)  # in place: the same tensors, new version counters
    torch.testing.assert_close(packed(x), 2 * (before - lin.bias.detach()) + lin.bias.detach() + 1)
    packed.bias = torch.zeros(48)  # replaced
    torch.testing.assert_close(packed(x), 2 * (before - lin.bias.detach()))
    packed.double()  # buffers converted: float64 scale and bias reach the float32 kernel as float32
    torch.testing.assert_close(packed(x.double()), 2 * (before - lin.bias.detach()).double())

def test_packed_embedding_stays_int4_and_gives_the_loaded_rows(tmp_path):
    from labutils.kernels.layer import PackedEmbedding, pack_embeddings_
    from labutils.packfile import load_packed, save_packed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 256), nn.Linear(256, 4))
    path = tmp_path / "m.packed"
    save_packed(model, path, embeddings="int4", group_size=128)
    loaded = load_packed(path, copy.deepcopy(model))
    packed = copy.deepcopy(loaded)
    assert pack_embeddings_(packed, load_packed(path)) == ["0"]
    assert isinstance(packed[0], PackedEmbedding)
    ids = torch.tensor([[0, 49, 7], [3, 3, 1]])
    assert torch.equal(packed[0](ids), loaded[0](ids))
    assert packed[0].codes.dtype == torch.uint8 and packed[0].codes.numel() == 50 * 128  # two codes a byte
    assert not any(b.numel() == 50 * 256 and b.is_floating_point() for b in packed.buffers())
    with pytest.raises(IndexError):
        packed[0](torch.tensor([50]))
