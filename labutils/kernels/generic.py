"""The generic path: plain Numba loops, no x86 intrinsic, so it compiles for any CPU Numba
supports (arm64 included). LLVM vectorizes the inner loops over columns for whatever SIMD the
CPU has (``ctpop`` becomes ``cnt`` on arm64 NEON, ``popcnt`` or a bit trick on x86).

Same tiles and same results as the SIMD paths; no speed target.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from labutils.kernels.fused import a8_fused_layer, w1a1_fused_layer
from labutils.kernels.simd import popcount

_ROWS_PER_TASK = 128  # rows of activations per parallel task


@njit(cache=True, boundscheck=False, error_model="numpy")
def w1a1_gemm_simple(x_rows, w_rows, k):  # pragma: no cover - compiled
    """The plain triple loop with scalar ``ctpop``: uint64 [M, Kw] x [N, Kw] -> int32 [M, N].

    The baseline the tiled kernels are measured against (takes ``pack_binary_rows`` layouts
    directly, no checks, one thread).
    """
    m, words = x_rows.shape
    n = w_rows.shape[0]
    out = np.empty((m, n), dtype=np.int32)
    for r in range(m):
        for c in range(n):
            mismatches = 0
            for i in range(words):
                mismatches += popcount(x_rows[r, i] ^ w_rows[c, i])
            out[r, c] = k - 2 * mismatches
    return out


@njit(cache=True, boundscheck=False, error_model="numpy", inline="always")
def _w1a1_body(x, w, k, out):  # pragma: no cover - compiled
    """x uint64 [M, Kw], w uint64 [T, Kw, 32] -> out int32 [M, 32T]: per row, 32 counters."""
    m = x.shape[0]
    chunks = (m + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(w.shape[0] * chunks):
        t, lo = task // chunks, (task % chunks) * _ROWS_PER_TASK
        w1a1_task(x, w, k, out, t, lo, min(lo + _ROWS_PER_TASK, m))


@njit(cache=True, boundscheck=False, error_model="numpy", inline="always")
def w1a1_task(x, w, k, out, t, lo, hi):  # pragma: no cover - compiled
    """Rows lo..hi-1 x column tile t -> out[lo:hi, 32t : 32t+32] (int32): one task of
    ``_w1a1_body``, and the integer step of a fused layer (``fused``, ``labutils.engine``)."""
    words = x.shape[1]
    counts = np.empty(32, dtype=np.uint64)
    for r in range(lo, hi):
        counts[:] = 0
        for i in range(words):
            a = x[r, i]
            for c in range(32):
                counts[c] += popcount(a ^ w[t, i, c])
        for c in range(32):
            out[r, 32 * t + c] = k - 2 * np.int64(counts[c])


@njit(cache=True, boundscheck=False, error_model="numpy", inline="always")
def _a8_body(x, w, rowsum, out, bits, mult):  # pragma: no cover - compiled
    """x int8 [M, Kp], w uint8 [T, G, 4, 64] -> out int32 [M, 64T] = mult·Σ code·x − rowsum.

    Each task decodes its column tile into int8 codes, one row of Kp per column, once; then
    every output is a plain dot product of two int8 rows (Numba types the products int64, so
    this loop runs at a few GMAC/s per core: correct everywhere, fast nowhere)."""
    m = x.shape[0]
    chunks = (m + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(w.shape[0] * chunks):
        t, lo = task // chunks, (task % chunks) * _ROWS_PER_TASK
        a8_task(x, w, rowsum, out, t, lo, min(lo + _ROWS_PER_TASK, m), bits, mult)


@njit(cache=True, boundscheck=False, error_model="numpy", inline="always")
def a8_task(x, w, rowsum, out, t, lo, hi, bits, mult):  # pragma: no cover - compiled
    """Rows lo..hi-1 x column tile t -> out[lo:hi, 64t : 64t+64] (int32): one task of
    ``_a8_body``, and the integer step of a fused layer (``fused``, ``labutils.engine``)."""
    kp = x.shape[1]
    groups, fields, mask = w.shape[1], 8 // bits, (1 << bits) - 1
    codes = np.empty((64, kp), dtype=np.int8)
    for g in range(groups):
        for v in range(4):
            for lane in range(16):
                for j in range(4):
                    byte = np.int32(w[t, g, v, 4 * lane + j])
                    for q in range(fields):
                        codes[16 * v + lane, 4 * (fields * g + q) + j] = (byte >> (bits * q)) & mask
    for r in range(lo, hi):
        xr = x[r]
        for c in range(64):
            cr = codes[c]
            total = np.int32(0)
            for kk in range(kp):
                total += np.int32(cr[kk]) * np.int32(xr[kk])
            out[r, 64 * t + c] = mult * total - rowsum[r]


@njit(cache=True, boundscheck=False, error_model="numpy", parallel=True)
def _w1a1_parallel(x, w, k, out):  # pragma: no cover - compiled
    _w1a1_body(x, w, k, out)


@njit(cache=True, boundscheck=False, error_model="numpy")
def _w1a1_serial(x, w, k, out):  # pragma: no cover - compiled
    _w1a1_body(x, w, k, out)


@njit(cache=True, boundscheck=False, error_model="numpy", parallel=True)
def _w1a8_parallel(x, w, rowsum, out):  # pragma: no cover - compiled
    _a8_body(x, w, rowsum, out, 1, 2)


@njit(cache=True, boundscheck=False, error_model="numpy")
def _w1a8_serial(x, w, rowsum, out):  # pragma: no cover - compiled
    _a8_body(x, w, rowsum, out, 1, 2)


@njit(cache=True, boundscheck=False, error_model="numpy", parallel=True)
def _w158a8_parallel(x, w, rowsum, out):  # pragma: no cover - compiled
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
