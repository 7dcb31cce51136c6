"""Self-checks for the chapter exercises (import them from :mod:`labutils.checks`).

Each exercise of chapters 1 to 8 that asks for a value (or, in 8.2, for generated tokens) has a check here. A
check recomputes the answer with ``labutils`` (so no answer is written in this file), compares,
and either returns ``True`` after printing what was right, or raises :class:`ExerciseError` with
a message that says *what* is wrong: a shape or a dtype, a factor of 2 (K and V, fp16 bytes),
bits for bytes, a layer count forgotten, the wrong reduction, the bit order reversed, the KL
divergence the wrong way round, ... Typical use, in a chapter's exercise cell::

    from labutils.checks import check_row_scales
    check_row_scales(my_row_scales, w)

Every check accepts plain Python numbers or lists where a tensor is natural, and refuses
``None`` with a reminder to fill in the answer.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from collections.abc import Callable, Sequence

import numpy as np
import torch

from labutils import packing, quant
from labutils.checks._common import (
    ExerciseError,
    _filled,
    _function,
    _integer,
    _kd_mistake,
    _kd_reference,
    _number,
    _ok,
    _ratio_hint,
)

__all__ = [
    "ExerciseError",
    "check_affine_by_hand",
    "check_sqnr_prediction",
    "check_row_scales",
    "check_twn_threshold",
    "check_sign_ste",
    "check_absmax_activations",
    "check_outlier_cost",
    "check_kd_loss",
    "check_packed_byte",
    "check_base3_trits",
    "check_trit_bytes",
    "check_embedding_shares",
    "check_xnor_dot",
    "check_padding_error",
    "check_ternary_binary_dot",
    "check_gemv_roofs",
    "check_table_reading",
    "check_energy_ratio",
    "check_restored_epoch",
    "check_kv_cache",
    "check_generations",
    "check_decode_bounds",
    "check_triple_encoding",
    "DECODE_BYTES_PER_WEIGHT",
]


# --------------------------------------------------------------------------- chapter 1


def check_affine_by_hand(scale: float, zero_point: int, codes: Sequence[int],
                         x: Sequence[float] = (-0.5, 0.1, 1.5), bits: int = 2) -> bool:
    """Exercise 1.1: asymmetric ``bits``-bit quantization of ``x`` by hand, ``quant.quantize``'s conventions.

    Args:
        scale: your s (a float).
        zero_point: your z (an int).
        codes: your codes, one int per element of ``x``.
        x, bits: the exercise's numbers (defaults: [-0.5, 0.1, 1.5], 2 bits).
    """
    s = _number(scale, "scale")
    _filled(zero_point, "zero_point")
    _filled(codes, "codes")
    qt = quant.quantize(torch.tensor(list(x), dtype=torch.float32), bits, symmetric=False)
    s_ref, z_ref, codes_ref = float(qt.scale), int(qt.zero_point), qt.codes.tolist()
    qmin, qmax = quant.integer_range(bits, symmetric=False)
    if not math.isclose(s, s_ref, rel_tol=1e-3):
        levels = 2**bits - 1
        if math.isclose(s, (max(x) - min(x)) / 2**bits, rel_tol=1e-3):
            raise ExerciseError(f"scale {s:.4f}: divide the range by 2^b - 1 = {levels} steps, not by 2^b = {2**bits} levels")
        raise ExerciseError(f"scale {s:.4f} is not (max - min) / (2^b - 1) for this x{_ratio_hint(s, s_ref)}")
    if isinstance(zero_point, bool) or not isinstance(zero_point, numbers.Integral):
        raise ExerciseError(f"zero_point must be an integer code, got {zero_point!r}: round it")
    if int(zero_point) != z_ref:
        if int(zero_point) == -z_ref:
            raise ExerciseError(f"zero point {zero_point}: sign flipped; z = q_min - round(min(x) / s)")
        raise ExerciseError(f"zero point {zero_point} is wrong: z = q_min - round(min(x) / s) with q_min = {qmin}")
    mine = [int(c) for c in codes]
    if len(mine) != len(codes_ref):
        raise ExerciseError(f"codes: expected {len(codes_ref)} codes, one per element of x, got {len(mine)}")
    outside = [c for c in mine if not qmin <= c <= qmax]
    if outside:
        raise ExerciseError(f"codes {outside} are outside the {bits}-bit range [{qmin}, {qmax}]: clamp them")
    wrong = [i for i, (a, b) in enumerate(zip(mine, codes_ref)) if a != b]
    if wrong:
        raise ExerciseError(f"codes wrong at position(s) {wrong}: q = clamp(round(x / s) + z, {qmin}, {qmax})")
    return _ok(f"s = {s_ref:.4f}, z = {z_ref}, codes {codes_ref}")


def check_sqnr_prediction(prediction_db: float, sqnr_low_db: float, low_bits: int = 8, high_bits: int = 12) -> bool:
    """Exercise 1.3: the SQNR at ``high_bits`` predicted from the one at ``low_bits`` by the 6.02 dB/bit rule."""
    pred = _number(prediction_db, "prediction_db")
    base = _number(sqnr_low_db, "sqnr_low_db")
    extra = high_bits - low_bits
    expected = base + extra * 20 * math.log10(2)
    if math.isclose(pred, base + extra * 3.01, abs_tol=0.05):
        raise ExerciseError("you added 3 dB per bit: a bit halves the step, which divides the noise *power* by 4 (6.02 dB)")
    if math.isclose(pred, base + 6.02, abs_tol=0.05):
        raise ExerciseError(f"you added one bit's worth; {high_bits} - {low_bits} = {extra} bits are added")
    if abs(pred - expected) > 0.05:
        raise ExerciseError(f"prediction {pred:.2f} dB: expected {base:.2f} + {extra} x 6.02 dB")
    return _ok(f"{base:.2f} + {extra} x 6.02 = {expected:.2f} dB")


# --------------------------------------------------------------------------- chapter 2


def check_row_scales(row_scales: torch.Tensor, w: torch.Tensor) -> bool:
    """Exercise 2.1: the best per-row binary scales of ``w`` [out, in], a float tensor [out, 1]."""
    _filled(row_scales, "row_scales")
    if not isinstance(row_scales, torch.Tensor):
        raise ExerciseError(f"row_scales must be a torch.Tensor, got {type(row_scales).__name__}")
    if not row_scales.is_floating_point():
        raise ExerciseError(f"row_scales must be a float tensor, got dtype {row_scales.dtype}")
    _, expected = quant.binarize_sign(w, per_channel=True)
    if row_scales.shape != expected.shape:
        hint = ""
        if row_scales.shape == expected.shape[:1]:
            hint = ": use keepdim=True so that it broadcasts against the rows"
        elif row_scales.shape == (w.shape[1], 1) or row_scales.shape == (1, w.shape[1]):
            hint = ": you reduced over the wrong dim (rows are dim 0, reduce over dim 1)"
        raise ExerciseError(f"row_scales has shape {tuple(row_scales.shape)}, expected {tuple(expected.shape)}{hint}")
    mine = row_scales.detach().to(torch.float32)
    if torch.allclose(mine, expected, rtol=1e-4, atol=1e-7):
        return _ok(f"mean |W_ij| over each row, shape {tuple(expected.shape)}")
    for wrong, words in ((w.abs().amax(dim=1, keepdim=True), "max|W| of each row: the absmax scale, not the least-squares one"),
                         (w.abs().sum(dim=1, keepdim=True), "the sum of |W| over each row: divide by the row length"),
                         (w.mean(dim=1, keepdim=True), "the mean of W, not of |W|"),
                         (w.pow(2).mean(dim=1, keepdim=True).sqrt(), "the RMS of each row, not the mean of |W|")):
        if torch.allclose(mine, wrong.to(torch.float32), rtol=1e-4, atol=1e-7):
            raise ExerciseError(f"these are {words}")
    ratio = float((mine / expected).median())
    raise ExerciseError(f"not the optimal scales{_ratio_hint(ratio, 1.0)}; the best alpha_i minimises ||W_i - alpha_i sign(W_i)||^2")


def check_twn_threshold(threshold: float, *, n: int = 1_000_000, seed: int = 0) -> bool:
    """Exercise 2.3: the optimal ternary threshold of Gaussian weights, in units of mean|W|."""
    t = _number(threshold, "threshold")
    gaussian_w = torch.randn(n, generator=torch.Generator().manual_seed(seed)).double()
    magnitudes = gaussian_w.abs().sort(descending=True).values
    k = torch.arange(1, n + 1, dtype=torch.float64)
    captured = magnitudes.cumsum(0) ** 2 / k
    expected = float(magnitudes[int(captured.argmax())] / magnitudes.mean())
    sigma_units = expected * math.sqrt(2 / math.pi)
    if math.isclose(t, sigma_units, abs_tol=0.01):
        raise ExerciseError(f"{t:.3f} is in units of sigma; divide by mean|W| = sigma sqrt(2/pi) instead")
    if abs(t - expected) > 0.01:
        raise ExerciseError(f"threshold {t:.3f} x mean|W| is not where the SQNR of the top-k ternary curve peaks"
                            f"{_ratio_hint(t, expected)}")
    return _ok(f"{expected:.3f} x mean|W| ({sigma_units:.3f} sigma), near TWN's Gaussian value 0.75")


# --------------------------------------------------------------------------- chapter 3


def check_sign_ste(sign_ste: Callable[..., torch.Tensor], scale: float | None = None) -> bool:
    """Exercise 3.1: ``sign_ste(w)`` (or ``sign_ste(w, scale)``) has the value sign(w), sign(0) = +1,
    and the clipped-STE gradient 1[|w / scale| <= 1] (scale 1 when None)."""
    _filled(sign_ste, "sign_ste")
    if not callable(sign_ste):
        raise ExerciseError(f"sign_ste must be a function, got {type(sign_ste).__name__}")
    s = 1.0 if scale is None else _number(scale, "scale")
    w = torch.tensor([-2.0, -1.0, -0.75, -0.5, 0.0, 0.3, 0.8, 1.0, 1.5]) * s
    w.requires_grad_(True)
    out = sign_ste(w) if scale is None else sign_ste(w, scale)
    if out is None:
        raise ExerciseError("sign_ste returned None: return the tensor")
    if not isinstance(out, torch.Tensor) or out.shape != w.shape:
        raise ExerciseError(f"sign_ste must return a tensor of the input's shape {tuple(w.shape)}, got {out!r}")
    value = out.detach()
    expected_value = torch.where(w.detach() >= 0, 1.0, -1.0)
    if torch.equal(value, torch.sign(w.detach())):
        raise ExerciseError("torch.sign(0) is 0: the exercise maps 0 to +1 (use torch.where(w >= 0, 1.0, -1.0))")
    if torch.allclose(value, w.detach()):
        raise ExerciseError("the value is w itself: the forward pass must use the quantized value (q.detach() + ...)")
    if not torch.equal(value.to(torch.float32), expected_value):
        raise ExerciseError(f"wrong value {value.tolist()}, expected {expected_value.tolist()}")
    if not out.requires_grad:
        raise ExerciseError("no gradient reaches w: add the straight-through term (w - w.detach()), times the mask")
    (grad,) = torch.autograd.grad(out.sum(), w)
    expected_grad = (w.detach().abs() <= s).float()
    if torch.equal(grad, torch.ones_like(grad)):
        raise ExerciseError("the gradient is 1 everywhere: that is the identity STE; mask it with 1[|w / s| <= 1]")
    if torch.equal(grad, (w.detach().abs() < s).float()):
        raise ExerciseError("the gradient is 0 at |w / s| = 1: the clipped STE keeps the edges, use <=")
    if not torch.equal(grad, expected_grad):
        raise ExerciseError(f"wrong gradient {grad.tolist()}, expected {expected_grad.tolist()}")
    return _ok("value sign(w) with sign(0) = +1, gradient 1[|w / s| <= 1]")


def check_absmax_activations(codes: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, bits: int = 8) -> bool:
    """Chapter 3's activation exercise: per-token absmax codes (int8) and scales ([..., 1]) of ``x``.

    The reference is ``quant.quantize_activations_absmax(x, bits)``: ``scale = max|x| / (2^(b-1) - 1)``
    over the last dim, ``codes = round(x / scale)``, so ``x ≈ codes * scale``.
    """
    _filled(codes, "codes")
    _filled(scale, "scale")
    ref_codes, ref_scale = quant.quantize_activations_absmax(x, bits)
    if not isinstance(codes, torch.Tensor) or not isinstance(scale, torch.Tensor):
        raise ExerciseError("codes and scale must be torch tensors")
    if codes.shape != x.shape:
        raise ExerciseError(f"codes must have the shape of x {tuple(x.shape)}, got {tuple(codes.shape)}")
    if codes.dtype != ref_codes.dtype:
        raise ExerciseError(f"codes must be {ref_codes.dtype} (they are what is stored), got {codes.dtype}: use .to({ref_codes.dtype})")
    if scale.numel() == 1 and ref_scale.numel() > 1:
        raise ExerciseError("one scale for the whole tensor: that is per-tensor; take max|x| per token (over the last dim)")
    if scale.shape != ref_scale.shape:
        hint = " (keepdim=True)" if scale.shape == ref_scale.shape[:-1] else ""
        if scale.numel() == x.shape[-1]:
            hint = ": that is one scale per channel; reduce over the last dim, one scale per token"
        raise ExerciseError(f"scale must have shape {tuple(ref_scale.shape)}, got {tuple(scale.shape)}{hint}")
    mine = scale.detach().to(torch.float32)
    if not torch.allclose(mine, ref_scale, rtol=1e-5):
        raise ExerciseError(f"wrong scales{_ratio_hint(float((mine / ref_scale).median()), 1.0)}; "
                            f"scale = max|x| / {2 ** (bits - 1) - 1} per token")
    if not torch.equal(codes.to(ref_codes.dtype), ref_codes):
        n = int((codes.to(ref_codes.dtype) != ref_codes).sum())
        truncated = torch.trunc(x / ref_scale).to(ref_codes.dtype)
        if torch.equal(codes.to(ref_codes.dtype), truncated):
            raise ExerciseError("the codes are truncated (as .to(int8) does): round first, with torch.round")
        raise ExerciseError(f"{n} codes differ from round(x / scale)")
    return _ok(f"codes {tuple(codes.shape)} {codes.dtype}, scales {tuple(scale.shape)}")


def check_outlier_cost(sqnr_with_outlier: float, sqnr_without_outlier: float, x: torch.Tensor, channel: int,
                       bits: int = 8) -> bool:
    """Chapter 3's outlier exercise: in the tokens of ``x`` [tokens, channels] whose largest |x| sits
    in ``channel``, the SQNR (dB) of the *other* channels quantized per token with absmax to ``bits``
    bits as part of the whole token (outlier included), and quantized on their own (without it)."""
    mine_with = _number(sqnr_with_outlier, "sqnr_with_outlier")
    mine_without = _number(sqnr_without_outlier, "sqnr_without_outlier")
    if x.ndim != 2 or not 0 <= channel < x.shape[1]:
        raise ExerciseError(f"x must be [tokens, channels] holding channel {channel}, got shape {tuple(x.shape)}")
    ruled = x.abs().argmax(dim=-1) == channel
    if not bool(ruled.any()):
        raise ExerciseError(f"no token of x has its largest |x| in channel {channel}: pass the outlier channel")
    keep = torch.arange(x.shape[1]) != channel
    others = x[ruled][:, keep]
    whole = torch.mul(*quant.quantize_activations_absmax(x, bits))
    expected_with = quant.sqnr_db(others, whole[ruled][:, keep])
    expected_without = quant.sqnr_db(others, torch.mul(*quant.quantize_activations_absmax(others, bits)))

    def near(a: float, b: float) -> bool:
        return abs(a - b) < 0.05

    if near(mine_with, expected_with) and near(mine_without, expected_without):
        return _ok(f"{expected_with:.1f} dB with the outlier in the token, {expected_without:.1f} dB without: "
                   f"the outlier costs its {int(ruled.sum())} tokens' other channels {expected_without - expected_with:.1f} dB")
    if near(mine_with, expected_without) and near(mine_without, expected_with):
        raise ExerciseError("the two values are swapped: with the outlier in the token the step is larger, so the SQNR is lower")
    if not near(mine_with, expected_with):
        all_tokens = quant.sqnr_db(x[:, keep], whole[:, keep])
        with_channel = quant.sqnr_db(x[ruled], whole[ruled])
        if near(mine_with, all_tokens):
            raise ExerciseError("sqnr_with_outlier is measured over all tokens: keep only the tokens `ruled` by the outlier")
        if near(mine_with, with_channel):
            raise ExerciseError("sqnr_with_outlier includes the outlier channel itself: measure the other channels only (`keep`)")
        raise ExerciseError(f"sqnr_with_outlier {mine_with:.2f} dB: quantize the whole tokens per token, then compare "
                            f"their other channels with `others`")
    per_tensor = quant.sqnr_db(others, quant.fake_quantize(others, bits))
    if near(mine_without, per_tensor):
        raise ExerciseError("sqnr_without_outlier uses one scale for all the tokens: quantize `others` per token")
    raise ExerciseError(f"sqnr_without_outlier {mine_without:.2f} dB: quantize `others` per token with absmax, "
                        f"quant.quantize_activations_absmax(others, {bits})")


# --------------------------------------------------------------------------- chapter 4


def check_kd_loss(kd_loss: float, z_student: torch.Tensor, z_teacher: torch.Tensor, temperature: float) -> bool:
    """Exercise 4.1: ``T² · KL(softmax(z_t / T) || softmax(z_s / T))``, averaged over the rows."""
    mine = _number(kd_loss, "kd_loss")
    expected = _kd_reference(z_student, z_teacher, float(temperature))
    if math.isclose(mine, expected, rel_tol=1e-4, abs_tol=1e-7):
        return _ok(f"{expected:.6f}")
    words = _kd_mistake(mine, z_student, z_teacher, temperature)
    raise ExerciseError(words or f"{mine:.6f} is not T^2 KL(p_t || p_s){_ratio_hint(mine, expected)}")


# --------------------------------------------------------------------------- chapter 5


def check_packed_byte(byte: int, trits: Sequence[int] = (1, 0, -1, 0)) -> bool:
    """Exercise 5.1: four trits packed in one byte as 2-bit codes ``w + 1``, weight 0 in bits 1-0."""
    _filled(byte, "byte")
    if isinstance(byte, bool) or not isinstance(byte, numbers.Integral) or not 0 <= byte <= 255:
        raise ExerciseError(f"byte must be an int in [0, 255], got {byte!r}")
    expected = int(packing.pack_ternary_2bit(np.array(list(trits), dtype=np.int8))[0])
    if byte == expected:
        return _ok(f"0x{expected:02x} = 0b{expected:08b}")
    reversed_order = int(packing.pack_ternary_2bit(np.array(list(trits)[::-1], dtype=np.int8))[0])
    if byte == reversed_order:
        raise ExerciseError("the weights are in reverse order: weight 0 goes into the lowest bits (1-0)")
    no_offset = sum(((t & 0b11) << (2 * i)) for i, t in enumerate(trits))
    if byte == no_offset:
        raise ExerciseError("you stored the trits themselves (two's complement); store the codes w + 1 in {0, 1, 2}")
    raise ExerciseError(f"0x{byte:02x} = 0b{byte:08b} is not it: code w + 1, weight i in bits 2i+1..2i")


def check_base3_trits(trits: Sequence[int], byte: int = 0xC0) -> bool:
    """Exercise 5.2: the five trits (first weight first) that one base-3 byte holds."""
    _filled(trits, "trits")
    mine = [int(t) for t in trits]
    expected = packing.unpack_ternary_base3(np.array([byte], dtype=np.uint8), 5).tolist()
    if len(mine) != 5:
        raise ExerciseError(f"a base-3 byte holds five trits, got {len(mine)}")
    if any(t not in (-1, 0, 1) for t in mine):
        if all(t in (0, 1, 2) for t in mine) and [t - 1 for t in mine] == expected:
            raise ExerciseError("these are the digits d; the trits are d - 1")
        raise ExerciseError(f"trits must be in {{-1, 0, 1}}, got {mine}")
    if mine == expected:
        return _ok(f"{expected}")
    if mine[::-1] == expected:
        raise ExerciseError("reversed: the multiply-and-shift rule yields the first weight first")
    raise ExerciseError(f"not the trits of 0x{byte:02x}; digit i = (3 * (3^i * byte mod 256)) >> 8")


def _trits_in(bits: int) -> int:
    """The largest k with 3^k <= 2^bits, in exact integers."""
    k = 0
    while 3 ** (k + 1) <= 2**bits:
        k += 1
    return k


def check_trit_bytes(n_bytes: int, bits_per_trit: float = 1.6) -> bool:
    """Exercise 5.3: the fewest whole bytes whose bits hold trits at *less* than ``bits_per_trit`` bits each."""
    mine = _integer(n_bytes, "n_bytes")
    limit = Fraction(str(bits_per_trit))
    expected = next(b for b in range(1, 10_000) if Fraction(8 * b, _trits_in(8 * b)) < limit)
    k = _trits_in(8 * expected)
    if mine == expected:
        return _ok(f"{expected} bytes hold {k} trits (3^{k} <= 2^{8 * expected}): {8 * expected / k:.4f} bits per trit")
    if mine == 8 * expected:
        raise ExerciseError(f"{mine} is a number of bits: give whole bytes (bits / 8)")
    if mine == k:
        raise ExerciseError(f"{mine} is the number of trits the bytes hold: give the number of bytes")
    if mine < 1:
        raise ExerciseError(f"n_bytes must be at least 1, got {mine}")
    if mine > expected:
        raise ExerciseError(f"{mine} bytes do spend less than {bits_per_trit} bits per trit, but fewer bytes do too")
    held = _trits_in(8 * mine)
    if round(8 * mine / math.log2(3)) > held and Fraction(8 * mine, held + 1) < limit:
        raise ExerciseError(f"{mine} bytes hold {held} trits, not {held + 1}: 3^{held + 1} > 2^{8 * mine}. "
                            "A rounded floating-point logarithm overcounts; k is the largest with 3^k <= 2^m")
    raise ExerciseError(f"{mine} bytes hold {held} trits: {8 * mine / held:.4f} bits per trit, not less than {bits_per_trit}")


def check_embedding_shares(bert_share: float, llama_share: float) -> bool:
    """Exercise 5.4: the embedding share of the parameters of bert-base and a LLaMA-2-7B shape."""
    bert = _number(bert_share, "bert_share")
    llama = _number(llama_share, "llama_share")

    def share(vocab: int, hidden: int, layers: int, ffn: int, ffn_matrices: int, tables: int) -> float:
        embeddings = tables * vocab * hidden
        return embeddings / (embeddings + layers * (4 * hidden * hidden + ffn_matrices * hidden * ffn))

    messages = []
    for name, mine, expected, one_table, two_ffn in (
        ("bert_share", bert, share(30522, 768, 12, 3072, 2, 1), None, None),
        ("llama_share", llama, share(32000, 4096, 32, 11008, 3, 2), share(32000, 4096, 32, 11008, 3, 1),
         share(32000, 4096, 32, 11008, 2, 2)),
    ):
        if mine > 1:
            messages.append(f"{name} = {mine:g} is a percentage; give a fraction in [0, 1]")
        elif abs(mine - expected) <= 0.005:
            continue
        elif one_table is not None and abs(mine - one_table) <= 0.005:
            messages.append(f"{name}: count the untied output projection too (two tables of vocab x hidden)")
        elif two_ffn is not None and abs(mine - two_ffn) <= 0.005:
            messages.append(f"{name}: LLaMA's feed-forward has three matrices (gate, up, down)")
        else:
            messages.append(f"{name} = {mine:.4f} is wrong{_ratio_hint(mine, expected)}")
    if messages:
        raise ExerciseError("; ".join(messages))
    return _ok(f"bert-base {bert:.1%}, LLaMA-2-7B shape {llama:.1%}")


# --------------------------------------------------------------------------- chapter 6


def check_xnor_dot(popcount: int, dot: int, a: Sequence[int] = (1, -1, -1, 1, 1),
                   w: Sequence[int] = (1, 1, -1, -1, 1)) -> bool:
    """Exercise 6.1: ``popcount(a XOR w)`` of the packed signs and the dot product ``K - 2 popcount``."""
    mine_count = _integer(popcount, "popcount")
    mine_dot = _integer(dot, "dot")
    words = packing.pack_binary_rows(np.array([list(a), list(w)], dtype=np.int8))
    k = len(a)
    expected_count = int(np.bitwise_count(words[0] ^ words[1]).sum())
    expected_dot = k - 2 * expected_count
    messages = []
    if mine_count != expected_count:
        if mine_count == k - expected_count:
            messages.append(f"popcount {mine_count} counts the positions where the bits agree (XNOR); "
                            "popcount(a XOR w) counts those where they differ")
        else:
            messages.append(f"popcount {mine_count} is wrong: write +1 as bit 1 and -1 as bit 0, XOR, count the 1s")
    if mine_dot != expected_dot:
        if mine_dot == k - expected_count:
            messages.append(f"dot {mine_dot} = K - popcount: a differing position turns a +1 product into -1, "
                            "a change of 2, so the dot is K - 2 popcount")
        elif mine_dot == -expected_dot:
            messages.append(f"dot {mine_dot}: sign flipped, the dot is K - 2 popcount, not 2 popcount - K")
        elif mine_count != expected_count and mine_dot == k - 2 * mine_count:
            messages.append("dot follows from your popcount by K - 2 popcount; fix the popcount")
        else:
            messages.append(f"dot {mine_dot} is not K - 2 popcount with K = {k}")
    if messages:
        raise ExerciseError("; ".join(messages))
    return _ok(f"popcount {expected_count}, dot {k} - 2 x {expected_count} = {expected_dot}")


def check_padding_error(error: int, k: int = 100, *, seed: int = 0) -> bool:
    """Exercise 6.2: (K - 2 popcount(a XOR w)) - (true dot) when the activations' padding bits are 1
    and the weights' 0, for rows of ``k`` signs packed in 64-bit words."""
    mine = _integer(error, "error")
    rng = np.random.default_rng(seed)
    a_signs, w_signs = (np.where(rng.random((4, k)) < 0.5, -1, 1).astype(np.int8) for _ in range(2))
    a_words, w_words = packing.pack_binary_rows(a_signs), packing.pack_binary_rows(w_signs)
    padding = 64 * a_words.shape[1] - k
    if padding:
        a_words[:, -1] |= ~np.uint64(0) << np.uint64(64 - padding)
    formula = k - 2 * np.bitwise_count(a_words ^ w_words).sum(axis=1).astype(np.int64)
    errors = formula - (a_signs.astype(np.int64) * w_signs).sum(axis=1)
    expected = int(errors[0])
    assert (errors == expected).all()  # the same for every dot product
    if mine == expected:
        return _ok(f"{expected}: each of the {padding} padding bits differs and subtracts 2, for every dot product")
    if expected and mine == -expected:
        raise ExerciseError(f"{mine}: the direction is wrong; the formula comes out too small, so (formula) - (true dot) < 0")
    if expected and mine * 2 == expected:
        raise ExerciseError(f"{mine}: each differing bit changes K - 2 popcount by 2, not 1")
    if mine == -2:
        raise ExerciseError(f"{mine} is one padding bit's worth: all {padding} padding bits are set")
    if mine < 0 and mine % 2 == 0:
        raise ExerciseError(f"{mine} is {-mine // 2} differing padding bits; count the bits of the last word past K "
                            f"(the words hold {64 * a_words.shape[1]} bits, K = {k})")
    raise ExerciseError(f"{mine} is not the error; try it: set the padding bits of the activations and call xnor_dots")


