"""The generic path: no x86 intrinsic, so it compiles for any CPU Numba supports (arm64
included), written so that LLVM finds each CPU's own vector instructions.

- W1A1: the portable vector tiles of ``microkernels_avx512`` (LLVM vector IR only: ``xor``,
  ``ctpop``, ``add`` on 8 x 64 bits), one token at a time (a 4-token tile would hold 64 NEON
  registers of counters). ``ctpop`` becomes ``cnt`` on arm64, ``vpopcntq`` where AVX512-VPOPCNTDQ
  is there, a ``vpshufb`` lookup on AVX2.
- A8 (W1A8, W1.58A8): a task of 4 tokens or more decodes its column tile into int8 codes, one
  row of Kp per column (four codes per 32-bit shift-and-mask), then 4 tokens x 4 columns of dot
  products (4 x 2 on AVX2, whose 16 registers 16 accumulators would fill), one accumulator each
  (``portable``: NEON ``sdot`` into int32 on arm64, ``vpmaddubsw`` into int16 on x86, folded
  into int32 sums every ``portable.BLOCK_STEPS`` steps, 4 outputs summed and stored together). A task of fewer tokens (the GEMV of a decode step) reads the packed
  words as stored, 16 columns in 16 int32 lanes (``_a8_row_packed``): decoding would write and
  re-read every code for one use.

Same tiles and same int32 results as the SIMD paths.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from labutils.kernels.fused import a8_fused_layer, w1a1_fused_layer
from labutils.kernels.microkernels_avx512 import _w1a1_tile1
from labutils.kernels.portable import BLOCK_STEPS, COLUMNS, STEP, TILE_COLUMNS, _acc_zero, _cols_dot_add, _dot_add, _store_sums, _sums_add4, _sums_zero
from labutils.kernels.simd import _vstore, _vzeros_i32, popcount

_ROWS_PER_TASK = 128  # rows of activations per parallel task
_BLOCK = BLOCK_STEPS * STEP  # bytes of k an accumulator takes before it is folded into a total
_DECODE_MIN_ROWS = 4  # from this many rows per task, decode the weight tile once (A8); fewer read it packed


@njit(cache=True, boundscheck=False, error_model="numpy")
def w1a1_gemm_simple(x_rows, w_rows, k):  # pragma: no cover - compiled
    """The plain triple loop: uint64 [M, Kw] x [N, Kw] -> int32 [M, N], scalar code; LLVM may
    vectorize the ``ctpop`` (appendix B.3).

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
    for r in range(lo, hi):
        _w1a1_tile1(x, w, out, r, t, k)


