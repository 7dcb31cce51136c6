"""Benchmarks, from the command line: ``python -m labutils.bench <subcommand> [--out FILE.json]``.

Each subcommand is one function ``run_<name>(args) -> dict`` that prints a table and returns a
JSON-friendly result, plus one function that adds its options; both are registered in
``COMMANDS``. ``--out`` (common to all) writes the result as JSON.

Subcommands:

- ``imdb``: the IMDb benchmark (``labutils.benchmark``): ``--preset {ci,full} --out DIR``.
- ``packing``: pack / unpack throughput of ``labutils.packing`` (millions of weights per second,
  best of ``--repeat``, one thread) against the targets: 200 M/s for 1-bit and 2-bit, 50 M/s
  for base 3.

Timings are absolute, on whatever the machine is doing at the time; tests never assert on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["COMMANDS", "Command", "UsageError", "main", "positive_int", "run_packing", "single_thread"]


class UsageError(ValueError):
    """A nonsensical argument or preset value, found before any work starts; ``main`` reports it
    like argparse does (``prog: error: ...``, exit status 2) instead of a traceback."""


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (thread counts, sizes, repeats)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


@dataclass(frozen=True)
class Command:
    """A subcommand: its help line, a function adding its options, and the function running it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict[str, Any]]
    out_is_dir: bool = False  # --out names a folder the command fills itself (imdb)


def single_thread() -> None:
    """Pin numba and torch to one thread, so a benchmark measures one core."""
    import numba
    import torch

    numba.set_num_threads(1)
    torch.set_num_threads(1)


def _best_seconds(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Fastest of ``repeat`` calls of ``fn`` (the least disturbed by other processes), and its result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


# --------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------

PACKING_TARGETS = {"binary": 200.0, "binary_rows": 200.0, "ternary2": 200.0, "ternary3": 50.0}


def _packing_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=positive_int, default=16 * 2**20, help="weights per scheme (default 16M)")
    parser.add_argument("--repeat", type=positive_int, default=5, help="timed runs; the best is reported")
    parser.add_argument("--seed", type=int, default=0)


def _packing_cases(n: int, seed: int) -> dict[str, tuple[Callable, Callable, np.ndarray]]:
    """scheme -> (pack, unpack, codes)."""
    from labutils import packing

    rng = np.random.default_rng(seed)
    trits = rng.integers(-1, 2, n, dtype=np.int8)
    signs = np.where(rng.random(n) < 0.5, -1, 1).astype(np.int8)
    k = 4096 if n % 4096 == 0 else n
    return {
        "binary": (packing.pack_binary, lambda p: packing.unpack_binary(p, n), signs),
        "binary_rows": (packing.pack_binary_rows, lambda p: packing.unpack_binary_rows(p, k), signs.reshape(-1, k)),
        "ternary2": (packing.pack_ternary_2bit, lambda p: packing.unpack_ternary_2bit(p, n), trits),
        "ternary3": (packing.pack_ternary_base3, lambda p: packing.unpack_ternary_base3(p, n), trits),
    }


def run_packing(args: argparse.Namespace) -> dict[str, Any]:
    """Throughput of every packer and unpacker on ``args.n`` random codes, one thread."""
    from tqdm.auto import tqdm

    single_thread()
    for pack, unpack, codes in _packing_cases(1000, args.seed).values():  # compile numba first
        unpack(pack(codes))
    rows = []
    for scheme, (pack, unpack, codes) in tqdm(_packing_cases(args.n, args.seed).items(), desc="packing", leave=False):
        pack_s, packed = _best_seconds(lambda pack=pack, codes=codes: pack(codes), args.repeat)
        unpack_s, back = _best_seconds(lambda unpack=unpack, packed=packed: unpack(packed), args.repeat)
        if not np.array_equal(back, codes):
            raise AssertionError(f"{scheme}: unpack(pack(x)) != x")
        pack_rate, unpack_rate = args.n / pack_s / 1e6, args.n / unpack_s / 1e6
        target = PACKING_TARGETS[scheme]
        rows.append(
            {
                "scheme": scheme,
                "bits_per_weight": 8 * packed.nbytes / args.n,
                "pack_M_per_s": pack_rate,
                "unpack_M_per_s": unpack_rate,
                "target_M_per_s": target,
                "pass": bool(min(pack_rate, unpack_rate) >= target),
            }
        )
    print(f"packing {args.n:,} weights, 1 thread, best of {args.repeat} (M = 10^6 weights)")
    print(f"{'scheme':<12} {'bits/w':>6} {'pack M/s':>10} {'unpack M/s':>11} {'target M/s':>11}  result")
    for r in rows:
        print(
            f"{r['scheme']:<12} {r['bits_per_weight']:>6.2f} {r['pack_M_per_s']:>10.1f} "
            f"{r['unpack_M_per_s']:>11.1f} {r['target_M_per_s']:>11.0f}  {'pass' if r['pass'] else 'FAIL'}"
        )
    return {
        "n": args.n,
        "repeat": args.repeat,
        "threads": 1,
        "seed": args.seed,
        "results": rows,
        "pass": all(r["pass"] for r in rows),
    }


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------

