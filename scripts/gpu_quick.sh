#!/usr/bin/env bash
# A short device run: build for this GPU, per-kernel profile (scripts/gpu_profile.py), and the test
# files that hold CUDA tests, in parallel. Logs under $OUT (default /tmp/bn_ext_gpu_quick).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bn_ext_gpu_quick}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
t0=$SECONDS
FORCE_CUDA=1 $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build $((SECONDS - t0)) s"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -n "${SKIP_PROFILE:-}" ] || {
t0=$SECONDS
timeout 150 $PY scripts/gpu_profile.py ${PROFILE_CASES:-} 2>&1 | tee "$OUT/profile.txt"
echo "profile $((SECONDS - t0)) s"
}
[ -n "${SKIP_TESTS:-}" ] && exit 0
t0=$SECONDS
timeout 240 $PY -m pytest -q --maxfail=20 -n 8 -p no:cacheprovider tests/test_cuda.py tests/test_modules.py \
  tests/test_errors.py tests/test_autograd.py tests/test_parity.py >"$OUT/tests.log" 2>&1
echo "tests rc=$? $((SECONDS - t0)) s"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -15
