# Simulated model-server fleet, load generator and routing comparison (llmproxy-sim).
#
#   make sim                  build target/release/llmproxy-sim
#   make test-sim             unit tests (KV cache, scheduler, workloads) + end-to-end smoke:
#                             real `serve`, `proxy` and `compare` processes on 127.0.0.1, with the plot
#                             (in `make test` through test-rust, which builds the workspace once)
#   make sim-compare-demo     a short rr vs least-request comparison on a local fleet (no Envoy)
#   make sim-saturation       round robin's saturation rate for the trace of SIM_LOAD_ARGS (minutes)
#   make bench-routing-peers  fleet + Envoy (plain, llmproxy) + reference proxies + sglang-router
#                             + vllm-router (+ NAME=URL targets in BENCH_TARGETS), table + plot (not in CI)

SIM_BIN        := $(RELEASE)/llmproxy-sim
SIM_PLOT_REQ   := matplotlib==3.10.3
SIM_PEERS_REQ  := sglang-router==0.3.2 vllm-router==0.1.17

.PHONY: sim test-sim sim-plot-deps sim-peer-deps sim-compare-demo sim-saturation bench-routing-peers bench-routing bench-routing-matrix

## sim: build the simulator / load generator
sim:
	$(CARGO) build --release -p llmproxy-sim

# matplotlib renders the TTFT CDF (tools/plot/ttft_cdf.py).
$(VENV)/.sim-plot-deps: $(VENV)/.installed
	$(VENV_PY) -m pip install -q --disable-pip-version-check $(SIM_PLOT_REQ)
	@touch $@
sim-plot-deps: venv $(VENV)/.sim-plot-deps

$(VENV)/.sim-peer-deps: $(VENV)/.installed
	$(VENV_PY) -m pip install -q --disable-pip-version-check $(SIM_PEERS_REQ)
	@touch $@
sim-peer-deps: venv $(VENV)/.sim-peer-deps

## test-sim: simulator unit tests and the end-to-end smoke (seconds)
test-sim: sim sim-plot-deps
	LLMPROXY_SIM_PLOT_PYTHON=$(abspath $(VENV_PY)) $(CARGO) test --release -p llmproxy-sim

## sim-compare-demo: local fleet, round robin vs least request through the reference proxy
sim-compare-demo: sim sim-plot-deps
	SIM_DURATION=$${SIM_DURATION:-30} BENCH_PEERS=0 BENCH_OUT=$(BUILD_DIR)/sim-demo bash scripts/bench_routing.sh

## sim-saturation: the rate at which round robin stops keeping up with the trace (SIM_LOAD_ARGS,
## e.g. "--mix agent=1"; SIM_SAT_ARGS, e.g. "--from 10"), and 75 % / 95 % of it (minutes)
sim-saturation: sim
	BENCH_SATURATION=1 BENCH_PEERS=0 BENCH_OUT=$${BENCH_OUT:-$(BUILD_DIR)/sim-saturation} bash scripts/bench_routing.sh

# Envoy targets of bench-routing-peers (NAME:ALGO, see scripts/bench_envoy_configs.py).
BENCH_ENVOY_TARGETS ?= envoy-rr:envoy_round_robin envoy-least:envoy_least_request llmproxy:inference_lb llmproxy-least:least_request

## bench-routing-peers: Envoy (plain and with llmproxy), reference proxies, sglang-router and
## vllm-router from PyPI, on one simulated fleet (not in CI)
bench-routing-peers: sim sim-plot-deps sim-peer-deps envoy-module
	BENCH_ENVOY_TARGETS="$(BENCH_ENVOY_TARGETS)" bash scripts/bench_routing.sh $(BENCH_TARGETS)

## bench-routing: every policy on the same fleet and trace in one run (not in CI, ~13 min):
## plain Envoy round robin, Envoy + llmproxy (inference_lb, prefix_cost), nginx + llmproxy
## (prefix_cost; 1 worker, 4 workers with per-worker state, 4 workers with the shared state),
## sglang-router and vllm-router from PyPI (BENCH_PEERS=0: without them).
## Output: build/bench-routing/{results.md,results.json,ttft_cdf.png}.
BENCH_ROUTING_ENVOY ?= envoy-round-robin:envoy_round_robin llmproxy-inference_lb:inference_lb llmproxy-prefix_cost:prefix_cost
# nginx targets (NAME:WORKERS:shared|local[:ALGO[:K=V,...]], replicas=N included; see
# scripts/bench_nginx_configs.py); empty: none.
BENCH_ROUTING_NGINX ?= nginx-1w:1:shared nginx-4w-local:4:local nginx-4w-shared:4:shared
bench-routing: sim sim-plot-deps envoy-module $(if $(BENCH_ROUTING_NGINX),nginx-deps) $(if $(filter 0,$(BENCH_PEERS)),,sim-peer-deps)
	BENCH_REFS=$${BENCH_REFS:-0} BENCH_ENVOY_TARGETS="$(BENCH_ROUTING_ENVOY)" \
	  BENCH_NGINX_TARGETS="$(BENCH_ROUTING_NGINX)" bash scripts/bench_routing.sh $(BENCH_TARGETS)

## bench-routing-matrix: issue #19's matrix (not in CI, ~70 min): chat+RAG, agent and burst
## traces at ~75 % and ~95 % of round robin's saturation, seeds 1 and 2; Envoy + llmproxy
## (prefix_cost, as shipped) against sglang-router cache_aware in every run; one table with the
## ratios to the best peer in build/bench-matrix/matrix.md (scripts/bench_routing_matrix.sh).
bench-routing-matrix: sim sim-plot-deps envoy-module sim-peer-deps
	bash scripts/bench_routing_matrix.sh
