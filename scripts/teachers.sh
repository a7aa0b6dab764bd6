#!/usr/bin/env bash
# The teacher comparison (docs/results/2026-11-25-teachers): the same mined WordNet train queries
# (bm25 mining, qrels judge) through each teacher, hint and mode. Resumable: rerun to finish.
# Needs the opt-in Qwen weights: LREM_QWEN=1 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LREM="${LREM_VENV:-.venv}/bin/lrem"
DATA="${LREM_DATA:-runs/data/wordnet}"
OUT="${LREM_TEACHERS_DIR:-runs/teachers}"
LIMIT="${LREM_TEACHERS_LIMIT:-380}"   # 380 sampled train queries -> 301 mined by bm25 (a subset of a larger limit)
[ -f "$DATA/catalog.jsonl" ] || "$LREM" data wordnet --out "$DATA"
run() {  # NAME TEACHER HINT MODE [CANDIDATES]
  "$LREM" construct --data "$DATA" --out "$OUT/$1" --teacher "$2" --hint "$3" --teacher-mode "$4" \
    --candidates "${5:-0}" --limit "$LIMIT" --batch-size 32 --config configs/construct.yaml
}
run labels labels none list
run smollm2-gold-list hf:smollm2-135m-instruct gold list
run qwen05-none-list hf:qwen2.5-coder-0.5b-instruct none list
run qwen05-gold-list hf:qwen2.5-coder-0.5b-instruct gold list
run qwen05-cand-list hf:qwen2.5-coder-0.5b-instruct none list 20   # grounded: bm25's top 20 titles
run qwen15-cand-list hf:qwen2.5-coder-1.5b-instruct none list 20
run qwen15-gold-list hf:qwen2.5-coder-1.5b-instruct gold list
run qwen15-none-list hf:qwen2.5-coder-1.5b-instruct none list
run smollm2-gold hf:smollm2-135m-instruct gold two-step     # the last experiment's teacher, the paper's two steps
run qwen05-gold hf:qwen2.5-coder-0.5b-instruct gold two-step
run qwen05-none hf:qwen2.5-coder-0.5b-instruct none two-step
