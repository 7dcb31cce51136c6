"""The kernels' assembly: which instructions did LLVM emit on this CPU, and which should it.

``asm_lines(kernel, pattern, path)`` prints a path's kernel and returns the matching lines;
``expected_instructions(path)`` says what each path's inner loops are built from, so a chapter
or a test can check live assembly (this CPU) and recorded assembly (another CPU) alike.
``cross_asm_lines(scheme, pattern)`` compiles the generic path for another CPU, by default an
Apple M1 (arm64 with the dot-product extension), on whatever machine runs it: the arm64 code
students' laptops run, read on an x86 machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

import llvmlite.binding as llvm
from numba import njit

from labutils.kernels.cpu import PATHS, target_flags
from labutils.kernels.dispatch import SIGNATURES, kernel_for
from labutils.kernels.layout import SCHEMES
from labutils.kernels.matmul import w1a1_gemm, w1a1_gemv, w1a8_gemm, w1a8_gemv, w158a8_gemm, w158a8_gemv

_NAMED = {w1a1_gemm: "w1a1", w1a1_gemv: "w1a1", w1a8_gemm: "w1a8", w1a8_gemv: "w1a8",
          w158a8_gemm: "w1.58a8", w158a8_gemv: "w1.58a8"}  # fmt: skip

POPCOUNT_PATTERN = r"^\s*(v?popcnt[bwdq]?|cnt)\b"
"""Bit-count instructions: x86 ``popcnt``, AVX-512 ``vpopcnt[bwdq]``, arm64 ``cnt``."""

DOT_PATTERN = (
    r"^\s*(\{vex\}\s*)?(vpdpbusds?|vpdpwssds?|v?pmaddubsw|v?pmaddwd|v?pmulld|v?pmullw|v?pmuldq|v?pmuludq"
    r"|imul[lq]?|mla|mul|smlal2?|sdot|udot)\b"
)
"""Integer multiply(-add) instructions of any path: VNNI, AVX2 pairs, plain multiplies, arm64."""


_RECOMPILED: dict[tuple[Any, Any], Any] = {}  # (cached dispatcher, signature) -> an uncached copy


def _dispatcher(kernel: Any, path: str | None) -> Any:
    """The Numba dispatcher behind ``kernel``: a dispatcher, or a public function / scheme name
    (whose serial kernel on ``path`` is compiled, or loaded from the cache, if it has not been)."""
    if isinstance(kernel, str) or kernel in _NAMED:
        scheme = _NAMED.get(kernel, kernel)
        if scheme not in SCHEMES:
            raise ValueError(f"kernel name must be one of {SCHEMES}, got {kernel!r}")
        dispatcher = kernel_for(scheme, path, parallel=False)  # the same microkernels, a faster compile
        if not dispatcher.signatures:
            dispatcher.compile(SIGNATURES[scheme])
        return dispatcher
    if not hasattr(kernel, "inspect_asm"):
        raise TypeError(f"kernel must be a Numba dispatcher, a kernel function or a scheme name, got {kernel!r}")
    return kernel


def asm_lines(kernel: Any, pattern: str, path: str | None = None) -> list[str]:
    """Lines of the kernel's assembly whose instruction matches the regex ``pattern``.

    ``kernel``: one of the public kernel functions, a scheme name ("w1a1", "w1a8", "w1.58a8"),
    or any Numba dispatcher compiled at least once (its first signature is used; ``path`` is
    then ignored). ``path``: whose kernel ("avx512", "avx2", "generic"; None: the active path);
    RuntimeError for a path this CPU cannot run. Numba keeps no assembly for code loaded from
    its on-disk cache, so such a kernel is compiled once more, uncached, to print it (seconds).
    """
    dispatcher = _dispatcher(kernel, path)
    if not dispatcher.signatures:
        raise ValueError(f"{dispatcher.__name__} has not been compiled yet: call it once first")
    signature = dispatcher.signatures[0]
    if getattr(dispatcher.overloads[signature].library, "_disable_inspection", False):  # from the cache
        key = (dispatcher, signature)
        if key not in _RECOMPILED:
            options = {key: v for key, v in dispatcher.targetoptions.items() if key != "nopython"}
            _RECOMPILED[key] = njit(**options)(dispatcher.py_func)
            _RECOMPILED[key].compile(signature)
        dispatcher = _RECOMPILED[key]
    asm = dispatcher.inspect_asm(signature)
    regex = re.compile(pattern)
    return [line.strip() for line in asm.splitlines() if regex.search(line.split("#")[0])]


def popcount_asm_lines(kernel: Any, path: str | None = None) -> list[str]:
    """The ``popcnt`` / ``vpopcnt[bwdq]`` / arm64 ``cnt`` instructions in ``kernel``'s assembly.

    Empty for the AVX2 path, which counts bits with ``vpshufb`` lookups (see expected_instructions).
    """
    return asm_lines(kernel, POPCOUNT_PATTERN, path)


def vnni_asm_lines(kernel: Any, path: str | None = None) -> list[str]:
    """The ``vpdpbusd`` / ``vpdpwssd`` / ``vpmaddubsw`` / ``vpmaddwd`` instructions in ``kernel``'s assembly."""
    return asm_lines(kernel, r"^\s*(\{vex\}\s*)?(vpdpbusds?|vpdpwssds?|vpmaddubsw|vpmaddwd)\b", path)


