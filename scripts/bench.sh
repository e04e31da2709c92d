#!/usr/bin/env bash
# The CPU benchmark suite: set up (or reuse) the venv, run bench/ with pytest-benchmark,
# save the JSON and render a markdown table and a PNG plot under bench/out/.
#   bash scripts/bench.sh [extra pytest args, e.g. -k diag-cpu]
source "$(dirname "$0")/env.sh"
mkdir -p bench/out
stamp="$(date -u +%Y%m%d-%H%M%S)"
json="bench/out/cpu-$stamp.json"
python -m pytest bench -q -p no:randomly --benchmark-only -k "cpu-" \
  --benchmark-min-rounds=3 --benchmark-max-time=0.3 --benchmark-warmup=on \
  --benchmark-json="$json" "$@"
python bench/render.py "$json" --md "bench/out/cpu-$stamp.md" --png "bench/out/cpu-$stamp.png"
echo "results: $json, bench/out/cpu-$stamp.md, bench/out/cpu-$stamp.png"
