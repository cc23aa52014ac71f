#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for FUZZ_SECONDS each with libFuzzer + ASan via
# cargo-fuzz, starting from the committed seeds (fuzz/seeds/<target>) and the corpus kept in
# fuzz/corpus/<target>. Prints one line per target: executions, coverage, findings.
#
#   scripts/fuzz.sh [TARGET ...]          FUZZ_SECONDS [60]  FUZZ_RUNS [unlimited]
#
# FUZZ_RUNS stops a target after that many executions (whichever of time or runs comes first),
# e.g. FUZZ_RUNS=10000000 FUZZ_SECONDS=7200 for the issue's 10 M executions per target.
# FUZZ_ARGS adds libFuzzer flags (e.g. FUZZ_ARGS=-max_len=256 keeps call sequences short).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${FUZZ_SECONDS:-60}
RUNS_ARG=()
[ -z "${FUZZ_RUNS:-}" ] || RUNS_ARG=(-runs="$FUZZ_RUNS")
read -r -a RUNS_ARG_EXTRA <<<"${FUZZ_ARGS:-}"
RUNS_ARG+=("${RUNS_ARG_EXTRA[@]}")
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(config pick transcode abi_sequence metadata_center response usage_strip)

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "== installing cargo-fuzz (crates.io)"
  cargo install cargo-fuzz --locked -q
fi
# cargo-fuzz needs nightly flags: the nightly toolchain when installed, else stable with
# RUSTC_BOOTSTRAP (the sanitizer runtimes ship with the stable standard library too).
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  FUZZ=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  FUZZ=(cargo fuzz)
fi

mkdir -p build/fuzz
echo "== building fuzz targets (${FUZZ[*]}, libFuzzer + AddressSanitizer)"
"${FUZZ[@]}" build --release >build/fuzz/build.log 2>&1 ||
  { tail -n 40 build/fuzz/build.log; echo "fuzz targets failed to build (build/fuzz/build.log)"; exit 1; }

status=0
for t in "${TARGETS[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  log="build/fuzz/$t.log"
  if "${FUZZ[@]}" run --release "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
       -max_total_time="$SECONDS_EACH" -rss_limit_mb=4096 -timeout=10 -print_final_stats=1 "${RUNS_ARG[@]}" \
       > "$log" 2>&1; then
    result="ok"
  else
    result="FINDING (see $log and fuzz/artifacts/$t)"
    status=1
    grep -A 30 -m1 -E '^==[0-9]+==|panicked|ERROR: libFuzzer' "$log" || tail -n 30 "$log"
  fi
  execs=$(grep -m1 -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n1 | grep -o '[0-9]*' || echo "?")
  printf 'fuzz %-13s %4ss  %12s execs  cov %6s  %s\n' "$t" "$SECONDS_EACH" "$execs" "$cov" "$result"
done
exit $status
