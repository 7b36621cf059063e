#!/bin/bash
# On a GPU machine, from binaries built elsewhere (see docs/CUDA_NOTES.md "Commands"):
#   bench/cuda/run_model.sh DIR    (DIR holds dsv3, dsv3_cuda_tests, bench_cuda_decode, bench_cuda_moe and lib/)
# Runs every GPU test (kernels and the whole model against the golden vectors), the CLI on the GPU, the MoE
# kernel benchmark, the end-to-end decode/prefill benchmark on ../shared/configs/small.json (bf16 and fp8) and the
# PyTorch + transformers peer on the same bf16 checkpoint (rows in the same table format; needs the decode stage's
# checkpoint in /tmp/ckpt). Logs go to $OUT (or ./cuda-run). STAGES (default "tests cli moe decode peer") picks what runs.
set -u
DIR=${1:-build-cuda/devpack}
LOG=${OUT:-cuda-run}
SHARED=$(realpath "${SHARED:-../shared}")
export DSV3_SHARED_DIR="$SHARED"
mkdir -p "$LOG"
export LD_LIBRARY_PATH="$DIR/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
STAGES=${STAGES:-tests cli moe decode peer}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader 2>&1 | tee "$LOG/nvidia-smi.log"
for stage in $STAGES; do
  case $stage in
  tests)
    echo "== GPU tests"
    timeout 300 "$DIR/dsv3_cuda_tests" ${GTEST_FILTER:+--gtest_filter=$GTEST_FILTER} --gtest_output=xml:"$LOG/tests.xml" \
      > "$LOG/tests.log" 2>&1
    echo "rc=$?"
    grep -E "^\[  (FAILED|PASSED|SKIPPED) |FAILED|rel L2|routing|Failure|Expected|Which is|actual|error|graph" "$LOG/tests.log" | head -80
    ;;
  cli)
    echo "== dsv3 on the GPU"
    t=$(mktemp -d)
    for dt in fp32 bf16; do
      "$DIR/dsv3" generate --model "$SHARED/golden/tiny/model" --prompt-ids 1,2,3,4 --max-new-tokens 16 --device cuda --dtype $dt \
        --print-ids --speculative mtp 2>&1 | tail -4
    done
    CUDA_VISIBLE_DEVICES= "$DIR/dsv3" generate --model "$SHARED/golden/tiny/model" --prompt-ids 1,2 --device cuda 2>&1 | tail -2
    echo "rc=${PIPESTATUS[0]} (expected 1: no GPU visible)"
    "$DIR/dsv3" init --config "$SHARED/configs/small.json" --random --output "$t/bf16" 2>&1 | tail -1
    "$DIR/dsv3" generate --model "$t/bf16" --prompt-ids 1,2,3,4 --max-new-tokens 64 --device cuda --ignore-eos 2>&1 | tail -3
    rm -rf "$t"
    ;;
  moe)
    echo "== MoE kernels"
    timeout 120 "$DIR/bench_cuda_moe" 2>&1 | tee "$LOG/bench_moe.log" | grep -vE "^\s*$" | head -40
    ;;
  decode)
    echo "== decode / prefill on small.json"
    for v in "" "--fp8"; do
      timeout 200 "$DIR/bench_cuda_decode" --config "$SHARED/configs/small.json" --dir "/tmp/ckpt$v" $v ${DECODE_ARGS:-} 2>&1 |
        tee -a "$LOG/bench_decode.log" | grep -vE "^\s*$" | head -30
    done
    ;;
  peer)
    echo "== PyTorch + transformers on the same checkpoint (/tmp/ckpt)"
    for b in 1 64; do
      timeout 200 python3 "$(dirname "$0")/peer_transformers.py" /tmp/ckpt --batch $b --tokens $([ $b = 1 ] && echo 48 || echo 32) 2>&1 |
        tee -a "$LOG/peer.log" | grep "^|"
    done
    ;;
  esac
done
