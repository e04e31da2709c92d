#!/usr/bin/env bash
# The one prepared GPU check, for the device machine (torch 2.11 + CUDA 13, Triton 3.6,
# Python 3.12, pytest and pytest-benchmark installed, no network).  From the repository root:
#   bash bench/gpu_check.sh
# Builds the CUDA extension, runs the GPU tests (CUDA and Triton backends), the CUDA benchmarks
# and the trainer-step breakdown, writes everything
# under $OUT (or bench/out/gpu) and prints a short table last.  Must finish in < 6 minutes.
set -uo pipefail
# backend="auto" takes GPU kernels only once validated (fastgmmdiff/_dispatch.py VALIDATED);
# this run is what validates them, so it measures the intended order.
export FASTGMMDIFF_AUTO_UNVALIDATED=1
OUT="${OUT:-bench/out/gpu}"
mkdir -p "$OUT"
PY=python3
t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  date -u +%Y-%m-%dT%H:%M:%SZ; } 2>&1 | tee "$OUT/card.txt"

echo "== build ($(( $(date +%s) - t0 ))s)"
MAX_JOBS=16 FASTGMMDIFF_CUDA_ARCHS=90 $PY -m pip install --no-build-isolation --no-deps --no-index -e . \
  >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
$PY -c "import fastgmmdiff as f; print('backends:', f.available_backends())" | tee -a "$OUT/card.txt"

echo "== GPU tests ($(( $(date +%s) - t0 ))s)"
timeout 130 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_triton.py --benchmark-disable 2>&1 \
  | tee "$OUT/tests.log" | tail -15

echo "== CUDA benchmarks ($(( $(date +%s) - t0 ))s)"
timeout 100 $PY -m pytest -q -p no:cacheprovider bench/bench_kernels.py --benchmark-only -k "cuda-" \
  --benchmark-min-rounds=5 --benchmark-max-time=0.1 --benchmark-warmup=on \
  --benchmark-json="$OUT/bench.json" >"$OUT/bench.log" 2>&1
tail -5 "$OUT/bench.log"
$PY bench/render.py "$OUT/bench.json" --md "$OUT/table.md" --png "$OUT/speedup.png" >/dev/null 2>&1

echo "== trainer step, NGMG backends ($(( $(date +%s) - t0 ))s)"
timeout 30 $PY bench/bench_train.py --device cuda --reps 10 2>&1 | tee "$OUT/train_step.md" | tail -5
echo "== EM iteration ($(( $(date +%s) - t0 ))s)"
timeout 60 $PY bench/bench_em.py --device cuda 2>&1 | tee "$OUT/em.md" | tail -4
echo "== done in $(( $(date +%s) - t0 ))s; table ($OUT/table.md):"
cat "$OUT/card.txt"
cut -c1-400 "$OUT/table.md" 2>/dev/null | grep -E "^\| (cuda|device)" || echo "(no table: see $OUT/bench.log)"
