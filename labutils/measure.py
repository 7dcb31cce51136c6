"""Measuring a model on the CPU: threads, timings, peak memory, multiply-accumulates, energy.

The IMDb benchmark (``labutils.benchmark``), chapter 7 and lab 7 use these.

- ``threads(n)``: torch and Numba thread counts for a block, restored after.
- ``time_callable`` / ``interleaved_timings``: wall-clock seconds of every run (``Timing``).
  Timings are noisy on a shared machine: compare models with ``interleaved_timings``
  (round-robin, so a load spike hits every model alike) and report ratios.
- ``peak_memory``: the peak of resident memory above its level before the call, read from the
  Linux kernel (``VmHWM``), so torch, numpy and Numba allocations all count; on macOS and
  Windows from the process's lifetime peak or RSS polled during the call
  (``peak_memory_support()`` says which, and why).
- ``count_macs``: multiply-accumulates of one forward pass, linear layers and attention apart.
- ``energy_estimate``: those MACs times published per-operation energies (Horowitz, ISSCC 2014:
  the table BitNet and BitNet b1.58 use). Arithmetic only: no memory traffic, no control.
"""

from __future__ import annotations

import ctypes
import gc
import numbers
import re
import statistics
import sys
import threading
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
    "ENERGY_PJ_7NM",
    "SCHEMES",
    "MemoryPeak",
    "Timing",
    "count_macs",
    "energy_estimate",
    "interleaved_timings",
    "paired_ratio",
    "PEAK_METHODS",
    "peak_memory",
    "peak_memory_support",
    "resident_bytes",
    "threads",
    "time_callable",
]


