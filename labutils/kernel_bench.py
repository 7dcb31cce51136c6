"""The kernels of ``labutils.kernels`` against float32 and int8 matmuls: ``python -m labutils.bench kernels``.

Every kernel on every path this CPU runs (or ``--path``), against torch float32 and two int8
baselines (torch's dynamic-quantized Linear; onnxruntime's MatMulInteger if installed), on
``--threads`` threads, in interleaved rounds; the JSON it writes is what chapter 6 and appendix
B read (``committed_kernel_runs``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from labutils.runs import cpu_info

__all__ = ["KERNEL_TARGETS", "add_arguments", "committed_kernel_runs", "kernel_run_path", "run_command"]


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
# (kernel, "gemm" | "gemv", baseline, minimum ratio per kernel path); None: no target on that path.
KERNEL_TARGETS = [
    ("w1a1", "gemm", "torch_f32", {"avx512": 20.0, "avx2": 8.0}),
    ("w1a8", "gemm", "torch_f32", {"avx512": 2.0, "avx2": 2.0}),
    ("w1a8", "gemm", "torch_int8", {"avx512": 1.0, "avx2": 1.0}),
    ("w1a8", "gemm", "ort_int8", {"avx512": 1.0, "avx2": 1.0}),
    ("w1.58a8", "gemm", "torch_f32", {"avx512": 2.0, "avx2": 2.0}),
    ("w1.58a8", "gemm", "torch_int8", {"avx512": 1.0, "avx2": 1.0}),
    ("w1.58a8", "gemm", "ort_int8", {"avx512": 1.0, "avx2": 1.0}),
    ("w1.58a8", "gemv", "torch_f32", {"avx512": 8.0, "avx2": 8.0}),
]
_KERNEL_PEAK_CLASS = {"torch_f32": "f32", "torch_int8": "int8", "ort_int8": "int8", "w1a1": "binary",
                      "w1a1_simple": "binary", "w1a8": "int8", "w1.58a8": "int8"}  # fmt: skip
_INT8_BASELINES = {
    "torch_int8": "torch.ao.quantization.quantize_dynamic nn.Linear (fbgemm, per-tensor dynamic int8 activations)",
    "ort_int8": "onnxruntime MatMulInteger (uint8 activations with zero point 128 x int8 weights)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=2, help="threads for numba, torch and onnxruntime (default 2)")
    parser.add_argument("--quick", action="store_true", help="two small shapes only (for tests and CI)")
    parser.add_argument("--repeat", type=int, default=7, help="timed rounds at least; medians are reported")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per shape (default 2, quick 0.3)")
    parser.add_argument("--path", action="append", default=None,
                        help="kernel path to run (avx512, avx2, generic; repeatable); default: every path this CPU runs")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)


def _kernels_peak(threads: int) -> dict[str, Any]:
    """The machine's peak MAC rates (binary, int8, f32) and the assumptions behind them."""
    cpu = cpu_info()
    flags, amd = cpu["flags"], cpu["vendor"] == "AuthenticAMD"
    width = 512 if "avx512f" in flags else 256 if "avx2" in flags else 128
    # 512-bit FMA / VNNI instructions per cycle: Zen 4 runs them over two 256-bit pipes (1 per
    # cycle, as measured here for vpdpbusd); Intel server cores with two FMA units issue 2.
    wide_ops = 1 if (amd or width < 512) else 2
    if "avx512_vpopcntdq" in flags:
        binary = width
    elif width >= 256:  # vpshufb lookups: 6-8 vector ops per 256 bits, 4 vector pipes (Zen 3)
        binary = 128
    else:
        binary = 64
    vnni = "avx512_vnni" in flags
    int8 = wide_ops * width // 8 if vnni else width // 8 if width >= 256 else width // 16
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
                else "binary: 128 MACs/cycle/core = 256 bits per 2 cycles: XOR of nibble planes, two VPSHUFB "
                "lookups and two byte adds per 256 bits (6 to 8 vector ops) on 4 vector pipes (Zen 3), 8x its "
                "f32 FMA peak"
                if binary == 128
                else "binary: one 64-bit POPCNT per cycle (no AVX2, no AVX512_VPOPCNTDQ)"
            ),
            (
                f"int8: {int8} MACs/cycle/core = {wide_ops} {width}-bit VPDPBUSD per cycle (64 MACs each)"
                if vnni
                else f"int8: {int8} MACs/cycle/core without VNNI: one 256-bit VPMADDUBSW per cycle (32 MACs) and "
                "its int16 add, widened by VPMADDWD every 63 steps"
            ),
            (
                f"f32: {f32} MACs/cycle/core = "
                + ("two 256-bit FMA pipes (Zen 4 splits 512-bit FMAs over both)" if amd else "two FMA units")
            ),
            (
                "timings are wall clock, ~1 ms samples of calls, interleaved: every round times every kernel "
                "(5 ms pause, then 3 samples), so load from other processes hits all alike and OpenMP threads "
                "still spinning after the previous library's call are not billed to the next; `seconds` is the "
                "median sample, `seconds_best` the best, `spread` the 10th and 90th percentiles; ratios are of "
                "medians"
            ),
        ],
    }