def dot_asm_lines(kernel: Any, path: str | None = None) -> list[str]:
    """The integer dot-product instructions of ``kernel`` on ``path``: ``vpdpbusd`` (AVX-512),
    ``vpmaddubsw`` / ``vpmaddwd`` (AVX2), or the multiplies the generic loop got (``DOT_PATTERN``)."""
    return asm_lines(kernel, DOT_PATTERN, path)


def expected_instructions(path: str, flags: list[str] | None = None) -> dict[str, list[str]]:
    """The instructions each path's kernels must contain: ``{"popcount": [...], "dot": [...]}``
    (mnemonics; every one should appear in the W1A1 resp. A8 kernel's assembly), for a compile
    target with ``flags`` (/proc/cpuinfo names; default: this CPU's, ``cpu.target_flags()``).

    Numba compiles every path for the target CPU, so a forced path's instructions depend on it:
    - "avx512": ``vpopcntq`` and ``vpdpbusd``, fixed by its intrinsics.
    - "avx2": ``vpshufb``/``vpsadbw``; for int8, ``vpdpbusd`` on ymm where the target has a
      256-bit VNNI (AVX-VNNI, or AVX512-VNNI with AVX512-VL: Intel since Cascade Lake (2019), AMD since Zen 4),
      else ``vpmaddubsw`` with the int16 -> int32 widening ``vpmaddwd`` (``vpdpwssd``, the
      widening fused with its add, where AVX512-VNNI comes without VL).
    - "generic": what LLVM selects for portable vector IR (``portable``; the W1A1 tiles' vector
      ``ctpop``). arm64: ``cnt``, and ``sdot`` where the dot-product extension is there
      (``asimddp``: every Apple M-series; cross-compiled by ``cross_asm_lines``). x86:
      ``vpopcntq`` where AVX512-VPOPCNTDQ is there, else the ``vpshufb`` nibble lookup (AVX2);
      the int8 products as ``vpmaddubsw`` (codes by activations, pairs into int16) from AVX2 on;
      nothing checked below AVX2.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    flags = set(target_flags() if flags is None else flags)
    if path == "avx512":
        return {"popcount": ["vpopcntq"], "dot": ["vpdpbusd"]}
    if path == "avx2":
        if "avx_vnni" in flags or {"avx512_vnni", "avx512vl"} <= flags:  # 256-bit vpdpbusd
            return {"popcount": ["vpshufb", "vpsadbw"], "dot": ["vpdpbusd"]}
        widen = "vpdpwssd" if "avx512_vnni" in flags else "vpmaddwd"
        return {"popcount": ["vpshufb", "vpsadbw"], "dot": ["vpmaddubsw", widen]}
    if "neon" in flags or "asimd" in flags:
        return {"popcount": ["cnt"], "dot": ["sdot"] if "asimddp" in flags else []}
    popcount = ["vpopcntq"] if "avx512_vpopcntdq" in flags else ["vpshufb"] if "avx2" in flags else []
    return {"popcount": popcount, "dot": ["vpmaddubsw"] if "avx2" in flags else []}


def mnemonics(lines: list[str]) -> set[str]:
    """The instruction names of assembly lines (``{vex}`` prefixes dropped)."""
    return {line.replace("{vex}", "").split()[0] for line in lines if line.strip() and not line.strip().startswith(("#", "."))}


def loop_bodies(lines: list[str]) -> list[list[str]]:
    """The innermost loops of a function's assembly (AT&T, as ``asm_lines(kernel, ".")`` returns
    it): for each jump back to an earlier label, the lines from that label to the jump, unless
    another such loop lies inside them. What a register-pressure check reads: a vector load or
    store at ``%rsp`` inside a hot loop is an accumulator or operand spilled to the stack."""
    stripped = [line.strip() for line in lines]
    labels = {line[:-1]: i for i, line in enumerate(stripped) if line.startswith(".") and line.endswith(":")}
    spans = []
    for i, line in enumerate(stripped):
        parts = line.split()
        if len(parts) == 2 and parts[0].startswith("j") and labels.get(parts[1], i) < i:
            spans.append((labels[parts[1]], i))
    innermost = [(a, b) for a, b in spans if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)]
    return [stripped[a : b + 1] for a, b in innermost]


CROSS_TARGETS = {"apple-m1": ("aarch64-unknown-linux-gnu", "+neon,+dotprod")}
"""CPU name -> (LLVM triple, features) for ``cross_asm_lines``."""

_CROSS_PROGRAM = r"""
import json, re, sys
import llvmlite.binding as llvm
from labutils import kernels as K
from labutils.kernels.dispatch import SIGNATURES, kernel_for
scheme, triple, cpu, features = sys.argv[1:5]
from numba.core.codegen import CPUCodeLibrary
optimized = {}
original = CPUCodeLibrary._optimize_final_module
def keep_ir(library):  # the optimized IR, before the host's code generation rewrites it
    original(library)
    optimized[library.name] = str(library._final_module)
