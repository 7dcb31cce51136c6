"""Measuring a model on the CPU: threads, timings, peak memory, multiply-accumulates, energy.

The IMDb benchmark (``labutils.benchmark``), chapter 7 and lab 7 use these. Timings are wall
clock and noisy on a shared machine; compare models with ``interleaved_timings`` (round-robin, so
a load spike hits every model alike) and report ratios, never absolute times in tests.

Peak memory is read from the kernel (Linux ``VmHWM``), so it counts every allocation: torch,
numpy and the Numba kernels alike. MACs are counted with forward hooks; the energy estimate
multiplies them by published per-operation energies (Horowitz, ISSCC 2014, the table BitNet
cites), which is arithmetic only: no memory traffic, no control.
"""

from __future__ import annotations

import ctypes
import gc
import re
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "ENERGY_PJ",
    "MemoryPeak",
    "Timing",
    "count_macs",
    "energy_estimate",
    "interleaved_timings",
    "peak_memory",
    "threads",
    "time_callable",
]


# --------------------------------------------------------------------------- threads


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads and ``n`` Numba threads; restore both after."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive int, got {n!r}")
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency
        numba = None
    old_torch = torch.get_num_threads()
    old_numba = numba.get_num_threads() if numba else None
    torch.set_num_threads(n)
    if numba:
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        torch.set_num_threads(old_torch)
        if numba:
            numba.set_num_threads(old_numba)


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of every timed run of one callable."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def runs(self) -> int:
        return len(self.seconds)

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": list(self.seconds), "median": self.median, "best": self.best, "runs": self.runs}


def _check_counts(warmup: Any, repeat: Any) -> None:
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be a positive int, got {repeat!r}")


def time_callable(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 5, min_time: float = 0.0) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then at least ``repeat`` times timed (more, up to
    ``10 * repeat``, until ``min_time`` seconds are spent)."""
    _check_counts(warmup, repeat)
    for _ in range(warmup):
        fn()
    seconds: list[float] = []
    while len(seconds) < repeat or (sum(seconds) < min_time and len(seconds) < 10 * repeat):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return Timing(tuple(seconds))


def interleaved_timings(
    fns: Mapping[str, Callable[[], Any]], *, warmup: int = 1, repeat: int = 5
) -> dict[str, Timing]:
    """Time several callables round-robin: run 1 of each, then run 2 of each, ... so that a
    change in the machine's load affects all of them alike. Returns {name: Timing}."""
    _check_counts(warmup, repeat)
    if not fns:
        raise ValueError("fns is empty: give at least one callable to time")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(s)) for name, s in seconds.items()}


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryPeak:
    """Resident memory around one call: the peak above the level just before it."""

    peak_bytes: int  # high-water mark during the call minus resident memory just before it
    baseline_bytes: int  # resident memory just before the call (weights, interpreter, ...)
    method: str = "linux-vmhwm"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_M_MMAP_THRESHOLD = -3


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), flags=re.M)
    if match is None:  # pragma: no cover - every Linux since 2.6 has both fields
        raise RuntimeError(f"/proc/self/status has no {field} line")
    return int(match.group(1))


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6")


def peak_memory(fn: Callable[[], Any]) -> MemoryPeak:
    """Peak extra resident memory (bytes) while ``fn()`` runs, measured by the Linux kernel.

    glibc's mmap threshold is fixed at 128 KiB (so every large buffer is its own mapping and
    really goes back to the OS when freed, and a later measurement does not reuse memory an
    earlier one left behind), the heap is trimmed, the kernel's high-water mark is reset (writing
    "5" to /proc/self/clear_refs), then ``VmHWM - VmRSS`` around the call is the peak. This counts
    torch, numpy and Numba allocations alike.

    Raises:
        RuntimeError: not on Linux with glibc (no /proc/self/clear_refs or no libc.so.6).
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not _CLEAR_REFS.exists():
        raise RuntimeError(
            "peak_memory needs Linux (/proc/self/clear_refs to reset the resident-memory high-water mark)"
        )
    try:
        libc = _libc()
    except OSError as err:
        raise RuntimeError("peak_memory needs glibc (libc.so.6) to pin the mmap threshold") from err
    libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    gc.collect()
    libc.malloc_trim(0)
    _CLEAR_REFS.write_text("5")
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return MemoryPeak(peak_bytes=max(0, peak - before) * 1024, baseline_bytes=before * 1024)


# --------------------------------------------------------------------------- MACs


def _is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, BitLinear, PackedBitLinear, torch's dynamic-quantized Linear: a leaf layer with
    in_features and out_features."""
    return (
        isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int)
        and not any(_is_linear_like(child) for child in module.children())
    )


def _attention_shape(module: nn.Module) -> tuple[int, int] | None:
    """(heads, head_dim) of a Hugging Face BERT-style self-attention module, else None."""
    heads = getattr(module, "num_attention_heads", None)
    head_dim = getattr(module, "attention_head_size", None)
    if isinstance(heads, int) and isinstance(head_dim, int):
        return heads, head_dim
    return None


