"""The kernels of ``labutils.kernels`` against float32 and int8 matmuls: ``python -m labutils.bench kernels``.

One method on every machine. Every kernel on every path this CPU runs (or ``--path``) and the
baselines are timed in interleaved rounds on ``--threads`` threads: each round takes one sample
(~10 ms of back-to-back calls, ``SAMPLE_S``) of every callable, in a fresh seeded order each round,
so load from other processes hits all of them alike and no callable always follows the same one.
The sample is that long because a callable's first call after another library's pays for it: on a
2-vCPU Xeon, a GEMV that averaged 0.32-0.38 ms a call over thirty back-to-back calls took
0.40-0.85 ms as a single call after a torch or ONNX Runtime call and a 3 ms pause (their threads
still spinning, ours waking; ``results/kernels/first_call.py``). A kernel's
figure is the median of its samples; its ratio to a baseline is the ratio of the medians, with
the spread of the per-round ratios (round i of both, under the same load;
``measure.paired_ratio``) and the ratio of the best samples beside it.

Baselines, the same everywhere (where installed):

- ``torch_f32``: ``F.linear`` in float32 (MKL / oneDNN);
- ``torch_int8``: ``torch.ao.quantization.quantize_dynamic`` (fbgemm): float in, float out, the
  activations quantized per call (in its time);
- ``torch_int_mm``: ``torch._int_mm``, int8 x int8 -> int32 (oneDNN), integers only;
- ``torchao_int8``: torchao's ``Int8DynamicActivationInt8WeightConfig`` (``--torchao``; float in
  and out, like ``torch_int8``);
- ``ort_int8``: onnxruntime ``MatMulInteger`` (uint8 activations, zero point 128), integers only;
- ``ort_int8_dynamic``: a float ``MatMul`` through ``onnxruntime.quantization.quantize_dynamic``
  (float in, float out, activations quantized per call).

The book's kernels run twice: ``w1a1``, ``w1a8``, ``w1.58a8`` on activations already quantized or
packed (integers in, int32 out: like ``torch_int_mm`` and ``ort_int8``), and ``w1a1+q``,
``w1a8+q``, ``w1.58a8+q`` as a ``PackedBitLinear`` (float in, float out: activation
quantization, kernel and rescale, like ``torch_int8`` and ``ort_int8_dynamic``). Every file
records where it came from (``runs.provenance``: commit, CPU flags, load averages, versions), the
threading layers and the load average before and after; ``--machine NAME`` writes
``results/kernels/NAME/kernels.json``, which a busy machine (1-minute load average above half
the cores) may only do with ``--force``, and then the file says so (``load_warning``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from labutils.runs import UsageError, cache_sizes, cpu_info, load_average, positive_int, provenance

__all__ = [
    "BASELINES",
    "add_arguments",
    "committed_kernel_files",
    "committed_kernel_runs",
    "kernel_run_path",
    "kernel_targets",
    "results_path",
    "run_command",
]


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
SAMPLE_S = 0.01
"""Seconds of back-to-back calls in one sample (module docstring: why not 1 ms)."""

BASELINES = {
    "torch_f32": "torch.nn.functional.linear, float32 (MKL / oneDNN)",
    "torch_int8": "torch.ao.quantization.quantize_dynamic nn.Linear (fbgemm; float in and out, per-tensor "
                  "dynamic int8 activations quantized in the call)",
    "torch_int_mm": "torch._int_mm, int8 x int8 -> int32 (oneDNN; integers only)",
    "torchao_int8": "torchao quantize_(Int8DynamicActivationInt8WeightConfig) nn.Linear (float in and out)",
    "ort_int8": "onnxruntime MatMulInteger, uint8 activations (zero point 128) x int8 weights -> int32 "
                "(integers only)",
    "ort_int8_dynamic": "onnxruntime.quantization.quantize_dynamic of a float MatMul (QInt8 weights; float in "
                        "and out, activations quantized in the call)",
}  # fmt: skip
"""Every baseline a run can have, with what it computes."""
INTEGER_BASELINES = ("torch_int_mm", "ort_int8")  # like with like for the kernels on quantized inputs
FLOAT_BASELINES = ("torch_int8", "torchao_int8", "ort_int8_dynamic")  # like with like for the "+q" rows
_KERNEL_PEAK_CLASS = {"torch_f32": "f32", "w1a1": "binary", "w1a1_simple": "binary"}  # the rest: int8


def kernel_targets(path: str, vendor: str) -> list[tuple[str, str, str, float]]:
    """The targets of issue 26 for ``path`` on a CPU of ``vendor`` (/proc/cpuinfo vendor_id):
    ``(kernel, "gemm" | "gemv", baseline, minimum geomean ratio of medians)``. W1A1: 20x float32
    on Zen 4 (AVX-512), 8x on Intel's AVX-512 cores (two FMA ports: a peak ratio of ~10.7x, not
    21x) and on AVX2; the A8 GEMMs 1.2x onnxruntime and torch int8, like with like; the ternary
    GEMV 8x float32 and 1.5x onnxruntime; the generic path 2x (GEMM) and 4x (GEMV) float32."""
    if path == "generic":
        return [("w1a8", "gemm", "torch_f32", 2.0), ("w1.58a8", "gemm", "torch_f32", 2.0),
                ("w1.58a8", "gemv", "torch_f32", 4.0)]  # fmt: skip
    w1a1 = 20.0 if path == "avx512" and vendor == "AuthenticAMD" else 8.0
    targets = [("w1a1", "gemm", "torch_f32", w1a1)]
    for scheme in ("w1a8", "w1.58a8"):
        targets += [(scheme, "gemm", "ort_int8", 1.2), (f"{scheme}+q", "gemm", "torch_int8", 1.2)]
    return targets + [("w1.58a8", "gemv", "torch_f32", 8.0), ("w1.58a8", "gemv", "ort_int8", 1.5)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="threads for numba, torch and onnxruntime (default 2)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="two small shapes only (for tests and CI)")
    parser.add_argument("--repeat", type=positive_int, default=9, help="interleaved rounds at least (default 9)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timing per shape; rounds go on while it lasts (default 3, quick 0.3)")  # fmt: skip
    parser.add_argument("--path", action="append", default=None,
                        help="kernel path to run (avx512, avx2, generic; repeatable); default: every path this CPU runs")  # fmt: skip
    parser.add_argument("--torchao", action="store_true",
                        help="also time torchao's int8 Linear (slow on CPUs: ~10x torch_int8 as of torchao 0.18)")  # fmt: skip
    parser.add_argument("--machine", default=None,
                        help="write results/kernels/MACHINE/kernels.json in this checkout (instead of --out)")  # fmt: skip
    parser.add_argument("--force", action="store_true",
                        help="write into results/ although the 1-minute load average exceeds half the cores "
                             "(the file is marked load_warning)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)


def results_path(machine: str) -> Path:
    """``results/kernels/<machine>/kernels.json`` of this checkout (``--machine``)."""
    if not machine or not all(c.isalnum() or c in "-_." for c in machine) or machine.startswith("."):
        raise UsageError(f"--machine takes a folder name (letters, digits, '-', '_', '.'), got {machine!r}")
    return Path(__file__).resolve().parents[1] / "results" / "kernels" / machine / "kernels.json"


def _in_results(path: Path | None) -> bool:
    """True where ``path`` lies in a ``results`` folder (this checkout's, or any other)."""
    return path is not None and "results" in Path(os.path.abspath(path)).parts


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
    vnni, amx = "avx512_vnni" in flags, "amx_int8" in flags
    int8 = wide_ops * width // 8 if vnni else width // 8 if width >= 256 else width // 16
    if amx:  # one 16 x 16 x 64 tdpbssd (16,384 MACs) every 16 cycles
        int8 = 1024
    f32 = 2 * min(width, 256) // 32 if amd else wide_ops * width // 32 * (2 if width < 512 else 1)
    ghz = (cpu["mhz"] or 1000.0) / 1000
    per_core = {"binary": binary, "int8": int8, "f32": f32}
    from labutils.kernels.issue_model import loop_bounds, model_for

    model = model_for("avx512" if binary == width == 512 else "avx2" if width >= 256 else "generic", cpu["vendor"])
    bounds = loop_bounds(model) if model else None
    return {
        "cpu": cpu["model"],
        "vendor": cpu["vendor"],
        "issue_model": model,
        # the W1A1 peak ratio: the XNOR loop's issue bound over the float32 FMA peak (a ratio of
        # peaks, not a measurement: a run can beat it where torch float32 runs below its peak)
        "peak_ratio_w1a1_vs_f32": bounds["binary"] / bounds["f32"] if bounds else None,
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
                "int8: 1024 MACs/cycle/core = one AMX TDPBSSD (16 x 16 x 64 MACs) per 16 cycles; the VNNI "
                f"kernels' own bound is {wide_ops * width // 8} ({wide_ops} {width}-bit VPDPBUSD per cycle)"
                if amx
                else f"int8: {int8} MACs/cycle/core = {wide_ops} {width}-bit VPDPBUSD per cycle (64 MACs each)"
                if vnni
                else f"int8: {int8} MACs/cycle/core without VNNI: one 256-bit VPMADDUBSW per cycle (32 MACs) and "
                "its int16 add, widened by VPMADDWD every 63 steps"
            ),
            (
                f"f32: {f32} MACs/cycle/core = "
                + ("two 256-bit FMA pipes (Zen 4 splits 512-bit FMAs over both)" if amd else "two FMA units")
            ),
            (
                f"timings are wall clock: interleaved rounds in a fresh seeded order, one sample of ~{1e3 * SAMPLE_S:.0f} ms "
                "of back-to-back calls per callable per round (3 ms pause before each, and long enough that the "
                "previous library's still-spinning threads and our waking ones cost a few percent at most); "
                "`seconds` is the median sample, `seconds_best` the best, `spread` the "
                "10th and 90th percentiles; ratios are of medians, with the spread of the per-round ratios"
            ),
        ],
    }


