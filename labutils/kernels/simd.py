"""The SIMD vocabulary of the microkernels: vector types and a few operations, as Numba
``@intrinsic`` functions that emit LLVM vector IR.

Numba compiles Python loops through LLVM, which vectorizes simple loops but does not keep a
block of vector accumulators in registers by itself; with these the kernels are written as
register-blocked microkernels. A vector lives in a register (a Numba type whose LLVM model is
``<lanes x iN>``); 512-bit vectors (zmm) serve the AVX-512 path, 256-bit ones (ymm) the AVX2 path.

Loads and stores take a C-contiguous array and a flat element index, with no bounds check: the
public functions validate every shape before a kernel runs.

- ``_xor_popcount_add``: ``acc + ctpop(a ^ w)`` per uint64 lane (``vpopcntq`` on AVX-512
  VPOPCNTDQ; on AVX2 LLVM emits a ``vpshufb`` nibble lookup and ``vpsadbw`` per vector).
- ``_xor_nibble_add`` / ``_sad_u64``: the AVX2 popcount split in two, so the byte counts of up
  to 31 words are summed in bytes and widened (``vpsadbw``) once.
- ``_dpbusd``: AVX-512 VNNI ``vpdpbusd`` (4 unsigned x signed byte products into an int32 lane).
- ``_maddubs_add`` / ``_madd_ones_add``: AVX2 ``vpmaddubsw`` (2 byte products into an int16
  lane, summed in int16 for many steps) and ``vpmaddwd`` with ones (int16 pairs into int32).
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from labutils.kernels.cpu import _enabled_llvm_features

HAS_VNNI: bool = "avx512vnni" in _enabled_llvm_features()
"""True when ``vpdpbusd`` (AVX-512 VNNI) is emitted; otherwise ``_dpbusd`` uses the portable fallback."""
HAS_VNNI_256: bool = "avxvnni" in _enabled_llvm_features() or {"avx512vnni", "avx512vl"} <= _enabled_llvm_features()
"""True when 256-bit ``vpdpbusd`` exists: AVX-VNNI (VEX, Alder Lake and later, Zen 5) or AVX512-VNNI
with AVX512-VL; the AVX2 path's int8 steps (``_dot_step8``) then use it."""


class _Vec(types.Type):
    """An LLVM vector of ``lanes`` integers of ``bits`` bits (lives in a register)."""

    def __init__(self, lanes: int, bits: int) -> None:
        self.lanes, self.bits = lanes, bits
        super().__init__(name=f"vec{lanes}x{bits}")


@register_model(_Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(ir.IntType(fe_type.bits), fe_type.lanes))


# 512-bit (AVX-512) and 256-bit (AVX2) vectors
_U64x8, _I32x16, _U8x64 = _Vec(8, 64), _Vec(16, 32), _Vec(64, 8)
_U64x4, _I32x8, _U8x32, _I16x16 = _Vec(4, 64), _Vec(8, 32), _Vec(32, 8), _Vec(16, 16)
_I32 = ir.IntType(32)
_BYTES = {64: _U8x64, 32: _U8x32}
_WORDS = {64: _U64x8, 32: _U64x4}
_DWORDS = {64: _I32x16, 32: _I32x8}


def _is_c_array(t: Any, *dtypes: Any) -> bool:
    return isinstance(t, types.Array) and t.layout == "C" and t.dtype in dtypes


def _element_ptr(context, builder, arrty, arr, index):
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.gep(data, [index])


def _splat(builder, scalar, vty: ir.VectorType):
    one = builder.insert_element(ir.Constant(vty, ir.Undefined), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count))


def _as_int(builder, value, width: int):
    """An LLVM integer ``value`` truncated or sign-extended to ``width`` bits."""
    if value.type.width > width:
        return builder.trunc(value, ir.IntType(width))
    if value.type.width < width:
        return builder.sext(value, ir.IntType(width))
    return value


def _call(builder, name: str, ret: ir.Type, *args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, list(args))


