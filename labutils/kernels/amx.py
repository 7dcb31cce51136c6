"""The A8 GEMM on Intel AMX tiles (Sapphire Rapids and later): ``tdpbssd``, 16 tokens x 16
columns x 64 k per instruction.

Why: on a CPU with AMX-INT8 the int8 baselines use it (onnxruntime's MLAS and oneDNN do), and
one ``tdpbssd`` does 16,384 multiply-accumulates where a 512-bit ``vpdpbusd`` does 64: a core
issues one every 16 cycles, 1,024 MACs per cycle against the 128 of two VNNI ports. The AVX-512
kernels (``microkernels_avx512``) stay at the VNNI peak, 5-6x below onnxruntime's ``MatMulInteger``
on such a CPU, so the avx512 path hands its W1A8 and W1.58A8 GEMMs of 16 tokens or more here.

How: a tile register holds up to 16 rows of 64 bytes. ``tdpbssd C, A, B`` adds to the int32
tile C [16 tokens, 16 columns] the products of A [16 tokens, 64 k] (signed bytes: the
activation codes, read straight from x with a row stride of Kp) and B [16 rows of 4 k, 16
columns x 4 bytes] (signed: the weights themselves, ``mult * code - 1``: the trits, or the
signs of W1A8), the layout of the VNNI kernels' decoded panel (per step of 4 k, 16 columns x 4
codes). Per task (a 64-column tile and up to 512 tokens) the tile is decoded once into that
panel; then 2 x 2 blocks of C (32 tokens x 32 columns) take 2 A and 2 B tile loads and 4
``tdpbssd`` per 64 k, in passes of 1,024 k whose partial sums C stores into the output and loads
back (the block's tokens stay in L1 meanwhile). Signed weights make C the dot itself (no
correction by the tokens' code sums). Tokens left over (fewer than 16) go through the VNNI tiles.

Linux hands out AMX state only on request (``arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)``,
once per process): ``available()`` asks, and says False where the CPU, the compile target or
the OS lacks AMX, so nothing here is compiled or called there. Every result is exact (int32 sums
of int8 products), the same int32 as the other paths.
"""

from __future__ import annotations

import ctypes
import functools
import platform

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from labutils.kernels.cpu import _enabled_llvm_features
from labutils.kernels.microkernels_avx512 import _a8_tile1, _a8_tile4
from labutils.kernels.simd import _U8x64, _splat, _vand, _vload, _vshr, _vstore

_ROWS_PER_TASK = 512  # tokens per parallel task: each task decodes its column tile once, so more than the VNNI kernels
_MIN_ROWS = 16  # one A tile: fewer tokens than this stay on the VNNI kernels
_K_BLOCK = 64  # bytes of k per tile row
_I8, _I64 = ir.IntType(8), ir.IntType(64)
_VOID, _BYTE_PTR = ir.VoidType(), ir.IntType(8).as_pointer()

# tile registers: C00, C01, C10, C11 (tokens block x column block), A0, A1, B0, B1
_C, _A, _B = (0, 1, 2, 3), (4, 5), (6, 7)

_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when the A8 GEMM can run on AMX here: the compile target has AMX-TILE and AMX-INT8
    and Linux granted this process the tile data state (asked once)."""
    features = _enabled_llvm_features()
    if not {"amx-tile", "amx-int8"} <= features or platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def usable(m: int, kp: int) -> bool:
    """True when a GEMM of ``m`` tokens over ``kp`` activation bytes per token runs on AMX: AMX
    is ``available()``, there is at least one A tile of tokens, and whole 64-byte k blocks
    (the tile rows read from x must not run past a token's row)."""
    return m >= _MIN_ROWS and kp % _K_BLOCK == 0 and kp > 0 and available()


# --------------------------------------------------------------------------- the tile instructions


def _call(builder, name: str, *args) -> None:
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VOID, [a.type for a in args]), name)
    builder.call(fn, list(args))


def _byte_ptr(context, builder, arrty, arr, index):
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [index]), _BYTE_PTR)


def _as_i64(builder, value):
    return builder.sext(value, _I64) if value.type.width < 64 else value


@intrinsic
def _tile_config(typingctx, cfg):
    """``ldtilecfg``: load the tile shapes of the 64-byte config ``cfg`` (uint8 [64])."""
    if not (isinstance(cfg, types.Array) and cfg.dtype == types.uint8):
        return None

    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.ldtilecfg", _byte_ptr(context, builder, sig.args[0], args[0], ir.Constant(_I64, 0)))
        return context.get_dummy_value()

    return types.none(cfg), codegen


@intrinsic
def _tile_release(typingctx):
    """``tilerelease``: back to the init state (cheaper context switches)."""

    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.tilerelease")
        return context.get_dummy_value()

    return types.none(), codegen