def check_ternary_binary_dot(ternary_binary_dot: Callable[[np.ndarray, np.ndarray, np.ndarray], int]) -> bool:
    """Exercise 6.3: ``ternary_binary_dot(a_words, plus_words, minus_words)`` is ``a . w`` for one row
    of ±1 activations (bits ``a_words``, uint64) and ternary weights (masks ``plus_words`` where
    w = +1, ``minus_words`` where w = -1), for lengths that are not multiples of 64 and with the
    activations' padding bits set."""
    if not callable(ternary_binary_dot):
        raise ExerciseError(f"pass your function, got {type(ternary_binary_dot).__name__}")
    rng = np.random.default_rng(63)
    cases = []  # (K, padding set?, alpha, plus, minus, a . w, the answer)
    for k in (5, 64, 100, 130):
        for dirty in (False, True):
            a = np.where(rng.random(k) < 0.5, -1, 1).astype(np.int8)
            w = rng.integers(-1, 2, k).astype(np.int8)
            alpha = packing.pack_binary_rows(a[None])[0]
            if dirty and k % 64:
                alpha[-1] |= ~np.uint64(0) << np.uint64(k % 64)  # the activations' padding bits set to 1
            plus = packing.pack_binary_rows(np.where(w > 0, 1, -1).astype(np.int8)[None])[0]
            minus = packing.pack_binary_rows(np.where(w < 0, 1, -1).astype(np.int8)[None])[0]
            mine = ternary_binary_dot(alpha.copy(), plus.copy(), minus.copy())
            if mine is None or isinstance(mine, bool) or not isinstance(mine, (int, np.integer)):
                raise ExerciseError(f"ternary_binary_dot must return an int, got {type(mine).__name__} {mine!r}")
            cases.append((k, dirty, alpha, plus, minus, int(a.astype(np.int64) @ w), int(mine)))
    wrong = [c for c in cases if c[6] != c[5]]
    if not wrong:
        return _ok("a . w = 2 popcount(α ∧ β⁺) − popcount(β⁺) − 2 popcount(α ∧ β⁻) + popcount(β⁻), whatever α's padding")

    def count(words: np.ndarray) -> int:
        return int(np.bitwise_count(words).sum())

    mistakes = [  # what a typical wrong answer computes, and what to say
        (lambda al, p, m, dot: -dot, "the sign is flipped: w = β⁺ − β⁻"),
        (lambda al, p, m, dot: 2 * (count(al & p) - count(al & m)),
         "a 0 bit of α inside a mask is an activation of −1: each sum is 2 popcount(α ∧ β) − popcount(β)"),
        (lambda al, p, m, dot: count(al & p) - count(al & m),
         "this counts the +1 activations only; a 0 bit of α is −1, so each sum is 2 popcount(α ∧ β) − popcount(β)"),
    ]
    hint = next((text for guess, text in mistakes if all(c[6] == guess(c[2], c[3], c[4], c[5]) for c in cases)), None)
    if hint is None and all(c[1] for c in wrong):
        hint = ("right with zero padding, wrong when the activations' padding bits are 1: "
                "count α only where a mask is 1 (α ∧ β⁺, α ∧ β⁻), never popcount(α) alone")
    k, dirty, *_, expected, mine = wrong[0]
    raise ExerciseError(f"K = {k}{' (activation padding bits set)' if dirty else ''}: got {mine}, expected {expected}: "
                        f"{hint or 'write a . w as a sum over β⁺ minus a sum over β⁻, each with popcounts'}")


