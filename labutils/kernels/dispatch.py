"""Which path runs: CPU detection, the default (best available) path, and the switches that
force one (``use(path)`` for a block of code, ``LABBOOK_KERNEL_PATH`` for a whole process).

Paths (``PATHS``): "avx512" needs AVX512F/BW, VPOPCNTDQ and VNNI; "avx2" needs AVX2; "generic"
runs everywhere. Forcing a path this CPU cannot execute raises a RuntimeError naming the
missing features, instead of crashing on an illegal instruction.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numba
import numpy as np

from labutils.kernels import amx, fused, generic, microkernels_avx2, microkernels_avx512
from labutils.kernels.cpu import PATHS, _base_features, available_paths, missing_features
from labutils.kernels.layout import _A8_COLS, _A8_GROUP, PackedWeights, _check_threads

ENV_VAR = "LABBOOK_KERNEL_PATH"

_KERNELS = {"avx512": microkernels_avx512.KERNELS, "avx2": microkernels_avx2.KERNELS, "generic": generic.KERNELS}
# The fused layers (activation quantization + kernel + rescale and bias in one compiled call),
# on the paths that have them; elsewhere PackedBitLinear runs the unfused steps.
_FUSED = {path: module.FUSED for path, module in
          (("avx512", microkernels_avx512), ("avx2", microkernels_avx2), ("generic", generic)) if hasattr(module, "FUSED")}

SIGNATURES = {
    "w1a1": "void(uint64[:, ::1], uint64[:, :, ::1], int64, int32[:, ::1])",
    "w1a8": "void(int8[:, ::1], uint8[:, :, :, ::1], int32[::1], int32[:, ::1])",
    "w1.58a8": "void(int8[:, ::1], uint8[:, :, :, ::1], int32[::1], int32[:, ::1])",
}
"""The Numba signature of every path's (parallel and serial) kernels of a scheme."""

_forced: list[str] = []  # the stack of use() blocks, innermost last


def check_path(path: Any) -> str:
    """``path`` if this CPU can execute it; ValueError for an unknown path, RuntimeError naming
    the CPU features it lacks otherwise."""
    if not isinstance(path, str) or path not in PATHS:
        raise ValueError(f"kernel path must be one of {PATHS}, got {path!r}")
    missing = missing_features(path)
    if missing:
        raise RuntimeError(
            f"kernel path {path!r} needs CPU features {', '.join(missing)}, which this CPU (as Numba "
            f"compiles for it) lacks; available paths: {available_paths()}"
        )
    return path


def _env_path() -> str | None:
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    try:
        return check_path(value)
    except (ValueError, RuntimeError) as error:
        raise type(error)(f"{ENV_VAR}={value!r}: {error}") from None


def active_path() -> str:
    """The path the kernels run now: the innermost ``use()`` block, else ``LABBOOK_KERNEL_PATH``,
    else the best path this CPU can execute (the first of ``available_paths()``)."""
    if _forced:
        return _forced[-1]
    return _env_path() or available_paths()[0]


@contextlib.contextmanager
def use(path: str) -> Iterator[str]:
    """Force ``path`` ("avx512", "avx2" or "generic") for the kernels called inside the block.

    ``with kernels.use("generic"): y = kernels.w158a8_gemm(x, w)``. Raises ValueError for an
    unknown path and RuntimeError (naming the missing features) for a path this CPU cannot run.
    Not thread-safe: the choice is process-wide while the block runs.
    """
    _forced.append(check_path(path))
    try:
        yield path
    finally:
        _forced.pop()


def cpu_features() -> dict[str, Any]:
    """What was detected and which path runs.

    Returns a dict: ``arch`` (platform.machine()), ``cpu`` (model name), ``llvm_cpu`` (the CPU
    name Numba compiles for), ``flags`` (sorted list of the relevant features: avx2, avx512f,
    avx512bw, avx512_vpopcntdq, avx512_vnni, avx_vnni, popcnt, neon, asimd), booleans ``avx2``,
    ``avx512_vpopcntdq``, ``avx512_vnni``, ``avx_vnni``, ``path`` (active_path()) and
    ``available_paths`` (list). Features come from LLVM, so they agree with what Numba emits.
    """
    return {**_base_features(), "path": active_path(), "available_paths": list(available_paths())}


