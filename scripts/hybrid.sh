#!/usr/bin/env bash
# Hybrid search (README "Hybrid search"): BM25 fused with the shipped models' dense rankings by
# reciprocal rank fusion, against each alone. WordNet dev (the 400 seeded queries of "Training
# results") with BM25's weight swept, then the test split once, at the weight dev chose; and
# the 200 real ESCI rows of ../shared where they are there. Indexes of both shipped models over
# the full catalog (~15 minutes each on one core); finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/${LREM_VENV:-.venv}/bin:$PATH"
OUT="${LREM_EXP_DIR:-runs/hybrid}"
LIMIT="${LREM_EXP_LIMIT:-400}"
WEIGHT="${LREM_HYBRID_WEIGHT:-0.25}"  # BM25's weight on test and ESCI besides 1: the best of dev's sweep
DATA="$OUT/wordnet"
D="$OUT/index-direct"   # lrem-wordnet-135m-direct
R="$OUT/index-lrem"     # lrem-wordnet-135m (reasoning)

[ -f "$DATA/qrels.jsonl" ] || lrem data wordnet --out "$DATA"
[ -f "$D/index.faiss" ] || lrem index --model lrem-wordnet-135m-direct --data "$DATA" --out "$D"
[ -f "$R/index.faiss" ] || lrem index --model lrem-wordnet-135m --data "$DATA" --out "$R"

systems() {  # $1: BM25's weight in the fused systems
  echo --system bm25 --system minilm --system "direct-trained=$D:direct" --system "reason=$R:reason" \
    --system "auto=$R:auto" --system "hybrid-direct=$1*bm25+$D:direct" --system "hybrid-reason=$1*bm25+$R:reason" \
    --system "hybrid-auto=$1*bm25+$R:auto" --system "minilm+direct=minilm+$D:direct"
}
[ -f "$OUT/eval-dev/metrics.json" ] || lrem eval --data "$DATA" --split dev --limit "$LIMIT" $(systems 1) \
  --system "hybrid-direct-w0.25=0.25*bm25+$D:direct" --system "hybrid-direct-w0.5=0.5*bm25+$D:direct" \
  --system "hybrid-direct-w2=2*bm25+$D:direct" --out "$OUT/eval-dev" --examples 5 --overwrite
[ -f "$OUT/eval-test/metrics.json" ] || lrem eval --data "$DATA" --split test --limit "$LIMIT" $(systems 1) \
  --system "hybrid-direct-w$WEIGHT=$WEIGHT*bm25+$D:direct" --out "$OUT/eval-test" --examples 5 --overwrite

ESCI=../shared/data/esci_sample200/esci.csv
if [ -f "$ESCI" ]; then
  [ -f "$OUT/esci/qrels.jsonl" ] || lrem data convert "$ESCI" --format esci --out "$OUT/esci"
  for m in direct lrem; do
    model=lrem-wordnet-135m; [ "$m" = direct ] && model=lrem-wordnet-135m-direct
    [ -f "$OUT/esci-index-$m/index.faiss" ] || lrem index --model "$model" --data "$OUT/esci" --out "$OUT/esci-index-$m"
  done
  [ -f "$OUT/eval-esci/metrics.json" ] || lrem eval --data "$OUT/esci" --split all --system bm25 --system minilm \
    --system "direct-trained=$OUT/esci-index-direct:direct" --system "auto=$OUT/esci-index-lrem:auto" \
    --system "hybrid-direct=bm25+$OUT/esci-index-direct:direct" --system "hybrid-auto=bm25+$OUT/esci-index-lrem:auto" \
    --system "hybrid-direct-w$WEIGHT=$WEIGHT*bm25+$OUT/esci-index-direct:direct" --system "minilm+bm25=minilm+bm25" \
    --out "$OUT/eval-esci" --examples 5 --overwrite
fi
