#!/usr/bin/env bash
# One GPU session's work, in steps that each fit the device tool's 10-minute command limit:
#   bash benchmarks/gpu_session.sh info|tests|ops|model
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
  model)  # the main job: W48 seg, inference 1024x2048 b1 fp32/bf16, training 512x1024 b8 bf16 autocast
    python -m hrfast bench --out "$out" 2>&1 | tee "$out/bench-$device.txt" ;;
  *) echo "usage: bash benchmarks/gpu_session.sh info|tests|ops|model" >&2; exit 2 ;;
esac
