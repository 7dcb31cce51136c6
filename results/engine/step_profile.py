"""One 700m-shaped decode step's profile (DecoderEngine.profile_step at position 128, random ternary
weights, vocabulary 8,192, bfloat16 head), printed as one JSON line. Argument: the KV cache,
float32 or bfloat16 (a tree from before the bfloat16 cache takes float32 only).

    NUMBA_THREADING_LAYER=omp taskset -c 0,1 python results/engine/step_profile.py bfloat16
"""

import json
import os
import sys

import numba

numba.set_num_threads(2)
from labutils.engine import DecoderEngine, EngineShape  # noqa: E402
from labutils.lm.preset import PRESETS, row_config  # noqa: E402

kv = sys.argv[1] if len(sys.argv) > 1 else "float32"
cfg = row_config("w1.58a8-700m", PRESETS["full"], 8192, max_seq_len=192)
extra = {} if kv == "float32" else {"kv_cache": kv}
engine = DecoderEngine.random(EngineShape.of(cfg), seed=0, embedding="bfloat16", **extra)
out = engine.profile_step(128, repeat=20)
out.update(threading=numba.threading_layer(), kv_cache=kv, load=os.getloadavg()[0])
print(json.dumps(out))
