#!/usr/bin/env bash
# Toolchain facts and the argument-error probes (scripts/error_probe.py) on the GPU machine, and a
# native backtrace of the first probe under cuda-gdb where it kills the process. Run after a build.
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bn_ext_gpu_diag}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  echo "CXX=${CXX:-} CC=${CC:-}"; command -v c++ g++ gcc
  ls -la /opt/gcc/bin/g++ 2>&1; cat /opt/gcc/bin/g++ 2>&1; /opt/gcc/bin/g++ --version 2>&1 | head -1; g++ --version 2>&1 | head -1
  ldd bn_ext/_C*.so | grep -E "stdc|gcc_s|gomp|libc\.so"
  readelf -SW bn_ext/_C*.so | grep -E "eh_frame"
  $PY -c "import torch; print('cxx11abi', torch._C._GLIBCXX_USE_CXX11_ABI); print(torch.__config__.show()[:500])"
} >"$OUT/toolchain.txt" 2>&1
cat "$OUT/toolchain.txt"
timeout 120 $PY scripts/error_probe.py 2>&1 | tee "$OUT/probes.txt"
if grep -q DIED "$OUT/probes.txt"; then
  timeout 150 cuda-gdb -q -batch -ex "set pagination off" -ex run -ex bt -ex "info registers rip" \
    --args $PY -c "import torch, bn_ext; torch.ops.bn_ext.batch_norm_stats(torch.randn(5))" >"$OUT/gdb.txt" 2>&1
  grep -E "^#|signal|SIG" "$OUT/gdb.txt" | head -40
fi
