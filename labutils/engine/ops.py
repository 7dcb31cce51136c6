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
- :func:`float_matmul_t`: ``x @ W^T`` with W stored transposed (``wt [K, N]``): the float head.
  The inner loop runs along N (an ``axpy`` per input feature), which LLVM vectorizes without
  reordering any sum; tasks are column blocks, in parallel.
- :func:`rope`: rotary positions on q and k, pairs (i, i + d_h/2) (``lm.model.apply_rope``).
- :func:`attend_cached`: causal attention of M new tokens over a KV cache, grouped-query (query
  head h reads KV head ``h // (n_head / n_kv_head)``), heads and tokens in parallel.
- :func:`swiglu`: ``silu(gate) * up``; :func:`add_` (residuals).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

__all__ = [
    "KERNEL_WIDTH",
    "padded_width",
    "rmsnorm",
    "quantize_absmax",
    "ternary_matmul",
    "float_matmul_t",
    "rope",
    "attend_cached",
    "swiglu",
    "add_",
]

_JIT = {"cache": True, "boundscheck": False, "error_model": "numpy"}

KERNEL_WIDTH = 16
"""Activation codes per group of the W1.58A8 layout: the kernels read K padded to a multiple."""


def padded_width(k: int) -> int:
    """K rounded up to the W1.58A8 kernels' group (the width of their activation codes)."""
    return -(-k // KERNEL_WIDTH) * KERNEL_WIDTH


@njit(**_JIT)
def rmsnorm(x, m, gain, eps, out):  # pragma: no cover - compiled
    """Rows 0..m-1 of x [*, d] -> out [*, d]: ``x * (1 / sqrt(mean(x²) + eps)) * gain``
    (float32 result; the sum of squares in float64, rounded once, as close to torch's
    vectorized float32 sum as a sequential loop gets). ``eps``: float32."""
    d = x.shape[1]
    for r in range(m):
        total = 0.0
        for j in range(d):
            v = np.float64(x[r, j])
            total += v * v
        inv = np.float32(1.0) / np.sqrt(np.float32(total / d) + eps)
        for j in range(d):
            out[r, j] = (x[r, j] * inv) * gain[j]


@njit(**_JIT)
def quantize_absmax(x, m, qp, eps, codes, scales, rowsum):  # pragma: no cover - compiled
    """Rows 0..m-1 of float32 x [*, K] -> int8 codes [*, Kp] (columns K..Kp-1 zero), scale
    [*] (float32) and the codes' sum [*] (int32). ``qp`` = 2^(bits-1) - 1, ``eps``: float32.
    A NaN anywhere in a row makes its scale NaN (the caller checks)."""
    k, kp = x.shape[1], codes.shape[1]
    for r in range(m):
        amax = np.float32(0.0)
        for j in range(k):
            a = abs(x[r, j])
            amax = a if a > amax or a != a else amax
        scale = max(amax, eps) / qp if amax == amax else amax
        scales[r] = scale
        total = np.int32(0)
        for j in range(k):
            c = np.int32(min(max(np.rint(x[r, j] / scale), -qp), qp))
            codes[r, j] = np.int8(c)
            total += c
        for j in range(k, kp):
            codes[r, j] = 0
        rowsum[r] = total


@njit(**_JIT)
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


@njit(parallel=True, **_JIT)
def float_matmul_t(x, m, wt, out):  # pragma: no cover - compiled
    """out[:m] = x[:m] @ wt (x float32 [*, K], wt [K, N] float32, out [*, N]): column blocks of
    512 in parallel, each an accumulation over K of ``x[r, j] * wt[j, block]``."""
    k, n = wt.shape
    block = 512
    for b in prange((n + block - 1) // block):
        lo, hi = b * block, min(b * block + block, n)
        # A local accumulator and 1-D row views: LLVM then knows nothing aliases the sums and
        # vectorizes the axpy (into out[r, c] directly it stays scalar: 10x slower, measured).
        acc = np.empty(hi - lo, dtype=np.float32)
        for r in range(m):
            acc[:] = 0.0
            for j in range(k):
                xj = x[r, j]
                row = wt[j, lo:hi]
                for c in range(hi - lo):
                    acc[c] += xj * row[c]
            for c in range(hi - lo):
                out[r, lo + c] = acc[c]


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
    first H heads) over the cache k_cache, v_cache [Hkv, max_len, d_h], already holding
    positions 0..pos0+m-1 -> out [*, H d_h]. ``scores`` [H * M, max_len] float32 scratch.
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
                acc += q[i] * key[i]
            acc *= scale
            s[t] = acc
            top = max(top, acc)
        total = np.float32(0.0)
        for t in range(length):
            e = np.exp(s[t] - top)
            s[t] = e
            total += e
        inv = np.float32(1.0) / total
        acc = np.zeros(head_dim, dtype=np.float32)  # local: vectorizes (see float_matmul_t)
        for t in range(length):
            p = s[t] * inv
            row = v_cache[kv, t]
            for i in range(head_dim):
                acc[i] += p * row[i]
        for i in range(head_dim):
            out[r, q0 + i] = acc[i]


@njit(**_JIT)
def swiglu(gate_up, m, hidden, out):  # pragma: no cover - compiled
    """out[:m, :hidden] = silu(gate) * up, gate = gate_up[:, :hidden], up = gate_up[:, hidden:]
    (``silu(g) = g / (1 + exp(-g))``)."""
    for r in range(m):
        for j in range(hidden):
            g = gate_up[r, j]
            out[r, j] = g / (np.float32(1.0) + np.exp(-g)) * gate_up[r, hidden + j]


@njit(**_JIT)
def add_(x, m, y):  # pragma: no cover - compiled
    """x[:m] += y[:m] (the residual stream)."""
    for r in range(m):
        for j in range(x.shape[1]):
            x[r, j] += y[r, j]
