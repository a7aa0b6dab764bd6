#!/usr/bin/env bash
# The training experiment of the README ("Training results"): triplets -> direct baseline and cold
# start (same pairs and batches) -> RL -> indexes -> one dev report. Each step is skipped when its
# output exists and resumes from its checkpoints when interrupted, so rerun it until it is done.
# On the 2-core CPU it takes hours; the step counts are environment variables.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/${LREM_VENV:-.venv}/bin:$PATH"
OUT="${LREM_EXP_DIR:-runs/exp}"
QUERIES="${LREM_EXP_QUERIES:-800}"   # train queries sampled for triplet construction
STEPS="${LREM_EXP_STEPS:-160}"       # stage-1 steps (direct and cold start alike), batch 16
RL_STEPS="${LREM_EXP_RL_STEPS:-25}"  # stage-2 steps, 8 queries x G=8
LIMIT="${LREM_EXP_LIMIT:-400}"       # dev queries evaluated
DATA="$OUT/wordnet"

[ -f "$DATA/qrels.jsonl" ] || lrem data wordnet --out "$DATA"
lrem construct --data "$DATA" --out "$OUT/triplets" --hint gold --limit "$QUERIES"
S1=(--triplets "$OUT/triplets/triplets.jsonl" --data "$DATA" --max-steps "$STEPS" --cot-share 0.25 --save-steps 40)
resume() { [ -d "$1/checkpoints" ] && echo --resume || true; }
[ -f "$OUT/direct/lrem_config.json" ] || lrem train direct --out "$OUT/direct" \
  --pairs "$OUT/triplets/triplets.jsonl" "${S1[@]:2}" $(resume "$OUT/direct")
[ -f "$OUT/cold/lrem_config.json" ] || lrem train coldstart --out "$OUT/cold" "${S1[@]}" $(resume "$OUT/cold")
[ -f "$OUT/rl/lrem_config.json" ] || lrem train rl --init "$OUT/cold" --out "$OUT/rl" --config configs/rl.yaml \
  --max-steps "$RL_STEPS" --batch-size 8 --learning-rate 1e-5 --save-steps 5 $(resume "$OUT/rl")
for m in base direct cold rl; do
  model="$OUT/$m"; [ "$m" = base ] && model=smollm2-135m-instruct
  [ -f "$OUT/index-$m/index.faiss" ] || lrem index --data "$DATA" --model "$model" --out "$OUT/index-$m"
done
I="$OUT/index"
# stage 1 report (issue 5), stage 2 report with the ablations and the RL curves (issue 6)
lrem eval --data "$DATA" --split dev --limit "$LIMIT" --system bm25 --system minilm \
  --system "base-direct=$I-base:direct" --system "base-reason=$I-base:reason" \
  --system "direct-trained=$I-direct:direct" \
  --system "cold-reason=$I-cold:reason" --system "cold-empty-cot=$I-cold:empty-cot" \
  --out "$OUT/eval-stage1" --examples 10 --overwrite
lrem eval --data "$DATA" --split dev --limit "$LIMIT" --system bm25 --system minilm \
  --system "direct-trained=$I-direct:direct" \
  --system "cold-reason=$I-cold:reason" --system "cold-empty-cot=$I-cold:empty-cot" \
  --system "rl-reason=$I-rl:reason" --system "rl-empty-cot=$I-rl:empty-cot" \
  --system "rl-query-cot=$I-rl:query-cot" --system "rl-random-cot=$I-rl:random-cot" \
  --figure "$OUT/rl/curves.png" --out "$OUT/eval-stage2" --examples 10 --overwrite
# held-out real shop queries by other authors (skipped where ../shared/data is absent)
ESCI=../shared/data/esci_sample200/esci.csv
if [ -f "$ESCI" ]; then
  [ -f "$OUT/esci/qrels.jsonl" ] || lrem data convert "$ESCI" --format esci --out "$OUT/esci"
  lrem eval --data "$OUT/esci" --split all --system bm25 --system minilm \
    --system "base-direct=smollm2-135m-instruct:direct" --system "direct-trained=$OUT/direct:direct" \
    --system "cold-reason=$OUT/cold:reason" --system "cold-empty-cot=$OUT/cold:empty-cot" \
    --system "rl-reason=$OUT/rl:reason" --system "rl-empty-cot=$OUT/rl:empty-cot" --out "$OUT/eval-esci" --examples 5 --overwrite
fi
