"""The AVX2 microkernels: 256-bit (ymm) vectors, 4 rows x 2 vectors of columns per step.

AVX2 has 16 ymm registers (AVX-512 has 32 zmm), so the blocks are smaller than the AVX-512
path's 4 x 4, and neither popcount nor VNNI is one instruction:

- **W1A1**: ``ctpop`` on ymm is a nibble lookup (``vpshufb`` twice) plus ``vpsadbw`` to sum
  the bytes of each word. Here the byte counts of up to 31 words are summed in bytes (at most
  8 per byte and word, 31 x 8 = 248 < 256) and ``vpsadbw`` runs once per 31 words.
- **A8**: ``vpmaddubsw`` multiplies 32 unsigned weight codes by 32 signed activation bytes and
  adds adjacent pairs into 16 int16 lanes; ``vpmaddwd`` with ones adds adjacent int16 lanes
  into int32. With the byte order of the A8 layout (4 consecutive bytes = 4 k of one column)
  the pair computes exactly what ``vpdpbusd`` does, so the same ``PackedWeights`` serve both
  paths. The int16 sums are kept for up to 63 steps (ternary: |pair| <= 2 * 2 * 128 = 512,
  63 x 512 < 32768) or 127 (binary codes: 256 per pair) before one widening. On a CPU with a
  256-bit VNNI (AVX-VNNI: Intel since Alder Lake, AMD Zen 5; or AVX512-VNNI with VL) the same
  loops run ``vpdpbusd`` on ymm instead (``simd._dot_step8``): 4 products summed straight
  into int32, one instruction where the pair took two.

Both read the prepacked tiles of ``layout``: a 64-byte vector of the AVX-512 layout is two ymm.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from labutils.kernels.fused import _absmax_bits, _quantize_row_a8, _quantize_row_binary, _rescale_block
from labutils.kernels.simd import (
    _dot_step8,
    _sad_u64,
    _store_affine,
    _store_xnor,
    _vand,
    _vload32,
    _vshr,
    _vsplat_quad8,
    _vsplat_word4,
    _vstore,
    _widen_step,
    _step_zeros,
    _vzeros_i32x8,
    _vzeros_u8x32,
    _vzeros_u64x4,
    _xor_lut_add,
    _xor_nibble_add,
    _xor_popcount_add,
)

_ROWS_PER_TASK = 128  # rows of activations per parallel task (multiple of 4)
_PANEL_MIN_ROWS = 16  # from this many rows per task, decode the weight tile once (A8 kernels)
_BYTE_WORDS = 31  # words whose nibble counts a byte accumulator holds (31 x 8 <= 255)
_INLINE = {"cache": True, "boundscheck": False, "error_model": "numpy", "inline": "always"}

# --------------------------------------------------------------------------- W1A1


@njit(**_INLINE)
def _w1a1_tile4(x, w, out, r, t, s, k):  # pragma: no cover - compiled
    """Rows r..r+3 x columns 32t+8s .. 32t+8s+7 (2 ymm of 4 uint64 lanes): 8 byte accumulators,
    widened into 8 word accumulators every 31 words."""
    words, cols = x.shape[1], out.shape[1]
    q00 = q01 = q10 = q11 = q20 = q21 = q30 = q31 = _vzeros_u64x4()
    for i0 in range(0, words, _BYTE_WORDS):
        b00 = b01 = b10 = b11 = b20 = b21 = b30 = b31 = _vzeros_u8x32()
        for i in range(i0, min(i0 + _BYTE_WORDS, words)):
            base = (t * words + i) * 32 + 8 * s
            w0, w1 = _vload32(w, base), _vload32(w, base + 4)
            a = _vsplat_word4(x, r * words + i)
            b00, b01 = _xor_nibble_add(b00, a, w0), _xor_nibble_add(b01, a, w1)
            a = _vsplat_word4(x, (r + 1) * words + i)
            b10, b11 = _xor_nibble_add(b10, a, w0), _xor_nibble_add(b11, a, w1)
            a = _vsplat_word4(x, (r + 2) * words + i)
            b20, b21 = _xor_nibble_add(b20, a, w0), _xor_nibble_add(b21, a, w1)
            a = _vsplat_word4(x, (r + 3) * words + i)
            b30, b31 = _xor_nibble_add(b30, a, w0), _xor_nibble_add(b31, a, w1)
        q00, q01, q10, q11 = _sad_u64(q00, b00), _sad_u64(q01, b01), _sad_u64(q10, b10), _sad_u64(q11, b11)
        q20, q21, q30, q31 = _sad_u64(q20, b20), _sad_u64(q21, b21), _sad_u64(q30, b30), _sad_u64(q31, b31)
    o = r * cols + 32 * t + 8 * s
    _store_xnor(out, o, q00, k)
    _store_xnor(out, o + 4, q01, k)
    _store_xnor(out, o + cols, q10, k)
    _store_xnor(out, o + cols + 4, q11, k)
    _store_xnor(out, o + 2 * cols, q20, k)
    _store_xnor(out, o + 2 * cols + 4, q21, k)
    _store_xnor(out, o + 3 * cols, q30, k)
    _store_xnor(out, o + 3 * cols + 4, q31, k)


@njit(**_INLINE)
def _w1a1_nibble_planes(x, w, t, lo, hi, xs, panel):  # pragma: no cover - compiled
    """Split activation rows lo..hi-1 and weight tile t into low and high nibble planes (each
    byte & 0x0f, then (byte >> 4) & 0x0f), so the popcount loop needs no shift and no mask.

    xs[((r - lo) * words + i) * 2 + plane]; panel[((i * 4 + s) * 2 + plane) * 8 + lane] for
    column 32t + 8s + lane: the 8 columns of block s are 2 contiguous ymm per plane."""
    words = x.shape[1]
    low = np.uint64(0x0F0F0F0F0F0F0F0F)
    four = np.uint64(4)
    for r in range(lo, hi):
        for i in range(words):
            a = x[r, i]
            xs[((r - lo) * words + i) * 2] = a & low
            xs[((r - lo) * words + i) * 2 + 1] = (a >> four) & low
    for i in range(words):
        for c in range(32):
            v = w[t, i, c]
            s, lane = c // 8, c % 8
            panel[((i * 4 + s) * 2) * 8 + lane] = v & low
            panel[((i * 4 + s) * 2 + 1) * 8 + lane] = (v >> four) & low


@njit(**_INLINE)
def _w1a1_tile4_planes(xs, panel, out, r, rl, t, s, words, k):  # pragma: no cover - compiled
    """_w1a1_tile4 on nibble planes (rows r..r+3, local row rl in xs): per word, 4 weight loads,
    8 broadcasts, 16 xor + vpshufb + vpaddb."""
    cols = out.shape[1]
    q00 = q01 = q10 = q11 = q20 = q21 = q30 = q31 = _vzeros_u64x4()
    for i0 in range(0, words, _BYTE_WORDS):
        b00 = b01 = b10 = b11 = b20 = b21 = b30 = b31 = _vzeros_u8x32()
        for i in range(i0, min(i0 + _BYTE_WORDS, words)):
            base = (i * 4 + s) * 16
            l0, l1, h0, h1 = _vload32(panel, base), _vload32(panel, base + 4), _vload32(panel, base + 8), _vload32(panel, base + 12)
            j = (rl * words + i) * 2
            al, ah = _vsplat_word4(xs, j), _vsplat_word4(xs, j + 1)
            b00, b01 = _xor_lut_add(_xor_lut_add(b00, al, l0), ah, h0), _xor_lut_add(_xor_lut_add(b01, al, l1), ah, h1)
            j += 2 * words
            al, ah = _vsplat_word4(xs, j), _vsplat_word4(xs, j + 1)
            b10, b11 = _xor_lut_add(_xor_lut_add(b10, al, l0), ah, h0), _xor_lut_add(_xor_lut_add(b11, al, l1), ah, h1)
            j += 2 * words
            al, ah = _vsplat_word4(xs, j), _vsplat_word4(xs, j + 1)
            b20, b21 = _xor_lut_add(_xor_lut_add(b20, al, l0), ah, h0), _xor_lut_add(_xor_lut_add(b21, al, l1), ah, h1)
            j += 2 * words
            al, ah = _vsplat_word4(xs, j), _vsplat_word4(xs, j + 1)
            b30, b31 = _xor_lut_add(_xor_lut_add(b30, al, l0), ah, h0), _xor_lut_add(_xor_lut_add(b31, al, l1), ah, h1)
        q00, q01, q10, q11 = _sad_u64(q00, b00), _sad_u64(q01, b01), _sad_u64(q10, b10), _sad_u64(q11, b11)
        q20, q21, q30, q31 = _sad_u64(q20, b20), _sad_u64(q21, b21), _sad_u64(q30, b30), _sad_u64(q31, b31)
    o = r * cols + 32 * t + 8 * s
    _store_xnor(out, o, q00, k)
    _store_xnor(out, o + 4, q01, k)
    _store_xnor(out, o + cols, q10, k)
    _store_xnor(out, o + cols + 4, q11, k)
    _store_xnor(out, o + 2 * cols, q20, k)
    _store_xnor(out, o + 2 * cols + 4, q21, k)
    _store_xnor(out, o + 3 * cols, q30, k)
    _store_xnor(out, o + 3 * cols + 4, q31, k)


@njit(**_INLINE)
def _w1a1_tile4_ctpop(x, w, out, r, t, s, k):  # pragma: no cover - compiled
    """_w1a1_tile4 with LLVM's ctpop on each ymm (vpshufb lookup + vpsadbw per vector): the
    variant the byte accumulators were measured against."""
    words, cols = x.shape[1], out.shape[1]
    q00 = q01 = q10 = q11 = q20 = q21 = q30 = q31 = _vzeros_u64x4()
    for i in range(words):
        base = (t * words + i) * 32 + 8 * s
        w0, w1 = _vload32(w, base), _vload32(w, base + 4)
        a = _vsplat_word4(x, r * words + i)
        q00, q01 = _xor_popcount_add(q00, a, w0), _xor_popcount_add(q01, a, w1)
        a = _vsplat_word4(x, (r + 1) * words + i)
        q10, q11 = _xor_popcount_add(q10, a, w0), _xor_popcount_add(q11, a, w1)
        a = _vsplat_word4(x, (r + 2) * words + i)
        q20, q21 = _xor_popcount_add(q20, a, w0), _xor_popcount_add(q21, a, w1)
        a = _vsplat_word4(x, (r + 3) * words + i)
        q30, q31 = _xor_popcount_add(q30, a, w0), _xor_popcount_add(q31, a, w1)
    o = r * cols + 32 * t + 8 * s
    _store_xnor(out, o, q00, k)
    _store_xnor(out, o + 4, q01, k)
    _store_xnor(out, o + cols, q10, k)
    _store_xnor(out, o + cols + 4, q11, k)
    _store_xnor(out, o + 2 * cols, q20, k)
    _store_xnor(out, o + 2 * cols + 4, q21, k)
    _store_xnor(out, o + 3 * cols, q30, k)
    _store_xnor(out, o + 3 * cols + 4, q31, k)


@njit(**_INLINE)
def _w1a1_tile1(x, w, out, r, t, k):  # pragma: no cover - compiled
    """Row r x columns 32t .. 32t+31 (8 ymm): the GEMV, and the rows _w1a1_tile4 leaves."""
    words, cols = x.shape[1], out.shape[1]
    q0 = q1 = q2 = q3 = q4 = q5 = q6 = q7 = _vzeros_u64x4()
    for i0 in range(0, words, _BYTE_WORDS):
        b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = _vzeros_u8x32()
        for i in range(i0, min(i0 + _BYTE_WORDS, words)):
            base = (t * words + i) * 32
            a = _vsplat_word4(x, r * words + i)
            b0, b1 = _xor_nibble_add(b0, a, _vload32(w, base)), _xor_nibble_add(b1, a, _vload32(w, base + 4))
            b2, b3 = _xor_nibble_add(b2, a, _vload32(w, base + 8)), _xor_nibble_add(b3, a, _vload32(w, base + 12))
            b4, b5 = _xor_nibble_add(b4, a, _vload32(w, base + 16)), _xor_nibble_add(b5, a, _vload32(w, base + 20))
            b6, b7 = _xor_nibble_add(b6, a, _vload32(w, base + 24)), _xor_nibble_add(b7, a, _vload32(w, base + 28))
        q0, q1, q2, q3 = _sad_u64(q0, b0), _sad_u64(q1, b1), _sad_u64(q2, b2), _sad_u64(q3, b3)
        q4, q5, q6, q7 = _sad_u64(q4, b4), _sad_u64(q5, b5), _sad_u64(q6, b6), _sad_u64(q7, b7)
    o = r * cols + 32 * t
    _store_xnor(out, o, q0, k)
    _store_xnor(out, o + 4, q1, k)
    _store_xnor(out, o + 8, q2, k)
    _store_xnor(out, o + 12, q3, k)
    _store_xnor(out, o + 16, q4, k)
    _store_xnor(out, o + 20, q5, k)
    _store_xnor(out, o + 24, q6, k)
    _store_xnor(out, o + 28, q7, k)


@njit(**_INLINE)
def _w1a1_task(x, w, k, out, t, lo, hi):  # pragma: no cover - compiled
    """Rows lo..hi-1 x column tile t. Tasks of 16 rows or more split their rows and tile into
    nibble planes first (``_w1a1_nibble_planes``); smaller ones count on the fly. For each block
    of 4 rows the 4 column blocks of a tile run back to back, so the rows' words stay in L1."""
    words = x.shape[1]
    r = lo
    if hi - lo >= _PANEL_MIN_ROWS:
        xs = np.empty((hi - lo) * words * 2, dtype=np.uint64)
        panel = np.empty(words * 64, dtype=np.uint64)
        _w1a1_nibble_planes(x, w, t, lo, hi, xs, panel)
        while r + 4 <= hi:
            for s in range(4):
                _w1a1_tile4_planes(xs, panel, out, r, r - lo, t, s, words, k)
            r += 4
    while r + 4 <= hi:
        for s in range(4):
            _w1a1_tile4(x, w, out, r, t, s, k)
        r += 4
    while r < hi:
        _w1a1_tile1(x, w, out, r, t, k)
        r += 1


