#!/bin/bash
# A compile-time variant of the persistent decode kernel as its own bench binary, in seconds (one .cu recompiled and
# relinked against an existing CUDA build; CMake's DSV3_PERSIST_DEFS would rebuild a whole tree):
#   bench/cuda/persist_variant.sh NAME "DSV3_PERSIST_X=1 [DSV3_PERSIST_Y=1 ...]" [BUILD_DIR]
# writes BUILD_DIR/devpack/bench_cuda_decode.NAME (stripped), for bench/cuda/ab_decode.sh (BIN=dsv3_cuda_tests: the
# GPU tests with the variant, BUILD_DIR/devpack/dsv3_cuda_tests.NAME). EXTRA_INC="-I DIR" puts
# DIR first on the include path (e.g. an older copy of a header, for an A/B of a header change). CU=FILE compiles
# FILE in place of src/kernels/cuda/decode_persistent.cu (another kernel source of the library, or an older copy of
# one: its object replaces the one of the same name).
set -euo pipefail
NAME=$1
DEFS=$2
B=$(realpath "${3:-build-cuda}")
SRC=$(realpath "$(dirname "$0")/../..")
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
OBJ=$(basename "${CU:-decode_persistent.cu}").o
D=()
for d in $DEFS; do D+=("-D$d"); done
cd "$B"
FLAGS=$(sed -n 's/^CUDA_FLAGS = //p' CMakeFiles/dsv3cuda.dir/flags.make)
# shellcheck disable=SC2086
/usr/local/cuda/bin/nvcc -forward-unknown-to-host-compiler -DFMT_SHARED ${D[@]+"${D[@]}"} ${EXTRA_INC:-} \
  --options-file CMakeFiles/dsv3cuda.dir/includes_CUDA.rsp $FLAGS -lineinfo -x cu \
  -c "${CU:-$SRC/src/kernels/cuda/decode_persistent.cu}" -o "$W/$OBJ"
cp libdsv3cuda.a "$W/"
(cd "$W" && ar r libdsv3cuda.a "$OBJ")
BIN=${BIN:-bench_cuda_decode}
LINK=$(cat "CMakeFiles/$BIN.dir/link.txt")
LINK=${LINK/ libdsv3cuda.a / $W/libdsv3cuda.a }
LINK=${LINK/-o $BIN /-o $W/$BIN }
eval "$LINK"
mkdir -p devpack
strip -o "devpack/$BIN.$NAME" "$W/$BIN"
echo "devpack/$BIN.$NAME ($DEFS)"
