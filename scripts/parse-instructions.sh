#!/usr/bin/env bash
# Instructions of one repetition of each parse step of the request path (examples/parse_cost.rs),
# counted by callgrind: the step run 100 and 1,100 times, the difference over 1,000 (startup
# cancels out). Deterministic for a given build: the steady number to compare two builds by.
#
#   scripts/parse-instructions.sh [STEP ...]     (make bench-parse-instructions)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind missing (apt-get install valgrind)" >&2; exit 1; }
cargo build --release --example parse_cost -q
bin=${CARGO_TARGET_DIR:-target}/release/examples/parse_cost

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(request request-64k request-floor answer answer-floor stream)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
count() {  # count STEP N -> total instructions
    valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.out" "$bin" "$1" "$2" 2>&1 \
        | sed -n 's/.*refs: *//p' | tr -d ,
}
echo "| step | instructions per repetition (callgrind) |"
echo "|---|---:|"
for s in "${steps[@]}"; do
    a=$(count "$s" 100)
    b=$(count "$s" 1100)
    echo "| $s | $(( (b - a) / 1000 )) |"
done
