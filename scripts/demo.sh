#!/usr/bin/env bash
# The main job, for now: build dsv3, describe the golden FP8 checkpoint and run its forward pass
# (logits + MTP logits), then compare with the reference computed by transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDACXX=/usr/local/cuda/bin/nvcc; fi
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" --target dsv3
model=../shared/golden/fp8/model
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
./build/dsv3 info --model "$model"
./build/dsv3 forward --model "$model" --input ../shared/golden/fp8/golden.safetensors --output "$out/logits.safetensors"
./build/dsv3 compare "$out/logits.safetensors" ../shared/golden/fp8/golden.safetensors logits mtp_logits
