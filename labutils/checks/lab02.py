"""Self-checks for Lab 2, Binary versus ternary weights (``labs/source/lab02_binary_ternary``).

Each check runs the learner's functions on more shapes and edge cases (zeros, tiny weights, a
threshold above every weight) than the visible tests and compares them with ``labutils.quant``.
"""

from __future__ import annotations

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
    "check_lab2_binarize",
    "check_lab2_ternarize_absmean",
    "check_lab2_best_scale",
    "check_lab2_ternarize_threshold",
]


def _scale_mistakes(w: torch.Tensor, dim: int | None = None) -> tuple:
    """Scales people compute instead of mean|w| (per tensor, or over ``dim`` with keepdim)."""
    def stat(f):
        return (lambda: f(w)) if dim is None else (lambda: f(w, dim))
    if dim is None:
        fns = (lambda v: v.abs().amax(), lambda v: v.mean(), lambda v: v.pow(2).mean().sqrt(), lambda v: v.abs().sum())
    else:
        fns = (lambda v, d: v.abs().amax(dim=d, keepdim=True), lambda v, d: v.mean(dim=d, keepdim=True),
               lambda v, d: v.pow(2).mean(dim=d, keepdim=True).sqrt(), lambda v, d: v.abs().sum(dim=d, keepdim=True))
    words = ("max|w| (absmax), not the mean magnitude mean|w|", "the mean of w, not of |w|",
             "the RMS of w, not the mean of |w|", "the sum of |w|: divide by the number of weights")
    return tuple((stat(f), f"the scale is {text}") for f, text in zip(fns, words))


def check_lab2_binarize(binarize: Callable) -> bool:
    """Exercise 1: ``binarize(w) -> (codes int8 in {-1, +1}, scale float32 [] = mean|w|)`` against
    ``quant.binarize_sign``; 0 and -0.0 map to +1."""
    _function(binarize, "binarize")
    zeros = torch.tensor([[0.0, -0.0, 2.0], [-3.0, 0.0, 1.0]])
    for w in (0.02 * torch.randn(64, 48, generator=_gen(0)), zeros, torch.randn(3, 4, 5, generator=_gen(1))):
        out, call = _run(binarize, "binarize", w)
        codes, scale = _parts(out, call, ("codes", "scale"))
        _typed(codes, call, "codes", torch.Tensor, dtype=torch.int8, shape=w.shape)
        _typed(scale, call, "scale", torch.Tensor, shape=())
        ref_codes, ref_scale = quant.binarize_sign(w)
        if not torch.equal(codes, ref_codes):
            if (codes == 0).any():
                raise _fail(call, "some codes are 0: torch.sign(0) is 0, but every weight gets ±1 here "
                                  "(0 and -0.0 map to +1: torch.where(w >= 0, 1, -1))")
            if torch.equal(codes, -ref_codes):
                raise _fail(call, "the signs are flipped: +1 where w >= 0")
            raise _fail(call, f"codes differ from sign(w) {_where(codes, ref_codes)}")
        if not _same(scale, ref_scale):
            words = _mistake(scale, _scale_mistakes(w))
            raise _fail(call, words or f"scale {float(scale):.6g} is not mean|w|{_ratio_hint(float(scale), float(ref_scale))}")
    return _ok("codes sign(w) with 0 -> +1 and scale mean|w|, as quant.binarize_sign, on 2-D and 3-D weights")


