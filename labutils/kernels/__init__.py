"""Integer kernels for 1-bit and 1.58-bit layers: XNOR/popcount and int8 matmuls, in Numba, for the CPU they run on.

Three kernel families, each a GEMM (``[M, K] x [N, K]^T -> int32 [M, N]``) and a GEMV
(``[K] -> int32 [N]``), all exact (their int32 results equal a numpy int64 matmul):

- **W1A1** (binary weights x binary activations). With ±1 stored as bits (+1 -> 1, -1 -> 0),
  a product is +1 where the bits agree, so a dot product of length K is::

      dot(a, w) = K - 2 * popcount(a XOR w)          (64 products per uint64 word)

- **W1A8** (binary weights x int8 activations). With the weight bit ``b = (w + 1) / 2``::

      dot(a, w) = sum a*w = 2 * sum b*a - sum a

- **W1.58A8** (ternary weights x int8 activations). With the code ``c = w + 1`` in {0, 1, 2}::

      dot(a, w) = sum c*a - sum a

Both A8 kernels compute ``sum code*a`` with ``vpdpbusd`` on AVX-512 (VNNI: 64 unsigned x signed
byte products summed into 16 int32 lanes in one instruction), unpacking the 1- or 2-bit
codes with a shift and a mask (once per block of rows, into a small panel, or on the fly for
a few rows); ``sum a`` is one number per token.

How they are fast (the AVX-512 path)
------------------------------------
Numba compiles Python loops through LLVM, which vectorizes simple loops but does not keep a
4 x 4 block of 512-bit accumulators in registers by itself. So ``simd`` adds a small SIMD
vocabulary (``_vload``, ``_xor_popcount_add``, ``_dpbusd``, ...: Numba ``@intrinsic`` functions
that emit LLVM vector IR), and the kernels are written as textbook register-blocked
microkernels: 4 rows of activations x 4 vectors of weight columns per step, so every weight
vector loaded is used 4 times and every activation broadcast 4 times. Weights are stored
*prepacked* in tiles (``prepack_*``, below) so each vector load is one contiguous 64 bytes.
Outer loops run in parallel (``prange``) over (column block, row chunk) tasks.

Three paths, chosen at each call for the CPU (``dispatch``; see ``cpu_features()``):

- **avx512** (AVX512F/BW + VPOPCNTDQ + VNNI): 4 x 4 blocks of zmm, ``vpopcntq`` and ``vpdpbusd``
  (``microkernels_avx512``); what the measurements below are about. On a CPU with AMX-INT8
  (Intel Sapphire Rapids on) its A8 GEMMs of 16 tokens or more run on AMX tiles (``amx``:
  ``tdpbssd``, 16 x 16 x 64 products per instruction), as the int8 libraries do there.
- **avx2**: 4 x 2 blocks of ymm; popcount by ``vpshufb`` nibble lookups summed in bytes,
  int8 products by ``vpmaddubsw`` summed in int16, widened by ``vpmaddwd`` (``microkernels_avx2``),
  or by 256-bit ``vpdpbusd`` where the CPU has AVX-VNNI (or AVX512-VNNI with VL).
- **generic**: portable vector IR, no x86 intrinsic (``generic``, ``portable``): LLVM selects
  NEON ``sdot`` and ``cnt`` on arm64 (``asm.cross_asm_lines`` shows them for an Apple M1),
  ``vpmaddubsw`` summed in int16 (the avx2 path's step, from plain IR) and ``vpopcntq`` or
  ``vpshufb`` on x86.

``kernels.use("generic")`` (a ``with`` block) or ``LABBOOK_KERNEL_PATH=generic`` forces a path.
All paths read the same ``PackedWeights`` and return the same int32 results. See the assembly
with ``popcount_asm_lines(kernel)``, ``dot_asm_lines(kernel)`` and ``expected_instructions(path)``.

Package layout: ``cpu`` (features), ``simd`` (the vector vocabulary), ``layout`` (PackedWeights,
prepack_*), ``microkernels_avx512``, ``amx``, ``microkernels_avx2``, ``portable`` and ``generic``,
``dispatch`` (path choice), ``matmul`` (the public GEMM/GEMV), ``lut`` (ternary weights as
table indices, 1.67 bits a weight, and their one-token product by ``vpshufb`` lookups), ``asm``, ``issue_model``, ``layer``
(PackedBitLinear, pack_model). Timings: ``python -m labutils.bench kernels`` (``kernel_bench``),
the median of interleaved rounds with the per-round ratio spread and the best sample beside it.
The figures below are older exploration notes (one thread's CPU time, or best samples), kept for
the designs they compare; the committed runs are in ``results/kernels``.

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

The AVX2 path (Zen 3, measured while the 2 shared cores ran other work at load average 6-10)
-----------------------------------------------------------------------------------------
W1A1: per 256 bits LLVM's ``ctpop`` on ymm spends 10 vector ops (xor, shift, 2 masks, 2
``vpshufb``, 2 adds, ``vpsadbw``, add). Summing the byte counts of 31 words before one
``vpsadbw`` and splitting rows and tiles into nibble planes once per task (no shift, no mask
in the loop) leaves 6 (xor, ``vpshufb``, add, twice). One thread, 512x768 x 3072x768: best
218-297 GMAC/s for the nibble planes against 204-261 for ``ctpop`` in alternating runs (kept
the planes; on a Xeon with AVX512_VPOPCNTDQ+VL, LLVM turns the ymm ``ctpop`` into ``vpopcntq``
and the ``ctpop`` variant wins, 600 vs 260, but such a CPU takes the avx512 path). The ceiling:
~6 ops per 256 MACs on 4 vector pipes (2 for ``vpshufb``) is ~128-170 MACs per cycle, 8-10x
the 16 float32 MACs per cycle of two 256-bit FMA pipes: the 8x target sits at the roofline.
A8: ``vpmaddubsw`` on 32 bytes, its int16 add, and one ``vpmaddwd`` per 63 steps: ~64 MACs
per cycle at 2 per cycle, 4x the float32 peak. ``results/kernels/zen3/kernels.json``
has the 2-thread run (medians and best samples).

torch and Numba each bring an OpenMP runtime whose idle threads spin for a while after a
parallel region; on a 2-core machine a Numba kernel right after a torch op can lose a core to
them (the benchmark pauses between the two; in a model, ``OMP_WAIT_POLICY=PASSIVE`` set before
importing torch makes idle threads sleep at once, at a small cost per op).
"""