def _gemv_roof(bandwidth: float, k: int, n: int, weight: float, act: float, out: float) -> float:
    """GMAC/s at B GB/s when one GEMV moves its weights, input and output once (bytes per element)."""
    return bandwidth * k * n / (weight * n * k + act * k + out * n)


def check_gemv_roofs(f32_roof: float, ternary_roof: float, bandwidth: float, k: int = 4096, n: int = 11008) -> bool:
    """Exercise B.1 (appendix B): the memory roofs, in GMAC/s, of a float32 GEMV and a W1.58A8 GEMV (2-bit weights,
    int8 inputs, int32 outputs) of shape K x N at ``bandwidth`` GB/s."""
    f32 = _number(f32_roof, "f32_roof")
    ternary = _number(ternary_roof, "ternary_roof")
    b = _number(bandwidth, "bandwidth")
    expected = {"f32_roof": _gemv_roof(b, k, n, 4, 4, 4), "ternary_roof": _gemv_roof(b, k, n, 2 / 8, 1, 4)}

    def near(x: float, y: float) -> bool:
        return math.isclose(x, y, rel_tol=0.02)

    if near(f32, expected["ternary_roof"]) and near(ternary, expected["f32_roof"]):
        raise ExerciseError("the two roofs are swapped: the float32 GEMV moves more bytes, so its roof is lower")
    mistakes = {
        "f32_roof": [(_gemv_roof(b, k, n, 32, 32, 32), "float32 is 4 bytes (32 bits), not 32 bytes"),
                     (_gemv_roof(b, k, n, 2, 2, 2), "float32 is 4 bytes per number, not 2 (fp16)")],
        "ternary_roof": [(_gemv_roof(b, k, n, 2, 1, 4), "a 2-bit weight is a quarter byte, not 2 bytes"),
                         (_gemv_roof(b, k, n, math.log2(3) / 8, 1, 4),
                          "the kernel stores 2 bits per weight, not log2(3) = 1.58"),
                         (_gemv_roof(b, k, n, 1 / 8, 1, 4), "a ternary weight takes 2 bits; 1 bit is binary"),
                         (_gemv_roof(b, k, n, 1, 1, 4), "those are int8 weights; the ternary ones are packed 4 per byte")],
    }
    messages = []
    for name, mine in (("f32_roof", f32), ("ternary_roof", ternary)):
        roof = expected[name]
        if near(mine, roof):
            continue
        if near(mine, roof / b):
            messages.append(f"{name} {mine:.3g} is the intensity I in MAC/byte: multiply by the bandwidth B")
        elif near(mine, roof * 1e9) or near(mine, roof * 1e6):
            messages.append(f"{name} {mine:.3g}: give GMAC/s (with B in GB/s, B x I is already in GMAC/s)")
        else:
            hint = next((words for wrong, words in mistakes[name] if near(mine, wrong)), None)
            messages.append(f"{name}: {hint}" if hint else f"{name} {mine:.3g} is not B x I{_ratio_hint(mine, roof)}")
    if messages:
        raise ExerciseError("; ".join(messages))
    return _ok(f"float32 {expected['f32_roof']:.1f} GMAC/s, W1.58A8 {expected['ternary_roof']:.1f} GMAC/s at {b:.1f} GB/s")


