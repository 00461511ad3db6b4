#!/usr/bin/env bash
# Nsight Compute on one kernel call at one shape (kernels/probe.py), selected metrics only: time, DRAM and
# SM throughput, issue and warp occupancy, launch limits, warp stall reasons (cycles per issued
# instruction). On the GPU machine:  bash kernels/ncu.sh _w4a8_kernel gemm 64 28672 4096
# Writes the raw CSV to $OUT (or /tmp) as ncu-<what>.csv and prints one line.
set -eu
kernel=$1; shift
out=${OUT:-/tmp}/ncu-$(echo "$*" | tr ' ' '-').csv
metrics="gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed"
metrics+=",sm__throughput.avg.pct_of_peak_sustained_elapsed,smsp__issue_active.avg.pct_of_peak_sustained_active"
metrics+=",sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__grid_size"
metrics+=",launch__waves_per_multiprocessor,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem"
metrics+=",regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio"
ncu --kernel-name "regex:$kernel" --launch-skip 2 --launch-count 1 --metrics "$metrics" --csv --page raw \
  python3 -m kernels.probe "$@" > "$out" 2>/dev/null
python3 - "$out" "$*" <<'PY'
import csv, sys
rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
head, vals = rows[0], rows[2]
want = ("gpu__time_duration.sum", "dram__throughput.avg", "sm__throughput.avg", "smsp__issue_active.avg",
        "sm__warps_active.avg", "launch__registers_per_thread", "launch__grid_size", "launch__waves",
        "launch__occupancy_limit_registers", "launch__occupancy_limit_shared_mem", "smsp__average_warps_issue")
keep = []
for k, v in zip(head, vals):
    if not k.startswith(want):
        continue
    k = k.replace("smsp__average_warps_issue_stalled_", "stall_").replace("_per_issue_active.ratio", "")
    if k.startswith("stall_") and float(v.replace(",", "")) < 0.1:
        continue
    keep.append(f"{k}={v}")
print(sys.argv[2] + ": " + "; ".join(keep))
PY
