"""Where the time of a packed model's forward pass goes: ``profile_packed_forward``.

Module hooks time every module (inclusive, then exclusive of its children); every
``PackedBitLinear`` reports its own steps (``PackedBitLinear._forward``'s ``mark``). The kernel
calls seen in the model are re-run afterwards in isolation, back to back (warm caches, the
thread pool awake): what the model spent on them beyond that is charged to
``thread_handoffs`` (waking the pool after a torch op, another process on a core, cold caches).

Categories (seconds per forward pass, the median over ``repeat`` passes):

- ``integer_kernel``: the Numba kernels in isolation (for the fused layer: activation
  quantization, kernel, rescale and bias together, since they are one compiled pass).
- ``activation_quantization``, ``rescale_bias``: the torch steps around an unfused kernel.
- ``conversions``: reshapes, dtype casts, torch<->numpy, the kernel wrapper's checks, padding
  and copies.
- ``thread_handoffs``: kernel time in the model minus the same calls in isolation.
- ``attention``: the self-attention modules without their Q/K/V linears (SDPA or eager,
  head reshapes).
- ``norms_gelu``: LayerNorms and the GELU. ``embeddings``: the embedding lookups.
- ``float_linears``: torch's linears (pooler, classifier; every linear of FP32, and of torch's
  dynamic INT8 model).
- ``other``: everything else (residual adds, dropout, the model's Python).

``total`` is the median hooked wall time, ``total_unhooked`` the median wall time of the same
call without hooks, interleaved with the hooked ones. What the profiler itself costs is reported,
not hidden in a section: ``profiler_overhead`` is the number of hooked module calls in a pass
(``hook_calls``) times the measured cost of one call's pre and post hooks (``hook_cost``: the
same hooks on an ``nn.Identity``, against the bare call), taken out of ``other``, where the hooks'
time lands; ``hooked_minus_unhooked`` is the direct difference of the two totals (noisier: two
medians of different passes).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

CATEGORIES = (
    "integer_kernel",
    "activation_quantization",
    "rescale_bias",
    "conversions",
    "thread_handoffs",
    "attention",
    "norms_gelu",
    "embeddings",
    "float_linears",
    "other",
)


def _category(module: nn.Module) -> str:
    name = type(module).__name__
    if isinstance(module, (nn.LayerNorm, nn.GELU)) or "LayerNorm" in name or "RMSNorm" in name or "GELU" in name:
        return "norms_gelu"
    if isinstance(module, nn.Embedding) or "Embedding" in name and not name.endswith("Embeddings"):
        return "embeddings"
    if name.endswith("SelfAttention"):
        return "attention"
    if isinstance(module, nn.Linear) or name.endswith("Linear") and "Packed" not in name:  # torch INT8 too
        return "float_linears"
    return "other"


def _isolated(fn: Callable[[], Any], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _raw_kernel(codes: np.ndarray, weights: Any, threads: int | None) -> Callable[[], Any]:
    """The Numba kernel of an unfused ``packed_matmul`` call, on arrays prepared beforehand."""
    from labutils.kernels import dispatch, matmul

    if weights.scheme == "w1a1":
        out = np.empty((codes.shape[0], weights.data.shape[0] * matmul._W1A1_COLS), dtype=np.int32)
        args = (codes, weights.data, weights.k, out)
    else:
        kp = weights.data.shape[1] * matmul._A8_GROUP[weights.scheme]
        x = np.pad(codes, ((0, 0), (0, kp - weights.k))) if kp != weights.k else codes
        out = np.empty((x.shape[0], weights.data.shape[0] * matmul._A8_COLS), dtype=np.int32)
        args = (x, weights.data, matmul._row_sums(x), out)
    return lambda: dispatch._launch(weights.scheme, weights, codes.shape[0], threads, *args)


def _called_children(key: int, children: Mapping[int, list[int]], called: Mapping[int, float]) -> list[int]:
    """The nearest descendants of module ``key`` that ran (a ModuleList never runs itself)."""
    found = []
    for child in children[key]:
        found.extend([child] if child in called else _called_children(child, children, called))
    return found


def _timing_hooks(starts: dict[int, list[float]], inclusive: dict[int, float], calls: list[int]) -> tuple[Callable, Callable]:
    """The profiler's forward pre-hook and hook: a module's inclusive seconds into ``inclusive``,
    the number of module calls they saw into ``calls[0]``."""

    def pre(module: nn.Module, args: Any) -> None:
        calls[0] += 1
        starts.setdefault(id(module), []).append(time.perf_counter())

    def post(module: nn.Module, args: Any, output: Any) -> None:
        inclusive[id(module)] = inclusive.get(id(module), 0.0) + time.perf_counter() - starts[id(module)].pop()

    return pre, post


def hook_cost(calls: int = 2000, rounds: int = 5) -> float:
    """Seconds the profiler's two hooks add to one module call: an ``nn.Identity`` called
    ``calls`` times with them and without, interleaved over ``rounds``; the median difference."""
    from labutils.measure import interleaved_timings

    bare, hooked = nn.Identity(), nn.Identity()
    pre, post = _timing_hooks({}, {}, [0])
    hooked.register_forward_pre_hook(pre)
    hooked.register_forward_hook(post)
    x = torch.zeros(1)

    def loop(module: nn.Module) -> Callable[[], None]:
        def run() -> None:
            for _ in range(calls):
                module(x)

        return run

    timings = interleaved_timings({"bare": loop(bare), "hooked": loop(hooked)}, warmup=1, repeat=rounds)
    diffs = [h - b for h, b in zip(timings["hooked"].seconds, timings["bare"].seconds)]
    return max(statistics.median(diffs) / calls, 0.0)


def _one_pass(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, float]:
    from labutils.kernels.layer import PackedBitLinear

    inclusive: dict[int, float] = {}
    starts: dict[int, list[float]] = {}
    children = {id(m): [id(c) for c in m.children()] for m in model.modules()}
    categories = {id(m): _category(m) for m in model.modules()}
    sections: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
    kernel_calls: list[tuple[float, Any]] = []
    marked = [0.0]  # seconds the packed layers' marks accounted for

    hook_calls = [0]
    pre, post = _timing_hooks(starts, inclusive, hook_calls)
    handles = []
    originals = {}
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
        if isinstance(module, PackedBitLinear):
            originals[module] = module.forward

            def forward(x: torch.Tensor, _m: PackedBitLinear = module) -> torch.Tensor:
                last = [time.perf_counter()]

                def mark(section: str, payload: Any = None) -> None:
                    now = time.perf_counter()
                    marked[0] += now - last[0]
                    if payload is not None:
                        kernel_calls.append((now - last[0], payload))
                    else:
                        sections[section] += now - last[0]
                    last[0] = time.perf_counter()

                return _m._forward(x, mark)

            module.forward = forward
    try:
        start = time.perf_counter()
        with torch.inference_mode():
            model(**inputs)
        total = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
        for module, fwd in originals.items():
            del module.forward
    packed = {id(m) for m in originals}
    for key, seconds in inclusive.items():
        if key in packed:
            continue  # broken down by its own marks (below)
        own = seconds - sum(inclusive[c] for c in _called_children(key, children, inclusive))
        sections[categories[key]] += own
    for in_model, payload in kernel_calls:
        if callable(payload):  # the fused layer: one compiled call
            alone = _isolated(payload)
            sections["integer_kernel"] += alone
        else:
            codes, weights, threads = payload
            from labutils.kernels.matmul import packed_matmul

            alone = _isolated(lambda: packed_matmul(codes, weights, threads=threads))
            raw = _isolated(_raw_kernel(codes, weights, threads))
            sections["integer_kernel"] += raw
            sections["conversions"] += max(alone - raw, 0.0)
        sections["thread_handoffs"] += max(in_model - alone, 0.0)
    # the packed layers' time their marks did not see (the checks before the first mark, hooks)
    sections["other"] += max(sum(inclusive.get(id(m), 0.0) for m in originals) - marked[0], 0.0)
    sections["total"] = total
    sections["hook_calls"] = float(hook_calls[0])
    return sections


def profile_packed_forward(model: nn.Module, inputs: Mapping[str, Any], *, repeat: int = 3, warmup: int = 1) -> dict[str, float]:
    """Seconds per forward pass of ``model(**inputs)`` by category (see the module docstring).

    Works on any model (FP32 too: its linears land in ``float_linears``); the packed layers'
    steps come from ``PackedBitLinear``. Returns {category: median seconds} plus ``total``
    (hooked), ``total_unhooked``, ``hook_calls``, ``hook_cost``, ``profiler_overhead`` (taken out
    of ``other``), ``hooked_minus_unhooked`` and ``repeat``.
    """
    with torch.inference_mode():
        for _ in range(warmup):
            model(**inputs)
    passes, plain = [], []
    for _ in range(repeat):
        passes.append(_one_pass(model, inputs))
        start = time.perf_counter()
        with torch.inference_mode():
            model(**inputs)
        plain.append(time.perf_counter() - start)
    result = {key: statistics.median(p[key] for p in passes) for key in passes[0]}
    result["total_unhooked"] = statistics.median(plain)
    result["hook_cost"] = hook_cost()
    result["profiler_overhead"] = min(result["hook_calls"] * result["hook_cost"], result["other"])
    result["other"] -= result["profiler_overhead"]
    result["hooked_minus_unhooked"] = result["total"] - result["total_unhooked"]
    result["repeat"] = repeat
    return result
