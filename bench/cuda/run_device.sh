#!/bin/bash
# Runs the CUDA kernel tests and the benchmark on a GPU machine from binaries built elsewhere:
#   bench/cuda/run_device.sh DIR   (DIR holds dsv3_cuda_tests, bench_cuda_kernels and lib/ with their host libraries)
# Logs go to $OUT (or ./cuda-run) as tests.log, tests.xml, nogpu.log, sanitizer.log and bench.log.
set -u
DIR=${1:-build-cuda/devpack}
LOG=${OUT:-cuda-run}
mkdir -p "$LOG"
CUBLAS_DIR=$(dirname "$(find /usr/local/cuda*/ /usr/lib /opt -name 'libcublasLt.so.13*' 2>/dev/null | head -1)" 2>/dev/null)
export LD_LIBRARY_PATH="$DIR/lib:/usr/local/cuda/lib64:${CUBLAS_DIR}:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$LOG/nvidia-smi.log"
echo "== tests"
"$DIR/dsv3_cuda_tests" --gtest_output=xml:"$LOG/tests.xml" 2>&1 | tee "$LOG/tests.log" | grep -E "^\[  (FAILED|PASSED|SKIPPED) |^\[ +OK|FAILED|rel L2|probe|message|device:|Failure|Expected|Which is|actual|error" | head -120
echo "== no-GPU path (CUDA_VISIBLE_DEVICES=)"
CUDA_VISIBLE_DEVICES= "$DIR/dsv3_cuda_tests" --gtest_filter='CudaDevice.*' 2>&1 | tee "$LOG/nogpu.log" | grep -E "OK|FAILED|Skipped|no CUDA" | head -10
if [ "${SANITIZE:-1}" = 1 ] && command -v compute-sanitizer >/dev/null; then
  echo "== compute-sanitizer memcheck + racecheck (attention, router, row ops)"
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 "$DIR/dsv3_cuda_tests" \
    --gtest_filter='CudaOps.*:CudaAttention/PagedDecode.*:CudaAttention.CausalPrefillMatchesCpu' > "$LOG/sanitizer.log" 2>&1
  echo "memcheck rc=$? $(grep -c 'ERROR SUMMARY: 0' "$LOG/sanitizer.log") clean summaries; $(grep 'ERROR SUMMARY' "$LOG/sanitizer.log" | tail -1)"
  timeout 150 compute-sanitizer --tool racecheck --error-exitcode 9 "$DIR/dsv3_cuda_tests" \
    --gtest_filter='CudaAttention/PagedDecode.*:CudaAttention.CausalPrefillMatchesCpu:CudaOps.RouterMatchesCpu' > "$LOG/racecheck.log" 2>&1
  echo "racecheck rc=$? $(grep 'ERROR SUMMARY\|RACECHECK SUMMARY' "$LOG/racecheck.log" | tail -1)"
fi
echo "== bench"
"$DIR/bench_cuda_kernels" ${BENCH_ARGS:-} 2>&1 | tee "$LOG/bench.log" | grep -E "^\||device|FALLBACK|error"
