"""Integer kernels for 1-bit and 1.58-bit layers: XNOR/popcount and VNNI matmuls, in Numba.

Three kernel families, each a GEMM (``[M, K] x [N, K]^T -> int32 [M, N]``) and a GEMV
(``[K] -> int32 [N]``), all exact (their int32 results equal a numpy int64 matmul):

- **W1A1** (binary weights x binary activations). With ±1 stored as bits (+1 -> 1, -1 -> 0),
  a product is +1 where the bits agree, so a dot product of length K is::

      dot(a, w) = K - 2 * popcount(a XOR w)          (64 products per uint64 word)

- **W1A8** (binary weights x int8 activations). With the weight bit ``b = (w + 1) / 2``::

      dot(a, w) = sum a*w = 2 * sum b*a - sum a

- **W1.58A8** (ternary weights x int8 activations). With the code ``c = w + 1`` in {0, 1, 2}::

      dot(a, w) = sum c*a - sum a

Both A8 kernels compute ``sum code*a`` with ``vpdpbusd`` (AVX-512 VNNI: 64 unsigned x signed
byte products summed into 16 int32 lanes in one instruction), unpacking the 1- or 2-bit
codes with a shift and a mask (once per block of rows, into a small panel, or on the fly for
a few rows); ``sum a`` is one number per token.

How they are fast
-----------------
Numba compiles Python loops through LLVM, which vectorizes simple loops but does not keep a
4 x 4 block of 512-bit accumulators in registers by itself. So this module adds a small SIMD
vocabulary (``_vload``, ``_xor_popcount_add``, ``_dpbusd``, ...: Numba ``@intrinsic`` functions
that emit LLVM vector IR), and the kernels are written as textbook register-blocked
microkernels: 4 rows of activations x 4 vectors of weight columns per step, so every weight
vector loaded is used 4 times and every activation broadcast 4 times. Weights are stored
*prepacked* in tiles (``prepack_*``, below) so each vector load is one contiguous 64 bytes.
Outer loops run in parallel (``prange``) over (column block, row chunk) tasks.

Popcount is LLVM's ``ctpop``, which becomes ``vpopcntq`` on CPUs with AVX512_VPOPCNTDQ and a
correct (slower) bit-trick sequence elsewhere; ``vpdpbusd`` is used only where the CPU has
AVX512_VNNI, with a portable widen-multiply-add fallback (``_dpbusd``). See the assembly with
``popcount_asm_lines(kernel)`` and ``vnni_asm_lines(kernel)``.

What was tried (one thread, CPU time, exact results checked; 2-core AMD EPYC Zen 4 VM)
------------------------------------------------------------------------------------
W1A1 GEMM, GMAC/s (binary MACs) and ratio to torch float32 (F.linear) in the same run:

    [M, K] x [N, K]                          512x768 x 3072x768   128x384 x 384x384
    torch float32                                  38   1.0x            46   1.0x
    plain triple loop + ctpop (w1a1_gemm_simple)  220   5.7x            97   2.1x
    LLVM auto-vectorized over 8 interleaved rows  105   2.8x            71   1.6x
    microkernel 4 rows x 2 vectors (16 columns)  1003  26.2x           962  21.0x
    microkernel 2 x 8                             833  21.7x           998  21.8x
    microkernel 8 x 3                             847  22.1x          1007  22.0x
    microkernel 4 x 4 (kept)                  930-1040  ~25x        ~1010  ~22x  (kernel alone)

The tile shapes are within the noise of each other: the loop is bound by its three vector ops
per 512 products (xor, popcount, add), about 341 binary MACs per cycle on a core that issues
two 512-bit ops per cycle. Kept 4 x 4 (32 columns per tile). What is left between the kernel
and the public function is Python: ~3 us per call, which is 15% of the smallest shape.

W1.58A8 GEMM, 512x768 x 3072x768, GMAC/s:

    torch float32 (F.linear)                                   34
    torch._int_mm (int8, oneDNN VNNI)                         169
    unpack 2-bit to int8, LLVM-vectorized int32 dot            34   (LLVM picks vpmaddwd)
    activation bit-planes x (plus, minus) masks, popcount      32   (8 x 2 x 3 ops per 64 MACs)
    T-MAC / bitnet.cpp TL2 style look-up, 27-entry tables       7   (scalar loads: LLVM emits
                                                                    no vpshufb from Numba code)
    VNNI microkernel 4 x 4, on-the-fly 2-bit decode (kept)    179

VNNI microkernel tile shapes (4x2, 4x4, 6x3, 8x3, 8x2) all ran at 177-212 GMAC/s, close to
one ``vpdpbusd`` per cycle (64 MACs), the int8 peak of a Zen 4 core (measured: 3.5 per ns, 224
GMAC/s, with 12 independent accumulators). Kept 4 x 4 (64 columns per tile divides every BERT
and LLaMA width). The decode (one ``and`` and one shift per 64-byte vector, shared by the 4
rows of a tile) still took issue slots: decoding a column tile once per task (up to 128 rows)
into a small byte panel and running the microkernel on that lifted 179-193 to 190-224 GMAC/s
(+8-15%). Tasks of fewer than 16 rows (decoding would not pay) decode on the fly. W1A8 decodes 1-bit fields
the same way and runs at the same speed.

Two threads (``python -m labutils.bench kernels --threads 2``, same run, load average ~2 from
other work): W1A1 GEMM at 1580-2370 GMAC/s on all but the smallest layer, 20-57x torch float32
(which runs at 38-94 GMAC/s) on 16 of 18 shapes, geomean 31x; W1A8 / W1.58A8 GEMM at
380-445 GMAC/s (200-240 on the two largest), 4.3-11.6x float32 and 0.89-1.24x torch._int_mm (geomean 1.02-1.03x: both at
the VNNI peak); W1.58A8 GEMV 42-45x float32 (2-bit weights stay in cache where float32 streams
from memory). The W1A1 target of 20x float32 is at this core's roofline: XNOR/popcount needs
three 512-bit ops (xor, popcount, add) per 512 binary MACs and Zen 4 issues two per cycle,
341 MACs/cycle, while MKL reaches its full 16 float32 MACs/cycle when it runs well:
341 / 16 = 21x. The misses are the small layers (128 and 512 tokens x 384 x 384: 13-20x),
where ~3 us of Python and ~3 us of thread start-up are a third of a 10 us kernel.

torch and Numba each bring an OpenMP runtime whose idle threads spin for a while after a
parallel region; on a 2-core machine a Numba kernel right after a torch op can lose a core to
them (the benchmark pauses between the two; in a model, ``OMP_WAIT_POLICY=PASSIVE`` set before
importing torch makes idle threads sleep at once, at a small cost per op).
"""

