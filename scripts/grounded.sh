#!/usr/bin/env bash
# The grounded-reasoning experiment (issue 22, README "Grounded queries"): on the committed pairs of
# data/triplets/wordnet-labels-grounded (train queries the first-stage model never saw, each with
# that model's top-20 titles), LoRA direct and cold start, each trained grounded (half the queries
# see their titles) and plain (none do), on the same pairs and batches, 400 steps -> indexes -> one
# dev report. Steps are skipped when done and resume from checkpoints, so rerun it until it is
# done: hours on the 2-core CPU (two trainings side by side with OMP_NUM_THREADS=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/${LREM_VENV:-.venv}/bin:$PATH"
OUT="${LREM_EXP_DIR:-runs/grounded}"
PAIRS=data/triplets/wordnet-labels-grounded/pairs.jsonl.gz
LIMIT="${LREM_EXP_LIMIT:-400}"
DATA="$OUT/wordnet"

[ -f "$DATA/qrels.jsonl" ] || lrem data wordnet --out "$DATA"
resume() { [ -d "$1/checkpoints" ] && echo --resume || true; }
for run in plain-direct grounded-direct plain-cold grounded-cold; do
  how=direct; flag=--pairs; [ "${run#*-}" = cold ] && { how=coldstart; flag=--triplets; }
  [ -f "$OUT/$run/lrem_config.json" ] || lrem train "$how" --config "configs/wordnet-$run.yaml" $flag "$PAIRS" \
    --out "$OUT/$run" $(resume "$OUT/$run")
  [ -f "$OUT/index-$run/index.faiss" ] || lrem index --data "$DATA" --model "$OUT/$run" --out "$OUT/index-$run"
done
I="$OUT/index"
lrem eval --data "$DATA" --split dev --limit "$LIMIT" \
  --system "direct=$I-plain-direct:direct" --system "direct+titles=$I-plain-direct:grounded-direct" \
  --system "g-direct:own-direct=$I-grounded-direct:direct" --system "grounded-direct=$I-grounded-direct:grounded-direct" \
  --system "reason=$I-plain-cold:reason" --system "cold:direct=$I-plain-cold:direct" \
  --system "grounded=$I-grounded-cold:grounded" --system "g-cold:grounded-direct=$I-grounded-cold:grounded-direct" \
  --out "$OUT/eval-dev" --examples 10 --overwrite
