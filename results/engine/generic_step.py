"""One 700m (or other dummy size) decode step of the engine, profiled, on whatever kernel path the
environment forces: ``LABBOOK_KERNEL_PATH=generic`` times the path an arm64 laptop runs.

    PYTHONPATH=<checkout> LABBOOK_KERNEL_PATH=generic NUMBA_THREADING_LAYER=omp taskset -c 0,1 \
        python results/engine/generic_step.py 700m <label>

Prints one JSON line: the label (the checkout's commit), the path, the size, the median step and
its ternary kernel calls in ms (``DecoderEngine.profile_step`` at position 128, 20 repeats), the
1-minute load average. ``generic-gemv-zen3.jsonl`` interleaves two checkouts this way.
"""

import json
import os
import sys

from labutils.engine.decoder import DecoderEngine, EngineShape
from labutils.lm.preset import PRESETS, row_config
from labutils.measure import threads

size, label = sys.argv[1], sys.argv[2]
cfg = row_config(f"w1.58a8-{size}", PRESETS["full"], 8192, max_seq_len=192)
with threads(2):
    engine = DecoderEngine.random(EngineShape.of(cfg), seed=0, embedding="bfloat16", kv_cache="bfloat16")
    engine.profile_step(128, repeat=3)  # compiles
    profile = engine.profile_step(128, repeat=20)
print(json.dumps({"code": label, "path": os.environ.get("LABBOOK_KERNEL_PATH"), "size": size,
                  "step_ms": 1e3 * profile["total"], "kernels_ms": 1e3 * profile["integer_kernel"],
                  "load": os.getloadavg()[0]}))  # fmt: skip
