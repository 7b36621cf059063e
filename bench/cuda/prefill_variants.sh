#!/bin/bash
# On the lent GPU machine (bash bench/cuda/devrun.sh bash bench/cuda/prefill_variants.sh): the prefill choices that
# are switches, in one call: their tests, the T 4096 prefill A/B (interleaved rounds), the GPU span of the step's
# kernels against its wall time, and the per-kernel times (ncu) of the hot prefill kernels under the defaults and each
# of NCU_ENVS ("ENV=V ..." sets separated by ";").
# VARIANTS overrides the list ("LABEL=[ENV=VALUE...] bench_cuda_decode [ARGS]", as ab_decode.sh takes them).
set -u
D=${D:-build-cuda/devpack}
CFG=$SHARED/configs/small.json
LOG=${OUT:-cuda-run}
mkdir -p "$LOG"
if [ "${TESTS:-1}" = 1 ]; then
  echo "== tests of the prefill paths"
  timeout 240 "$D/dsv3_cuda_tests" --gtest_filter="${TEST_FILTER:-CudaFlashPrefill.*:CudaMoe.*:CudaInferOps.*:CudaOps.*:CudaModel.Prefill*}" \
    > "$LOG/variant_tests.log" 2>&1
  echo "rc=$?"; grep -E "^\[  (FAILED|PASSED) |FAILED|Failure|Expected|Which is|rel L2" "$LOG/variant_tests.log" | head -40
fi
echo "== prefill T 4096 A/B"
if [ -z "${VARIANTS:-}" ]; then
  VARIANTS=("base= bench_cuda_decode" "wgmma=DSV3_GROUPED_WGMMA=wgmma bench_cuda_decode" "cpasync=DSV3_GROUPED_TMA=0 bench_cuda_decode"
            "f8= bench_cuda_decode --fp8")
else
  eval "VARIANTS=($VARIANTS)"
fi
CK=/tmp/ckpt ROUNDS=${ROUNDS:-2} ROW=prefill ARGS="--only prefill --prefill 4096" bash "$(dirname "$0")/ab_decode.sh" "$D" "${VARIANTS[@]}"
echo "== GPU span"
timeout 120 "$D/bench_cuda_decode" --config "$CFG" --dir /tmp/ckpt --only prefill --prefill 4096 2>&1 | grep -E "^\| prefill"
if [ "${NCU:-1}" = 1 ] && command -v ncu > /dev/null; then
  IFS=";" read -ra ncu_envs <<< "${NCU_ENVS-}"
  for envs in "" "${ncu_envs[@]}"; do
    echo "== ncu (${envs:-defaults}): us per pass (nine passes: six timed, three with events)"
    env $envs timeout 150 ncu --clock-control none --metrics gpu__time_duration.sum --csv "$D/bench_cuda_decode" --config "$CFG" --dir /tmp/ckpt \
      --only prefill --prefill 4096 > "$LOG/ncu.csv" 2>/dev/null
    python3 - "$LOG/ncu.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]; ki = h.index("Kernel Name"); vi = h.index("Metric Value")
t = collections.Counter()
for r in rows[1:]:
    k = r[ki].replace("void ", "").replace("<unnamed>::", "").replace("(anonymous namespace)::", "")
    try: t[k.split("(")[0].split("<")[0]] += float(r[vi].replace(",", ""))
    except ValueError: pass
tot = sum(v for k, v in t.items() if not k.endswith(("k_contract_weights", "k_bf16_to_f32")))
for k, v in t.most_common(16): print(f"{v/9e3:9.1f}  {k}")
print(f"{tot/9e3:9.1f}  total (load-time kernels left out)")
PY
  done
fi
