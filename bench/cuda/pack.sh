#!/bin/bash
# Packs what a lent GPU machine needs to run the CUDA tests and benchmarks from binaries built here (the device
# image has CUDA but not fmt/OpenBLAS/PCRE2):  bench/cuda/pack.sh [BUILD]   (default build-cuda)
# -> BUILD/devpack (stripped binaries + lib/) and BUILD/shared (golden tiny/fp8 + configs); carry both to the
# device and run there:  bash bench/cuda/devrun.sh COMMAND...
set -eu
B=${1:-build-cuda}
SHARED=${SHARED:-../shared}
mkdir -p "$B/devpack/lib" "$B/shared/golden"
for b in dsv3 dsv3_cuda_tests bench_cuda_kernels bench_cuda_decode bench_cuda_moe; do
  [ -f "$B/$b" ] && cp "$B/$b" "$B/devpack/" && strip "$B/devpack/$b"
done
cp -L /lib/x86_64-linux-gnu/{libgomp.so.1,libfmt.so.9,libgfortran.so.5,libquadmath.so.0,libpcre2-8.so.0} \
      /usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0 "$B/devpack/lib/"
# (compressed: the carry limit is 64 MiB; devrun.sh unpacks it)
tar -C "$B/devpack" -cJf "$B/devpack/lib.tar.xz" lib && rm -rf "$B/devpack/lib"
cp -r "$SHARED"/golden/{tiny,fp8} "$B/shared/golden/" && cp -r "$SHARED/configs" "$B/shared/"
du -sh "$B/devpack" "$B/shared"
