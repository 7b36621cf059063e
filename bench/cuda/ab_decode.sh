#!/bin/bash
# A/B of decode binaries or switches in one device call (figures of one run only compare within that run):
#   bench/cuda/ab_decode.sh DIR "LABEL=ENV... BIN" ...    e.g.
#   bench/cuda/ab_decode.sh build-cuda/devpack "old= bench_cuda_decode.s7" "new= bench_cuda_decode" \
#                                              "ahead=DSV3_STEP_AHEAD=1 bench_cuda_decode"
# Each variant runs ROUNDS times (default 2), interleaved, on ../shared/configs/small.json at batch 1 (64 tokens;
# ARGS overrides, e.g. ARGS="--only batch" for batch 64) and prints the bench's row. DIR holds the binaries and lib/.
set -u
DIR=$1
shift
SHARED=$(realpath "${SHARED:-../shared}")
export LD_LIBRARY_PATH="$DIR/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
CK=${CK:-/tmp/dsv3-ab-ckpt}
[ -f "$CK/config.json" ] || "$DIR/dsv3" init --config "$SHARED/configs/small.json" --random --output "$CK" 2>&1 | tail -1
for r in $(seq "${ROUNDS:-2}"); do
  for v in "$@"; do
    label=${v%%=*}
    rest=${v#*=}
    bin=${rest##* }
    envs=${rest% *}
    [ "$envs" = "$rest" ] && envs=
    printf '%-10s ' "$label"
    env $envs timeout 120 "$DIR/$bin" --config "$SHARED/configs/small.json" --dir "$CK" ${ARGS:---only batch --batch 1} 2>&1 | grep -E '^\| batch' | head -1
  done
done