# --------------------------------------------------------------------------- chapter 7


def check_table_reading(file_ratio: float, min_extra_errors: int, rows: dict, n_test: int = 25_000) -> bool:
    """Exercise 7.1: how many times smaller the W1A1 file is than the FP32 teacher's, and the fewest
    test reviews the W1.58A8 student gets wrong that the teacher gets right (``rows``: ``full["rows"]``)."""
    ratio = _number(file_ratio, "file_ratio")
    _filled(min_extra_errors, "min_extra_errors")
    teacher, small, student = rows["fp32"], rows["w1a1"], rows["w1.58a8"]
    expected_ratio = teacher["file_bytes"] / small["file_bytes"]
    gap = teacher["accuracy"] - student["accuracy"]
    expected_errors = round(gap * n_test)
    messages = []
    if not math.isclose(ratio, expected_ratio, rel_tol=1e-3):
        if math.isclose(ratio * expected_ratio, 1, rel_tol=1e-3):
            messages.append("file_ratio is the wrong way round: the teacher's bytes over the student's")
        elif math.isclose(ratio, teacher["weights_bytes"] / small["weights_bytes"], rel_tol=1e-3):
            messages.append("file_ratio compares weights_bytes (the tensors in memory); the files are file_bytes")
        elif math.isclose(ratio, teacher["file_bytes"] / student["file_bytes"], rel_tol=1e-3):
            messages.append("file_ratio is the W1.58A8 student's; the exercise asks for the W1A1 one")
        else:
            messages.append(f"file_ratio {ratio:.3g} is not the FP32 file over the W1A1 file{_ratio_hint(ratio, expected_ratio)}")
    errors = min_extra_errors
    if isinstance(errors, numbers.Real) and not isinstance(errors, (bool, numbers.Integral)):
        if math.isclose(errors, gap, rel_tol=1e-3):
            messages.append(f"min_extra_errors {errors:.4g} is a fraction of the reviews: times {n_test:,}")
        elif math.isclose(errors, 100 * gap, rel_tol=1e-3):
            messages.append(f"min_extra_errors {errors:.4g} is in percentage points: a count of the {n_test:,} reviews")
        else:
            messages.append(f"min_extra_errors must be an int (a number of reviews), got {errors!r}")
    else:
        mine = _integer(errors, "min_extra_errors")
        if mine == expected_errors:
            pass
        elif mine == -expected_errors:
            messages.append("min_extra_errors has the wrong sign: the teacher's accuracy minus the student's")
        elif mine == int(gap * n_test):
            messages.append(f"min_extra_errors: int() truncates {gap * n_test:.6f}; round it")
        elif mine == round((teacher["accuracy"] - small["accuracy"]) * n_test):
            messages.append("min_extra_errors is the W1A1 student's; the exercise asks for W1.58A8")
        else:
            messages.append(f"min_extra_errors {mine} is not (a_T - a_S) x {n_test:,}{_ratio_hint(mine, expected_errors)}")
    if messages:
        raise ExerciseError("; ".join(messages))
    return _ok(f"the W1A1 file is {expected_ratio:.1f} x smaller; at least {expected_errors} reviews "
               f"({gap:.2%} of {n_test:,}) the teacher gets right and the W1.58A8 student wrong")


