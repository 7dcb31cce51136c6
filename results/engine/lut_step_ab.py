"""The 700m-shaped decode step with its projections as 2-bit tiles and as table indices
(``DecoderEngine(gemv="lut")``, 1.67 bits a weight), the same weights in one process, steps
interleaved; one JSON line: medians, the per-round ratio's p10-p90, both profiles, the bytes
each reads, the load before and after.

    NUMBA_THREADING_LAYER=omp taskset -c 0,1 python results/engine/lut_step_ab.py 40 >> results/engine/lut-ab-zen3.jsonl
"""

import json
import os
import subprocess
import sys
import time

import numba
import numpy as np

numba.set_num_threads(2)
from labutils.engine import DecoderEngine, EngineShape  # noqa: E402
from labutils.kernels import cpu_features  # noqa: E402
from labutils.lm.preset import PRESETS, row_config  # noqa: E402

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 40
load_before = os.getloadavg()
cfg = row_config("w1.58a8-700m", PRESETS["full"], 8192, max_seq_len=192)
lut = DecoderEngine.random(EngineShape.of(cfg), seed=0, embedding="bfloat16", kv_cache="bfloat16", gemv="lut")
tiles = DecoderEngine(lut.shape, lut.weights, lut.scales, lut.gains, lut.embed, lut.final_gain, kv_cache="bfloat16")
prompt = np.random.default_rng(0).integers(0, lut.shape.vocab_size, 128)
logits = []
for engine in (tiles, lut):
    engine.forward(prompt)
    logits.append(engine.step(7).copy())
assert np.array_equal(*logits)  # the same int32 dots, so the same logits
seconds = {"tiles": [], "lut": []}
for _ in range(rounds):
    for name, engine in (("tiles", tiles), ("lut", lut)):
        engine.reset(128)
        start = time.perf_counter()
        engine.step(7)
        seconds[name].append(time.perf_counter() - start)
t = {k: np.array(v[3:]) for k, v in seconds.items()}  # the first rounds warm the caches
ratio = t["tiles"] / t["lut"]
print(json.dumps({
    "experiment": "lut_step_ab", "model": "700m", "position": 128, "rounds": len(ratio),
    "tiles_ms": 1e3 * float(np.median(t["tiles"])), "lut_ms": 1e3 * float(np.median(t["lut"])),
    "speedup": float(np.median(ratio)), "speedup_p10_p90": [float(np.percentile(ratio, 10)), float(np.percentile(ratio, 90))],
    "tiles_mb": sum(w.nbytes for w in tiles.weights.values()) / 1e6,
    "lut_mb": sum(d.nbytes + n.nbytes for d, n in lut.lut.values()) / 1e6,
    "profile_tiles": tiles.profile_step(128, repeat=10), "profile_lut": lut.profile_step(128, repeat=10),
    "cpu": cpu_features()["cpu"], "llvm_cpu": cpu_features()["llvm_cpu"], "kernel_path": cpu_features()["path"], "threading_layer": numba.threading_layer(),
    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_before": load_before, "load_after": os.getloadavg(),
}))
