#!/usr/bin/env bash
# The report's two training claims at demo scale (docs/EXPERIMENTS.md):
#  (a) balancing: none vs auxiliary loss only vs auxiliary-loss-free bias — MaxVio over training, final
#      validation loss;
#  (b) MTP on vs off — the main model's validation loss at equal steps.
# Needs the demo's data (scripts/demo.sh, or DSV3_DEMO_DIR pointing at a folder with data/ and
# tokenizer.json). Usage: scripts/experiments.sh [steps]   (default 240 steps of 8 x 256 tokens)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${DSV3_DEMO_DIR:-runs/kjv}
STEPS=${1:-240}
OUT=runs/experiments
dsv3=./build/dsv3
[ -f "$W/data/train.bin" ] || { echo "experiments: no $W/data/train.bin; run scripts/demo.sh first" >&2; exit 1; }
mkdir -p "$OUT" docs/experiments
python3 - "$OUT/kjv-nomtp.json" <<'PY'
import json, sys
c = json.load(open("configs/kjv.json")); c["num_nextn_predict_layers"] = 0
json.dump(c, open(sys.argv[1], "w"), indent=2)
PY
common=(--data "$W/data" --steps "$STEPS" --batch 8 --seq-len 256 --lr 3e-3 --min-lr 3e-4 --warmup 20
        --decay-start 0.5 --eval-every 40 --eval-tokens 16384 --save-every 100000 --log-every 40 --no-plot)
run() {  # name config extra-args...
  local name=$1 cfg=$2; shift 2
  rm -rf "$OUT/$name"
  echo "== $name"
  $dsv3 train --config "$cfg" --out "$OUT/$name" "${common[@]}" "$@"
}
run none      configs/kjv.json --bias-gamma 0 --balance-alpha 0
run aux-loss  configs/kjv.json --bias-gamma 0 --balance-alpha 0.01
run loss-free configs/kjv.json --bias-gamma 0.001 --balance-alpha 0
run loss-free-g01 configs/kjv.json --bias-gamma 0.01 --balance-alpha 0
run mtp-off   "$OUT/kjv-nomtp.json" --bias-gamma 0.001 --balance-alpha 0

# Tables for gnuplot: step, MaxVio (mean over MoE layers, smoothed over 10 steps); step, val loss.
for r in none aux-loss loss-free loss-free-g01 mtp-off; do
  python3 - "$OUT/$r/metrics.jsonl" "$OUT/$r" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
with open(sys.argv[2] + "/maxvio.dat", "w") as f:
    win = []
    for r in rows:
        win = (win + [r["max_vio_mean"]])[-10:]
        f.write(f'{r["step"] + 1} {sum(win) / len(win)}\n')
with open(sys.argv[2] + "/val.dat", "w") as f:
    for r in rows:
        if "val_loss" in r: f.write(f'{r["step"] + 1} {r["val_loss"]}\n')
PY
done
gnuplot <<GP
set terminal pngcairo size 900,500
set grid
set output 'docs/experiments/balance_maxvio.png'
set title 'MaxVio per step (mean over MoE layers, 10-step average)'
set xlabel 'step'; set ylabel 'MaxVio'
plot '$OUT/none/maxvio.dat' w l t 'no balancing', '$OUT/aux-loss/maxvio.dat' w l t 'auxiliary loss (alpha 0.01)', '$OUT/loss-free/maxvio.dat' w l t 'aux-loss-free bias (gamma 0.001)', '$OUT/loss-free-g01/maxvio.dat' w l t 'aux-loss-free bias (gamma 0.01)'
set output 'docs/experiments/balance_val.png'
set title 'validation loss'; set ylabel 'nats/token'
plot '$OUT/none/val.dat' w lp t 'no balancing', '$OUT/aux-loss/val.dat' w lp t 'auxiliary loss', '$OUT/loss-free/val.dat' w lp t 'aux-loss-free bias (gamma 0.001)', '$OUT/loss-free-g01/val.dat' w lp t 'aux-loss-free bias (gamma 0.01)'
set output 'docs/experiments/mtp_val.png'
set title 'main-model validation loss, MTP on vs off'
plot '$OUT/loss-free/val.dat' w lp t 'MTP depth 1 (lambda 0.3)', '$OUT/mtp-off/val.dat' w lp t 'no MTP'
GP
echo "run | final val loss | val bpb | MaxVio (mean of last 20 steps)"
for r in none aux-loss loss-free loss-free-g01 mtp-off; do
  python3 - "$OUT/$r/metrics.jsonl" "$r" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
last = rows[-1]; tail = rows[-20:]
print(f'{sys.argv[2]} | {last["val_loss"]:.4f} | {last["val_bpb"]:.4f} | {sum(r["max_vio_mean"] for r in tail) / len(tail):.3f}')
PY
done
