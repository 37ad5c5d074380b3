#!/usr/bin/env bash
# GPU check for a fresh machine with torch, nvcc, ninja and pytest installed and no network:
# builds bn_ext for this GPU against the installed torch, runs the test suite (CUDA included),
# runs compute-sanitizer memcheck and racecheck over every op, and times bn_ext against
# PyTorch/cuDNN. Full logs go to $OUT (default /tmp/bn_ext_gpu_check); a summary table is last.
#
#   bash scripts/gpu_check.sh            # everything, about 5-8 minutes on an H100
#   BENCH_ARGS="--quick" bash scripts/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bn_ext_gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)"
  export TORCH_CUDA_ARCH_LIST
fi
declare -A RESULT

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, record pass/fail
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  RESULT[$name]="rc=$rc $((SECONDS - t0))s"
  tail -n 5 "$OUT/$name.log"
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$OUT/gpu.txt" 2>&1
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())' >>"$OUT/gpu.txt" 2>&1

step build 400 env FORCE_CUDA=1 $PY setup.py build_ext --inplace || { cat "$OUT/build.log" | tail -40; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# one process per test file, so that a crash in one cannot hide the others' results
run_tests() {
  local rc=0 f
  for f in tests/test_*.py; do
    echo "---- $f"
    "$PY" -m pytest -q --tb=short -p no:cacheprovider -p no:logging "$f" || rc=1
  done
  return $rc
}
export -f run_tests
export PY
step tests 420 bash -c run_tests
step memcheck 300 compute-sanitizer --tool memcheck --error-exitcode 3 $PY scripts/sanitize_ops.py
step racecheck 300 compute-sanitizer --tool racecheck --error-exitcode 3 $PY scripts/sanitize_ops.py
step bench 400 $PY -m bn_ext.bench --device cuda --out "$OUT" --tag cuda ${BENCH_ARGS:-}

echo
echo "================ bn_ext GPU check summary ================"
cat "$OUT/gpu.txt"
printf '%-10s %s\n' step result
for s in build tests memcheck racecheck bench; do printf '%-10s %s\n' "$s" "${RESULT[$s]:-not run}"; done
grep -E "^---- |passed|failed|Fatal|Segmentation" "$OUT/tests.log" | grep -vE "^(FAILED|ERROR) " | paste - - | column -t 2>/dev/null || grep -E "passed|failed" "$OUT/tests.log"
grep -E "^FAILED|^ERROR" "$OUT/tests.log" | head -20
grep -hE "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/memcheck.log" "$OUT/racecheck.log" 2>/dev/null
grep -A 40 "^bn_ext vs PyTorch" "$OUT/bench.log" | grep -E "geomean|^case|MISMATCH" | head -30
