#!/usr/bin/env bash
# Ship the LoRA cold start + RL model of scripts/cold_lora.sh as the built-in `lrem-wordnet-135m`:
# its rank-32 delta (two LoRA stages; the probe cosines say how exact) and the router of `auto`
# mode, fitted on the 446 train queries held back from stage 1 for RL (RL trained on them: a sample
# biased towards reasoning, but none the evaluation uses). Run scripts/cold_lora.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/${LREM_VENV:-.venv}/bin:$PATH"
OUT="${LREM_EXP_DIR:-runs/cold-lora-exp}"
SHIP=src/lrem/models/lrem-wordnet-135m
HELD="$OUT/wordnet-heldout"

if [ ! -f "$HELD/qrels.jsonl" ]; then
  # the catalog whole; as queries only those RL trained on, all in split "train"
  python - "$OUT/wordnet" "$OUT/cold/rl_pairs.jsonl" "$HELD" <<'EOF'
import json, os, shutil, sys
from pathlib import Path
data, pairs, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
keep = {json.loads(line)["query_id"] for line in pairs.open(encoding="utf-8")}
tmp = out.with_name(out.name + ".tmp")
shutil.rmtree(tmp, ignore_errors=True)
tmp.mkdir(parents=True)
shutil.copyfile(data / "catalog.jsonl", tmp / "catalog.jsonl")
for name in ("queries.jsonl", "qrels.jsonl"):
    with (data / name).open(encoding="utf-8") as src, (tmp / name).open("w", encoding="utf-8") as dst:
        for line in src:
            row = json.loads(line)
            if row["query_id"] in keep:
                if name == "queries.jsonl":
                    row["split"] = "train"
                dst.write(json.dumps(row) + "\n")
os.replace(tmp, out)
print(f"{out}: {len(keep)} held-out train queries")
EOF
fi
# a new delta replaces the folder (its router too), so the router is refitted after it
grep -q "\"source\": \"$OUT/rl\"" "$SHIP/delta.json" || lrem delta --model "$OUT/rl" --out "$SHIP" --rank 32 --overwrite
[ -f "$SHIP/router.json" ] || lrem router fit --index "$OUT/index-rl" --data "$HELD" --split train --queries 446 \
  --out "$SHIP/router.json"
# the shipped delta's own index and dev report (the 400 seeded queries of "Training results"), then its card
[ -f "$OUT/index-shipped/index.faiss" ] || lrem index --model lrem-wordnet-135m --data "$OUT/wordnet" --out "$OUT/index-shipped"
I="$OUT/index-shipped"
[ -f "$OUT/eval-shipped/metrics.json" ] || lrem eval --data "$OUT/wordnet" --split dev --limit 400 --system bm25 --system minilm \
  --system "lrem-direct=$I:direct" --system "lrem-reason=$I:reason" --system "lrem-auto=$I:auto" \
  --system "lrem-auto-margin@0.3=$I:auto-margin@0.3" --system "lrem-query-cot=$I:query-cot" \
  --system "lrem-random-cot=$I:random-cot" --system "direct-trained=$OUT/index-direct:direct" \
  --out "$OUT/eval-shipped" --examples 5 --overwrite
python scripts/ship_card.py --delta "$SHIP" --eval "$OUT/eval-shipped/metrics.json" \
  --systems lrem-direct lrem-reason lrem-auto lrem-auto-margin@0.3 lrem-query-cot lrem-random-cot direct-trained \
  --about "$(cat docs/results/2026-11-27-cold-lora/shipped-about.md)" \
  --limits "$(cat docs/results/2026-11-27-cold-lora/shipped-limits.md)"
# real shop queries by other authors (skipped where ../shared/data is absent): ESCI's 200 rows
ESCI=../shared/data/esci_sample200/esci.csv
if [ -f "$ESCI" ]; then
  [ -f "$OUT/esci/qrels.jsonl" ] || lrem data convert "$ESCI" --format esci --out "$OUT/esci"
  for m in lrem-wordnet-135m lrem-wordnet-135m-direct; do
    [ -f "$OUT/esci-index-$m/index.faiss" ] || lrem index --model "$m" --data "$OUT/esci" --out "$OUT/esci-index-$m"
  done
  E="$OUT/esci-index-lrem-wordnet-135m"
  [ -f "$OUT/eval-esci-shipped/metrics.json" ] || lrem eval --data "$OUT/esci" --split all --system bm25 --system minilm \
    --system "direct-trained=$OUT/esci-index-lrem-wordnet-135m-direct:direct" --system "lrem-direct=$E:direct" \
    --system "lrem-reason=$E:reason" --system "lrem-auto=$E:auto" --system "hybrid-auto=bm25+$E:auto" \
    --out "$OUT/eval-esci-shipped" --examples 5 --overwrite
fi