def _torch_int8(w_codes: np.ndarray) -> Callable[[Any], Any]:
    """fn(x float32 [M, K] torch) -> [M, N]: a dynamically quantized nn.Linear holding the int8
    weights ``w_codes`` [N, K] (fbgemm: activations quantized per call, int8 GEMM, dequantized)."""
    import torch

    if "fbgemm" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "fbgemm"
    n, k = w_codes.shape
    linear = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(w_codes.astype(np.float32)))
    dynamic = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8)
    return lambda x: dynamic(x)


def _ort_int8(w_codes: np.ndarray, threads: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """fn(x uint8 [M, K] = int8 codes + 128) -> int32 [M, N] = x_codes @ w_codes^T through
    onnxruntime's MatMulInteger (a_zero_point 128), on ``threads`` threads; None without onnxruntime."""
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    n, k = w_codes.shape
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "a_zero", "b_zero"], ["y"])],
        "w8a8",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["m", n])],
        initializer=[
            numpy_helper.from_array(np.ascontiguousarray(w_codes.T.astype(np.int8)), "b"),
            numpy_helper.from_array(np.array(128, dtype=np.uint8), "a_zero"),
            numpy_helper.from_array(np.array(0, dtype=np.int8), "b_zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, 9)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # its threads would otherwise spin after each call, stealing cores from the next kernel timed
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"a": x})[0]


def _kernel_name(scheme: str, path: str, default: str) -> str:
    return scheme if path == default else f"{scheme}@{path}"


