#!/usr/bin/env bash
# The main job: on this machine's cores, train a small DeepSeek-V3 (MLA, DeepSeekMoE with shared + routed
# experts, group-limited sigmoid routing, auxiliary-loss-free balancing, MTP) on the King James Bible,
# compare its validation bits per byte with gzip -9, and print sampled continuations.
# Environment: DSV3_DEMO_DIR (work folder, default runs/kjv), DSV3_DEMO_STEPS (optimizer steps, default 500).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDACXX=/usr/local/cuda/bin/nvcc; fi
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" --target dsv3
dsv3=./build/dsv3
W=${DSV3_DEMO_DIR:-runs/kjv}
STEPS=${DSV3_DEMO_STEPS:-500}
mkdir -p "$W"

echo "== corpus: the King James Bible (Debian's bible-kjv)"
bash scripts/kjv.sh "$W/kjv.txt"
echo "== tokenizer: byte-level BPE, 4096 tokens, DeepSeek-V3 pre-tokenizer"
$dsv3 tokenizer train --input "$W/kjv.txt" --vocab-size 4096 --output "$W/tokenizer.json"
echo "== data: token shards, the last 5% held out for validation"
$dsv3 data prepare --tokenizer "$W/tokenizer.json" --input "$W/kjv.txt" --output "$W/data" --val-fraction 0.05

echo "== training ($STEPS steps of 16 x 256 tokens; configs/kjv.json)"
rm -rf "$W/run"
$dsv3 train --config configs/kjv.json --data "$W/data" --tokenizer "$W/tokenizer.json" --out "$W/run" \
  --steps "$STEPS" --batch 16 --seq-len 256 --lr 3e-3 --min-lr 3e-4 --warmup 30 --decay-start 0.5 \
  --eval-every 50 --eval-tokens 16384 --save-every 100 --log-every 10

echo "== validation: bits per byte on $(wc -c < "$W/data/val.txt") bytes of held-out text"
model_bpb=$(tail -n 1 "$W/run/metrics.jsonl" | sed -n 's/.*"val_bpb":\([0-9.eE+-]*\).*/\1/p')
gzip_bytes=$(gzip -9 -c "$W/data/val.txt" | wc -c)
val_bytes=$(wc -c < "$W/data/val.txt")
gzip_bpb=$(awk -v g="$gzip_bytes" -v v="$val_bytes" 'BEGIN { printf "%.4f", 8 * g / v }')
printf "dsv3 model: %.4f bits/byte    gzip -9: %s bits/byte\n" "$model_bpb" "$gzip_bpb"

echo "== samples (temperature 0.8, top-p 0.95)"
for prompt in "In the beginning" "And Jesus said unto them" "The LORD is my shepherd"; do
  echo "--- $prompt"
  $dsv3 generate --model "$W/run/checkpoint" --prompt "$prompt" --max-new-tokens 60 --temperature 0.8 --top-p 0.95 \
    --seed 7 2>/dev/null
  echo
done
echo "== done in $(( $(date +%s) - start )) s. Loss curve: $W/run/loss.png; metrics: $W/run/metrics.jsonl;"
echo "   chat with it: $dsv3 chat --model $W/run/checkpoint"
