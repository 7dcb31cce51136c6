"""Self-checks for Lab 1, Quantization basics (``labs/source/lab01_quantization``).

Each check runs the learner's functions on more bit widths, shapes and edge cases than the
visible tests and compares them with ``labutils.quant``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from labutils import quant
from labutils.checks._common import (
    _fail,
    _function,
    _gen,
    _mistake,
    _ok,
    _parts,
    _ratio_hint,
    _run,
    _same,
    _typed,
    _where,
)

__all__ = [
    "check_lab1_quantize_symmetric",
    "check_lab1_quantize_asymmetric",
    "check_lab1_quantize_per_channel",
    "check_lab1_sqnr",
]


def _symmetric_codes(call: str, codes: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, bits: int,
                     ref: quant.QuantizedTensor, per: str) -> None:
    """The codes and scale of a symmetric quantizer against ``ref`` (``per``: "tensor" or "row")."""
    qp = 2 ** (bits - 1) - 1
    top = int(codes.abs().max())
    if x.abs().max() > 0 and top != qp:
        if top == qp + 1:
            raise _fail(call, f"the codes reach ±{top}: at {bits} bits Qp = 2^(b-1) - 1 = {qp}, not 2^(b-1)")
        if top == 7 and bits != 4:
            raise _fail(call, f"the largest code is 7, the 4-bit Qp, at bits={bits}: compute Qp = 2^(bits-1) - 1 = {qp}")
        if top > qp:
            raise _fail(call, f"codes up to ±{top} lie outside -{qp}..{qp}: clamp them to [-Qp, Qp]")
        raise _fail(call, f"the largest |code| is {top}: max|x| of each {per} must land on Qp = 2^(b-1) - 1 = {qp}")
    if not torch.isfinite(scale).all() or (scale <= 0).any():
        raise _fail(call, "a scale is 0 or not finite: keep it above zero, e.g. "
                          ".clamp_min(torch.finfo(torch.float32).tiny), so an all-zero x gives codes 0, not 0 / 0")
    if not _same(scale, ref.scale, rtol=1e-5, atol=1e-30):
        ratio = float((scale.double() / ref.scale.double()).median())
        raise _fail(call, f"scale is not max|x| / Qp per {per}{_ratio_hint(ratio, 1.0)}")
    if not torch.equal(codes, ref.codes):
        truncated = torch.clamp(torch.trunc(x / ref.scale), -qp, qp).to(torch.int8)
        if torch.equal(codes, truncated):
            raise _fail(call, "the codes are truncated toward 0 (as .to(torch.int8) does): round first, with torch.round")
        raise _fail(call, f"codes differ from round(x / scale) {_where(codes, ref.codes)}")


def check_lab1_quantize_symmetric(quantize_symmetric: Callable, dequantize_symmetric: Callable) -> bool:
    """Exercise 1: ``quantize_symmetric(x, bits) -> (codes int8, scale float32 [])`` and
    ``dequantize_symmetric(codes, scale)``, against ``quant.quantize(x, bits)`` at 2 to 8 bits."""
    _function(quantize_symmetric, "quantize_symmetric")
    _function(dequantize_symmetric, "dequantize_symmetric")
    cases = [(torch.randn(1000, generator=_gen(0)), 4)]
    cases += [(0.02 * torch.randn(48, 40, generator=_gen(b)), b) for b in (2, 3, 5, 8)]
    cases += [(torch.zeros(5), 8)]
    for x, bits in cases:
        out, call = _run(quantize_symmetric, "quantize_symmetric", x, bits)
        codes, scale = _parts(out, call, ("codes", "scale"))
        _typed(codes, call, "codes", torch.Tensor, dtype=torch.int8, shape=x.shape)
        _typed(scale, call, "scale", torch.Tensor)
        if scale.shape != ():
            raise _fail(call, f"one scale for the whole tensor: shape [] (a 0-dim tensor), got {list(scale.shape)}")
        _typed(scale, call, "scale", torch.Tensor, dtype=torch.float32)
        ref = quant.quantize(x, bits)
        _symmetric_codes(call, codes, scale, x, bits, ref, "tensor")
        x_hat, call = _run(dequantize_symmetric, "dequantize_symmetric", ref.codes, ref.scale)
        _typed(x_hat, call, "x_hat", torch.Tensor, dtype=torch.float32, shape=x.shape)
        expected = quant.dequantize(ref)
        if not _same(x_hat, expected):
            words = _mistake(x_hat, ((lambda: ref.codes.float(), "multiply the codes by the scale"),
                                     (lambda: ref.codes.float() / ref.scale, "multiply by the scale, do not divide")))
            raise _fail(call, words or f"x_hat is not codes · scale {_where(x_hat, expected)}")
    return _ok("codes and scales equal quant.quantize at 2, 3, 4, 5 and 8 bits; x_hat = codes · scale; "
               "an all-zero x gives zero codes")


def check_lab1_quantize_asymmetric(quantize_asymmetric: Callable, dequantize_asymmetric: Callable) -> bool:
    """Exercise 2: ``quantize_asymmetric(x, bits) -> (codes uint8, scale float32 [], zero_point int)`` and
    ``dequantize_asymmetric``, against ``quant.quantize(x, bits, symmetric=False)`` (the same grid,
    shifted by 2^(b-1) to unsigned codes)."""
    _function(quantize_asymmetric, "quantize_asymmetric")
    _function(dequantize_asymmetric, "dequantize_asymmetric")
    g = _gen(2)
    cases = [(torch.relu(torch.randn(1000, generator=g)), 4), (1.0 + torch.rand(500, generator=g), 3),
             (-2.0 - torch.rand(7, 9, generator=g), 5), (torch.randn(300, generator=g) + 1.5, 8),
             (torch.randn(200, generator=g), 2)]
    for x, bits in cases:
        out, call = _run(quantize_asymmetric, "quantize_asymmetric", x, bits)
        codes, scale, zero_point = _parts(out, call, ("codes", "scale", "zero_point"))
        _typed(codes, call, "codes", torch.Tensor, dtype=torch.uint8, shape=x.shape)
        _typed(scale, call, "scale", torch.Tensor, shape=())
        if isinstance(zero_point, torch.Tensor) or isinstance(zero_point, bool) or not isinstance(zero_point, int):
            raise _fail(call, f"zero_point must be a Python int (use int(...)), got {type(zero_point).__name__}")
        ref = quant.quantize(x, bits, symmetric=False)
        qmin = -(2 ** (bits - 1))
        levels = 2**bits - 1
        ref_codes, ref_z = (ref.codes.long() - qmin).to(torch.uint8), int(ref.zero_point) - qmin
        lo, hi = x.min(), x.max()
        if not _same(scale, ref.scale, rtol=1e-5, atol=1e-30):
            words = _mistake(scale, (
                (lambda: (hi.clamp(min=0) - lo.clamp(max=0)) / 2**bits,
                 f"divide the range by 2^b - 1 = {levels} steps, not by 2^b = {2**bits} levels"),
                (lambda: (hi - lo) / levels, "the range must include 0: lo = min(min x, 0), hi = max(max x, 0), "
                                            "so that 0.0 is a level (here all x have one sign)"),
            ), rtol=1e-5, atol=1e-30)
            ratio = float(scale / ref.scale) if float(ref.scale) else 0.0
            raise _fail(call, words or f"scale is not (hi - lo) / (2^b - 1){_ratio_hint(ratio, 1.0)}")
        if zero_point != ref_z:
            hint = "sign flipped: z = round(-lo / s)" if zero_point == -ref_z and ref_z else "z = round(-lo / s), the code of 0.0"
            raise _fail(call, f"zero_point {zero_point}, expected {ref_z}: {hint}")
        if not torch.equal(codes, ref_codes):
            unclamped = torch.round(x / ref.scale) + ref_z
            if (unclamped < 0).any() or (unclamped > levels).any():
                raise _fail(call, f"codes differ {_where(codes, ref_codes)}: clamp round(x / s) + z to [0, {levels}] "
                                  "before converting to uint8 (uint8 wraps around)")
            raise _fail(call, f"codes differ from clamp(round(x / s) + z, 0, {levels}) {_where(codes, ref_codes)}")
        x_hat, call = _run(dequantize_asymmetric, "dequantize_asymmetric", ref_codes, ref.scale, ref_z)
        _typed(x_hat, call, "x_hat", torch.Tensor, dtype=torch.float32, shape=x.shape)
        expected = quant.dequantize(ref)
        if not _same(x_hat, expected, rtol=1e-5, atol=1e-6):
            words = _mistake(x_hat, ((lambda: ref_codes.float() * ref.scale, "subtract the zero point: (codes - z) · s"),
                                     (lambda: (ref_codes.float() + ref_z) * ref.scale, "subtract the zero point, do not add it")),
                             rtol=1e-5, atol=1e-6)
            raise _fail(call, words or f"x_hat is not (codes - z) · s {_where(x_hat, expected)}")
        zero, call = _run(dequantize_asymmetric, "dequantize_asymmetric",
                          torch.tensor([ref_z], dtype=torch.uint8), ref.scale, ref_z)
        if float(zero[0]) != 0.0:
            raise _fail(call, f"the zero point must decode to exactly 0.0, got {float(zero[0])}")
    return _ok("scales, zero points and codes equal quant.quantize(symmetric=False) at 2 to 8 bits, "
               "on all-positive, all-negative and mixed inputs; 0.0 is exact")


def check_lab1_quantize_per_channel(quantize_per_channel: Callable) -> bool:
    """Exercise 3: ``quantize_per_channel(w, bits) -> (codes int8 [out, in], scale float32 [out, 1])``,
    against ``quant.quantize(w, bits, granularity="channel", axis=0)``."""
    _function(quantize_per_channel, "quantize_per_channel")
    g = _gen(3)
    zero_row = torch.randn(4, 10, generator=g)
    zero_row[2] = 0.0
    cases = [(torch.randn(64, 256, generator=_gen(1)) * torch.logspace(-2, 0, 64)[:, None], 4)]
    cases += [(torch.randn(*shape, generator=g), bits) for bits, shape in ((2, (5, 33)), (6, (40, 12)), (8, (1, 7)))]
    cases += [(zero_row, 4)]
    for w, bits in cases:
        out, call = _run(quantize_per_channel, "quantize_per_channel", w, bits,
                         _hint="a scale [out] does not broadcast against w [out, in]: keep the reduced dim, keepdim=True")
        codes, scale = _parts(out, call, ("codes", "scale"))
        _typed(codes, call, "codes", torch.Tensor, dtype=torch.int8, shape=w.shape)
        _typed(scale, call, "scale", torch.Tensor)
        out_features, in_features = w.shape
        if scale.shape != (out_features, 1):
            hint = {(out_features,): ": keep the reduced dim (keepdim=True) so the column broadcasts against w",
                    (1, in_features): ": that is one scale per column; reduce over dim 1, the inputs of each row",
                    (): ": that is one scale for the whole tensor; take max|w| of every row"}.get(tuple(scale.shape), "")
            raise _fail(call, f"scale must have shape [{out_features}, 1], one per row, got {list(scale.shape)}{hint}")
        ref = quant.quantize(w, bits, granularity="channel", axis=0)
        _symmetric_codes(call, codes, scale, w, bits, ref, "row")
    return _ok("codes and per-row scales equal quant.quantize(granularity='channel') at 2 to 8 bits; "
               "an all-zero row gives zero codes")


def check_lab1_sqnr(sqnr_db: Callable, sqnr_curve: Callable) -> bool:
    """Exercise 4: ``sqnr_db(reference, approx) -> float`` against ``quant.sqnr_db``, and
    ``sqnr_curve(w, bits_list, per_channel) -> [float]`` against ``quant.fake_quantize``."""
    _function(sqnr_db, "sqnr_db")
    _function(sqnr_curve, "sqnr_curve")
    x = torch.randn(2000, generator=_gen(0))
    a = torch.randn(3, 50, generator=_gen(4), dtype=torch.float64)
    for ref_in, approx in ((x, quant.fake_quantize(x, 3)), (a, a + 0.1 * torch.randn(3, 50, generator=_gen(5), dtype=torch.float64)),
                           (1000 * a, 1000 * a + 100 * torch.randn(3, 50, generator=_gen(5), dtype=torch.float64))):
        mine, call = _run(sqnr_db, "sqnr_db", ref_in, approx)
        if isinstance(mine, torch.Tensor) or not isinstance(mine, float):
            raise _fail(call, f"return a Python float (float(...)), got {type(mine).__name__}")
        expected = quant.sqnr_db(ref_in, approx)
        if abs(mine - expected) > 1e-6:
            ratio = 10 ** (expected / 10)
            words = next((w for v, w in ((2 * expected, "that is 20·log10: the SQNR is a ratio of powers, 10·log10"),
                                         (-expected, "the ratio is upside down: signal power over noise power"),
                                         (ratio, "that is the plain ratio; give it in dB, 10·log10(ratio)"),
                                         (10 * math.log(ratio), "use log10, not the natural log"))
                          if math.isclose(mine, v, rel_tol=1e-6)), None)
            raise _fail(call, f"{mine:.4f} dB, expected {expected:.4f} dB" + (f": {words}" if words else ""))
    w = torch.randn(64, 256, generator=_gen(1)) * torch.logspace(-2, 0, 64)[:, None]
    for bits_list, per_channel in (([2, 3, 4, 5, 6, 7, 8], False), ([2, 5, 8], True), ([8, 3], False)):
        mine, call = _run(sqnr_curve, "sqnr_curve", w, bits_list, per_channel)
        if not isinstance(mine, (list, tuple)) or len(mine) != len(bits_list):
            raise _fail(call, f"return a list of {len(bits_list)} floats, one per bit width, got {_show_len(mine)}")
        if not all(isinstance(v, float) for v in mine):
            raise _fail(call, f"every SQNR must be a Python float, got {[type(v).__name__ for v in mine]}")
        granularity = "channel" if per_channel else "tensor"
        expected = [quant.sqnr_db(w, quant.fake_quantize(w, b, granularity=granularity)) for b in bits_list]
        if max(abs(m - e) for m, e in zip(mine, expected)) > 1e-6:
            words = _mistake(torch.tensor(mine), (
                (lambda: torch.tensor([quant.sqnr_db(w, quant.fake_quantize(w, b)) for b in bits_list]),
                 "per_channel=True must use one scale per row (granularity='channel'); these are per tensor"),
                (lambda: torch.tensor([quant.sqnr_db(w, quant.fake_quantize(w, b, granularity="channel")) for b in bits_list]),
                 "per_channel=False must use one scale per tensor; these are per row"),
                (lambda: torch.tensor(expected[::-1]), "the values are in reverse order: follow bits_list"),
            ), rtol=1e-6, atol=1e-6)
            raise _fail(call, words or f"{[round(v, 3) for v in mine]} dB, expected {[round(v, 3) for v in expected]} dB")
    return _ok("sqnr_db equals quant.sqnr_db (float64 and scaled inputs too); sqnr_curve per tensor and per row")


def _show_len(value: object) -> str:
    return f"{type(value).__name__} of {len(value)}" if hasattr(value, "__len__") else type(value).__name__
