#!/usr/bin/env bash
# End-to-end demo on the built-in defaults: set up, build the WordNet product benchmark, index
# its catalog with the shipped trained model (lrem-wordnet-135m), its direct-trained twin
# (lrem-wordnet-135m-direct) and the untrained base model, and compare them with BM25 and MiniLM
# on a fixed sample of the dev split: the trained model directly, with reasoning, and routed
# (auto: reasoning only where the router expects it to help). No training step: the trained
# models ship with lrem as small deltas (src/lrem/models/). Steps already done are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/${LREM_VENV:-.venv}/bin:$PATH"
OUT="${LREM_DEMO_DIR:-runs/demo}"
LIMIT="${LREM_DEMO_LIMIT:-200}"

[ -f "$OUT/wordnet/qrels.jsonl" ] || lrem data wordnet --out "$OUT/wordnet"
# one index per model, named after it (an index records its model; a folder never changes model)
for model in lrem-wordnet-135m lrem-wordnet-135m-direct smollm2-135m-instruct; do
  [ -f "$OUT/index-$model/index.faiss" ] || lrem index --model "$model" --data "$OUT/wordnet" --out "$OUT/index-$model"
done
lrem eval --data "$OUT/wordnet" --split dev --limit "$LIMIT" \
  --system bm25 --system minilm \
  --system "base=$OUT/index-smollm2-135m-instruct:direct" \
  --system "direct-trained=$OUT/index-lrem-wordnet-135m-direct:direct" \
  --system "lrem-direct=$OUT/index-lrem-wordnet-135m:direct" \
  --system "lrem-reason=$OUT/index-lrem-wordnet-135m:reason" \
  --system "lrem-auto=$OUT/index-lrem-wordnet-135m:auto" \
  --out "$OUT/eval" --examples 3 --overwrite
