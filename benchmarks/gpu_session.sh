#!/usr/bin/env bash
# One GPU session's work, in steps that each fit the device tool's 10-minute command limit:
#   bash benchmarks/gpu_session.sh info|tests|ops|model|calibrate|unverified
# or all of it within 10 minutes of device time, the steps in order of value under time budgets (see
# benchmarks/results/README.md for the estimates; a step cut by its budget says so in the log):
#   bash benchmarks/gpu_session.sh all
# Runs from the repository root without installing anything (the GPU machine has no package registry).
# Logs and JSON go to $OUT (the device tool's output folder) when set, else benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
device="$(python -c 'import torch; print(torch.cuda.get_device_name(0).replace(" ", "-"))' 2>/dev/null || echo cpu)"
case "${1:-}" in
  info)   # versions, backends, and the CUDA extension's build time
    python -m hrfast info --build 2>&1 | tee "$out/info-$device.txt" ;;
  tests)  # the whole suite on the GPU: both fused backends on CUDA tensors, compile, patching
    python -m pytest -q -x tests/ 2>&1 | tee "$out/tests-$device.txt" ;;
  ops)    # fusion, head and upsample-backward benchmarks, every contender side by side
    HRFAST_BENCH_MAX_AUTOTUNE="${HRFAST_BENCH_MAX_AUTOTUNE:-0}" python -m pytest -q benchmarks/test_bench_fusion.py \
      benchmarks/test_bench_head.py benchmarks/test_bench_upsample.py --benchmark-only \
      --benchmark-json "$out/ops-$device.json" 2>&1 | tail -n 80 | tee "$out/ops-$device.txt" ;;
  unverified)  # paths kept off the defaults until a GPU has run them: the BN statistics launch that finalizes
               # in its last program (a ticket counter: cross-program ordering the interpreter cannot test),
               # three times over (every launch against nn.BatchNorm2d, bitwise determinism between launches)
    for round in 1 2 3; do
      echo "round $round"; HRFAST_BN_MERGED_FINALIZE=1 python -m pytest -q -x tests/test_batch_norm_fold.py || break
    done 2>&1 | tee "$out/unverified-$device.txt" ;;
  model)  # the main job: W48 seg, inference 1024x2048 b1 fp32/bf16, training 512x1024 b8 bf16 autocast
    # shellcheck disable=SC2086
    python -m hrfast bench --out "$out" ${HRFAST_BENCH_ARGS:-} 2>&1 | tee "$out/bench-$device.txt" ;;
  calibrate)  # predictions for this GPU (hrfast/perf: W48 seg at the main job's four configurations), then every
              # predicted op call measured beside its prediction (benchmarks/calibrate.py), ~5 min (see results README)
    arch="$(python -c 'import torch; n = torch.cuda.get_device_name(0)
print(next((a.lower() for a in ("H200", "H100", "A100") if a in n), "sm_%d%d" % torch.cuda.get_device_capability(0)))')"
    export HRFAST_PERF_CACHE="${HRFAST_PERF_CACHE:-$PWD/.perf-cache}"  # carry it to skip the compiles
    for config in "1024 2048 --batch 1 --mode inference" "512 1024 --batch 8 --mode training"; do
      for dtype in fp32 bf16; do
        # shellcheck disable=SC2086
        python -m hrfast inspect --size $config --dtype "$dtype" --arch "$arch" --no-cuda --jobs 8 \
          --out "$out/inspect" | tail -n 6
      done
    done 2>&1 | tee "$out/inspect-$device.txt"
    for report in "$out"/inspect/hrnetv2_w48_seg_*_{fp32,bf16}.json; do
      python benchmarks/calibrate.py "$report" --budget-s 35
    done 2>&1 | tee "$out/calibrate-$device.txt" ;;
  all)  # 570 s in all: build, calibrate, the main job without its torch.compile contenders, then tests until the
        # budget is spent (the ops step and compile contenders need a session of their own)
    start=$SECONDS
    step() {  # step NAME BUDGET_SECONDS COMMAND...
      local name=$1 budget=$2; shift 2
      if [ "$budget" -le 10 ]; then echo "== $name: no time left, skipped =="; return; fi
      echo "== $name (budget ${budget}s) =="
      timeout -k 10 "$budget" "$@"
      [ $? -eq 124 ] && echo "== $name cut at its ${budget}s budget =="
    }
    step info "${BUDGET_INFO:-150}" bash "$0" info
    step calibrate "${BUDGET_CALIBRATE:-240}" bash "$0" calibrate
    step model "${BUDGET_MODEL:-120}" env HRFAST_BENCH_ARGS="--no-compile --repeats 10" bash "$0" model
    step unverified "${BUDGET_UNVERIFIED:-60}" bash "$0" unverified
    step tests "$((570 - (SECONDS - start)))" bash "$0" tests
    echo "== all: $((SECONDS - start))s ==" ;;
  *) echo "usage: bash benchmarks/gpu_session.sh info|tests|ops|model|calibrate|unverified|all" >&2; exit 2 ;;
esac
