#!/usr/bin/env bash
# Issue 20's GPU part in one device call (a drawn task has 15 minutes of device time in all):
# the CUDA graphs checked against eager steps, query latency with Qwen2.5-3B's shape, stage-1 and RL steps with Qwen2.5-0.5B's and 3B's, and
# the real trainers for a few steps on 0.5B's; all random weights built from a config (the GPU
# machine has no registries, and 64 MiB travels).
#
#   here, once:  bash benchmarks/gpu.sh --prepare     (.gpu/: a tokenizer, and the wheels the GPU
#                                                       image lacks: trl for the RL loss, its needs)
#   there:       device run, carry [".gpu"], timeout_s 480, command: bash benchmarks/gpu.sh
#   rehearsal:   bash benchmarks/gpu.sh --rehearse    (the same steps on this CPU, tiny shapes,
#                                                       seconds; tests/test_gpu_script.py runs it)
#   latency:     bash benchmarks/gpu.sh --latency     (there: the graph check and query latency,
#                                                       then batch 1 with the decode step compiled)
#
# Each step has its own time limit, and a failed step does not stop the next. Results:
# $OUT/gpu-*.json and $OUT/gpu.log ($OUT: the device tool's, else benchmarks/results). Where the
# CUDA-graph decoder fails, query latency runs again without graphs (LREM_CUDA_GRAPHS=0); a
# training setting that fails (LoRA, memory) leaves a row with its error, and the others run.
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"

if [ "$mode" = --prepare ]; then
  set -e
  PY="${PYTHON:-.venv/bin/python}"
  home="${LREM_HOME:-$HOME/.cache/lrem}"
  # Qwen2.5's own tokenizer where the teacher wheels were installed (LREM_QWEN=1 scripts/setup.sh):
  # prompts then have the paper's backbone's token counts; else SmolLM2's
  tok="$home/models/qwen2.5-coder-0.5b-instruct"
  [ -f "$tok/tokenizer.json" ] || tok="$("$PY" -c 'import sys; sys.path[:0] = ["benchmarks"]
from _common import tokenizer_dir; print(tokenizer_dir())')"
  rm -rf .gpu && mkdir -p .gpu/tokenizer .gpu/whl
  cp "$tok"/tokenizer_config.json .gpu/tokenizer/
  [ -f "$tok/chat_template.jinja" ] && cp "$tok/chat_template.jinja" .gpu/tokenizer/
  gzip -9 -c "$tok/tokenizer.json" > .gpu/tokenizer/tokenizer.json.gz  # 11 MB -> ~3 MB of the 64 MiB
  echo "$tok" > .gpu/tokenizer/SOURCE
  pins=$(grep -iE '^(trl|datasets|dill|multiprocess)==' constraints.txt)
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl $pins
  du -sh .gpu; ls .gpu/whl
  echo "now: device run, carry [\".gpu\"], timeout_s 480, command \"bash benchmarks/gpu.sh\""
  exit 0
fi

# results: $OUT where the device tool sets it, else benchmarks/results (a rehearsal: a temp folder)
if [ "$mode" = --rehearse ]; then OUT="${OUT:-$(mktemp -d)}"; else OUT="${OUT:-benchmarks/results}"; fi
OUT="$(realpath -m "$OUT")"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
tee_pid=$!
export PYTHONUNBUFFERED=1  # the log in step with the steps (each benchmark's setup() sets the hub offline)
if [ "$mode" = --rehearse ]; then
  PY="${PYTHON:-.venv/bin/python}"
  dev=cpu; big=tiny; small=tiny; tokdir=""  # SmolLM2's tokenizer
  ql=(--shape-device cpu --gpu-batches 1 4 --n-single 3 --repeat 1 --threads 2)
  tr=(--batch 4 --steps 1 --rl-steps 1 --rl-queries 2 --lora-r 4 --threads 2)
  lp=(--steps 2 --batch 8 --threads 2)
  limit=(240 240 240 240); budget=700  # generous: a rehearsal only checks that each step runs, on a shared CPU
else
  PY="${PYTHON:-python3}"
  dev=cuda; big=qwen2.5-3b; small=qwen2.5-0.5b; tokdir=.gpu/tokenizer
  ql=(--n-single 16 --repeat 2)
  tr=(--batch 16 --steps 3 --rl-steps 2 --rl-queries 8 --lora-r 16)
  lp=(--steps 4 --batch 16)
  # seconds: query latency, train.py 0.5B, trainers.py 0.5B, train.py 3B (most needed first);
  # the whole, from the script's start, under the call's timeout_s (480), whatever fails; the
  # machine's start comes on top, and a drawn task has 900 s of device time in all
  limit=(180 90 90 150); budget="${GPU_BUDGET_S:-440}"
  [ "$mode" = --latency ] && limit[0]=200  # more variants (heads folded or not); no training steps after
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv || true
  [ -f .gpu/tokenizer/tokenizer.json.gz ] || { echo "no .gpu/: run 'bash benchmarks/gpu.sh --prepare' here and carry .gpu"; exit 2; }
  gunzip -kf .gpu/tokenizer/tokenizer.json.gz
  # the carried wheels only where the image's own packages do not give the RL loss (they would
  # shadow a working datasets with one whose needs may be missing)
  if ! "$PY" -c "import trl.trainer.utils" 2>/dev/null && ls .gpu/whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
      && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
