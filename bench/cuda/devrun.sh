#!/bin/bash
# On the lent GPU machine, in the repository root with build-cuda/devpack and build-cuda/shared carried
# (bench/cuda/pack.sh): sets the library path and the shared data and runs COMMAND... (the benches write their
# random small.json checkpoints themselves when --dir holds none)
set -u
export D=${D:-build-cuda/devpack}
export SHARED=${SHARED:-build-cuda/shared}
export DSV3_SHARED_DIR=$(realpath "$SHARED")
[ -d "$D/lib" ] || tar -C "$D" -xJf "$D/lib.tar.xz"
export LD_LIBRARY_PATH="$D/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PATH="/usr/local/cuda/bin:$PATH"
"$@"