KERNEL_LAYERS = {  # name: (in_features K, out_features N)
    "minilm.attn": (384, 384),
    "minilm.ffn_up": (384, 1536),
    "minilm.ffn_down": (1536, 384),
    "bert.attn": (768, 768),
    "bert.ffn_up": (768, 3072),
    "bert.ffn_down": (3072, 768),
}
KERNEL_TOKENS = (128, 512, 2048)
KERNEL_GEMV = {"llama7b.attn": (4096, 4096), "llama7b.ffn_up": (4096, 11008)}  # batch 1
KERNEL_QUICK = [("minilm.attn", 128, 384, 384), ("llama7b.attn", 1, 4096, 4096)]
# (kernel, "gemm" | "gemv", baseline, minimum ratio); "on par" with int8 is read as >= 0.9x.
KERNEL_TARGETS = [
    ("w1a1", "gemm", "torch_f32", 20.0),
    ("w1a8", "gemm", "torch_f32", 2.0),
    ("w1a8", "gemm", "torch_int8", 0.9),
    ("w1.58a8", "gemm", "torch_f32", 2.0),
    ("w1.58a8", "gemm", "torch_int8", 0.9),
    ("w1.58a8", "gemv", "torch_f32", 8.0),
]
_KERNEL_PEAK_CLASS = {"torch_f32": "f32", "torch_int8": "int8", "w1a1": "binary", "w1a1_simple": "binary",
                      "w1a8": "int8", "w1.58a8": "int8"}  # fmt: skip


def _kernels_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=2, help="threads for numba and torch alike (default 2)")
    parser.add_argument("--quick", action="store_true", help="two small shapes only (for tests and CI)")
    parser.add_argument("--repeat", type=int, default=7, help="timed rounds at least; the best is reported")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per shape (default 2, quick 0.3)")
    parser.add_argument("--seed", type=int, default=0)


def _cpu_info() -> dict[str, Any]:
    """Vendor, model, flags and nominal MHz from /proc/cpuinfo (empty where unreadable)."""
    info: dict[str, Any] = {"vendor": "", "model": platform.processor(), "flags": set(), "mhz": None}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "vendor_id" and not info["vendor"]:
            info["vendor"] = value
        elif key == "model name" and not info["flags"]:
            info["model"] = value
        elif key == "flags" and not info["flags"]:
            info["flags"] = set(value.split())
        elif key == "cpu MHz" and info["mhz"] is None:
            info["mhz"] = float(value)
    return info