@njit(cache=True, boundscheck=False, error_model="numpy", inline="always")
def _a8_body(x, w, rowsum, out, bits, mult):  # pragma: no cover - compiled
    """x int8 [M, Kp], w uint8 [T, G, 4, 64] -> out int32 [M, 64T] = mult·Σ code·x − rowsum:
    parallel over (column tile, chunk of rows) tasks, each decoding its tile once."""
    m = x.shape[0]
    chunks = (m + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(w.shape[0] * chunks):
        t, lo = task // chunks, (task % chunks) * _ROWS_PER_TASK
        a8_task(x, w, rowsum, out, t, lo, min(lo + _ROWS_PER_TASK, m), bits, mult)


@njit(cache=True, boundscheck=False, error_model="numpy", inline="always")
def _decode_columns(w, t, bits, codes):  # pragma: no cover - compiled
    """Column tile t of w uint8 [T, G, 4, 64] -> codes int8 [64, Kp], one row per column.

    Word ``lane`` of vector v of group g holds column 16v + lane's codes for 4 consecutive k in
    each field q (k = 4 (fields g + q) + j in byte j): shifting the 32-bit word down by
    ``bits * q`` and masking every byte gives the 4 codes of field q at once."""
    groups, fields = w.shape[1], 8 // bits
    mask = np.uint32(0x01010101 * ((1 << bits) - 1))
    words, columns = w.view(np.uint32), codes.view(np.uint32)
    for v in range(4):  # one column at a time: its row of codes is written in order
        for lane in range(16):
            column = columns[16 * v + lane]
            for g in range(groups):
                word = words[t, g, v, lane]
                for q in range(fields):
                    column[fields * g + q] = (word >> (bits * q)) & mask


@njit(cache=True, boundscheck=False, error_model="numpy", inline="always")
def _dot_row4(a0, a1, a2, a3, x, ix, codes, ic, kp):  # pragma: no cover - compiled
    """One step of a token against 4 consecutive columns: 4 accumulators updated."""
    return (_dot_add(a0, x, ix, codes, ic), _dot_add(a1, x, ix, codes, ic + kp),
            _dot_add(a2, x, ix, codes, ic + 2 * kp), _dot_add(a3, x, ix, codes, ic + 3 * kp))  # fmt: skip


@njit(cache=True, boundscheck=False, error_model="numpy", inline="always")
def _tile_4x4(x, codes, r, c, o, kmain, rowsum, mult, out):  # pragma: no cover - compiled
    """Tokens r..r+3 x columns c..c+3 -> out[r : r+4, o : o+4]: 16 accumulators, half of
    AVX-512's or NEON's 32 registers, over blocks of at most ``BLOCK_STEPS`` steps, each block
    summed into one int32 vector per token (``_sums_add4``) so that x86's int16 lanes never
    overflow, each token's 4 outputs stored together."""
    kp, n = x.shape[1], out.shape[1]
    t0 = t1 = t2 = t3 = _sums_zero()
    for kb in range(0, kmain, _BLOCK):
        a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = _acc_zero()
        a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = _acc_zero()
        for kk in range(kb, min(kb + _BLOCK, kmain), STEP):
            ic = c * kp + kk
            a00, a01, a02, a03 = _dot_row4(a00, a01, a02, a03, x, r * kp + kk, codes, ic, kp)
            a10, a11, a12, a13 = _dot_row4(a10, a11, a12, a13, x, (r + 1) * kp + kk, codes, ic, kp)
            a20, a21, a22, a23 = _dot_row4(a20, a21, a22, a23, x, (r + 2) * kp + kk, codes, ic, kp)
            a30, a31, a32, a33 = _dot_row4(a30, a31, a32, a33, x, (r + 3) * kp + kk, codes, ic, kp)
        t0 = _sums_add4(t0, a00, a01, a02, a03)
        t1 = _sums_add4(t1, a10, a11, a12, a13)
        t2 = _sums_add4(t2, a20, a21, a22, a23)
        t3 = _sums_add4(t3, a30, a31, a32, a33)
    _store_sums(out, r * n + o, r * n + o + 2, t0, mult, rowsum[r], rowsum[r])
    _store_sums(out, (r + 1) * n + o, (r + 1) * n + o + 2, t1, mult, rowsum[r + 1], rowsum[r + 1])
    _store_sums(out, (r + 2) * n + o, (r + 2) * n + o + 2, t2, mult, rowsum[r + 2], rowsum[r + 2])
    _store_sums(out, (r + 3) * n + o, (r + 3) * n + o + 2, t3, mult, rowsum[r + 3], rowsum[r + 3])
    _add_tails(out, r, c, o, x, codes, kmain, mult, 4, 4)


@njit(cache=True, boundscheck=False, error_model="numpy", inline="always")
def _tile_4x2(x, codes, r, c, o, kmain, rowsum, mult, out):  # pragma: no cover - compiled
    """Tokens r..r+3 x columns c, c+1 -> out[r : r+4, o : o+2]: the tile for 16 vector registers
    (AVX2), 8 accumulators beside each step's operands, where 16 spilled them; each pair of
    tokens' 2 x 2 outputs summed and stored together."""
    kp, n = x.shape[1], out.shape[1]
    t01 = t23 = _sums_zero()
    for kb in range(0, kmain, _BLOCK):
        a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = _acc_zero()
        for kk in range(kb, min(kb + _BLOCK, kmain), STEP):
            i0, i1 = c * kp + kk, (c + 1) * kp + kk
            a00, a01 = _dot_add(a00, x, r * kp + kk, codes, i0), _dot_add(a01, x, r * kp + kk, codes, i1)
            a10, a11 = _dot_add(a10, x, (r + 1) * kp + kk, codes, i0), _dot_add(a11, x, (r + 1) * kp + kk, codes, i1)
            a20, a21 = _dot_add(a20, x, (r + 2) * kp + kk, codes, i0), _dot_add(a21, x, (r + 2) * kp + kk, codes, i1)
            a30, a31 = _dot_add(a30, x, (r + 3) * kp + kk, codes, i0), _dot_add(a31, x, (r + 3) * kp + kk, codes, i1)
        t01 = _sums_add4(t01, a00, a01, a10, a11)
        t23 = _sums_add4(t23, a20, a21, a30, a31)
    _store_sums(out, r * n + o, (r + 1) * n + o, t01, mult, rowsum[r], rowsum[r + 1])
    _store_sums(out, (r + 2) * n + o, (r + 3) * n + o, t23, mult, rowsum[r + 2], rowsum[r + 3])
    _add_tails(out, r, c, o, x, codes, kmain, mult, 4, 2)


@njit(cache=True, boundscheck=False, error_model="numpy", inline="always")
def _row(x, codes, r, c, o, kmain, rowsum, mult, out):  # pragma: no cover - compiled
    """Token r x columns c..c+3 -> out[r, o : o+4]: the rows left over below a tile of 4."""
    kp, n = x.shape[1], out.shape[1]
    t = _sums_zero()
    for kb in range(0, kmain, _BLOCK):
        a0 = a1 = a2 = a3 = _acc_zero()
        for kk in range(kb, min(kb + _BLOCK, kmain), STEP):
            a0, a1, a2, a3 = _dot_row4(a0, a1, a2, a3, x, r * kp + kk, codes, c * kp + kk, kp)
        t = _sums_add4(t, a0, a1, a2, a3)
    _store_sums(out, r * n + o, r * n + o + 2, t, mult, rowsum[r], rowsum[r])
    _add_tails(out, r, c, o, x, codes, kmain, mult, 1, 4)


@njit(cache=True, boundscheck=False, error_model="numpy", inline="always")
def _add_tails(out, r, c, o, x, codes, kmain, mult, rows, columns):  # pragma: no cover - compiled
    """out[r : r+rows, o : o+columns] += mult * the products of the k beyond the last whole step."""
    kp = x.shape[1]
    if kmain == kp:
        return
    for i in range(rows):
        for j in range(columns):
            tail = 0
            for kk in range(kmain, kp):
                tail += np.int32(x[r + i, kk]) * np.int32(codes[c + j, kk])
            out[r + i, o + j] += mult * tail


@njit(cache=True, boundscheck=False, error_model="numpy", inline="always")
def _a8_row_packed(x, w, rowsum, out, t, r, bits, mult):  # pragma: no cover - compiled
    """Token r x column tile t -> out[r, 64t : 64t+64], straight from the packed words: per
    group and field, the field shifted down gives 4 codes of each of 16 columns, multiplied by
    the token's 4 activations of those k and added per column (``portable._cols_dot_add``). No
    decoded copy of the tile: a token or a few read each weight byte once, where decoding would
    write it first."""
    words = w.view(np.uint32)  # [T, G, 4, 16]: word (t, g, v, lane) holds column 16v + lane
    groups, fields, kp = w.shape[1], 8 // bits, x.shape[1]
    mask = np.uint32((1 << bits) - 1)
    a0 = a1 = a2 = a3 = _vzeros_i32()
    for g in range(groups):
        base = (t * groups + g) * 4 * COLUMNS
        for q in range(fields):
            ix, shift = r * kp + 4 * (fields * g + q), bits * q
            a0 = _cols_dot_add(a0, x, ix, words, base, shift, mask)
            a1 = _cols_dot_add(a1, x, ix, words, base + COLUMNS, shift, mask)
            a2 = _cols_dot_add(a2, x, ix, words, base + 2 * COLUMNS, shift, mask)
            a3 = _cols_dot_add(a3, x, ix, words, base + 3 * COLUMNS, shift, mask)
    sums = np.empty(4 * COLUMNS, dtype=np.int32)
    _vstore(sums, 0, a0)
    _vstore(sums, COLUMNS, a1)
    _vstore(sums, 2 * COLUMNS, a2)
    _vstore(sums, 3 * COLUMNS, a3)
    for j in range(4 * COLUMNS):
        out[r, 64 * t + j] = mult * sums[j] - rowsum[r]


@njit(cache=True, boundscheck=False, error_model="numpy", inline="always")
def a8_task(x, w, rowsum, out, t, lo, hi, bits, mult):  # pragma: no cover - compiled
    """Rows lo..hi-1 x column tile t -> out[lo:hi, 64t : 64t+64] (int32): one task of
    ``_a8_body``, and the integer step of a fused layer (``fused``, ``labutils.engine``)."""
    if hi - lo < _DECODE_MIN_ROWS:  # a token or a few (the GEMV of a decode step): no decoded copy
        for r in range(lo, hi):
            _a8_row_packed(x, w, rowsum, out, t, r, bits, mult)
        return
    kp = x.shape[1]
    codes = np.empty((64, kp), dtype=np.int8)
    _decode_columns(w, t, bits, codes)
    kmain = kp // STEP * STEP
    r = lo
    while r + 4 <= hi:
        if TILE_COLUMNS == 2:
            for c in range(0, 64, 2):
                _tile_4x2(x, codes, r, c, 64 * t + c, kmain, rowsum, mult, out)
        else:
            for c in range(0, 64, 4):
                _tile_4x4(x, codes, r, c, 64 * t + c, kmain, rowsum, mult, out)
        r += 4
    while r < hi:
        for c in range(0, 64, 4):
            _row(x, codes, r, c, 64 * t + c, kmain, rowsum, mult, out)
        r += 1


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
