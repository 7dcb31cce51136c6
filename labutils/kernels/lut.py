"""Ternary weights as table indices: three weights in five bits, one token's product by lookups.

A ternary weight carries log2(3) = 1.585 bits; the 2-bit codes of :mod:`labutils.kernels.layout`
spend 2. Generating a token reads every weight once, and on two cores that read is the token's
cost (the kernels already move their bytes at about the rate of a plain parallel read:
``results/engine/bandwidth-zen3.jsonl``), so fewer bytes are the way to a faster token. This
layout spends 5/3 = 1.67 bits a weight, as bitnet.cpp's TL2 and T-MAC's lookup tables do:

- Three weights c = (c0, c1, c2) in {-1, 0, 1}^3 take 27 values. With a sign s, c = s * p where
  the pattern p is canonical (its first nonzero weight is +1): the zero pattern and 13 others,
  ``PATTERNS``, so a 4-bit index i and one sign bit.
- For one token, each triple g of activation codes x (int8) gets a table of the 14 dot products
  T_g[i] = PATTERNS[i] . x[3g:3g+3] (int16, |T| <= 384), held as two 16-byte tables, the low and
  the high bytes (:func:`build_tables`).
- A row's dot product is sum_g s_g T_g[i_g]. ``vpshufb`` looks up 32 rows' indices in a 16-byte
  table at once; ``vpunpck{l,h}bw`` joins low and high bytes into int16 lanes.
- The sign costs no multiply: -T = ~T + 1, so a negative triple XORs both bytes of its entry with
  0xFF (a byte mask from the sign bit plane), and each row's count of negative triples, stored
  with the weights (``neg_count``), adds the ones back at the end.

The packed form (:class:`LutWeights`), for 32 rows (a tile t) and 8 triples (an octet o), is
160 bytes: 4 vectors of 32 bytes whose low and high nibbles are the indices of triples 2h and
2h + 1, then one vector of sign bits (bit q: triple q of the octet). 160 bytes for 768 weights.

Only the one-token product (GEMV) is here: a prompt's many tokens are the tiled GEMM's work, on
the 2-bit codes, where arithmetic, not bytes, is the bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from labutils.kernels.cpu import available_paths
from labutils.kernels.simd import (
    _sext_add,
    _unpack_add,
    _vbit_mask,
    _vbroadcast16,
    _vand,
    _vload32,
    _vlookup_xor,
    _vshr,
    _vstore,
    _vzeros_i16x16,
    _vzeros_i32x8,
)

__all__ = ["PATTERNS", "LutWeights", "pack_lut", "unpack_lut", "build_tables", "lut_gemv", "lut_gemv_into", "lut_kernel_for"]

TILE_ROWS = 32
"""Rows per tile: one byte lane of a ymm each."""
OCTET = 8
"""Triples per sign-bit plane (one byte per row)."""
_VECTORS = 5  # 4 index vectors + 1 sign plane per octet
_WIDEN_OCTETS = 8  # 64 triples x |~T| <= 385 fit an int16 lane (24,640 < 32,767)


def _canonical_patterns() -> np.ndarray:
    # base-3 value v = 9 (c0 + 1) + 3 (c1 + 1) + (c2 + 1); the canonical patterns are v = 13..26
    v = np.arange(13, 27)
    return np.stack([v // 9 - 1, v // 3 % 3 - 1, v % 3 - 1], axis=1).astype(np.int8)


PATTERNS: np.ndarray = _canonical_patterns()
"""int8 [14, 3]: the canonical patterns, index i <-> base-3 value 13 + i; row 0 is (0, 0, 0)."""


@dataclass(frozen=True)
class LutWeights:
    """A ternary [N, K] matrix as table indices (see the module docstring).

    ``data``: uint8 [T, O, 5, 32] with T = ceil(N / 32) row tiles and O = ceil(K / 24) octets of
    triples (rows and columns past N and K are zero weights); ``neg_count``: int32 [32 T], each
    row's number of negative triples.
    """

    data: np.ndarray
    neg_count: np.ndarray
    out_features: int
    in_features: int

    @property
    def triples(self) -> int:
        return self.data.shape[1] * OCTET

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.neg_count.nbytes)

    @property
    def bits_per_weight(self) -> float:
        """Bits of ``data`` per weight of the unpadded matrix."""
        return 8 * self.data.nbytes / (self.out_features * self.in_features)


def pack_lut(codes: np.ndarray) -> LutWeights:
    """Pack ternary weight codes int8 [N, K] (values -1, 0, 1) as :class:`LutWeights`."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.size == 0:
        raise ValueError(f"pack_lut needs a non-empty [N, K] matrix, got shape {codes.shape}")
    if not np.isin(codes, (-1, 0, 1)).all():
        raise ValueError("pack_lut needs ternary codes: every value -1, 0 or 1")
    n, k = codes.shape
    tiles, octets = -(-n // TILE_ROWS), -(-k // (3 * OCTET))
    padded = np.zeros((tiles * TILE_ROWS, octets * OCTET * 3), dtype=np.int16)
    padded[:n, :k] = codes
    c = padded.reshape(tiles * TILE_ROWS, octets * OCTET, 3) + 1
    v = 9 * c[..., 0] + 3 * c[..., 1] + c[..., 2]  # 0..26, 13 = zero
    negative = v < 13
    index = np.where(negative, 26 - v, v) - 13  # 0..13
    # [rows, triples] -> [tile, octet, triple q, row j]
    index = index.reshape(tiles, TILE_ROWS, octets, OCTET).transpose(0, 2, 3, 1)
    signs = negative.reshape(tiles, TILE_ROWS, octets, OCTET).transpose(0, 2, 3, 1)
    data = np.empty((tiles, octets, _VECTORS, TILE_ROWS), dtype=np.uint8)
    data[:, :, :4] = index[:, :, 0::2] | (index[:, :, 1::2] << 4)
    data[:, :, 4] = (signs.astype(np.uint16) << np.arange(OCTET, dtype=np.uint16)[:, None]).sum(axis=2)
    return LutWeights(data, negative.sum(axis=1).astype(np.int32), n, k)


def unpack_lut(w: LutWeights) -> np.ndarray:
    """The ternary codes int8 [N, K] that :func:`pack_lut` packed."""
    tiles, octets = w.data.shape[:2]
    index = np.empty((tiles, octets, OCTET, TILE_ROWS), dtype=np.int16)
    index[:, :, 0::2] = w.data[:, :, :4] & 15
    index[:, :, 1::2] = w.data[:, :, :4] >> 4
    bits = (w.data[:, :, 4][:, :, None, :] >> np.arange(OCTET, dtype=np.uint8)[:, None]) & 1
    sign = 1 - 2 * bits.astype(np.int16)
    c = PATTERNS[index].astype(np.int16) * sign[..., None]  # [T, O, 8, 32, 3]
    c = c.transpose(0, 3, 1, 2, 4).reshape(tiles * TILE_ROWS, octets * OCTET * 3)
    return c[: w.out_features, : w.in_features].astype(np.int8)


@intrinsic
def _store_triple_table(typingctx, tables, index, x0, x1, x2):
    """``tables.flat[index : index+32]`` = the table of one triple (x0, x1, x2): 16 int16 lanes
    PATTERNS . x (two zero lanes), then their low bytes and their high bytes. Plain vector IR."""
    if not (isinstance(tables, types.Array) and tables.dtype == types.uint8 and tables.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        i16, v16 = ir.IntType(16), ir.VectorType(ir.IntType(16), 16)
        total = ir.Constant(v16, [0] * 16)
        for column, value in zip(PATTERNS.T, args[2:]):
            lanes = ir.Constant(v16, [int(c) for c in column] + [0, 0])
            wide = builder.sext(value, i16) if value.type.width < 16 else builder.trunc(value, i16)
            one = builder.insert_element(ir.Constant(v16, ir.Undefined), wide, ir.Constant(ir.IntType(32), 0))
            splat = builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16))
            total = builder.add(total, builder.mul(splat, lanes))
        v8 = ir.VectorType(ir.IntType(8), 16)
        low = builder.trunc(total, v8)
        high = builder.trunc(builder.ashr(total, ir.Constant(v16, [8] * 16)), v8)
        both = builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32))))
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptr = builder.bitcast(builder.gep(data, [args[1]]), both.type.as_pointer())
        builder.store(both, ptr, align=1)
        return context.get_dummy_value()

    return types.none(tables, index, x0, x1, x2), codegen