def kernel_for(scheme: str, path: str | None = None, *, parallel: bool = True) -> Any:
    """The Numba dispatcher of ``scheme``'s kernel on ``path`` (None: the active path)."""
    path = active_path() if path is None else check_path(path)
    return _KERNELS[path][scheme][0 if parallel else 1]


# Below this many multiply-adds one thread finishes before a parallel region pays for itself
# (starting and joining Numba's threads costs ~3 us; measured crossovers on 2 cores: ~5M
# binary MACs, ~1M int8 MACs).
_PARALLEL_MIN_MACS = {"w1a1": 1 << 23, "w1a8": 1 << 20, "w1.58a8": 1 << 20}


def _on_amx(scheme: str, m: int, w: PackedWeights, path: str) -> bool:
    """True where ``path`` (the active one) runs an A8 GEMM of ``m`` tokens on AMX tiles: the
    avx512 path on a CPU with AMX-INT8 (Sapphire Rapids on), at least 16 tokens, whole 64-byte
    blocks of k (``amx``)."""
    if path != "avx512" or scheme not in amx.KERNELS:
        return False
    return amx.usable(m, w.data.shape[1] * (16 if scheme == "w1.58a8" else 32))


def _launch(scheme: str, w: PackedWeights, m: int, threads: int | None, *args: Any) -> None:
    """Run the scheme's kernel on the active path: serial for one thread or little work, else
    parallel on ``threads`` threads (Numba's current setting when None)."""
    _check_threads(threads)
    path = active_path()
    parallel, serial = _KERNELS[path][scheme]
    if _on_amx(scheme, m, w, path):
        parallel, serial = amx.KERNELS[scheme]
    current = numba.get_num_threads()
    wanted = current if threads is None else int(threads)
    if wanted == 1 or m * w.n * w.k < _PARALLEL_MIN_MACS[scheme]:
        serial(*args)
    elif wanted == current:
        parallel(*args)
    else:
        numba.set_num_threads(wanted)
        try:
            parallel(*args)
        finally:
            numba.set_num_threads(current)


def fused_for(scheme: str, m: int, w: PackedWeights, threads: int | None) -> Any:
    """The fused layer of ``scheme`` on the active path for ``m`` tokens, serial for one thread
    or little work (as ``_launch``), else parallel; None where the path has no fused layer. An A8
    GEMM that ``_launch`` would run on AMX gets ``_amx_layer``'s three calls. ``threads`` other
    than Numba's current count is set for the call by the caller (``PackedBitLinear`` leaves it
    None: one thread count for torch and Numba, set once)."""
    # Called once per layer call: one read of the active path (it reads the environment).
    path = active_path()
    layers = _FUSED.get(path)
    if layers is None:
        return None
    # little work runs serially whatever the thread count (asking Numba for it costs a microsecond)
    serial_work = m * w.n * w.k < _PARALLEL_MIN_MACS[scheme] or (numba.get_num_threads() if threads is None else threads) == 1
    if _on_amx(scheme, m, w, path):
        return _amx_layer(scheme, w, amx.KERNELS[scheme][1 if serial_work else 0])
    parallel, serial = layers[scheme]
    return serial if serial_work else parallel


def _amx_layer(scheme: str, w: PackedWeights, gemm: Any) -> Any:
    """The fused layer's call (``xf, w.data, ws, bias, y, qp, eps`` -> per-token scales) where
    the A8 GEMM runs on AMX tiles, which take whole blocks of codes and so cannot sit inside the
    per-row loop: the activation quantization, the GEMM and the rescale as three compiled calls
    (the same steps, so the same bits, as the fused layers of the other paths)."""
    kp = w.data.shape[1] * _A8_GROUP[scheme]

    def layer(xf, data, ws, bias, y, qp, eps):
        codes, xs, rowsum = fused.quantize_rows_a8(xf, kp, qp, eps)
        dots = np.empty((xf.shape[0], data.shape[0] * _A8_COLS), dtype=np.int32)
        gemm(codes, data, rowsum, dots)
        fused.rescale_rows(dots, xs, ws, bias, y)
        return xs

    return layer


_env_path()  # a bad LABBOOK_KERNEL_PATH fails at import, not at the first kernel call
