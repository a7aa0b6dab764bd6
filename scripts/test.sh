#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. Extra arguments go to pytest.
# One pytest worker per core (pytest-xdist), each taking a whole test file at a time, so a file's
# fixtures are built once; tests/conftest.py gives each worker its share of the cores' threads.
# LREM_TEST_WORKERS=N sets the count (1: everything in one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py="${LREM_VENV:-.venv}/bin/python"
workers="${LREM_TEST_WORKERS:-$(OMP_NUM_THREADS='' OMP_THREAD_LIMIT='' nproc)}"  # nproc obeys OMP_NUM_THREADS
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || { echo "LREM_TEST_WORKERS=$workers: need a whole number >= 1" >&2; exit 2; }
par=()
if [ "$workers" -gt 1 ]; then
  par=(-n "$workers" --dist loadfile)
  # the built-in models' caches ($LREM_HOME: the GGUF converted once, the shipped deltas applied),
  # made before the workers start rather than by each of them at once
  HF_HUB_OFFLINE=1 "$py" -c "from lrem import backbones, delta, model
backbones.builtin_path('smollm2-135m-instruct')
for name in delta.shipped():
    model.materialise(name)"
fi
exec "$py" -m pytest ${par[@]+"${par[@]}"} "${@:--q}"