def check_energy_ratio(ratio: float) -> bool:
    """Exercise 7.2: an FP16 multiply-add over an INT8 add, in the 45 nm table ``measure.ENERGY_PJ``."""
    from labutils import measure

    mine = _number(ratio, "ratio")

    def rule(table: dict, num: tuple[str, ...] = ("mul", "add"), fmt: str = "fp16", den: tuple[str, ...] = ("add",)) -> float:
        return sum(table[fmt][op] for op in num) / sum(table["int8"][op] for op in den)

    t45 = measure.ENERGY_PJ
    expected = rule(t45)
    if math.isclose(mine, expected, rel_tol=1e-3):
        return _ok(f"({t45['fp16']['mul']} + {t45['fp16']['add']}) / {t45['int8']['add']} = {expected:.1f}")
    for wrong, words in ((rule(measure.ENERGY_PJ_7NM), "that is the 7 nm table; use measure.ENERGY_PJ (45 nm)"),
                         (1 / expected, "the wrong way round: FP16 over INT8"),
                         (rule(t45, ("mul",)), "a multiply-add is a multiply and an add: add the FP16 add"),
                         (rule(t45, ("add",)), "a multiply-add is a multiply and an add: add the FP16 multiply"),
                         (rule(t45, den=("mul", "add")), "a ternary weight needs no multiply: divide by the INT8 add alone"),
                         (rule(t45, fmt="fp32"), "that is FP32; the rule prices an FP16 multiply-add")):
        if math.isclose(mine, wrong, rel_tol=1e-3):
            raise ExerciseError(f"ratio {mine:.4g}: {words}")
    raise ExerciseError(f"ratio {mine:.4g} is not (FP16 mul + FP16 add) / INT8 add at 45 nm{_ratio_hint(mine, expected)}")