def _kernels_peak(threads: int) -> dict[str, Any]:
    """The machine's peak MAC rates (binary, int8, f32) and the assumptions behind them."""
    cpu = _cpu_info()
    flags, amd = cpu["flags"], cpu["vendor"] == "AuthenticAMD"
    width = 512 if "avx512f" in flags else 256 if "avx2" in flags else 128
    # 512-bit FMA / VNNI instructions per cycle: Zen 4 runs them over two 256-bit pipes (1 per
    # cycle, as measured here for vpdpbusd); Intel server cores with two FMA units issue 2.
    wide_ops = 1 if (amd or width < 512) else 2
    binary = width if "avx512_vpopcntdq" in flags else 64
    int8 = wide_ops * width // 8 if "avx512_vnni" in flags else width // 16
    f32 = 2 * min(width, 256) // 32 if amd else wide_ops * width // 32 * (2 if width < 512 else 1)
    ghz = (cpu["mhz"] or 1000.0) / 1000
    per_core = {"binary": binary, "int8": int8, "f32": f32}
    return {
        "cpu": cpu["model"],
        "vendor": cpu["vendor"],
        "vector_bits": width,
        "frequency_ghz": ghz,
        "cores": threads,
        "mac_per_cycle_per_core": per_core,
        "peak_gmac_per_s": {name: v * ghz * threads for name, v in per_core.items()},
        "notes": [
            (
                f"frequency: /proc/cpuinfo 'cpu MHz' ({ghz:.2f} GHz), the nominal clock; turbo runs faster, "
                "so a fraction of peak can exceed 1"
            ),
            (
                f"binary: {binary} MACs/cycle/core = one {width}-bit VPOPCNTQ per cycle; the XNOR loop also needs "
                "a XOR and an ADD per popcount, so a core issuing two 512-bit vector ops per cycle (Zen 4) is "
                "bound at 2/3 of that (341 MACs/cycle, ~21x its f32 FMA peak)"
                if binary == width
                else "binary: one 64-bit POPCNT per cycle (no AVX512_VPOPCNTDQ)"
            ),
            (
                f"int8: {int8} MACs/cycle/core = {wide_ops} {width}-bit VPDPBUSD per cycle (64 MACs each)"
                if "avx512_vnni" in flags
                else f"int8: {int8} MACs/cycle/core without VNNI (VPMADDUBSW + VPMADDWD)"
            ),
            (
                f"f32: {f32} MACs/cycle/core = "
                + ("two 256-bit FMA pipes (Zen 4 splits 512-bit FMAs over both)" if amd else "two FMA units")
            ),
            (
                "timings are wall clock, the best ~1 ms sample of >= --repeat rounds (more while --budget "
                "lasts); every kernel is timed in every round (5 ms pause, then 3 samples), so load from "
                "other processes hits all alike and OpenMP threads still spinning after the previous "
                "library's call are not billed to the next"
            ),
        ],
    }


def _int8_baseline(k: int, n: int, seed: int) -> tuple[str, Callable[[Any, Any], Any]]:
    """(name, fn(x_codes int8 [M, K] torch, w_codes int8 [N, K] torch)): torch._int_mm if it runs
    here, else a dynamically quantized nn.Linear (which quantizes its float input itself)."""
    import torch

    try:
        probe = torch.ones(32, 64, dtype=torch.int8)
        torch._int_mm(probe, probe.T)
        return "torch._int_mm", lambda x, w: torch._int_mm(x, w.T)
    except (RuntimeError, AttributeError, NotImplementedError):
        linear = torch.nn.Linear(k, n, bias=False)
        dynamic = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear})
        return "quantize_dynamic nn.Linear", lambda x, w: dynamic(x.float())


def _kernels_case(m: int, k: int, n: int, seed: int) -> tuple[dict[str, Callable[[], Any]], str, Callable]:
    """The callables to time on one shape (inputs prepared, not timed), the int8 baseline's name,
    and a check that our kernels equal the numpy int64 reference on a few rows."""
    import torch

    from labutils import kernels, packing

    rng = np.random.default_rng(seed)
    x_f, w_f = torch.randn(m, k), torch.randn(n, k)
    x_signs = np.where(rng.random((m, k)) < 0.5, -1, 1).astype(np.int8)
    w_signs = np.where(rng.random((n, k)) < 0.5, -1, 1).astype(np.int8)
    w_trits = rng.integers(-1, 2, (n, k), dtype=np.int8)
    x_codes = rng.integers(-127, 128, (m, k), dtype=np.int8)
    x_rows, w_rows = packing.pack_binary_rows(x_signs), packing.pack_binary_rows(w_signs)
    w1a1, w1a8, w158 = kernels.prepack_w1a1(w_rows, k), kernels.prepack_w1a8(w_rows, k), kernels.prepack_w158a8(w_trits)
    int8_name, int8_mm = _int8_baseline(k, n, seed)
    x_t, w_t = torch.from_numpy(x_codes), torch.from_numpy(w_trits)
    fns = {
        "torch_f32": lambda: torch.nn.functional.linear(x_f, w_f),
        "torch_int8": lambda: int8_mm(x_t, w_t),
        "w1a1": lambda: kernels.w1a1_gemm(x_rows, w1a1),
        "w1a8": lambda: kernels.w1a8_gemm(x_codes, w1a8),
        "w1.58a8": lambda: kernels.w158a8_gemm(x_codes, w158),
        "w1a1_simple": lambda: kernels.w1a1_gemm_simple(x_rows, w_rows, k),
    }

    def check() -> None:
        rows = sorted({0, m - 1})

        def ref(x: np.ndarray, w: np.ndarray) -> np.ndarray:
            return x[rows].astype(np.int64) @ w.astype(np.int64).T

        for name, got, want in [
            ("w1a1", fns["w1a1"]()[rows], ref(x_signs, w_signs)),
            ("w1a8", fns["w1a8"]()[rows], ref(x_codes, w_signs)),
            ("w1.58a8", fns["w1.58a8"]()[rows], ref(x_codes, w_trits)),
            ("w1a1_simple", fns["w1a1_simple"]()[rows], ref(x_signs, w_signs)),
        ]:
            if not np.array_equal(got, want):
                raise AssertionError(f"{name} on [{m}, {k}] x [{n}, {k}] differs from the int64 reference")

    return fns, int8_name, check


