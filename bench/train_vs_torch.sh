#!/usr/bin/env bash
# Training throughput, ours next to PyTorch's, in one run: builds bench_train, runs it, then runs the PyTorch
# peer (bench/torch/train_bench.py: the same architecture, config, batch, losses, optimizer and FLOP count,
# under Debian's python3-torch, CPU, float32) and prints one table.
# Usage: bench/train_vs_torch.sh [config.json] [batch] [seq_len] [steps]   (defaults: configs/kjv.json 16 256 4)
# BUILD_DIR picks the build folder (default: build; build-cpu, configured without CUDA, if that fails).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/kjv.json}
BATCH=${2:-16}
SEQ=${3:-256}
STEPS=${4:-4}
PY=/usr/bin/python3  # Debian's python3-torch lives there; a pyenv python3 earlier in PATH would not have it

"$PY" -c 'import torch' 2>/dev/null || { echo "error: $PY cannot import torch (apt-get install -y python3-torch)" >&2; exit 1; }

build() {  # build DIR [env...]: configure if needed, then build bench_train
  local dir=$1; shift
  if [[ ! -f $dir/CMakeCache.txt ]]; then env "$@" cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release >/dev/null || return 1; fi
  env "$@" cmake --build "$dir" --target bench_train -j"$(nproc)" >/dev/null
}
BUILD=${BUILD_DIR:-build}
if ! build "$BUILD" 2>/tmp/train_vs_torch.build.$$; then
  # A CMake error in the CUDA part (someone mid-edit, or no working nvcc): build the CPU-only tree instead.
  echo "note: building in $BUILD failed ($(grep -m1 -i error /tmp/train_vs_torch.build.$$ || true)); using build-cpu without CUDA" >&2
  BUILD=build-cpu
  build "$BUILD" PATH=/usr/bin:/bin || { cat /tmp/train_vs_torch.build.$$ >&2; rm -f /tmp/train_vs_torch.build.$$; exit 1; }
fi
rm -f /tmp/train_vs_torch.build.$$

echo "== $(uptime)"
echo "== ours: $BUILD/bench_train $CONFIG $BATCH $SEQ $STEPS"
OURS=$("$BUILD/bench_train" "$CONFIG" "$BATCH" "$SEQ" "$STEPS")
echo "$OURS"
echo "== $(uptime)"
echo "== torch: $PY bench/torch/train_bench.py $CONFIG $BATCH $SEQ $STEPS"
TORCH=$("$PY" bench/torch/train_bench.py "$CONFIG" "$BATCH" "$SEQ" "$STEPS")
echo "$TORCH"
echo "== $(uptime)"

# "... 1234 tokens/s  56.7 GFLOP/s | ... sgemm 2048^3: 140.0 GFLOP/s | ratio 40.5%"
field() { sed -nE "s/.*train step: .*  ([0-9.]+) tokens\/s  ([0-9.]+) GFLOP\/s \| [^:]*: ([0-9.]+) GFLOP\/s \| ratio ([0-9.]+)%.*/\\$2/p" <<<"$1"; }
blas() { sed -nE 's/.*\| BLAS ([^|]*) \|.*/\1/p' <<<"$1" | head -1 | sed 's/ *$//'; }
o_tok=$(field "$OURS" 1) o_gf=$(field "$OURS" 2) o_peak=$(field "$OURS" 3) o_pct=$(field "$OURS" 4)
t_tok=$(field "$TORCH" 1) t_gf=$(field "$TORCH" 2) t_peak=$(field "$TORCH" 3) t_pct=$(field "$TORCH" 4)
if [[ -z $o_tok || -z $t_tok ]]; then echo "error: could not read the benchmark lines above" >&2; exit 1; fi

echo
echo "training, $CONFIG, batch $BATCH x $SEQ, mean of $STEPS steps after 1 warm-up, $(nproc) cores"
printf '%-22s %12s %10s %14s %10s\n' "" "tokens/s" "GFLOP/s" "sgemm GFLOP/s" "% sgemm"
printf '%-22s %12s %10s %14s %9s%%\n' "dsv3 (ours)" "$o_tok" "$o_gf" "$o_peak" "$o_pct"
printf '%-22s %12s %10s %14s %9s%%\n' "PyTorch $("$PY" -c 'import torch; print(torch.__version__)')" "$t_tok" "$t_gf" "$t_peak" "$t_pct"
awk -v a="$o_tok" -v b="$t_tok" 'BEGIN { printf "ours / torch: %.2fx tokens/s\n", a / b }'
echo "BLAS: ours $(blas "$OURS"); torch $(blas "$TORCH") (torch's sgemm column: torch.mm 2048x2048)"
