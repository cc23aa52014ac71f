# Checks of the Rust code beyond its tests (docs/security.md, "Memory and concurrency checks").
#
#   make test-loom   loom model checks of the lock-free endpoint counters (stable; in CI)
#   make test-miri   Miri on the C ABI tests and the state unit tests: undefined behaviour,
#                    Stacked Borrows, data races (in CI when a nightly toolchain can be
#                    installed; skipped with a notice otherwise)
#   make miri        every library unit test under Miri as well (~15 min, not in CI)

LOOM_TARGET_DIR := target/loom
MIRI_ENV := MIRIFLAGS="-Zmiri-disable-isolation"

.PHONY: test-loom test-miri miri-ffi miri-state-and-swaps miri

## test-loom: loom explores every interleaving of concurrent endpoint counter updates
test-loom:
	RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=$(LOOM_TARGET_DIR) $(CARGO) test --release -p llmproxy-loom --test state

## test-miri: the C ABI tests (threads included) and state unit tests interpreted by Miri, two
## Miri processes at a time (Miri interprets on one core)
test-miri:
	@mkdir -p $(BUILD_DIR)
	@if scripts/miri-toolchain.sh; then \
	  $(MIRI_ENV) $(CARGO) +nightly miri test -p llmproxy --test ffi --lib --no-run && \
	  $(MAKE) --no-print-directory -j2 --output-sync=target miri-ffi miri-state-and-swaps; \
	else echo "SKIPPED test-miri: no Miri on this machine (see above)"; fi

# test-miri's halves ('+': cargo gets make's jobserver, which MAKEFLAGS names). The C ABI
# tests but the endpoint swaps, one seed:
miri-ffi:
	+$(MIRI_ENV) $(CARGO) +nightly miri test -p llmproxy --test ffi -- --skip endpoint_swaps

# The state unit tests, then the endpoint swaps under three seeds (three thread schedules):
miri-state-and-swaps:
	+$(MIRI_ENV) $(CARGO) +nightly miri test -p llmproxy --lib -- state::
	+MIRIFLAGS="-Zmiri-disable-isolation -Zmiri-many-seeds=0..3" \
	  $(CARGO) +nightly miri test -p llmproxy --test ffi -- endpoint_swaps

## miri: every library unit test (but the network-bound sync ones) under Miri (not in CI)
miri:
	@mkdir -p $(BUILD_DIR)
	@scripts/miri-toolchain.sh
	$(MIRI_ENV) PROPTEST_CASES=8 $(CARGO) +nightly miri test -p llmproxy --lib -- --skip sync::
	$(MIRI_ENV) $(CARGO) +nightly miri test -p llmproxy --test ffi

TEST_TARGETS += test-loom test-miri
