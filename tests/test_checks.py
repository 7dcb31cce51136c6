"""The exercise self-checks accept right answers and say what is wrong with typical wrong ones."""

from __future__ import annotations

import math

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
