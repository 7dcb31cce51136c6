"""Self-checks for Lab 6, Popcount kernels (``labs/source/lab06_kernels``).

Every kernel's result is an exact integer, so each check compares it with an integer matmul in
numpy (and the layouts with ``labutils.packing``), at lengths K that are not multiples of the
word or byte, with the int8 code -128, all-zero rows and special words.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from labutils import packing
from labutils.checks._common import ExerciseError, _fail, _function, _mistake, _ok, _run, _typed, _where

__all__ = ["check_lab6_popcount64", "check_lab6_xnor_gemm", "check_lab6_bit_planes", "check_lab6_ternary_gemv"]


def _compiled(fn: object, name: str) -> None:
    from numba.core.registry import CPUDispatcher

    _function(fn, name)
    if not isinstance(fn, CPUDispatcher):
        raise ExerciseError(f"{name} must be compiled: put @numba.njit on the line above `def {name}` "
                            "(and run its cell again)")


def _signs(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.where(np.random.default_rng(seed).random(shape) < 0.5, -1, 1).astype(np.int8)


def _integer(value: object, call: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise _fail(call, f"return an integer, got {type(value).__name__} {value!r} (keep every step in np.uint64 "
                          "or int: a float loses the low bits)")
    return int(value)


def check_lab6_popcount64(popcount64: Callable) -> bool:
    """Exercise 1: ``popcount64(np.uint64 word)`` (compiled with ``@numba.njit``) equals
    ``np.bitwise_count`` on 0, all ones, every single bit, runs of ones, patterns and random words."""
    _compiled(popcount64, "popcount64")
    special = [0, 2**64 - 1, 2**63, 0x5555555555555555, 0xAAAAAAAAAAAAAAAA, 0xFFFFFFFF00000000, 0x8000000000000001]
    special += [1 << i for i in range(64)] + [(1 << i) - 1 for i in range(1, 65)] + [2**64 - (1 << i) for i in range(64)]
    words = list(dict.fromkeys(special + [int(w) for w in np.random.default_rng(4).integers(0, 2**64, size=300,
                                                                                          dtype=np.uint64)]))
    wrong = []
    for value in words:
        count, call = _run(popcount64, "popcount64", np.uint64(value), _as=f"popcount64(np.uint64(0x{value:016x}))")
        count = _integer(count, call)
        if count != value.bit_count():
            wrong.append((value, count))
    if not wrong:
        return _ok(f"{len(words)} words: 0, all ones, every single bit, runs and random words")
    value, count = wrong[0]
    call = f"popcount64(np.uint64(0x{value:016x}))"
    top_set = [v for v in words if v >> 63]
    if all(v >> 63 for v, _ in wrong) and len(wrong) >= len(top_set) // 2:
        raise _fail(call, f"{count}, expected {value.bit_count()}; wrong only when the top bit is set: a uint64 mixed "
                          "with a plain int becomes int64 or float64; write every constant and shift as np.uint64")
    if {v for v, _ in wrong} == {2**64 - 1}:
        raise _fail(call, f"{count}, expected 64: the count 64 needs 7 bits; do not mask the final result "
                          "(the top byte holds 0..64)")
    raise _fail(call, f"{count}, expected {value.bit_count()} (wrong for {len(wrong)} of {len(words)} words): check the "
                      "masks and shifts of the four steps (0x55.. with >> 1, 0x33.. with >> 2, 0x0F.. after >> 4, "
                      "then · 0x0101.. >> 56)")


def check_lab6_xnor_gemm(xnor_dot: Callable, w1a1_gemm_loops: Callable) -> bool:
    """Exercise 2: ``xnor_dot(a_words, w_words, k)`` and ``w1a1_gemm_loops(x_rows, w_rows, k)`` (both
    compiled) equal the integer dot products of the signs, also when K is not a multiple of 64."""
    _compiled(xnor_dot, "xnor_dot")
    _compiled(w1a1_gemm_loops, "w1a1_gemm_loops")
    for k in (384, 1, 63, 64, 65, 70, 200):
        xs, ws = _signs((3, k), k), _signs((5, k), k + 1)
        xr, wr = packing.pack_binary_rows(xs), packing.pack_binary_rows(ws)
        expected = xs.astype(np.int64) @ ws.astype(np.int64).T
        words = xr.shape[1]
        for a, w, want in ((xr[0], wr[0], expected[0, 0]), (xr[1], xr[1], k),
                           (xr[1], packing.pack_binary_rows(-xs)[1], -k)):
            dot, call = _run(xnor_dot, "xnor_dot", a, w, k)
            dot = _integer(dot, call)
            if dot != want:
                d = (k - int(want)) // 2
                words_ = {k - d: "K - d: a differing bit turns a +1 product into -1, a change of 2, so the dot is K - 2d",
                          64 * words - 2 * d: "count K products, not 64 × words: the padding bits are not products",
                          -int(want): "sign flipped: the dot is K - 2d, not 2d - K",
                          d: "that is d, the number of differing bits; the dot is K - 2d"}.get(dot)
                raise _fail(call, f"{dot}, expected {want} (K = {k})" + (f": {words_}" if words_ else ""))
        out, call = _run(w1a1_gemm_loops, "w1a1_gemm_loops", xr, wr, k)
        _typed(out, call, "the result", np.ndarray, dtype=np.int32, shape=expected.shape)
        if not np.array_equal(out, expected):
            raise _fail(call, f"out[m, n] must be x[m] · W[n] {_where(out, expected)}")
    return _ok("xnor_dot and w1a1_gemm_loops equal the integer matmul of the signs for K = 1 to 384 "
               "(multiples of 64 or not), equal and opposite vectors")


def _planes(codes: np.ndarray) -> np.ndarray:
    """The reference bit-planes: plane j = bit j of every code, packed by pack_binary_rows."""
    bits = (codes.view(np.uint8)[None] >> np.arange(8, dtype=np.uint8)[:, None, None]) & 1
    return np.stack([packing.pack_binary_rows(2 * b.astype(np.int8) - 1) for b in bits])


def check_lab6_bit_planes(bit_planes: Callable, w1a8_gemm_planes: Callable) -> bool:
    """Exercise 3: ``bit_planes(int8 [M, K]) -> uint64 [8, M, ceil(K/64)]`` in the layout of
    ``pack_binary_rows`` (padding bits 0), and ``w1a8_gemm_planes(planes, w_rows)`` (compiled) equal
    to the integer matmul, with the code -128 and all-zero tokens."""
    _function(bit_planes, "bit_planes")
    _compiled(w1a8_gemm_planes, "w1a8_gemm_planes")
    for k in (384, 1, 70, 130):
        xc = np.random.default_rng(k).integers(-128, 128, size=(3, k)).astype(np.int8)
        xc[0, 0], xc[1] = -128, 0
        expected = _planes(xc)
        planes, call = _run(bit_planes, "bit_planes", xc)
        _typed(planes, call, "the planes", np.ndarray, dtype=np.uint64, shape=expected.shape)
        if not np.array_equal(planes, expected):
            pad = np.zeros_like(expected)
            if k % 64:
                pad[..., -1] = np.uint64(~np.uint64(0) << np.uint64(k % 64))
            words = _mistake(planes, (
                (lambda: expected | pad, "the padding bits (columns K and beyond of the last word) must be 0"),
                (lambda: expected[::-1], "plane j holds bit j: plane 0 is the least significant bit, plane 7 the sign bit"),
            ))
            raise _fail(call, words or f"planes differ from packing.pack_binary_rows of each bit {_where(planes, expected)}")
        ws = _signs((5, k), k + 2)
        product = xc.astype(np.int64) @ ws.astype(np.int64).T
        out, call = _run(w1a8_gemm_planes, "w1a8_gemm_planes", expected, packing.pack_binary_rows(ws))
        _typed(out, call, "the result", np.ndarray, dtype=np.int32, shape=product.shape)
        if not np.array_equal(out, product):
            plus = ws > 0
            words = _mistake(out, (
                (lambda: xc.view(np.uint8).astype(np.int64) @ ws.astype(np.int64).T,
                 "the top bit weighs -128 in two's complement, not +128"),
                (lambda: 2 * xc.astype(np.int64) @ plus.astype(np.int64).T,
                 "each plane gives 2·popcount(b & w) - popcount(b): subtract popcount(b)"),
            ))
            raise _fail(call, words or f"not x @ W^T (K = {k}) {_where(out, product)}")
    return _ok("the planes equal pack_binary_rows of each bit (padding 0) and w1a8_gemm_planes the integer "
               "matmul, for K = 1 to 384, with -128 and an all-zero token")


def check_lab6_ternary_gemv(w158a8_gemv_2bit: Callable) -> bool:
    """Exercise 4: ``w158a8_gemv_2bit(x_codes int8 [K], w_packed uint8 [N, ceil(K/4)], k)`` (compiled)
    equals ``W @ x`` for K not a multiple of 4, the code -128 and an all-zero weight row."""
    _compiled(w158a8_gemv_2bit, "w158a8_gemv_2bit")
    for k in (384, 1, 2, 7, 70, 130):
        xc = np.random.default_rng(k).integers(-128, 128, size=k).astype(np.int8)
        xc[-1] = -128
        wt = np.random.default_rng(k + 1).integers(-1, 2, size=(5, k)).astype(np.int8)
        wt[2] = 0
        packed = np.stack([packing.pack_ternary_2bit(row) for row in wt])
        expected = wt.astype(np.int64) @ xc.astype(np.int64)
        out, call = _run(w158a8_gemv_2bit, "w158a8_gemv_2bit", xc, packed, k)
        _typed(out, call, "the result", np.ndarray, dtype=np.int32, shape=expected.shape)
        if not np.array_equal(out, expected):
            whole = 4 * (k // 4)
            x64 = xc.astype(np.int64)
            words = _mistake(out, (
                (lambda: (wt.astype(np.int64) + 1) @ x64, "that is Σ c_k x_k with the codes c = w + 1: subtract Σ x_k"),
                (lambda: (wt[:, :whole].astype(np.int64) + 1) @ x64[:whole] - x64.sum(),
                 f"right for the whole bytes only: the last byte of a row holds K mod 4 = {k % 4} codes, read them too"),
                (lambda: -expected, "sign flipped: Σ c x - Σ x, with c = w + 1"),
            ))
            raise _fail(call, words or f"not W @ x (K = {k}) {_where(out, expected)}")
    return _ok("W @ x for K = 1 to 384 (multiples of 4 or not), with -128 and an all-zero weight row")
