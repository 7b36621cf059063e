#!/bin/bash
# On the lent GPU machine (bash bench/cuda/devrun.sh bash bench/cuda/ncu_kernels.sh [REGEX...]): Nsight Compute's
# speed-of-light, occupancy, launch, warp-state and pipe sections for one launch of each named kernel of a T 4096
# prefill on small.json (default: the grouped expert GEMMs, gate|up and down, and the flash attention), at free clocks.
# The full reports go to $OUT/ncu_<n>.txt; the lines that say where the time goes are printed.
set -u
D=${D:-build-cuda/devpack}
LOG=${OUT:-cuda-run}
mkdir -p "$LOG"
[ $# -gt 0 ] || set -- "k_moe_grouped_wgmma<.bool.1" "k_moe_grouped_wgmma<.bool.0" "k_flash_wgmma"
n=0
for k in "$@"; do
  n=$((n + 1))
  timeout 200 ncu --clock-control none --kernel-name-base demangled -k "regex:${k}" -s ${NCU_SKIP:-2} -c 1 --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section SchedulerStats \
    ${NCU_EXTRA:-} "$D/bench_cuda_decode" --config "$SHARED/configs/small.json" --dir /tmp/ckpt --only prefill --prefill 4096 \
    > "$LOG/ncu_${TAG:-}$n.txt" 2>&1
  echo "== $k (rc $?)"
  grep -E "^  [a-z_:]*k_|Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Waves Per SM|Issue Slots Busy|Issued Ipc|No Eligible|Active Warps Per|Eligible Warps|Warp Cycles Per Issued|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth|Grid Size|Dynamic Shared|Stall|stall|Tensor|est\. speedup|Est\. Speedup" "$LOG/ncu_${TAG:-}$n.txt" | head -${LINES_MAX:-45}
done
