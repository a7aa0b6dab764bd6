#!/usr/bin/env bash
# The cold start as LoRA (configs/wordnet-coldstart-lora.yaml: r32, lr 2e-4, 300 steps, float32) on the
# committed label-CoT triplets, then an index and a dev report beside the shipped models (WordNet dev,
# the 400 seeded queries of "Training results"). Each step is skipped when its output exists; the
# training resumes from its checkpoints. ~75 min of training and ~20 of indexing on one core.
# Then stage 2 from it (configs/wordnet-rl-lora.yaml: RL as LoRA r32, 60 steps, ~75 min on one core), its
# index, and a second dev report: the RL model beside the cold start and the shipped models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/${LREM_VENV:-.venv}/bin:$PATH"
OUT="${LREM_EXP_DIR:-runs/cold-lora-exp}"
DATA="$OUT/wordnet"
TRIPLETS=data/triplets/wordnet-labels/triplets.jsonl.gz
resume() { [ -d "$1/checkpoints" ] && echo --resume || true; }

[ -f "$DATA/qrels.jsonl" ] || lrem data wordnet --out "$DATA"
[ -f "$OUT/cold/lrem_config.json" ] || lrem train coldstart --config configs/wordnet-coldstart-lora.yaml \
  --triplets "$TRIPLETS" --data "$DATA" --out "$OUT/cold" $(resume "$OUT/cold")
for m in cold lrem direct; do
  model="$OUT/cold"; [ "$m" = lrem ] && model=lrem-wordnet-135m; [ "$m" = direct ] && model=lrem-wordnet-135m-direct
  [ -f "$OUT/index-$m/index.faiss" ] || lrem index --data "$DATA" --model "$model" --out "$OUT/index-$m"
done
[ -f "$OUT/eval-dev/metrics.json" ] || lrem eval --data "$DATA" --split dev --limit 400 \
  -s "cold-lora-reason=$OUT/index-cold:reason" -s "cold-lora-direct=$OUT/index-cold:direct" \
  -s "lrem-wordnet-135m-reason=$OUT/index-lrem:reason" -s "lrem-wordnet-135m-direct=$OUT/index-lrem:direct" \
  -s "direct-lora=$OUT/index-direct:direct" --out "$OUT/eval-dev" --examples 5 --overwrite
[ -f "$OUT/rl/lrem_config.json" ] || lrem train rl --config configs/wordnet-rl-lora.yaml --init "$OUT/cold" \
  --data "$DATA" --out "$OUT/rl" $(resume "$OUT/rl")
[ -f "$OUT/index-rl/index.faiss" ] || lrem index --data "$DATA" --model "$OUT/rl" --out "$OUT/index-rl"
[ -f "$OUT/eval-dev-rl/metrics.json" ] || lrem eval --data "$DATA" --split dev --limit 400 \
  -s "rl-lora-reason=$OUT/index-rl:reason" -s "rl-lora-direct=$OUT/index-rl:direct" \
  -s "cold-lora-direct=$OUT/index-cold:direct" \
  -s "lrem-wordnet-135m-reason=$OUT/index-lrem:reason" -s "lrem-wordnet-135m-direct=$OUT/index-lrem:direct" \
  -s "direct-lora=$OUT/index-direct:direct" --out "$OUT/eval-dev-rl" --examples 5 --overwrite