def _check_int(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int >= minimum, else TypeError (not an int) or ValueError (too small)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_callable(fn: Any, name: str) -> None:
    if not callable(fn):
        raise TypeError(
            f"{name} must be callable (a function of no arguments), got {type(fn).__name__}"
        )


# --------------------------------------------------------------------------- threads


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads and ``n`` Numba threads; restore both after.

    Numba cannot use more threads than it started with (``numba.config.NUMBA_NUM_THREADS``, the
    core count by default), so its count is capped there. Numba is optional: without it only
    torch is set.

    Raises:
        TypeError: n is not an int. ValueError: n < 1.
    """
    n = _check_int(n, "threads n", 1)
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency of labutils
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
    """Wall-clock seconds of every timed run of one callable.

    Attributes:
        seconds: every timed run, in the order they ran (seconds, float).
        median: their median (seconds): the figure to report.
        best: the fastest run (seconds): the run least disturbed by other processes.
        runs: how many timed runs (len(seconds)).
    """

    seconds: list[float]
    median: float
    best: float
    runs: int

    @classmethod
    def from_seconds(cls, seconds: list[float]) -> Timing:
        """The Timing of these runs (at least one)."""
        if not seconds:
            raise ValueError("a Timing needs at least one run")
        seconds = [float(s) for s in seconds]
        return cls(
            seconds=seconds,
            median=statistics.median(seconds),
            best=min(seconds),
            runs=len(seconds),
        )

    def as_dict(self) -> dict[str, Any]:
        """{"seconds": [...], "median": s, "best": s, "runs": n}: JSON-friendly."""
        return {
            "seconds": list(self.seconds),
            "median": self.median,
            "best": self.best,
            "runs": self.runs,
        }


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_callable(
    fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 5, min_time: float = 0.0
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeat`` timed ones (``time.perf_counter``).

    If the timed runs add up to less than ``min_time`` seconds, keep going until they do, but
    stop at ``10 * repeat`` runs (so a fast function gets more samples, a slow one no more).

    Raises:
        TypeError: fn is not callable, or a count is not an int. ValueError: warmup < 0,
        repeat < 1, or min_time < 0.
    """
    _check_callable(fn, "fn")
    warmup = _check_int(warmup, "warmup", 0)
    repeat = _check_int(repeat, "repeat", 1)
    if (
        isinstance(min_time, bool)
        or not isinstance(min_time, numbers.Real)
        or not min_time >= 0
    ):
        raise ValueError(f"min_time must be a number of seconds >= 0, got {min_time!r}")
    for _ in range(warmup):
        fn()
    seconds = [_timed(fn) for _ in range(repeat)]
    while sum(seconds) < min_time and len(seconds) < 10 * repeat:
        seconds.append(_timed(fn))
    return Timing.from_seconds(seconds)


def interleaved_timings(
    fns: Mapping[str, Callable[[], Any]], *, warmup: int = 1, repeat: int = 5
) -> dict[str, Timing]:
    """Time several callables round-robin: run 1 of each (in ``fns``' order), then run 2 of
    each, ... so that a change in the machine's load hits all of them alike.

    ``warmup`` untimed rounds come first. Returns {name: Timing}, ``repeat`` runs each.

    Raises:
        TypeError: fns is not a mapping of callables, or a count is not an int.
        ValueError: fns is empty, warmup < 0 or repeat < 1.
    """
    if not isinstance(fns, Mapping):
        raise TypeError(
            f"fns must be a mapping {{name: callable}}, got {type(fns).__name__}"
        )
    if not fns:
        raise ValueError("fns is empty: give at least one callable to time")
    for name, fn in fns.items():
        _check_callable(fn, f"fns[{name!r}]")
    warmup = _check_int(warmup, "warmup", 0)
    repeat = _check_int(repeat, "repeat", 1)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            seconds[name].append(_timed(fn))
    return {name: Timing.from_seconds(s) for name, s in seconds.items()}


def paired_ratio(base: Timing, other: Timing) -> dict[str, Any]:
    """How many times faster ``other`` is than ``base``, from interleaved runs (round i of both
    under the same load): the ratio of medians, the spread of the per-round ratios (min, max),
    and a verdict: "faster" or "slower" when the whole spread is on one side of 1.0, else
    "no difference" (a ratio whose spread overlaps 1.0 is not reported as a speed-up)."""
    if base.runs != other.runs:
        raise ValueError(f"paired_ratio needs interleaved timings of as many runs, got {base.runs} and {other.runs}")
    per_round = [b / o for b, o in zip(base.seconds, other.seconds)]
    low, high = min(per_round), max(per_round)
    verdict = "faster" if low > 1.0 else "slower" if high < 1.0 else "no difference"
    return {"ratio": base.median / other.median, "spread": [low, high], "verdict": verdict}


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryPeak:
    """Resident memory (RSS) around one call, in bytes.

    Attributes:
        peak_bytes: high-water mark of RSS during the call minus RSS just before it.
        baseline_bytes: RSS just before the call (interpreter, libraries, weights, ...).
        method: how it was measured (``PEAK_METHODS``): "linux-vmhwm" (the kernel's VmHWM after
            a reset: exact to the page); "lifetime-peak" (elsewhere: the process's lifetime peak,
            ``ru_maxrss`` or Windows' PeakWorkingSetSize, rose during the call, so it is the
            call's peak); "sampled-rss" (it did not: RSS polled every millisecond during the
            call, which can miss a spike shorter than that).
    """

    peak_bytes: int
    baseline_bytes: int
    method: str = "linux-vmhwm"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


PEAK_METHODS = ("linux-vmhwm", "lifetime-peak", "sampled-rss")
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
_MMAP_THRESHOLD_BYTES = (
    128 * 1024
)  # glibc's default threshold, pinned so it stops adapting
_SAMPLE_SECONDS = 0.001


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), flags=re.MULTILINE)
    if match is None:  # pragma: no cover - Linux has had both lines since 2.6
        raise RuntimeError(f"/proc/self/status has no {field} line")
    return int(match.group(1))


