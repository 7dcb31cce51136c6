"""The compiled primitives the engines are made of (Numba, float32 unless said).

Each works in place on preallocated arrays (the caller owns every buffer, so a token step
allocates nothing) and is ``@njit``: called from another compiled function it costs a jump, not
a trip through Python. Rows are tokens: ``x [M, d]`` holds M tokens of width d.

- :func:`rmsnorm`: ``out = x / sqrt(mean(x²) + eps) * gain`` (``torch.nn.RMSNorm``).
- :func:`quantize_absmax`: BitNet's per-token int8 activations, exactly
  :func:`labutils.quant.quantize_activations_absmax` (``scale = max(max|x|, eps) / Qp``,
  ``codes = clamp(rint(x / scale), -Qp, Qp)``), plus the row sums of the codes that the A8
  kernels subtract, and zero padding up to the kernel's width.
- :func:`ternary_matmul`: the integer kernel of :mod:`labutils.kernels` (any path; the kernel is
  an argument) on those codes, then ``y = float32(dot) * x_scale * w_scale`` in the order
  ``PackedBitLinear`` uses, so the engine's projections equal the packed layer's bit for bit.
- :func:`ternary_gemv_lut`: one token through the same projection held as table indices
  (:mod:`labutils.kernels.lut`, 1.67 bits a weight): the token's tables, the lookup kernel (an
  argument), the same rescale; the same int32 dots, so the same floats, as ``ternary_matmul``.
- :func:`float_matmul_16` / :func:`float_matmul_8`: ``x @ W^T`` with W in nn.Linear's layout
  ``[N, K]``: the float head. Each output is a dot product along K in register vectors; tasks
  are contiguous row blocks, so the table streams through memory once, front to back (the
  transposed axpy form read it in 1-2 KB pieces 256 KB apart, which prefetchers do not follow:
  measured slower). W is float32, or bfloat16 held as ``uint16`` (:func:`to_bfloat16`;
  :func:`widen` makes an entry float32 exactly: a shift; :func:`narrow_like` rounds a float32
  into a table's type, the KV cache's).
- :func:`rope`: rotary positions on q and k, pairs (i, i + d_h/2) (``lm.model.apply_rope``).
- :func:`attend_cached`: causal attention of M new tokens over a KV cache, grouped-query (query
  head h reads KV head ``h // (n_head / n_kv_head)``), heads and tokens in parallel.
- :func:`swiglu`: ``silu(gate) * up``; :func:`add_` (residuals).
- :func:`a8_linear_rows` / :func:`binary_linear_rows` (the encoder's): a block of tokens through
  one packed linear inside a parallel task: per-token codes (``kernels.fused``), the kernel
  path's task per column tile, rescale and bias; :func:`exp_approx`: exp that LLVM vectorizes.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from labutils.kernels.float_simd import fadd, ffma, fload, fsum, fzeros
from labutils.kernels.fused import quantize_row_a8, quantize_row_binary, rescale_block
from labutils.kernels.lut import build_tables

__all__ = [
    "KERNEL_WIDTH",
    "padded_width",
    "rmsnorm",
    "quantize_absmax",
    "ternary_matmul",
    "ternary_gemv_lut",
    "float_matmul_8",
    "float_matmul_16",
    "float_matmul_for",
    "to_bfloat16",
    "from_bfloat16",
    "widen",
    "narrow_like",
    "rope",
    "attend_cached",
    "swiglu",
    "add_",
    "a8_linear_rows",
    "binary_linear_rows",
    "exp_approx",
]

_JIT = {"cache": True, "boundscheck": False, "error_model": "numpy"}

KERNEL_WIDTH = 16
"""Activation codes per group of the W1.58A8 layout: the kernels read K padded to a multiple."""


def padded_width(k: int) -> int:
    """K rounded up to the W1.58A8 kernels' group (the width of their activation codes)."""
    return -(-k // KERNEL_WIDTH) * KERNEL_WIDTH


@njit(fastmath={"reassoc"}, **_JIT)
def _sum_squares(row):  # pragma: no cover - compiled
    """sum(row²) of a float32 row [d] in float64. Reassociation (and nothing else: no "nnan", so
    a NaN still propagates) lets LLVM sum in vectors: 3x faster than the sequential sum at d =
    1,536, a different order of float64 additions that rounds to the same float32 mean."""
    total = 0.0
    for j in range(row.shape[0]):
        v = np.float64(row[j])
        total += v * v
    return total


@njit(**_JIT)
def rmsnorm(x, m, gain, eps, out):  # pragma: no cover - compiled
    """Rows 0..m-1 of x [*, d] -> out [*, d]: ``x * (1 / sqrt(mean(x²) + eps)) * gain``
    (float32 result; the sum of squares in float64, rounded once, as close to torch's
    vectorized float32 sum as a sequential loop gets, summed in vectors). ``eps``: float32."""
    d = x.shape[1]
    for r in range(m):
        total = _sum_squares(x[r])
        inv = np.float32(1.0) / np.sqrt(np.float32(total / d) + eps)
        for j in range(d):
            out[r, j] = (x[r, j] * inv) * gain[j]


@njit(**_JIT)
def quantize_absmax(x, m, qp, eps, codes, scales, rowsum):  # pragma: no cover - compiled
    """Rows 0..m-1 of float32 x [*, K] (C-contiguous) -> int8 codes [*, Kp] (columns K..Kp-1
    zero), scale [*] (float32) and the codes' sum [*] (int32): ``kernels.fused.quantize_row_a8``,
    the fused layers' own step, row by row. ``qp`` = 2^(bits-1) - 1, ``eps``: float32. A NaN
    anywhere in a row makes its scale NaN (the caller checks)."""
    for r in range(m):
        quantize_row_a8(x, codes, scales, rowsum, r, qp, eps)


@njit(**{**_JIT, "cache": False})  # the kernels are arguments: see engine.decoder's _JIT_KERNEL_ARGS
def ternary_matmul(parallel_kernel, serial_kernel, codes, m, w, rowsum, dots, x_scale, w_scale, out, min_macs):  # pragma: no cover - compiled
    """out[:m, :N] = float32(codes[:m] @ W^T) * x_scale * w_scale: the integer kernel (parallel
    from ``min_macs`` multiply-adds, else serial) into ``dots`` [*, 64T] (int32), then the
    rescale. ``w``: one layer's PackedWeights data; ``w_scale`` float32 [N]."""
    n = out.shape[1]
    if m * n * codes.shape[1] >= min_macs:
        parallel_kernel(codes[:m], w, rowsum[:m], dots[:m])
    else:
        serial_kernel(codes[:m], w, rowsum[:m], dots[:m])
    for r in range(m):
        s = x_scale[r]
        for j in range(n):
            out[r, j] = np.float32(dots[r, j]) * s * w_scale[j]


@njit(**{**_JIT, "cache": False})  # the kernel is an argument, as in ternary_matmul
def ternary_gemv_lut(kernel, codes, tables, data, neg_count, dots, x_scale, w_scale, out):  # pragma: no cover - compiled
    """out[0, :N] = float32(W @ codes[0]) * x_scale[0] * w_scale for one token: its tables
    (``tables`` uint8 [>= G, 32] scratch), ``kernel`` (``kernels.lut.lut_kernel_for``) on one
    layer's LutWeights ``data`` / ``neg_count`` into ``dots`` int32 [>= 32T], the rescale."""
    t = tables[: data.shape[1] * 8]
    build_tables(codes[0], t)
    kernel(t, data, neg_count, dots)
    s = x_scale[0]
    for j in range(out.shape[1]):
        out[0, j] = np.float32(dots[j]) * s * w_scale[j]


def to_bfloat16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 held as ``uint16`` (the top half of each float32, rounded to nearest,
    ties to even: what ``torch.Tensor.to(torch.bfloat16)`` gives), same shape. Refuses NaN and
    inf (rounding would turn a large finite value into inf silently)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ValueError("bfloat16 conversion needs finite values")
    bits = a.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    if (rounded & 0x7F80 == 0x7F80).any():
        raise ValueError("a value overflows bfloat16")
    return rounded.astype(np.uint16)


def from_bfloat16(a: np.ndarray) -> np.ndarray:
    """bfloat16 held as ``uint16`` -> float32, same shape, exactly: the 16 bits become the top
    half of a float32 (the inverse of :func:`to_bfloat16` for the values it produces)."""
    return (np.asarray(a, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def widen(v):  # pragma: no cover - replaced in compiled code by the overload below
    """One table entry as float32: a float as it is, a ``uint16`` as the bfloat16 it holds, an
    ``int8`` code as its value (unscaled)."""
    return from_bfloat16(np.array(v))[()] if isinstance(v, np.uint16) else np.float32(v)


@overload(widen, inline="always")
def _widen_compiled(v):
    if isinstance(v, types.Float):
        return lambda v: np.float32(v)
    if v == types.uint16:
        # bfloat16 is the top half of a float32: widening is a shift, exact (vpmovzxwd, vpslld)
        return lambda v: np.uint32(np.uint32(v) << 16).view(np.float32)
    if v == types.int8:  # an int8 table's code, its scale applied by the caller
        return lambda v: np.float32(v)
    return None


def narrow_like(v, table):  # pragma: no cover - replaced in compiled code by the overload below
    """float32 ``v`` as an entry of ``table``: as it is for a float32 table, rounded to nearest
    (ties to even) for a ``uint16`` table holding bfloat16 (:func:`to_bfloat16`'s rounding)."""
    if table.dtype == np.uint16:
        return to_bfloat16(np.array([v], np.float32))[0]
    return np.float32(v)


@overload(narrow_like, inline="always")
def _narrow_like_compiled(v, table):
    if not isinstance(table, types.Array):
        return None
    if table.dtype == types.float32:
        return lambda v, table: np.float32(v)
    if table.dtype == types.uint16:

        def narrow(v, table):
            bits = np.float32(v).view(np.uint32)
            return np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))

        return narrow
    return None


@njit(inline="always", **_JIT)
def _float_matmul_body(x, m, w, out, lanes):  # pragma: no cover - compiled
    """out[:m] = x[:m] @ w.T, blocks of 64 rows of w in parallel; per output a dot product along
    K in four vector accumulators of ``lanes``, the tail (K mod 4 lanes) in scalars."""
    n, k = w.shape
    step = 4 * lanes
    main = k - k % step
    for b in prange((n + 63) // 64):
        for v in range(b * 64, min(b * 64 + 64, n)):
            row = w[v]
            for r in range(m):
                xr = x[r]
                a0 = a1 = a2 = a3 = fzeros(lanes)
                for j in range(0, main, step):
                    a0 = ffma(a0, fload(xr, j, lanes), fload(row, j, lanes))
                    a1 = ffma(a1, fload(xr, j + lanes, lanes), fload(row, j + lanes, lanes))
                    a2 = ffma(a2, fload(xr, j + 2 * lanes, lanes), fload(row, j + 2 * lanes, lanes))
                    a3 = ffma(a3, fload(xr, j + 3 * lanes, lanes), fload(row, j + 3 * lanes, lanes))
                total = fsum(fadd(fadd(a0, a1), fadd(a2, a3)))
                for j in range(main, k):
                    total += xr[j] * widen(row[j])
                out[r, v] = total


@njit(parallel=True, **_JIT)
def float_matmul_8(x, m, w, out):  # pragma: no cover - compiled
    """out[:m] = x[:m] @ w.T (x float32 [*, K], w [N, K] float32 or bfloat16 as uint16, out
    float32 [*, N]; nn.Linear's layout): the table is read once, front to back, by contiguous
    row blocks (the access memory prefetchers stream best), each output a dot product along K in
    vectors of 8 float32 (AVX2, NEON). A bfloat16 table gives exactly the result of its widened
    float32 copy at half the bytes read."""
    _float_matmul_body(x, m, w, out, 8)


@njit(parallel=True, **_JIT)
def float_matmul_16(x, m, w, out):  # pragma: no cover - compiled
    """:func:`float_matmul_8` in vectors of 16 float32 (AVX-512)."""
    _float_matmul_body(x, m, w, out, 16)


def float_matmul_for(path: str):
    """The head kernel for a kernel path ("avx512": 16 lanes; "avx2", "generic": 8)."""
    return float_matmul_16 if path == "avx512" else float_matmul_8


@njit(**_JIT)
def rope(x, m, col0, heads, head_dim, cos, sin, pos0):  # pragma: no cover - compiled
    """Rotate in place ``heads`` heads of x [*, ·] starting at column col0 (q or k inside a qkv
    row), for rows 0..m-1 at positions pos0..pos0+m-1; cos, sin [max_len, head_dim] float32:
    ``y_i = x_i cos_i - x_{i+h} sin_i``, ``y_{i+h} = x_{i+h} cos_{i+h} + x_i sin_{i+h}`` (h = d_h/2)."""
    half = head_dim // 2
    for r in range(m):
        p = pos0 + r
        for hh in range(heads):
            base = col0 + hh * head_dim
            for i in range(half):
                a, b = x[r, base + i], x[r, base + i + half]
                x[r, base + i] = a * cos[p, i] + (-b) * sin[p, i]
                x[r, base + i + half] = b * cos[p, i + half] + a * sin[p, i + half]


@njit(parallel=True, fastmath=True, **_JIT)
def attend_cached(qkv, m, n_head, n_kv_head, head_dim, k_cache, v_cache, pos0, scores, out):  # pragma: no cover - compiled
    """Causal attention of rows 0..m-1 (positions pos0..) of qkv [*, (H + 2 Hkv) d_h] (q in the
    first H heads) over the cache k_cache, v_cache [Hkv, max_len, d_h] (float32, or bfloat16 as
    ``uint16``: half the bytes a step reads, widened exactly), already holding positions
    0..pos0+m-1 -> out [*, H d_h]. ``scores`` [H * M, max_len] float32 scratch.
    ``softmax(q k / sqrt(d_h)) v`` per (head, token), in parallel; fastmath lets the dot
    products vectorize (reordered float sums: equal to torch up to rounding)."""
    group = n_head // n_kv_head
    scale = np.float32(1.0 / math.sqrt(head_dim))
    for task in prange(n_head * m):
        h, r = task // m, task % m
        kv = h // group
        length = pos0 + r + 1
        q0 = h * head_dim
        s = scores[task]
        top = np.float32(-np.inf)
        q = qkv[r, q0 : q0 + head_dim]
        for t in range(length):
            key = k_cache[kv, t]
            acc = np.float32(0.0)
            for i in range(head_dim):
                acc += q[i] * widen(key[i])
            acc *= scale
            s[t] = acc
            top = max(top, acc)
        total = np.float32(0.0)
        for t in range(length):
            e = exp_approx(s[t] - top)
            s[t] = e
            total += e
        inv = np.float32(1.0) / total
        acc = np.zeros(head_dim, dtype=np.float32)  # local: nothing aliases the sums, so LLVM vectorizes
        for t in range(length):
            p = s[t] * inv
            row = v_cache[kv, t]
            for i in range(head_dim):
                acc[i] += p * widen(row[i])
        for i in range(head_dim):
            out[r, q0 + i] = acc[i]


@njit(**_JIT)
def swiglu(gate_up, m, hidden, out):  # pragma: no cover - compiled
    """out[:m, :hidden] = silu(gate) * up, gate = gate_up[:, :hidden], up = gate_up[:, hidden:]
    (``silu(g) = g / (1 + exp(-g))``, with ``exp_approx``, which LLVM vectorizes, where libm's expf
    is one call per element). Below g = -88, exp(-g) stays e^88: silu ~ 0."""
    for r in range(m):
        for j in range(hidden):
            g = gate_up[r, j]
            out[r, j] = g / (np.float32(1.0) + exp_approx(min(-g, np.float32(88.0)))) * gate_up[r, hidden + j]


@njit(**_JIT)
def add_(x, m, y):  # pragma: no cover - compiled
    """x[:m] += y[:m] (the residual stream)."""
    for r in range(m):
        for j in range(x.shape[1]):
            x[r, j] += y[r, j]


# --------------------------------------------------------------------------- appended for the encoder (issue 28)
# Inline steps (compiled into their caller, where Numba's parallel loops see through them): a
# block of tokens through one packed linear with the kernel path's task as an argument (the
# caller is compiled once per task: pass a path's ``a8_task`` / ``w1a1_task`` as a constant of a
# module-level function, so that Numba can cache it), and a vectorizable exp.

_INLINE = {**_JIT, "inline": "always"}


@njit(**_INLINE)
def a8_linear_rows(xin, w, k, ws, bias, out, qp, eps, bits, mult, task):  # pragma: no cover - compiled
    """out [R, N] = the A8 BitLinear of xin float32 [R, K] (one task's rows, serial): per-token
    absmax codes, ``task`` (a path's ``a8_task``) per column tile of w uint8 [T, G, 4, 64] into
    an int32 block, rescale by x and w scales (ws float32 [N]) and bias. ``k`` is unused (the
    W1A1 step's signature)."""
    rows = xin.shape[0]
    codes = np.empty((rows, w.shape[1] * 32 // bits), dtype=np.int8)
    xs = np.empty(rows, dtype=np.float32)
    rowsum = np.empty(rows, dtype=np.int32)
    for r in range(rows):
        quantize_row_a8(xin, codes, xs, rowsum, r, qp, eps)
    dots = np.empty((rows, 64), dtype=np.int32)
    for t in range(w.shape[0]):
        task(codes, w[t : t + 1], rowsum, dots, 0, 0, rows, bits, mult)
        rescale_block(dots, out, xs, ws, bias, 0, 64 * t)
    return xs


@njit(**_INLINE)
def binary_linear_rows(xin, w, k, ws, bias, out, qp, eps, bits, mult, task):  # pragma: no cover - compiled
    """out [R, N] = the W1A1 layer of xin float32 [R, K]: sign bits and mean|x| per token,
    ``task`` (a path's ``w1a1_task``) per column tile of w uint64 [T, Kw, 32], rescale and bias.
    ``qp``, ``eps``, ``bits``, ``mult`` are unused (the A8 step's signature)."""
    rows = xin.shape[0]
    signs = np.empty((rows, w.shape[1]), dtype=np.uint64)
    xs = np.empty(rows, dtype=np.float32)
    for r in range(rows):
        quantize_row_binary(xin, signs, xs, r)
    dots = np.empty((rows, 32), dtype=np.int32)
    for t in range(w.shape[0]):
        task(signs, w[t : t + 1], k, dots, 0, 0, rows)
        rescale_block(dots, out, xs, ws, bias, 0, 32 * t)
    return xs


@njit(**_INLINE)
def exp_approx(v):  # pragma: no cover - compiled
    """exp(v) for float32 v <= 88, in a form LLVM vectorizes (libm's expf is a call per element,
    ~10 ns): Cody-Waite
    reduction v = n ln2 + r, a degree-6 polynomial for e^r, 2^n put into the exponent bits.
    Relative error below 2e-7; inputs below -87 give e^-87 (softmax's masked scores: ~0)."""
    v = max(v, np.float32(-87.0))
    n = np.rint(v * np.float32(1.4426950408889634))
    r = (v - n * np.float32(0.693359375)) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * np.int32((np.int32(n) + np.int32(127)) << 23).view(np.float32)
