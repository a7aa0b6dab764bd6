#!/usr/bin/env bash
# The teacher comparison of docs/results/2026-11-25-teachers: the same mined WordNet train queries
# (bm25 mining, qrels judge) through each teacher and hint mode. Resumable: rerun to finish.
# Needs the opt-in Qwen weights: LREM_QWEN=1 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LREM="${LREM_VENV:-.venv}/bin/lrem"
DATA="${LREM_DATA:-runs/data/wordnet}"
OUT="${LREM_TEACHERS_DIR:-runs/teachers}"
LIMIT="${LREM_TEACHERS_LIMIT:-420}"   # 420 sampled train queries -> ~300 mined by bm25
[ -f "$DATA/catalog.jsonl" ] || "$LREM" data wordnet --out "$DATA"
run() {  # NAME TEACHER HINT
  "$LREM" construct --data "$DATA" --out "$OUT/$1" --teacher "$2" --hint "$3" --limit "$LIMIT" \
    --batch-size 32 --config configs/construct.yaml ${LREM_TEACHER_FLAGS:-}
}
run labels labels none
run smollm2-gold hf:smollm2-135m-instruct gold
run qwen05-none hf:qwen2.5-coder-0.5b-instruct none
run qwen05-gold hf:qwen2.5-coder-0.5b-instruct gold
run qwen15-none hf:qwen2.5-coder-1.5b-instruct none
run qwen15-gold hf:qwen2.5-coder-1.5b-instruct gold
