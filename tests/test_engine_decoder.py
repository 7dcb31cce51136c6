"""labutils.engine.decoder: the compiled decoder token for token against the torch decoder
(BitLinear, fake-quantized), with and without the KV cache, on every kernel path this CPU runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labutils import kernels as K
from labutils.engine import ops
from labutils.engine.decoder import DecoderEngine, EngineShape, engine_for, is_packed_decoder
from labutils.lm.model import Decoder, KVCache, LMConfig, generate

SMALL = dict(vocab_size=300, n_layer=2, n_head=4, d_model=64, max_seq_len=40, quant="w1.58a8")
ATOL = 2e-4  # float32 rounding of norms, softmax, SiLU and the head, summed in another order


def model(kv_heads=None, seed=1, **kw) -> Decoder:
    return Decoder(LMConfig(**{**SMALL, **kw}, n_kv_heads=kv_heads), seed=seed).eval()


def prompt(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
@pytest.mark.parametrize("path", K.available_paths())
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_engine_equals_the_fake_quantized_decoder_with_and_without_cache(path, kv_heads):
    """All positions in one pass (no cache) and prefill + one token a step (the cache) give
    the torch decoder's logits; the projections' integer math is the same, so the greedy
    tokens are the same."""
    ref = model(kv_heads)
    x = prompt(24)
    with torch.no_grad():
        expected = ref(x)[0].numpy()
    with K.use(path):
        engine = DecoderEngine.from_decoder(ref)
        full = engine.forward(x[0].numpy(), logits="all")
        np.testing.assert_allclose(full, expected, atol=ATOL, rtol=0)
        engine.reset()
        steps = [engine.forward(x[0, :7].numpy()).copy()]
        steps += [engine.step(int(t)).copy() for t in x[0, 7:]]
    np.testing.assert_allclose(np.stack(steps), expected[6:], atol=ATOL, rtol=0)
    assert engine.length == 24
    assert np.array_equal(full.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("path", K.available_paths())
def test_generate_uses_the_engine_for_packed_decoders_token_for_token(path):
    """generate() on pack_model(decoder) (the engine) writes the fake-quantized decoder's
    greedy tokens (the torch path) and the same seeded samples, batch rows included."""
    ref = model(2, seed=4)
    packed = K.pack_model(ref)
    assert is_packed_decoder(packed) and not is_packed_decoder(ref)
    x = torch.cat([prompt(6, seed=1), prompt(6, seed=2)])
    with K.use(path):
        greedy = generate(packed, x, 20, temperature=0)
        sampled = generate(packed, x[:1], 12, temperature=0.8, seed=3)
    assert torch.equal(greedy, generate(ref, x, 20, temperature=0))
    assert torch.equal(sampled, generate(ref, x[:1], 12, temperature=0.8, seed=3))
    assert engine_for(packed) is engine_for(packed)  # built once per model


def test_engine_matches_the_packed_model_and_the_kv_cache_of_torch():
    """The packed torch path (PackedBitLinear between torch ops) with its KVCache, the
    reference the benchmark's 'before' row runs, agrees with the engine too."""
    packed = K.pack_model(model(seed=5))
    x = prompt(12, seed=5)
    cache = KVCache(packed.config, 1, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        first = packed(x[:, :8], cache)[0, -1].numpy()
        last = packed(x[:, 8:], cache)[0, -1].numpy()
    engine = DecoderEngine.from_decoder(packed)
    np.testing.assert_allclose(engine.forward(x[0, :8].numpy()), first, atol=ATOL, rtol=0)
    np.testing.assert_allclose(engine.forward(x[0, 8:].numpy()), last, atol=ATOL, rtol=0)


def test_bfloat16_embedding_computes_the_model_with_that_rounded_table():
    """embedding="bfloat16" halves the table the head reads per token; the engine then computes
    exactly what the float32 engine computes for the model whose tied table was rounded so."""
    ref = model(2, seed=6)
    rounded = model(2, seed=6)
    with torch.no_grad():
        rounded.embed.weight.copy_(rounded.embed.weight.to(torch.bfloat16).float())
    x = prompt(10, seed=6)[0].numpy()
    half = DecoderEngine.from_decoder(ref, embedding="bfloat16")
    assert half.embedding_dtype == "bfloat16" and half.embed.dtype == np.uint16
    assert np.array_equal(half.forward(x, logits="all"), DecoderEngine.from_decoder(rounded).forward(x, logits="all"))
    assert np.array_equal(half.embedding(), rounded.embed.weight.detach().numpy())
    full = DecoderEngine.from_decoder(ref)
    assert full.nbytes - half.nbytes == 2 * SMALL["vocab_size"] * SMALL["d_model"]
    shape = EngineShape(vocab_size=500, n_layer=1, n_head=2, n_kv_head=2, d_model=32, ffn_hidden=64, max_seq_len=8)
    a, b = DecoderEngine.random(shape, seed=3), DecoderEngine.random(shape, seed=3, embedding="bfloat16")
    assert np.array_equal(b.embed, ops.to_bfloat16(a.embed))
    with pytest.raises(ValueError, match="embedding must be one of"):
        DecoderEngine.from_decoder(ref, embedding="float16")


def test_bfloat16_kv_cache_holds_the_rounded_keys_and_values():
    """kv_cache="bfloat16" stores K and V rounded to nearest as they are written (half the bytes
    attention reads a token, as llama.cpp's fp16 cache); logits stay within a few per cent of
    the float32 cache's largest (a rounded value can move an int8 code of the next layer by one)
    and greedy decoding mostly agrees."""
    ref = model(2, seed=6)
    x = prompt(12, seed=6)[0].numpy()
    full, half = DecoderEngine.from_decoder(ref), DecoderEngine.from_decoder(ref, kv_cache="bfloat16")
    assert (full.kv_cache_dtype, half.kv_cache_dtype) == ("float32", "bfloat16") and half.k_cache.dtype == np.uint16
    assert half.k_cache.nbytes * 2 == full.k_cache.nbytes
    a, b = full.forward(x, logits="all"), half.forward(x, logits="all")
    # the first layer's keys and values come from the same inputs: exactly the rounded float32 ones
    assert np.array_equal(half.k_cache[0, :, :12], ops.to_bfloat16(full.k_cache[0, :, :12]))
    assert np.array_equal(half.v_cache[0, :, :12], ops.to_bfloat16(full.v_cache[0, :, :12]))
    assert np.abs(a - b).max() < 5e-2 * np.abs(a).max() and (a.argmax(1) == b.argmax(1)).mean() >= 0.9
    for _ in range(4):  # decode steps read the rounded cache
        np.testing.assert_allclose(full.step(int(a[-1].argmax())), half.step(int(a[-1].argmax())), atol=5e-2 * np.abs(a).max())
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        DecoderEngine.from_decoder(ref, kv_cache="float16")


def test_random_engine_is_seeded_and_runs_gqa_shapes():
    shape = EngineShape(vocab_size=500, n_layer=2, n_head=6, n_kv_head=2, d_model=96, ffn_hidden=200, max_seq_len=16)
    a, b = DecoderEngine.random(shape, seed=7), DecoderEngine.random(shape, seed=7)
    ids = np.arange(5)
    assert np.array_equal(a.forward(ids, logits="all"), b.forward(ids, logits="all"))
    assert not np.array_equal(a.weights["qkv"], DecoderEngine.random(shape, seed=8).weights["qkv"])
    codes = DecoderEngine.layer_codes(shape, 7, 1)
    assert codes["qkv"].shape == ((6 + 2 * 2) * 16, 96) and set(np.unique(codes["down"])) == {-1, 0, 1}
    assert np.array_equal(a.weights["down"][1], K.prepack_w158a8(codes["down"]).data)
    assert a.nbytes < 4 * (500 * 96 + 2 * 96 * (160 + 96 + 400) + 2 * 200 * 96)


def test_errors():
    engine = DecoderEngine.from_decoder(model())
    with pytest.raises(IndexError, match="token ids"):
        engine.forward([300])
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        engine.forward(np.zeros(41, np.int64))
    with pytest.raises(ValueError, match="at least one"):
        engine.forward([])
    with pytest.raises(ValueError, match="'last' or 'all'"):
        engine.forward([1], logits="first")
    with pytest.raises(ValueError, match="length must be"):
        engine.reset(5)
    with pytest.raises(ValueError, match="W1.58A8"):
        DecoderEngine.from_decoder(Decoder(LMConfig(**{**SMALL, "quant": "fp"})))
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        EngineShape(vocab_size=10, n_layer=1, n_head=4, n_kv_head=3, d_model=32, ffn_hidden=64, max_seq_len=8)
    broken = model(seed=2)
    with torch.no_grad():
        broken.blocks[0].attn_norm.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        DecoderEngine.from_decoder(broken).forward([1, 2])


@pytest.mark.parametrize("path", K.available_paths())
def test_int8_embedding_computes_the_model_with_that_quantized_table(path):
    """embedding="int8" reads a quarter of the float32 bytes a token: per-row absmax codes, the
    row's scale applied to its lookup and its logit. The engine then computes the model whose
    tied table is ``codes * scale`` (up to the head's float rounding: the scale multiplies the
    dot product instead of every weight)."""
    from labutils.engine.decoder import quantize_table_int8

    ref = model(2, seed=7)
    codes, scale = quantize_table_int8(ref.embed.weight.detach().numpy())
    assert codes.dtype == np.int8 and np.abs(codes).max() == 127 and scale.shape == (SMALL["vocab_size"],)
    table = ref.embed.weight.detach().numpy()
    assert np.abs(codes * scale[:, None] - table).max() <= scale.max() / 2 + 1e-7  # rounded to nearest
    dequantized = model(2, seed=7)
    with torch.no_grad():
        dequantized.embed.weight.copy_(torch.from_numpy(codes.astype(np.float32) * scale[:, None]))
    x = prompt(10, seed=7)[0].numpy()
    with K.use(path):
        small = DecoderEngine.from_decoder(ref, embedding="int8")
        assert small.embedding_dtype == "int8" and small.embed.dtype == np.int8
        expected = DecoderEngine.from_decoder(dequantized).forward(x, logits="all")
        got = small.forward(x, logits="all")
        small.reset()
        last = [small.forward(x[:4]).copy()] + [small.step(int(t)).copy() for t in x[4:]]
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.stack(last), expected[3:], atol=ATOL, rtol=0)
    assert np.array_equal(got.argmax(-1), expected.argmax(-1))
    np.testing.assert_array_equal(small.embedding(), codes.astype(np.float32) * scale[:, None])
    full = DecoderEngine.from_decoder(ref)
    assert full.nbytes - small.nbytes == 3 * SMALL["vocab_size"] * SMALL["d_model"] - 4 * SMALL["vocab_size"]
    shape = EngineShape(vocab_size=500, n_layer=1, n_head=2, n_kv_head=2, d_model=32, ffn_hidden=64, max_seq_len=8)
    a, b = DecoderEngine.random(shape, seed=3), DecoderEngine.random(shape, seed=3, embedding="int8")
    assert np.array_equal(b.embed, quantize_table_int8(a.embed)[0])
    with pytest.raises(ValueError, match="embed_scale"):
        DecoderEngine(shape, a.weights, a.scales, a.gains, b.embed, a.final_gain)  # codes without their scales
    with pytest.raises(ValueError, match="embed_scale"):
        DecoderEngine(shape, a.weights, a.scales, a.gains, a.embed, a.final_gain, embed_scale=b.embed_scale)


