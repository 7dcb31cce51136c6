"""Float32 vectors of 8 or 16 lanes for Numba code: load, store, broadcast, fused multiply-add,
add and horizontal sum.

The integer microkernels keep their accumulators in registers through ``simd``'s intrinsics;
these are the float32 counterparts, for register-blocked float loops LLVM does not block by
itself (the compiled encoder's attention, ``labutils.engine.encoder``). A vector is LLVM's
``<8 x float>`` (one ymm register; two 128-bit registers on arm64 NEON, LLVM splits it) or
``<16 x float>`` (one zmm register on AVX-512), the width a constant argument of the loads, so
one function body serves every path.

Loads and stores take a C-contiguous float32 array and a flat element index, with no bounds
check: callers index inside their own buffers. A load also takes a ``uint16`` array holding
bfloat16 values (the top halves of float32s) and widens them exactly: zero-extend, shift left by
16 (``vpmovzxwd``, ``vpslld``), so one loop body reads either kind of table; and an ``int8``
array of codes, widened exactly to float32 (``vpmovsxbd``, ``vcvtdq2ps``): a quarter of the
bytes, the caller applies the codes' scales.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

WIDTHS = (8, 16)
"""Lanes of the vectors there are: 8 (256 bits: AVX2, and arm64 NEON as two registers) and 16
(512 bits: AVX-512; elsewhere LLVM splits it)."""


class _F32Vec(types.Type):
    """An LLVM vector of ``lanes`` float32 (lives in a register)."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes
        super().__init__(name=f"f32x{lanes}")


@register_model(_F32Vec)
class _F32VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(ir.FloatType(), fe_type.lanes))


_VEC = {lanes: _F32Vec(lanes) for lanes in WIDTHS}
_I32 = ir.IntType(32)


def _lanes(t) -> int | None:
    """The vector width a literal int argument names, None if it names none."""
    value = getattr(t, "literal_value", None)
    return value if isinstance(t, types.IntegerLiteral) and value in _VEC else None


def _is_f32_c_array(t) -> bool:
    return isinstance(t, types.Array) and t.layout == "C" and t.dtype == types.float32


def _is_bf16_c_array(t) -> bool:
    return isinstance(t, types.Array) and t.layout == "C" and t.dtype == types.uint16


def _is_i8_c_array(t) -> bool:
    return isinstance(t, types.Array) and t.layout == "C" and t.dtype == types.int8


def _pointer(context, builder, arrty, arr, index, lanes, element=None):
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [index]), ir.VectorType(element or ir.FloatType(), lanes).as_pointer())


@intrinsic
def fload(typingctx, arr, index, lanes):
    """The ``lanes`` float32 ``arr.flat[index : index + lanes]`` as a vector (lanes: a constant, 8
    or 16); from a uint16 array, its bfloat16 values widened to float32 (exact); from an int8
    array, its codes as float32 (exact)."""
    width = _lanes(lanes)
    bf16, i8 = _is_bf16_c_array(arr), _is_i8_c_array(arr)
    if not (width and (_is_f32_c_array(arr) or bf16 or i8) and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        if i8:
            codes = builder.load(_pointer(context, builder, sig.args[0], args[0], args[1], width, ir.IntType(8)), align=1)
            return builder.sitofp(builder.sext(codes, ir.VectorType(_I32, width)), ir.VectorType(ir.FloatType(), width))
        if not bf16:
            return builder.load(_pointer(context, builder, sig.args[0], args[0], args[1], width), align=4)
        i16, i32 = ir.IntType(16), ir.VectorType(_I32, width)
        halves = builder.load(_pointer(context, builder, sig.args[0], args[0], args[1], width, i16), align=2)
        wide = builder.shl(builder.zext(halves, i32), ir.Constant(i32, [16] * width))
        return builder.bitcast(wide, ir.VectorType(ir.FloatType(), width))

    return _VEC[width](arr, index, lanes), codegen


@intrinsic
def fstore(typingctx, arr, index, vec):
    """``arr.flat[index : index + lanes] = vec``."""
    if not (_is_f32_c_array(arr) and isinstance(index, types.Integer) and isinstance(vec, _F32Vec)):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _pointer(context, builder, sig.args[0], args[0], args[1], sig.args[2].lanes), align=4)
        return context.get_dummy_value()

    return types.none(arr, index, vec), codegen