@njit(cache=True, boundscheck=False, error_model="numpy")
def build_tables(x, tables):  # pragma: no cover - compiled
    """One token's tables: int8 codes x [K] -> tables uint8 [G, 32] (row g: the low bytes of
    T_g[0..13], two zeros, the high bytes, two zeros). Codes past K count as zero."""
    k, full = x.shape[0], min(tables.shape[0], x.shape[0] // 3)
    for g in range(full):
        _store_triple_table(tables, 32 * g, x[3 * g], x[3 * g + 1], x[3 * g + 2])
    for g in range(full, tables.shape[0]):
        x0 = x[3 * g] if 3 * g < k else np.int8(0)
        x1 = x[3 * g + 1] if 3 * g + 1 < k else np.int8(0)
        x2 = x[3 * g + 2] if 3 * g + 2 < k else np.int8(0)
        _store_triple_table(tables, 32 * g, x0, x1, x2)


@njit(cache=True, boundscheck=False, error_model="numpy", inline="always")
def _lut_tile_avx2(tables, data, neg_count, out, t):  # pragma: no cover - compiled
    """Rows 32t .. 32t+31 of the product: per octet 4 index vectors and a sign plane, per triple
    2 lookups, 2 XORs with the sign mask, 2 unpack-adds into int16; widened every 64 triples."""
    octets = data.shape[1]
    r0 = r1 = r2 = r3 = _vzeros_i32x8()
    for o0 in range(0, octets, _WIDEN_OCTETS):
        lo_rows = hi_rows = _vzeros_i16x16()  # rows 0-7 | 16-23 and rows 8-15 | 24-31
        for o in range(o0, min(o0 + _WIDEN_OCTETS, octets)):
            base = (t * octets + o) * (_VECTORS * TILE_ROWS)
            plane = _vload32(data, base + 4 * TILE_ROWS)
            for h in range(4):
                both = _vload32(data, base + TILE_ROWS * h)
                for half in range(2):
                    idx = _vand(both, 15) if half == 0 else _vshr(both, 4)
                    g = OCTET * o + 2 * h + half
                    mask = _vbit_mask(plane, 2 * h + half)
                    lo = _vlookup_xor(_vbroadcast16(tables, 32 * g), idx, mask)
                    hi = _vlookup_xor(_vbroadcast16(tables, 32 * g + 16), idx, mask)
                    lo_rows = _unpack_add(lo_rows, lo, hi, 0)
                    hi_rows = _unpack_add(hi_rows, lo, hi, 1)
        r0, r2 = _sext_add(r0, lo_rows, 0), _sext_add(r2, lo_rows, 1)
        r1, r3 = _sext_add(r1, hi_rows, 0), _sext_add(r3, hi_rows, 1)
    o = TILE_ROWS * t
    _vstore(out, o, r0)
    _vstore(out, o + 8, r1)
    _vstore(out, o + 16, r2)
    _vstore(out, o + 24, r3)
    for j in range(o, o + TILE_ROWS):
        out[j] += neg_count[j]


@njit(cache=True, boundscheck=False, error_model="numpy", parallel=True)
def _lut_gemv_avx2(tables, data, neg_count, out):  # pragma: no cover - compiled
    for t in prange(data.shape[0]):
        _lut_tile_avx2(tables, data, neg_count, out, t)


@njit(cache=True, boundscheck=False, error_model="numpy", parallel=True)
def _lut_gemv_portable(tables, data, neg_count, out):  # pragma: no cover - compiled
    """The same sums in plain loops (every CPU; the exact reference of the AVX2 tile)."""
    for t in prange(data.shape[0]):
        for j in range(TILE_ROWS):
            acc = np.int32(neg_count[TILE_ROWS * t + j])
            for o in range(data.shape[1]):
                plane = data[t, o, 4, j]
                for q in range(OCTET):
                    i = (data[t, o, q // 2, j] >> (4 * (q % 2))) & 15
                    g = OCTET * o + q
                    entry = np.int32(tables[g, i]) | (np.int32(np.int8(tables[g, 16 + i])) << 8)
                    acc += ~entry if (plane >> q) & 1 else entry
            out[TILE_ROWS * t + j] = acc


def lut_kernel_for(path: str | None = None):
    """The compiled lookup GEMV ``kernel(tables, data, neg_count, out)`` of a kernel path: the
    AVX2 tile on "avx512" and "avx2" (every AVX-512 CPU has AVX2), plain loops on "generic";
    None: the best this CPU has."""
    path = path or ("avx2" if "avx2" in available_paths() else "generic")
    if path in ("avx512", "avx2"):
        if "avx2" not in available_paths():
            raise ValueError("the lookup kernel's avx2 tile needs a CPU with AVX2")
        return _lut_gemv_avx2
    if path == "generic":
        return _lut_gemv_portable
    raise ValueError(f"unknown kernel path {path!r}: 'avx512', 'avx2' or 'generic'")


def lut_gemv_into(x: np.ndarray, w: LutWeights, tables: np.ndarray, out: np.ndarray, path: str | None = None) -> None:
    """``out[:32T] = W @ x`` (int32, exact) for int8 codes x [>= K] without allocating: ``tables``
    uint8 [G, 32] is the caller's scratch. No shape checks (see :func:`lut_gemv`)."""
    build_tables(x, tables)
    lut_kernel_for(path)(tables, w.data, w.neg_count, out)


def lut_gemv(x: np.ndarray, w: LutWeights, path: str | None = None) -> np.ndarray:
    """One token's integer product: int8 activation codes x [K] times the packed
    ternary W [N, K] -> int32 [N], exactly ``W.astype(int32) @ x``. ``path``: a kernel path
    (:func:`lut_kernel_for`), or None (the best this CPU has)."""
    x = np.ascontiguousarray(x)
    if x.dtype != np.int8 or x.ndim != 1 or x.shape[0] != w.in_features:
        raise ValueError(f"lut_gemv needs int8 codes of shape ({w.in_features},), got {x.dtype} {x.shape}")
    tables = np.empty((w.triples, 32), dtype=np.uint8)
    out = np.empty(w.neg_count.shape[0], dtype=np.int32)
    lut_gemv_into(x, w, tables, out, path)
    return out[: w.out_features]
