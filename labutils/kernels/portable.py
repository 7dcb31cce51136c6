"""Portable int8 dot products for the generic path: plain LLVM vector IR, no target intrinsic,
written so that each target's instruction selection finds its own dot-product instruction.

One accumulator per output (a token and a column), summed whole at the end, so any grouping of
products into lanes gives the same integer (exact on every target). Per step, ``_dot_add`` loads
``STEP`` bytes of a token's activations and of a column's weight codes, multiplies them and adds
them into the accumulator:

- on arm64 with the dot-product extension (ARMv8.2, every Apple M-series): 16 bytes, both
  sign-extended, into a 4-lane int32 accumulator with LLVM's ``vector.partial.reduce.add``,
  which LLVM selects as one NEON ``sdot``;
- elsewhere (x86): 64 bytes with AVX-512BW, 32 (one ymm) on AVX2, the codes (0, 1 or 2)
  zero-extended by the activations sign-extended, products summed in adjacent pairs and
  saturated to int16 (``_pairs_int16``), which LLVM selects as one ``vpmaddubsw``, added into
  int16 lanes (``vpaddw``): the avx2 path's step, without its intrinsic. Past 63 steps int16
  lanes could overflow, so the GEMM folds them into int32 sums every ``BLOCK_STEPS``. (LLVM 22
  selects no ``vpdpbusd``, the 4-byte VNNI dot, from portable IR: a ``partial.reduce`` of zero-
  by sign-extended bytes became byte-to-dword widening and ``vpmaddwd`` on half-empty words.)

The GEMM's tile is 4 tokens by ``TILE_COLUMNS`` columns, sized to the target's vector registers.

For a token or a few (the GEMV), ``_cols_dot_add`` multiplies the packed codes of 16 columns,
shifted and masked in place, by the broadcast activations: 16 int32 lanes that stay columns.

``popcount`` loops need no help: ``llvm.ctpop`` on vectors is ``cnt`` on arm64 (the generic
W1A1 kernel uses the portable vector tiles of ``microkernels_avx512``, which contain no x86
intrinsic). ``asm.cross_asm_lines`` compiles these kernels for an Apple M1 on any machine.
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from labutils.kernels.cpu import _enabled_llvm_features
from labutils.kernels.simd import _I32x16, _as_int, _element_ptr, _is_c_array, _splat, _Vec

DOTPROD: bool = bool({"neon", "dotprod"} & _enabled_llvm_features())
"""True when compiling for an arm64 target: 16-byte steps that lower to ``sdot``."""
WIDE: bool = "avx512f" in _enabled_llvm_features()
"""True when compiling for an x86 target with 32 vector registers of 512 bits (AVX-512)."""
LANES = 4 if DOTPROD else 16 if WIDE else 8
"""int32 lanes of one vector register (a NEON q, an AVX-512 zmm, an AVX2 ymm)."""
STEP = 4 * LANES
"""Bytes of k per ``_dot_add``: 16 on arm64, 64 with AVX-512, 32 on other x86."""
TILE_COLUMNS = 4 if DOTPROD or WIDE else 2
"""Columns of the generic A8 GEMM's tile of 4 tokens: 4 x 4 accumulators take half of NEON's or
AVX-512's 32 registers; on AVX2's 16 (ymm), 4 x 2 leave room for the operands, where 4 x 4 of
two ymm each spilled in the loop (0.50x -> 0.66x float32 compiled for Zen 3, timed on a Xeon)."""
BLOCK_STEPS = 1 << 24 if DOTPROD else 32767 // (2 * 2 * 128)
"""Steps an accumulator takes before ``_sums_add4`` must fold it into int32 sums. On x86 the
lanes are int16 and each step adds a pair of products, at most 2 x 2 x 128 = 512 in size (codes
0..2, int8 activations): 63 steps cannot overflow. arm64's int32 lanes need no fold."""

_ACC = _Vec(LANES, 32) if DOTPROD else _Vec(2 * LANES, 16)
_I32 = ir.IntType(32)


def _call(builder, name: str, ret: ir.Type, *args: Any):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, list(args))


@intrinsic
def _acc_zero(typingctx):
    """A zero accumulator (``_ACC``: int32 lanes on arm64, int16 on x86)."""

    def codegen(context, builder, sig, args):
        vector = context.get_value_type(_ACC)
        return ir.Constant(vector, [0] * vector.count)

    return _ACC(), codegen


SUMS = _Vec(4, 32)
"""Four int32 sums (one per output of a row of the tile, or 2 x 2 of the AVX2 tile)."""


