"""What a kernel's first call after another library's costs: one LLaMA-7B up-projection GEMV
(4096 -> 11008, one token) on the 2-bit tiles and on table indices, timed right after a call of
torch float32, torch's dynamic int8 layer, ONNX Runtime's dynamic int8 MatMul, the tiles
themselves, or nothing, with a 3 ms pause between (as the kernel benchmark's rounds have), as
samples of 1, 3, 10 and 30 back-to-back calls. One JSON line: medians in ms per call, the load
before and after. Why the benchmark's samples are ~10 ms (``labutils.kernel_bench.SAMPLE_S``).

    NUMBA_THREADING_LAYER=omp taskset -c 0,1 python results/kernels/first_call.py >> results/kernels/xeon-spr/first-call.jsonl
"""

import json
import os
import subprocess
import time

import numba
import numpy as np
import torch

numba.set_num_threads(2)
torch.set_num_threads(2)
from labutils import kernels  # noqa: E402
from labutils.kernel_bench import _ort_int8_dynamic, _torch_int8  # noqa: E402

load_before = os.getloadavg()
rng = np.random.default_rng(0)
k, n = 4096, 11008
w = rng.integers(-1, 2, (n, k), dtype=np.int8)
x = rng.integers(-128, 128, (1, k), dtype=np.int8)
lut, tiles = kernels.pack_lut(w), kernels.prepack_w158a8(w)
x_float, w_float = torch.randn(1, k), torch.randn(n, k)
ort, torch_int8 = _ort_int8_dynamic(w, 2), _torch_int8(w)
timed = {"lut": lambda: kernels.lut_gemv(x[0], lut), "tiles": lambda: kernels.w158a8_gemm(x, tiles)}
before = {"nothing": lambda: None, "torch_f32": lambda: torch.nn.functional.linear(x_float, w_float),
          "torch_int8": lambda: torch_int8(x_float), "ort_int8_dynamic": lambda: ort(x_float.numpy()), "tiles": timed["tiles"]}
for fn in [*timed.values(), *before.values()]:
    fn(), fn()
samples: dict[str, list[float]] = {}
for calls in (1, 3, 10, 30):
    for _ in range(9):
        for b_name, b in before.items():
            for t_name, fn in timed.items():
                b()
                time.sleep(0.003)
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                samples.setdefault(f"{calls} calls, {t_name} after {b_name}", []).append((time.perf_counter() - start) / calls)
print(json.dumps({
    "experiment": "first_call", "shape": [1, k, n], "rounds": 9,
    "median_ms_per_call": {key: round(1e3 * float(np.median(v)), 3) for key, v in samples.items()},
    "cpu": kernels.cpu_features()["cpu"], "llvm_cpu": kernels.cpu_features()["llvm_cpu"], "threading_layer": numba.threading_layer(),
    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_before": load_before, "load_after": os.getloadavg(),
}))
