# Metadata-Center server (llmproxy-metadata-center): run it, benchmark it.
#
#   make run-metadata-center     serve on 127.0.0.1:8080 (MC_ARGS="--port 9000 --debug" to change)
#   make bench-metadata-center   requests/s and latency of the API on this machine (not in CI)
#   make compare-metadata-center MC_COMPARE="BIN_A BIN_B"   two (or more) server builds, in rounds
#   make test-redis              the Redis store's tests alone against a real redis-server
#
# Every test of the server, the Redis store's included, runs in `test-rust` (cargo test --release
# --workspace, one build for the whole workspace). The Redis store's tests (tests/redis_*.rs)
# start their own redis-server processes on free 127.0.0.1 ports; under `make test-rust` and
# `make test-redis` (LLMPROXY_REQUIRE_REDIS=1) they fail when redis-server is missing instead
# of skipping.

MC_BIN        := $(RELEASE)/llmproxy-metadata-center
MC_ARGS       ?=
MC_BENCH_SECS ?= 5
MC_BENCH_CONC ?= 16
MC_BENCH_STORES ?= memory redis

MC_REDIS_TESTS := --test redis_store --test redis_cluster --test redis_replicas

.PHONY: metadata-center run-metadata-center bench-metadata-center compare-metadata-center redis-server test-redis

## metadata-center: release build of the server binary
metadata-center:
	$(CARGO) build --release -p llmproxy-metadata-center --bin llmproxy-metadata-center

run-metadata-center: metadata-center
	$(MC_BIN) run $(MC_ARGS)

## bench-metadata-center: the API's calls/s and latency with the in-memory store, then with the
## Redis store (1 and 2 replicas over one redis-server on a free 127.0.0.1 port), same run
## (MC_BENCH_REDIS_CPU=N: redis-server alone on CPU N, the rest on the other CPUs)
bench-metadata-center: metadata-center
	$(CARGO) build --release -p llmproxy-metadata-center --example mc_bench
	scripts/bench-metadata-center.sh $(MC_BIN) $(RELEASE)/examples/mc_bench $(MC_BENCH_SECS) $(MC_BENCH_CONC) "$(MC_BENCH_STORES)"

## compare-metadata-center: server builds MC_COMPARE="BIN_A BIN_B ..." (e.g. one built from an
## older commit in a worktree) side by side on the in-memory and Redis stores, MC_COMPARE_ROUNDS
## rounds in rotating order: calls/s and CPU per call, medians (not in CI)
MC_COMPARE_ROUNDS ?= 4
compare-metadata-center: redis-server
	$(CARGO) build --release -p llmproxy-metadata-center --example mc_bench
	scripts/compare-metadata-center.sh $(RELEASE)/examples/mc_bench $(MC_COMPARE_ROUNDS) $(MC_COMPARE)

## redis-server: Debian's redis-server (and redis-cli), installed when root and missing
redis-server:
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null || \
	  scripts/apt-install.sh redis-server || \
	  { echo "redis-server is required by the Redis store's tests: apt-get install redis-server" >&2; exit 1; }

## test-redis: the Redis store against real Redis alone: data model, a 3-master Redis Cluster with
## failover, two metadata-center replicas over one Redis (in `make test` through test-rust)
test-redis: redis-server
	LLMPROXY_REQUIRE_REDIS=1 $(CARGO) test --release -p llmproxy-metadata-center $(MC_REDIS_TESTS)
