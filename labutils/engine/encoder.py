"""The packed encoder as compiled steps (issue 28): a quantized BERT/MiniLM classifier whose
every encoder layer runs as three calls into compiled code, on Numba's thread pool alone.

``EncoderEngine.from_model(model)`` takes a BERT-style ``*ForSequenceClassification`` whose
encoder linears are BitLinear (fake-quantized) or PackedBitLinear (``kernels.pack_model``) and
keeps what its forward pass computes with: per layer the prepacked weights of Q, K and V
concatenated into one ``[3H, H]`` matrix (one activation quantization and one kernel for the
three), the attention output, the FFN's two linears, their scales and biases, the LayerNorms;
the embedding tables stay as the model holds them; the pooler and classifier stay torch modules
(one call each per forward pass).

A forward pass of B sequences of L tokens:

1. **Unpadding.** Only real tokens (``attention_mask`` 1) become rows, plus each sequence's
   first token (the pooler reads it even when masked); attention runs over each sequence's
   real tokens. Padding costs nothing, and a padded token never reaches a real one, exactly as
   the mask makes it in the float model.
2. **Embeddings**: word (the int4 ``PackedEmbedding`` or a float table) + token type + position,
   read where each table lies and dequantized on the fly, then LayerNorm: one compiled call.
3. Per layer, three compiled calls on preallocated buffers ``h [M, H]``, ``qkv [M, 3H]``,
   ``ctx [M, H]``:

   - ``qkv``: blocks of rows in parallel; per block per-token int8 codes (or sign bits, W1A1),
     the integer kernel of the active path per column tile, rescale and bias (``kernels.fused``);
   - ``attention``: (sequence, head) pairs in parallel; scores, softmax (a vectorized exp),
     weighted values, over the sequence's real tokens;
   - ``block``: blocks of rows in parallel, each running everything that is per token: the
     attention output linear, residual and LayerNorm, the FFN up linear, GELU (a vectorized
     erf), the FFN down linear, residual and LayerNorm, on scratch that fits in L2.

4. The pooler (first token, tanh) and the classifier: torch linears on B rows.

The integer linear is the same fused step on every kernel path ("avx512", "avx2", "generic":
``kernels.use`` and ``LABBOOK_KERNEL_PATH`` choose, as for the kernels): each path's
``a8_task`` / ``w1a1_task`` is compiled into the layer's calls (``_ENTRIES``). Codes and integer
dots are the packed layer's; LayerNorm, softmax, exp and erf sum and round differently from
torch, so the logits equal the fake-quantized model's to float rounding, and where rounding moves
an activation across a code boundary, to that code's step (tests/test_engine_encoder.py).

``EncoderEngine`` is itself an ``nn.Module`` called like the Hugging Face model
(``model(input_ids=, attention_mask=).logits``), which is how ``labutils.benchmark``'s CPU stage runs it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numba import njit, prange
from torch import nn

from labutils.kernels import amx, generic, microkernels_avx2, microkernels_avx512
from labutils.kernels.dispatch import active_path
from labutils.kernels.layer import PackedEmbedding, embedding_value
from labutils.kernels.float_simd import ffma, fload, fmax, fmaxlanes, fsplat, fstore, fzeros
from labutils.engine.ops import a8_linear_rows, binary_linear_rows, exp_approx

__all__ = ["EncoderEngine", "EncoderLayerWeights", "engine_profile", "ENGINE_SECTIONS"]

_JIT = {"cache": True, "boundscheck": False, "error_model": "numpy"}
_INLINE = {**_JIT, "inline": "always"}
# Reassociation lets LLVM vectorize the sums of LayerNorm and softmax; no "arcp" (x / scale must
# round as torch's division does, so the int8 codes are the packed layer's), no "nnan"/"ninf".
_FAST = {"reassoc", "contract", "nsz"}
_ROW_BLOCK_MAX = 64  # rows per task of the qkv and block steps: their scratch stays in L2
_ROW_BLOCK_MIN = 16  # from 16 rows a task decodes each weight tile once (the kernels' panel)


# --------------------------------------------------------------------------- float steps


@njit(**_INLINE)
def _gelu(x):  # pragma: no cover - compiled
    """BERT's exact GELU, x * Phi(x) = x/2 (1 + erf(x / sqrt 2)), with erf from Abramowitz and
    Stegun 7.1.26 (absolute error below 1.5e-7) on the vectorizable ``exp_approx``."""
    z = abs(x) * np.float32(0.7071067811865476)
    t = np.float32(1.0) / (np.float32(1.0) + np.float32(0.3275911) * z)
    poly = t * (np.float32(0.254829592) + t * (np.float32(-0.284496736) + t * (
        np.float32(1.421413741) + t * (np.float32(-1.453152027) + t * np.float32(1.061405429)))))
    erf = np.float32(1.0) - poly * exp_approx(-z * z)
    return np.float32(0.5) * x * (np.float32(1.0) + (erf if x >= 0 else -erf))


@njit(**_INLINE)
def _layer_norm_row(y, r, gamma, beta, eps, out):  # pragma: no cover - compiled
    """out[r] = LayerNorm(y[r]) (float32, two passes)."""
    width = y.shape[1]
    total = np.float32(0.0)
    for j in range(width):
        total += y[r, j]
    mean = total / np.float32(width)
    spread = np.float32(0.0)
    for j in range(width):
        d = y[r, j] - mean
        spread += d * d
    inv = np.float32(1.0) / np.sqrt(spread / np.float32(width) + eps)
    for j in range(width):
        out[r, j] = (y[r, j] - mean) * inv * gamma[j] + beta[j]


@njit(**_INLINE)
def _residual_layer_norm_row(y, h, r, gamma, beta, eps):  # pragma: no cover - compiled
    """h[r] = LayerNorm(y[r] + h[r]) (gamma, beta float32 [H]): the residual stream updated in
    place; y[r] is overwritten with the sum."""
    for j in range(y.shape[1]):
        y[r, j] += h[r, j]
    _layer_norm_row(y, r, gamma, beta, eps, h)


# --------------------------------------------------------------------------- the three steps


@njit(**_INLINE)
def _qkv_body(h, qkv, block, w, ws, bias, k, qp, eps, bits, mult, linear, task):  # pragma: no cover - compiled
    """qkv [M, 3H] = the concatenated Q, K, V linears of h [M, H], blocks of ``block`` rows in
    parallel. Returns the per-token scales float32 [M] (a NaN or inf in h makes one non-finite)."""
    m = h.shape[0]
    xs = np.empty(m, dtype=np.float32)
    for b in prange((m + block - 1) // block):
        lo, hi = b * block, min(b * block + block, m)
        xs[lo:hi] = linear(h[lo:hi], w, k, ws, bias, qkv[lo:hi], qp, eps, bits, mult, task)
    return xs


@njit(**_INLINE)
def _block_body(h, ctx, block, w_o, ws_o, b_o, g1, beta1, w_i, ws_i, b_i, w_d, ws_d, b_d, g2, beta2,
                k_o, k_i, k_d, qp, eps, bits, mult, ln_eps, linear, task):  # pragma: no cover - compiled  # fmt: skip
    """Everything per token after attention, blocks of ``block`` rows in parallel, in place on
    h [M, H]: h = LN1(ctx W_o + b_o + h), then h = LN2(GELU(h W_i + b_i) W_d + b_d + h)."""
    m, width = h.shape
    inner = ws_i.shape[0]
    for b in prange((m + block - 1) // block):
        lo, hi = b * block, min(b * block + block, m)
        rows = hi - lo
        hb = h[lo:hi]
        tmp = np.empty((rows, width), dtype=np.float32)
        linear(ctx[lo:hi], w_o, k_o, ws_o, b_o, tmp, qp, eps, bits, mult, task)
        for r in range(rows):
            _residual_layer_norm_row(tmp, hb, r, g1, beta1, ln_eps)
        mid = np.empty((rows, inner), dtype=np.float32)
        linear(hb, w_i, k_i, ws_i, b_i, mid, qp, eps, bits, mult, task)
        for r in range(rows):
            for j in range(inner):
                mid[r, j] = _gelu(mid[r, j])
        linear(mid, w_d, k_d, ws_d, b_d, tmp, qp, eps, bits, mult, task)
        for r in range(rows):
            _residual_layer_norm_row(tmp, hb, r, g2, beta2, ln_eps)


@njit(**_INLINE)
def _softmax_rows(sc, rows, n, lanes):  # pragma: no cover - compiled
    """sc[i, :n] = softmax(sc[i, :n]) for i < rows (max subtracted, the vectorized ``exp_approx``).
    The max runs in vectors of ``lanes`` (a scalar max loop does not vectorize without fastmath's
    no-NaN flag, and it took a fifth of the attention's time, measured)."""
    p, whole = sc.shape[1], n - n % lanes
    for i in range(rows):
        top = sc[i, 0]
        if whole:
            tops = fload(sc, i * p, lanes)
            for j in range(lanes, whole, lanes):
                tops = fmax(tops, fload(sc, i * p + j, lanes))
            top = fmaxlanes(tops)
        for j in range(whole, n):
            top = max(top, sc[i, j])
        total = np.float32(0.0)
        for j in range(n):
            e = exp_approx(sc[i, j] - top)
            sc[i, j] = e
            total += e
        inv = np.float32(1.0) / total
        for j in range(n):
            sc[i, j] *= inv


@njit(**_INLINE)
def _attend_blocked(qkv, ctx, r0, r1, kt, vv, n, c0, head_dim, sc, lanes):  # pragma: no cover - compiled
    """Queries r0..r1-1 of one head against its keys kt [d, P] (pre-scaled, P a multiple of
    2 lanes, zero beyond n) and values vv [n, d] (d a multiple of 2 lanes), in blocks of 4
    queries x 2 vectors (8 accumulators in registers): the scores of 2 x ``lanes`` keys, the
    softmax, then P V for 2 x ``lanes`` dims. ``sc`` float32 [4, P] scratch; ``lanes`` 8 or 16."""
    p, width, step = kt.shape[1], ctx.shape[1], 2 * lanes
    for i0 in range(r0, r1, 4):
        ra, rb, rc, rd = i0, min(i0 + 1, r1 - 1), min(i0 + 2, r1 - 1), min(i0 + 3, r1 - 1)  # the tail repeats its last row
        for j0 in range(0, p, step):
            a0 = a1 = b0 = b1 = e0 = e1 = f0 = f1 = fzeros(lanes)
            for d in range(head_dim):
                lo, hi = fload(kt, d * p + j0, lanes), fload(kt, d * p + j0 + lanes, lanes)
                q = fsplat(qkv[ra, c0 + d], lanes)
                a0, a1 = ffma(a0, q, lo), ffma(a1, q, hi)
                q = fsplat(qkv[rb, c0 + d], lanes)
                b0, b1 = ffma(b0, q, lo), ffma(b1, q, hi)
                q = fsplat(qkv[rc, c0 + d], lanes)
                e0, e1 = ffma(e0, q, lo), ffma(e1, q, hi)
                q = fsplat(qkv[rd, c0 + d], lanes)
                f0, f1 = ffma(f0, q, lo), ffma(f1, q, hi)
            fstore(sc, j0, a0)
            fstore(sc, j0 + lanes, a1)
            fstore(sc, p + j0, b0)
            fstore(sc, p + j0 + lanes, b1)
            fstore(sc, 2 * p + j0, e0)
            fstore(sc, 2 * p + j0 + lanes, e1)
            fstore(sc, 3 * p + j0, f0)
            fstore(sc, 3 * p + j0 + lanes, f1)
        rows = min(4, r1 - i0)
        _softmax_rows(sc, rows, n, lanes)
        for dv in range(0, head_dim, step):
            a0 = a1 = b0 = b1 = e0 = e1 = f0 = f1 = fzeros(lanes)
            for j in range(n):
                lo, hi = fload(vv, j * head_dim + dv, lanes), fload(vv, j * head_dim + dv + lanes, lanes)
                w = fsplat(sc[0, j], lanes)
                a0, a1 = ffma(a0, w, lo), ffma(a1, w, hi)
                w = fsplat(sc[1, j], lanes)
                b0, b1 = ffma(b0, w, lo), ffma(b1, w, hi)
                w = fsplat(sc[2, j], lanes)
                e0, e1 = ffma(e0, w, lo), ffma(e1, w, hi)
                w = fsplat(sc[3, j], lanes)
                f0, f1 = ffma(f0, w, lo), ffma(f1, w, hi)
            o = i0 * width + c0 + dv
            fstore(ctx, o, a0)
            fstore(ctx, o + lanes, a1)
            if rows > 1:
                fstore(ctx, o + width, b0)
                fstore(ctx, o + width + lanes, b1)
            if rows > 2:
                fstore(ctx, o + 2 * width, e0)
                fstore(ctx, o + 2 * width + lanes, e1)
            if rows > 3:
                fstore(ctx, o + 3 * width, f0)
                fstore(ctx, o + 3 * width + lanes, f1)


@njit(**_INLINE)
def _attend_rows(qkv, ctx, r0, r1, kt, vv, n, c0, head_dim, sc, lanes):  # pragma: no cover - compiled
    """``_attend_blocked`` for any head_dim: one query at a time, loops LLVM vectorizes."""
    acc = np.empty(head_dim, dtype=np.float32)
    for r in range(r0, r1):
        for j in range(n):
            sc[0, j] = 0.0
        for d in range(head_dim):
            qd = qkv[r, c0 + d]
            for j in range(n):
                sc[0, j] += qd * kt[d, j]
        _softmax_rows(sc, 1, n, lanes)
        acc[:] = 0.0
        for j in range(n):
            pj = sc[0, j]
            for d in range(head_dim):
                acc[d] += pj * vv[j, d]
        for d in range(head_dim):
            ctx[r, c0 + d] = acc[d]


@njit(**_INLINE)
def _attention_body(qkv, ctx, rows_start, keys, keys_start, heads, head_dim, lanes):  # pragma: no cover - compiled
    """ctx [M, H] = softmax(q k^T / sqrt(d)) v per (sequence, head), in parallel: the queries
    are sequence s's rows rows_start[s]..rows_start[s+1]-1 of qkv [M, 3H] (q, k, v side by
    side, head-major), the keys and values its real tokens, rows ``keys[keys_start[s] :
    keys_start[s+1]]``. Per task the head's K^T (scaled by 1/sqrt(d)) and V are gathered once,
    [d, n] and [n, d], so both products run along a contiguous axis."""
    width = heads * head_dim
    scale = np.float32(1.0 / math.sqrt(head_dim))
    for job in prange((rows_start.shape[0] - 1) * heads):
        s, hd = job // heads, job % heads
        k0, n = keys_start[s], keys_start[s + 1] - keys_start[s]
        c0 = hd * head_dim
        padded = (n + 2 * lanes - 1) // (2 * lanes) * (2 * lanes)
        kt = np.zeros((head_dim, padded), dtype=np.float32)
        vv = np.empty((n, head_dim), dtype=np.float32)
        for j in range(n):
            row = keys[k0 + j]
            for d in range(head_dim):
                kt[d, j] = qkv[row, width + c0 + d] * scale
                vv[j, d] = qkv[row, 2 * width + c0 + d]
        sc = np.empty((4, padded), dtype=np.float32)
        if head_dim % (2 * lanes) == 0:
            _attend_blocked(qkv, ctx, rows_start[s], rows_start[s + 1], kt, vv, n, c0, head_dim, sc, lanes)
        else:
            _attend_rows(qkv, ctx, rows_start[s], rows_start[s + 1], kt, vv, n, c0, head_dim, sc, lanes)


@njit(parallel=True, fastmath=_FAST, **_JIT)
def _attention_8(qkv, ctx, rows_start, keys, keys_start, heads, head_dim):  # pragma: no cover - compiled
    """``_attention_body`` on vectors of 8 float32 (AVX2, generic)."""
    _attention_body(qkv, ctx, rows_start, keys, keys_start, heads, head_dim, 8)


@njit(parallel=True, fastmath=_FAST, **_JIT)
def _attention_16(qkv, ctx, rows_start, keys, keys_start, heads, head_dim):  # pragma: no cover - compiled
    """``_attention_body`` on vectors of 16 float32 (AVX-512)."""
    _attention_body(qkv, ctx, rows_start, keys, keys_start, heads, head_dim, 16)


# An embedding table as the compiled lookup reads it: (floats, codes, scale, group, mode). Mode
# FLOAT_TABLE reads float32 ``floats [rows, H]``; INT4_TABLE and INT8_TABLE read ``codes`` and
# ``scale`` as ``kernels.PackedEmbedding`` stores them (nibbles + 8, two per byte, low nibble first;
# or int8 bytes) with one float32 scale per ``group`` values. The unused arrays are 1 x 1.
FLOAT_TABLE, INT4_TABLE, INT8_TABLE = 0, 1, 2


@njit(**_INLINE)
def _table_value(table, row, j):  # pragma: no cover - compiled
    """Element j of row ``row`` of an embedding table (float32): the float, or code * scale."""
    floats, codes, scale, group, mode = table
    if mode == FLOAT_TABLE:
        return floats[row, j]
    return embedding_value(codes, scale, group, mode == INT4_TABLE, row, j)


@njit(parallel=True, **_JIT)
def _embed(word_ids, type_ids, positions, word, kind, position, gamma, beta, eps, h):  # pragma: no cover - compiled
    """h [M, H] = LayerNorm((word + kind) + position) per row, in parallel: BERT's embeddings in
    its order of additions, each row read from its table where it lies (int [M] indices; tables as
    ``_table_value`` reads them). No fastmath: a product of the lookup must round before its sum,
    as in the float model, not fuse into it."""
    for r in prange(h.shape[0]):
        for j in range(h.shape[1]):
            h[r, j] = (_table_value(word, word_ids[r], j) + _table_value(kind, type_ids[r], j)) + _table_value(position, positions[r], j)
        _layer_norm_row(h, r, gamma, beta, eps, h)


def _table_arrays(table: nn.Module, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """An ``nn.Embedding`` (float) or a ``kernels.PackedEmbedding`` as ``_table_value``'s tuple
    (zero-copy views of its buffers)."""
    none_f, none_u = np.zeros((1, 1), np.float32), np.zeros((1, 1), np.uint8)
    if isinstance(table, PackedEmbedding):
        mode = INT4_TABLE if table.nibbles else INT8_TABLE
        return none_f, table.codes.numpy(), table.scale.numpy(), int(table.group_size), mode
    if type(table) is nn.Embedding and table.weight.dtype == torch.float32:
        return table.weight.detach().numpy(), none_u, none_f, 1, FLOAT_TABLE
    raise TypeError(f"{name}: the encoder engine reads float32 nn.Embedding or PackedEmbedding tables, got {type(table).__name__}")


# --------------------------------------------------------------------------- one entry per path
# The integer step is compiled into each entry as a constant (a Numba dispatcher passed from
# Python would be a new type every process, which Numba cannot cache): 2 kinds x 3 paths.


@njit(parallel=True, fastmath=_FAST, **_JIT)
def _qkv_a8_avx512(h, qkv, block, w, ws, bias, k, qp, eps, bits, mult):  # pragma: no cover - compiled
    return _qkv_body(h, qkv, block, w, ws, bias, k, qp, eps, bits, mult, a8_linear_rows, microkernels_avx512.a8_task)


@njit(parallel=True, fastmath=_FAST, **_JIT)
def _qkv_a8_avx2(h, qkv, block, w, ws, bias, k, qp, eps, bits, mult):  # pragma: no cover - compiled
    return _qkv_body(h, qkv, block, w, ws, bias, k, qp, eps, bits, mult, a8_linear_rows, microkernels_avx2.a8_task)


@njit(parallel=True, fastmath=_FAST, **_JIT)
def _qkv_a8_generic(h, qkv, block, w, ws, bias, k, qp, eps, bits, mult):  # pragma: no cover - compiled
    return _qkv_body(h, qkv, block, w, ws, bias, k, qp, eps, bits, mult, a8_linear_rows, generic.a8_task)


@njit(parallel=True, fastmath=_FAST, **_JIT)
def _qkv_a8_amx(h, qkv, block, w, ws, bias, k, qp, eps, bits, mult):  # pragma: no cover - compiled
    return _qkv_body(h, qkv, block, w, ws, bias, k, qp, eps, bits, mult, a8_linear_rows, amx.a8_task)


@njit(parallel=True, fastmath=_FAST, **_JIT)
def _qkv_binary_avx512(h, qkv, block, w, ws, bias, k, qp, eps, bits, mult):  # pragma: no cover - compiled
    return _qkv_body(h, qkv, block, w, ws, bias, k, qp, eps, bits, mult, binary_linear_rows, microkernels_avx512.w1a1_task)


@njit(parallel=True, fastmath=_FAST, **_JIT)
def _qkv_binary_avx2(h, qkv, block, w, ws, bias, k, qp, eps, bits, mult):  # pragma: no cover - compiled
    return _qkv_body(h, qkv, block, w, ws, bias, k, qp, eps, bits, mult, binary_linear_rows, microkernels_avx2.w1a1_task)


@njit(parallel=True, fastmath=_FAST, **_JIT)
def _qkv_binary_generic(h, qkv, block, w, ws, bias, k, qp, eps, bits, mult):  # pragma: no cover - compiled
    return _qkv_body(h, qkv, block, w, ws, bias, k, qp, eps, bits, mult, binary_linear_rows, generic.w1a1_task)


@njit(parallel=True, fastmath=_FAST, **_JIT)
def _block_a8_avx512(h, ctx, block, w_o, ws_o, b_o, g1, beta1, w_i, ws_i, b_i, w_d, ws_d, b_d, g2, beta2,
                     k_o, k_i, k_d, qp, eps, bits, mult, ln_eps):  # pragma: no cover - compiled  # fmt: skip
    _block_body(h, ctx, block, w_o, ws_o, b_o, g1, beta1, w_i, ws_i, b_i, w_d, ws_d, b_d, g2, beta2,
                k_o, k_i, k_d, qp, eps, bits, mult, ln_eps, a8_linear_rows, microkernels_avx512.a8_task)  # fmt: skip


@njit(parallel=True, fastmath=_FAST, **_JIT)
def _block_a8_avx2(h, ctx, block, w_o, ws_o, b_o, g1, beta1, w_i, ws_i, b_i, w_d, ws_d, b_d, g2, beta2,
                   k_o, k_i, k_d, qp, eps, bits, mult, ln_eps):  # pragma: no cover - compiled  # fmt: skip
    _block_body(h, ctx, block, w_o, ws_o, b_o, g1, beta1, w_i, ws_i, b_i, w_d, ws_d, b_d, g2, beta2,
                k_o, k_i, k_d, qp, eps, bits, mult, ln_eps, a8_linear_rows, microkernels_avx2.a8_task)  # fmt: skip


@njit(parallel=True, fastmath=_FAST, **_JIT)
def _block_a8_generic(h, ctx, block, w_o, ws_o, b_o, g1, beta1, w_i, ws_i, b_i, w_d, ws_d, b_d, g2, beta2,
                      k_o, k_i, k_d, qp, eps, bits, mult, ln_eps):  # pragma: no cover - compiled  # fmt: skip
    _block_body(h, ctx, block, w_o, ws_o, b_o, g1, beta1, w_i, ws_i, b_i, w_d, ws_d, b_d, g2, beta2,
                k_o, k_i, k_d, qp, eps, bits, mult, ln_eps, a8_linear_rows, generic.a8_task)  # fmt: skip


@njit(parallel=True, fastmath=_FAST, **_JIT)
def _block_a8_amx(h, ctx, block, w_o, ws_o, b_o, g1, beta1, w_i, ws_i, b_i, w_d, ws_d, b_d, g2, beta2,
                  k_o, k_i, k_d, qp, eps, bits, mult, ln_eps):  # pragma: no cover - compiled  # fmt: skip
    _block_body(h, ctx, block, w_o, ws_o, b_o, g1, beta1, w_i, ws_i, b_i, w_d, ws_d, b_d, g2, beta2,
                k_o, k_i, k_d, qp, eps, bits, mult, ln_eps, a8_linear_rows, amx.a8_task)  # fmt: skip


@njit(parallel=True, fastmath=_FAST, **_JIT)
def _block_binary_avx512(h, ctx, block, w_o, ws_o, b_o, g1, beta1, w_i, ws_i, b_i, w_d, ws_d, b_d, g2, beta2,
                         k_o, k_i, k_d, qp, eps, bits, mult, ln_eps):  # pragma: no cover - compiled  # fmt: skip
    _block_body(h, ctx, block, w_o, ws_o, b_o, g1, beta1, w_i, ws_i, b_i, w_d, ws_d, b_d, g2, beta2,
                k_o, k_i, k_d, qp, eps, bits, mult, ln_eps, binary_linear_rows, microkernels_avx512.w1a1_task)  # fmt: skip


@njit(parallel=True, fastmath=_FAST, **_JIT)
def _block_binary_avx2(h, ctx, block, w_o, ws_o, b_o, g1, beta1, w_i, ws_i, b_i, w_d, ws_d, b_d, g2, beta2,
                       k_o, k_i, k_d, qp, eps, bits, mult, ln_eps):  # pragma: no cover - compiled  # fmt: skip
    _block_body(h, ctx, block, w_o, ws_o, b_o, g1, beta1, w_i, ws_i, b_i, w_d, ws_d, b_d, g2, beta2,
                k_o, k_i, k_d, qp, eps, bits, mult, ln_eps, binary_linear_rows, microkernels_avx2.w1a1_task)  # fmt: skip


@njit(parallel=True, fastmath=_FAST, **_JIT)
def _block_binary_generic(h, ctx, block, w_o, ws_o, b_o, g1, beta1, w_i, ws_i, b_i, w_d, ws_d, b_d, g2, beta2,
                          k_o, k_i, k_d, qp, eps, bits, mult, ln_eps):  # pragma: no cover - compiled  # fmt: skip
    _block_body(h, ctx, block, w_o, ws_o, b_o, g1, beta1, w_i, ws_i, b_i, w_d, ws_d, b_d, g2, beta2,
                k_o, k_i, k_d, qp, eps, bits, mult, ln_eps, binary_linear_rows, generic.w1a1_task)  # fmt: skip


_ENTRIES = {
    ("a8", "avx512"): (_qkv_a8_avx512, _attention_16, _block_a8_avx512),
    ("a8", "avx2"): (_qkv_a8_avx2, _attention_8, _block_a8_avx2),
    ("a8", "generic"): (_qkv_a8_generic, _attention_8, _block_a8_generic),
    # the avx512 path on a CPU with AMX-INT8 (Sapphire Rapids on): tasks of 16 tokens or more run
    # their tiles on AMX (kernels.amx: 16,384 int8 products an instruction), the rest on VNNI
    ("a8", "amx"): (_qkv_a8_amx, _attention_16, _block_a8_amx),
    ("binary", "avx512"): (_qkv_binary_avx512, _attention_16, _block_binary_avx512),
    ("binary", "avx2"): (_qkv_binary_avx2, _attention_8, _block_binary_avx2),
    ("binary", "generic"): (_qkv_binary_generic, _attention_8, _block_binary_generic),
}
"""(activation kind, kernel path or "amx") -> (qkv step, attention step, block step)."""

_SCHEMES = {"w1.58a8": ("a8", 2, 1), "w1a8": ("a8", 1, 2), "w1a1": ("binary", 1, 1)}
"""scheme -> (activation kind, bits per weight code, multiplier of the code sum) (``kernels.layout``)."""
_TILE = {"a8": 64, "binary": 32}  # output columns per weight tile

ENGINE_SECTIONS = ("unpadding", "embeddings", "qkv", "attention", "block", "head")
"""What ``EncoderEngine.forward(mark=...)`` reports, in order: the index arithmetic of unpadding
(numpy), the embeddings, per layer the Q/K/V integer linear, attention and the block (three
integer linears, two LayerNorms, GELU), and the pooler and classifier (torch)."""


# --------------------------------------------------------------------------- the module


@dataclass
class EncoderLayerWeights:
    """One encoder layer as the compiled steps read it (numpy views of the module's buffers).

    ``w_*``: PackedWeights data (A8: uint8 [T, G, 4, 64]; W1A1: uint64 [T, Kw, 32]); ``ws_*``,
    ``b_*``: float32 [N] weight scales and biases (zeros where the linear has none); ``k_*``:
    in_features; ``g1, beta1, g2, beta2``: the two LayerNorms' float32 [H]."""

    w_qkv: np.ndarray
    ws_qkv: np.ndarray
    b_qkv: np.ndarray
    w_o: np.ndarray
    ws_o: np.ndarray
    b_o: np.ndarray
    g1: np.ndarray
    beta1: np.ndarray
    w_i: np.ndarray
    ws_i: np.ndarray
    b_i: np.ndarray
    w_d: np.ndarray
    ws_d: np.ndarray
    b_d: np.ndarray
    g2: np.ndarray
    beta2: np.ndarray
    k_qkv: int
    k_o: int
    k_i: int
    k_d: int


def _linear_arrays(layer: nn.Module, name: str) -> tuple[Any, np.ndarray, np.ndarray]:
    """A PackedBitLinear's PackedWeights, weight scales float32 [N] and bias float32 [N]."""
    from labutils.kernels.layer import PackedBitLinear

    if not isinstance(layer, PackedBitLinear):
        raise TypeError(f"{name} must be a PackedBitLinear (kernels.pack_model), got {type(layer).__name__}")
    if layer.norm is not None:
        raise ValueError(f"{name} normalizes its input (BitLinear norm); the encoder engine runs BERT's own LayerNorms only")
    if layer.act_shift is not None:
        raise ValueError(f"{name} has elastic binary activations (BiT); the encoder engine runs sign/mean|x| activations only")
    n = layer.out_features
    scale = layer.weight_scale.reshape(-1).expand(n).to(torch.float32).contiguous().numpy().copy()
    bias = (layer.bias if layer.bias is not None else torch.zeros(n)).to(torch.float32).contiguous().numpy().copy()
    return layer.weights, scale, bias


def _layer_norm_arrays(norm: nn.Module, name: str) -> tuple[np.ndarray, np.ndarray, float]:
    if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
        raise TypeError(f"{name} must be an nn.LayerNorm with weight and bias, got {type(norm).__name__}")
    return (norm.weight.detach().float().contiguous().numpy().copy(), norm.bias.detach().float().contiguous().numpy().copy(),
            float(norm.eps))  # fmt: skip


class EncoderEngine(nn.Module):
    """A packed BERT-style classifier whose encoder runs as compiled steps (module docstring).

    Build it with ``EncoderEngine.from_model(model)``; call it like the Hugging Face model:
    ``engine(input_ids=ids, attention_mask=mask).logits`` (ids int64 [B, L], mask 0/1 [B, L],
    optional ``token_type_ids`` [B, L]) -> SequenceClassifierOutput with logits float32
    [B, num_labels]. CPU only, no autograd. The weights are buffers (``state_dict``, and what
    the benchmark counts as resident); the word embeddings (int4 ``PackedEmbedding`` or float),
    pooler and classifier are the model's own modules.
    """

    def __init__(self, model: nn.Module) -> None:
        """model: a BERT-style ``*ForSequenceClassification`` (``base_model`` with ``embeddings``,
        ``encoder.layer``, ``pooler``; a ``classifier``) whose encoder linears are PackedBitLinear
        of one scheme; use ``from_model`` for BitLinear models."""
        super().__init__()
        base = getattr(model, "base_model", None)
        config = getattr(model, "config", None)
        if base is None or config is None or not all(hasattr(base, a) for a in ("embeddings", "encoder", "pooler")):
            raise TypeError(f"model must be a BERT-style classifier (base_model.embeddings/encoder/pooler), got {type(model).__name__}")
        if getattr(config, "hidden_act", None) != "gelu":
            raise ValueError(f"the encoder engine computes BERT's exact (erf) GELU; this model's hidden_act is {config.hidden_act!r}")
        if base.pooler is None or not hasattr(model, "classifier"):
            raise ValueError("the encoder engine needs the pooler and the classifier (a *ForSequenceClassification model)")
        emb = base.embeddings
        # the tables stay the model's modules (float nn.Embedding or int4 PackedEmbedding); one
        # compiled call reads the rows each forward pass needs from all three (_embed)
        self.word_embeddings, self.position_embeddings = emb.word_embeddings, emb.position_embeddings
        self.token_type_embeddings = emb.token_type_embeddings
        self._tables = tuple(_table_arrays(t, f"embeddings.{n}") for t, n in (
            (self.word_embeddings, "word_embeddings"), (self.token_type_embeddings, "token_type_embeddings"),
            (self.position_embeddings, "position_embeddings")))  # fmt: skip
        self.max_positions = int(config.max_position_embeddings)
        g, b, self.embedding_eps = _layer_norm_arrays(emb.LayerNorm, "embeddings.LayerNorm")
        self.register_buffer("embedding_gamma", torch.from_numpy(g))
        self.register_buffer("embedding_beta", torch.from_numpy(b))
        self.pooler_dense, self.pooler_activation = base.pooler.dense, base.pooler.activation
        self.classifier = model.classifier
        self.heads = int(config.num_attention_heads)
        self.hidden = int(config.hidden_size)
        if self.hidden % self.heads:
            raise ValueError(f"hidden size {self.hidden} does not split into {self.heads} heads")
        self.head_dim = self.hidden // self.heads
        self.layers: list[EncoderLayerWeights] = []
        schemes, act = set(), set()
        for i, block in enumerate(base.encoder.layer):
            where = f"encoder.layer.{i}"
            att = block.attention
            parts = [_linear_arrays(getattr(att.self, p), f"{where}.attention.self.{p}") for p in ("query", "key", "value")]
            o = _linear_arrays(att.output.dense, f"{where}.attention.output.dense")
            inter = _linear_arrays(block.intermediate.dense, f"{where}.intermediate.dense")
            down = _linear_arrays(block.output.dense, f"{where}.output.dense")
            for lin in (att.self.query, att.self.key, att.self.value, att.output.dense, block.intermediate.dense, block.output.dense):
                schemes.add(lin.weights.scheme)
                act.add((lin.act, lin.act_bits, lin.eps))
            scheme = parts[0][0].scheme
            tile = _TILE[_SCHEMES[scheme][0]]
            if any(p[0].n % tile for p in parts):
                raise ValueError(f"{where}: Q, K, V widths must be multiples of {tile} to be concatenated")
            g1, b1, ln1 = _layer_norm_arrays(att.output.LayerNorm, f"{where}.attention.output.LayerNorm")
            g2, b2, ln2 = _layer_norm_arrays(block.output.LayerNorm, f"{where}.output.LayerNorm")
            self.layer_norm_eps = ln1
            self.layers.append(EncoderLayerWeights(
                np.ascontiguousarray(np.concatenate([p[0].data for p in parts])), np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]), o[0].data, o[1], o[2], g1, b1, inter[0].data, inter[1], inter[2],
                down[0].data, down[1], down[2], g2, b2, parts[0][0].k, o[0].k, inter[0].k, down[0].k))  # fmt: skip
            if len({ln1, ln2}) != 1:
                raise ValueError(f"{where}: the two LayerNorms have different eps ({ln1}, {ln2})")
        if len(schemes) != 1 or len(act) != 1:
            raise ValueError(f"the encoder engine runs one scheme and activation quantization for all layers, got {schemes}, {act}")
        self.scheme = schemes.pop()
        self.kind, self.bits, self.mult = _SCHEMES[self.scheme]
        _, act_bits, eps = act.pop()
        self.qp, self.act_eps = np.float32(2 ** (act_bits - 1) - 1), np.float32(eps)
        # activation codes per token of each linear (K padded to the kernels' group): AMX needs whole 64-byte blocks
        self._code_widths = {w.shape[1] * 32 // self.bits for lw in self.layers for w in (lw.w_qkv, lw.w_o, lw.w_i, lw.w_d)}
        for i, lw in enumerate(self.layers):  # buffers: state_dict and resident bytes see them
            for field in ("w_qkv", "ws_qkv", "b_qkv", "w_o", "ws_o", "b_o", "g1", "beta1", "w_i", "ws_i", "b_i",
                          "w_d", "ws_d", "b_d", "g2", "beta2"):  # fmt: skip
                array = getattr(lw, field)
                self.register_buffer(f"layer{i}_{field}", torch.from_numpy(array.view(np.uint8) if array.dtype == np.uint64 else array))
        self._buffers_for: tuple[int, tuple[np.ndarray, ...]] | None = None
        self.eval()

    @classmethod
    def from_model(cls, model: nn.Module) -> EncoderEngine:
        """The engine of a BERT-style classifier whose encoder linears are BitLinear (packed here
        with ``kernels.pack_model``, on a copy) or already PackedBitLinear."""
        from labutils.bitlinear import BitLinear
        from labutils.kernels import pack_model

        if any(isinstance(m, BitLinear) for m in model.modules()):
            model = pack_model(model)
        return cls(model)

    def set_attn_implementation(self, attn: str) -> None:
        """Attention is the engine's own at every setting (the benchmark's eager/sdpa switch)."""

    def _scratch(self, m: int) -> tuple[np.ndarray, ...]:
        """h [M, H], qkv [M, 3H], ctx [M, H] float32, kept from the last call of the same M."""
        if self._buffers_for is None or self._buffers_for[0] != m:
            self._buffers_for = None  # free the old ones before allocating
            h = self.hidden
            self._buffers_for = (m, (np.empty((m, h), np.float32), np.empty((m, 3 * h), np.float32), np.empty((m, h), np.float32)))
        return self._buffers_for[1]

    def _block_rows(self, m: int) -> int:
        """Rows per task: about four tasks a thread, a multiple of 4 between 16 and 64."""
        import numba

        per = -(-m // (4 * numba.get_num_threads()))
        return int(min(_ROW_BLOCK_MAX, max(_ROW_BLOCK_MIN, -(-per // 4) * 4)))

    def _entry_path(self, block: int) -> str:
        """The active kernel path, or "amx" where the avx512 path's A8 tasks of ``block`` tokens
        run on AMX tiles (``kernels.amx.usable`` for every linear's activation width)."""
        path = active_path()
        if path != "avx512" or self.kind != "a8":
            return path
        return "amx" if all(amx.usable(block, kp) for kp in self._code_widths) else path

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, mark: Callable[[str], None] | None = None, **_: Any) -> Any:  # fmt: skip
        """Logits of B sequences: input_ids int [B, L], attention_mask 0/1 [B, L] (None: all 1),
        token_type_ids [B, L] (None: 0) -> SequenceClassifierOutput(logits float32 [B, labels]).
        ``mark(section)`` (profiling) is called after each step (``ENGINE_SECTIONS``)."""
        from transformers.modeling_outputs import SequenceClassifierOutput

        ids = torch.as_tensor(input_ids)
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.is_complex():
            raise ValueError(f"input_ids must be an int tensor [batch, length], got {tuple(ids.shape)} {ids.dtype}")
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(ids.shape)}, got {tuple(mask.shape)}")
        if ids.shape[1] > self.max_positions:
            raise ValueError(f"sequences of {ids.shape[1]} tokens exceed the model's {self.max_positions} positions")
        types = torch.zeros_like(ids) if token_type_ids is None else torch.as_tensor(token_type_ids)
        real = mask.cpu().numpy() != 0
        if ids.numel() == 0:
            raise ValueError("input_ids is empty")
        if not real.any(axis=1).all():
            raise ValueError("every sequence needs at least one real token (attention_mask 1)")
        # unpadding: rows are the real tokens plus each sequence's first token, sequence by sequence
        rowmask = real.copy()
        rowmask[:, 0] = True
        seq, pos = np.nonzero(rowmask)
        rows_start = np.zeros(ids.shape[0] + 1, dtype=np.int64)
        np.cumsum(rowmask.sum(axis=1), out=rows_start[1:])
        keys = np.flatnonzero(real[seq, pos]).astype(np.int64)
        keys_start = np.zeros_like(rows_start)
        np.cumsum(real.sum(axis=1), out=keys_start[1:])
        m = seq.shape[0]
        ids_np, types_np = ids.cpu().numpy(), types.cpu().numpy()
        mark and mark("unpadding")
        word_ids, type_ids = ids_np[seq, pos].astype(np.int64), types_np[seq, pos].astype(np.int64)
        for index, table, name in ((word_ids, self.word_embeddings, "input_ids"), (type_ids, self.token_type_embeddings, "token_type_ids")):
            if index.min() < 0 or index.max() >= table.num_embeddings:
                raise IndexError(f"{name} out of range: must be in [0, {table.num_embeddings})")
        h, qkv, ctx = self._scratch(m)
        _embed(word_ids, type_ids, pos.astype(np.int64), *self._tables, self.embedding_gamma.numpy(), self.embedding_beta.numpy(),
               np.float32(self.embedding_eps), h)  # fmt: skip
        mark and mark("embeddings")
        block = self._block_rows(m)
        qkv_step, attention_step, block_step = _ENTRIES[(self.kind, self._entry_path(block))]
        ln_eps = np.float32(self.layer_norm_eps)
        for lw in self.layers:
            xs = qkv_step(h, qkv, block, lw.w_qkv, lw.ws_qkv, lw.b_qkv, lw.k_qkv, self.qp, self.act_eps, self.bits, self.mult)
            if not np.isfinite(xs).all():
                raise ValueError("the hidden states hold NaN or inf, which per-token scales cannot quantize")
            mark and mark("qkv")
            attention_step(qkv, ctx, rows_start, keys, keys_start, self.heads, self.head_dim)
            mark and mark("attention")
            block_step(h, ctx, block, lw.w_o, lw.ws_o, lw.b_o, lw.g1, lw.beta1, lw.w_i, lw.ws_i, lw.b_i, lw.w_d, lw.ws_d,
                       lw.b_d, lw.g2, lw.beta2, lw.k_o, lw.k_i, lw.k_d, self.qp, self.act_eps, self.bits, self.mult, ln_eps)  # fmt: skip
            mark and mark("block")
        first = torch.from_numpy(h[rows_start[:-1]])
        logits = self.classifier(self.pooler_activation(self.pooler_dense(first)))
        mark and mark("head")
        return SequenceClassifierOutput(logits=logits)

    def extra_repr(self) -> str:
        return (f"layers={len(self.layers)}, hidden={self.hidden}, heads={self.heads}, scheme={self.scheme}, "
                f"kernel path={active_path()}")  # fmt: skip


def engine_profile(engine: EncoderEngine, inputs: dict[str, torch.Tensor], *, repeat: int = 5, warmup: int = 1) -> dict[str, float]:
    """Seconds per forward pass of ``engine(**inputs)`` by ``ENGINE_SECTIONS`` (summed over the
    layers; the marked pass whose total is the median of ``repeat``), with ``total`` (marked),
    ``outside_sections`` (total minus the sections: time no mark claims), ``total_unmarked`` (the
    median of as many plain passes, interleaved with the marked ones) and ``profiler_overhead``
    (total - total_unmarked: what the marks themselves cost, reported, not hidden in a section)."""
    for _ in range(warmup):
        engine(**inputs)
    marked, plain = [], []
    for _ in range(repeat):
        sections = dict.fromkeys(ENGINE_SECTIONS, 0.0)
        last = [time.perf_counter()]

        def mark(section: str) -> None:
            now = time.perf_counter()
            sections[section] += now - last[0]
            last[0] = now

        start = last[0] = time.perf_counter()
        engine(**inputs, mark=mark)
        sections["total"] = time.perf_counter() - start
        marked.append(sections)
        start = time.perf_counter()
        engine(**inputs)
        plain.append(time.perf_counter() - start)
    # The sections of the median pass, not the median of each section: medians taken section by
    # section need not add up to any pass's total.
    median_pass = sorted(marked, key=lambda p: p["total"])[len(marked) // 2]
    result = {key: float(value) for key, value in median_pass.items()}
    # Python between the marks (argument checks, the call itself) belongs to no section.
    result["outside_sections"] = result["total"] - sum(result[s] for s in ENGINE_SECTIONS)
    result["total_unmarked"] = float(np.median(plain))
    result["profiler_overhead"] = result["total"] - result["total_unmarked"]
    result["repeat"] = repeat
    return result