@pytest.mark.parametrize("path", K.available_paths())
def test_lut_gemv_gives_the_tiles_logits_bit_for_bit(path):
    """gemv="lut" runs each generated token on the weights as table indices (1.67 bits a weight):
    the same int32 dot products as the tiles, so the same logits, for a trained-shaped model
    (from_decoder, grouped-query attention) and a random one; prompts keep the tiled GEMM."""
    ref = model(kv_heads=2)
    x = prompt(10)[0].numpy()
    with K.use(path):
        tiles, lut = DecoderEngine.from_decoder(ref), DecoderEngine.from_decoder(ref, gemv="lut")
        assert (tiles.gemv, lut.gemv) == ("tiles", "lut")
        np.testing.assert_array_equal(lut.forward(x[:6]), tiles.forward(x[:6]))
        for token in x[6:]:
            np.testing.assert_array_equal(lut.step(int(token)), tiles.step(int(token)))
        shape = EngineShape(vocab_size=200, n_layer=1, n_head=4, n_kv_head=1, d_model=48, ffn_hidden=100, max_seq_len=8)
        a, b = DecoderEngine.random(shape, seed=3), DecoderEngine.random(shape, seed=3, gemv="lut")
        a.forward([1, 2]), b.forward([1, 2])
        np.testing.assert_array_equal(a.step(4), b.step(4))
        assert set(b.profile_step(3, repeat=2)) >= {"total", "integer_kernel", "float_head"}
    packed = DecoderEngine.lut_of(shape, a.weights)
    assert all(np.array_equal(packed[k][i], b.lut[k][i]) for k in packed for i in (0, 1))
    assert b.nbytes - a.nbytes == sum(d.nbytes + n.nbytes for d, n in b.lut.values())


def test_lut_gemv_refuses_bad_values_and_shapes():
    with pytest.raises(ValueError, match="gemv must be one of"):
        DecoderEngine.from_decoder(model(), gemv="dense")
    for path in K.available_paths():
        with K.use(path):
            assert DecoderEngine.from_decoder(model(), gemv="auto").gemv == ("lut" if path == "avx2" else "tiles")
    shape = EngineShape(vocab_size=50, n_layer=1, n_head=2, n_kv_head=2, d_model=32, ffn_hidden=64, max_seq_len=8)
    e = DecoderEngine.random(shape, seed=1, gemv="lut")
    bad = {**e.lut, "o": (e.lut["o"][0][:, :, :1], e.lut["o"][1])}
    with pytest.raises(ValueError, match="o lookup weights"):
        DecoderEngine(shape, e.weights, e.scales, e.gains, e.embed, e.final_gain, lut=bad)
