"""The exercise self-checks accept right answers and say what is wrong with typical wrong ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from labutils import checks, quant
from labutils.checks import ExerciseError


def wrong(match: str):
    return pytest.raises(ExerciseError, match=match)


# --------------------------------------------------------------------------- chapter 1


def test_affine_by_hand():
    assert checks.check_affine_by_hand(2 / 3, -1, [-2, -1, 1])
    with wrong("still None"):
        checks.check_affine_by_hand(None, -1, [-2, -1, 1])
    with wrong(r"2\^b - 1 = 3 steps"):
        checks.check_affine_by_hand(0.5, -1, [-2, -1, 1])
    with wrong("sign flipped"):
        checks.check_affine_by_hand(2 / 3, 1, [-2, -1, 1])
    with wrong("integer code"):
        checks.check_affine_by_hand(2 / 3, -1.0, [-2, -1, 1])
    with wrong("outside the 2-bit range"):
        checks.check_affine_by_hand(2 / 3, -1, [-2, -1, 2])
    with wrong(r"position\(s\) \[1\]"):
        checks.check_affine_by_hand(2 / 3, -1, [-2, 0, 1])
    with wrong("expected 3 codes"):
        checks.check_affine_by_hand(2 / 3, -1, [-2, -1])


def test_sqnr_prediction():
    assert checks.check_sqnr_prediction(40.0 + 4 * 20 * math.log10(2), 40.0)
    with wrong("3 dB per bit"):
        checks.check_sqnr_prediction(40.0 + 4 * 3.01, 40.0)
    with wrong("one bit's worth"):
        checks.check_sqnr_prediction(46.02, 40.0)
    with wrong("expected 40.00"):
        checks.check_sqnr_prediction(70.0, 40.0)


# --------------------------------------------------------------------------- chapter 2


@pytest.fixture
def w() -> torch.Tensor:
    return torch.randn(16, 24, generator=torch.Generator().manual_seed(0))


def test_row_scales(w):
    assert checks.check_row_scales(w.abs().mean(dim=1, keepdim=True), w)
    with wrong("keepdim=True"):
        checks.check_row_scales(w.abs().mean(dim=1), w)
    with wrong("wrong dim"):
        checks.check_row_scales(w.abs().mean(dim=0, keepdim=True).T, w)
    with wrong("float tensor"):
        checks.check_row_scales(torch.ones(16, 1, dtype=torch.int64), w)
    with wrong("absmax scale"):
        checks.check_row_scales(w.abs().amax(dim=1, keepdim=True), w)
    with wrong("divide by the row length"):
        checks.check_row_scales(w.abs().sum(dim=1, keepdim=True), w)
    with wrong("factor 2"):
        checks.check_row_scales(2 * w.abs().mean(dim=1, keepdim=True), w)
    with wrong("must be a torch.Tensor"):
        checks.check_row_scales([1.0] * 16, w)


def test_twn_threshold():
    n = 200_000  # a smaller sample than the chapter's keeps the test fast; same rule
    gaussian = torch.randn(n, generator=torch.Generator().manual_seed(0)).double()
    magnitudes = gaussian.abs().sort(descending=True).values
    captured = magnitudes.cumsum(0) ** 2 / torch.arange(1, n + 1, dtype=torch.float64)
    answer = float(magnitudes[int(captured.argmax())] / magnitudes.mean())
    assert 0.72 < answer < 0.78
    assert checks.check_twn_threshold(answer, n=n)
    with wrong("units of sigma"):
        checks.check_twn_threshold(answer * math.sqrt(2 / math.pi), n=n)
    with wrong("not where the SQNR"):
        checks.check_twn_threshold(0.5, n=n)


# --------------------------------------------------------------------------- chapter 3


def good_sign_ste(w: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    q = torch.where(w >= 0, 1.0, -1.0)
    keep = (w.abs() <= scale).float()
    return q.detach() + keep * (w - w.detach())


def test_sign_ste():
    assert checks.check_sign_ste(good_sign_ste)
    assert checks.check_sign_ste(good_sign_ste, scale=0.25)
    with wrong("still None"):
        checks.check_sign_ste(None)
    with wrong("returned None"):
        checks.check_sign_ste(lambda w: None)
    with wrong(r"torch.sign\(0\) is 0"):
        checks.check_sign_ste(lambda w: torch.sign(w).detach() + (w - w.detach()))
    with wrong("identity STE"):
        checks.check_sign_ste(lambda w: torch.where(w >= 0, 1.0, -1.0) + (w - w.detach()))
    with wrong("no gradient reaches w"):
        checks.check_sign_ste(lambda w: torch.where(w >= 0, 1.0, -1.0))
    with wrong("use <="):
        checks.check_sign_ste(lambda w: torch.where(w >= 0, 1.0, -1.0) + (w.abs() < 1).float() * (w - w.detach()))
    with wrong("the value is w itself"):
        checks.check_sign_ste(lambda w: w * 1.0)
    # A scale-relative mask checked against the absolute convention is caught.
    with wrong("wrong gradient"):
        checks.check_sign_ste(lambda w: good_sign_ste(w, scale=0.5))


def test_absmax_activations():
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    codes, scale = quant.quantize_activations_absmax(x, 8)
    assert checks.check_absmax_activations(codes, scale, x)
    with wrong("int8"):
        checks.check_absmax_activations(codes.float(), scale, x)
    with wrong("per-tensor"):
        checks.check_absmax_activations(codes, x.abs().max() / 127, x)
    with wrong("keepdim"):
        checks.check_absmax_activations(codes, scale[..., 0], x)
    with wrong("factor 1/2"):
        checks.check_absmax_activations(codes, scale / 2, x)
    with wrong("truncated"):
        checks.check_absmax_activations((x / scale).to(torch.int8), scale, x)
    with wrong("shape of x"):
        checks.check_absmax_activations(codes[0], scale, x)


def test_outlier_cost():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=gen)
    x[::3, 5] = 30.0  # channel 5 is the outlier in every third token
    x[:, 6] = 0.0  # channel 6 is never any token's largest
    ruled = x.abs().argmax(dim=-1) == 5
    keep = torch.arange(16) != 5
    others = x[ruled][:, keep]
    whole = torch.mul(*quant.quantize_activations_absmax(x, 8))
    with_outlier = quant.sqnr_db(others, whole[ruled][:, keep])
    without = quant.sqnr_db(others, torch.mul(*quant.quantize_activations_absmax(others, 8)))
    assert without > with_outlier + 10
    assert checks.check_outlier_cost(with_outlier, without, x, 5)
    with wrong("swapped"):
        checks.check_outlier_cost(without, with_outlier, x, 5)
    with wrong("over all tokens"):
        checks.check_outlier_cost(quant.sqnr_db(x[:, keep], whole[:, keep]), without, x, 5)
    with wrong("outlier channel itself"):
        checks.check_outlier_cost(quant.sqnr_db(x[ruled], whole[ruled]), without, x, 5)
    with wrong("one scale for all"):
        checks.check_outlier_cost(with_outlier, quant.sqnr_db(others, quant.fake_quantize(others, 8)), x, 5)
    with wrong("no token"):
        checks.check_outlier_cost(with_outlier, without, x, 6)
    with wrong("fill in|None"):
        checks.check_outlier_cost(None, without, x, 5)


# --------------------------------------------------------------------------- chapter 4


def test_kd_loss():
    gen = torch.Generator().manual_seed(1)
    z_s, z_t, T = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen), 3.0
    p_t, log_p_s = torch.softmax(z_t / T, -1), torch.log_softmax(z_s / T, -1)
    rows = (p_t * (p_t.log() - log_p_s)).sum(-1)
    right = float(T**2 * rows.mean())
    assert checks.check_kd_loss(right, z_s, z_t, T)
    with wrong("missing the T\\^2"):
        checks.check_kd_loss(float(rows.mean()), z_s, z_t, T)
    with wrong("wrong way round"):
        p_s, log_p_t = log_p_s.exp(), p_t.log()
        checks.check_kd_loss(float(T**2 * (p_s * (log_p_s - log_p_t)).sum(-1).mean()), z_s, z_t, T)
    with wrong("average them"):
        checks.check_kd_loss(float(T**2 * rows.sum()), z_s, z_t, T)
    with wrong("single number"):
        checks.check_kd_loss(rows, z_s, z_t, T)


# --------------------------------------------------------------------------- chapter 5


def test_packed_byte():
    assert checks.check_packed_byte(0x46)
    with wrong("reverse order"):
        checks.check_packed_byte(0b10010001)  # codes 2, 1, 0, 1 with weight 0 in the top bits
    with wrong("two's complement"):
        checks.check_packed_byte(0b00110001)  # the trits 1, 0, -1 (0b11), 0 without the +1 offset
    with wrong(r"int in \[0, 255\]"):
        checks.check_packed_byte(256)
    with wrong("is not it"):
        checks.check_packed_byte(0x00)


def test_base3_trits():
    assert checks.check_base3_trits([1, -1, 1, -1, 1])
    with wrong("digits d"):
        checks.check_base3_trits([2, 0, 2, 0, 2])
    with wrong("five trits"):
        checks.check_base3_trits([1, -1, 1])
    with wrong("not the trits"):
        checks.check_base3_trits([0, 0, 0, 0, 0])
    # digits (2, 1, 0, 0, 0): q = 162 + 27 = 189, stored as ceil(256 * 189 / 243) = 200
    assert checks.check_base3_trits([1, 0, -1, -1, -1], byte=200)
    with wrong("reversed"):
        checks.check_base3_trits([-1, -1, -1, 0, 1], byte=200)


def test_trit_bytes():
    def trits_in(bits):
        return max(k for k in range(bits + 1) if 3**k <= 2**bits)

    answer = next(b for b in range(1, 100) if 8 * b * 5 < 8 * trits_in(8 * b))  # 8b / k < 1.6, exactly
    assert checks.check_trit_bytes(answer)
    with wrong("still None"):
        checks.check_trit_bytes(None)
    with wrong("must be an int"):
        checks.check_trit_bytes(float(answer))
    with wrong("number of bits"):
        checks.check_trit_bytes(8 * answer)
    with wrong("number of trits"):
        checks.check_trit_bytes(trits_in(8 * answer))
    with wrong("fewer bytes do too"):
        checks.check_trit_bytes(answer + 1)
    with wrong("1.6000 bits per trit, not less"):
        checks.check_trit_bytes(2)  # 16 bits hold 10 trits (16 / log2 3 = 10.09), exactly 1.6 bits each
    # round(8b / log2 3) overcounts where the fraction is >= 0.5: 21 bytes, 168 bits: 105.996 -> 106
    # trits, which do not fit.
    assert round(168 / math.log2(3)) == 106 and 3**106 > 2**168
    with wrong("floating-point logarithm overcounts"):
        checks.check_trit_bytes(21)

def test_embedding_shares():
    def share(vocab, hidden, layers, ffn, ffn_matrices, tables):
        emb = tables * vocab * hidden
        return emb / (emb + layers * (4 * hidden**2 + ffn_matrices * hidden * ffn))

    bert = share(30522, 768, 12, 3072, 2, 1)
    llama = share(32000, 4096, 32, 11008, 3, 2)
    assert 0.15 < bert < 0.25 and 0.03 < llama < 0.05
    assert checks.check_embedding_shares(bert, llama)
    with wrong("untied output projection"):
        checks.check_embedding_shares(bert, share(32000, 4096, 32, 11008, 3, 1))
    with wrong("three matrices"):
        checks.check_embedding_shares(bert, share(32000, 4096, 32, 11008, 2, 2))
    with wrong("percentage"):
        checks.check_embedding_shares(100 * bert, llama)
    with wrong("bert_share = 0.5000 is wrong"):
        checks.check_embedding_shares(0.5, llama)


# --------------------------------------------------------------------------- chapter 6


def test_xnor_dot():
    a, w = [1, -1, -1, 1, 1], [1, 1, -1, -1, 1]
    differ = sum(x != y for x, y in zip(a, w))
    dot = sum(x * y for x, y in zip(a, w))
    assert dot == len(a) - 2 * differ
    assert checks.check_xnor_dot(differ, dot)
    with wrong("still None"):
        checks.check_xnor_dot(None, dot)
    with wrong("where the bits agree"):
        checks.check_xnor_dot(len(a) - differ, dot)
    with wrong("K - 2 popcount"):
        checks.check_xnor_dot(differ, len(a) - differ)
    with wrong("sign flipped"):
        checks.check_xnor_dot(differ, -dot)
    with wrong("follows from your popcount"):
        checks.check_xnor_dot(differ + 2, len(a) - 2 * (differ + 2))
    with wrong("must be an int"):
        checks.check_xnor_dot(float(differ), dot)


def test_padding_error():
    padding = 128 - 100  # two 64-bit words for K = 100
    answer = -2 * padding
    assert checks.check_padding_error(answer)
    assert checks.check_padding_error(-2 * (64 - 10), k=10)
    assert checks.check_padding_error(0, k=128)  # no padding, no error
    with wrong("still None"):
        checks.check_padding_error(None)
    with wrong("direction is wrong"):
        checks.check_padding_error(-answer)
    with wrong("by 2, not 1"):
        checks.check_padding_error(-padding)
    with wrong("one padding bit's worth"):
        checks.check_padding_error(-2)
    with wrong("36 differing padding bits"):
        checks.check_padding_error(-2 * 36)  # the data bits of the last word counted as padding
    with wrong("not the error"):
        checks.check_padding_error(-55)


def _popcount(words) -> int:
    return int(np.bitwise_count(words).sum())


def test_ternary_binary_dot():
    def right(a, p, m):
        return 2 * _popcount(a & p) - _popcount(p) - 2 * _popcount(a & m) + _popcount(m)

    assert checks.check_ternary_binary_dot(right)
    with wrong("sign is flipped"):
        checks.check_ternary_binary_dot(lambda a, p, m: -right(a, p, m))
    with wrong("activation of −1"):
        checks.check_ternary_binary_dot(lambda a, p, m: 2 * (_popcount(a & p) - _popcount(a & m)))
    with wrong(r"the \+1 activations only"):
        checks.check_ternary_binary_dot(lambda a, p, m: _popcount(a & p) - _popcount(a & m))
    with wrong("must return an int"):
        checks.check_ternary_binary_dot(lambda a, p, m: None)


def test_gemv_roofs():
    bandwidth, k, n = 20.0, 4096, 11008

    def roof(weight, act, out):
        return bandwidth * n * k / (weight * n * k + act * k + out * n)

    f32, ternary = roof(4, 4, 4), roof(0.25, 1, 4)
    assert 15 < ternary / f32 < 16.1
    assert checks.check_gemv_roofs(f32, ternary, bandwidth)
    assert checks.check_gemv_roofs(bandwidth / 4, bandwidth * 4, bandwidth)  # weights only: within 2 %
    with wrong("still None"):
        checks.check_gemv_roofs(None, ternary, bandwidth)
    with wrong("swapped"):
        checks.check_gemv_roofs(ternary, f32, bandwidth)
    with wrong("intensity I in MAC/byte"):
        checks.check_gemv_roofs(f32 / bandwidth, ternary, bandwidth)
    with wrong("give GMAC/s"):
        checks.check_gemv_roofs(f32, ternary * 1e9, bandwidth)
    with wrong(r"float32 is 4 bytes \(32 bits\), not 32 bytes"):
        checks.check_gemv_roofs(roof(32, 32, 32), ternary, bandwidth)
    with wrong("quarter byte, not 2 bytes"):
        checks.check_gemv_roofs(f32, roof(2, 1, 4), bandwidth)
    with wrong(r"not log2\(3\)"):
        checks.check_gemv_roofs(f32, roof(math.log2(3) / 8, 1, 4), bandwidth)
    with wrong("1 bit is binary"):
        checks.check_gemv_roofs(f32, roof(1 / 8, 1, 4), bandwidth)
    with wrong("int8 weights"):
        checks.check_gemv_roofs(f32, roof(1, 1, 4), bandwidth)


# --------------------------------------------------------------------------- chapter 7


@pytest.fixture
def imdb_rows() -> dict:
    def row(file_bytes, weights_bytes, accuracy, evals=()):
        history = [{"epoch": i + 1, "eval_accuracy": acc, "eval_loss": loss, "train_loss": 1.0 / (i + 1)}
                   for i, (acc, loss) in enumerate(zip(evals, (0.5, 0.4, 0.3, 0.35)))]
        return {"file_bytes": file_bytes, "weights_bytes": weights_bytes, "accuracy": accuracy, "history": history}

    return {"fp32": row(90_000_000, 88_000_000, 22_700 / 25_000),
            "w1.58a8": row(9_000_000, 9_800_000, 22_300 / 25_000, (0.86, 0.89, 0.88, 0.885)),
            "w1a1": row(8_000_000, 8_100_000, 21_500 / 25_000)}


def test_table_reading(imdb_rows):
    assert checks.check_table_reading(90 / 8, 400, imdb_rows)
    with wrong("still None"):
        checks.check_table_reading(90 / 8, None, imdb_rows)
    with wrong("wrong way round"):
        checks.check_table_reading(8 / 90, 400, imdb_rows)
    with wrong("weights_bytes"):
        checks.check_table_reading(88 / 8.1, 400, imdb_rows)
    with wrong("W1.58A8 student's; the exercise asks for the W1A1"):
        checks.check_table_reading(90 / 9, 400, imdb_rows)
    with wrong("fraction of the reviews"):
        checks.check_table_reading(90 / 8, 400 / 25_000, imdb_rows)
    with wrong("percentage points"):
        checks.check_table_reading(90 / 8, 1.6, imdb_rows)
    with wrong("wrong sign"):
        checks.check_table_reading(90 / 8, -400, imdb_rows)
    with wrong("W1A1 student's; the exercise asks for W1.58A8"):
        checks.check_table_reading(90 / 8, 1200, imdb_rows)
    with wrong(r"not \(a_T - a_S\)"):
        checks.check_table_reading(90 / 8, 401, imdb_rows)


def test_energy_ratio():
    from labutils import measure

    t = measure.ENERGY_PJ
    assert checks.check_energy_ratio((t["fp16"]["mul"] + t["fp16"]["add"]) / t["int8"]["add"])
    with wrong("still None"):
        checks.check_energy_ratio(None)
    t7 = measure.ENERGY_PJ_7NM
    with wrong("7 nm table"):
        checks.check_energy_ratio((t7["fp16"]["mul"] + t7["fp16"]["add"]) / t7["int8"]["add"])
    with wrong("add the FP16 add"):
        checks.check_energy_ratio(t["fp16"]["mul"] / t["int8"]["add"])
    with wrong("needs no multiply"):
        checks.check_energy_ratio((t["fp16"]["mul"] + t["fp16"]["add"]) / (t["int8"]["mul"] + t["int8"]["add"]))
    with wrong("wrong way round"):
        checks.check_energy_ratio(t["int8"]["add"] / (t["fp16"]["mul"] + t["fp16"]["add"]))


def test_restored_epoch(imdb_rows):
    import pandas as pd

    history = imdb_rows["w1.58a8"]["history"]  # validation accuracy peaks at epoch 2 of 4, its loss at 3
    assert checks.check_restored_epoch(2, history)
    assert checks.check_restored_epoch(2, pd.DataFrame(history))
    with wrong("still None"):
        checks.check_restored_epoch(None, history)
    with wrong("is an accuracy"):
        checks.check_restored_epoch(0.89, history)
    with wrong("row's index"):
        checks.check_restored_epoch(1, history)
    with wrong("best by eval_loss"):
        checks.check_restored_epoch(3, history)
    with wrong("last one"):
        checks.check_restored_epoch(4, history)
    # A tie keeps the earlier epoch, as training does (it restores on a strict improvement only).
    tie = [{"epoch": 1, "eval_accuracy": 0.9}, {"epoch": 2, "eval_accuracy": 0.9}]
    assert checks.check_restored_epoch(1, tie)


# --------------------------------------------------------------------------- chapter 8


def test_kv_cache():
    from labutils.lm.experiment import SIZES

    n_layer, _, d = SIZES["700m"]
    kv = 2 * n_layer * 4096 * d * 2  # K and V, every layer, every position, fp16
    assert checks.check_kv_cache(kv, 4 * kv)
    assert checks.check_kv_cache(2 * kv, 8 * kv, context=8192)
    with wrong("still None"):
        checks.check_kv_cache(None, 4 * kv)
    with wrong(r"half: count both K and V"):
        checks.check_kv_cache(kv // 2, 2 * kv)
    with wrong("follows from your kv_bytes"):
        checks.check_kv_cache(kv // 2, 2 * kv)
    with wrong("double: fp16 is 2 bytes"):
        checks.check_kv_cache(2 * kv, 4 * kv)
    with wrong(f"one layer's cache: every one of the {n_layer} layers"):
        checks.check_kv_cache(kv // n_layer, 4 * kv)
    with wrong("in bits; give bytes"):
        checks.check_kv_cache(8 * kv, 4 * kv)
    with wrong("multiply the bytes by 4, not divide"):
        checks.check_kv_cache(kv, kv // 4)
    with wrong("stored in 2 bits, not 1"):
        checks.check_kv_cache(kv, 8 * kv)
    with wrong(r"not log2\(3\)"):
        checks.check_kv_cache(kv, round(8 * kv / math.log2(3)))
    with wrong("8- or 16-bit weights"):
        checks.check_kv_cache(kv, kv // 2)
    with wrong("must be an int"):
        checks.check_kv_cache(float(kv), 4 * kv)


@pytest.mark.slow
def test_generations():
    from labutils.lm.model import Decoder, LMConfig, generate

    torch.manual_seed(0)
    model = Decoder(LMConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=64))
    prompt = torch.tensor([[0, 5, 7]])

    def gen(**kw):
        return generate(model, prompt, 10, **kw)

    greedy = gen(temperature=0)
    s0, s1 = gen(temperature=1.0, seed=0), gen(temperature=1.0, seed=1)
    assert checks.check_generations(greedy, gen(temperature=0), s0, s1, model, prompt)
    with wrong("still None"):
        checks.check_generations(None, greedy, s0, s1, model, prompt)
    with wrong("the tensor generate returns"):
        checks.check_generations(greedy.tolist(), greedy, s0, s1, model, prompt)
    with wrong(r"shape \(1, 10\), expected \(1, 13\)"):
        checks.check_generations(greedy[:, 3:], greedy, s0, s1, model, prompt)
    with wrong("does not start with the prompt"):
        checks.check_generations(generate(model, torch.tensor([[1, 2, 3]]), 10, temperature=0), greedy, s0, s1,
                                 model, prompt)
    with wrong("two greedy runs differ"):
        checks.check_generations(greedy, s0, s0, s1, model, prompt)
    with wrong("not the arg-max"):
        checks.check_generations(s0, s0, s0, s1, model, prompt)
    with wrong("give them different seeds"):
        checks.check_generations(greedy, greedy, s0, s0, model, prompt)
    with wrong("sample with temperature=1.0"):
        checks.check_generations(greedy, greedy, greedy, greedy, model, prompt)


def test_check_decode_bounds():
    weights = 679_477_248  # the 700m size's projection weights
    right = {fmt: 20e9 / (weights * b) for fmt, b in checks.DECODE_BYTES_PER_WEIGHT.items()}
    assert checks.check_decode_bounds(right)
    with pytest.raises(checks.ExerciseError, match="keys"):
        checks.check_decode_bounds({"float32": 1.0})
    with pytest.raises(checks.ExerciseError, match="seconds per token"):
        checks.check_decode_bounds({**right, "int8": 1 / right["int8"]})
    with pytest.raises(checks.ExerciseError, match="2 bits"):
        checks.check_decode_bounds({**right, "ternary": 20e9 / (weights * math.log2(3) / 8)})
    with pytest.raises(checks.ExerciseError, match="bytes and seconds"):
        checks.check_decode_bounds({**right, "float32": right["float32"] / 1e9})
    with pytest.raises(checks.ExerciseError, match="float32"):
        checks.check_decode_bounds({**right, "float32": right["float32"] * 2})


def test_check_triple_encoding():
    from labutils.kernels import lut

    def right(w):
        sign = int(np.sign(w[np.flatnonzero(w)[0]])) if w.any() else 1
        return next(i for i, p in enumerate(lut.PATTERNS) if (p == sign * w).all()), sign

    assert checks.check_triple_encoding(right)
    with pytest.raises(checks.ExerciseError, match="flipped"):
        checks.check_triple_encoding(lambda w: (right(w)[0], -right(w)[1]) if w.any() else right(w))
    with pytest.raises(checks.ExerciseError, match="zero triple"):
        checks.check_triple_encoding(lambda w: right(w) if w.any() else (0, -1))
    with pytest.raises(checks.ExerciseError, match=r"\(index, sign\)"):
        checks.check_triple_encoding(lambda w: 3)
    with pytest.raises(checks.ExerciseError, match="function itself"):
        checks.check_triple_encoding(right(np.array([1, 0, 0])))
