"""How fast the packers of ``labutils.packing`` run: ``python -m labutils.bench packing``.

Millions of weights packed and unpacked per second, one thread, best of ``--repeat`` (the run
least disturbed by other processes), against the targets: 200 M/s for 1-bit and 2-bit codes,
50 M/s for base 3. Every round trip is checked to give the codes back.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from labutils.runs import positive_int

__all__ = ["PACKING_TARGETS", "add_arguments", "run_command", "single_thread"]


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



PACKING_TARGETS = {"binary": 200.0, "binary_rows": 200.0, "ternary2": 200.0, "ternary3": 50.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
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


def run_command(args: argparse.Namespace) -> dict[str, Any]:
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

