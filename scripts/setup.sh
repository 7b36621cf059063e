#!/usr/bin/env bash
# Installs every Debian package dsv3's build, tests, benchmarks and demo need. Idempotent; run as root.
set -euo pipefail
PKGS=(
  build-essential cmake pkg-config git
  libopenblas-openmp-dev     # CPU GEMM (sgemm); the OpenMP build runs single-threaded inside our parallel regions
  nlohmann-json3-dev         # config.json, safetensors headers, tokenizer.json
  libpcre2-dev               # tokenizer pre-tokenizer regexes (UTF + UCP + JIT)
  libcli11-dev               # the dsv3 command line
  libfmt-dev
  libgtest-dev libgmock-dev  # unit and golden tests (ctest)
  libbenchmark-dev           # kernel benchmarks
  python3                    # small test helpers
  gnuplot-nox                # the training loss plot (loss.png)
  bible-kjv                  # the demo corpus: the King James Bible (`bible` prints it)
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
echo "setup: all packages present (${#PKGS[@]})"
