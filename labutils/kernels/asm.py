"""The kernels' assembly: which instructions did LLVM emit on this CPU, and which should it.

``asm_lines(kernel, pattern, path)`` prints a path's kernel and returns the matching lines;
``expected_instructions(path)`` says what each path's inner loops are built from, so a chapter
or a test can check live assembly (this CPU) and recorded assembly (another CPU) alike.
"""

from __future__ import annotations

import re
from typing import Any

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
    - "avx2": ``vpshufb``/``vpsadbw`` and ``vpmaddubsw``; the int16 -> int32 widening is
      ``vpmaddwd``, except where the target has a VNNI extension (AVX-VNNI or AVX512-VNNI: Intel
      since Ice Lake, AMD Zen 4), whose ``vpdpwssd`` LLVM uses to fuse that widening with the
      add into the accumulator.
    - "generic": whatever LLVM makes of plain loops. arm64: ``cnt`` and ``mla``. x86: the scalar
      ``popcntq`` (LLVM does not vectorize the counting loop, whose counters it cannot prove apart
      from the weights); the int8 products vectorized as ``vpmaddwd`` (pairs of int16 products
      summed) where AVX-512BW is there, as ``vpmulld`` (int32 products) with AVX2 alone, and no
      check below AVX2. (Seen on Zen 3, Zen 4 and an Intel Xeon with AVX-512.)
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    flags = set(target_flags() if flags is None else flags)
    if path == "avx512":
        return {"popcount": ["vpopcntq"], "dot": ["vpdpbusd"]}
    if path == "avx2":
        widen = "vpdpwssd" if flags & {"avx_vnni", "avx512_vnni"} else "vpmaddwd"
        return {"popcount": ["vpshufb", "vpsadbw"], "dot": ["vpmaddubsw", widen]}
    if "neon" in flags or "asimd" in flags:
        return {"popcount": ["cnt"], "dot": ["mla"]}
    dot = ["vpmaddwd"] if "avx512bw" in flags else ["vpmulld"] if "avx2" in flags else []
    return {"popcount": ["popcntq"] if "popcnt" in flags else [], "dot": dot}


def mnemonics(lines: list[str]) -> set[str]:
    """The instruction names of assembly lines (``{vex}`` prefixes dropped)."""
    return {line.replace("{vex}", "").split()[0] for line in lines if line.strip() and not line.strip().startswith(("#", "."))}
