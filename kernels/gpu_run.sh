#!/usr/bin/env bash
# One device call (see kernels/NOTES.md): carried pydantic wheels (the GPU image lacks pydantic, which
# fineserve_core.config needs), the kernel tests on CUDA, then the benchmark. Usage, on the GPU machine
# from the repo root with .whl carried:  bash kernels/gpu_run.sh [bench args...]
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv \
  | tee "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-200}" python3 -m pytest tests/test_kernels.py -q -n 8 -p no:cacheprovider -o addopts="" \
    > "$OUT/pytest.txt" 2>&1
  echo "pytest rc=$?"; tail -25 "$OUT/pytest.txt"
fi
timeout "${BENCH_TIMEOUT:-360}" python3 -m kernels.bench --out "$OUT/kernels-h100.json" "$@" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
grep -v "^  cand\|^sweep" "$OUT/bench.log" | tail -80
