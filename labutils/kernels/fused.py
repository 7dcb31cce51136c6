"""The steps a fused packed layer runs around its integer kernel, inlined into every path's
fused kernel (``microkernels_*._*_fused_*``): per-token activation quantization before it,
rescale and bias after it, in the same compiled call.

They compute, in float32 and in the same order, exactly what the unfused layer computes in
torch, so the fused layer's outputs equal the unfused layer's bit for bit (A8; W1A1's scale
``mean|x|`` is summed in float64 here and may differ from torch's float32 sum in the last bit):

- A8: ``scale = max(max|x|, eps) / Qp``, ``codes = clamp(rint(x / scale), -Qp, Qp)``
  (``quant.quantize_activations_absmax``), plus the row sum of the codes (the kernels' ``sum a``).
- W1A1: the sign bits of x (0 -> +1) in uint64 words (``pack_binary_rows``), scale ``mean|x|``.
- After: ``y = float32(dot) * x_scale * w_scale + bias``.

``quantize_rows_a8`` and ``rescale_rows`` run the same steps as two parallel calls of their own,
around a kernel that cannot take them inside (the AMX GEMM, ``labutils.kernels.amx``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_INLINE = {"cache": True, "boundscheck": False, "error_model": "numpy", "inline": "always"}


@njit(**_INLINE)
def _absmax_bits(xbits, r):  # pragma: no cover - compiled
    """max|x| of row r as a bit pattern: x viewed as int32 with the sign bit cleared, whose
    integer order is the order of the non-negative floats (NaN above inf). An integer max
    vectorizes where a float max with NaN semantics does not."""
    top = np.int32(0)
    for j in range(xbits.shape[1]):
        top = max(top, xbits[r, j] & np.int32(0x7FFFFFFF))
    return top


@njit(**_INLINE)
def _quantize_row_a8(xf, amax, codes, xs, rowsum, r, qp, eps):  # pragma: no cover - compiled
    """Row r of float32 x -> int8 codes (the padding columns of ``codes`` zero), its scale and
    the sum of its codes, given ``amax`` = max|x| of the row. ``qp``, ``eps``: float32."""
    k, kp = xf.shape[1], codes.shape[1]
    scale = max(amax, eps) / qp if amax == amax else amax  # NaN stays NaN
    xs[r] = scale
    total = np.int32(0)
    lo, hi = -qp, qp
    for j in range(k):
        c = np.int32(min(max(np.rint(xf[r, j] / scale), lo), hi))
        codes[r, j] = np.int8(c)
        total += c
    for j in range(k, kp):
        codes[r, j] = 0
    rowsum[r] = total


@njit(**_INLINE)
def _quantize_row_binary(xf, words, xs, r):  # pragma: no cover - compiled
    """Row r of float32 x -> its sign bits (bit k%64 of word k//64 is 1 where x >= 0) and
    ``mean|x|`` (float64 sum, rounded once to float32)."""
    k = xf.shape[1]
    total = 0.0
    for w in range(words.shape[1]):
        word = np.uint64(0)
        for b in range(min(64, k - 64 * w)):
            v = xf[r, 64 * w + b]
            total += abs(np.float64(v))
            word |= np.uint64(v >= 0) << np.uint64(b)
        words[r, w] = word
    xs[r] = np.float32(total / k)


@njit(**_INLINE)
def _rescale_block(dots, y, xs, ws, bias, lo, c0):  # pragma: no cover - compiled
    """y[lo + i, c0 + j] = float32(dots[i, j]) * xs[lo + i] * ws[c0 + j] + bias[c0 + j] for the
    columns below y's width (``ws`` and ``bias``: N values each, bias zeros where there is none)."""
    width = min(dots.shape[1], y.shape[1] - c0)
    for i in range(dots.shape[0]):
        s = xs[lo + i]
        for j in range(width):
            y[lo + i, c0 + j] = np.float32(dots[i, j]) * s * ws[c0 + j] + bias[c0 + j]


# --------------------------------------------------------------------------- shared by every path
# The public steps below are what a caller outside this module builds on: every path's fused
# layer (``microkernels_*.FUSED``) and the compiled encoder of ``labutils.engine.encoder``. The
# integer kernel itself comes in as ``task``, one path's ``a8_task`` / ``w1a1_task`` (a Numba
# dispatcher passed as an argument: the caller is compiled once per task it is given).

ROWS_PER_TASK = 128  # rows of activations per parallel task of a fused layer (multiple of 4)


@njit(**_INLINE)
def quantize_row_a8(xf, codes, xs, rowsum, r, qp, eps):  # pragma: no cover - compiled
    """Row r of float32 x [M, K] (C-contiguous) -> int8 codes [M, Kp] (padding columns zero),
    its float32 scale ``xs[r]`` and the int32 sum of its codes ``rowsum[r]``: per-token absmax
    quantization, as ``quant.quantize_activations_absmax``. ``qp``, ``eps``: float32."""
    amax = np.int32(_absmax_bits(xf.view(np.int32), r)).view(np.float32)  # the bits read as a float
    _quantize_row_a8(xf, amax, codes, xs, rowsum, r, qp, eps)


@njit(**_INLINE)
def quantize_row_binary(xf, words, xs, r):  # pragma: no cover - compiled
    """Row r of float32 x [M, K] -> its sign bits uint64 [M, ceil(K/64)] (1 where x >= 0) and
    ``xs[r] = mean|x|`` (float32)."""
    _quantize_row_binary(xf, words, xs, r)


@njit(**_INLINE)
def rescale_block(dots, y, xs, ws, bias, lo, c0):  # pragma: no cover - compiled
    """y[lo + i, c0 + j] = float32(dots[i, j]) * xs[lo + i] * ws[c0 + j] + bias[c0 + j] for the
    columns below y's width: an int32 block of dots [R, C] rescaled into float32 y [M, N]."""
    _rescale_block(dots, y, xs, ws, bias, lo, c0)


@njit(**_INLINE)
def a8_fused_layer(xf, w, ws, bias, y, qp, eps, bits, mult, task):  # pragma: no cover - compiled
    """The fused A8 layer on any path: float32 x [M, K] -> y [M, N] (see the module docstring):
    per-token absmax codes, scales and code sums, then per (column tile, block of rows) task
    ``task`` (a path's ``a8_task``) into a small int32 block and its rescale into y. ``bits``,
    ``mult``: 2, 1 for W1.58A8 and 1, 2 for W1A8. Returns the per-token scales float32 [M]."""
    m = xf.shape[0]
    kp = w.shape[1] * 32 // bits  # 16 k per group for 2-bit codes, 32 for 1-bit
    codes = np.empty((m, kp), dtype=np.int8)
    xs = np.empty(m, dtype=np.float32)
    rowsum = np.empty(m, dtype=np.int32)
    for r in prange(m):
        quantize_row_a8(xf, codes, xs, rowsum, r, qp, eps)
    chunks = (m + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for job in prange(w.shape[0] * chunks):
        t, lo = job // chunks, (job % chunks) * ROWS_PER_TASK
        hi = min(lo + ROWS_PER_TASK, m)
        dots = np.empty((hi - lo, 64), dtype=np.int32)
        task(codes[lo:hi], w[t : t + 1], rowsum[lo:hi], dots, 0, 0, hi - lo, bits, mult)
        _rescale_block(dots, y, xs, ws, bias, lo, 64 * t)
    return xs


@njit(**_INLINE)
def w1a1_fused_layer(xf, w, k, ws, bias, y, task):  # pragma: no cover - compiled
    """The fused W1A1 layer on any path: float32 x [M, K] -> y [M, N]: sign bits and mean|x| per
    row, then per task ``task`` (a path's ``w1a1_task``) into an int32 block and its rescale.
    Returns the per-token scales float32 [M]."""
    m, words = xf.shape[0], w.shape[1]
    signs = np.empty((m, words), dtype=np.uint64)
    xs = np.empty(m, dtype=np.float32)
    for r in prange(m):
        _quantize_row_binary(xf, signs, xs, r)
    chunks = (m + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for job in prange(w.shape[0] * chunks):
        t, lo = job // chunks, (job % chunks) * ROWS_PER_TASK
        hi = min(lo + ROWS_PER_TASK, m)
        dots = np.empty((hi - lo, 32), dtype=np.int32)
        task(signs[lo:hi], w[t : t + 1], k, dots, 0, 0, hi - lo)
        _rescale_block(dots, y, xs, ws, bias, lo, 32 * t)
    return xs


# --------------------------------------------------------------------------- around a separate kernel


@njit(cache=True, boundscheck=False, error_model="numpy", parallel=True)
def quantize_rows_a8(xf, kp, qp, eps):  # pragma: no cover - compiled
    """Every row of float32 x [M, K] (C-contiguous) -> (int8 codes [M, kp] with the padding
    columns zero, float32 scales [M], int32 code sums [M]): ``quantize_row_a8`` on every row, in
    parallel. ``kp`` >= K; ``qp``, ``eps``: float32."""
    m = xf.shape[0]
    codes = np.empty((m, kp), dtype=np.int8)
    xs = np.empty(m, dtype=np.float32)
    rowsum = np.empty(m, dtype=np.int32)
    for r in prange(m):
        quantize_row_a8(xf, codes, xs, rowsum, r, qp, eps)
    return codes, xs, rowsum


@njit(cache=True, boundscheck=False, error_model="numpy", parallel=True)
def rescale_rows(dots, xs, ws, bias, y):  # pragma: no cover - compiled
    """y[r, j] = float32(dots[r, j]) * xs[r] * ws[j] + bias[j] for every row r and the N columns
    of float32 y [M, N] (int32 dots [M, >= N]; ws, bias float32 [N]), in parallel over rows."""
    for r in prange(y.shape[0]):
        _rescale_block(dots[r : r + 1], y, xs, ws, bias, r, 0)