from __future__ import annotations

import copy
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import llvmlite.binding as llvm
import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model
from torch import nn

from labutils import packing, quant
from labutils.bitlinear import BitLinear

__all__ = [
    "HAS_VNNI",
    "SCHEMES",
    "PackedBitLinear",
    "PackedWeights",
    "asm_lines",
    "pack_model",
    "packed_matmul",
    "popcount",
    "popcount_asm_lines",
    "prepack_w1a1",
    "prepack_w1a8",
    "prepack_w158a8",
    "vnni_asm_lines",
    "w1a1_gemm",
    "w1a1_gemm_simple",
    "w1a1_gemv",
    "w1a8_gemm",
    "w1a8_gemv",
    "w158a8_gemm",
    "w158a8_gemv",
]

SCHEMES = ("w1a1", "w1a8", "w1.58a8")


def _target_features() -> str:
    """LLVM feature string of the CPU Numba compiles for (NUMBA_CPU_NAME/FEATURES if set)."""
    if numba.config.CPU_NAME not in (None, "", "host"):
        return numba.config.CPU_FEATURES or ""
    return llvm.get_host_cpu_features().flatten()


HAS_VNNI: bool = "+avx512vnni" in _target_features().split(",")
"""True when ``vpdpbusd`` is emitted; otherwise ``_dpbusd`` uses the portable fallback."""

# --------------------------------------------------------------------------- SIMD vocabulary
# A 512-bit vector as a Numba type, and the handful of operations the microkernels need.
# Loads and stores take a C-contiguous array and a flat element index, with no bounds check:
# the public functions validate every shape before a kernel runs.


class _Vec(types.Type):
    """A 512-bit LLVM vector of ``lanes`` integers of ``bits`` bits (lives in a register)."""

    def __init__(self, lanes: int, bits: int) -> None:
        self.lanes, self.bits = lanes, bits
        super().__init__(name=f"vec{lanes}x{bits}")


@register_model(_Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(ir.IntType(fe_type.bits), fe_type.lanes))


_U64x8, _I32x16, _U8x64 = _Vec(8, 64), _Vec(16, 32), _Vec(64, 8)
_I32 = ir.IntType(32)


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


