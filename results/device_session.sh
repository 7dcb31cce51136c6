#!/usr/bin/env bash
# One `device` (GPU) session: the IMDb ablation sweep and chapter 8's language models side by side
# on one H200, as the `run` tool's commands (lessons of 2026-12-01 in results/lm/README.md). The machine keeps processes started with setsid
# between calls while a call is in flight; so `start` launches both under setsid and every call
# then `poll`s (prints progress, returns before the call's limit), and `collect` puts the results
# under $OUT. Carry (the same in every call): .carry/minilm_bf16.tar.xz .carry/imdb .carry/whl .carry/src
# .carry/COMMIT, made here by:
#   rm -rf .carry/src && mkdir -p .carry/src && git archive HEAD labutils results | tar -x -C .carry/src \
#     && git rev-parse HEAD > .carry/COMMIT
#
#   bash results/device_session.sh start;   bash results/device_session.sh poll 540
#
# Since the working tree itself carries chapter 8's committed model and adapters (~20 MB), the
# MiniLM archive, IMDb and the tree no longer fit one call's 64 MiB. The third session
# (2026-12-02) ran from the tree (no .carry/src) in two calls a few seconds apart, the machine
# keeping /tmp between them: first carry [.carry/minilm_bf16.tar.xz .carry/whl .carry/COMMIT] and run
#   mkdir -p /tmp/labbook/minilm && tar xJf .carry/minilm_bf16.tar.xz -C /tmp/labbook/minilm --strip-components=1 \
#     && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl
# then carry [.carry/imdb .carry/whl .carry/COMMIT] in every later call and run this script from the tree.
#   bash results/device_session.sh poll 570
#   bash results/device_session.sh collect
set -uo pipefail
# The code runs from .carry/src: a `git archive` of one commit (its hash in .carry/COMMIT), so
# what runs is exactly a commit, whatever else the working tree held when the call was made.
# Every call replaces the carried folders on the machine, so processes that outlive a call must
# not run from them (2026-12-01: a call deleted the code and working folder under running jobs,
# whose Numba compilation then failed): `start` copies code and data to /tmp/labbook first.
root=$(cd "$(dirname "$0")/.." && pwd)
case $root in */.carry/src) carry=$(dirname "$root") ;; *) carry=$root/.carry ;; esac
work=/tmp/labbook
mkdir -p "$work"
if [ ! -d "$work/code/labutils" ]; then
  cp -r "$root" "$work/code.tmp" && mv "$work/code.tmp" "$work/code"
  cp -r "$carry/imdb" "$work/imdb"
fi
cd "$work/code"
if [ ! -d /tmp/site/datasets ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$carry"/whl/*.whl
fi
if [ ! -f "$work/minilm/config.json" ]; then
  mkdir -p "$work/minilm" && tar xJf "$carry"/minilm_bf16.tar.xz -C "$work/minilm" --strip-components=1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LABBOOK_IMDB_DIR=$work/imdb MODEL=$work/minilm
# An IMDb student holds ~19.5 GB of GPU memory: 7 beside 5 language-model runs filled an H200.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True} MAX_PARALLEL=${MAX_PARALLEL:-5}
export LABBOOK_COMMIT=${LABBOOK_COMMIT:-$(cat "$carry"/COMMIT 2>/dev/null || echo unknown)}

case ${1:?start|poll|collect} in
start)
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  setsid nohup bash results/imdb-full/gpu_sweep.sh run "$work/sweep" >"$work/sweep.log" 2>&1 </dev/null &
  # ONLY (IMDb variants), ROWS / LR_CHECKS (language models) pass through (a session that only adds the rows an earlier one lacked).
  # Unless this session retrains it, LoRA tunes the committed ternary model (results/lm/full).
  # LM=0: the IMDb sweep alone (the session of 2026-12-06: seeds, augmentation, embeddings).
  if [ "${LM:-1}" = 1 ]; then
    mkdir -p "$work/lm"
    [[ " ${ROWS-w1.58a8-l} " == *" w1.58a8-l "* ]] || cp -n results/lm/full/w1.58a8-l.packed "$work/lm/"
    SKIP_ATTENTION=1 setsid nohup bash results/lm/gpu_train.sh "$work/lm" "$work/sweep/teacher/teacher/model.safetensors" >"$work/lm.log" 2>&1 </dev/null &
  else
    echo "lm all done (LM=0: not run)" >"$work/lm.log"
  fi
  sleep 5; echo started
  ;;
poll)
  deadline=$((SECONDS + ${2:-540}))
  while [ $SECONDS -lt $deadline ]; do
    if grep -qs "all runs finished" "$work/sweep.log" && grep -qs "lm all done" "$work/lm.log"; then echo "ALL DONE"; break; fi
    sleep 60
    echo "---- $(date -u +%T)"; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    bash results/imdb-full/gpu_sweep.sh status "$work/sweep" 2>&1 | tail -20
    for f in "$work"/lm/*.log "$work"/lm/lr/*.log; do [ -f "$f" ] && echo "$(basename "$f"): $(tail -c 300 "$f" | tr '\r\n' '  ' | tail -c 110)"; done
    tail -n 2 "$work/sweep.log" "$work/lm.log"
  done
  ;;
collect)
  mkdir -p "${OUT:?}"
  # Attention vs length, timed now that the GPU is otherwise idle.
  [ "${LM:-1}" = 0 ] || [ -f "$work/lm/attention_cuda.json" ] || timeout 240 python -m labutils.bench lm --preset full --stage attention \
      --tokenizer results/lm/tokenizer.json --out "$work/lm" --quiet 2>&1 | tail -3
  bash results/imdb-full/gpu_sweep.sh collect "$work/sweep" "$OUT"
  [ "${LM:-1}" = 0 ] || (cd "$work/lm" && tar czf "$OUT/lm.tgz" --exclude='*.safetensors' --exclude='*.packed' .)
  for f in "$work"/lm/w1.58a8-m.packed "$work"/lm/w1.58a8-l.packed "$work"/lm/lora_adapters.safetensors; do [ -f "$f" ] && cp "$f" "$OUT/"; done
  ls -la "$OUT"
  ;;
esac
