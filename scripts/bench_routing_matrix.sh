#!/usr/bin/env bash
# Issue #19's matrix of routing runs: three workloads (chat+RAG, agent, burst) × two loads
# (≈ 75 % and ≈ 95 % of round robin's saturation on the default fleet) × two seeds, one
# scripts/bench_routing.sh run per cell with every compared policy in it, then one table of
# every cell with each llmproxy target's ratios to the best peer of the same run
# (scripts/routing_matrix_table.py), written to $OUT/matrix.md.
#
#   scripts/bench_routing_matrix.sh            # = make bench-routing-matrix
#
# Environment (defaults in brackets):
#   BENCH_MATRIX_OUT [build/bench-matrix]   one directory per cell under it
#   BENCH_MATRIX_CELLS [all]   cell names to run, e.g. "chat-95-s1 burst-75-s2"
#   SIM_DURATION [120]   seconds of trace per run
#   BENCH_ENVOY_TARGETS ["prefix_cost:prefix_cost"]   as in scripts/bench_routing.sh
#   BENCH_SGLANG_POLICIES [cache_aware]  BENCH_VLLM_POLICIES []   the peers (sglang-router's
#   cache_aware was the best peer in every earlier run; add vllm-router's with "cache_aware")
#   BENCH_REFS [0]   the reference proxy's round robin and least request
# Anything else (SIM_SERVE_ARGS, BENCH_PEER_REPLICAS, ...) goes to scripts/bench_routing.sh.
# A whole run takes about 70 minutes on a 2-core machine; keep the machine otherwise idle.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${BENCH_MATRIX_OUT:-build/bench-matrix}
export SIM_DURATION=${SIM_DURATION:-120}
export BENCH_ENVOY_TARGETS=${BENCH_ENVOY_TARGETS:-prefix_cost:prefix_cost}
export BENCH_SGLANG_POLICIES=${BENCH_SGLANG_POLICIES-cache_aware}
export BENCH_VLLM_POLICIES=${BENCH_VLLM_POLICIES-}
export BENCH_REFS=${BENCH_REFS:-0}
PY=${PY:-.venv/bin/python}

# name  rate (req/s)  workload options; 75 % / 95 % of round robin's saturation per workload
# (BENCH_SATURATION=1 scripts/bench_routing.sh finds it; docs/benchmarks.md)
CELLS=(
  "chat-75   13.2 --mix chat=0.5,rag=0.4,unique=0.1"
  "chat-95   16.6 --mix chat=0.5,rag=0.4,unique=0.1"
  "agent-75  1.5  --mix agent=1"
  "agent-95  2.0  --mix agent=1"
  "burst-75  17.3 --mix burst=1"
  "burst-95  21.9 --mix burst=1"
)
SEEDS=(1 2)

mkdir -p "$OUT"
wanted=${BENCH_MATRIX_CELLS:-all}
for seed in "${SEEDS[@]}"; do
  for cell in "${CELLS[@]}"; do
    read -r name rate args <<< "$cell"
    name="$name-s$seed"
    if [ "$wanted" != all ] && [[ " $wanted " != *" $name "* ]]; then
      continue
    fi
    echo "== $name: $rate req/s, $args --seed $seed, $(date -u +%H:%M:%S) UTC"
    SIM_RATE=$rate SIM_LOAD_ARGS="$args --seed $seed" BENCH_OUT="$OUT/$name" \
      scripts/bench_routing.sh > "$OUT/$name.log" 2>&1 || {
        echo "   failed: see $OUT/$name.log" >&2
        continue
      }
    grep -E '^\| ' "$OUT/$name/results.md" | head -n 20
  done
done
"$PY" scripts/routing_matrix_table.py "$OUT" > "$OUT/matrix.md"
cat "$OUT/matrix.md"
