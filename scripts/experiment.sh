#!/usr/bin/env bash
# The training experiment of the README ("Training results", issue 15): the committed label-CoT
# triplets -> direct baseline and cold start (same pairs and batches, 600 steps) -> RL from the cold
# start (mined hard negatives) -> indexes -> one dev report (+ ESCI) -> the shipped deltas. Each step
# is skipped when its output exists and resumes from its checkpoints when interrupted, so rerun it
# until it is done: hours on the 2-core CPU (run the two stage-1 trainings side by side with
# OMP_NUM_THREADS=1 to use both cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/${LREM_VENV:-.venv}/bin:$PATH"
OUT="${LREM_EXP_DIR:-runs/exp}"
TRIPLETS="${LREM_EXP_TRIPLETS:-data/triplets/wordnet-labels/triplets.jsonl.gz}"
LIMIT="${LREM_EXP_LIMIT:-400}"       # dev queries evaluated (the README's seeded sample)
DATA="$OUT/wordnet"

[ -f "$DATA/qrels.jsonl" ] || lrem data wordnet --out "$DATA"
resume() { [ -d "$1/checkpoints" ] && echo --resume || true; }
[ -f "$OUT/direct/lrem_config.json" ] || lrem train direct --config configs/wordnet-direct.yaml --pairs "$TRIPLETS" \
  --data "$DATA" --out "$OUT/direct" $(resume "$OUT/direct")
[ -f "$OUT/cold/lrem_config.json" ] || lrem train coldstart --config configs/wordnet-coldstart.yaml --triplets "$TRIPLETS" \
  --data "$DATA" --out "$OUT/cold" $(resume "$OUT/cold")
[ -f "$OUT/rl/lrem_config.json" ] || lrem train rl --config configs/wordnet-rl.yaml --init "$OUT/cold" --data "$DATA" \
  --out "$OUT/rl" $(resume "$OUT/rl")
for m in base direct cold rl; do
  model="$OUT/$m"; [ "$m" = base ] && model=smollm2-135m-instruct
  [ -f "$OUT/index-$m/index.faiss" ] || lrem index --data "$DATA" --model "$model" --out "$OUT/index-$m"
done
I="$OUT/index"
lrem eval --data "$DATA" --split dev --limit "$LIMIT" --system bm25 --system minilm \
  --system "base=$I-base:direct" --system "direct-trained=$I-direct:direct" \
  --system "cold-reason=$I-cold:reason" --system "cold-direct=$I-cold:direct" \
  --system "rl-reason=$I-rl:reason" --system "rl-auto=$I-rl:auto" --system "rl-empty-cot=$I-rl:empty-cot" \
  --system "rl-query-cot=$I-rl:query-cot" --system "rl-random-cot=$I-rl:random-cot" \
  --figure "$OUT/rl/curves.png" --out "$OUT/eval-dev" --examples 10 --overwrite
# held-out real shop queries by other authors (skipped where ../shared/data is absent)
ESCI=../shared/data/esci_sample200/esci.csv
if [ -f "$ESCI" ]; then
  [ -f "$OUT/esci/qrels.jsonl" ] || lrem data convert "$ESCI" --format esci --out "$OUT/esci"
  lrem eval --data "$OUT/esci" --split all --system bm25 --system minilm --system "direct-trained=$OUT/direct:direct" \
    --system "cold-reason=$OUT/cold:reason" --system "rl-reason=$OUT/rl:reason" --system "rl-auto=$OUT/rl:auto" \
    --out "$OUT/eval-esci" --examples 5 --overwrite
fi