def _make_tile_load(tile: int):
    def tile_load(typingctx, arr, index, stride):
        if not (isinstance(arr, types.Array) and arr.dtype in (types.int8, types.uint8, types.int32)):
            return None

        def codegen(context, builder, sig, args):
            ptr = _byte_ptr(context, builder, sig.args[0], args[0], args[1])
            _call(builder, "llvm.x86.tileloadd64", ir.Constant(_I8, tile), ptr, _as_i64(builder, args[2]))
            return context.get_dummy_value()

        return types.none(arr, index, stride), codegen

    tile_load.__name__ = tile_load.__qualname__ = f"_tile_load{tile}"
    return intrinsic(tile_load)


def _make_tile_store(tile: int):
    def tile_store(typingctx, arr, index, stride):
        if not (isinstance(arr, types.Array) and arr.dtype == types.int32):
            return None

        def codegen(context, builder, sig, args):
            ptr = _byte_ptr(context, builder, sig.args[0], args[0], args[1])
            _call(builder, "llvm.x86.tilestored64", ir.Constant(_I8, tile), ptr, _as_i64(builder, args[2]))
            return context.get_dummy_value()

        return types.none(arr, index, stride), codegen

    tile_store.__name__ = tile_store.__qualname__ = f"_tile_store{tile}"
    return intrinsic(tile_store)


def _make_tile_zero(tile: int):
    def tile_zero(typingctx):
        def codegen(context, builder, sig, args):
            _call(builder, "llvm.x86.tilezero", ir.Constant(_I8, tile))
            return context.get_dummy_value()

        return types.none(), codegen

    tile_zero.__name__ = tile_zero.__qualname__ = f"_tile_zero{tile}"
    return intrinsic(tile_zero)


def _make_tdpbssd(c: int, a: int, b: int):
    def tdpbssd(typingctx):
        def codegen(context, builder, sig, args):
            _call(builder, "llvm.x86.tdpbssd", ir.Constant(_I8, c), ir.Constant(_I8, a), ir.Constant(_I8, b))
            return context.get_dummy_value()

        return types.none(), codegen

    tdpbssd.__name__ = tdpbssd.__qualname__ = f"_tdpbssd{c}{a}{b}"
    return intrinsic(tdpbssd)


# Tile numbers are immediates in the instruction encoding: one intrinsic per register used.
_load_a0, _load_a1, _load_b0, _load_b1 = (_make_tile_load(t) for t in (*_A, *_B))
_load_c00, _load_c01, _load_c10, _load_c11 = (_make_tile_load(t) for t in _C)
_store_c00, _store_c01, _store_c10, _store_c11 = (_make_tile_store(t) for t in _C)
_zero_c00, _zero_c01, _zero_c10, _zero_c11 = (_make_tile_zero(t) for t in _C)
_dp00, _dp01 = _make_tdpbssd(_C[0], _A[0], _B[0]), _make_tdpbssd(_C[1], _A[0], _B[1])
_dp10, _dp11 = _make_tdpbssd(_C[2], _A[1], _B[0]), _make_tdpbssd(_C[3], _A[1], _B[1])


# --------------------------------------------------------------------------- the kernel

_INLINE = {"cache": True, "boundscheck": False, "error_model": "numpy", "inline": "always"}


@njit(**_INLINE)
def _config():  # pragma: no cover - compiled
    """The tile config: palette 1; C tiles 16 rows x 64 bytes (16 int32), A and B 16 x 64 bytes."""
    cfg = np.zeros(64, dtype=np.uint8)
    cfg[0] = 1
    for tile in range(8):
        cfg[16 + 2 * tile] = 64  # colsb, little-endian uint16
        cfg[48 + tile] = 16  # rows
    return cfg