@njit(**_INLINE)
def _w1a1_body(x, w, k, out):  # pragma: no cover - compiled
    """x uint64 [M, Kw], w uint64 [T, Kw, 32] -> out int32 [M, 32T]; tasks = (tile, row chunk)."""
    m = x.shape[0]
    chunks = (m + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(w.shape[0] * chunks):
        t, lo = task // chunks, (task % chunks) * _ROWS_PER_TASK
        _w1a1_task(x, w, k, out, t, lo, min(lo + _ROWS_PER_TASK, m))


@njit(**_INLINE)
def _w1a1_fused_body(xf, w, k, ws, bias, y):  # pragma: no cover - compiled
    """The fused W1A1 layer: float32 x [M, K] -> y [M, N] (``fused``): sign bits and mean|x| per
    row, then per task the kernel into a small int32 block and its rescale into y."""
    m, words = xf.shape[0], w.shape[1]
    bits = np.empty((m, words), dtype=np.uint64)
    xs = np.empty(m, dtype=np.float32)
    for r in prange(m):
        _quantize_row_binary(xf, bits, xs, r)
    chunks = (m + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(w.shape[0] * chunks):
        t, lo = task // chunks, (task % chunks) * _ROWS_PER_TASK
        hi = min(lo + _ROWS_PER_TASK, m)
        dots = np.empty((hi - lo, 32), dtype=np.int32)
        _w1a1_task(bits[lo:hi], w[t : t + 1], k, dots, 0, 0, hi - lo)
        _rescale_block(dots, y, xs, ws, bias, lo, 32 * t)
    return xs


@njit(cache=True, boundscheck=False, error_model="numpy", parallel=True)
def _w1a1_parallel(x, w, k, out):  # pragma: no cover - compiled
    _w1a1_body(x, w, k, out)


@njit(cache=True, boundscheck=False, error_model="numpy")
def _w1a1_serial(x, w, k, out):  # pragma: no cover - compiled
    _w1a1_body(x, w, k, out)


@njit(cache=True, boundscheck=False, error_model="numpy")
def _w1a1_serial_ctpop(x, w, k, out):  # pragma: no cover - compiled
    """One thread, _w1a1_tile4_ctpop for the blocks of 4 rows (to measure the two popcounts)."""
    m = x.shape[0]
    for t in range(w.shape[0]):
        r = 0
        while r + 4 <= m:
            for s in range(4):
                _w1a1_tile4_ctpop(x, w, out, r, t, s, k)
            r += 4
        while r < m:
            _w1a1_tile1(x, w, out, r, t, k)
            r += 1


# --------------------------------------------------------------------------- A8 (W1A8, W1.58A8)


@njit(**_INLINE)
def _a8_tile4(x, w, out, r, t, s, rowsum, bits, mult):  # pragma: no cover - compiled
    """Rows r..r+3 x columns 64t+16s .. +15 (2 ymm) of ``mult * sum(code * x) - rowsum``, the
    codes decoded on the fly (``& mask``, then ``>> bits`` for the next field)."""
    kp, groups, cols = x.shape[1], w.shape[1], out.shape[1]
    fields, mask = 8 // bits, (1 << bits) - 1
    d00 = d01 = d10 = d11 = d20 = d21 = d30 = d31 = _vzeros_i32x8()
    for g0 in range(0, groups, 15):  # 15 groups = 60 (ternary) or 120 (binary) int16 steps
        e00 = e01 = e10 = e11 = e20 = e21 = e30 = e31 = _step_zeros()
        for g in range(g0, min(g0 + 15, groups)):
            base = (t * groups + g) * 256 + 64 * s
            p0, p1 = _vload32(w, base), _vload32(w, base + 32)
            for q in range(fields):
                w0, w1 = _vand(p0, mask), _vand(p1, mask)
                kk = 4 * (fields * g + q)
                a = _vsplat_quad8(x, r * kp + kk)
                e00, e01 = _dot_step8(e00, w0, a), _dot_step8(e01, w1, a)
                a = _vsplat_quad8(x, (r + 1) * kp + kk)
                e10, e11 = _dot_step8(e10, w0, a), _dot_step8(e11, w1, a)
                a = _vsplat_quad8(x, (r + 2) * kp + kk)
                e20, e21 = _dot_step8(e20, w0, a), _dot_step8(e21, w1, a)
                a = _vsplat_quad8(x, (r + 3) * kp + kk)
                e30, e31 = _dot_step8(e30, w0, a), _dot_step8(e31, w1, a)
                p0, p1 = _vshr(p0, bits), _vshr(p1, bits)
        d00, d01, d10, d11 = _widen_step(d00, e00), _widen_step(d01, e01), _widen_step(d10, e10), _widen_step(d11, e11)
        d20, d21, d30, d31 = _widen_step(d20, e20), _widen_step(d21, e21), _widen_step(d30, e30), _widen_step(d31, e31)
    o = r * cols + 64 * t + 16 * s
    _store_affine(out, o, d00, mult, rowsum[r])
    _store_affine(out, o + 8, d01, mult, rowsum[r])
    _store_affine(out, o + cols, d10, mult, rowsum[r + 1])
    _store_affine(out, o + cols + 8, d11, mult, rowsum[r + 1])
    _store_affine(out, o + 2 * cols, d20, mult, rowsum[r + 2])
    _store_affine(out, o + 2 * cols + 8, d21, mult, rowsum[r + 2])
    _store_affine(out, o + 3 * cols, d30, mult, rowsum[r + 3])
    _store_affine(out, o + 3 * cols + 8, d31, mult, rowsum[r + 3])


@njit(**_INLINE)
def _a8_tile1(x, w, out, r, t, s, rowsum, bits, mult):  # pragma: no cover - compiled
    """Row r x columns 64t+32s .. +31 (4 ymm, two 64-byte vectors of the tile), codes decoded
    on the fly: the GEMV, and the rows the 4-row blocks leave."""
    kp, groups, cols = x.shape[1], w.shape[1], out.shape[1]
    fields, mask = 8 // bits, (1 << bits) - 1
    d0 = d1 = d2 = d3 = _vzeros_i32x8()
    for g0 in range(0, groups, 15):
        e0 = e1 = e2 = e3 = _step_zeros()
        for g in range(g0, min(g0 + 15, groups)):
            base = (t * groups + g) * 256 + 128 * s
            p0, p1, p2, p3 = _vload32(w, base), _vload32(w, base + 32), _vload32(w, base + 64), _vload32(w, base + 96)
            for q in range(fields):
                a = _vsplat_quad8(x, r * kp + 4 * (fields * g + q))
                e0, e1 = _dot_step8(e0, _vand(p0, mask), a), _dot_step8(e1, _vand(p1, mask), a)
                e2, e3 = _dot_step8(e2, _vand(p2, mask), a), _dot_step8(e3, _vand(p3, mask), a)
                p0, p1, p2, p3 = _vshr(p0, bits), _vshr(p1, bits), _vshr(p2, bits), _vshr(p3, bits)
        d0, d1, d2, d3 = _widen_step(d0, e0), _widen_step(d1, e1), _widen_step(d2, e2), _widen_step(d3, e3)
    o = r * cols + 64 * t + 32 * s
    _store_affine(out, o, d0, mult, rowsum[r])
    _store_affine(out, o + 8, d1, mult, rowsum[r])
    _store_affine(out, o + 16, d2, mult, rowsum[r])
    _store_affine(out, o + 24, d3, mult, rowsum[r])


@njit(**_INLINE)
def _a8_decode_panel(w, t, bits, panel):  # pragma: no cover - compiled
    """Decode column tile t once into ``panel`` (uint8, one code per byte; step j of 4 k at
    ``256 j``, the same byte order as the packed vectors), for the rows of a whole task."""
    groups, fields, mask = w.shape[1], 8 // bits, (1 << bits) - 1
    for g in range(groups):
        base = (t * groups + g) * 256
        for h in range(8):
            p = _vload32(w, base + 32 * h)
            for q in range(fields):
                _vstore(panel, ((g * fields + q) * 8 + h) * 32, _vand(p, mask))
                p = _vshr(p, bits)


@njit(**_INLINE)
def _a8_tile4_decoded(x, panel, out, r, t, s, rowsum, mult, steps):  # pragma: no cover - compiled
    """_a8_tile4 on a decoded panel: per step of 4 k, 2 loads, 4 broadcasts, 8 vpmaddubsw."""
    kp, cols = x.shape[1], out.shape[1]
    nsteps = kp // 4
    d00 = d01 = d10 = d11 = d20 = d21 = d30 = d31 = _vzeros_i32x8()
    for j0 in range(0, nsteps, steps):
        e00 = e01 = e10 = e11 = e20 = e21 = e30 = e31 = _step_zeros()
        for j in range(j0, min(j0 + steps, nsteps)):
            base = j * 256 + 64 * s
            w0, w1 = _vload32(panel, base), _vload32(panel, base + 32)
            kk = 4 * j
            a = _vsplat_quad8(x, r * kp + kk)
            e00, e01 = _dot_step8(e00, w0, a), _dot_step8(e01, w1, a)
            a = _vsplat_quad8(x, (r + 1) * kp + kk)
            e10, e11 = _dot_step8(e10, w0, a), _dot_step8(e11, w1, a)
            a = _vsplat_quad8(x, (r + 2) * kp + kk)
            e20, e21 = _dot_step8(e20, w0, a), _dot_step8(e21, w1, a)
            a = _vsplat_quad8(x, (r + 3) * kp + kk)
            e30, e31 = _dot_step8(e30, w0, a), _dot_step8(e31, w1, a)
        d00, d01, d10, d11 = _widen_step(d00, e00), _widen_step(d01, e01), _widen_step(d10, e10), _widen_step(d11, e11)
        d20, d21, d30, d31 = _widen_step(d20, e20), _widen_step(d21, e21), _widen_step(d30, e30), _widen_step(d31, e31)
    o = r * cols + 64 * t + 16 * s
    _store_affine(out, o, d00, mult, rowsum[r])
    _store_affine(out, o + 8, d01, mult, rowsum[r])
    _store_affine(out, o + cols, d10, mult, rowsum[r + 1])
    _store_affine(out, o + cols + 8, d11, mult, rowsum[r + 1])
    _store_affine(out, o + 2 * cols, d20, mult, rowsum[r + 2])
    _store_affine(out, o + 2 * cols + 8, d21, mult, rowsum[r + 2])
    _store_affine(out, o + 3 * cols, d30, mult, rowsum[r + 3])
    _store_affine(out, o + 3 * cols + 8, d31, mult, rowsum[r + 3])


@njit(**_INLINE)
def _a8_task(x, w, rowsum, out, t, lo, hi, bits, mult):  # pragma: no cover - compiled
    """Rows lo..hi-1 x column tile t: 16 rows or more decode the tile once into a panel."""
    steps = 63 if bits == 2 else 127  # int16 steps before widening: 32767 // (2 * code_max * 128)
    r = lo
    if hi - lo >= _PANEL_MIN_ROWS:
        panel = np.empty(x.shape[1] * 64, dtype=np.uint8)
        _a8_decode_panel(w, t, bits, panel)
        while r + 4 <= hi:
            for s in range(4):
                _a8_tile4_decoded(x, panel, out, r, t, s, rowsum, mult, steps)
            r += 4
    while r + 4 <= hi:
        for s in range(4):
            _a8_tile4(x, w, out, r, t, s, rowsum, bits, mult)
        r += 4
    while r < hi:
        _a8_tile1(x, w, out, r, t, 0, rowsum, bits, mult)
        _a8_tile1(x, w, out, r, t, 1, rowsum, bits, mult)
        r += 1


@njit(**_INLINE)
def _a8_body(x, w, rowsum, out, bits, mult):  # pragma: no cover - compiled
    m = x.shape[0]
    chunks = (m + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(w.shape[0] * chunks):
        t, lo = task // chunks, (task % chunks) * _ROWS_PER_TASK
        _a8_task(x, w, rowsum, out, t, lo, min(lo + _ROWS_PER_TASK, m), bits, mult)


@njit(**_INLINE)
def _a8_fused_body(xf, w, ws, bias, y, qp, eps, bits, mult):  # pragma: no cover - compiled
    """The fused A8 layer: float32 x [M, K] -> y [M, N] (``fused``): per-token absmax codes,
    scales and code sums, then per task the kernel into a small int32 block and its rescale
    into y. Returns the per-token scales (the caller checks they are finite)."""
    m = xf.shape[0]
    kp = w.shape[1] * 32 // bits  # 16 k per group for 2-bit codes, 32 for 1-bit
    codes = np.empty((m, kp), dtype=np.int8)
    xs = np.empty(m, dtype=np.float32)
    rowsum = np.empty(m, dtype=np.int32)
    xbits, tops = xf.view(np.int32), np.empty(m, dtype=np.int32)
    for r in prange(m):
        tops[r] = _absmax_bits(xbits, r)
    amax = tops.view(np.float32)
    for r in prange(m):
        _quantize_row_a8(xf, amax[r], codes, xs, rowsum, r, qp, eps)
    chunks = (m + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(w.shape[0] * chunks):
        t, lo = task // chunks, (task % chunks) * _ROWS_PER_TASK
        hi = min(lo + _ROWS_PER_TASK, m)
        dots = np.empty((hi - lo, 64), dtype=np.int32)
        _a8_task(codes[lo:hi], w[t : t + 1], rowsum[lo:hi], dots, 0, 0, hi - lo, bits, mult)
        _rescale_block(dots, y, xs, ws, bias, lo, 64 * t)
    return xs


@njit(cache=True, boundscheck=False, error_model="numpy", parallel=True)
def _w1a8_parallel(x, w, rowsum, out):  # pragma: no cover - compiled
    """x int8 [M, 32G], w uint8 [T, G, 4, 64] (1-bit codes b) -> out int32 [M, 64T] = 2·Σ b·x − Σ x."""
    _a8_body(x, w, rowsum, out, 1, 2)


@njit(cache=True, boundscheck=False, error_model="numpy")
def _w1a8_serial(x, w, rowsum, out):  # pragma: no cover - compiled
    _a8_body(x, w, rowsum, out, 1, 2)


@njit(cache=True, boundscheck=False, error_model="numpy", parallel=True)
def _w158a8_parallel(x, w, rowsum, out):  # pragma: no cover - compiled
    """x int8 [M, 16G], w uint8 [T, G, 4, 64] (2-bit codes c = w+1) -> out int32 [M, 64T] = Σ c·x − Σ x."""
    _a8_body(x, w, rowsum, out, 2, 1)


@njit(cache=True, boundscheck=False, error_model="numpy")
def _w158a8_serial(x, w, rowsum, out):  # pragma: no cover - compiled
    _a8_body(x, w, rowsum, out, 2, 1)


_FUSED_OPTS = {"cache": True, "boundscheck": False, "error_model": "numpy"}


@njit(parallel=True, **_FUSED_OPTS)
def _w1a1_fused_parallel(xf, w, k, ws, bias, y):  # pragma: no cover - compiled
    return _w1a1_fused_body(xf, w, k, ws, bias, y)


@njit(**_FUSED_OPTS)
def _w1a1_fused_serial(xf, w, k, ws, bias, y):  # pragma: no cover - compiled
    return _w1a1_fused_body(xf, w, k, ws, bias, y)


@njit(parallel=True, **_FUSED_OPTS)
def _w1a8_fused_parallel(xf, w, ws, bias, y, qp, eps):  # pragma: no cover - compiled
    return _a8_fused_body(xf, w, ws, bias, y, qp, eps, 1, 2)


@njit(**_FUSED_OPTS)
def _w1a8_fused_serial(xf, w, ws, bias, y, qp, eps):  # pragma: no cover - compiled
    return _a8_fused_body(xf, w, ws, bias, y, qp, eps, 1, 2)


@njit(parallel=True, **_FUSED_OPTS)
def _w158a8_fused_parallel(xf, w, ws, bias, y, qp, eps):  # pragma: no cover - compiled
    return _a8_fused_body(xf, w, ws, bias, y, qp, eps, 2, 1)


@njit(**_FUSED_OPTS)
def _w158a8_fused_serial(xf, w, ws, bias, y, qp, eps):  # pragma: no cover - compiled
    return _a8_fused_body(xf, w, ws, bias, y, qp, eps, 2, 1)


a8_task = _a8_task
"""The A8 integer step of one task, public for the fused layers of ``labutils.engine``
(``microkernels_avx512.a8_task`` has the same signature)."""
w1a1_task = _w1a1_task
"""The W1A1 integer step of one task, public for ``labutils.engine`` (as ``a8_task``)."""

FUSED = {
    "w1a1": (_w1a1_fused_parallel, _w1a1_fused_serial),
    "w1a8": (_w1a8_fused_parallel, _w1a8_fused_serial),
    "w1.58a8": (_w158a8_fused_parallel, _w158a8_fused_serial),
}
"""scheme -> (parallel, serial) fused layer: float32 x -> y, see ``fused``."""

KERNELS = {
    "w1a1": (_w1a1_parallel, _w1a1_serial),
    "w1a8": (_w1a8_parallel, _w1a8_serial),
    "w1.58a8": (_w158a8_parallel, _w158a8_serial),
}
"""scheme -> (parallel kernel, serial kernel), the signatures of ``dispatch.SIGNATURES``."""