[ -n "$tokdir" ] && { ql+=(--tokenizer "$tokdir"); tr+=(--tokenizer "$tokdir"); lp+=(--tokenizer "$tokdir"); }
# versions, and what the steps need, in one interpreter (a rehearsal's only start-up before the
# steps; importing trl takes seconds): trl for the RL loss; the training loop's own needs besides
# (TensorBoard logs, the curves' plot at the end). It prints MISSING:trl / MISSING:loop lines.
rl=(); loop=1
missing=$("$PY" -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available(), file=sys.stderr)
try:
    import trl.trainer.utils
except Exception as e:
    print(repr(e)[:300], file=sys.stderr); print('MISSING:trl')
try:
    import accelerate, tensorboard, matplotlib
except Exception as e:
    print(repr(e)[:300], file=sys.stderr); print('MISSING:loop')") || missing=$'MISSING:trl\nMISSING:loop'  # it crashed
grep -qx MISSING:trl <<< "$missing" && { echo "trl does not import: no RL rows"; rl=(--rl-steps 0); loop=0; }
grep -qx MISSING:loop <<< "$missing" && { echo "no trainers step"; loop=0; }

end=$budget  # bash's SECONDS counts from the script's start, setup included
step() {  # step NAME SECONDS ARGS...: one benchmark under a time limit (and the script's); its rc is printed, not fatal
  local name=$1 secs=$2; shift 2
  local left=$((end - SECONDS - 10)); [ "$secs" -gt "$left" ] && secs=$left  # 10: timeout's --kill-after
  echo; echo "=== $name (limit ${secs}s): $*"
  [ "$secs" -lt 20 ] && { echo "=== $name: skipped, the script's time is spent"; return 124; }
  timeout --kill-after=10 "$secs" "$PY" "$@"; local rc=$?
  echo "=== $name: rc $rc"
  return $rc
}
crashed() { [ "$1" -ne 0 ] && [ "$1" -ne 124 ] && [ "$1" -ne 137 ]; }  # failed, rather than ran out of time

failed=()
# the CUDA graphs against the same steps run eagerly (float32): a wrong replay fails here, not as
# noise in the bfloat16 latency rows; seconds
gc=(); [ "$dev" = cpu ] && gc=(--device cpu)
step graph_check 60 benchmarks/graph_check.py "${gc[@]}" || failed+=(graph_check)
step query_latency "${limit[0]}" benchmarks/query_latency.py --model none --shape "$big" "${ql[@]}" \
  --name "$OUT/gpu-query_latency"; rc=$?
if crashed $rc; then  # the CUDA-graph decoder is the likeliest casualty of a first run on a GPU
  LREM_CUDA_GRAPHS=0 step "query_latency, no CUDA graphs" 90 benchmarks/query_latency.py --model none \
    --shape "$big" "${ql[@]}" --n-single 8 --name "$OUT/gpu-query_latency-nographs"; rc=$?
fi
[ $rc -eq 0 ] || failed+=(query_latency)
if [ "$mode" = --latency ]; then  # torch.compile over the decode step (LREM_COMPILE), batch 1: what fusing buys
  LREM_COMPILE=1 step "query_latency, compiled decode step" 400 benchmarks/query_latency.py --model none \
    --shape "$big" "${ql[@]}" --gpu-batches 1 --n-single 8 --name "$OUT/gpu-query_latency-compiled" \
    || failed+=("query_latency compiled")
  shapes=()
else
  shapes=("$small" "$big")
fi
for k in "${!shapes[@]}"; do
  shape=${shapes[$k]}; i=1; more=()
  # a rehearsal has one shape: the second pass would run the same step again
  [ $k = 1 ] && [ "$big" = "$small" ] && break
  # 3B in float32 holds ~12 GB of weights, 12 of gradients and 25 of AdamW state before
  # activations: 4 RL queries (32 rollouts) a step keep its RL rows inside an H100's 80 GB
  [ $k = 1 ] && { i=3; more=(--rl-queries 4); }
  # a setting that fails (LoRA, memory) gives a row with its error; the rest still run
  step "train $shape" "${limit[$i]}" benchmarks/train.py --shape "$shape" --device "$dev" "${tr[@]}" "${rl[@]}" \
    "${more[@]}" --name "$OUT/gpu-train-$shape" || failed+=("train $shape")
  if [ $k = 0 ] && [ $loop = 1 ]; then  # the real training loop (Accelerate, checkpoints, saving) on the device
    step "trainers $shape" "${limit[2]}" benchmarks/trainers.py --shape "$shape" "${lp[@]}" \
      --name "$OUT/gpu-trainers-$shape" || failed+=("trainers $shape")
  fi
done
echo; ls -la "$OUT"
rc=0; [ ${#failed[@]} -eq 0 ] || { echo "failed: ${failed[*]}"; rc=1; }
exec >&- 2>&-; wait "$tee_pid"  # gpu.log whole before the call collects it
exit $rc