def check_lab2_ternarize_absmean(ternarize_absmean: Callable) -> bool:
    """Exercise 2: ``ternarize_absmean(w, per_channel=False, eps=1e-5)`` against
    ``quant.ternarize_absmean``, per tensor and per row, on tiny and all-zero weights."""
    _function(ternarize_absmean, "ternarize_absmean")
    v = torch.randn(24, 40, generator=_gen(2)) * torch.linspace(0.1, 2.0, 24)[:, None]
    square = 0.02 * torch.randn(32, 32, generator=_gen(0))
    cases = [(square, False), (square, True), (v, False), (v, True),
             (1e-7 * torch.randn(50, generator=_gen(3)), False), (torch.zeros(4, 4), False)]
    for w, per_channel in cases:
        hint = "one gamma per row, a column [out, 1] (keepdim=True) that broadcasts against w" if per_channel else ""
        out, call = _run(ternarize_absmean, "ternarize_absmean", w, per_channel=per_channel, _hint=hint)
        codes, scale = _parts(out, call, ("codes", "scale"))
        _typed(codes, call, "codes", torch.Tensor, dtype=torch.int8, shape=w.shape)
        ref_codes, ref_scale = quant.ternarize_absmean(w, per_channel=per_channel)
        _typed(scale, call, "scale", torch.Tensor)
        if scale.shape != ref_scale.shape:
            hint = ""
            if per_channel and scale.shape == (w.shape[0],):
                hint = ": keep the reduced dim (keepdim=True)"
            elif per_channel and scale.shape in ((w.shape[1], 1), (1, w.shape[1])):
                hint = ": those are the columns' means; reduce over dim 1, one gamma per row"
            elif per_channel:
                hint = ": one gamma per row"
            raise _fail(call, f"scale must have shape {list(ref_scale.shape)}, got {list(scale.shape)}{hint}")
        if not torch.isfinite(scale).all():
            raise _fail(call, "scale is not finite: an all-zero w has gamma = 0 (the eps is in the division only)")
        if not _same(scale, ref_scale, rtol=1e-5, atol=1e-12):
            dim = 1 if per_channel else None
            words = _mistake(scale, ((lambda: ref_scale + 1e-5, "return gamma itself, not gamma + eps"),
                                     (lambda: w.abs().mean(dim=0).reshape(-1, 1),
                                      "those are the columns' means; reduce over dim 1, one gamma per row"),
                                     *_scale_mistakes(w, dim)), rtol=1e-5, atol=1e-12)
            raise _fail(call, words or f"scale is not gamma = mean|w| {_where(scale, ref_scale)}")
        if not torch.equal(codes, ref_codes):
            if codes.abs().max() > 1:
                raise _fail(call, f"codes up to ±{int(codes.abs().max())}: clip w / (gamma + eps) to [-1, 1] before rounding")
            if torch.equal(codes, torch.round(torch.clamp(w / ref_scale, -1, 1)).to(torch.int8)):
                raise _fail(call, "divide by gamma + eps, not gamma: eps matters when the weights are tiny")
            raise _fail(call, f"codes differ from round(clip(w / (gamma + eps), -1, 1)) {_where(codes, ref_codes)}")
    return _ok("codes and gamma equal quant.ternarize_absmean per tensor and per row, with tiny and all-zero weights")


def check_lab2_best_scale(best_scale: Callable) -> bool:
    """Exercise 3: ``best_scale(w, codes)``, the least-squares ``Σ w c / Σ c²`` as float32 [],
    0.0 when every code is 0."""
    _function(best_scale, "best_scale")
    g = _gen(4)
    w = 0.02 * torch.randn(64, 48, generator=_gen(0))
    v = torch.randn(300, generator=g)
    cases = [(w, quant.binarize_sign(w)[0]), (w, quant.ternarize_absmean(w)[0]),
             (v, torch.randint(-3, 4, (300,), generator=g, dtype=torch.int8)), (v, torch.zeros(300, dtype=torch.int8))]
    for x, codes in cases:
        alpha, call = _run(best_scale, "best_scale", x, codes)
        _typed(alpha, call, "the scale", torch.Tensor, dtype=torch.float32, shape=())
        c = codes.double()
        energy = float((c * c).sum())
        expected = float((x.double() * c).sum() / energy) if energy else 0.0
        mine = float(alpha)
        if energy == 0 and mine != 0.0:
            raise _fail(call, f"every code is 0: return 0.0 (Σ c² = 0, and 0 / 0 is NaN), got {mine}")
        if abs(mine - expected) > 1e-5 * max(1.0, abs(expected)):
            n = codes.numel()
            words = next((text for wrong, text in (
                (float((x.double() * c).sum()) / n, "divide by Σ c_i², not by the number of weights"),
                (float((x.double() * c).sum() / c.abs().sum()), "divide by Σ c_i² (the squares), not Σ |c_i|"),
                (float(x.abs().mean()), "that is mean|w|; it is the best scale for sign codes only"),
            ) if abs(mine - wrong) <= 1e-6 * max(1.0, abs(wrong))), None)
            raise _fail(call, words or f"{mine:.6g} is not Σ w c / Σ c² = {expected:.6g}{_ratio_hint(mine, expected)}")
    return _ok("Σ w c / Σ c² for sign, ternary and multi-level codes; 0.0 when every code is 0")