def check_restored_epoch(epoch: int, history: Sequence[dict], monitor: str = "eval_accuracy") -> bool:
    """Exercise 7.3: the epoch a student trained with ``restore_best=True`` ends at (``history``: its
    per-epoch rows, a list of dicts or a DataFrame)."""
    from labutils import distill

    if hasattr(history, "to_dict"):
        history = history.to_dict("records")
    rows = list(history)
    _filled(epoch, "epoch")
    if isinstance(epoch, numbers.Real) and not isinstance(epoch, numbers.Integral) and 0 < epoch < 1:
        raise ExerciseError(f"{epoch} is an accuracy; give the epoch it was reached at")
    mine = _integer(epoch, "epoch")
    expected = distill.restored_epoch(rows, monitor)
    best = next(r for r in rows if int(r["epoch"]) == expected)[monitor]
    if mine == expected:
        return _ok(f"epoch {expected}, the best {monitor} ({best:.4f}): the validation hold-out chose it, not the test set")
    epochs = [int(r["epoch"]) for r in rows]
    if 0 <= mine < len(rows) and epochs[mine] == expected:
        raise ExerciseError(f"{mine} looks like the row's index (what idxmax returns); give that row's epoch column")
    if mine == epochs[-1]:
        raise ExerciseError(f"epoch {mine} is the last one; restore_best goes back to the best {monitor}")
    for other in distill.MONITORS:
        if other != monitor and other in rows[0] and distill.restored_epoch(rows, other) == mine:
            raise ExerciseError(f"epoch {mine} is the best by {other}; the students are restored by {monitor}")
    raise ExerciseError(f"epoch {mine} is not the epoch of the best {monitor}")