def _kernels_case(m: int, k: int, n: int, seed: int, paths: list[str], threads: int) -> tuple[dict[str, Callable[[], Any]], Callable]:
    """The callables to time on one shape (inputs prepared, not timed) and a check that every
    integer kernel (ours on every path, onnxruntime's) equals the numpy int64 reference."""
    import torch

    from labutils import kernels, packing

    rng = np.random.default_rng(seed)
    x_f = torch.randn(m, k)
    x_signs = np.where(rng.random((m, k)) < 0.5, -1, 1).astype(np.int8)
    w_signs = np.where(rng.random((n, k)) < 0.5, -1, 1).astype(np.int8)
    w_trits = rng.integers(-1, 2, (n, k), dtype=np.int8)
    x_codes = rng.integers(-128, 128, (m, k), dtype=np.int8)
    x_rows, w_rows = packing.pack_binary_rows(x_signs), packing.pack_binary_rows(w_signs)
    w1a1, w1a8, w158 = kernels.prepack_w1a1(w_rows, k), kernels.prepack_w1a8(w_rows, k), kernels.prepack_w158a8(w_trits)
    w_f = torch.randn(n, k)
    torch_int8 = _torch_int8(w_trits)
    ort_int8 = _ort_int8(w_trits, threads)
    x_u8 = (x_codes.astype(np.int16) + 128).astype(np.uint8)
    fns: dict[str, Callable[[], Any]] = {
        "torch_f32": lambda: torch.nn.functional.linear(x_f, w_f),
        "torch_int8": lambda: torch_int8(x_f),
    }
    if ort_int8 is not None:
        fns["ort_int8"] = lambda: ort_int8(x_u8)
    default = paths[0]

    def on(path: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with kernels.use(path):
                return fn()

        return run

    for path in paths:
        fns[_kernel_name("w1a1", path, default)] = on(path, lambda: kernels.w1a1_gemm(x_rows, w1a1))
        fns[_kernel_name("w1a8", path, default)] = on(path, lambda: kernels.w1a8_gemm(x_codes, w1a8))
        fns[_kernel_name("w1.58a8", path, default)] = on(path, lambda: kernels.w158a8_gemm(x_codes, w158))
    fns["w1a1_simple"] = lambda: kernels.w1a1_gemm_simple(x_rows, w_rows, k)

    def check() -> None:
        rows = sorted({0, m - 1})

        def ref(x: np.ndarray, w: np.ndarray) -> np.ndarray:
            return x[rows].astype(np.int64) @ w.astype(np.int64).T

        wanted = {"w1a1": ref(x_signs, w_signs), "w1a8": ref(x_codes, w_signs), "w1.58a8": ref(x_codes, w_trits),
                  "w1a1_simple": ref(x_signs, w_signs), "ort_int8": ref(x_codes, w_trits)}  # fmt: skip
        for name, fn in fns.items():
            scheme = name.split("@")[0]
            if scheme in wanted and not np.array_equal(np.asarray(fn())[rows], wanted[scheme]):
                raise AssertionError(f"{name} on [{m}, {k}] x [{n}, {k}] differs from the int64 reference")

    return fns, check


def _interleaved_samples(fns: dict[str, Callable[[], Any]], repeat: int, budget_s: float) -> dict[str, list[float]]:
    """Seconds per call of each fn, sampled in interleaved rounds: each round times every fn
    (3 samples of ~1 ms of calls each), so a burst of load from elsewhere hits all of them
    alike. At least ``repeat`` rounds, then more while the time budget lasts.

    torch, onnxruntime and Numba each keep their own threads, which spin for a while after a
    parallel region; a pause before each fn keeps one library's spinning threads from being
    billed to the next.
    """
    calls = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        calls[name] = max(1, int(0.001 / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    deadline, rounds = time.perf_counter() + budget_s, 0
    while rounds < repeat or time.perf_counter() < deadline:
        for name, fn in fns.items():
            time.sleep(0.005)
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(calls[name]):
                    fn()
                samples[name].append((time.perf_counter() - start) / calls[name])
        rounds += 1
    return samples


def _kernels_targets(rows: list[dict[str, Any]], path: str, default: str) -> list[dict[str, Any]]:
    """Each target of ``path`` against every shape of its kind: pass count, worst and geometric-mean ratio."""
    summary = []
    for scheme, kind, baseline, minimum in KERNEL_TARGETS:
        kernel = _kernel_name(scheme, path, default)
        ratios = [r["kernels"][kernel][f"x_{baseline}"] for r in rows
                  if r["kind"] == kind and kernel in r["kernels"] and f"x_{baseline}" in r["kernels"][kernel]]  # fmt: skip
        if not ratios or minimum.get(path) is None:
            continue
        best = [r["kernels"][kernel][f"x_best_{baseline}"] for r in rows
                if r["kind"] == kind and kernel in r["kernels"] and f"x_best_{baseline}" in r["kernels"][kernel]]  # fmt: skip
        summary.append(
            {
                "kernel": kernel,
                "scheme": scheme,
                "path": path,
                "kind": kind,
                "baseline": baseline,
                "target_ratio": minimum[path],
                "shapes": len(ratios),
                "shapes_passing": sum(x >= minimum[path] for x in ratios),
                "worst_ratio": min(ratios),
                "geomean_ratio": float(np.exp(np.mean(np.log(ratios)))),
                "pass": all(x >= minimum[path] for x in ratios),
                "geomean_ratio_best": float(np.exp(np.mean(np.log(best)))),
                "worst_ratio_best": min(best),
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
    """One shape: check exactness, time every kernel, and express each median time as ratios."""
    fns, check = _kernels_case(m, k, n, args.seed, args.path, args.threads)
    check()
    samples = _interleaved_samples(fns, args.repeat, budget)
    median = {name: float(np.median(s)) for name, s in samples.items()}
    best = {name: float(np.min(s)) for name, s in samples.items()}
    timings = {}
    for kernel, seconds in median.items():
        gmacs = m * k * n / seconds / 1e9
        timings[kernel] = {
            "seconds": seconds,
            "seconds_best": best[kernel],
            "spread": [float(np.percentile(samples[kernel], 10)), float(np.percentile(samples[kernel], 90))],
            "samples": len(samples[kernel]),
            "gmac_per_s": gmacs,
            **{f"x_{base}": median[base] / seconds for base in ("torch_f32", "torch_int8", "ort_int8") if base in median},
            # on a loaded machine the medians also measure the scheduler (a parallel region waits
            # for its threads' time slices): the ratios of the best samples show the kernels
            **{f"x_best_{base}": best[base] / best[kernel] for base in ("torch_f32", "torch_int8", "ort_int8") if base in best},
            "peak_fraction": gmacs / peak["peak_gmac_per_s"][_KERNEL_PEAK_CLASS[kernel.split("@")[0]]],
        }
    kind = "gemv" if m == 1 else "gemm"
    return {"layer": name, "kind": kind, "m": m, "k": k, "n": n, "kernels": timings}


def _kernels_print(result: dict[str, Any]) -> None:
    peak, load = result["peak"], result["loadavg_1min_before_after"]
    features = result["cpu_features"]
    print(
        f"kernels: {result['threads']} thread(s), medians of >= {result['repeat']} interleaved rounds; "
        f"CPU {features['cpu']} ({', '.join(features['flags'])}); paths {', '.join(result['paths'])} "
        f"(unsuffixed: {result['kernel_path']}); load average {load[0]:.1f} -> {load[1]:.1f}; peak GMAC/s at "
        f"{peak['frequency_ghz']:.2f} GHz: " + ", ".join(f"{c} {v:.0f}" for c, v in peak["peak_gmac_per_s"].items())
    )
    for name, text in result["int8_baselines"].items():
        print(f"  {name}: {text}")
    print(
        f"{'layer':<16} {'M':>5} {'K':>5} {'N':>6} {'kernel':<16} {'ms':>9} {'spread %':>9} {'GMAC/s':>8} "
        f"{'x f32':>7} {'x int8':>7} {'x ort':>7} {'best: x f32':>11} {'x int8':>7} {'x ort':>7}"
    )
    for r in result["results"]:
        for kernel, t in r["kernels"].items():
            lo, hi = t["spread"]
            print(
                f"{r['layer']:<16} {r['m']:>5} {r['k']:>5} {r['n']:>6} {kernel:<16} {1e3 * t['seconds']:>9.3f} "
                f"{100 * (hi - lo) / t['seconds']:>9.0f} {t['gmac_per_s']:>8.1f} {t['x_torch_f32']:>7.2f} "
                f"{t['x_torch_int8']:>7.2f} {t.get('x_ort_int8', float('nan')):>7.2f} {t['x_best_torch_f32']:>11.2f} "
                f"{t['x_best_torch_int8']:>7.2f} {t.get('x_best_ort_int8', float('nan')):>7.2f}"
            )
    print("targets per kernel path (ratios of medians in the same run; in brackets, of the best samples):")
    for t in result["targets"]:
        print(
            f"  {t['path']:<7} {t['scheme']:<8} {t['kind']} vs {t['baseline']:<10} >= {t['target_ratio']:>4}x: "
            f"{t['shapes_passing']}/{t['shapes']} shapes, worst {t['worst_ratio']:.2f}x, "
            f"geomean {t['geomean_ratio']:.2f}x  {'pass' if t['pass'] else 'FAIL'}  (best samples: worst "
            f"{t['worst_ratio_best']:.2f}x, geomean {t['geomean_ratio_best']:.2f}x)"
        )


def run_command(args: argparse.Namespace) -> dict[str, Any]:
    """Every kernel of ``labutils.kernels``, on every kernel path this CPU runs (or ``--path``),
    against torch float32 and two competent int8 baselines (torch's dynamic-quantized Linear
    on fbgemm; onnxruntime's MatMulInteger if installed), all on ``--threads`` threads.

    Shapes: the BERT-base and MiniLM linear layers at 128, 512 and 2048 tokens (GEMM) and two
    LLaMA-7B layers at batch 1 (GEMV); ``--quick``: one of each. Timed: the matmul alone
    (activations already quantized or packed for the integer kernels and onnxruntime, floats
    for torch, whose int8 Linear quantizes its input itself). The unsuffixed kernel names are
    the first path run (the default: the active path, ``LABBOOK_KERNEL_PATH`` or this CPU's best);
    ``name@path`` are the others.
    """
    import numba
    import torch
    from tqdm.auto import tqdm

    from labutils import kernels

    if not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        raise SystemExit(f"--threads must be in [1, {numba.config.NUMBA_NUM_THREADS}], got {args.threads}")
    # The active path (LABBOOK_KERNEL_PATH, else this CPU's best) first: it names the unsuffixed rows.
    available = kernels.available_paths()
    args.path = list(dict.fromkeys(args.path or [kernels.active_path(), *available]))
    for path in args.path:
        try:
            kernels.dispatch.check_path(path)
        except (ValueError, RuntimeError) as error:
            raise SystemExit(f"--path {path}: {error}") from None
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
    default = args.path[0]
    targets = [t for path in args.path for t in _kernels_targets(rows, path, default)]
    baselines = {name: text for name, text in _INT8_BASELINES.items() if name in rows[0]["kernels"]}
    result = {
        "threads": args.threads,
        "quick": args.quick,
        "repeat": args.repeat,
        "budget_s_per_shape": budget,
        "seed": args.seed,
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
        "cpu_features": kernels.cpu_features(),
        "kernel_path": default,
        "paths": args.path,
        "int8_baseline": baselines["torch_int8"],
        "int8_baselines": baselines,
        "numba_threading_layer": numba.threading_layer(),
        "torch": torch.__version__,
        "peak": peak,
        "results": rows,
        "targets": targets,
        "pass": all(t["pass"] for t in targets if t["path"] == default),
    }
    _kernels_print(result)
    return result



def kernel_run_path(run: dict[str, Any]) -> str:
    """The kernel path ("avx512", "avx2", "generic") a ``bench kernels`` JSON run measured: as
    recorded, else inferred from its peak (the first committed run predates the recorded paths
    and measured AVX-512 VPOPCNTDQ + VNNI kernels)."""
    recorded = run.get("kernel_path") or run.get("path") or (run.get("cpu_features") or {}).get("path")
    if recorded:
        return recorded
    peak = run["peak"]
    if peak["vector_bits"] >= 512 and peak["mac_per_cycle_per_core"]["binary"] >= 512:
        return "avx512"
    return "avx2" if peak["vector_bits"] >= 256 else "generic"


def committed_kernel_runs(folder: str | Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """One full (not ``--quick``) ``bench kernels`` run per kernel path, from the ``*.json`` files
    of ``folder`` in name order (the first of a path wins): {path: (file name, run)}."""
    runs: dict[str, tuple[str, dict[str, Any]]] = {}
    for file in sorted(Path(folder).glob("*.json")):
        run = json.loads(file.read_text())
        if run.get("command") == "kernels" and not run.get("quick"):
            runs.setdefault(kernel_run_path(run), (file.name, run))
    return runs