def _interleaved_best(fns: dict[str, Callable[[], Any]], repeat: int, budget_s: float) -> dict[str, float]:
    """Best seconds per call of each fn, timed in rounds: each round times every fn (3 samples
    of ~1 ms of calls each), so a burst of load from elsewhere hits all of them alike. At least
    ``repeat`` rounds, then more while the time budget lasts: on a busy machine the best of
    many short samples is the one that ran undisturbed.

    torch and Numba each keep their own OpenMP threads, which spin for a while after a parallel
    region; a pause before each fn and several samples per fn keep one library's spinning
    threads from being billed to the other.
    """
    calls = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        calls[name] = max(1, int(0.001 / max(time.perf_counter() - start, 1e-7)))
    best = dict.fromkeys(fns, float("inf"))
    deadline, rounds = time.perf_counter() + budget_s, 0
    while rounds < repeat or time.perf_counter() < deadline:
        for name, fn in fns.items():
            time.sleep(0.005)
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(calls[name]):
                    fn()
                best[name] = min(best[name], (time.perf_counter() - start) / calls[name])
        rounds += 1
    return best


def _kernels_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target against every shape of its kind: pass count, worst and geometric-mean ratio."""
    summary = []
    for kernel, kind, baseline, minimum in KERNEL_TARGETS:
        ratios = [r["kernels"][kernel][f"x_{baseline}"] for r in rows if r["kind"] == kind]
        if not ratios:
            continue
        summary.append(
            {
                "kernel": kernel,
                "kind": kind,
                "baseline": baseline,
                "target_ratio": minimum,
                "shapes": len(ratios),
                "shapes_passing": sum(x >= minimum for x in ratios),
                "worst_ratio": min(ratios),
                "geomean_ratio": float(np.exp(np.mean(np.log(ratios)))),
                "pass": all(x >= minimum for x in ratios),
            }
        )
    return summary


def _kernels_shapes(quick: bool) -> list[tuple[str, int, int, int]]:
    """(layer, M, K, N) to measure: every GEMM layer at every token count, then the GEMVs."""
    if quick:
        return list(KERNEL_QUICK)
    gemms = [(name, m, k, n) for m in KERNEL_TOKENS for name, (k, n) in KERNEL_LAYERS.items()]
    return gemms + [(name, 1, k, n) for name, (k, n) in KERNEL_GEMV.items()]


def _kernels_row(name: str, m: int, k: int, n: int, args: argparse.Namespace, peak: dict, budget: float) -> dict:
    """One shape: check exactness, time every kernel, and express each time as ratios."""
    fns, int8_name, check = _kernels_case(m, k, n, args.seed)
    check()
    best = _interleaved_best(fns, args.repeat, budget)
    timings = {}
    for kernel, seconds in best.items():
        gmacs = m * k * n / seconds / 1e9
        timings[kernel] = {
            "seconds": seconds,
            "gmac_per_s": gmacs,
            "x_torch_f32": best["torch_f32"] / seconds,
            "x_torch_int8": best["torch_int8"] / seconds,
            "peak_fraction": gmacs / peak["peak_gmac_per_s"][_KERNEL_PEAK_CLASS[kernel]],
        }
    kind = "gemv" if m == 1 else "gemm"
    return {"layer": name, "kind": kind, "m": m, "k": k, "n": n, "int8_baseline": int8_name, "kernels": timings}


def _kernels_print(result: dict[str, Any]) -> None:
    peak, load = result["peak"], result["loadavg_1min_before_after"]
    print(
        f"kernels: {result['threads']} thread(s), best of >= {result['repeat']} rounds, int8 baseline "
        f"{result['int8_baseline']}, load average {load[0]:.1f} -> {load[1]:.1f}; peak GMAC/s at "
        f"{peak['frequency_ghz']:.2f} GHz: " + ", ".join(f"{c} {v:.0f}" for c, v in peak["peak_gmac_per_s"].items())
    )
    print(
        f"{'layer':<16} {'M':>5} {'K':>5} {'N':>6} {'kernel':<12} {'ms':>9} {'GMAC/s':>8} {'x f32':>7} "
        f"{'x int8':>7} {'peak':>6}"
    )
    for r in result["results"]:
        for kernel, t in r["kernels"].items():
            print(
                f"{r['layer']:<16} {r['m']:>5} {r['k']:>5} {r['n']:>6} {kernel:<12} {1e3 * t['seconds']:>9.3f} "
                f"{t['gmac_per_s']:>8.1f} {t['x_torch_f32']:>7.2f} {t['x_torch_int8']:>7.2f} "
                f"{100 * t['peak_fraction']:>5.0f}%"
            )
    print("targets (ratio in the same run):")
    for t in result["targets"]:
        print(
            f"  {t['kernel']:<8} {t['kind']} vs {t['baseline']:<10} >= {t['target_ratio']:>4}x: "
            f"{t['shapes_passing']}/{t['shapes']} shapes, worst {t['worst_ratio']:.2f}x, "
            f"geomean {t['geomean_ratio']:.2f}x  {'pass' if t['pass'] else 'FAIL'}"
        )


def run_kernels(args: argparse.Namespace) -> dict[str, Any]:
    """Every kernel of ``labutils.kernels`` against torch float32 and int8 matmuls, same threads.

    Shapes: the BERT-base and MiniLM linear layers at 128, 512 and 2048 tokens (GEMM) and two
    LLaMA-7B layers at batch 1 (GEMV); ``--quick``: one of each. Timed: the matmul alone
    (activations already quantized or packed for the integer kernels, floats for float32).
    torch's and Numba's thread counts are both set to ``--threads`` and restored afterwards.
    """
    import numba
    import torch
    from tqdm.auto import tqdm

    if not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        raise SystemExit(f"--threads must be in [1, {numba.config.NUMBA_NUM_THREADS}], got {args.threads}")
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 2.0)
    peak = _kernels_peak(args.threads)
    old_threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    try:
        shapes = _kernels_shapes(args.quick)
        rows = [_kernels_row(*shape, args, peak, budget) for shape in tqdm(shapes, desc="kernels", leave=False)]
    finally:
        torch.set_num_threads(old_threads[0])
        numba.set_num_threads(old_threads[1])
    targets = _kernels_targets(rows)
    result = {
        "threads": args.threads,
        "quick": args.quick,
        "repeat": args.repeat,
        "budget_s_per_shape": budget,
        "seed": args.seed,
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
        "int8_baseline": rows[0]["int8_baseline"],
        "numba_threading_layer": numba.threading_layer(),
        "peak": peak,
        "results": rows,
        "targets": targets,
        "pass": all(t["pass"] for t in targets),
    }
    _kernels_print(result)
    return result


# --------------------------------------------------------------------------------------------
# The table of subcommands and the entry point
# --------------------------------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
    "packing": Command("pack/unpack throughput of labutils.packing", _packing_arguments, run_packing),
    "kernels": Command("labutils.kernels vs torch float32 and int8 matmuls", _kernels_arguments, run_kernels),
    "imdb": Command(
        "the IMDb benchmark: train, measure on the CPU, report (labutils.benchmark)",
        lambda parser: _imdb().add_arguments(parser),
        lambda args: _imdb().run_command(args),
        out_is_dir=True,
    ),
}


def _imdb():
    from labutils import benchmark  # imports torch and the HF stack: only when asked for

    return benchmark


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the subcommand, write ``--out``; exit status 1 if ``--strict`` and a
    target is missed."""
    parser = argparse.ArgumentParser(prog="python -m labutils.bench", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    subs = {}
    for name, command in COMMANDS.items():
        sub = subs[name] = subparsers.add_parser(name, help=command.help)
        command.add_arguments(sub)
        sub.add_argument("--out", type=Path, help="the output folder" if command.out_is_dir else "write the results as JSON here")
        sub.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    try:
        result = COMMANDS[args.command].run(args)
    except UsageError as exc:
        subs[args.command].error(str(exc))  # exits with status 2
    result = {
        "command": args.command,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        **result,
    }
    if args.out is not None and not COMMANDS[args.command].out_is_dir:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 1 if args.strict and result.get("pass") is False else 0


if __name__ == "__main__":
    sys.exit(main())
