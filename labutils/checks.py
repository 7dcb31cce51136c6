"""Self-checks for the chapter exercises: call ``check_*()`` on your answer for instant feedback.

nbgrader's hidden tests do not run in Colab or for a reader on their own, so each exercise of
chapters 1 to 5 that asks for a value has a check here. A check recomputes the answer with
``labutils`` (so no answer is written in this file), compares, and either returns ``True`` after
printing what was right, or raises :class:`ExerciseError` with a message that says *what* is
wrong: a shape or a dtype, a factor of 2, the wrong reduction, the bit order reversed, the KL
divergence the wrong way round, ... Typical use, in a chapter's exercise cell::

    from labutils.checks import check_row_scales
    check_row_scales(my_row_scales, w)

Every check accepts plain Python numbers or lists where a tensor is natural, and refuses
``None`` with a reminder to fill in the answer.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import numpy as np
import torch

from labutils import packing, quant

__all__ = [
    "ExerciseError",
    "check_affine_by_hand",
    "check_sqnr_prediction",
    "check_row_scales",
    "check_twn_threshold",
    "check_sign_ste",
    "check_absmax_activations",
    "check_kd_loss",
    "check_packed_byte",
    "check_base3_trits",
    "check_embedding_shares",
]


class ExerciseError(AssertionError):
    """An answer to an exercise is wrong; the message says how."""


def _filled(value: object, name: str) -> None:
    if value is None:
        raise ExerciseError(f"{name} is still None: fill in your answer, then run the check again")


def _number(value: object, name: str) -> float:
    _filled(value, name)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ExerciseError(f"{name} must be a single number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ExerciseError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(float(value)):
        raise ExerciseError(f"{name} must be finite, got {value}")
    return float(value)


def _ratio_hint(mine: float, expected: float) -> str:
    """' (off by a factor 2)' and the like when mine/expected is a telling ratio, else ''."""
    if expected == 0 or mine == 0:
        return ""
    ratio = mine / expected
    for factor, words in ((2.0, "2"), (0.5, "1/2"), (-1.0, "-1 (sign flipped)"), (4.0, "4"), (0.25, "1/4"),
                          (9.0, "9"), (1 / 9, "1/9")):
        if math.isclose(ratio, factor, rel_tol=1e-3):
            return f" (off by a factor {words})"
    return f" (yours is {ratio:.3g} x the expected value)"


def _ok(message: str) -> bool:
    print(f"correct: {message}")
    return True


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


# --------------------------------------------------------------------------- chapter 4


def check_kd_loss(kd_loss: float, z_student: torch.Tensor, z_teacher: torch.Tensor, temperature: float) -> bool:
    """Exercise 4.1: ``T² · KL(softmax(z_t / T) || softmax(z_s / T))``, averaged over the rows."""
    mine = _number(kd_loss, "kd_loss")
    T = float(temperature)
    log_p_t = torch.log_softmax(z_teacher.double() / T, -1)
    log_p_s = torch.log_softmax(z_student.double() / T, -1)
    rows = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    expected = float(T**2 * rows.mean())
    if math.isclose(mine, expected, rel_tol=1e-4, abs_tol=1e-7):
        return _ok(f"{expected:.6f}")
    reversed_kl = float(T**2 * (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1).mean())
    if math.isclose(mine, reversed_kl, rel_tol=1e-4):
        raise ExerciseError("KL the wrong way round: the expectation is under the teacher, KL(p_t || p_s)")
    if math.isclose(mine, expected / T**2, rel_tol=1e-4):
        raise ExerciseError(f"missing the T^2 factor (off by a factor {T**2:g})")
    if math.isclose(mine, expected * z_student.shape[0], rel_tol=1e-4):
        raise ExerciseError("summed over the rows: average them")
    raise ExerciseError(f"{mine:.6f} is not T^2 KL(p_t || p_s){_ratio_hint(mine, expected)}")


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