def _quiet_import_quantize_dynamic() -> Callable:
    """``torch.ao.quantization.quantize_dynamic`` without its deprecation warnings (it still is the
    dynamic int8 Linear most CPU users run; torchao is the timed alternative, ``--torchao``)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dynamic = _quiet_import_quantize_dynamic()(torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8)
    return torch.no_grad()(lambda x: dynamic(x))


def _torchao_int8(w_codes: np.ndarray) -> Callable[[Any], Any] | None:
    """fn(x float32 [M, K] torch) -> [M, N] through torchao's int8 dynamic-activation Linear;
    None without torchao."""
    import torch

    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        return None
    n, k = w_codes.shape
    model = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(w_codes.astype(np.float32)))
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return torch.no_grad()(lambda x: model(x))


def _ort_session(model: Any, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # its threads would otherwise spin after each call, stealing cores from the next kernel timed
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _ort_int8(w_codes: np.ndarray, threads: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """fn(x uint8 [M, K] = int8 codes + 128) -> int32 [M, N] = x_codes @ w_codes^T through
    onnxruntime's MatMulInteger (a_zero_point 128), on ``threads`` threads; None without onnxruntime."""
    try:
        import onnxruntime  # noqa: F401
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
    session = _ort_session(model, threads)
    return lambda x: session.run(None, {"a": x})[0]


