#!/usr/bin/env bash
# Chapter 8's language models on one GPU: every row of the `full` preset (full precision and
# BitNet b1.58 at sizes s, m, l) as its own process, a learning-rate check at size m beside them,
# then LoRA on the largest ternary model (graded by chapter 7's IMDb classifier) and the
# attention-vs-length measurement (skipped with SKIP_ATTENTION=1).
#
#   bash results/lm/gpu_train.sh OUT CLASSIFIER
#   ROWS="w1.58a8-s w1.58a8-m w1.58a8-l" LR_CHECKS="w1.58a8-m:lr_bitnet:1.5e-3" bash results/lm/gpu_train.sh OUT CLASSIFIER
#
# ROWS and LR_CHECKS (row:field:value, space separated) default to every row and every check;
# setting them trains only some (a later session adding the rows an earlier one did not finish);
# ROWS="" trains none (LoRA then tunes a w1.58a8-l.packed already in OUT, e.g. the committed one).
#
# Issue 30's levers, none by default (each NAME its own folder, every --set of it joined by +):
#   VARIANTS="NAME:ROW:FIELD=VALUE+FIELD=VALUE ..."  a row trained with other preset fields, beside
#       the rows, into OUT/variants/NAME (BitNet's two-stage schedule: two_stage=true);
#   LORA_RUNS="NAME:FIELD=VALUE+FIELD=VALUE ..."     LoRA with other fields (lora_steps, lora_rank,
#       lora_alpha, lora_skip, ...) on OUT's w1.58a8-l.packed, into OUT/lora/NAME, beside the
#       preset's LoRA (SKIP_LORA=1 leaves that one out).
#   ROWS="" LR_CHECKS="" SKIP_LORA=1 SKIP_ATTENTION=1 \
#   VARIANTS="two-stage:w1.58a8-l:two_stage=true two-stage-4.5e-3:w1.58a8-l:two_stage=true+lr_bitnet=4.5e-3" \
#   LORA_RUNS="steps-3200:lora_steps=3200 rank-64:lora_rank=64+lora_alpha=128" bash results/lm/gpu_train.sh OUT CLASSIFIER
#
# OUT: the output folder (train_<row>.json, <row>.packed / .safetensors, lora.json, attention_cuda.json,
#      lr/<name>/train_<row>.json, variants/<name>/train_<row>.json, lora/<name>/lora.json).
#      CLASSIFIER: a trained IMDb classifier's model.safetensors (the benchmark's teacher:
#      OUT_OF_THE_IMDB_RUN/teacher/model.safetensors); the LoRA stage waits for it.
# Needs: LABBOOK_IMDB_DIR, MODEL (the MiniLM folder the classifier was built on), labutils importable,
# results/lm/tokenizer.json (trained with `python -m labutils.bench lm --preset full --stage tokenizer`).
set -euo pipefail
out=${1:?OUT folder}
classifier=${2:?CLASSIFIER model.safetensors}
MODEL=${MODEL:?set MODEL to the MiniLM folder}
here=$(cd "$(dirname "$0")" && pwd)
lm=(python -m labutils.bench lm --preset full --tokenizer "$here/tokenizer.json" --quiet)
mkdir -p "$out/lr"

pids=() lora_after=()
for row in ${ROWS-fp-s w1.58a8-s fp-m w1.58a8-m fp-l w1.58a8-l}; do
  "${lm[@]}" --stage train --rows "$row" --out "$out" >"$out/$row.log" 2>&1 &
  pids+=($!)
  [ "$row" != w1.58a8-l ] || lora_after=($!)
done
# Is each variant at a fair learning rate? The same size m at half and double its preset rate.
for spec in ${LR_CHECKS-fp-m:lr_fp:5e-4 fp-m:lr_fp:2e-3 w1.58a8-m:lr_bitnet:1.5e-3 w1.58a8-m:lr_bitnet:6e-3}; do
  IFS=: read -r row field value <<<"$spec"
  "${lm[@]}" --stage train --rows "$row" --set "$field=$value" --out "$out/lr/$row-$value" >"$out/lr/$row-$value.log" 2>&1 &
  pids+=($!)
done
# Other preset fields for a row (issue 30's levers): its own folder, beside the rows.
set_args() {  # "a=1+b=2" -> --set a=1 --set b=2 (read, not word splitting: no glob expansion)
  local -a parts=()
  IFS=+ read -ra parts <<<"$1"
  args=()
  for part in "${parts[@]}"; do args+=(--set "$part"); done
}
specs=${VARIANTS-}
read -ra variants <<<"${specs//$'\n'/ }"  # one line: the specs may come one per line
for spec in "${variants[@]}"; do
  IFS=: read -r name row sets <<<"$spec"
  set_args "$sets"
  mkdir -p "$out/variants/$name"
  "${lm[@]}" --stage train --rows "$row" "${args[@]}" --out "$out/variants/$name" >"$out/variants/$name.log" 2>&1 &
  pids+=($!)
done
# LoRA needs only the largest ternary model (trained here or already in OUT) and the classifier.
for pid in "${lora_after[@]}"; do wait "$pid" || true; done
while [ ! -f "$classifier" ]; do sleep 10; done
lora_pids=()
specs=${LORA_RUNS-}
read -ra lora_runs <<<"${specs//$'\n'/ }"
for spec in "${lora_runs[@]}"; do  # each beside the others, on OUT's ternary models
  IFS=: read -r name sets <<<"$spec"
  set_args "$sets"
  mkdir -p "$out/lora/$name"
  for packed in "$out"/w1.58a8-*.packed; do
    [ ! -e "$packed" ] || ln -sf "$(cd "$(dirname "$packed")" && pwd)/$(basename "$packed")" "$out/lora/$name/"
  done
  "${lm[@]}" --stage lora "${args[@]}" --out "$out/lora/$name" --classifier "$classifier" --model "$MODEL" \
    >"$out/lora/$name.log" 2>&1 &
  lora_pids+=($!)
done
[ "${SKIP_LORA:-0}" = 1 ] || "${lm[@]}" --stage lora --out "$out" --classifier "$classifier" --model "$MODEL" >"$out/lora.log" 2>&1
lora_failed=0
for pid in "${lora_pids[@]}"; do wait "$pid" || lora_failed=$((lora_failed + 1)); done
echo "lora done ($lora_failed of ${#lora_pids[@]} extra LoRA runs failed)"
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
echo "train: $failed of ${#pids[@]} runs failed"
# Timed alone where possible: results/device_session.sh runs it after both sweeps have finished.
[ "${SKIP_ATTENTION:-0}" = 1 ] || "${lm[@]}" --stage attention --out "$out" >"$out/attention.log" 2>&1
echo "lm all done"