@intrinsic
def fsplat(typingctx, value, lanes):
    """A vector of ``lanes`` copies of the float32 ``value``."""
    width = _lanes(lanes)
    if value != types.float32 or not width:
        return None

    def codegen(context, builder, sig, args):
        vty = ir.VectorType(ir.FloatType(), width)
        one = builder.insert_element(ir.Constant(vty, ir.Undefined), args[0], ir.Constant(_I32, 0))
        return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(_I32, width), [0] * width))

    return _VEC[width](value, lanes), codegen


@intrinsic
def fzeros(typingctx, lanes):
    """A vector of ``lanes`` zeros."""
    width = _lanes(lanes)
    if not width:
        return None

    def codegen(context, builder, sig, args):
        return ir.Constant(ir.VectorType(ir.FloatType(), width), [0.0] * width)

    return _VEC[width](lanes), codegen


@intrinsic
def ffma(typingctx, acc, a, b):
    """``acc + a * b`` per lane, one rounding (``llvm.fma``: ``vfmadd`` on x86, ``fmla`` on arm64)."""
    if not (isinstance(acc, _F32Vec) and a == acc and b == acc):
        return None

    def codegen(context, builder, sig, args):
        vty = args[0].type
        name = f"llvm.fma.v{sig.args[0].lanes}f32"
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3), name)
        return builder.call(fma, [args[1], args[2], args[0]])

    return acc(acc, a, b), codegen


@intrinsic
def fadd(typingctx, a, b):
    """``a + b`` per lane."""
    if not (isinstance(a, _F32Vec) and b == a):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return a(a, b), codegen


@intrinsic
def fsum(typingctx, vec):
    """The float32 sum of a vector's lanes, added pairwise (``llvm.vector.reduce.fadd`` with
    reassociation: log2(lanes) shuffle-and-add steps, not a serial chain)."""
    if not isinstance(vec, _F32Vec):
        return None

    def codegen(context, builder, sig, args):
        vty = args[0].type
        fty = ir.FunctionType(ir.FloatType(), [ir.FloatType(), vty])
        reduce = cgutils.get_or_insert_function(builder.module, fty, f"llvm.vector.reduce.fadd.v{sig.args[0].lanes}f32")
        return builder.call(reduce, [ir.Constant(ir.FloatType(), -0.0), args[0]], fastmath=("reassoc",))

    return types.float32(vec), codegen


@intrinsic
def fmax(typingctx, a, b):
    """The larger of ``a`` and ``b`` per lane (``llvm.maxnum``: ``vmaxps``)."""
    if not (isinstance(a, _F32Vec) and b == a):
        return None

    def codegen(context, builder, sig, args):
        vty = args[0].type
        name = f"llvm.maxnum.v{sig.args[0].lanes}f32"
        maxnum = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty, vty]), name)
        return builder.call(maxnum, [args[0], args[1]])

    return a(a, b), codegen


@intrinsic
def fmaxlanes(typingctx, vec):
    """The largest of a vector's lanes (``llvm.vector.reduce.fmax``: log2(lanes) shuffle-and-max steps)."""
    if not isinstance(vec, _F32Vec):
        return None

    def codegen(context, builder, sig, args):
        fty = ir.FunctionType(ir.FloatType(), [args[0].type])
        reduce = cgutils.get_or_insert_function(builder.module, fty, f"llvm.vector.reduce.fmax.v{sig.args[0].lanes}f32")
        return builder.call(reduce, [args[0]])

    return types.float32(vec), codegen