@intrinsic
def popcount(typingctx, x):
    """Number of set bits of an integer, through LLVM's ``ctpop`` (``popcnt`` on x86)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.ctpop(args[0])

    return x(x), codegen


@intrinsic
def _vload(typingctx, arr, index):
    """The 64 bytes at ``arr.flat[index:]``: 8 x uint64 or 64 x uint8 lanes."""
    if not _is_c_array(arr, types.uint64, types.uint8):
        return None
    vec = _U64x8 if arr.dtype == types.uint64 else _U8x64

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        vty = context.get_value_type(vec)
        return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=1)

    return vec(arr, index), codegen


@intrinsic
def _vsplat_word(typingctx, arr, index):
    """``arr.flat[index]`` (a uint64 word) in all 8 lanes."""
    if not _is_c_array(arr, types.uint64):
        return None

    def codegen(context, builder, sig, args):
        word = builder.load(_element_ptr(context, builder, sig.args[0], args[0], args[1]))
        return _splat(builder, word, context.get_value_type(_U64x8))

    return _U64x8(arr, index), codegen


@intrinsic
def _vsplat_quad(typingctx, arr, index):
    """The 4 bytes ``arr.flat[index:index+4]`` (int8) repeated in all 16 dword lanes."""
    if not _is_c_array(arr, types.int8):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        quad = builder.load(builder.bitcast(ptr, _I32.as_pointer()), align=1)
        return builder.bitcast(_splat(builder, quad, ir.VectorType(_I32, 16)), context.get_value_type(_U8x64))

    return _U8x64(arr, index), codegen


@intrinsic
def _vzeros_u64(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(context.get_value_type(_U64x8), [0] * 8)

    return _U64x8(), codegen


@intrinsic
def _vzeros_i32(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(context.get_value_type(_I32x16), [0] * 16)

    return _I32x16(), codegen


@intrinsic
def _xor_popcount_add(typingctx, acc, a, w):
    """``acc + popcount(a XOR w)`` in each of 8 uint64 lanes (``vpxorq, vpopcntq, vpaddq``)."""
    if not (acc == a == w == _U64x8):
        return None

    def codegen(context, builder, sig, args):
        acc, a, w = args
        x = builder.xor(a, w)
        ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(x.type, [x.type]), "llvm.ctpop.v8i64")
        return builder.add(acc, builder.call(ctpop, [x]))

    return _U64x8(acc, a, w), codegen


@intrinsic
def _vand(typingctx, packed, mask):
    """``packed & mask`` in each of 64 byte lanes: the lowest code field of every byte."""
    if packed != _U8x64 or not isinstance(mask, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.and_(args[0], _splat(builder, _as_int(builder, args[1], 8), args[0].type))

    return _U8x64(packed, mask), codegen


@intrinsic
def _vshr(typingctx, packed, shift):
    """``packed >> shift`` (logical) in each of 64 byte lanes: brings the next field down."""
    if packed != _U8x64 or not isinstance(shift, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.lshr(args[0], _splat(builder, _as_int(builder, args[1], 8), args[0].type))

    return _U8x64(packed, shift), codegen


def _dpbusd_ir(builder, acc, u8, s8, use_vnni: bool):
    """acc[i] + sum_{j<4} u8[4i+j] * s8[4i+j] for 16 int32 lanes i (u8 unsigned, s8 signed)."""
    v16 = ir.VectorType(_I32, 16)
    if use_vnni:
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(v16, [v16, v16, v16]), "llvm.x86.avx512.vpdpbusd.512"
        )
        return builder.call(fn, [acc, builder.bitcast(u8, v16), builder.bitcast(s8, v16)])
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
def _store_xnor(typingctx, out, index, acc, k):
    """``out.flat[index:index+8] = k - 2 * acc`` (int32), the XNOR dot from popcounts."""
    if not (_is_c_array(out, types.int32) and acc == _U64x8 and isinstance(k, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v8 = ir.VectorType(_I32, 8)
        ptr = builder.bitcast(_element_ptr(context, builder, sig.args[0], args[0], args[1]), v8.as_pointer())
        popcounts = builder.trunc(args[2], v8)
        dots = builder.sub(_splat(builder, _as_int(builder, args[3], 32), v8), builder.shl(popcounts, ir.Constant(v8, [1] * 8)))
        builder.store(dots, ptr, align=1)
        return context.get_dummy_value()

    return types.none(out, index, acc, k), codegen


@intrinsic
def _store_affine(typingctx, out, index, acc, mult, offset):
    """``out.flat[index:index+16] = mult * acc - offset`` (int32): the dot from code sums."""
    if not (_is_c_array(out, types.int32) and acc == _I32x16):
        return None
    if not (isinstance(mult, types.Integer) and isinstance(offset, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v16 = ir.VectorType(_I32, 16)
        ptr = builder.bitcast(_element_ptr(context, builder, sig.args[0], args[0], args[1]), v16.as_pointer())
        mult, offset = (_splat(builder, _as_int(builder, v, 32), v16) for v in args[3:])
        builder.store(builder.sub(builder.mul(args[2], mult), offset), ptr, align=1)
        return context.get_dummy_value()

    return types.none(out, index, acc, mult, offset), codegen


@intrinsic
def _vstore(typingctx, arr, index, vec):
    """``arr.flat[index : index+64] = vec`` for a uint8 array and 64 byte lanes."""
    if not (_is_c_array(arr, types.uint8) and vec == _U8x64):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(ptr, args[2].type.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.none(arr, index, vec), codegen


# --------------------------------------------------------------------------- prepacked layouts

_W1A1_COLS = 32  # columns per tile: 4 vectors of 8 uint64 lanes
_A8_COLS = 64  # columns per tile: 4 vectors of 16 int32 lanes
_A8_GROUP = {"w1a8": 32, "w1.58a8": 16}  # k per 64-byte vector: 16 columns x 4 bytes x (8 / bits) fields
_CODE_BITS = {"w1a8": 1, "w1.58a8": 2}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, eq=False)
class PackedWeights:
    """A weight matrix ``W [n, k]`` in the tiled layout one kernel family reads.

    Build it with ``prepack_w1a1``, ``prepack_w1a8`` or ``prepack_w158a8``; the kernels refuse
    anything else (so unpacked weights cannot be read as packed ones by mistake).

    Layouts (columns beyond n and k are zero-padding, never read back as results):

    - ``"w1a1"``: ``uint64 [ceil(n/32), ceil(k/64), 32]``: tile ``t``, word ``i``, lane ``c`` is
      word ``i`` of row ``32t + c`` of ``pack_binary_rows(W)`` (so 8 consecutive lanes are one
      512-bit load: the same word of 8 output columns).
    - ``"w1a8"``: ``uint8 [ceil(n/64), ceil(k/32), 4, 64]``: tile ``t``, group ``g``, vector ``v``,
      byte ``4l + j`` holds in bit ``q`` the weight bit of column ``64t + 16v + l`` at
      ``k = 32g + 4q + j`` (+1 -> 1, -1 -> 0).
    - ``"w1.58a8"``: ``uint8 [ceil(n/64), ceil(k/16), 4, 64]``: as w1a8 with 2-bit fields: bits
      ``2q, 2q+1`` of byte ``4l + j`` hold ``w + 1`` of column ``64t + 16v + l`` at
      ``k = 16g + 4q + j``.

    In the A8 layouts byte ``4l + j`` sits in int32 lane ``l``, so one ``vpdpbusd`` against 4
    broadcast activation bytes ``a[k..k+3]`` adds 4 products to each of 16 output columns.
    """

    scheme: str
    n: int
    k: int
    data: np.ndarray

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        for name in ("n", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.data, np.ndarray) or not self.data.flags.c_contiguous:
            raise TypeError("data must be a C-contiguous numpy array (build PackedWeights with prepack_*)")
        expected = _tile_shape(self.scheme, self.n, self.k)
        dtype = np.uint64 if self.scheme == "w1a1" else np.uint8
        if self.data.dtype != dtype or self.data.shape != expected:
            raise ValueError(
                f"{self.scheme} data must be {np.dtype(dtype).name} {expected} for n={self.n}, k={self.k}, "
                f"got {self.data.dtype} {self.data.shape}"
            )

    @property
    def nbytes(self) -> int:
        """Bytes of the tiles (padding included)."""
        return int(self.data.nbytes)

    @property
    def bits_per_weight(self) -> int:
        """Storage bits per weight: 1 (binary) or 2 (ternary)."""
        return 2 if self.scheme == "w1.58a8" else 1


def _tile_shape(scheme: str, n: int, k: int) -> tuple[int, ...]:
    if scheme == "w1a1":
        return (_ceil_div(n, _W1A1_COLS), _ceil_div(k, 64), _W1A1_COLS)
    return (_ceil_div(n, _A8_COLS), _ceil_div(k, _A8_GROUP[scheme]), 4, 64)


def _as_array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got device {x.device}")
        return x.detach().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{name} must be a numpy array or a CPU torch tensor, got {type(x).__name__}")


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive int (the number of input features), got {k!r}")
    return int(k)


def _binary_rows(w_rows: Any, k: int) -> np.ndarray:
    """Validated ``uint64 [N, ceil(k/64)]`` rows of ``pack_binary_rows`` (padding bits zero)."""
    rows = _as_array(w_rows, "w_rows")
    if rows.dtype != np.uint64:
        raise TypeError(
            f"w_rows must be uint64 words from packing.pack_binary_rows, got dtype {rows.dtype} "
            "(pack ±1 signs with pack_binary_rows first)"
        )
    if rows.ndim != 2 or rows.shape[0] < 1 or rows.shape[1] != _ceil_div(k, 64):
        raise ValueError(
            f"w_rows must have shape [N, ceil(k/64)] = [N, {_ceil_div(k, 64)}] for k={k}, got {rows.shape}"
        )
    _check_padding_bits(rows, k, "w_rows")
    return rows


def _check_padding_bits(rows: np.ndarray, k: int, name: str) -> None:
    if k % 64 and rows.shape[0] and (rows[..., -1] >> np.uint64(k % 64)).any():
        raise ValueError(f"{name} has nonzero padding bits beyond column {k}: is k right?")


def prepack_w1a1(w_rows: Any, k: int) -> PackedWeights:
    """Tile binary weights for the XNOR/popcount kernels.

    Args:
        w_rows: ``uint64 [N, ceil(k/64)]``, ``packing.pack_binary_rows(W)`` of ±1 weights.
        k: the true number of input features K.

    Returns:
        PackedWeights("w1a1"), data ``uint64 [ceil(N/32), ceil(k/64), 32]``.
    """
    k = _check_k(k)
    rows = _binary_rows(w_rows, k)
    n, words = rows.shape
    tiles = np.zeros((_ceil_div(n, _W1A1_COLS) * _W1A1_COLS, words), dtype=np.uint64)
    tiles[:n] = rows
    data = np.ascontiguousarray(tiles.reshape(-1, _W1A1_COLS, words).transpose(0, 2, 1))
    return PackedWeights("w1a1", n, k, data)


def _tile_codes(codes: np.ndarray, scheme: str, pad_code: int) -> np.ndarray:
    """Unsigned codes ``[N, K]`` -> the A8 tile layout (see PackedWeights)."""
    n, k = codes.shape
    bits, group = _CODE_BITS[scheme], _A8_GROUP[scheme]
    fields = 8 // bits  # code fields per byte
    tiles, groups = _ceil_div(n, _A8_COLS), _ceil_div(k, group)
    padded = np.full((tiles * _A8_COLS, groups * group), pad_code, dtype=np.uint8)
    padded[:n, :k] = codes
    # column = 64t + 16v + l, k = group*g + 4q + j  ->  [t, g, v, l, j, q]
    blocks = padded.reshape(tiles, 4, 16, groups, fields, 4).transpose(0, 3, 1, 2, 5, 4)
    shifts = (np.arange(fields, dtype=np.uint8) * bits).reshape(1, 1, 1, 1, 1, fields)
    packed = np.bitwise_or.reduce(blocks << shifts, axis=-1)
    return np.ascontiguousarray(packed.reshape(tiles, groups, 4, 64))


def prepack_w1a8(w_rows: Any, k: int) -> PackedWeights:
    """Tile binary weights for the binary x int8 (VNNI) kernels.

    Args:
        w_rows: ``uint64 [N, ceil(k/64)]``, ``packing.pack_binary_rows(W)`` of ±1 weights.
        k: the true number of input features K.

    Returns:
        PackedWeights("w1a8"), data ``uint8 [ceil(N/64), ceil(k/32), 4, 64]`` (1 bit per weight).
    """
    k = _check_k(k)
    signs = packing.unpack_binary_rows(_binary_rows(w_rows, k), k)
    return PackedWeights("w1a8", signs.shape[0], k, _tile_codes((signs > 0).view(np.uint8), "w1a8", 0))


def prepack_w158a8(trits: Any) -> PackedWeights:
    """Tile ternary weights for the ternary x int8 (VNNI) kernels.

    Args:
        trits: ``[N, K]`` integer codes in {-1, 0, +1} (numpy or torch, e.g. the codes of
            ``BitLinear.quantized_weight()``).

    Returns:
        PackedWeights("w1.58a8"), data ``uint8 [ceil(N/64), ceil(K/16), 4, 64]`` (2 bits per weight).
    """
    codes = _as_array(trits, "trits")
    if codes.dtype.kind not in "iu" or codes.dtype == np.uint64:
        raise TypeError(f"trits must be an integer array of -1, 0, +1, got dtype {codes.dtype}")
    if codes.ndim != 2 or min(codes.shape) < 1:
        raise ValueError(f"trits must be a non-empty 2-D [N, K] matrix, got shape {codes.shape}")
    if ((codes < -1) | (codes > 1)).any():
        bad = codes[(codes < -1) | (codes > 1)].flat[0]
        raise ValueError(f"trits must hold only -1, 0, +1, found {bad}")
    c = (codes.astype(np.int16) + 1).astype(np.uint8)
    return PackedWeights("w1.58a8", codes.shape[0], codes.shape[1], _tile_codes(c, "w1.58a8", 1))


# --------------------------------------------------------------------------- the kernels

_ROWS_PER_TASK = 128  # rows of activations per parallel task (multiple of 4)
_PANEL_MIN_ROWS = 16  # from this many rows per task, decode the weight tile once (A8 kernels)


@njit(cache=True, boundscheck=False, error_model="numpy")
def w1a1_gemm_simple(x_rows, w_rows, k):  # pragma: no cover - compiled
    """The plain triple loop with scalar ``ctpop``: uint64 [M, Kw] x [N, Kw] -> int32 [M, N].

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