def _ort_int8_dynamic(w_codes: np.ndarray, threads: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """fn(x float32 [M, K]) -> float32 [M, N]: a float MatMul by ``w_codes``^T quantized by
    ``onnxruntime.quantization.quantize_dynamic`` (QInt8 weights; the activations quantized per
    call: DynamicQuantizeLinear + MatMulInteger, fused by onnxruntime); None without it."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        return None
    n, k = w_codes.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "f32",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(w_codes.T.astype(np.float32)), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, 9)
    with tempfile.TemporaryDirectory() as folder:
        source, quantized = Path(folder) / "f32.onnx", Path(folder) / "int8.onnx"
        onnx.save(model, source)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)  # its advice to pre-process a graph of one MatMul
            try:
                quantize_dynamic(source, quantized, weight_type=QuantType.QInt8)
            finally:
                logging.disable(logging.NOTSET)
        session = _ort_session(onnx.load(quantized), threads)
    return lambda x: session.run(None, {"x": x})[0]


def _kernel_name(scheme: str, path: str, default: str) -> str:
    return scheme if path == default else f"{scheme}@{path}"


def _kernels_case(m: int, k: int, n: int, seed: int, paths: list[str], threads: int,
                  torchao: bool) -> tuple[dict[str, Callable[[], Any]], Callable[[], None]]:  # fmt: skip
    """The callables to time on one shape (inputs prepared, not timed) and a check that every
    integer kernel (ours on every path, torch's and onnxruntime's) equals the numpy int64
    reference and every float-in kernel the float reference of its quantization."""
    import torch

    from labutils import kernels, packing, quant

    rng = np.random.default_rng(seed)
    x_f = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x_np = x_f.numpy()
    x_signs = np.where(rng.random((m, k)) < 0.5, -1, 1).astype(np.int8)
    w_signs = np.where(rng.random((n, k)) < 0.5, -1, 1).astype(np.int8)
    w_trits = rng.integers(-1, 2, (n, k), dtype=np.int8)
    x_codes = rng.integers(-128, 128, (m, k), dtype=np.int8)
    x_rows, w_rows = packing.pack_binary_rows(x_signs), packing.pack_binary_rows(w_signs)
    packed = {"w1a1": kernels.prepack_w1a1(w_rows, k), "w1a8": kernels.prepack_w1a8(w_rows, k),
              "w1.58a8": kernels.prepack_w158a8(w_trits)}  # fmt: skip
    layers = {scheme: kernels.PackedBitLinear(w, torch.tensor(1.0), act="binary" if scheme == "w1a1" else "int8")
              for scheme, w in packed.items()}  # fmt: skip
    w_f = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1))
    x_t, w_t = torch.from_numpy(x_codes), torch.from_numpy(np.ascontiguousarray(w_trits.T))
    x_u8 = (x_codes.astype(np.int16) + 128).astype(np.uint8)
    torch_int8 = _torch_int8(w_trits)
    fns: dict[str, Callable[[], Any]] = {
        "torch_f32": lambda: torch.nn.functional.linear(x_f, w_f),
        "torch_int8": lambda: torch_int8(x_f),
        "torch_int_mm": lambda: torch._int_mm(x_t, w_t),
    }
    torchao_int8 = _torchao_int8(w_trits) if torchao else None
    if torchao_int8 is not None:
        fns["torchao_int8"] = lambda: torchao_int8(x_f)
    ort_int8, ort_dynamic = _ort_int8(w_trits, threads), _ort_int8_dynamic(w_trits, threads)
    if ort_int8 is not None:
        fns["ort_int8"] = lambda: ort_int8(x_u8)
    if ort_dynamic is not None:
        fns["ort_int8_dynamic"] = lambda: ort_dynamic(x_np)
    default = paths[0]

    def on(path: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with kernels.use(path):
                return fn()

        return run

    inputs = {"w1a1": x_rows, "w1a8": x_codes, "w1.58a8": x_codes}
    gemm = {"w1a1": kernels.w1a1_gemm, "w1a8": kernels.w1a8_gemm, "w1.58a8": kernels.w158a8_gemm}
    for path in paths:
        for scheme in packed:
            fns[_kernel_name(scheme, path, default)] = on(
                path, lambda s=scheme: gemm[s](inputs[s], packed[s]))
            fns[_kernel_name(f"{scheme}+q", path, default)] = on(path, lambda s=scheme: layers[s](x_f))
    fns["w1a1_simple"] = lambda: kernels.w1a1_gemm_simple(x_rows, w_rows, k)
    if m == 1:  # one token: the weights as table indices too (1.67 bits a weight, kernels.lut)
        lut_packed = kernels.pack_lut(w_trits)
        for path in paths:
            fns[_kernel_name("w1.58a8_lut", path, default)] = lambda p=path: kernels.lut_gemv(x_codes[0], lut_packed, p)[None]

    def check() -> None:
        rows = sorted({0, m - 1})

        def ref(x: np.ndarray, w: np.ndarray) -> np.ndarray:
            return x[rows].astype(np.int64) @ w.astype(np.int64).T

        wanted = {"w1a1": ref(x_signs, w_signs), "w1a8": ref(x_codes, w_signs), "w1.58a8": ref(x_codes, w_trits),
                  "w1a1_simple": ref(x_signs, w_signs), "ort_int8": ref(x_codes, w_trits),
                  "torch_int_mm": ref(x_codes, w_trits), "w1.58a8_lut": ref(x_codes, w_trits)}  # fmt: skip
        codes, scale = quant.quantize_activations_absmax(x_f[rows], 8)
        signs = np.where(x_np[rows] >= 0, 1, -1)
        floats = {"w1.58a8+q": (codes.numpy().astype(np.int64) @ w_trits.astype(np.int64).T) * scale.numpy(),
                  "w1a8+q": (codes.numpy().astype(np.int64) @ w_signs.astype(np.int64).T) * scale.numpy(),
                  "w1a1+q": (signs @ w_signs.astype(np.int64).T) * np.abs(x_np[rows]).mean(1, keepdims=True)}  # fmt: skip
        for name, fn in fns.items():
            scheme = name.split("@")[0]
            if scheme in wanted and not np.array_equal(np.asarray(fn())[rows], wanted[scheme]):
                raise AssertionError(f"{name} on [{m}, {k}] x [{n}, {k}] differs from the int64 reference")
            if scheme in floats and not np.allclose(np.asarray(fn())[rows], floats[scheme], rtol=1e-4, atol=1e-3):
                raise AssertionError(f"{name} on [{m}, {k}] x [{n}, {k}] differs from its float reference")

    return fns, check


def _interleaved_samples(fns: dict[str, Callable[[], Any]], repeat: int, budget_s: float, seed: int = 0,
                         sample_s: float | None = None) -> dict[str, list[float]]:  # fmt: skip
    """Seconds per call of each fn, one sample (``sample_s`` of back-to-back calls, default
    ``SAMPLE_S``) per fn per round, for at least ``repeat`` rounds and then while ``budget_s``
    lasts. Round i of every fn ran under the same load, so per-round ratios pair up
    (``measure.paired_ratio``); each round's order is a fresh permutation (seeded), so no fn
    always runs right after the same other one.

    torch, onnxruntime and Numba each keep their own threads, which spin for a while after a
    parallel region; a short pause before each sample keeps one library's spinning threads from
    being billed to the next.
    """
    sample_s = SAMPLE_S if sample_s is None else sample_s
    names, order = list(fns), np.random.default_rng(seed)
    calls = {}
    for name, fn in fns.items():  # warm-up call (compiles, fills caches) and calls per sample
        fn()
        start = time.perf_counter()
        fn()
        calls[name] = max(1, int(sample_s / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    deadline, rounds = time.perf_counter() + budget_s, 0
    while rounds < repeat or time.perf_counter() < deadline:
        for name in (names[i] for i in order.permutation(len(names))):
            fn, count = fns[name], calls[name]
            time.sleep(0.003)
            start = time.perf_counter()
            for _ in range(count):
                fn()
            samples[name].append((time.perf_counter() - start) / count)
        rounds += 1
    return samples


def _geomean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values))))


def _kernels_targets(rows: list[dict[str, Any]], path: str, default: str, vendor: str) -> list[dict[str, Any]]:
    """Each target of ``path`` against every shape of its kind: the geometric mean of the ratios
    of medians (the target's statistic), shapes passing, the worst, and the same of best samples."""
    summary = []
    for scheme, kind, baseline, minimum in kernel_targets(path, vendor):
        kernel = _kernel_name(scheme, path, default)
        cells = [r["kernels"][kernel]["vs"][baseline] for r in rows
                 if r["kind"] == kind and kernel in r["kernels"] and baseline in r["kernels"][kernel]["vs"]]  # fmt: skip
        if not cells:
            continue
        ratios, best = [c["x"] for c in cells], [c["x_best"] for c in cells]
        geomean = _geomean(ratios)
        summary.append(
            {
                "kernel": kernel,
                "scheme": scheme,
                "path": path,
                "kind": kind,
                "baseline": baseline,
                "target_ratio": minimum,
                "statistic": "geometric mean over the shapes of the ratio of medians",
                "shapes": len(ratios),
                "shapes_passing": sum(x >= minimum for x in ratios),
                "worst_ratio": min(ratios),
                "geomean_ratio": geomean,
                "pass": geomean >= minimum,
                "geomean_ratio_best": _geomean(best),
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


def _baselines_of(kernel: str) -> tuple[str, ...]:
    """The baselines a kernel is compared with: float32 and torch int8 always (every table shows
    both); the integer-only ones for our kernels on quantized inputs (like with like), the
    float-in int8 ones for the "+q" rows."""
    scheme = kernel.split("@")[0]
    if kernel in BASELINES:  # the baselines against the two every table shows (1.0 against itself)
        return ("torch_f32", "torch_int8")
    if scheme.endswith("+q"):
        return ("torch_f32", *FLOAT_BASELINES)
    return ("torch_f32", *INTEGER_BASELINES, "torch_int8")


def _kernels_row(name: str, m: int, k: int, n: int, args: argparse.Namespace, peak: dict, budget: float) -> dict:
    """One shape: check exactness, time every kernel, and express each as ratios of medians to
    the baselines (with the spread of the per-round ratios and the ratio of best samples)."""
    from labutils.measure import Timing, paired_ratio

    fns, check = _kernels_case(m, k, n, args.seed, args.path, args.threads, args.torchao)
    check()
    samples = _interleaved_samples(fns, args.repeat, budget, seed=args.seed)
    timing = {name: Timing.from_seconds(s) for name, s in samples.items()}
    rows = {}
    for kernel, t in timing.items():
        gmacs = m * k * n / t.median / 1e9
        vs = {}
        for base in _baselines_of(kernel):
            if base not in timing:
                continue
            paired = paired_ratio(timing[base], t)
            per_round = np.array(timing[base].seconds) / np.array(t.seconds)
            vs[base] = {"x": paired["ratio"], "x_rounds_p10_p90": [float(np.percentile(per_round, 10)),
                                                                    float(np.percentile(per_round, 90))],
                        "x_rounds_min_max": paired["spread"], "verdict": paired["verdict"],
                        "x_best": timing[base].best / t.best}  # fmt: skip
        rows[kernel] = {
            "seconds": t.median,
            "seconds_best": t.best,
            "spread": [float(np.percentile(t.seconds, 10)), float(np.percentile(t.seconds, 90))],
            "rounds": t.runs,
            "gmac_per_s": gmacs,
            "gmac_per_s_best": m * k * n / t.best / 1e9,
            "vs": vs,
            **{f"x_{base}": v["x"] for base, v in vs.items()},
            **{f"x_best_{base}": v["x_best"] for base, v in vs.items()},
            "peak_fraction": gmacs / peak["peak_gmac_per_s"][_KERNEL_PEAK_CLASS.get(kernel.split("@")[0].removesuffix("+q"), "int8")],
        }
    kind = "gemv" if m == 1 else "gemm"
    return {"layer": name, "kind": kind, "m": m, "k": k, "n": n, "kernels": rows}


def _kernels_print(result: dict[str, Any]) -> None:
    peak, load = result["peak"], result["loadavg_1min_before_after"]
    features = result["cpu_features"]
    print(
        f"kernels: {result['threads']} thread(s), medians of >= {result['repeat']} interleaved rounds; "
        f"CPU {features['cpu']} ({', '.join(features['flags'])}); paths {', '.join(result['paths'])} "
        f"(unsuffixed: {result['kernel_path']}); load average {load[0]:.1f} -> {load[1]:.1f}; peak GMAC/s at "
        f"{peak['frequency_ghz']:.2f} GHz: " + ", ".join(f"{c} {v:.0f}" for c, v in peak["peak_gmac_per_s"].items())
    )
    if result.get("load_warning"):
        print(f"LOAD WARNING: {result['load_warning']}")
    for name, text in result["baselines"].items():
        print(f"  {name}: {text}")
    print(f"{'layer':<16} {'M':>5} {'K':>5} {'N':>6} {'kernel':<18} {'ms':>9} {'GMAC/s':>8}  ratios of medians "
          "[per-round p10-p90] (best samples)")  # fmt: skip
    for r in result["results"]:
        for kernel, t in r["kernels"].items():
            ratios = "  ".join(f"x{b} {v['x']:.2f} [{v['x_rounds_p10_p90'][0]:.2f}-{v['x_rounds_p10_p90'][1]:.2f}] "
                               f"({v['x_best']:.2f})" for b, v in t["vs"].items())  # fmt: skip
            print(f"{r['layer']:<16} {r['m']:>5} {r['k']:>5} {r['n']:>6} {kernel:<18} {1e3 * t['seconds']:>9.3f} "
                  f"{t['gmac_per_s']:>8.1f}  {ratios}")  # fmt: skip
    print("targets per kernel path (geomean of the ratios of medians; in brackets, of the best samples):")
    for t in result["targets"]:
        print(
            f"  {t['path']:<7} {t['kernel']:<18} {t['kind']} vs {t['baseline']:<12} >= {t['target_ratio']:>4}x: "
            f"geomean {t['geomean_ratio']:.2f}x  {'pass' if t['pass'] else 'MISS'}  ({t['shapes_passing']}/"
            f"{t['shapes']} shapes, worst {t['worst_ratio']:.2f}x; best samples: geomean "
            f"{t['geomean_ratio_best']:.2f}x)"
        )


def _threading() -> dict[str, Any]:
    """The thread pools timed: Numba's threading layer, torch's parallel backend and BLAS."""
    import numba
    import torch

    info = torch.__config__.parallel_info().splitlines()
    return {
        "numba_threading_layer": numba.threading_layer(),
        "numba_num_threads": numba.config.NUMBA_NUM_THREADS,
        "torch_parallel_info": [line.strip() for line in info if line.strip()],
        "environment": {v: os.environ[v] for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
                                                   "OMP_WAIT_POLICY", "KMP_BLOCKTIME") if v in os.environ},
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }  # fmt: skip


def _load_guard(args: argparse.Namespace, load_before: float) -> str | None:
    """None, or the warning a ``--force`` run into results/ carries; UsageError (before any work)
    for a run into results/ on a machine busier than half its cores without ``--force``."""
    if not _in_results(args.out):
        return None
    cores = os.cpu_count() or 1
    if load_before <= cores / 2:
        return None
    text = (f"1-minute load average {load_before:.2f} before the run, above half of the {cores} cores: "
            "other work shared the CPU, so medians include the scheduler's time slices")  # fmt: skip
    if not args.force:
        raise UsageError(f"refusing to write {args.out}: {text}; rerun on a quiet machine, or pass --force "
                         "to write it marked load_warning")  # fmt: skip
    return text


def run_command(args: argparse.Namespace) -> dict[str, Any]:
    """Every kernel of ``labutils.kernels``, on every kernel path this CPU runs (or ``--path``),
    on quantized inputs and as a float-in layer, against torch float32 and the int8 baselines
    (``BASELINES``), all on ``--threads`` threads, in interleaved rounds (module docstring).

    Shapes: the BERT-base and MiniLM linear layers at 128, 512 and 2048 tokens (GEMM) and two
    LLaMA-7B layers at batch 1 (GEMV); ``--quick``: one of each. The unsuffixed kernel names are
    the first path run (the default: the active path, ``LABBOOK_KERNEL_PATH`` or this CPU's best);
    ``name@path`` are the others. Refuses (UsageError) to write into ``results/`` on a busy
    machine without ``--force``.
    """
    import numba
    import torch
    from tqdm.auto import tqdm

    from labutils import kernels
    from labutils.runs import device_name

    if not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        raise UsageError(f"--threads must be in [1, {numba.config.NUMBA_NUM_THREADS}], got {args.threads}")
    if args.machine is not None:
        if getattr(args, "out", None) is not None:
            raise UsageError("give --machine or --out, not both")
        args.out = results_path(args.machine)
    load_before = load_average()
    load_warning = _load_guard(args, load_before[0] if load_before else 0.0)
    # The active path (LABBOOK_KERNEL_PATH, else this CPU's best) first: it names the unsuffixed rows.
    args.path = list(dict.fromkeys(args.path or [kernels.active_path(), *kernels.available_paths()]))
    for path in args.path:
        try:
            kernels.dispatch.check_path(path)
        except (ValueError, RuntimeError) as error:
            raise UsageError(f"--path {path}: {error}") from None
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 3.0)
    peak = _kernels_peak(args.threads)
    origin = provenance(device_name("cpu"))
    old_threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    try:
        shapes = _kernels_shapes(args.quick)
        rows = [_kernels_row(*shape, args, peak, budget) for shape in tqdm(shapes, desc="kernels", leave=False)]
    finally:
        torch.set_num_threads(old_threads[0])
        numba.set_num_threads(old_threads[1])
    default = args.path[0]
    vendor = cpu_info()["vendor"]
    targets = [t for path in args.path for t in _kernels_targets(rows, path, default, vendor)]
    load_after = load_average()
    result = {
        "threads": args.threads,
        "quick": args.quick,
        "repeat": args.repeat,
        "budget_s_per_shape": budget,
        "seed": args.seed,
        "statistic": f"median of interleaved rounds (one sample of ~{1e3 * SAMPLE_S:.0f} ms of back-to-back calls per "
                     "callable per round, a fresh seeded order each round); ratios of medians with the 10th-90th "
                     "percentile of the per-round ratios; best samples beside",
        "sample_s": SAMPLE_S,
        "loadavg_1min_before_after": [load_before[0] if load_before else None, load_after[0] if load_after else None],
        "loadavg_before_after": [load_before, load_after],
        **({"load_warning": load_warning} if load_warning else {}),
        "provenance": origin,
        "commit": origin["commit"],
        "cpu_features": kernels.cpu_features(),
        "cpu_vendor": vendor,
        "caches": cache_sizes(),
        "kernel_path": default,
        "paths": args.path,
        "baselines": {name: BASELINES[name] for name in rows[0]["kernels"] if name in BASELINES},
        "int8_baseline": BASELINES["torch_int8"],
        "like_with_like": {"integers in (w1a1, w1a8, w1.58a8)": list(INTEGER_BASELINES),
                           "float in (w1a1+q, w1a8+q, w1.58a8+q)": list(FLOAT_BASELINES)},  # fmt: skip
        "threading": _threading(),
        "numba_threading_layer": numba.threading_layer(),
        "torch": torch.__version__,
        "onnxruntime": origin["versions"].get("onnxruntime"),
        "peak": peak,
        "results": rows,
        "targets": targets,
        "pass": all(t["pass"] for t in targets if t["path"] == default),
    }  # fmt: skip
    _kernels_print(result)
    if args.out is not None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
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


def committed_kernel_files(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Every full (not ``--quick``) ``bench kernels`` run in ``folder``: the machine folders'
    ``<machine>/kernels.json`` (this method, issue 26) in name order, then the older flat
    ``*.json`` files: {file name relative to ``folder``: run}."""
    folder = Path(folder)
    runs: dict[str, dict[str, Any]] = {}
    for file in [*sorted(folder.glob("*/kernels.json")), *sorted(folder.glob("*.json"))]:
        run = json.loads(file.read_text())
        if run.get("command") == "kernels" and not run.get("quick"):
            runs[file.relative_to(folder).as_posix()] = run
    return runs


def committed_kernel_runs(folder: str | Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """One run per kernel path (``committed_kernel_files``: machine folders first, then flat
    files in name order; the first of a path wins): {path: (file name, run)}."""
    runs: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, run in committed_kernel_files(folder).items():
        runs.setdefault(kernel_run_path(run), (name, run))
    return runs
