#!/usr/bin/env bash
# One-shot GPU check (~5 min on an H100): the CUDA tests, then both benchmarks.
# Run from the repo root: bash benchmarks/gpu_check.sh [OUT_DIR]   (make-free; uses .venv if present)
set -uo pipefail
OUT="${1:-benchmarks/results}"
PY="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
mkdir -p "$OUT"
status=0
echo "== pytest -m gpu"; timeout 120 "$PY" -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -15 || status=1
echo "== train_speed (4 LLaMA-2-7B-shaped layers, 2 x 2048, bf16)"
timeout 200 "$PY" benchmarks/train_speed.py --setup gpu --kernels --repeats 2 --out "$OUT/train_speed_gpu.json" --md "$OUT/train_speed_gpu.md" || status=1
echo "== prune_speed"
timeout 120 "$PY" benchmarks/prune_speed.py --device cuda --repeats 1 --smollm2-samples 32 --llama-samples 32 \
    --output "$OUT/prune_speed_gpu.md" || status=1
exit $status
