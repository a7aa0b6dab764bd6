#!/usr/bin/env bash
# End-to-end demo on the built-in defaults: set up, build the WordNet product benchmark, index
# its catalog with the base model, and compare BM25, MiniLM and the base model (direct, with
# reasoning, and routed: reasoning on the 30% most ambiguous queries) on a fixed sample of the
# dev split. Steps already done are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/${LREM_VENV:-.venv}/bin:$PATH"
OUT="${LREM_DEMO_DIR:-runs/demo}"
LIMIT="${LREM_DEMO_LIMIT:-200}"

[ -f "$OUT/wordnet/qrels.jsonl" ] || lrem data wordnet --out "$OUT/wordnet"
[ -f "$OUT/index/index.faiss" ] || lrem index --data "$OUT/wordnet" --out "$OUT/index"
lrem eval --data "$OUT/wordnet" --split dev --limit "$LIMIT" \
  --system bm25 --system minilm \
  --system "base-direct=$OUT/index:direct" --system "base-reason=$OUT/index:reason" \
  --system "base-auto=$OUT/index:auto@0.3" \
  --out "$OUT/eval" --examples 3 --overwrite
