#!/usr/bin/env bash
# One device call: correctness, then speed side by side with the PyTorch peer.
# Run from the repo root on the GPU machine, with the release binary, env.sh and shared/bench/peer_gpt2.py carried in .device/:
#   bash tools/gpu_check.sh [selftest|bench|peer|all]
set -uo pipefail
source .device/env.sh >/dev/null 2>&1
BIN=./.device/halfling
what=${1:-all}
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
if [[ $what == selftest || $what == all ]]; then
  $BIN selftest --device cuda 2>&1 | tee "$OUT/selftest.txt" | tail -60
fi
if [[ $what == bench || $what == all ]]; then
  $BIN bench --config configs/gpt2_124m.toml --device cuda --steps 10 --warmup 3 2>&1 | tee "$OUT/bench_124m.json"
  $BIN bench --config configs/bench_0p9b.toml --device cuda --steps 5 --warmup 2 2>&1 | tee "$OUT/bench_0p9b.json"
fi
if [[ $what == peer || $what == all ]]; then
  PYTHONUNBUFFERED=1 python3 .device/peer_gpt2.py --modes eager,compile --layers 12 --dim 768 --heads 12 --batch 16 --seq 1024 2>&1 | tail -3
fi