@intrinsic
def popcount(typingctx, x):
    """Number of set bits of an integer, through LLVM's ``ctpop`` (``popcnt`` on x86, ``cnt`` on arm64)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.ctpop(args[0])

    return x(x), codegen


# --------------------------------------------------------------------------- loads and stores


def _make_vload(nbytes: int):
    words, bytes_ = _WORDS[nbytes], _BYTES[nbytes]

    def vload(typingctx, arr, index):
        if not _is_c_array(arr, types.uint64, types.uint8):
            return None
        vec = words if arr.dtype == types.uint64 else bytes_

        def codegen(context, builder, sig, args):
            ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1])
            vty = context.get_value_type(vec)
            return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=1)

        return vec(arr, index), codegen

    vload.__name__ = vload.__qualname__ = f"_vload{nbytes}"
    return intrinsic(vload)


_vload = _make_vload(64)
_vload.__doc__ = "The 64 bytes at ``arr.flat[index:]``: 8 x uint64 or 64 x uint8 lanes."
_vload32 = _make_vload(32)
_vload32.__doc__ = "The 32 bytes at ``arr.flat[index:]``: 4 x uint64 or 32 x uint8 lanes."


def _make_vsplat_word(nbytes: int):
    vec = _WORDS[nbytes]

    def vsplat_word(typingctx, arr, index):
        if not _is_c_array(arr, types.uint64):
            return None

        def codegen(context, builder, sig, args):
            word = builder.load(_element_ptr(context, builder, sig.args[0], args[0], args[1]))
            return _splat(builder, word, context.get_value_type(vec))

        return vec(arr, index), codegen

    vsplat_word.__name__ = vsplat_word.__qualname__ = f"_vsplat_word{nbytes}"
    return intrinsic(vsplat_word)


_vsplat_word = _make_vsplat_word(64)  # arr.flat[index] (uint64) in all 8 lanes
_vsplat_word4 = _make_vsplat_word(32)  # ... in all 4 lanes


def _make_vsplat_quad(nbytes: int):
    vec, lanes = _BYTES[nbytes], nbytes // 4

    def vsplat_quad(typingctx, arr, index):
        if not _is_c_array(arr, types.int8):
            return None

        def codegen(context, builder, sig, args):
            ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1])
            quad = builder.load(builder.bitcast(ptr, _I32.as_pointer()), align=1)
            return builder.bitcast(_splat(builder, quad, ir.VectorType(_I32, lanes)), context.get_value_type(vec))

        return vec(arr, index), codegen

    vsplat_quad.__name__ = vsplat_quad.__qualname__ = f"_vsplat_quad{nbytes}"
    return intrinsic(vsplat_quad)


_vsplat_quad = _make_vsplat_quad(64)  # the 4 bytes arr.flat[index:index+4] (int8) in all 16 dword lanes
_vsplat_quad8 = _make_vsplat_quad(32)  # ... in all 8 dword lanes


def _make_vzeros(vec: _Vec):
    def vzeros(typingctx):
        def codegen(context, builder, sig, args):
            return ir.Constant(context.get_value_type(vec), [0] * vec.lanes)

        return vec(), codegen

    vzeros.__name__ = vzeros.__qualname__ = f"_vzeros_{vec.name}"
    return intrinsic(vzeros)


_vzeros_u64, _vzeros_i32 = _make_vzeros(_U64x8), _make_vzeros(_I32x16)
_vzeros_u64x4, _vzeros_i32x8, _vzeros_i16x16, _vzeros_u8x32 = (
    _make_vzeros(_U64x4), _make_vzeros(_I32x8), _make_vzeros(_I16x16), _make_vzeros(_U8x32))  # fmt: skip


@intrinsic
def _vstore(typingctx, arr, index, vec):
    """``arr.flat[index : index+len(vec)] = vec`` for a uint8 array and 64 or 32 byte lanes, or an
    int32 array and 16 or 8 int32 lanes (plain IR: every target)."""
    if not ((_is_c_array(arr, types.uint8) and vec in (_U8x64, _U8x32))
            or (_is_c_array(arr, types.int32) and vec in (_I32x16, _I32x8))):  # fmt: skip
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(ptr, args[2].type.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.none(arr, index, vec), codegen


@intrinsic
def _store_xnor(typingctx, out, index, acc, k):
    """``out.flat[index:index+lanes] = k - 2 * acc`` (int32), the XNOR dot from popcounts."""
    if not (_is_c_array(out, types.int32) and acc in (_U64x8, _U64x4) and isinstance(k, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        vty = ir.VectorType(_I32, args[2].type.count)
        ptr = builder.bitcast(_element_ptr(context, builder, sig.args[0], args[0], args[1]), vty.as_pointer())
        popcounts = builder.trunc(args[2], vty)
        dots = builder.sub(_splat(builder, _as_int(builder, args[3], 32), vty),
                           builder.shl(popcounts, ir.Constant(vty, [1] * vty.count)))  # fmt: skip
        builder.store(dots, ptr, align=1)
        return context.get_dummy_value()

    return types.none(out, index, acc, k), codegen


@intrinsic
def _store_affine(typingctx, out, index, acc, mult, offset):
    """``out.flat[index:index+lanes] = mult * acc - offset`` (int32): the dot from code sums."""
    if not (_is_c_array(out, types.int32) and acc in (_I32x16, _I32x8)):
        return None
    if not (isinstance(mult, types.Integer) and isinstance(offset, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        vty = args[2].type
        ptr = builder.bitcast(_element_ptr(context, builder, sig.args[0], args[0], args[1]), vty.as_pointer())
        mult, offset = (_splat(builder, _as_int(builder, v, 32), vty) for v in args[3:])
        builder.store(builder.sub(builder.mul(args[2], mult), offset), ptr, align=1)
        return context.get_dummy_value()

    return types.none(out, index, acc, mult, offset), codegen


# --------------------------------------------------------------------------- bit fields


@intrinsic
def _vand(typingctx, packed, mask):
    """``packed & mask`` in each byte lane: the lowest code field of every byte."""
    if packed not in (_U8x64, _U8x32) or not isinstance(mask, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.and_(args[0], _splat(builder, _as_int(builder, args[1], 8), args[0].type))

    return packed(packed, mask), codegen


@intrinsic
def _vshr(typingctx, packed, shift):
    """``packed >> shift`` (logical) in each byte lane: brings the next field down."""
    if packed not in (_U8x64, _U8x32) or not isinstance(shift, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.lshr(args[0], _splat(builder, _as_int(builder, args[1], 8), args[0].type))

    return packed(packed, shift), codegen


# --------------------------------------------------------------------------- popcount


@intrinsic
def _xor_popcount_add(typingctx, acc, a, w):
    """``acc + popcount(a XOR w)`` in each uint64 lane (``vpxorq, vpopcntq, vpaddq`` on AVX-512)."""
    if not (acc == a == w and acc in (_U64x8, _U64x4)):
        return None

    def codegen(context, builder, sig, args):
        acc, a, w = args
        x = builder.xor(a, w)
        ctpop = _call(builder, f"llvm.ctpop.v{x.type.count}i64", x.type, x)
        return builder.add(acc, ctpop)

    return acc(acc, a, w), codegen


_NIBBLE_COUNTS = [bin(i & 15).count("1") for i in range(32)]


@intrinsic
def _xor_nibble_add(typingctx, acc, a, w):
    """``acc + popcount`` of each byte of ``a XOR w``, in 32 byte lanes (AVX2).

    Two ``vpshufb`` lookups in a 16-entry table of nibble counts (Muła): at most 8 per byte
    and word, so a byte accumulator holds the counts of 31 words before ``_sad_u64``.
    """
    if not (acc == _U8x32 and a == w == _U64x4):
        return None

    def codegen(context, builder, sig, args):
        acc, a, w = args
        v32 = acc.type
        x = builder.bitcast(builder.xor(a, w), v32)
        low_mask = ir.Constant(v32, [15] * 32)
        table = ir.Constant(v32, _NIBBLE_COUNTS)
        low = builder.and_(x, low_mask)
        high = builder.and_(builder.lshr(x, ir.Constant(v32, [4] * 32)), low_mask)
        counts = builder.add(_call(builder, "llvm.x86.avx2.pshuf.b", v32, table, low),
                             _call(builder, "llvm.x86.avx2.pshuf.b", v32, table, high))  # fmt: skip
        return builder.add(acc, counts)

    return _U8x32(acc, a, w), codegen


@intrinsic
def _xor_lut_add(typingctx, acc, a, w):
    """``acc + popcount`` of each byte of ``a XOR w`` where both hold nibbles (bytes < 16): one
    ``vpxor``, one ``vpshufb`` lookup and one ``vpaddb`` for 32 bytes (AVX2). With activations
    and weights split into low and high nibble planes beforehand, a 256-bit popcount costs 6
    vector ops instead of the 8 of ``_xor_nibble_add`` (the shift and the masks are hoisted)."""
    if not (acc == _U8x32 and a == w == _U64x4):
        return None

    def codegen(context, builder, sig, args):
        acc, a, w = args
        v32 = acc.type
        x = builder.bitcast(builder.xor(a, w), v32)
        return builder.add(acc, _call(builder, "llvm.x86.avx2.pshuf.b", v32, ir.Constant(v32, _NIBBLE_COUNTS), x))

    return _U8x32(acc, a, w), codegen


@intrinsic
def _sad_u64(typingctx, acc, counts):
    """``acc + `` the sums of each 8 bytes of ``counts`` (``vpsadbw`` against zero): 4 uint64 lanes."""
    if not (acc == _U64x4 and counts == _U8x32):
        return None

    def codegen(context, builder, sig, args):
        zero = ir.Constant(args[1].type, [0] * 32)
        return builder.add(args[0], _call(builder, "llvm.x86.avx2.psad.bw", args[0].type, args[1], zero))

    return _U64x4(acc, counts), codegen


# --------------------------------------------------------------------------- int8 products


def _dpbusd_ir(builder, acc, u8, s8, use_vnni: bool):
    """acc[i] + sum_{j<4} u8[4i+j] * s8[4i+j] for 16 int32 lanes i (u8 unsigned, s8 signed)."""
    v16 = ir.VectorType(_I32, 16)
    if use_vnni:
        return _call(builder, "llvm.x86.avx512.vpdpbusd.512", v16, acc, builder.bitcast(u8, v16), builder.bitcast(s8, v16))
    wide = ir.VectorType(_I32, 64)
    products = builder.mul(builder.zext(u8, wide), builder.sext(s8, wide))
    for j in range(4):
        lanes = ir.Constant(v16, [4 * i + j for i in range(16)])
        acc = builder.add(acc, builder.shuffle_vector(products, products, lanes))
    return acc


@intrinsic
def _dpbusd(typingctx, acc, u8, s8):
    """``vpdpbusd``: 16 int32 lanes += dot of 4 unsigned bytes of ``u8`` with 4 signed of ``s8``."""
    if not (acc == _I32x16 and u8 == s8 == _U8x64):
        return None

    def codegen(context, builder, sig, args):
        return _dpbusd_ir(builder, *args, use_vnni=HAS_VNNI)

    return _I32x16(acc, u8, s8), codegen


@intrinsic
def _dpbusd_portable(typingctx, acc, u8, s8):
    """``_dpbusd`` without VNNI, whatever the CPU (to test the fallback)."""
    if not (acc == _I32x16 and u8 == s8 == _U8x64):
        return None

    def codegen(context, builder, sig, args):
        return _dpbusd_ir(builder, *args, use_vnni=False)

    return _I32x16(acc, u8, s8), codegen


@intrinsic
def _maddubs_add(typingctx, acc, u8, s8):
    """``acc + vpmaddubsw(u8, s8)``: 16 int16 lanes += ``u8[2i]*s8[2i] + u8[2i+1]*s8[2i+1]``.

    ``vpmaddubsw`` saturates its pair sums to int16, and the int16 accumulator wraps: exact here
    only because the unsigned operand is a weight code <= 2, so a pair is within ±512 and the
    callers widen (``_madd_ones_add``) before 32767 // 512 = 63 steps.
    """
    if not (acc == _I16x16 and u8 == s8 == _U8x32):
        return None

    def codegen(context, builder, sig, args):
        return builder.add(args[0], _call(builder, "llvm.x86.avx2.pmadd.ub.sw", args[0].type, args[1], args[2]))

    return _I16x16(acc, u8, s8), codegen


@intrinsic
def _madd_ones_add(typingctx, acc, pairs):
    """``acc + vpmaddwd(pairs, 1)``: 8 int32 lanes += the sum of int16 lanes 2i and 2i+1."""
    if not (acc == _I32x8 and pairs == _I16x16):
        return None

    def codegen(context, builder, sig, args):
        ones = ir.Constant(args[1].type, [1] * 16)
        return builder.add(args[0], _call(builder, "llvm.x86.avx2.pmadd.wd", args[0].type, args[1], ones))

    return _I32x8(acc, pairs), codegen


# --------------------------------------------------------------------------- the AVX2 path's int8 step
# Without a 256-bit VNNI: vpmaddubsw into int16 lanes, widened by vpmaddwd every few steps. With
# one (AVX-VNNI, or AVX512-VNNI + VL): vpdpbusd straight into int32 lanes, and the "widening" is
# a plain add. The accumulator type follows, so one kernel source serves both.
_STEP_ACC = _I32x8 if HAS_VNNI_256 else _I16x16


@intrinsic
def _step_zeros(typingctx):
    """A zero accumulator of ``_dot_step8``: int32 x 8 with a 256-bit VNNI, else int16 x 16."""

    def codegen(context, builder, sig, args):
        return ir.Constant(context.get_value_type(_STEP_ACC), [0] * _STEP_ACC.lanes)

    return _STEP_ACC(), codegen


@intrinsic
def _dot_step8(typingctx, acc, u8, s8):
    """``acc`` + the products of 32 unsigned codes ``u8`` and 32 signed bytes ``s8``, 4 by 4 per
    int32 column of the A8 layout: ``vpdpbusd`` ymm with a 256-bit VNNI, else ``vpmaddubsw`` (pairs
    into int16; exact for codes <= 2, widened by ``_widen_step`` before 63 steps)."""
    if not (acc == _STEP_ACC and u8 == s8 == _U8x32):
        return None

    def codegen(context, builder, sig, args):
        acc, u8, s8 = args
        if HAS_VNNI_256:
            v8 = ir.VectorType(_I32, 8)
            return _call(builder, "llvm.x86.avx512.vpdpbusd.256", v8, acc, builder.bitcast(u8, v8), builder.bitcast(s8, v8))
        return builder.add(acc, _call(builder, "llvm.x86.avx2.pmadd.ub.sw", acc.type, u8, s8))

    return _STEP_ACC(acc, u8, s8), codegen


@intrinsic
def _widen_step(typingctx, acc, steps):
    """int32 x 8 ``acc`` + the step accumulator ``steps``: a plain add with a 256-bit VNNI, else
    ``vpmaddwd`` with ones (adjacent int16 lanes into int32)."""
    if not (acc == _I32x8 and steps == _STEP_ACC):
        return None

    def codegen(context, builder, sig, args):
        if HAS_VNNI_256:
            return builder.add(args[0], args[1])
        ones = ir.Constant(args[1].type, [1] * 16)
        return builder.add(args[0], _call(builder, "llvm.x86.avx2.pmadd.wd", args[0].type, args[1], ones))

    return _I32x8(acc, steps), codegen


# --------------------------------------------------------------------------- table lookups (AVX2)
# The lookup-table GEMV (``kernels.lut``): 16-byte tables broadcast to both 128-bit halves of a
# ymm, ``vpshufb`` as 32 parallel lookups, byte masks from bit planes, and the (low, high) byte
# pairs of int16 table entries put back together by ``vpunpck{l,h}bw``.


@intrinsic
def _vbroadcast16(typingctx, arr, index):
    """The 16 bytes at ``arr.flat[index:]`` (uint8) in both 128-bit halves (``vbroadcasti128``)."""
    if not _is_c_array(arr, types.uint8):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        v16 = builder.load(builder.bitcast(ptr, ir.VectorType(ir.IntType(8), 16).as_pointer()), align=1)
        return builder.shuffle_vector(v16, v16, ir.Constant(ir.VectorType(_I32, 32), list(range(16)) * 2))

    return _U8x32(arr, index), codegen


@intrinsic
def _vlookup_xor(typingctx, table, idx, mask):
    """``table[idx] ^ mask`` per byte, the lookup within each 128-bit half (``vpshufb``, every
    idx byte < 16; ``vpxor``)."""
    if not (table == idx == mask == _U8x32):
        return None

    def codegen(context, builder, sig, args):
        return builder.xor(_call(builder, "llvm.x86.avx2.pshuf.b", args[0].type, args[0], args[1]), args[2])

    return _U8x32(table, idx, mask), codegen


@intrinsic
def _vbit_mask(typingctx, plane, bit):
    """0xFF in each byte whose bit ``bit`` is set in ``plane``, else 0 (``vpand``, ``vpcmpeqb``)."""
    if plane != _U8x32 or not isinstance(bit, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        one = builder.shl(ir.Constant(ir.IntType(8), 1), _as_int(builder, args[1], 8))
        sel = _splat(builder, one, args[0].type)
        hit = builder.icmp_unsigned("==", builder.and_(args[0], sel), sel)
        return builder.sext(hit, args[0].type)

    return _U8x32(plane, bit), codegen


def _literal(value: Any, *allowed: int) -> int | None:
    """The compile-time value of an integer literal argument, if it is one of ``allowed``."""
    if isinstance(value, types.IntegerLiteral) and value.literal_value in allowed:
        return value.literal_value
    return None


@intrinsic
def _unpack_add(typingctx, acc, lo, hi, high):
    """``acc`` + the int16 values whose low bytes are ``lo`` and high bytes ``hi``: bytes 0-7 and
    16-23 (``high`` = 0, ``vpunpcklbw``: rows 0-7 and 16-23 of a 32-row tile) or 8-15 and 24-31
    (``high`` = 1, ``vpunpckhbw``). ``high`` is a literal."""
    first = _literal(high, 0, 1)
    if not (acc == _I16x16 and lo == hi == _U8x32) or first is None:
        return None
    order = [i for h in (0, 16) for j in range(8 * first, 8 * first + 8) for i in (h + j, 32 + h + j)]

    def codegen(context, builder, sig, args):
        pairs = builder.shuffle_vector(args[1], args[2], ir.Constant(ir.VectorType(_I32, 32), order))
        return builder.add(args[0], builder.bitcast(pairs, args[0].type))

    return _I16x16(acc, lo, hi, high), codegen


@intrinsic
def _sext_add(typingctx, acc, v, half):
    """``acc`` (int32 x 8) + int16 lanes 0-7 (``half`` = 0) or 8-15 (``half`` = 1) of ``v``,
    sign-extended (``vpmovsxwd``). ``half`` is a literal."""
    first = _literal(half, 0, 1)
    if not (acc == _I32x8 and v == _I16x16) or first is None:
        return None

    def codegen(context, builder, sig, args):
        part = builder.shuffle_vector(args[1], args[1], ir.Constant(ir.VectorType(_I32, 8), list(range(8 * first, 8 * first + 8))))
        return builder.add(args[0], builder.sext(part, args[0].type))

    return _I32x8(acc, v, half), codegen
