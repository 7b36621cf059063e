#!/bin/bash
# A/B of decode binaries or switches in one device call (figures of one run only compare within that run):
#   bench/cuda/ab_decode.sh DIR "LABEL=[ENV=VALUE...] BIN [BENCH ARGS...]" ...    e.g.
#   bench/cuda/ab_decode.sh build-cuda/devpack "old= bench_cuda_decode.s7" "new= bench_cuda_decode" \
#                                              "ahead=DSV3_STEP_AHEAD=1 bench_cuda_decode" "fp8= bench_cuda_decode --fp8"
# Each variant runs ROUNDS times (default 2), interleaved, on ../shared/configs/small.json at batch 1 (64 tokens;
# ARGS overrides, e.g. ARGS="--only batch" for batch 64) and prints the bench's row. DIR holds the binaries and lib/.
# ROW: the row printed (a regex after "| ", default batch; e.g. ROW=prefill). A variant with --fp8 runs on an FP8
# random checkpoint ($CK-fp8), the others on a bf16 one ($CK).
set -u
DIR=$1
shift
SHARED=$(realpath "${SHARED:-../shared}")
export LD_LIBRARY_PATH="$DIR/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
CK=${CK:-/tmp/dsv3-ab-ckpt}
for r in $(seq "${ROUNDS:-2}"); do
  for v in "$@"; do
    label=${v%%=*}
    envs=()
    bin=
    extra=()
    for w in ${v#*=}; do
      if [ -z "$bin" ] && [[ $w == *=* ]]; then envs+=("$w"); elif [ -z "$bin" ]; then bin=$w; else extra+=("$w"); fi
    done
    ck=$CK
    init=()
    if [[ " ${extra[*]:-} " == *" --fp8 "* ]]; then ck=$CK-fp8 init=(--fp8); fi
    [ -f "$ck/config.json" ] || "$DIR/dsv3" init --config "$SHARED/configs/small.json" --random ${init[@]+"${init[@]}"} --output "$ck" 2>&1 | tail -1
    printf '%-10s ' "$label"
    env ${envs[@]+"${envs[@]}"} timeout 120 "$DIR/$bin" --config "$SHARED/configs/small.json" --dir "$ck" ${extra[@]+"${extra[@]}"} \
      ${ARGS:---only batch --batch 1} 2>&1 | grep -E "^\| ${ROW:-batch}" | head -1
  done
done