_INLINE = {"cache": True, "boundscheck": False, "error_model": "numpy", "inline": "always"}


@njit(**_INLINE)
def _xnor_step(c0, c1, c2, c3, a, w0, w1, w2, w3):  # pragma: no cover - compiled
    """One activation word ``a`` (broadcast) against 4 weight vectors: 4 accumulators updated."""
    return (_xor_popcount_add(c0, a, w0), _xor_popcount_add(c1, a, w1),
            _xor_popcount_add(c2, a, w2), _xor_popcount_add(c3, a, w3))  # fmt: skip


@njit(**_INLINE)
def _store_xnor4(out, o, k, c0, c1, c2, c3):  # pragma: no cover - compiled
    """out.flat[o : o+32] = k - 2 * (c0 | c1 | c2 | c3): one row of a 32-column tile."""
    _store_xnor(out, o, c0, k)
    _store_xnor(out, o + 8, c1, k)
    _store_xnor(out, o + 16, c2, k)
    _store_xnor(out, o + 24, c3, k)


@njit(**_INLINE)
def _w1a1_tile4(x, w, out, r, t, k):  # pragma: no cover - compiled
    """Rows r..r+3 x columns 32t..32t+31: 16 accumulators of 8 lanes; per word, 4 weight loads
    and 4 activation broadcasts feed 16 xor-popcount-adds."""
    words, cols = x.shape[1], out.shape[1]
    c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = _vzeros_u64()
    c20 = c21 = c22 = c23 = c30 = c31 = c32 = c33 = _vzeros_u64()
    for i in range(words):
        base = (t * words + i) * 32
        w0, w1, w2, w3 = _vload(w, base), _vload(w, base + 8), _vload(w, base + 16), _vload(w, base + 24)
        c00, c01, c02, c03 = _xnor_step(c00, c01, c02, c03, _vsplat_word(x, r * words + i), w0, w1, w2, w3)
        c10, c11, c12, c13 = _xnor_step(c10, c11, c12, c13, _vsplat_word(x, (r + 1) * words + i), w0, w1, w2, w3)
        c20, c21, c22, c23 = _xnor_step(c20, c21, c22, c23, _vsplat_word(x, (r + 2) * words + i), w0, w1, w2, w3)
        c30, c31, c32, c33 = _xnor_step(c30, c31, c32, c33, _vsplat_word(x, (r + 3) * words + i), w0, w1, w2, w3)
    o = r * cols + 32 * t
    _store_xnor4(out, o, k, c00, c01, c02, c03)
    _store_xnor4(out, o + cols, k, c10, c11, c12, c13)
    _store_xnor4(out, o + 2 * cols, k, c20, c21, c22, c23)
    _store_xnor4(out, o + 3 * cols, k, c30, c31, c32, c33)


