# Fuzzing with cargo-fuzz (libFuzzer + AddressSanitizer): scripts/fuzz.sh.
#
#   make fuzz FUZZ_SECONDS=600   every target for the given time (not in CI)

.PHONY: fuzz

## fuzz: run each fuzz target for FUZZ_SECONDS (default 60)
fuzz:
	bash scripts/fuzz.sh
