#!/usr/bin/env bash
# The 700m decode step, before and after a change: BEFORE (a git worktree of the earlier commit)
# with a float32 KV cache, this tree with a float32 and a bfloat16 one, in alternating processes,
# ROUNDS rounds, one JSON line each into OUT.
#   git worktree add /tmp/before 58e0ee2
#   BEFORE=/tmp/before OUT=/tmp/ab.jsonl ROUNDS=4 bash results/engine/step_ab.sh
set -uo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
: > "${OUT:?}"
for i in $(seq "${ROUNDS:-4}"); do
  for spec in "${BEFORE:?}:float32" "$here:float32" "$here:bfloat16"; do
    tree=${spec%%:*} kv=${spec##*:}
    (cd "$tree" && PYTHONPATH=$tree NUMBA_THREADING_LAYER=omp taskset -c 0,1 python "$here/results/engine/step_profile.py" "$kv" 2>/dev/null \
      | python -c "import json, sys; d = json.loads(sys.stdin.read()); d.update(tree='$tree', round=$i); print(json.dumps(d))" >> "$OUT")
  done
done