@njit(**_INLINE)
def _w1a1_tile1(x, w, out, r, t, k):  # pragma: no cover - compiled
    """Row r x columns 32t..32t+31 (the GEMV, and the rows left over by _w1a1_tile4)."""
    words, cols = x.shape[1], out.shape[1]
    c0 = c1 = c2 = c3 = _vzeros_u64()
    for i in range(words):
        base = (t * words + i) * 32
        w0, w1, w2, w3 = _vload(w, base), _vload(w, base + 8), _vload(w, base + 16), _vload(w, base + 24)
        c0, c1, c2, c3 = _xnor_step(c0, c1, c2, c3, _vsplat_word(x, r * words + i), w0, w1, w2, w3)
    _store_xnor4(out, r * cols + 32 * t, k, c0, c1, c2, c3)


@njit(**_INLINE)
def _w1a1_body(x, w, k, out):  # pragma: no cover - compiled
    """x uint64 [M, Kw] (pack_binary_rows), w uint64 [T, Kw, 32] -> out int32 [M, 32T].

    Tasks are (column tile, chunk of rows) pairs, so a thread reuses one weight tile over its
    rows and even a single row (GEMV) splits over the threads.
    """
    m = x.shape[0]
    chunks = (m + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(w.shape[0] * chunks):
        t, lo = task // chunks, (task % chunks) * _ROWS_PER_TASK
        hi = min(lo + _ROWS_PER_TASK, m)
        r = lo
        while r + 4 <= hi:
            _w1a1_tile4(x, w, out, r, t, k)
            r += 4
        while r < hi:
            _w1a1_tile1(x, w, out, r, t, k)
            r += 1


@njit(cache=True, boundscheck=False, error_model="numpy", parallel=True)
def _w1a1_parallel(x, w, k, out):  # pragma: no cover - compiled
    _w1a1_body(x, w, k, out)


@njit(cache=True, boundscheck=False, error_model="numpy")
def _w1a1_serial(x, w, k, out):  # pragma: no cover - compiled
    _w1a1_body(x, w, k, out)


@njit(**_INLINE)
def _dot_step(c0, c1, c2, c3, a, w0, w1, w2, w3):  # pragma: no cover - compiled
    """4 activation bytes ``a`` (broadcast) against 4 vectors of decoded codes: 4 vpdpbusd."""
    return _dpbusd(c0, w0, a), _dpbusd(c1, w1, a), _dpbusd(c2, w2, a), _dpbusd(c3, w3, a)


@njit(**_INLINE)
def _store_affine4(out, o, mult, offset, c0, c1, c2, c3):  # pragma: no cover - compiled
    """out.flat[o : o+64] = mult * (c0 | c1 | c2 | c3) - offset: one row of a 64-column tile."""
    _store_affine(out, o, c0, mult, offset)
    _store_affine(out, o + 16, c1, mult, offset)
    _store_affine(out, o + 32, c2, mult, offset)
    _store_affine(out, o + 48, c3, mult, offset)


@njit(**_INLINE)
def _a8_tile4(x, w, out, r, t, rowsum, bits, mult):  # pragma: no cover - compiled
    """Rows r..r+3 x columns 64t..64t+63 of ``mult * sum(code * x) - rowsum``.

    Each 64-byte weight vector holds 8/bits fields of codes (16 columns x 4 k each): take the
    low field of every byte (``& mask``), one vpdpbusd per row against that row's 4 broadcast
    activation bytes, then shift the next field down.
    """
    kp, groups, cols = x.shape[1], w.shape[1], out.shape[1]
    fields, mask = 8 // bits, (1 << bits) - 1
    c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = _vzeros_i32()
    c20 = c21 = c22 = c23 = c30 = c31 = c32 = c33 = _vzeros_i32()
    for g in range(groups):
        base = (t * groups + g) * 256
        p0, p1, p2, p3 = _vload(w, base), _vload(w, base + 64), _vload(w, base + 128), _vload(w, base + 192)
        for q in range(fields):
            w0, w1, w2, w3 = _vand(p0, mask), _vand(p1, mask), _vand(p2, mask), _vand(p3, mask)
            kk = 4 * (fields * g + q)
            c00, c01, c02, c03 = _dot_step(c00, c01, c02, c03, _vsplat_quad(x, r * kp + kk), w0, w1, w2, w3)
            c10, c11, c12, c13 = _dot_step(c10, c11, c12, c13, _vsplat_quad(x, (r + 1) * kp + kk), w0, w1, w2, w3)
            c20, c21, c22, c23 = _dot_step(c20, c21, c22, c23, _vsplat_quad(x, (r + 2) * kp + kk), w0, w1, w2, w3)
            c30, c31, c32, c33 = _dot_step(c30, c31, c32, c33, _vsplat_quad(x, (r + 3) * kp + kk), w0, w1, w2, w3)
            p0, p1, p2, p3 = _vshr(p0, bits), _vshr(p1, bits), _vshr(p2, bits), _vshr(p3, bits)
    o = r * cols + 64 * t
    _store_affine4(out, o, mult, rowsum[r], c00, c01, c02, c03)
    _store_affine4(out, o + cols, mult, rowsum[r + 1], c10, c11, c12, c13)
    _store_affine4(out, o + 2 * cols, mult, rowsum[r + 2], c20, c21, c22, c23)
    _store_affine4(out, o + 3 * cols, mult, rowsum[r + 3], c30, c31, c32, c33)


@njit(**_INLINE)
def _a8_tile1(x, w, out, r, t, rowsum, bits, mult):  # pragma: no cover - compiled
    """Row r x columns 64t..64t+63 (the GEMV, and the rows left over by _a8_tile4)."""
    kp, groups, cols = x.shape[1], w.shape[1], out.shape[1]
    fields, mask = 8 // bits, (1 << bits) - 1
    c0 = c1 = c2 = c3 = _vzeros_i32()
    for g in range(groups):
        base = (t * groups + g) * 256
        p0, p1, p2, p3 = _vload(w, base), _vload(w, base + 64), _vload(w, base + 128), _vload(w, base + 192)
        for q in range(fields):
            w0, w1, w2, w3 = _vand(p0, mask), _vand(p1, mask), _vand(p2, mask), _vand(p3, mask)
            c0, c1, c2, c3 = _dot_step(c0, c1, c2, c3, _vsplat_quad(x, r * kp + 4 * (fields * g + q)), w0, w1, w2, w3)
            p0, p1, p2, p3 = _vshr(p0, bits), _vshr(p1, bits), _vshr(p2, bits), _vshr(p3, bits)
    _store_affine4(out, r * cols + 64 * t, mult, rowsum[r], c0, c1, c2, c3)


@njit(**_INLINE)
def _a8_decode_panel(w, t, bits, panel):  # pragma: no cover - compiled
    """Decode column tile t once into ``panel`` (uint8, one code per byte, 4 vectors per step
    of 4 k), so the rows of a whole task reuse it without decoding again."""
    groups, fields, mask = w.shape[1], 8 // bits, (1 << bits) - 1
    for g in range(groups):
        base = (t * groups + g) * 256
        for v in range(4):
            p = _vload(w, base + 64 * v)
            for q in range(fields):
                _vstore(panel, ((g * fields + q) * 4 + v) * 64, _vand(p, mask))
                p = _vshr(p, bits)


@njit(**_INLINE)
def _a8_tile4_decoded(x, panel, out, r, t, rowsum, mult):  # pragma: no cover - compiled
    """_a8_tile4 on a decoded panel: per step of 4 k, 4 loads and 16 vpdpbusd, no decode."""
    kp, cols = x.shape[1], out.shape[1]
    c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = _vzeros_i32()
    c20 = c21 = c22 = c23 = c30 = c31 = c32 = c33 = _vzeros_i32()
    for j in range(kp // 4):
        base = j * 256
        w0, w1, w2, w3 = _vload(panel, base), _vload(panel, base + 64), _vload(panel, base + 128), _vload(panel, base + 192)
        kk = 4 * j
        c00, c01, c02, c03 = _dot_step(c00, c01, c02, c03, _vsplat_quad(x, r * kp + kk), w0, w1, w2, w3)
        c10, c11, c12, c13 = _dot_step(c10, c11, c12, c13, _vsplat_quad(x, (r + 1) * kp + kk), w0, w1, w2, w3)
        c20, c21, c22, c23 = _dot_step(c20, c21, c22, c23, _vsplat_quad(x, (r + 2) * kp + kk), w0, w1, w2, w3)
        c30, c31, c32, c33 = _dot_step(c30, c31, c32, c33, _vsplat_quad(x, (r + 3) * kp + kk), w0, w1, w2, w3)
    o = r * cols + 64 * t
    _store_affine4(out, o, mult, rowsum[r], c00, c01, c02, c03)
    _store_affine4(out, o + cols, mult, rowsum[r + 1], c10, c11, c12, c13)
    _store_affine4(out, o + 2 * cols, mult, rowsum[r + 2], c20, c21, c22, c23)
    _store_affine4(out, o + 3 * cols, mult, rowsum[r + 3], c30, c31, c32, c33)


@njit(**_INLINE)
def _a8_body(x, w, rowsum, out, bits, mult):  # pragma: no cover - compiled
    m = x.shape[0]
    chunks = (m + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(w.shape[0] * chunks):
        t, lo = task // chunks, (task % chunks) * _ROWS_PER_TASK
        hi = min(lo + _ROWS_PER_TASK, m)
        r = lo
        if hi - lo >= _PANEL_MIN_ROWS:
            panel = np.empty(x.shape[1] * 64, dtype=np.uint8)
            _a8_decode_panel(w, t, bits, panel)
            while r + 4 <= hi:
                _a8_tile4_decoded(x, panel, out, r, t, rowsum, mult)
                r += 4
        while r + 4 <= hi:
            _a8_tile4(x, w, out, r, t, rowsum, bits, mult)
            r += 4
        while r < hi:
            _a8_tile1(x, w, out, r, t, rowsum, bits, mult)
            r += 1


@njit(cache=True, boundscheck=False, error_model="numpy", parallel=True)
def _w1a8_parallel(x, w, rowsum, out):  # pragma: no cover - compiled
    """x int8 [M, 32G], w uint8 [T, G, 4, 64] (1-bit codes b) -> out int32 [M, 64T] = 2·Σ b·x − Σ x."""
    _a8_body(x, w, rowsum, out, 1, 2)


@njit(cache=True, boundscheck=False, error_model="numpy")
def _w1a8_serial(x, w, rowsum, out):  # pragma: no cover - compiled
    _a8_body(x, w, rowsum, out, 1, 2)


@njit(cache=True, boundscheck=False, error_model="numpy", parallel=True)
def _w158a8_parallel(x, w, rowsum, out):  # pragma: no cover - compiled
    """x int8 [M, 16G], w uint8 [T, G, 4, 64] (2-bit codes c = w+1) -> out int32 [M, 64T] = Σ c·x − Σ x."""
    _a8_body(x, w, rowsum, out, 2, 1)


@njit(cache=True, boundscheck=False, error_model="numpy")
def _w158a8_serial(x, w, rowsum, out):  # pragma: no cover - compiled
    _a8_body(x, w, rowsum, out, 2, 1)


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


@njit(cache=True, boundscheck=False, error_model="numpy")
def _pack_signs(x):  # pragma: no cover - compiled
    """float [M, K] -> uint64 [M, ceil(K/64)]: bit k%64 of word k//64 is 1 where x >= 0.

    ``pack_binary_rows`` of ``sign(x)`` (0 -> +1) in one pass, for the W1A1 activations.
    """
    m, k = x.shape
    words = (k + 63) // 64
    out = np.empty((m, words), dtype=np.uint64)
    for r in range(m):
        for w in range(words):
            word = np.uint64(0)
            for b in range(min(64, k - 64 * w)):
                word |= np.uint64(x[r, 64 * w + b] >= 0) << np.uint64(b)
            out[r, w] = word
    return out


_KERNELS = {"w1a1": _w1a1_parallel, "w1a8": _w1a8_parallel, "w1.58a8": _w158a8_parallel}
_SERIAL = {"w1a1": _w1a1_serial, "w1a8": _w1a8_serial, "w1.58a8": _w158a8_serial}
# Below this many multiply-adds one thread finishes before a parallel region pays for itself
# (starting and joining Numba's threads costs ~3 us; measured crossovers on 2 cores: ~5M
# binary MACs, ~1M int8 MACs).
_PARALLEL_MIN_MACS = {"w1a1": 1 << 23, "w1a8": 1 << 20, "w1.58a8": 1 << 20}


def _launch(scheme: str, w: PackedWeights, m: int, threads: int | None, *args: Any) -> None:
    """Run the scheme's kernel: serial for one thread or little work, else parallel on
    ``threads`` threads (Numba's current setting when None)."""
    _check_threads(threads)
    current = numba.get_num_threads()
    wanted = current if threads is None else int(threads)
    if wanted == 1 or m * w.n * w.k < _PARALLEL_MIN_MACS[scheme]:
        _SERIAL[scheme](*args)
    elif wanted == current:
        _KERNELS[scheme](*args)
    else:
        numba.set_num_threads(wanted)
        try:
            _KERNELS[scheme](*args)
        finally:
            numba.set_num_threads(current)


# --------------------------------------------------------------------------- public API


def _check_threads(threads: Any) -> None:
    limit = numba.config.NUMBA_NUM_THREADS
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or not 1 <= threads <= limit
    ):
        raise ValueError(f"threads must be an int in [1, {limit}] (NUMBA_NUM_THREADS) or None, got {threads!r}")


def _check_packed(w: Any, scheme: str, fn: str) -> PackedWeights:
    if not isinstance(w, PackedWeights):
        builder = {"w1a1": "prepack_w1a1(rows, k)", "w1a8": "prepack_w1a8(rows, k)", "w1.58a8": "prepack_w158a8(trits)"}
        raise TypeError(
            f"{fn}: w must be PackedWeights from {builder[scheme]}, got {type(w).__name__}"
            + (f" {w.dtype} {w.shape}" if isinstance(w, np.ndarray) else "")
        )
    if w.scheme != scheme:
        raise ValueError(f"{fn}: w was prepacked for {w.scheme!r}, this kernel reads {scheme!r}")
    return w


def _check_activations(x: Any, dtype: type, width: int, fn: str, what: str) -> np.ndarray:
    """A C-contiguous 2-D ``dtype`` array [M, width], or a clear error."""
    array = _as_array(x, "x")
    if array.dtype != dtype:
        raise TypeError(f"{fn}: x must be {np.dtype(dtype).name} ({what}), got dtype {array.dtype}")
    if array.ndim != 2 or array.shape[1] != width:
        raise ValueError(f"{fn}: x must have shape [M, {width}] ({what}), got {array.shape}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{fn}: x must be C-contiguous (use np.ascontiguousarray), got strides {array.strides}")
    return array


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


# --------------------------------------------------------------------------- assembly


_SIGNATURES = {
    "w1a1": "void(uint64[:, ::1], uint64[:, :, ::1], int64, int32[:, ::1])",
    "w1a8": "void(int8[:, ::1], uint8[:, :, :, ::1], int32[::1], int32[:, ::1])",
    "w1.58a8": "void(int8[:, ::1], uint8[:, :, :, ::1], int32[::1], int32[:, ::1])",
}


def _dispatcher(kernel: Any) -> Any:
    """The Numba dispatcher behind ``kernel``: a dispatcher, or a public function / scheme name
    (whose parallel kernel is compiled, or loaded from the cache, if it has not been yet)."""
    named = {w1a1_gemm: "w1a1", w1a1_gemv: "w1a1", w1a8_gemm: "w1a8", w1a8_gemv: "w1a8",
             w158a8_gemm: "w1.58a8", w158a8_gemv: "w1.58a8"}  # fmt: skip
    if isinstance(kernel, str) or kernel in named:
        scheme = named.get(kernel, kernel)
        if scheme not in _KERNELS:
            raise ValueError(f"kernel name must be one of {SCHEMES}, got {kernel!r}")
        if not _KERNELS[scheme].signatures:
            _KERNELS[scheme].compile(_SIGNATURES[scheme])
        return _KERNELS[scheme]
    if not hasattr(kernel, "inspect_asm"):
        raise TypeError(f"kernel must be a Numba dispatcher, a kernel function or a scheme name, got {kernel!r}")
    return kernel


def asm_lines(kernel: Any, pattern: str) -> list[str]:
    """Lines of the kernel's x86 assembly whose instruction matches the regex ``pattern``.

    ``kernel``: one of the public kernel functions, a scheme name ("w1a1", "w1a8", "w1.58a8"),
    or any Numba dispatcher compiled at least once (its first signature is used). Numba keeps
    no assembly for code loaded from its on-disk cache, so such a kernel is compiled once more,
    uncached, to print it (a few seconds).
    """
    dispatcher = _dispatcher(kernel)
    if not dispatcher.signatures:
        raise ValueError(f"{dispatcher.__name__} has not been compiled yet: call it once first")
    signature = dispatcher.signatures[0]
    if getattr(dispatcher.overloads[signature].library, "_disable_inspection", False):  # from the cache
        options = {key: v for key, v in dispatcher.targetoptions.items() if key != "nopython"}
        dispatcher = njit(**options)(dispatcher.py_func)
        dispatcher.compile(signature)
    asm = dispatcher.inspect_asm(signature)
    regex = re.compile(pattern)
    return [line.strip() for line in asm.splitlines() if regex.search(line.split("#")[0])]


def popcount_asm_lines(kernel: Any) -> list[str]:
    """The ``popcnt`` / ``vpopcnt[bwdq]`` instructions in ``kernel``'s assembly (see asm_lines)."""
    return asm_lines(kernel, r"^\s*v?popcnt[bwdq]?\b")


def vnni_asm_lines(kernel: Any) -> list[str]:
    """The ``vpdpbusd`` / ``vpmaddubsw`` / ``vpmaddwd`` instructions in ``kernel``'s assembly."""
    return asm_lines(kernel, r"^\s*(vpdpbusds?|vpmaddubsw|vpmaddwd)\b")


# --------------------------------------------------------------------------- the packed layer

ACT_MODES = ("int8", "binary")


class PackedBitLinear(nn.Module):
    """Inference-only BitLinear on packed weights and integer kernels (CPU).

    The forward pass, for x ``[..., in_features]`` (float)::

        x -> norm (the BitLinear's, if any)
          -> act "int8":   codes_x, s_x = per-token absmax (quant.quantize_activations_absmax)
             act "binary": codes_x = sign(x) (0 -> +1), s_x = mean|x| per token      (W1A1)
          -> y = kernel(codes_x, W_packed) * s_x * s_W + bias        (int32 dot, scaled once)

    With act "int8" this equals the BitLinear's fake-quantized forward up to float rounding
    (the integer matmul is exact; BitLinear multiplies the same codes in floating point).
    act "binary" needs binary weights and is the fully binary W1A1 layer: it is *not* what a
    BitLinear with 8-bit activations computes.

    Buffers: ``packed`` (the kernel tiles as bytes), ``weight_scale`` (float32 [] or [out]),
    ``bias`` (float32 [out] or None). Output dtype = input dtype.
    """

    def __init__(
        self,
        weights: PackedWeights,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        norm: nn.Module | None = None,
        act: str = "int8",
        act_bits: int = 8,
        eps: float = 1e-5,
        threads: int | None = None,
    ) -> None:
        """Args:
        weights: PackedWeights of W [out_features, in_features]: "w1a8" or "w1.58a8" for act
            "int8", "w1a1" for act "binary".
        weight_scale: s_W, float, one element (per tensor) or out_features (per channel).
        bias: float [out_features] or None.
        norm: applied to x before activation quantization (a copy of the BitLinear's), or None.
        act: "int8" (per-token absmax, ``act_bits`` bits, ``eps``) or "binary" (sign, mean|x|).
        threads: Numba threads for the kernel (None: Numba's current setting).
        """
        super().__init__()
        if not isinstance(weights, PackedWeights):
            raise TypeError(f"weights must be PackedWeights, got {type(weights).__name__}")
        if act not in ACT_MODES:
            raise ValueError(f"act must be one of {ACT_MODES}, got {act!r}")
        schemes = ("w1a1",) if act == "binary" else ("w1a8", "w1.58a8")
        if weights.scheme not in schemes:
            raise ValueError(f"act={act!r} needs weights prepacked for {schemes}, got {weights.scheme!r}")
        if act == "int8" and (isinstance(act_bits, bool) or not isinstance(act_bits, numbers.Integral)
                              or not 2 <= act_bits <= 8):  # fmt: skip
            raise ValueError(f"act_bits must be an int in [2, 8] for the int8 kernels, got {act_bits!r}")
        _check_threads(threads)
        scale = torch.as_tensor(weight_scale, dtype=torch.float32).detach().cpu()
        if scale.numel() not in (1, weights.n):
            raise ValueError(f"weight_scale must have 1 or out_features={weights.n} elements, got {tuple(scale.shape)}")
        if bias is not None:
            bias = torch.as_tensor(bias, dtype=torch.float32).detach().cpu().reshape(-1).clone()
            if bias.numel() != weights.n:
                raise ValueError(f"bias must have out_features={weights.n} elements, got {bias.numel()}")
        self.in_features, self.out_features = weights.k, weights.n
        self.weights, self.act, self.act_bits, self.eps = weights, act, int(act_bits), float(eps)
        self.threads = threads
        self.norm = norm
        self.register_buffer("packed", torch.from_numpy(weights.data.view(np.uint8)))  # shares memory
        self.register_buffer("weight_scale", scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1))
        self.register_buffer("bias", bias)

    @classmethod
    def from_bitlinear(cls, layer: BitLinear, *, act: str | None = None, threads: int | None = None) -> PackedBitLinear:
        """Pack a trained BitLinear (weight_bits 1 or 1.58; act_bits 2..8, or 1 for W1A1).

        ``act`` None follows the layer: "binary" when its act_bits is 1 (then the packed layer
        equals the BitLinear's forward), else "int8". ``act="binary"`` on a layer trained with
        multi-bit activations is allowed (what-if: binarize a W1A8 model's inputs) but is *not* the
        function that layer computes."""
        if not isinstance(layer, BitLinear):
            raise TypeError(f"layer must be a BitLinear, got {type(layer).__name__}")
        cfg = layer.config
        if act is None:
            act = "binary" if cfg.act_bits == 1 else "int8"
        if act not in ACT_MODES:
            raise ValueError(f"act must be one of {ACT_MODES} or None, got {act!r}")
        if cfg.weight_bits not in (1, 1.58):
            raise ValueError(f"packed kernels need weight_bits 1 or 1.58, got {cfg.weight_bits!r}")
        if act == "int8" and (cfg.act_bits is None or not 2 <= cfg.act_bits <= 8):
            raise ValueError(f"act 'int8' needs a BitLinear with act_bits in [2, 8], got {cfg.act_bits!r}")
        if act == "binary" and cfg.weight_bits != 1:
            raise ValueError(f"act 'binary' (W1A1) needs binary weights (weight_bits 1), got {cfg.weight_bits!r}")
        if layer.quant_strength != 1:
            raise ValueError(f"packing needs a fully quantized layer (quant_strength 1), got {layer.quant_strength}")
        codes, scale = layer.quantized_weight()
        codes = codes.cpu()
        if cfg.weight_bits == 1.58:
            weights = prepack_w158a8(codes)
        else:
            rows = packing.pack_binary_rows(codes)
            weights = (prepack_w1a1 if act == "binary" else prepack_w1a8)(rows, layer.in_features)
        norm = copy.deepcopy(layer.norm).cpu().float() if layer.norm is not None else None
        bias = layer.bias.detach().float() if layer.bias is not None else None
        act_bits = cfg.act_bits if act == "int8" else 8
        return cls(weights, scale, bias, norm=norm, act=act, act_bits=act_bits, eps=cfg.eps, threads=threads)

    def _quantize_input(self, x: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """x float32 [M, K] -> (kernel input, scale float32 [M, 1])."""
        if self.act == "binary":  # the bits and scale of quant.binarize_activations, in one pass
            return _pack_signs(x.contiguous().numpy()), x.abs().mean(dim=-1, keepdim=True)
        codes, scale = quant.quantize_activations_absmax(x, self.act_bits, eps=self.eps)
        return np.ascontiguousarray(codes.numpy()), scale

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in_features] float -> [..., out_features] in x's dtype (CPU only, no autograd)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a float tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"x must have shape [..., {self.in_features}] (in_features), got {tuple(x.shape)}")
        if x.device.type != "cpu":
            raise ValueError(f"PackedBitLinear runs on the CPU, got x on {x.device}")
        h = x.reshape(-1, self.in_features).float()
        if self.norm is not None:
            h = self.norm(h)
        codes, x_scale = self._quantize_input(h)
        if not torch.isfinite(x_scale).all():  # a NaN or inf anywhere in a token reaches its scale
            raise ValueError("x must be finite: it holds NaN or inf, which per-token scales cannot quantize")
        dots = torch.from_numpy(packed_matmul(codes, self.weights, threads=self.threads))
        y = dots.float() * x_scale * self.weight_scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.weights.scheme}, "
            f"act={self.act}, bias={self.bias is not None}, {self.weights.nbytes:,} weight bytes"
        )


