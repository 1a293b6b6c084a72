#!/usr/bin/env bash
# Issue 19 and 16's GPU tables in one device call of about six minutes: the quantized kernel (accuracy and speed),
# the compiled Wan2.1-1.3B forward (eager vs compile_repeated_blocks), and the whole-generation estimate. Each script
# has its own time limit and budget; one that fails or runs out of time does not stop the others, and every script
# writes its tables after each row, so what it measured is kept. Results and logs land in $OUT.
#   bash benchmarks/gpu_benchmarks.sh            # BUDGET_SCALE=2 doubles every limit; SMOKE=1: tiny shapes (CPU check)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "${SITE:-/tmp/site}" .whl/*.whl \
  && export PYTHONPATH=${SITE:-/tmp/site}:$PWD:$PWD/benchmarks || { echo "wheel install failed"; exit 1; }
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
SCALE=${BUDGET_SCALE:-1}
SMOKE_FLAG=${SMOKE:+--smoke}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2 || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

run() {  # name, seconds of budget, arguments: the hard limit is the budget plus 15 s
  local name=$1 budget=$(( $2 * SCALE )); shift 2
  local start=$SECONDS
  timeout -k 5 $(( budget + 15 )) python3 "benchmarks/$name.py" --output "$OUT" --budget "$budget" $SMOKE_FLAG "$@" \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $(( SECONDS - start )) s (124/137: stopped at its limit; tables keep the rows done)"
  grep -v '^\[transformers\]' "$OUT/$name.log" | tail -n 45
}

run quantized_kernel 90 --quick --configs
run compiled_forward 100
run generation 110 --quick
ls -la "$OUT"
