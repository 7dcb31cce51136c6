"""Where the time between the kernels goes: one small experiment per hypothesis (issue 27).

``python -m labutils.engine.overhead`` runs them and prints one line each; the record of a run
(machine, load, figures) is ``results/engine/overhead.md``. Each experiment times two variants
that differ in one thing, interleaved round by round (a burst of load from the other processes
of a shared machine hits both alike), and reports the median time per call of each and the
ratio with the spread of the per-round ratios (:func:`labutils.measure.paired_ratio`).

The hypotheses, each about the unfused packed decoder's step (``PackedBitLinear`` between torch
operations, a few hundred small calls a token):

1. ``region``: the cost of entering one Numba parallel region, per threading layer (``omp``,
   ``workqueue``, ``tbb`` where installed), against the same loop compiled serial. Each layer
   runs in a fresh process (Numba picks its layer once, at the first parallel launch).
2. ``two_pools``: torch and Numba each bring an OpenMP runtime (two copies of libgomp, so two
   thread pools). A Numba parallel GEMV right after a torch op that ran on torch's pool (the
   float head's matrix-vector product) against the same GEMV after nothing.
3. ``conversions``: the per-linear torch<->numpy hand-over of ``PackedBitLinear`` (reshape,
   ``.float()``, ``.numpy()``, ``torch.from_numpy``, the result's cast), against nothing.
4. ``allocation``: fresh output arrays per call (``np.empty``) against preallocated ones.
5. ``dispatch``: calling a compiled function from Python (Numba's dispatcher checks the types of
   every argument) against the same call made from inside one compiled loop.
6. ``step``: the whole thing: one 700m-shaped decoder block's generation step through the
   packed torch modules (``PackedBitLinear`` between torch ops) against the engine's compiled
   step (:mod:`labutils.engine.decoder`) on the same weights.
7. ``threads``: the engine's step on 2 threads against 1: on a machine whose other processes
   hold the cores, every parallel region waits for its second thread to be scheduled.
8. ``bandwidth``: is a generated token bound by memory? The bytes one 700m engine step reads
   (its ternary codes, the bfloat16 head table, the bfloat16 KV cache at position 128) over the
   step's time, and the codes over the ternary kernels' time, against a plain parallel read of
   512 MB (a float32 sum LLVM vectorizes) on the same threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["EXPERIMENTS", "run_experiment", "region_cost", "profile_before_after", "main"]


def _paired(a: Callable[[], Any], b: Callable[[], Any], calls: int, rounds: int) -> dict[str, Any]:
    """Median seconds per call of ``a`` and ``b`` (``calls`` calls a round, ``rounds`` rounds,
    interleaved after one warm-up round) and the paired ratio a/b."""
    from labutils.measure import Timing, paired_ratio

    seconds: dict[str, list[float]] = {"a": [], "b": []}
    for r in range(rounds + 1):
        for name, fn in (("a", a), ("b", b)):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            if r:
                seconds[name].append((time.perf_counter() - start) / calls)
    ta, tb = Timing.from_seconds(seconds["a"]), Timing.from_seconds(seconds["b"])
    return {"a_us": 1e6 * ta.median, "b_us": 1e6 * tb.median, "a_over_b": paired_ratio(tb, ta)}


def region_cost(layer: str, calls: int = 2000, rounds: int = 7) -> dict[str, Any]:
    """Experiment 1 in a fresh process: µs per call of a 2-iteration ``prange`` loop under
    Numba threading layer ``layer`` (a) against the same loop compiled serial (b)."""
    code = (
        "import json, numpy as np, numba\n"
        "from numba import njit, prange\n"
        "from labutils.engine.overhead import _paired\n"
        "def body(a):\n"
        "    for i in prange(a.shape[0]):\n"
        "        a[i] += 1.0\n"
        "par, ser = njit(parallel=True)(body), njit(body)\n"
        "a = np.zeros(2)\npar(a); ser(a)\n"
        f"out = _paired(lambda: par(a), lambda: ser(a), {calls}, {rounds})\n"
        "out['layer'] = numba.threading_layer()\nprint(json.dumps(out))\n"
    )
    env = {**os.environ, "NUMBA_THREADING_LAYER": layer}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        return {"layer": layer, "unavailable": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gemv_setup(n: int, k: int, seed: int = 0):
    """A ternary [n, k] layer's packed weights, int8 codes of one token and the raw parallel
    kernel call on preallocated arrays (no checks, no allocation)."""
    from labutils.kernels import prepack_w158a8
    from labutils.kernels.dispatch import kernel_for

    rng = np.random.default_rng(seed)
    w = prepack_w158a8(rng.integers(-1, 2, (n, k)).astype(np.int8))
    x = rng.integers(-127, 128, (1, k)).astype(np.int8)
    rowsum = np.array([x.sum()], dtype=np.int32)
    out = np.empty((1, w.data.shape[0] * 64), dtype=np.int32)
    kernel = kernel_for("w1.58a8")
    return w, x, lambda: kernel(x, w.data, rowsum, out)


def _two_pools(calls: int, rounds: int) -> dict[str, Any]:
    import torch

    _, _, gemv = _gemv_setup(4608, 1536)  # the 700m model's qkv
    head = torch.randn(8192, 1536)
    h = torch.randn(1, 1536)
    torch_op = lambda: torch.nn.functional.linear(h, head)  # noqa: E731 (MKL sgemv on torch's pool)
    torch_op()
    time.sleep(0.01)
    after_torch = lambda: (torch_op(), gemv())  # noqa: E731
    alone = lambda: (time.sleep(0) or gemv())  # noqa: E731
    both = _paired(after_torch, alone, calls, rounds)
    torch_only = _paired(torch_op, lambda: None, calls, rounds)
    both["torch_op_us"] = torch_only["a_us"]
    both["handoff_us"] = both["a_us"] - both["b_us"] - torch_only["a_us"]
    return both


def _conversions(calls: int, rounds: int) -> dict[str, Any]:
    import torch

    x = torch.randn(1, 1, 1536)
    dots = np.zeros((1, 4608), dtype=np.int32)

    def convert():
        h = x.reshape(-1, 1536).float().contiguous().numpy()
        y = torch.from_numpy(dots).float() * 0.5
        return h, y.reshape(1, 1, 4608).to(x.dtype)

    return _paired(convert, lambda: None, calls, rounds)


def _allocation(calls: int, rounds: int) -> dict[str, Any]:
    bufs = [np.empty(4608, dtype=np.float32), np.empty(1536, dtype=np.int8), np.empty(4608, dtype=np.int32)]
    fresh = lambda: (np.empty(4608, dtype=np.float32), np.empty(1536, dtype=np.int8), np.empty(4608, dtype=np.int32))  # noqa: E731
    return _paired(fresh, lambda: bufs, calls, rounds)


def _dispatch(calls: int, rounds: int) -> dict[str, Any]:
    from numba import njit

    @njit(cache=False)
    def leaf(a, b, c, d, e, f, g):  # pragma: no cover - compiled
        a[0] += 1.0
        return a[0]

    @njit(cache=False)
    def loop(n, a, b, c, d, e, f, g):  # pragma: no cover - compiled
        for _ in range(n):
            leaf(a, b, c, d, e, f, g)

    arrays = [np.zeros(4, dtype=np.float32), np.zeros(8, np.int8), np.zeros(8, np.int32), np.zeros((2, 2), np.float32),
              np.zeros(3, np.uint8), np.float32(1.0), 7]  # fmt: skip
    leaf(*arrays)
    loop(1, *arrays)
    inner = 100
    out = _paired(lambda: [leaf(*arrays) for _ in range(inner)], lambda: loop(inner, *arrays), max(1, calls // inner), rounds)
    out["a_us"] /= inner
    out["b_us"] /= inner
    return out


def _step(calls: int, rounds: int) -> dict[str, Any]:
    """One 700m-shaped block, unfused (torch norms + public kernels) against the engine's block."""
    import torch

    from labutils.engine.decoder import DecoderEngine
    from labutils.lm.model import Decoder, LMConfig
    from labutils.kernels import pack_model

    cfg = LMConfig(vocab_size=256, n_layer=1, n_head=24, d_model=1536, max_seq_len=64, quant="w1.58a8")
    packed = pack_model(Decoder(cfg, seed=0).eval())
    engine = DecoderEngine.from_decoder(packed)
    from labutils.lm.model import KVCache

    cache = KVCache(cfg, 1, dtype=torch.float32, device="cpu")
    tokens = torch.tensor([[5]])
    with torch.no_grad():
        packed(torch.arange(8)[None], cache)
    engine.forward(np.arange(8))

    def unfused():
        cache.length = 8
        with torch.no_grad():
            packed(tokens, cache)

    def engine_step():
        engine.reset(8)
        engine.step(5)

    return _paired(unfused, engine_step, max(1, calls // 20), rounds)


def _threads(calls: int, rounds: int) -> dict[str, Any]:
    """The engine's 700m-shaped step (4 of its 24 layers) on 2 threads (a) against 1 (b): what a
    parallel region costs when other processes hold the cores (compare with the load average)."""
    import numba

    from labutils.engine.decoder import DecoderEngine, EngineShape

    engine = DecoderEngine.random(EngineShape(vocab_size=8192, n_layer=4, n_head=24, n_kv_head=24, d_model=1536,
                                              ffn_hidden=4096, max_seq_len=160))  # fmt: skip
    engine.forward(np.arange(128))

    def step(n: int) -> None:
        numba.set_num_threads(n)
        engine.reset(128)
        engine.step(5)

    try:
        return _paired(lambda: step(2), lambda: step(1), max(1, calls // 20), rounds)
    finally:
        numba.set_num_threads(2)


def _read_rate(rounds: int) -> list[float]:
    """Bytes per second of a parallel float32 sum over 512 MB, ``rounds`` timed passes."""
    from numba import njit, prange

    @njit(parallel=True, fastmath=True, cache=False)
    def read(a):  # pragma: no cover - compiled
        chunk = a.shape[0] // 64
        total = 0.0
        for c in prange(64):
            part = np.float32(0.0)
            for i in range(c * chunk, (c + 1) * chunk):
                part += a[i]
            total += part
        return total

    table = np.ones(128 << 20, np.float32)
    read(table)
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        read(table)
        rates.append(table.nbytes / (time.perf_counter() - start))
    return rates


def _bandwidth(calls: int, rounds: int) -> dict[str, Any]:
    """Experiment 8: bytes per second of the 700m engine step and of its ternary kernels, against a
    plain parallel read of memory (medians; the read's passes interleaved with the profiles)."""
    import statistics

    from labutils.engine.decoder import DecoderEngine, EngineShape
    from labutils.lm.preset import PRESETS, row_config

    cfg = row_config("w1.58a8-700m", PRESETS["full"], 8192, max_seq_len=192)
    engine = DecoderEngine.random(EngineShape.of(cfg), seed=0, embedding="bfloat16", kv_cache="bfloat16")
    position = 128
    codes = sum(w.nbytes for w in engine.weights.values())
    kv = engine.k_cache[:, :, : position + 1].nbytes + engine.v_cache[:, :, : position + 1].nbytes
    step_bytes = codes + engine.embed.nbytes + kv
    reads, steps, kernels = [], [], []
    for _ in range(rounds):
        reads += _read_rate(1)
        profile = engine.profile_step(position, repeat=max(3, calls // 20))
        steps.append(profile["total"])
        kernels.append(profile["integer_kernel"])
    read_rate, step_s, kernel_s = statistics.median(reads), statistics.median(steps), statistics.median(kernels)
    return {"read_gb_s": read_rate / 1e9, "read_gb_s_best": max(reads) / 1e9, "step_ms": 1e3 * step_s,
            "kernels_ms": 1e3 * kernel_s, "step_mb": step_bytes / 1e6, "codes_mb": codes / 1e6,
            "head_mb": engine.embed.nbytes / 1e6, "kv_mb": kv / 1e6, "step_gb_s": step_bytes / step_s / 1e9,
            "kernels_gb_s": codes / kernel_s / 1e9}  # fmt: skip


EXPERIMENTS: dict[str, Callable[[int, int], dict[str, Any]]] = {
    "two_pools": _two_pools,
    "conversions": _conversions,
    "allocation": _allocation,
    "dispatch": _dispatch,
    "step": _step,
    "threads": _threads,
    "bandwidth": _bandwidth,
}
"""name -> fn(calls, rounds) -> figures: the in-process experiments 2-8 (2-7: {a_us, b_us,
a_over_b}; 8: bytes per second, see ``_bandwidth``)."""


def profile_before_after(size: str = "700m", position: int = 128, repeat: int = 5) -> dict[str, Any]:
    """One generation step of chapter 8's dummy ``size`` decoder at ``position``, profiled
    before (the packed torch modules: :func:`labutils.kernels.profile_packed_forward`) and after
    (the engine: :meth:`DecoderEngine.profile_step`), same weights, same process; seconds."""
    import torch

    from labutils.engine.decoder import DecoderEngine
    from labutils.kernels import pack_model, profile_packed_forward
    from labutils.lm.experiment import PRESETS, row_config
    from labutils.lm.model import Decoder, KVCache

    config = row_config(f"w1.58a8-{size}", PRESETS["full"], 8192, max_seq_len=position + 2 * repeat + 8)
    packed = pack_model(Decoder(config, seed=0).eval(), inplace=True)
    cache = KVCache(config, 1, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        packed(torch.randint(3, 8192, (1, position), generator=torch.Generator().manual_seed(1)), cache)
    before = profile_packed_forward(packed, {"tokens": torch.tensor([[5]]), "cache": cache}, repeat=repeat, warmup=1)
    engine = DecoderEngine.from_decoder(packed)
    after = engine.profile_step(position, repeat=4 * repeat)
    return {"size": size, "position": position, "before": before, "after": after}


def run_experiment(name: str, calls: int = 200, rounds: int = 7) -> dict[str, Any]:
    """Run one experiment by name ("region:<layer>" for experiment 1, "profile" for
    :func:`profile_before_after`) and return its figures."""
    if name == "profile":
        return profile_before_after()
    if name.startswith("region:"):
        return region_cost(name.split(":", 1)[1], calls=10 * calls, rounds=rounds)
    if name not in EXPERIMENTS:
        raise ValueError(f"experiment must be 'region:<layer>' or one of {tuple(EXPERIMENTS)}, got {name!r}")
    return EXPERIMENTS[name](calls, rounds)


def main(argv: list[str] | None = None) -> None:
    """Print every experiment's figures, one JSON line each, on 2 threads (as the benchmarks) or
    ``--threads N`` first."""
    from labutils.measure import threads

    argv = list(argv or [])
    n_threads = 2
    if argv[:1] == ["--threads"]:
        n_threads, argv = int(argv[1]), argv[2:]
    names = argv or ["region:omp", "region:workqueue", "region:tbb", *EXPERIMENTS]
    print(json.dumps({"load_average": os.getloadavg(), "cpus": os.cpu_count(), "threads": n_threads}))
    with threads(n_threads):
        for name in names:
            print(json.dumps({"experiment": name, "threading_layer": os.environ.get("NUMBA_THREADING_LAYER", "default"),
                          **run_experiment(name)}), flush=True)  # fmt: skip
    print(json.dumps({"load_average_after": os.getloadavg()}))


if __name__ == "__main__":
    main(sys.argv[1:])