def _threshold_reference(w: torch.Tensor, t: float) -> tuple[torch.Tensor, float]:
    kept = w.abs() > t * w.abs().mean()
    return (torch.sign(w) * kept).to(torch.int8), float(w.abs()[kept].mean()) if kept.any() else 0.0


def check_lab2_ternarize_threshold(ternarize_threshold: Callable, sweep_thresholds: Callable) -> bool:
    """Exercise 4: ``ternarize_threshold(w, t)`` (t = 0.7 is ``quant.ternarize_twn``) and
    ``sweep_thresholds(w, ts) -> [(sparsity, sqnr_db)]``."""
    _function(ternarize_threshold, "ternarize_threshold")
    _function(sweep_thresholds, "sweep_thresholds")
    w = 0.02 * torch.randn(64, 48, generator=_gen(0))
    v = torch.randn(40, 30, generator=_gen(5))
    for x, t in ((w, 0.7), (v, 0.3), (v, 1.2), (w, 0.0), (v, 100.0)):
        out, call = _run(ternarize_threshold, "ternarize_threshold", x, t)
        codes, scale = _parts(out, call, ("codes", "scale"))
        _typed(codes, call, "codes", torch.Tensor, dtype=torch.int8, shape=x.shape)
        _typed(scale, call, "scale", torch.Tensor, shape=())
        ref_codes, ref_scale = _threshold_reference(x, t)
        if not torch.equal(codes, ref_codes):
            words = _mistake(codes, (
                (lambda: (torch.sign(x) * (x.abs() > t)).to(torch.int8), "the threshold is t · mean|w|, not t itself"),
                (lambda: (torch.sign(x) * (x.abs() >= t * x.abs().mean())).to(torch.int8),
                 "keep the weights with |w| > Δ strictly"),
                (lambda: (torch.sign(x) * (x.abs() <= t * x.abs().mean())).to(torch.int8),
                 "the small weights (|w| <= Δ) become 0, the large ones keep their sign"),
            ))
            raise _fail(call, words or f"codes differ from sign(w)·[|w| > t·mean|w|] {_where(codes, ref_codes)}")
        mine = float(scale)
        if ref_scale == 0.0 and mine != 0.0:
            raise _fail(call, f"no weight is kept: return the scale 0.0, got {mine} (the mean of nothing is NaN)")
        if abs(mine - ref_scale) > 1e-6 * max(1.0, ref_scale):
            words = "that is mean|w| over all the weights; average over the kept ones only" \
                if abs(mine - float(x.abs().mean())) < 1e-7 else None
            raise _fail(call, words or f"scale {mine:.6g} is not the mean of |w| over the kept weights "
                                       f"({ref_scale:.6g}){_ratio_hint(mine, ref_scale)}")
    ts = [0.0, 0.5, 0.7, 1.0, 2.0]
    sweep, call = _run(sweep_thresholds, "sweep_thresholds", w, ts)
    if not isinstance(sweep, (list, tuple)) or len(sweep) != len(ts):
        raise _fail(call, f"return one (sparsity, sqnr_db) pair per t: {len(ts)} pairs")
    for t, pair in zip(ts, sweep):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(p, float) for p in pair):
            raise _fail(call, f"each entry must be a pair of Python floats (sparsity, sqnr_db), got {pair!r} at t = {t}")
        codes, scale = _threshold_reference(w, t)
        expected = (quant.sparsity(codes), quant.sqnr_db(w, codes * scale))
        if max(abs(a - b) for a, b in zip(pair, expected)) > 1e-4:
            swapped = max(abs(a - b) for a, b in zip(pair[::-1], expected)) <= 1e-4
            raise _fail(call, "each pair is (sparsity, sqnr_db), in that order" if swapped else
                        f"at t = {t}: {pair}, expected ({expected[0]:.4f}, {expected[1]:.4f}) "
                        "(quant.sparsity of the codes, quant.sqnr_db of codes · scale)")
    return _ok("codes and least-squares scale for thresholds 0 to 100 · mean|w| (TWN at 0.7); the sweep's "
               "(sparsity, SQNR) pairs")
