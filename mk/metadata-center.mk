# Metadata-Center server (llmproxy-metadata-center): run it, benchmark it.
#
#   make run-metadata-center     serve on 127.0.0.1:8080 (MC_ARGS="--port 9000 --debug" to change)
#   make bench-metadata-center   requests/s and latency of the API on this machine (not in CI)
#
# Its tests (unit tests and the HTTP wire tests against the real binary) run in `test-rust`
# (cargo test --release --workspace), so there is no separate test target.

MC_BIN        := $(RELEASE)/llmproxy-metadata-center
MC_ARGS       ?=
MC_BENCH_SECS ?= 5
MC_BENCH_CONC ?= 16

.PHONY: metadata-center run-metadata-center bench-metadata-center

## metadata-center: release build of the server binary
metadata-center:
	$(CARGO) build --release -p llmproxy-metadata-center --bin llmproxy-metadata-center

run-metadata-center: metadata-center
	$(MC_BIN) run $(MC_ARGS)

## bench-metadata-center: start the server on a free 127.0.0.1 port, run the load loop, stop it
bench-metadata-center: metadata-center
	$(CARGO) build --release -p llmproxy-metadata-center --example mc_bench
	@set -e; out=$$(mktemp); \
	$(MC_BIN) run --host 127.0.0.1 --port 0 >$$out 2>/dev/null & pid=$$!; \
	trap 'kill $$pid 2>/dev/null; rm -f $$out' EXIT INT TERM; \
	for i in $$(seq 50); do grep -q 'listening on' $$out && break; sleep 0.1; done; \
	addr=$$(sed -n 's/^listening on //p' $$out); test -n "$$addr"; \
	$(RELEASE)/examples/mc_bench http://$$addr $(MC_BENCH_SECS) $(MC_BENCH_CONC); \
	echo "server RSS after the run: $$(ps -o rss= -p $$pid) KiB, threads: $$(ps -o nlwp= -p $$pid)"; \
	echo "the same work without HTTP (one thread):"; \
	$(RELEASE)/examples/mc_bench --in-process
