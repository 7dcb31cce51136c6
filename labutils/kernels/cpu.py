"""What the CPU can run: the LLVM features Numba compiles for, and the kernel paths they allow.

The features are read from LLVM, not from ``/proc/cpuinfo``, so they agree with the code Numba
emits: with ``NUMBA_CPU_NAME`` set (compiling for another CPU), they are ``NUMBA_CPU_FEATURES``,
which should then be given explicitly (LLVM does not say which features a CPU name implies).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Any

import llvmlite.binding as llvm
import numba

PATHS = ("avx512", "avx2", "generic")
"""The kernel paths, fastest first: AVX-512 (VPOPCNTDQ + VNNI), AVX2 (256-bit), plain loops."""

# LLVM feature -> the name Linux's /proc/cpuinfo (and the book) uses for it.
_FLAG_NAMES = {
    "avx2": "avx2",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512vl": "avx512vl",
    "avx512vpopcntdq": "avx512_vpopcntdq",
    "avx512vnni": "avx512_vnni",
    "avxvnni": "avx_vnni",
    "popcnt": "popcnt",
    "neon": "neon",
    "fp-armv8": "asimd",
    "dotprod": "asimddp",
}

# What each path's kernels need, in /proc/cpuinfo names.
PATH_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "avx512": ("avx512f", "avx512bw", "avx512_vpopcntdq", "avx512_vnni"),
    "avx2": ("avx2",),
    "generic": (),
}


@functools.lru_cache(maxsize=None)
def _target_features() -> str:
    """LLVM feature string of the CPU Numba compiles for (NUMBA_CPU_NAME/FEATURES if set).
    Cached: asking LLVM costs ~1 ms, and every packed layer asks for its path on every call."""
    if numba.config.CPU_NAME not in (None, "", "host"):
        return numba.config.CPU_FEATURES or ""
    return llvm.get_host_cpu_features().flatten()


@functools.lru_cache(maxsize=None)
def _enabled_llvm_features() -> frozenset[str]:
    return frozenset(f[1:] for f in _target_features().split(",") if f.startswith("+"))


def target_flags() -> list[str]:
    """The kernel-relevant features of the compile target, sorted, in /proc/cpuinfo names."""
    enabled = _enabled_llvm_features()
    return sorted({name for llvm_name, name in _FLAG_NAMES.items() if llvm_name in enabled})


def flags_of_features(features: str) -> list[str]:
    """The kernel-relevant flags (sorted, /proc/cpuinfo names) of an LLVM feature string such as
    ``NUMBA_CPU_FEATURES`` ("+avx2,+popcnt,-avx512f"): what ``target_flags`` would say for a
    compile target with those features."""
    enabled = {f.strip()[1:] for f in features.split(",") if f.strip().startswith("+")}
    return sorted({name for llvm_name, name in _FLAG_NAMES.items() if llvm_name in enabled})


def missing_features(path: str) -> list[str]:
    """The features ``path`` needs that the compile target lacks (ValueError for an unknown path)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    flags = set(target_flags())
    return [f for f in PATH_REQUIREMENTS[path] if f not in flags]


@functools.lru_cache(maxsize=None)
def available_paths() -> tuple[str, ...]:
    """The paths this CPU can execute, fastest first; always ends with "generic". Cached (the
    compile target's features are): every packed layer call asks for its path."""
    return tuple(p for p in PATHS if not missing_features(p))


# Other CPUs' compile targets, for running the test suite as it runs there on a host that can
# execute their code (``compile_target_env``): LLVM's CPU name and the features Numba may use,
# without the vendor-only extensions LLVM knows for the name (clzero, sse4a, ...) that an Intel
# host lacks and no kernel needs. Zen 4: AVX-512 with VPOPCNTDQ and VNNI, no AMX, no AVX-VNNI.
_ZEN_COMMON = ("64bit adx aes avx avx2 bmi bmi2 clflushopt clwb cmov crc32 cx16 cx8 f16c fma fsgsbase fxsr "
               "invpcid lzcnt mmx movbe pclmul popcnt prfchw rdpid rdrnd rdseed sahf sha sse sse2 sse3 "
               "sse4.1 sse4.2 ssse3 vaes vpclmulqdq xsave xsavec xsaveopt xsaves").split()  # fmt: skip
_AVX512 = ("avx512f avx512bw avx512vl avx512dq avx512cd avx512vnni avx512vpopcntdq avx512bitalg avx512vbmi "
           "avx512vbmi2 avx512ifma avx512bf16").split()  # fmt: skip
_NEVER_ON_ZEN = "avx512fp16 avx10.1 avxvnni amx-tile amx-int8 amx-bf16".split()
COMPILE_TARGETS: dict[str, str] = {
    "znver3": ",".join([f"+{f}" for f in _ZEN_COMMON] + [f"-{f}" for f in _AVX512 + ["gfni"] + _NEVER_ON_ZEN]),
    "znver4": ",".join([f"+{f}" for f in _ZEN_COMMON + _AVX512 + ["gfni"]] + [f"-{f}" for f in _NEVER_ON_ZEN]),
}
"""LLVM feature strings (``NUMBA_CPU_FEATURES``) of the CPUs CI runs on, by LLVM CPU name."""


def compile_target_env(name: str, host_features: dict[str, bool] | None = None) -> dict[str, str]:
    """The environment (``NUMBA_CPU_NAME``, ``NUMBA_CPU_FEATURES``) that makes Numba compile every
    kernel for CPU ``name`` (a key of ``COMPILE_TARGETS``), so that tests and chapters take that
    CPU's paths and instructions. The code must still run here: ValueError names the features the
    host (``host_features``, default LLVM's view of this CPU) lacks. Timings mean nothing then."""
    if name not in COMPILE_TARGETS:
        raise ValueError(f"compile target must be one of {sorted(COMPILE_TARGETS)}, got {name!r}")
    host = llvm.get_host_cpu_features() if host_features is None else host_features
    needed = [f[1:] for f in COMPILE_TARGETS[name].split(",") if f.startswith("+")]
    missing = [f for f in needed if not host.get(f, False)]
    if missing:
        raise ValueError(f"this CPU cannot run code compiled for {name}: it lacks {', '.join(missing)}")
    return {"NUMBA_CPU_NAME": name, "NUMBA_CPU_FEATURES": COMPILE_TARGETS[name]}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key in ("model name", "Model", "Hardware") and value:
                return value
    except OSError:
        pass
    return platform.processor() or llvm.get_host_cpu_name()


def _base_features() -> dict[str, Any]:
    flags = target_flags()
    return {
        "arch": platform.machine(),
        "cpu": _cpu_model(),
        "llvm_cpu": numba.config.CPU_NAME or llvm.get_host_cpu_name(),
        "flags": flags,
        "avx2": "avx2" in flags,
        "avx512_vpopcntdq": "avx512_vpopcntdq" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
    }
