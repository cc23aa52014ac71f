# Fuzzing with cargo-fuzz (libFuzzer + AddressSanitizer): scripts/fuzz.sh.
#
#   make fuzz FUZZ_SECONDS=600              every target for the given time (not in CI)
#   make fuzz FUZZ_RUNS=10000000 FUZZ_SECONDS=7200   every target to 10 M executions
#   make test-fuzz                          CI smoke: every target for FUZZ_SMOKE_SECONDS

FUZZ_SMOKE_SECONDS ?= 15

.PHONY: fuzz test-fuzz

## fuzz: run each fuzz target for FUZZ_SECONDS (default 60) / FUZZ_RUNS executions
fuzz:
	bash scripts/fuzz.sh

## test-fuzz: every fuzz target for FUZZ_SMOKE_SECONDS from its seeds (installs cargo-fuzz;
## stable toolchain with RUSTC_BOOTSTRAP when no nightly is installed)
test-fuzz:
	FUZZ_SECONDS=$(FUZZ_SMOKE_SECONDS) FUZZ_RUNS= bash scripts/fuzz.sh

TEST_TARGETS += test-fuzz