# --------------------------------------------------------------------------- chapter 8


def check_kv_cache(kv_bytes: int, equivalent_weights: int, size: str = "700m", context: int = 4096,
                   batch: int = 1, weight_bits: int = 2) -> bool:
    """Exercise 8.1: the bytes of the fp16 KV cache of the ``size`` decoder at ``context`` tokens, and
    how many ``weight_bits``-bit weights take the same bytes."""
    from labutils.lm.experiment import SIZES
    from labutils.lm.model import KVCache, LMConfig

    kv = _integer(kv_bytes, "kv_bytes")
    weights = _integer(equivalent_weights, "equivalent_weights")
    n_layer, n_head, d_model = SIZES[size]
    config = LMConfig(vocab_size=8, n_layer=n_layer, n_head=n_head, d_model=d_model, max_seq_len=context)
    expected_kv = KVCache(config, batch, dtype=torch.float16, device="meta").nbytes
    expected_weights = expected_kv * 8 // weight_bits
    messages = []
    if kv != expected_kv:
        for wrong, words in ((expected_kv // 4, "a quarter: count both K and V, and 2 bytes per fp16 number"),
                             (expected_kv // 2, "half: count both K and V (factor 2), each 2 bytes per fp16 number"),
                             (expected_kv * 2, "double: fp16 is 2 bytes per number (not 4), K and V counted once each"),
                             (expected_kv // n_layer, f"one layer's cache: every one of the {n_layer} layers keeps its own"),
                             (expected_kv * 8, "in bits; give bytes (8 bits each)")):
            if kv == wrong:
                messages.append(f"kv_bytes {kv:,} is {words}")
                break
        else:
            messages.append(f"kv_bytes {kv:,} is not layers x (K and V) x tokens x d_model x 2 bytes"
                            f"{_ratio_hint(kv, expected_kv)}")
    if weights != expected_weights:
        per_byte = 8 // weight_bits
        if kv != expected_kv and weights == kv * per_byte:
            messages.append("equivalent_weights follows from your kv_bytes; fix that")
        elif weights == expected_kv // per_byte:
            messages.append(f"equivalent_weights: a {weight_bits}-bit weight is 1/{per_byte} byte, so multiply the bytes "
                            f"by {per_byte}, not divide")
        elif weights == expected_kv * 8:
            messages.append(f"equivalent_weights: a ternary weight is stored in {weight_bits} bits, not 1")
        elif math.isclose(weights, expected_kv * 8 / math.log2(3), rel_tol=1e-3):
            messages.append(f"equivalent_weights: the weights are stored at {weight_bits} bits, not log2(3) = 1.58")
        elif weights in (expected_kv, expected_kv // 2):
            messages.append("equivalent_weights: those are 8- or 16-bit weights; the ternary ones take "
                            f"{weight_bits} bits")
        else:
            messages.append(f"equivalent_weights {weights:,} is not the bytes at {weight_bits} bits per weight"
                            f"{_ratio_hint(weights, expected_weights)}")
    if messages:
        raise ExerciseError("; ".join(messages))
    return _ok(f"{expected_kv:,} bytes of KV cache = {expected_weights:,} weights at {weight_bits} bits")


DECODE_BYTES_PER_WEIGHT = {"float32": 4.0, "int8": 1.0, "ternary": 0.25}
"""Bytes a projection weight takes in Exercise 8.3's formats (ternary: the packed 2-bit codes)."""


def check_decode_bounds(tokens_per_s: dict, size: str = "700m", bandwidth: float = 20e9) -> bool:
    """Exercise 8.3: the tokens per second that reading every projection weight once per token
    allows at ``bandwidth`` bytes/s, for each format of ``DECODE_BYTES_PER_WEIGHT``
    (``{"float32": ..., "int8": ..., "ternary": ...}``; embeddings, head and KV cache left out)."""
    from labutils.lm.experiment import SIZES
    from labutils.lm.model import LMConfig

    if not isinstance(tokens_per_s, dict) or set(tokens_per_s) != set(DECODE_BYTES_PER_WEIGHT):
        raise ExerciseError(f"tokens_per_s must be a dict with the keys {sorted(DECODE_BYTES_PER_WEIGHT)}")
    n_layer, n_head, d_model = SIZES[size]
    c = LMConfig(vocab_size=8, n_layer=n_layer, n_head=n_head, d_model=d_model)
    weights = n_layer * (4 * d_model**2 + 3 * d_model * c.ffn_hidden)  # q, k, v, o; gate, up, down
    messages = []
    for fmt, per_weight in DECODE_BYTES_PER_WEIGHT.items():
        mine, expected = _number(tokens_per_s[fmt], f"tokens_per_s[{fmt!r}]"), bandwidth / (weights * per_weight)
        if math.isclose(mine, expected, rel_tol=0.01):
            continue
        if math.isclose(mine, 1 / expected, rel_tol=0.01):
            messages.append(f"{fmt}: that is seconds per token; tokens/s is its inverse")
        elif fmt == "ternary" and math.isclose(mine, bandwidth / (weights * math.log2(3) / 8), rel_tol=0.01):
            messages.append("ternary: the codes are stored in 2 bits each (a quarter byte), not log2(3) = 1.58")
        elif math.isclose(mine, expected * 1e9, rel_tol=0.01) or math.isclose(mine, expected / 1e9, rel_tol=0.01):
            messages.append(f"{fmt}: the bandwidth is {bandwidth:.3g} bytes/s; keep bytes and seconds")
        else:
            messages.append(f"{fmt}: {mine:.3g} tokens/s is not bandwidth / (projection weights x bytes per weight)"
                            f"{_ratio_hint(mine, expected)}")
    if messages:
        raise ExerciseError("; ".join(messages))
    bounds = ", ".join(f"{fmt} {bandwidth / (weights * b):.1f}" for fmt, b in DECODE_BYTES_PER_WEIGHT.items())
    return _ok(f"{weights:,} projection weights per token at {bandwidth / 1e9:g} GB/s: {bounds} tokens/s")


def check_generations(greedy: torch.Tensor, greedy_again: torch.Tensor, sampled: torch.Tensor,
                      sampled_other: torch.Tensor, model: torch.nn.Module, prompt: torch.Tensor,
                      new_tokens: int = 10) -> bool:
    """Exercise 8.2: two greedy continuations of ``prompt`` (equal) and two sampled ones with
    different seeds (different), each ``new_tokens`` tokens after the prompt, from ``generate``."""
    from labutils.lm.model import generate

    named = {"greedy": greedy, "greedy_again": greedy_again, "sampled": sampled, "sampled_other": sampled_other}
    for name, value in named.items():
        _filled(value, name)
        if not isinstance(value, torch.Tensor):
            raise ExerciseError(f"{name} must be the tensor generate returns, got {type(value).__name__}")
    expected = generate(model, prompt, new_tokens, temperature=0)
    for name, value in named.items():
        if value.shape != expected.shape:
            raise ExerciseError(f"{name} has shape {tuple(value.shape)}, expected {tuple(expected.shape)}: "
                                f"the prompt's {prompt.shape[1]} tokens and {new_tokens} new ones")
        if not torch.equal(value[:, : prompt.shape[1]], prompt):
            raise ExerciseError(f"{name} does not start with the prompt: continue the same prompt")
    if not torch.equal(greedy, greedy_again):
        raise ExerciseError("the two greedy runs differ: generate both with temperature=0 (the arg-max)")
    if not torch.equal(greedy, expected):
        raise ExerciseError("greedy is not the arg-max continuation: temperature=0 makes generate greedy")
    if torch.equal(sampled, sampled_other):
        if torch.equal(sampled, expected):
            raise ExerciseError("the samples are the greedy continuation: sample with temperature=1.0")
        raise ExerciseError("the two samples are equal: give them different seeds")
    return _ok("greedy decoding repeats itself; two seeds give two different samples")


def check_triple_encoding(encode: Callable) -> bool:
    """Exercise 8.4: ``encode(w)`` -> ``(index, sign)`` for three ternary weights w (int array
    [3]), as ``labutils.kernels.lut`` packs them: ``sign * PATTERNS[index] == w``, index in
    0..13, sign +1 or -1 (+1 for the zero triple). Tried on all 27 triples."""
    import itertools

    from labutils.kernels import lut

    _function(encode, "encode")
    for triple in itertools.product((-1, 0, 1), repeat=3):
        w = np.array(triple)
        packed = lut.pack_lut(w.reshape(1, 3).astype(np.int8)).data[0, 0]
        expected = (int(packed[0, 0] & 15), -1 if packed[4, 0] & 1 else 1)
        got = encode(w.copy())
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            raise ExerciseError(f"encode({list(triple)}) must return (index, sign), got {got!r}")
        index, sign = _integer(got[0], "index"), _integer(got[1], "sign")
        if (index, sign) == expected:
            continue
        if not 0 <= index < len(lut.PATTERNS) or sign not in (-1, 1):
            raise ExerciseError(f"encode({list(triple)}) = {(index, sign)}: index must be in 0..13 and sign +1 or -1")
        if not w.any():
            raise ExerciseError("the zero triple is pattern 0 with sign +1")
        if (lut.PATTERNS[index] == -sign * w).all():
            raise ExerciseError(f"encode({list(triple)}) = {(index, sign)}: the sign is flipped (sign * pattern must give w)")
        raise ExerciseError(f"encode({list(triple)}) = {(index, sign)}, but {sign} x PATTERNS[{index}] = "
                            f"{list(sign * lut.PATTERNS[index])}: find the pattern equal to w or -w")
    return _ok("all 27 triples: a sign and one of 14 patterns, 5 bits for 3 weights (1.67 bits a weight)")
