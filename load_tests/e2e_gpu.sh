#!/usr/bin/env bash
# The end-to-end evaluation in ONE GPU-machine command (<= 9 minutes): for each policy (fineserve, static,
# prism) start serve_configs/e2e-h100.yaml on a private Ray cluster, sweep the request rate with
# ShareGPT-like lengths, stop it; then compare. Results, Markdown and plots go to $OUT:
#   e2e-h100-<policy>.json/.md/-*.png   one sweep per policy (every request recorded)
#   e2e-h100.json/.md/-policies.png     the comparison (copy to load_tests/results/ for the README)
# On the GPU machine, with .devpkgs sent along:   bash load_tests/e2e_gpu.sh
# Knobs (environment): E2E_RATES (total req/s, default 3,6,12), E2E_DURATION (s per rate, 25), E2E_DRAIN
# (s, 8), E2E_BUDGET_S (s for all policies, 500), E2E_POLICIES, E2E_CONFIG, E2E_KV_GIB (cap the KV
# buffer), E2E_EXTRA (more load-test flags), E2E_MPS=1 (run the GPU's processes under an MPS daemon this
# script starts and stops; results then named <config>-mps-*). Each policy gets an equal share of what is
# left of the budget; a rate that would not fit is skipped and recorded, never overrun.
# CPU check of the logic (no GPU): E2E_CONFIG=serve_configs/dev.yaml E2E_EXTRA="--lengths fixed
#   --input-len 16 --output-len 4" E2E_RATES=1,2 E2E_DURATION=3 OUT=/tmp/e2e bash load_tests/e2e_gpu.sh
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
OUT=${OUT:-/tmp/e2e-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
CONFIG=${E2E_CONFIG:-serve_configs/e2e-h100.yaml}
RATES=${E2E_RATES:-3,6,12}
DURATION=${E2E_DURATION:-25}
DRAIN=${E2E_DRAIN:-8}
BUDGET=${E2E_BUDGET_S:-500}
read -r -a POLICIES <<< "${E2E_POLICIES:-fineserve static prism}"
NAME=$(basename "$CONFIG" .yaml)
GPU=0; nvidia-smi -L >/dev/null 2>&1 && GPU=1
# the GPU image lacks ray/pydantic/fastapi: the .devpkgs bundle (cp312) brings them; not for this CPU box
[ "$GPU" = 1 ] && source .devpkgs/unpack.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"      # Ray's worker processes import app/ from here
[ "$GPU" = 1 ] && nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee "$OUT/gpu.txt"
MPS=0
if [ "${E2E_MPS:-0}" = 1 ] && [ "$GPU" = 1 ]; then
  # every CUDA process of the app (Ray actors inherit these) becomes a client of one MPS server
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/e2e-mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/e2e-mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d && MPS=1 && NAME="$NAME-mps"
fi
echo "mps: $([ "$MPS" = 1 ] && echo on || echo off)" | tee -a "$OUT/gpu.txt"

left=${#POLICIES[@]}
for pol in "${POLICIES[@]}"; do
  spent=$(( $(date +%s) - T0 ))
  limit=$(( (BUDGET - spent) / left )); left=$(( left - 1 ))
  echo "=== $pol: ${limit}s of the budget (spent ${spent}s) $(date +%T)"
  if [ "$limit" -lt 30 ]; then echo "skip $pol: no time left"; continue; fi
  # the runner stops its own cluster; timeout is the last resort (it then leaves no JSON for this policy)
  timeout --signal=INT --kill-after=20 $(( limit + 30 )) \
    $PY -m fineserve_core.cli load-test --config "$CONFIG" --policy "$pol" --rate "$RATES" \
      --duration "$DURATION" --drain "$DRAIN" --request-timeout $(( DURATION + DRAIN )) --time-limit "$limit" \
      ${E2E_KV_GIB:+--kv-cache-gib "$E2E_KV_GIB"} --out "$OUT/$NAME-$pol.json" --quiet ${E2E_EXTRA:-} \
      2>&1 | grep -v -E "^\s*$|Task ServeController|ray.io/en/latest/ray-security" | tail -n 40
done
ls "$OUT"/"$NAME"-*.json >/dev/null 2>&1 && \
  $PY -m load_tests.report combine --out "$OUT/$NAME.json" $(ls "$OUT"/"$NAME"-{fineserve,static,prism}.json 2>/dev/null)
# every Ray daemon of this machine goes (the GPU machine runs nothing else); never on a shared CPU box
[ "$GPU" = 1 ] && ray stop --force >/dev/null 2>&1
[ "$MPS" = 1 ] && echo quit | nvidia-cuda-mps-control
# the GPU machine hands back only a few files per command: everything also goes in one tarball (sorts first)
[ "$GPU" = 1 ] && tar czf /tmp/e2e-results.tgz -C "$OUT" . && mv /tmp/e2e-results.tgz "$OUT/0-e2e-results.tgz"
echo "e2e done in $(( $(date +%s) - T0 ))s"
