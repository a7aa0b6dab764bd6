#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. Extra arguments go to pytest.
# One pytest worker per core (pytest-xdist), each taking a whole test file at a time, so a file's
# fixtures are built once; tests/conftest.py gives each worker its share of the cores' threads.
# LREM_TEST_WORKERS=1 runs everything in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workers="${LREM_TEST_WORKERS:-$(nproc)}"
par=()
[ "$workers" -gt 1 ] && par=(-n "$workers" --dist loadfile)
exec "${LREM_VENV:-.venv}/bin/python" -m pytest "${par[@]}" "${@:--q}"
