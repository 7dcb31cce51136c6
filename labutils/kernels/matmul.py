"""The public kernels: GEMM ``[M, K] x [N, K]^T -> int32 [M, N]`` and GEMV ``[K] -> int32 [N]``
for W1A1, W1A8 and W1.58A8, each validated, then run on the active path (``dispatch``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit

from labutils.kernels.dispatch import _launch
from labutils.kernels.layout import (
    _A8_COLS,
    _A8_GROUP,
    _W1A1_COLS,
    PackedWeights,
    _as_array,
    _ceil_div,
    _check_activations,
    _check_packed,
    _check_padding_bits,
)


@njit(cache=True, boundscheck=False, error_model="numpy")
def _row_sums(x):  # pragma: no cover - compiled
    """int8 [M, K] -> int32 [M]: sum of each row (the ``sum a`` of the A8 corrections)."""
    sums = np.empty(x.shape[0], dtype=np.int32)
    for r in range(x.shape[0]):
        total = np.int32(0)
        for i in range(x.shape[1]):
            total += np.int32(x[r, i])
        sums[r] = total
    return sums


def w1a1_gemm(x_rows: Any, w: PackedWeights, *, threads: int | None = None) -> np.ndarray:
    """Binary x binary: ``int32 [M, N]`` with ``out[m, n] = sum_k x[m, k] * W[n, k]``.

    Args:
        x_rows: ``uint64 [M, ceil(K/64)]``, ``packing.pack_binary_rows`` of ±1 activations
            (padding bits 0), C-contiguous.
        w: ``prepack_w1a1(pack_binary_rows(W), K)``.
        threads: Numba threads for this call (None: Numba's current setting).
    """
    w = _check_packed(w, "w1a1", "w1a1_gemm")
    x = _check_activations(x_rows, np.uint64, _ceil_div(w.k, 64), "w1a1_gemm", "pack_binary_rows words")
    _check_padding_bits(x, w.k, "x_rows")
    out = np.empty((x.shape[0], w.data.shape[0] * _W1A1_COLS), dtype=np.int32)
    if x.shape[0]:
        _launch("w1a1", w, x.shape[0], threads, x, w.data, w.k, out)
    return np.ascontiguousarray(out[:, : w.n])


def _a8_gemm(x_codes: Any, w: PackedWeights, scheme: str, threads: int | None, fn: str) -> np.ndarray:
    w = _check_packed(w, scheme, fn)
    x = _check_activations(x_codes, np.int8, w.k, fn, "int8 activation codes")
    kp = w.data.shape[1] * _A8_GROUP[scheme]
    if kp != w.k:  # zero activations meet the padding weights
        x = np.pad(x, ((0, 0), (0, kp - w.k)))
    rowsum = _row_sums(x)
    out = np.empty((x.shape[0], w.data.shape[0] * _A8_COLS), dtype=np.int32)
    if x.shape[0]:
        _launch(scheme, w, x.shape[0], threads, x, w.data, rowsum, out)
    return np.ascontiguousarray(out[:, : w.n])


def w1a8_gemm(x_codes: Any, w: PackedWeights, *, threads: int | None = None) -> np.ndarray:
    """Binary weights x int8 activations: ``int32 [M, N] = x_codes @ W^T`` exactly.

    Args:
        x_codes: ``int8 [M, K]`` (any int8 value, e.g. per-token absmax codes), C-contiguous.
        w: ``prepack_w1a8(pack_binary_rows(W), K)``.
        threads: Numba threads for this call (None: Numba's current setting).
    """
    return _a8_gemm(x_codes, w, "w1a8", threads, "w1a8_gemm")


def w158a8_gemm(x_codes: Any, w: PackedWeights, *, threads: int | None = None) -> np.ndarray:
    """Ternary weights x int8 activations: ``int32 [M, N] = x_codes @ W^T`` exactly.

    Args:
        x_codes: ``int8 [M, K]``, C-contiguous.
        w: ``prepack_w158a8(trits)``.
        threads: Numba threads for this call (None: Numba's current setting).
    """
    return _a8_gemm(x_codes, w, "w1.58a8", threads, "w158a8_gemm")


def _gemv(gemm: Callable[..., np.ndarray], x: Any, w: PackedWeights, threads: int | None, fn: str) -> np.ndarray:
    array = _as_array(x, "x")
    if array.ndim != 1:
        raise ValueError(f"{fn}: x must be 1-D (one token), got shape {array.shape}; use the gemm for a batch")
    return gemm(array[None, :], w, threads=threads)[0]


def w1a1_gemv(x_row: Any, w: PackedWeights, *, threads: int | None = None) -> np.ndarray:
    """One token: ``uint64 [ceil(K/64)]`` packed ±1 activations -> ``int32 [N]`` (see w1a1_gemm)."""
    return _gemv(w1a1_gemm, x_row, w, threads, "w1a1_gemv")


def w1a8_gemv(x_codes: Any, w: PackedWeights, *, threads: int | None = None) -> np.ndarray:
    """One token: ``int8 [K]`` -> ``int32 [N]`` (see w1a8_gemm)."""
    return _gemv(w1a8_gemm, x_codes, w, threads, "w1a8_gemv")


def w158a8_gemv(x_codes: Any, w: PackedWeights, *, threads: int | None = None) -> np.ndarray:
    """One token: ``int8 [K]`` -> ``int32 [N]`` (see w158a8_gemm)."""
    return _gemv(w158a8_gemm, x_codes, w, threads, "w158a8_gemv")


_GEMMS = {"w1a1": w1a1_gemm, "w1a8": w1a8_gemm, "w1.58a8": w158a8_gemm}


def packed_matmul(x: Any, w: PackedWeights, *, threads: int | None = None) -> np.ndarray:
    """The kernel ``w.scheme`` calls for: x ``[M, ·]`` -> int32 ``[M, N]``, x ``[·]`` -> ``[N]``.

    x is ``uint64`` packed rows for "w1a1", ``int8`` codes for "w1a8" and "w1.58a8".
    """
    if not isinstance(w, PackedWeights):
        raise TypeError(f"packed_matmul: w must be PackedWeights (from prepack_*), got {type(w).__name__}")
    gemm = _GEMMS[w.scheme]
    if _as_array(x, "x").ndim == 1:
        return _gemv(gemm, x, w, threads, "packed_matmul")
    return gemm(x, w, threads=threads)