from __future__ import annotations

from labutils.kernels.asm import (
    asm_lines,
    dot_asm_lines,
    expected_instructions,
    popcount_asm_lines,
    vnni_asm_lines,
)
from labutils.kernels.cpu import PATHS, available_paths, flags_of_features, target_flags
from labutils.kernels.dispatch import ENV_VAR, active_path, cpu_features, use
from labutils.kernels.generic import w1a1_gemm_simple
from labutils.kernels.layer import ACT_MODES, PackedBitLinear, pack_model
from labutils.kernels.layout import SCHEMES, PackedWeights, prepack_w1a1, prepack_w1a8, prepack_w158a8, untile_w158a8
from labutils.kernels.lut import LutWeights, lut_gemv, pack_lut, unpack_lut
from labutils.kernels.matmul import (
    packed_matmul,
    w1a1_gemm,
    w1a1_gemv,
    w1a8_gemm,
    w1a8_gemv,
    w158a8_gemm,
    w158a8_gemv,
)
from labutils.kernels.microkernels_avx512 import _w1a1_body, _w1a1_tile4  # noqa: F401 (shown in chapter 6)
from labutils.kernels.profile import profile_packed_forward
from labutils.kernels.simd import HAS_VNNI, popcount

__all__ = [
    "ACT_MODES",
    "ENV_VAR",
    "HAS_VNNI",
    "PATHS",
    "SCHEMES",
    "PackedBitLinear",
    "PackedWeights",
    "LutWeights",
    "active_path",
    "asm_lines",
    "available_paths",
    "cpu_features",
    "dot_asm_lines",
    "expected_instructions",
    "flags_of_features",
    "pack_lut",
    "pack_model",
    "lut_gemv",
    "packed_matmul",
    "popcount",
    "profile_packed_forward",
    "popcount_asm_lines",
    "prepack_w1a1",
    "prepack_w1a8",
    "prepack_w158a8",
    "target_flags",
    "unpack_lut",
    "untile_w158a8",
    "use",
    "vnni_asm_lines",
    "w1a1_gemm",
    "w1a1_gemm_simple",
    "w1a1_gemv",
    "w1a8_gemm",
    "w1a8_gemv",
    "w158a8_gemm",
    "w158a8_gemv",
]