@torch.no_grad()
def count_macs(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, int]:
    """Multiply-accumulates of one ``model(*args, **kwargs)`` call, by kind.

    - "linear": every linear layer (nn.Linear, BitLinear, PackedBitLinear, dynamic-quantized
      Linear): ``in_features * out_features * rows`` where rows = input elements / in_features.
    - "attention": the two activation-by-activation products of every self-attention
      (Q·K^T and P·V): ``2 * batch * heads * L * L * head_dim``, with L the length of the
      attention module's input (hidden states [batch, L, hidden]); the same for eager and SDPA.
    - "total": their sum.

    MACs do not depend on the weights' values, only on the shapes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    counts = {"linear": 0, "attention": 0}
    hooks = []

    def on_linear(module: nn.Module, inputs: tuple, output: Any) -> None:
        rows = inputs[0].numel() // module.in_features
        counts["linear"] += rows * module.in_features * module.out_features

    def on_attention(module: nn.Module, inputs: tuple, output: Any) -> None:
        heads, head_dim = _attention_shape(module)
        hidden = inputs[0]
        batch, length = hidden.shape[0], hidden.shape[1]
        counts["attention"] += 2 * batch * heads * length * length * head_dim

    for module in model.modules():
        if _is_linear_like(module):
            hooks.append(module.register_forward_hook(on_linear))
        elif _attention_shape(module) is not None:
            hooks.append(module.register_forward_hook(on_attention))
    try:
        model(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    counts["total"] = counts["linear"] + counts["attention"]
    return counts


# --------------------------------------------------------------------------- energy

ENERGY_PJ: dict[str, dict[str, float]] = {
    "fp32": {"mul": 3.7, "add": 0.9},
    "fp16": {"mul": 1.1, "add": 0.4},
    "int32": {"mul": 3.1, "add": 0.1},
    "int8": {"mul": 0.2, "add": 0.03},
}
"""Energy of one arithmetic operation in picojoules, 45 nm CMOS: M. Horowitz, "Computing's
energy problem (and what we can do about it)", ISSCC 2014. BitNet (Wang et al., 2023,
arXiv:2310.11453) and BitNet b1.58 (Ma et al., 2024, arXiv:2402.17764) estimate their energy
savings from this table."""

SCHEMES = ("fp32", "int8", "w1.58a8", "w1a8", "w1a1")
W1A1_ASSUMPTION = (
    "W1A1: one 64-wide XNOR + popcount + accumulate is costed as two int32 adds per 64 MACs "
    "(no published per-operation figure; an assumption, not a measurement)"
)


def energy_estimate(
    macs: Mapping[str, int],
    scheme: str,
    *,
    nonzero_fraction: float = 1.0,
    table: Mapping[str, Mapping[str, float]] = ENERGY_PJ,
) -> dict[str, Any]:
    """Arithmetic energy (joules) of one forward pass with ``macs`` (from ``count_macs``).

    Linear MACs: "fp32" a float32 multiply and add; "int8" an int8 multiply and an int32 add;
    "w1.58a8" and "w1a8" one int32 add (±1 / 0 weights need no multiply: the BitNet b1.58
    argument), only for the ``nonzero_fraction`` of weights that are not 0; "w1a1" see
    ``W1A1_ASSUMPTION``. Attention MACs (activations by activations) are float32 in every scheme.

    Returns:
        {"linear_j", "attention_j", "total_j", "pj_per_linear_mac", "assumptions"}.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    for key in ("linear", "attention"):
        value = macs.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"macs[{key!r}] must be an int >= 0, got {value!r}")
    if not 0.0 <= nonzero_fraction <= 1.0:
        raise ValueError(f"nonzero_fraction must be in [0, 1], got {nonzero_fraction!r}")
    fp32_mac = table["fp32"]["mul"] + table["fp32"]["add"]
    per_mac = {
        "fp32": fp32_mac,
        "int8": table["int8"]["mul"] + table["int32"]["add"],
        "w1.58a8": nonzero_fraction * table["int32"]["add"],
        "w1a8": table["int32"]["add"],
        "w1a1": 2 * table["int32"]["add"] / 64,
    }[scheme]
    assumptions = "Horowitz (ISSCC 2014) 45 nm energies; arithmetic only (no memory traffic)"
    if scheme == "w1a1":
        assumptions += "; " + W1A1_ASSUMPTION
    linear_j = macs["linear"] * per_mac * 1e-12
    attention_j = macs["attention"] * fp32_mac * 1e-12
    return {
        "linear_j": linear_j,
        "attention_j": attention_j,
        "total_j": linear_j + attention_j,
        "pj_per_linear_mac": per_mac,
        "assumptions": assumptions,
    }