def pack_model(model: nn.Module, *, act: str | None = None, inplace: bool = False, threads: int | None = None) -> nn.Module:
    """Replace every BitLinear of a trained model by a PackedBitLinear, for CPU inference.

    By default works on a deep copy and returns it, so the trained model stays usable (and
    comparable); ``inplace=True`` converts ``model`` itself (and returns it). The model is put in
    eval mode. ``act`` None follows each layer (binary activations where its act_bits is 1, else
    int8 with its own act_bits: the packed model computes what the BitLinear model computes);
    "int8" or "binary" forces one mode (see ``PackedBitLinear.from_bitlinear``). A model that is
    itself a BitLinear comes back as a PackedBitLinear.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if act is not None and act not in ACT_MODES:
        raise ValueError(f"act must be one of {ACT_MODES} or None, got {act!r}")
    if isinstance(model, BitLinear):
        return PackedBitLinear.from_bitlinear(model, act=act, threads=threads)
    target = model if inplace else copy.deepcopy(model)
    layers = [(name, m) for name, m in target.named_modules() if isinstance(m, BitLinear)]
    if not layers:
        raise ValueError(f"pack_model found no BitLinear in {type(model).__name__}")
    for name, layer in layers:
        parent, _, child = name.rpartition(".")
        setattr(target.get_submodule(parent), child, PackedBitLinear.from_bitlinear(layer, act=act, threads=threads))
    return target.eval()
