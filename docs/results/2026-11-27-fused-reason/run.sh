set -e
cd "$(dirname "$0")/../../.."
export PATH=$PWD/.venv/bin:$PATH LREM_HOME=$HOME/.cache/lrem OMP_NUM_THREADS=1
OUT=${OUT:-runs/fused-reason}
[ -f $OUT/wordnet/qrels.jsonl ] || lrem data wordnet --out $OUT/wordnet
[ -f $OUT/idx/index.faiss ] || lrem index --model lrem-wordnet-135m --data $OUT/wordnet --out $OUT/idx
lrem eval --data $OUT/wordnet --split dev --limit 400 -s direct=$OUT/idx:direct -s reason=$OUT/idx:reason \
  -s "fused=$OUT/idx:direct+$OUT/idx:reason" -s "fused-querycot=$OUT/idx:direct+$OUT/idx:query-cot" --out $OUT/eval --overwrite