def _glibc() -> ctypes.CDLL | None:
    """glibc with mallopt and malloc_trim, or None (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - musl has no malloc_trim
    except (OSError, AttributeError):
        return None
    return libc


def resident_bytes(trim: bool = False) -> int:
    """This process's resident set in bytes (Linux: /proc/self/status). ``trim``: first hand freed
    heap pages back to the OS (``gc.collect`` and glibc's ``malloc_trim``), so that a later growth
    is not hidden by pages that were freed and that the next allocation would reuse."""
    import gc

    if trim:
        gc.collect()
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)
    return _status_kib("VmRSS") * 1024


def _linux_reset_works() -> bool:
    """True where the kernel's VmHWM can be reset: Linux >= 4.0 with a writable clear_refs."""
    if not _CLEAR_REFS.exists() or not _STATUS.exists():
        return False
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:  # some containers mount /proc read-only
        return False
    return True


def _windows_memory() -> tuple[int, int] | None:
    """(WorkingSetSize, PeakWorkingSetSize) in bytes from psapi, or None off Windows."""
    if sys.platform != "win32":
        return None

    class Counters(ctypes.Structure):  # PROCESS_MEMORY_COUNTERS (psapi.h)
        _fields_ = [("cb", ctypes.c_ulong), ("PageFaultCount", ctypes.c_ulong)] + [
            (name, ctypes.c_size_t)
            for name in ("PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage",
                         "QuotaPagedPoolUsage", "QuotaPeakNonPagedPoolUsage",
                         "QuotaNonPagedPoolUsage", "PagefileUsage", "PeakPagefileUsage")
        ]

    counters = Counters()
    counters.cb = ctypes.sizeof(Counters)
    windll = ctypes.windll  # type: ignore[attr-defined]
    handle = windll.kernel32.GetCurrentProcess()
    if not windll.psapi.GetProcessMemoryInfo(handle, ctypes.byref(counters), counters.cb):
        return None
    return int(counters.WorkingSetSize), int(counters.PeakWorkingSetSize)


def _current_rss_reader() -> Callable[[], int] | None:
    """A function returning this process's RSS in bytes (psutil, or psapi on Windows), or None."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        process = psutil.Process()
        return lambda: int(process.memory_info().rss)
    if _windows_memory() is not None:
        return lambda: _windows_memory()[0]  # type: ignore[index]
    return None


def _lifetime_peak_bytes() -> int | None:
    """The process's peak RSS since it started, in bytes, or None where no API gives it.

    ``ru_maxrss`` is in KiB on Linux and the BSDs, in bytes on macOS; Windows has
    PeakWorkingSetSize instead. Neither can be reset, hence the comparison in peak_memory.
    """
    windows = _windows_memory()
    if windows is not None:
        return windows[1]
    try:
        import resource
    except ImportError:  # Windows without psapi, or an exotic platform
        return None
    maxrss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def peak_memory_support() -> tuple[str | None, str]:
    """How ``peak_memory`` will measure on this machine: (method or None, a sentence why).

    The method is "linux-vmhwm" where the kernel's peak can be reset, else "lifetime-peak" /
    "sampled-rss" (decided per call, see ``MemoryPeak``), reported here as
    "lifetime-peak or sampled-rss"; None where nothing can be measured (then ``peak_memory``
    raises RuntimeError with the same sentence). Chapters print the sentence and skip the
    memory column instead of failing.
    """
    if _linux_reset_works():
        return "linux-vmhwm", "Linux: the kernel's resident high-water mark (VmHWM), reset before each call"
    reader = _current_rss_reader()
    if reader is None:
        return None, (
            f"peak memory cannot be measured on {sys.platform}: the per-call reset needs Linux's "
            "/proc/self/clear_refs, and the fallback needs the current RSS, from psutil "
            "(pip install psutil) or, on Windows, psapi"
        )
    lifetime = "a lifetime peak" if _lifetime_peak_bytes() is not None else "no lifetime peak"
    return "lifetime-peak or sampled-rss", (
        f"{sys.platform}: no resettable peak (Linux's /proc/self/clear_refs); the call's peak is the "
        f"process's lifetime peak where the call raised it ({lifetime} available here), else RSS "
        f"polled every {_SAMPLE_SECONDS * 1e3:g} ms, which can miss a shorter spike"
    )


def _sampled_call(fn: Callable[[], Any], read_rss: Callable[[], int]) -> int:
    """Run fn while a thread polls read_rss; return the largest RSS seen (bytes)."""
    highest = [read_rss()]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            highest[0] = max(highest[0], read_rss())
            done.wait(_SAMPLE_SECONDS)

    poller = threading.Thread(target=poll, name="peak_memory-sampler", daemon=True)
    poller.start()
    try:
        result = fn()
        highest[0] = max(highest[0], read_rss())  # what fn still holds when it returns
        del result
    finally:
        done.set()
        poller.join()
    return highest[0]


def peak_memory(fn: Callable[[], Any]) -> MemoryPeak:
    """Peak extra resident memory while ``fn()`` runs: exact on Linux, approximate elsewhere.

    On Linux: pin glibc's mmap threshold at 128 KiB (``mallopt(M_MMAP_THRESHOLD, 131072)``:
    glibc otherwise raises it after large frees, and then big buffers land on the heap and stay
    resident; pinned, every buffer above 128 KiB is its own mapping and goes back to the OS when
    freed, so one measurement does not reuse memory an earlier one left behind),
    ``gc.collect()``, ``malloc_trim(0)``, reset the kernel's high-water mark (write "5" to
    /proc/self/clear_refs), read VmRSS, run ``fn``, read VmHWM. The difference counts every
    allocation of the process, torch, numpy and Numba alike, and every thread (unlike torch's
    profiler).

    Elsewhere (macOS, Windows, Linux with a read-only /proc), no peak can be reset. RSS is read
    before the call (psutil, or psapi on Windows) and polled every millisecond during it; if the
    process's lifetime peak (``ru_maxrss``, PeakWorkingSetSize) rose during the call, that is
    the call's peak ("lifetime-peak"), else the polled maximum is ("sampled-rss", which can miss
    a spike shorter than a millisecond). ``peak_memory_support()`` says which applies here.

    The pinned threshold stays set for the rest of the process (it is glibc's default value).
    ``fn``'s return value is dropped. Pages are counted when touched: ``torch.empty`` of 1 GB
    that is never written costs nothing.

    Returns:
        MemoryPeak(peak_bytes, baseline_bytes, method), in bytes (kernel pages: KiB resolution).

    Raises:
        TypeError: fn is not callable.
        RuntimeError: nothing can measure RSS here: not Linux with /proc/self/clear_refs, and
            neither psutil nor (on Windows) psapi is available. The message says what is missing.
    """
    _check_callable(fn, "fn")
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    gc.collect()  # free unreachable tensors first, so trimming can hand their memory back
    if libc is not None:
        libc.malloc_trim(0)
    if _linux_reset_works():  # the reset itself: VmHWM := VmRSS
        before = _status_kib("VmRSS")
        result = fn()
        peak = _status_kib("VmHWM")
        del result
        return MemoryPeak(
            peak_bytes=max(0, peak - before) * 1024, baseline_bytes=before * 1024
        )
    read_rss = _current_rss_reader()
    if read_rss is None:
        raise RuntimeError(peak_memory_support()[1])
    lifetime_before = _lifetime_peak_bytes()
    before = read_rss()
    sampled = _sampled_call(fn, read_rss)
    lifetime_after = _lifetime_peak_bytes()
    if lifetime_before is not None and lifetime_after is not None and lifetime_after > lifetime_before:
        peak, method = max(lifetime_after, sampled), "lifetime-peak"
    else:
        peak, method = sampled, "sampled-rss"
    return MemoryPeak(peak_bytes=max(0, peak - before), baseline_bytes=before, method=method)


# --------------------------------------------------------------------------- MACs


def _is_linear_like(module: nn.Module) -> bool:
    """A linear layer: int ``in_features`` and ``out_features`` and no linear layer inside.

    nn.Linear, BitLinear (an nn.Linear, maybe holding a norm), PackedBitLinear and torch's
    dynamic-quantized Linear (which holds a LinearPackedParams child: hence "no linear layer
    inside" rather than "no children")."""
    return (
        isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int)
        and not any(_is_linear_like(child) for child in module.children())
    )


def _attention_shape(module: nn.Module) -> tuple[int, int] | None:
    """(heads, head_dim) of a Hugging Face BERT-style attention module, else None."""
    heads = getattr(module, "num_attention_heads", None)
    head_dim = getattr(module, "attention_head_size", None)
    if isinstance(heads, int) and isinstance(head_dim, int):
        return heads, head_dim
    return None


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError("count_macs: a hooked layer was called without a tensor input")


@torch.no_grad()
def count_macs(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, int]:
    """Multiply-accumulates (MACs) of one ``model(*args, **kwargs)`` call, by kind.

    The model runs once under ``torch.no_grad`` with forward hooks (its train/eval mode is left
    as it is). MACs depend on shapes only, never on the weights' values, so a float model, its
    BitLinear copy and its packed copy count the same.

    - "linear": every linear layer (nn.Linear, BitLinear, PackedBitLinear, torch's
      dynamic-quantized Linear: any module with int in_features / out_features and no linear
      layer inside): ``in_features * out_features * rows``, rows = input elements / in_features
      (for hidden states [batch, L, in_features], rows = batch * L).
    - "attention": the two activation-by-activation products of every attention module
      (Q·K^T and P·V): ``2 * batch * heads * L_q * L_k * head_dim``. Attention modules are found
      by their ``num_attention_heads`` and ``attention_head_size`` attributes (Hugging Face
      BERT-style: BertSelfAttention, and the same in RoBERTa, MiniLM, ...), and L_q, L_k read
      from the hidden states they are called with (L_k from ``encoder_hidden_states`` for cross
      attention, else L_k = L_q). This does not depend on which kernel computes attention, so
      attn_implementation "eager" (two torch.matmul) and "sdpa" (one
      scaled_dot_product_attention) count the same. Cached keys (decoding) are not counted.
    - "total": their sum.

    Embeddings, norms, softmax, GELU and the scalings are not MACs and are left out.

    Returns:
        {"linear": int, "attention": int, "total": int}.

    Raises:
        TypeError: model is not an nn.Module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    counts = {"linear": 0, "attention": 0}

    def on_linear(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        rows = _first_tensor(args, kwargs).numel() // module.in_features
        counts["linear"] += rows * module.in_features * module.out_features

    def on_attention(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        heads, head_dim = _attention_shape(module)
        queries = args[0] if args else kwargs["hidden_states"]  # [batch, L_q, hidden]
        keys = kwargs.get("encoder_hidden_states")
        keys = queries if keys is None else keys  # [batch, L_k, hidden]
        batch, l_q, l_k = queries.shape[0], queries.shape[1], keys.shape[1]
        counts["attention"] += 2 * batch * heads * l_q * l_k * head_dim

    hooks = []
    for module in model.modules():
        if _is_linear_like(module):
            hooks.append(module.register_forward_hook(on_linear, with_kwargs=True))
        elif _attention_shape(module) is not None and not any(
            _attention_shape(m) is not None for m in module.modules() if m is not module
        ):  # the innermost module only, in case a wrapper repeats the attributes
            hooks.append(module.register_forward_hook(on_attention, with_kwargs=True))
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
"""Energy of one arithmetic operation in picojoules, 45 nm CMOS (0.9 V): M. Horowitz,
"Computing's energy problem (and what we can do about it)", ISSCC 2014, pp. 10-14. BitNet
(H. Wang et al., "BitNet: Scaling 1-bit Transformers for Large Language Models",
arXiv:2310.11453, Table 2, 45 nm column) and BitNet b1.58 (S. Ma et al., "The Era of 1-bit LLMs:
All Large Language Models are in 1.58 Bits", arXiv:2402.17764) estimate their energy with
this table. The int32 row is Horowitz's (BitNet's table has no int32 row)."""

ENERGY_PJ_7NM: dict[str, dict[str, float]] = {
    "fp32": {"mul": 1.31, "add": 0.38},
    "fp16": {"mul": 0.34, "add": 0.16},
    "int8": {"mul": 0.07, "add": 0.007},
}
"""The same operations at 7 nm, in picojoules: BitNet (arXiv:2310.11453), Table 2, 7 nm column,
citing Horowitz (ISSCC 2014) and Y. Zhang, Z. Zhang, L. Lew, "PokeBNN: A binary pursuit of
lightweight accuracy", CVPR 2022. There is no int32 row: use ``accumulator="int8"`` with it
(BitNet b1.58's own accounting, which prices its additions as INT8 additions)."""

SCHEMES = ("fp32", "int8", "w1.58a8", "w1a8", "w1a1")
_ACCUMULATOR_BITS = {"int32": 32, "int8": 8}

# W1A1: one 64-bit word of weights against one of activations is XNOR, popcount, accumulate.
# No published per-operation figure exists, so it is costed from adder bit-cells: an n-bit
# integer add costs n cells (Horowitz's adds grow about linearly with width: 0.03 pJ at 8 bits,
# 0.1 pJ at 32), an XNOR bit is counted as a full cell (an overestimate: no carry), and a 64-input
# popcount adder tree is 32*1 + 16*2 + 8*3 + 4*4 + 2*5 + 1*6 = 120 cells.
W1A1_CELLS_PER_WORD = 64 + 120
W1A1_ASSUMPTION = (
    "W1A1 (assumption, not a published figure): 64 binary MACs = one 64-bit XNOR + a 64-input "
    "popcount tree + one accumulator add, costed as (64 + 120) adder bit-cells at "
    "(accumulator add energy / accumulator bits) each, plus one accumulator add: "
    "about 0.0105 pJ per MAC with int32 at 45 nm"
)


def _pj(table: Mapping[str, Mapping[str, float]], kind: str, op: str) -> float:
    try:
        value = table[kind][op]
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"table has no energy for {kind} {op} (table[{kind!r}][{op!r}])"
        ) from err
    return float(value)


def _linear_pj(
    scheme: str, table: Mapping, accumulator: str, nonzero_fraction: float
) -> tuple[float, float]:
    """(multiply pJ, add pJ) per linear-layer MAC."""
    acc_add = _pj(table, accumulator, "add")
    if scheme == "fp32":
        return _pj(table, "fp32", "mul"), _pj(table, "fp32", "add")
    if scheme == "int8":
        return _pj(table, "int8", "mul"), acc_add
    if scheme == "w1.58a8":  # x * (+1, 0, -1) is add, skip, subtract
        return 0.0, nonzero_fraction * acc_add
    if scheme == "w1a8":  # x * (+1, -1) is add or subtract
        return 0.0, acc_add
    cell = acc_add / _ACCUMULATOR_BITS[accumulator]  # "w1a1"
    return 0.0, (W1A1_CELLS_PER_WORD * cell + acc_add) / 64


def _check_macs(macs: Any) -> tuple[int, int]:
    if not isinstance(macs, Mapping):
        raise TypeError(
            f"macs must be a mapping like count_macs' result, got {type(macs).__name__}"
        )
    values = []
    for key in ("linear", "attention"):
        if key not in macs:
            raise ValueError(
                f"macs has no {key!r} count (expected count_macs' keys linear, attention)"
            )
        values.append(_check_int(macs[key], f"macs[{key!r}]", 0))
    return values[0], values[1]


def energy_estimate(
    macs: Mapping[str, int],
    scheme: str,
    *,
    nonzero_fraction: float | None = None,
    accumulator: str = "int32",
    table: Mapping[str, Mapping[str, float]] = ENERGY_PJ,
) -> dict[str, Any]:
    """Arithmetic energy, in joules, of one forward pass whose MACs are ``macs`` (``count_macs``).

    Per linear-layer MAC, by ``scheme``:

    - "fp32": a float32 multiply and a float32 add.
    - "int8": an int8 multiply and an ``accumulator`` add (int32: what int8 GEMMs accumulate in).
    - "w1.58a8", "w1a8": one accumulator add and no multiply: a weight of +1, -1 (or 0) turns
      the multiply into an add, a subtract (or nothing): the argument of BitNet b1.58 (Ma et al.,
      2024, arXiv:2402.17764), whose matmul energy is mostly INT8 additions. For "w1.58a8" only
      the ``nonzero_fraction`` of weights that are not 0 cost anything (default 1).
    - "w1a1": see ``W1A1_ASSUMPTION`` (an assumption, returned in "assumptions").

    The per-tensor / per-token rescaling multiplies (one per output, not per MAC) are left out, as
    in BitNet's own estimate. Attention MACs (activations times activations, not quantized here)
    cost a float32 multiply and add in every scheme. BitNet and BitNet b1.58 price the additions
    of a quantized matmul as INT8 additions; the default here prices them at the int32 add of the
    accumulator, which is less flattering (0.1 vs 0.03 pJ at 45 nm); ``accumulator="int8"``
    reproduces their convention.

    Args:
        macs: {"linear": int, "attention": int, ...} (count_macs' result).
        scheme: one of SCHEMES.
        nonzero_fraction: w1.58a8 only: fraction of nonzero ternary weights, in [0, 1].
        accumulator: "int32" (default) or "int8": the integer add of the quantized schemes.
        table: pJ per operation, {kind: {"mul": pJ, "add": pJ}}: ENERGY_PJ (45 nm, default) or
            ENERGY_PJ_7NM (with accumulator="int8").

    Returns:
        {"scheme", "linear_macs", "attention_macs", "linear_pj_per_mac", "attention_pj_per_mac",
        "linear_j", "attention_j", "total_j", "breakdown_j": {"linear_mul", "linear_add",
        "attention_mul", "attention_add"}, "assumptions": str}; energies in joules.

    Raises:
        TypeError: macs is not a mapping or a count not an int.
        ValueError: unknown scheme or accumulator, negative or missing MACs, nonzero_fraction
            outside [0, 1] or given for another scheme than w1.58a8, an entry missing in table.
    """
    linear, attention = _check_macs(macs)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if accumulator not in _ACCUMULATOR_BITS:
        raise ValueError(
            f"accumulator must be one of {tuple(_ACCUMULATOR_BITS)}, got {accumulator!r}"
        )
    if nonzero_fraction is not None and scheme != "w1.58a8":
        raise ValueError(
            f"nonzero_fraction applies to scheme 'w1.58a8' only, got scheme {scheme!r}"
        )
    fraction = 1.0 if nonzero_fraction is None else nonzero_fraction
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, numbers.Real)
        or not 0.0 <= fraction <= 1.0
    ):
        raise ValueError(
            f"nonzero_fraction must be a number in [0, 1], got {nonzero_fraction!r}"
        )

    lin_mul, lin_add = _linear_pj(scheme, table, accumulator, float(fraction))
    att_mul, att_add = _pj(table, "fp32", "mul"), _pj(table, "fp32", "add")
    breakdown = {
        "linear_mul": linear * lin_mul * 1e-12,
        "linear_add": linear * lin_add * 1e-12,
        "attention_mul": attention * att_mul * 1e-12,
        "attention_add": attention * att_add * 1e-12,
    }
    linear_j = breakdown["linear_mul"] + breakdown["linear_add"]
    attention_j = breakdown["attention_mul"] + breakdown["attention_add"]
    assumptions = (
        f"arithmetic only (no memory traffic, no control); per-operation energies from the given table "
        f"(default Horowitz, ISSCC 2014, 45 nm); quantized adds priced as {accumulator} adds; "
        "attention products in fp32; per-output rescaling multiplies left out"
    )
    if scheme == "w1.58a8":
        assumptions += (
            f"; only the nonzero fraction {fraction:g} of ternary weights costs an add"
        )
    if scheme == "w1a1":
        assumptions += "; " + W1A1_ASSUMPTION
    return {
        "scheme": scheme,
        "linear_macs": linear,
        "attention_macs": attention,
        "linear_pj_per_mac": lin_mul + lin_add,
        "attention_pj_per_mac": att_mul + att_add,
        "linear_j": linear_j,
        "attention_j": attention_j,
        "total_j": linear_j + attention_j,
        "breakdown_j": breakdown,
        "assumptions": assumptions,
    }
