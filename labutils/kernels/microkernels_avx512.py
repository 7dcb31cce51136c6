"""The AVX-512 microkernels: 4 rows x 4 zmm vectors of columns per step (VPOPCNTDQ, VNNI).

W1A1: per 64-bit activation word, 4 weight vectors (32 columns) and 4 broadcast activation
words feed 16 ``vpxorq, vpopcntq, vpaddq``. A8: per 4 activation bytes, 4 vectors of decoded
codes (64 columns) and 4 broadcasts feed 16 ``vpdpbusd``. Measurements are in the package
docstring (``labutils.kernels``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from labutils.kernels.fused import a8_fused_layer, w1a1_fused_layer
from labutils.kernels.simd import (
    _dpbusd,
    _store_affine,
    _store_xnor,
    _vand,
    _vload,
    _vshr,
    _vsplat_quad,
    _vsplat_word,
    _vstore,
    _vzeros_i32,
    _vzeros_u64,
    _xor_popcount_add,
)

_ROWS_PER_TASK = 128  # rows of activations per parallel task (multiple of 4)
_PANEL_MIN_ROWS = 16  # from this many rows per task, decode the weight tile once (A8 kernels)
_INLINE = {"cache": True, "boundscheck": False, "error_model": "numpy", "inline": "always"}


@njit(**_INLINE)
def _xnor_step(c0, c1, c2, c3, a, w0, w1, w2, w3):  # pragma: no cover - compiled
    """One activation word ``a`` (broadcast) against 4 weight vectors: 4 accumulators updated."""
    return (_xor_popcount_add(c0, a, w0), _xor_popcount_add(c1, a, w1),
            _xor_popcount_add(c2, a, w2), _xor_popcount_add(c3, a, w3))  # fmt: skip


@njit(**_INLINE)
def _store_xnor4(out, o, k, c0, c1, c2, c3):  # pragma: no cover - compiled
    """out.flat[o : o+32] = k - 2 * (c0 | c1 | c2 | c3): one row of a 32-column tile."""
    _store_xnor(out, o, c0, k)
    _store_xnor(out, o + 8, c1, k)
    _store_xnor(out, o + 16, c2, k)
    _store_xnor(out, o + 24, c3, k)


@njit(**_INLINE)
def _w1a1_tile4(x, w, out, r, t, k):  # pragma: no cover - compiled
    """Rows r..r+3 x columns 32t..32t+31: 16 accumulators of 8 lanes; per word, 4 weight loads
    and 4 activation broadcasts feed 16 xor-popcount-adds."""
    words, cols = x.shape[1], out.shape[1]
    c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = _vzeros_u64()
    c20 = c21 = c22 = c23 = c30 = c31 = c32 = c33 = _vzeros_u64()
    for i in range(words):
        base = (t * words + i) * 32
        w0, w1, w2, w3 = _vload(w, base), _vload(w, base + 8), _vload(w, base + 16), _vload(w, base + 24)
        c00, c01, c02, c03 = _xnor_step(c00, c01, c02, c03, _vsplat_word(x, r * words + i), w0, w1, w2, w3)
        c10, c11, c12, c13 = _xnor_step(c10, c11, c12, c13, _vsplat_word(x, (r + 1) * words + i), w0, w1, w2, w3)
        c20, c21, c22, c23 = _xnor_step(c20, c21, c22, c23, _vsplat_word(x, (r + 2) * words + i), w0, w1, w2, w3)
        c30, c31, c32, c33 = _xnor_step(c30, c31, c32, c33, _vsplat_word(x, (r + 3) * words + i), w0, w1, w2, w3)
    o = r * cols + 32 * t
    _store_xnor4(out, o, k, c00, c01, c02, c03)
    _store_xnor4(out, o + cols, k, c10, c11, c12, c13)
    _store_xnor4(out, o + 2 * cols, k, c20, c21, c22, c23)
    _store_xnor4(out, o + 3 * cols, k, c30, c31, c32, c33)


@njit(**_INLINE)
def _w1a1_tile1(x, w, out, r, t, k):  # pragma: no cover - compiled
    """Row r x columns 32t..32t+31 (the GEMV, and the rows left over by _w1a1_tile4)."""
    words, cols = x.shape[1], out.shape[1]
    c0 = c1 = c2 = c3 = _vzeros_u64()
    for i in range(words):
        base = (t * words + i) * 32
        w0, w1, w2, w3 = _vload(w, base), _vload(w, base + 8), _vload(w, base + 16), _vload(w, base + 24)
        c0, c1, c2, c3 = _xnor_step(c0, c1, c2, c3, _vsplat_word(x, r * words + i), w0, w1, w2, w3)
    _store_xnor4(out, r * cols + 32 * t, k, c0, c1, c2, c3)


@njit(**_INLINE)
def _w1a1_body(x, w, k, out):  # pragma: no cover - compiled
    """x uint64 [M, Kw] (pack_binary_rows), w uint64 [T, Kw, 32] -> out int32 [M, 32T].

    Tasks are (column tile, chunk of rows) pairs, so a thread reuses one weight tile over its
    rows and even a single row (GEMV) splits over the threads.
    """
    m = x.shape[0]
    chunks = (m + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(w.shape[0] * chunks):
        t, lo = task // chunks, (task % chunks) * _ROWS_PER_TASK
        w1a1_task(x, w, k, out, t, lo, min(lo + _ROWS_PER_TASK, m))


@njit(**_INLINE)
def w1a1_task(x, w, k, out, t, lo, hi):  # pragma: no cover - compiled
    """Rows lo..hi-1 of x uint64 [M, Kw] x column tile t of w uint64 [T, Kw, 32] -> the int32
    dots out[lo:hi, 32t : 32t+32]: one task of ``_w1a1_body``, and the integer step of a fused
    layer (``fused.w1a1_fused_layer``, ``labutils.engine``)."""
    r = lo
    while r + 4 <= hi:
        _w1a1_tile4(x, w, out, r, t, k)
        r += 4
    while r < hi:
        _w1a1_tile1(x, w, out, r, t, k)
        r += 1


@njit(cache=True, boundscheck=False, error_model="numpy", parallel=True)
def _w1a1_parallel(x, w, k, out):  # pragma: no cover - compiled
    _w1a1_body(x, w, k, out)


@njit(cache=True, boundscheck=False, error_model="numpy")
def _w1a1_serial(x, w, k, out):  # pragma: no cover - compiled
    _w1a1_body(x, w, k, out)


@njit(**_INLINE)
def _dot_step(c0, c1, c2, c3, a, w0, w1, w2, w3):  # pragma: no cover - compiled
    """4 activation bytes ``a`` (broadcast) against 4 vectors of decoded codes: 4 vpdpbusd."""
    return _dpbusd(c0, w0, a), _dpbusd(c1, w1, a), _dpbusd(c2, w2, a), _dpbusd(c3, w3, a)


@njit(**_INLINE)
def _store_affine4(out, o, mult, offset, c0, c1, c2, c3):  # pragma: no cover - compiled
    """out.flat[o : o+64] = mult * (c0 | c1 | c2 | c3) - offset: one row of a 64-column tile."""
    _store_affine(out, o, c0, mult, offset)
    _store_affine(out, o + 16, c1, mult, offset)
    _store_affine(out, o + 32, c2, mult, offset)
    _store_affine(out, o + 48, c3, mult, offset)


@njit(**_INLINE)
def _a8_tile4(x, w, out, r, t, rowsum, bits, mult):  # pragma: no cover - compiled
    """Rows r..r+3 x columns 64t..64t+63 of ``mult * sum(code * x) - rowsum``.

    Each 64-byte weight vector holds 8/bits fields of codes (16 columns x 4 k each): take the
    low field of every byte (``& mask``), one vpdpbusd per row against that row's 4 broadcast
    activation bytes, then shift the next field down.
    """
    kp, groups, cols = x.shape[1], w.shape[1], out.shape[1]
    fields, mask = 8 // bits, (1 << bits) - 1
    c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = _vzeros_i32()
    c20 = c21 = c22 = c23 = c30 = c31 = c32 = c33 = _vzeros_i32()
    for g in range(groups):
        base = (t * groups + g) * 256
        p0, p1, p2, p3 = _vload(w, base), _vload(w, base + 64), _vload(w, base + 128), _vload(w, base + 192)
        for q in range(fields):
            w0, w1, w2, w3 = _vand(p0, mask), _vand(p1, mask), _vand(p2, mask), _vand(p3, mask)
            kk = 4 * (fields * g + q)
            c00, c01, c02, c03 = _dot_step(c00, c01, c02, c03, _vsplat_quad(x, r * kp + kk), w0, w1, w2, w3)
            c10, c11, c12, c13 = _dot_step(c10, c11, c12, c13, _vsplat_quad(x, (r + 1) * kp + kk), w0, w1, w2, w3)
            c20, c21, c22, c23 = _dot_step(c20, c21, c22, c23, _vsplat_quad(x, (r + 2) * kp + kk), w0, w1, w2, w3)
            c30, c31, c32, c33 = _dot_step(c30, c31, c32, c33, _vsplat_quad(x, (r + 3) * kp + kk), w0, w1, w2, w3)
            p0, p1, p2, p3 = _vshr(p0, bits), _vshr(p1, bits), _vshr(p2, bits), _vshr(p3, bits)
    o = r * cols + 64 * t
    _store_affine4(out, o, mult, rowsum[r], c00, c01, c02, c03)
    _store_affine4(out, o + cols, mult, rowsum[r + 1], c10, c11, c12, c13)
    _store_affine4(out, o + 2 * cols, mult, rowsum[r + 2], c20, c21, c22, c23)
    _store_affine4(out, o + 3 * cols, mult, rowsum[r + 3], c30, c31, c32, c33)


@njit(**_INLINE)
def _a8_tile1(x, w, out, r, t, rowsum, bits, mult):  # pragma: no cover - compiled
    """Row r x columns 64t..64t+63 (the GEMV, and the rows left over by _a8_tile4)."""
    kp, groups, cols = x.shape[1], w.shape[1], out.shape[1]
    fields, mask = 8 // bits, (1 << bits) - 1
    c0 = c1 = c2 = c3 = _vzeros_i32()
    for g in range(groups):
        base = (t * groups + g) * 256
        p0, p1, p2, p3 = _vload(w, base), _vload(w, base + 64), _vload(w, base + 128), _vload(w, base + 192)
        for q in range(fields):
            w0, w1, w2, w3 = _vand(p0, mask), _vand(p1, mask), _vand(p2, mask), _vand(p3, mask)
            c0, c1, c2, c3 = _dot_step(c0, c1, c2, c3, _vsplat_quad(x, r * kp + 4 * (fields * g + q)), w0, w1, w2, w3)
            p0, p1, p2, p3 = _vshr(p0, bits), _vshr(p1, bits), _vshr(p2, bits), _vshr(p3, bits)
    _store_affine4(out, r * cols + 64 * t, mult, rowsum[r], c0, c1, c2, c3)


@njit(**_INLINE)
def _a8_decode_panel(w, t, bits, panel):  # pragma: no cover - compiled
    """Decode column tile t once into ``panel`` (uint8, one code per byte, 4 vectors per step
    of 4 k), so the rows of a whole task reuse it without decoding again."""
    groups, fields, mask = w.shape[1], 8 // bits, (1 << bits) - 1
    for g in range(groups):
        base = (t * groups + g) * 256
        for v in range(4):
            p = _vload(w, base + 64 * v)
            for q in range(fields):
                _vstore(panel, ((g * fields + q) * 4 + v) * 64, _vand(p, mask))
                p = _vshr(p, bits)


@njit(**_INLINE)
def _a8_tile4_decoded(x, panel, out, r, t, rowsum, mult):  # pragma: no cover - compiled
    """_a8_tile4 on a decoded panel: per step of 4 k, 4 loads and 16 vpdpbusd, no decode."""
    kp, cols = x.shape[1], out.shape[1]
    c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = _vzeros_i32()
    c20 = c21 = c22 = c23 = c30 = c31 = c32 = c33 = _vzeros_i32()
    for j in range(kp // 4):
        base = j * 256
        w0, w1, w2, w3 = _vload(panel, base), _vload(panel, base + 64), _vload(panel, base + 128), _vload(panel, base + 192)
        kk = 4 * j
        c00, c01, c02, c03 = _dot_step(c00, c01, c02, c03, _vsplat_quad(x, r * kp + kk), w0, w1, w2, w3)
        c10, c11, c12, c13 = _dot_step(c10, c11, c12, c13, _vsplat_quad(x, (r + 1) * kp + kk), w0, w1, w2, w3)
        c20, c21, c22, c23 = _dot_step(c20, c21, c22, c23, _vsplat_quad(x, (r + 2) * kp + kk), w0, w1, w2, w3)
        c30, c31, c32, c33 = _dot_step(c30, c31, c32, c33, _vsplat_quad(x, (r + 3) * kp + kk), w0, w1, w2, w3)
    o = r * cols + 64 * t
    _store_affine4(out, o, mult, rowsum[r], c00, c01, c02, c03)
    _store_affine4(out, o + cols, mult, rowsum[r + 1], c10, c11, c12, c13)
    _store_affine4(out, o + 2 * cols, mult, rowsum[r + 2], c20, c21, c22, c23)
    _store_affine4(out, o + 3 * cols, mult, rowsum[r + 3], c30, c31, c32, c33)


@njit(**_INLINE)
def _a8_body(x, w, rowsum, out, bits, mult):  # pragma: no cover - compiled
    m = x.shape[0]
    chunks = (m + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(w.shape[0] * chunks):
        t, lo = task // chunks, (task % chunks) * _ROWS_PER_TASK
        a8_task(x, w, rowsum, out, t, lo, min(lo + _ROWS_PER_TASK, m), bits, mult)


@njit(**_INLINE)
def a8_task(x, w, rowsum, out, t, lo, hi, bits, mult):  # pragma: no cover - compiled
    """Rows lo..hi-1 of x int8 [M, Kp] x column tile t of w uint8 [T, G, 4, 64] -> the int32
    dots out[lo:hi, 64t : 64t+64] = mult * sum(code * x) - rowsum: one task of ``_a8_body``, and
    the integer step of a fused layer (``fused.a8_fused_layer``, ``labutils.engine``). From 16
    rows the tile is decoded once into a panel."""
    r = lo
    if hi - lo >= _PANEL_MIN_ROWS:
        panel = np.empty(x.shape[1] * 64, dtype=np.uint8)
        _a8_decode_panel(w, t, bits, panel)
        while r + 4 <= hi:
            _a8_tile4_decoded(x, panel, out, r, t, rowsum, mult)
            r += 4
    while r + 4 <= hi:
        _a8_tile4(x, w, out, r, t, rowsum, bits, mult)
        r += 4
    while r < hi:
        _a8_tile1(x, w, out, r, t, rowsum, bits, mult)
        r += 1


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


KERNELS = {
    "w1a1": (_w1a1_parallel, _w1a1_serial),
    "w1a8": (_w1a8_parallel, _w1a8_serial),
    "w1.58a8": (_w158a8_parallel, _w158a8_serial),
}
"""scheme -> (parallel kernel, serial kernel), the signatures of ``dispatch.SIGNATURES``."""


# --------------------------------------------------------------------------- fused layers
# Activation quantization, kernel, rescale and bias in one compiled call (``kernels.fused``),
# the AVX-512 kernel as the integer step.

_FUSED_OPTS = {"cache": True, "boundscheck": False, "error_model": "numpy"}


@njit(parallel=True, **_FUSED_OPTS)
def _w1a1_fused_parallel(xf, w, k, ws, bias, y):  # pragma: no cover - compiled
    return w1a1_fused_layer(xf, w, k, ws, bias, y, w1a1_task)


@njit(**_FUSED_OPTS)
def _w1a1_fused_serial(xf, w, k, ws, bias, y):  # pragma: no cover - compiled
    return w1a1_fused_layer(xf, w, k, ws, bias, y, w1a1_task)


@njit(parallel=True, **_FUSED_OPTS)
def _w1a8_fused_parallel(xf, w, ws, bias, y, qp, eps):  # pragma: no cover - compiled
    return a8_fused_layer(xf, w, ws, bias, y, qp, eps, 1, 2, a8_task)


@njit(**_FUSED_OPTS)
def _w1a8_fused_serial(xf, w, ws, bias, y, qp, eps):  # pragma: no cover - compiled
    return a8_fused_layer(xf, w, ws, bias, y, qp, eps, 1, 2, a8_task)


@njit(parallel=True, **_FUSED_OPTS)
def _w158a8_fused_parallel(xf, w, ws, bias, y, qp, eps):  # pragma: no cover - compiled
    return a8_fused_layer(xf, w, ws, bias, y, qp, eps, 2, 1, a8_task)


@njit(**_FUSED_OPTS)
def _w158a8_fused_serial(xf, w, ws, bias, y, qp, eps):  # pragma: no cover - compiled
    return a8_fused_layer(xf, w, ws, bias, y, qp, eps, 2, 1, a8_task)


FUSED = {
    "w1a1": (_w1a1_fused_parallel, _w1a1_fused_serial),
    "w1a8": (_w1a8_fused_parallel, _w1a8_fused_serial),
    "w1.58a8": (_w158a8_fused_parallel, _w158a8_fused_serial),
}
"""scheme -> (parallel, serial) fused layer: float32 x -> y, see ``fused``."""