@intrinsic
def _signed_codes(typingctx, codes, mult):
    """``mult * codes - 1`` in each byte lane of a 64-byte vector: the weights from their codes."""
    if codes != _U8x64 or not isinstance(mult, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        vty = args[0].type
        scale = _splat(builder, builder.trunc(args[1], _I8) if args[1].type.width > 8 else args[1], vty)
        return builder.sub(builder.mul(args[0], scale), ir.Constant(vty, [1] * 64))

    return _U8x64(codes, mult), codegen


@njit(**_INLINE)
def _signed_panel(w, t, bits, mult, panel):  # pragma: no cover - compiled
    """Decode column tile t into ``panel`` (the VNNI kernels' layout: per step of 4 k, 4 vectors
    of 16 columns x 4 k) as signed weights ``mult * code - 1``: the trits of W1.58A8 (code - 1),
    the signs of W1A8 (2 * bit - 1), so the tiles' sums are the dots themselves (no per-token
    correction by the sum of x). One AND, one multiply-subtract and one shift per 64 codes."""
    groups, fields, mask = w.shape[1], 8 // bits, (1 << bits) - 1
    for g in range(groups):
        base = (t * groups + g) * 256
        for v in range(4):
            p = _vload(w, base + 64 * v)
            for q in range(fields):
                _vstore(panel, ((g * fields + q) * 4 + v) * 64, _signed_codes(_vand(p, mask), mult))
                p = _vshr(p, bits)


@njit(**_INLINE)
def _amx_block32(x, panel, out, r, c, k0, k1):  # pragma: no cover - compiled
    """out[r:r+32, c:c+32] (int32) += x[r:r+32, k0:k1] . W[c:c+32, k0:k1]: 2 x 2 C tiles, per 64 k
    2 A loads (tokens), 2 B loads (the panel, 4 k per row) and 4 tdpbssd. The first k block
    starts from zero, later ones from out."""
    kp, cols = x.shape[1], out.shape[1]
    v = (c % 64) // 16
    if k0 == 0:
        _zero_c00()
        _zero_c01()
        _zero_c10()
        _zero_c11()
    else:
        _load_c00(out, r * cols + c, 4 * cols)
        _load_c01(out, r * cols + c + 16, 4 * cols)
        _load_c10(out, (r + 16) * cols + c, 4 * cols)
        _load_c11(out, (r + 16) * cols + c + 16, 4 * cols)
    for kb in range(k0 // 64, k1 // 64):
        _load_a0(x, r * kp + 64 * kb, kp)
        _load_a1(x, (r + 16) * kp + 64 * kb, kp)
        _load_b0(panel, (64 * kb + v) * 64, 256)
        _load_b1(panel, (64 * kb + v + 1) * 64, 256)
        _dp00()
        _dp01()
        _dp10()
        _dp11()
    _store_c00(out, r * cols + c, 4 * cols)
    _store_c01(out, r * cols + c + 16, 4 * cols)
    _store_c10(out, (r + 16) * cols + c, 4 * cols)
    _store_c11(out, (r + 16) * cols + c + 16, 4 * cols)


@njit(**_INLINE)
def _amx_block16(x, panel, out, r, c, k0, k1):  # pragma: no cover - compiled
    """out[r:r+16, c:c+32] (int32) += x[r:r+16, k0:k1] . W[c:c+32, k0:k1] (one A tile)."""
    kp, cols = x.shape[1], out.shape[1]
    v = (c % 64) // 16
    if k0 == 0:
        _zero_c00()
        _zero_c01()
    else:
        _load_c00(out, r * cols + c, 4 * cols)
        _load_c01(out, r * cols + c + 16, 4 * cols)
    for kb in range(k0 // 64, k1 // 64):
        _load_a0(x, r * kp + 64 * kb, kp)
        _load_b0(panel, (64 * kb + v) * 64, 256)
        _load_b1(panel, (64 * kb + v + 1) * 64, 256)
        _dp00()
        _dp01()
    _store_c00(out, r * cols + c, 4 * cols)
    _store_c01(out, r * cols + c + 16, 4 * cols)


_K_CHUNK = 1024  # bytes of k per pass: a block's 32 tokens (32 KB) are reused by both column halves from L1


@njit(**_INLINE)
def a8_task(x, w, rowsum, out, t, lo, hi, bits, mult):  # pragma: no cover - compiled
    """Rows lo..hi-1 of x int8 [M, Kp] (Kp a multiple of 64) x column tile t of w uint8
    [T, G, 4, 64] -> the int32 dots out[lo:hi, 64t : 64t+64] = mult * sum(code * x) - rowsum,
    as ``microkernels_avx512.a8_task``: the tile decoded once into a panel of signed weights,
    blocks of 32 and 16 tokens on AMX (k in chunks of 512, so that a block's tokens and the
    panel's slice stay in L1 while the 2 x 2 tiles walk them), the rest on the VNNI tiles."""
    kp = x.shape[1]
    panel = np.empty(kp * 64, dtype=np.uint8)
    _signed_panel(w, t, bits, mult, panel)
    _tile_config(_config())
    for k0 in range(0, kp, _K_CHUNK):
        k1 = min(kp, k0 + _K_CHUNK)
        r = lo
        while r + 32 <= hi:
            _amx_block32(x, panel, out, r, 64 * t, k0, k1)
            _amx_block32(x, panel, out, r, 64 * t + 32, k0, k1)
            r += 32
        if r + 16 <= hi:
            _amx_block16(x, panel, out, r, 64 * t, k0, k1)
            _amx_block16(x, panel, out, r, 64 * t + 32, k0, k1)
    _tile_release()
    r = lo + (hi - lo) // 16 * 16
    while r + 4 <= hi:
        _a8_tile4(x, w, out, r, t, rowsum, bits, mult)
        r += 4
    while r < hi:
        _a8_tile1(x, w, out, r, t, rowsum, bits, mult)
        r += 1


@njit(**_INLINE)
def _a8_body(x, w, rowsum, out, bits, mult):  # pragma: no cover - compiled
    m = x.shape[0]
    chunks = (m + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(w.shape[0] * chunks):
        t, lo = task // chunks, (task % chunks) * _ROWS_PER_TASK
        a8_task(x, w, rowsum, out, t, lo, min(lo + _ROWS_PER_TASK, m), bits, mult)


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


KERNELS = {
    "w1a8": (_w1a8_parallel, _w1a8_serial),
    "w1.58a8": (_w158a8_parallel, _w158a8_serial),
}
"""scheme -> (parallel kernel, serial kernel), the signatures of ``dispatch.SIGNATURES``."""