@intrinsic
def _sums_zero(typingctx):
    """Four zero int32 sums (``SUMS``)."""

    def codegen(context, builder, sig, args):
        return ir.Constant(ir.VectorType(_I32, 4), [0] * 4)

    return SUMS(), codegen


@intrinsic
def _sums_add4(typingctx, sums, a0, a1, a2, a3):
    """``sums`` plus the int32 sums of 4 accumulators' lanes, in that order: the lanes widened in
    adjacent pairs (int16 on x86), then adjacent lanes of two vectors summed into one, twice,
    and adjacent lanes halved until one lane per accumulator is left, so the outputs of a tile
    row are summed and stored together instead of one horizontal sum and one store each."""
    if not (sums == SUMS and all(a == _ACC for a in (a0, a1, a2, a3))):
        return None

    def codegen(context, builder, sig, args):
        def take(vector: ir.Value, other: ir.Value, picked: list[int]) -> ir.Value:
            return builder.shuffle_vector(vector, other, ir.Constant(ir.VectorType(_I32, len(picked)), picked))

        def widen(acc: ir.Value) -> ir.Value:  # int16 lanes -> half as many int32, pairs summed
            if _ACC.bits == 32:
                return acc
            n, wide = acc.type.count, ir.VectorType(_I32, acc.type.count // 2)
            even, odd = take(acc, acc, list(range(0, n, 2))), take(acc, acc, list(range(1, n, 2)))
            return builder.add(builder.sext(even, wide), builder.sext(odd, wide))

        def pairs(p: ir.Value, q: ir.Value) -> ir.Value:  # adjacent lanes of p then of q summed: [p's | q's]
            n = p.type.count
            return builder.add(take(p, q, list(range(0, 2 * n, 2))), take(p, q, list(range(1, 2 * n, 2))))

        w = [widen(a) for a in args[1:]]
        total = pairs(pairs(w[0], w[1]), pairs(w[2], w[3]))
        while total.type.count > 4:  # 4 groups of adjacent lanes, one per accumulator: halve each
            n = total.type.count
            total = builder.add(take(total, total, list(range(0, n, 2))), take(total, total, list(range(1, n, 2))))
        return builder.add(args[0], total)

    return SUMS(sums, a0, a1, a2, a3), codegen


@intrinsic
def _store_sums(typingctx, out, i0, i1, sums, mult, rowsum0, rowsum1):
    """``out.flat[i0 : i0+2] = mult * sums[0:2] - rowsum0`` and ``out.flat[i1 : i1+2] = mult *
    sums[2:4] - rowsum1`` (out int32): two outputs of each of two rows, or four of one row."""
    if not (_is_c_array(out, types.int32) and sums == SUMS
            and all(isinstance(t, types.Integer) for t in (i0, i1, mult, rowsum0, rowsum1))):  # fmt: skip
        return None

    def codegen(context, builder, sig, args):
        out_arr, first, second, sums_value, mult_value, r0, r1 = args
        pair = ir.VectorType(_I32, 2)
        scaled = builder.mul(sums_value, _splat(builder, _as_int(builder, mult_value, 32), sums_value.type))
        for half, index, rowsum in ((0, first, r0), (1, second, r1)):
            lanes = builder.shuffle_vector(scaled, scaled, ir.Constant(pair, [2 * half, 2 * half + 1]))
            values = builder.sub(lanes, _splat(builder, _as_int(builder, rowsum, 32), pair))
            ptr = _element_ptr(context, builder, sig.args[0], out_arr, index)
            builder.store(values, builder.bitcast(ptr, pair.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(out, i0, i1, sums, mult, rowsum0, rowsum1), codegen


@intrinsic
def _dot_add(typingctx, acc, x, ix, codes, ic):
    """``acc`` plus the products of the ``STEP`` int8 activations at ``x.flat[ix:]`` and the
    ``STEP`` weight codes (int8, 0..2) at ``codes.flat[ic:]``, spread over its lanes."""
    if not (acc == _ACC and _is_c_array(x, types.int8) and _is_c_array(codes, types.int8)):
        return None

    def codegen(context, builder, sig, args):
        acc_value, x_arr, x_index, c_arr, c_index = args
        bytes_ = ir.VectorType(ir.IntType(8), STEP)
        wide = ir.VectorType(_I32, STEP)
        xv = builder.load(builder.bitcast(_element_ptr(context, builder, sig.args[1], x_arr, x_index),
                                          bytes_.as_pointer()), align=1)  # fmt: skip
        cv = builder.load(builder.bitcast(_element_ptr(context, builder, sig.args[3], c_arr, c_index),
                                          bytes_.as_pointer()), align=1)  # fmt: skip
        if DOTPROD:  # arm64's sdot: signed by signed, 4 bytes into each of 4 lanes
            products = builder.mul(builder.sext(xv, wide), builder.sext(cv, wide))
            name = f"llvm.vector.partial.reduce.add.v{LANES}i32.v{STEP}i32"
            return _call(builder, name, acc_value.type, acc_value, products)
        return builder.add(acc_value, _pairs_int16(builder, cv, xv))

    return _ACC(acc, x, ix, codes, ic), codegen


def _pairs_int16(builder, unsigned: ir.Value, signed: ir.Value) -> ir.Value:
    """x86: the 2n products of ``unsigned`` (2n bytes, codes 0..2, zero-extended) and ``signed``
    (int8), summed in adjacent pairs and saturated to int16: n int16 lanes, the pattern LLVM
    selects as one ``vpmaddubsw`` (64 bytes on AVX-512BW, 32 on AVX2). The pairs of codes and
    activations never reach the saturation (at most 512 in size); the clamp is there because
    it is what the instruction does. Added into int16 lanes (``vpaddw``), 64 products cost two
    instructions, where products widened to int16 and summed into int32 by ``vpmaddwd`` cost
    two for 32 (0.53x float32 on an AVX-512 Xeon, 1.00x with ``vpdpwssd``)."""
    n = unsigned.type.count // 2
    lanes, wide = ir.VectorType(ir.IntType(16), n), ir.VectorType(_I32, n)

    def half(vector: ir.Value, first: int, extend) -> ir.Value:
        picked = ir.Constant(ir.VectorType(_I32, n), list(range(first, 2 * n, 2)))
        return extend(builder.shuffle_vector(vector, ir.Constant(vector.type, None), picked), wide)

    even = builder.mul(half(signed, 0, builder.sext), half(unsigned, 0, builder.zext), flags=["nsw"])
    odd = builder.mul(half(signed, 1, builder.sext), half(unsigned, 1, builder.zext), flags=["nsw"])
    pairs = builder.add(even, odd, flags=["nsw"])
    low, high = ir.Constant(wide, [-32768] * n), ir.Constant(wide, [32767] * n)
    pairs = builder.select(builder.icmp_signed(">", pairs, low), pairs, low)
    pairs = builder.select(builder.icmp_signed("<", pairs, high), pairs, high)
    return builder.trunc(pairs, lanes)


# --------------------------------------------------------------------------- straight from the packed words
# A token against the 16 columns of one vector of an A8 tile, read from the packed words as they
# are stored (no decoded copy of the tile): word ``lane`` holds column ``lane``'s codes for 4
# consecutive k in each field, so byte j of the word, shifted down to the field and masked, is
# column ``lane``'s code for the j-th of those k. One int32 lane per column (lanes must stay
# columns here, so no ``partial.reduce``, whose grouping of products into lanes is unspecified):
# per k a shift, a mask, a multiply by the broadcast activation and an add, on 16 lanes.

COLUMNS = 16
"""Columns (int32 lanes) of a column accumulator (``simd._I32x16``; ``simd._vzeros_i32`` makes a
zero one): one vector of an A8 tile."""


@intrinsic
def _cols_dot_add(typingctx, acc, x, ix, words, iw, shift, mask):
    """``acc`` plus, in lane c, sum over j < 4 of ``x.flat[ix + j]`` (int8) times byte j of
    ``words.flat[iw + c] >> shift``, masked by ``mask`` (words uint32; codes 0..2)."""
    if not (acc == _I32x16 and _is_c_array(x, types.int8) and _is_c_array(words, types.uint32)
            and isinstance(shift, types.Integer) and isinstance(mask, types.Integer)):  # fmt: skip
        return None

    def codegen(context, builder, sig, args):
        acc_value, x_arr, x_index, w_arr, w_index, shift_value, mask_value = args
        lanes = ir.VectorType(_I32, COLUMNS)

        w_ptr = builder.bitcast(_element_ptr(context, builder, sig.args[3], w_arr, w_index), lanes.as_pointer())
        packed = builder.lshr(builder.load(w_ptr, align=4), _splat(builder, _as_int(builder, shift_value, 32), lanes))
        masks = _splat(builder, _as_int(builder, mask_value, 32), lanes)
        total = acc_value
        for j in range(4):
            codes = builder.and_(builder.lshr(packed, ir.Constant(lanes, [8 * j] * COLUMNS)) if j else packed, masks)
            xj = builder.load(_element_ptr(context, builder, sig.args[1], x_arr, builder.add(x_index, ir.Constant(x_index.type, j))))
            total = builder.add(total, builder.mul(codes, _splat(builder, _as_int(builder, xj, 32), lanes)))
        return total

    return _I32x16(acc, x, ix, words, iw, shift, mask), codegen