CPUCodeLibrary._optimize_final_module = keep_ir
dispatcher = kernel_for(scheme, "generic", parallel=False)
dispatcher.compile(SIGNATURES[scheme])  # for this machine's triple: only the IR is kept
ir_text = optimized[dispatcher.overloads[dispatcher.signatures[0]].library.name]
llvm.initialize_all_targets()
llvm.initialize_all_asmprinters()
machine = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, features=features, opt=3)
# the host's CPU and features are attributes of every function: the target machine's apply
ir_text = re.sub(r'"target-(cpu|features)"="[^"]*"', "", ir_text)
# x86's optimizer turned the runtime's reference-count decrement into an x86 intrinsic
# ("decrement, is it zero now?"): back to portable IR
ir_text = re.sub(r"%([\w.]+) = tail call i8 @llvm\.x86\.atomic\.sub\.cc\.i64\(ptr (?:nonnull )?(%[\w.]+), i64 (\d+), i32 4\)",
                 r"%dec.\1.old = atomicrmw sub ptr \2, i64 \3 acq_rel\n  %dec.\1.zero = icmp eq i64 %dec.\1.old, \3\n"
                 r"  %\1 = zext i1 %dec.\1.zero to i8", ir_text)
ir_text = re.sub(r"declare i8 @llvm\.x86\.atomic\.sub\.cc\.i64\(.*", "", ir_text)
module = llvm.parse_assembly(ir_text)
module.triple, module.data_layout = triple, str(machine.target_data)
print(json.dumps(machine.emit_assembly(module).splitlines()))
"""


def cross_asm_lines(scheme: str, pattern: str, cpu: str = "apple-m1") -> list[str]:
    """Lines matching ``pattern`` of the generic path's serial ``scheme`` kernel compiled for
    ``cpu`` (a key of ``CROSS_TARGETS``: "apple-m1", arm64 with NEON and the dot-product
    extension), on any machine whose llvmlite has that target.

    A subprocess imports the kernels with the target's features added to ``NUMBA_CPU_FEATURES``,
    so the compile-time choices of the generic path (``portable.STEP``) are the target's; Numba
    still builds for the host (its optimizer's cost model too), so the kernel's LLVM IR is taken
    and compiled again by an LLVM target machine for ``cpu``. RuntimeError (with the
    subprocess's error) if it fails.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"kernel name must be one of {SCHEMES}, got {scheme!r}")
    if cpu not in CROSS_TARGETS:
        raise ValueError(f"cpu must be one of {sorted(CROSS_TARGETS)}, got {cpu!r}")
    triple, features = CROSS_TARGETS[cpu]
    with tempfile.TemporaryDirectory() as cache:
        # Numba's own target machine (the host's triple) must still build working host code (its
        # runtime's atomics): the host's CPU and features, plus the target's, which it ignores
        env = {**os.environ, "NUMBA_CPU_NAME": llvm.get_host_cpu_name(),
               "NUMBA_CPU_FEATURES": llvm.get_host_cpu_features().flatten() + "," + features,
               "LABBOOK_KERNEL_PATH": "generic",
               "NUMBA_CACHE_DIR": cache, "PYTHONWARNINGS": "ignore"}  # fmt: skip
        done = subprocess.run([sys.executable, "-c", _CROSS_PROGRAM, scheme, triple, cpu, features], env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"cross-compiling {scheme} for {cpu} failed:\n{done.stderr[-3000:]}")
    regex = re.compile(pattern)
    lines = json.loads(done.stdout.strip().splitlines()[-1])
    return [line.strip() for line in lines if regex.search(line.split("//")[0].split(";")[0])]
