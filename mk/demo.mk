# make demo: the README's main job (scripts/demo.sh): a simulated fleet, the metadata-center
# and Envoy with our module, compared with plain Envoy round robin on the same trace.
# DEMO_STORE=redis runs the metadata-center over a redis-server it starts (when installed).

.PHONY: demo

## demo: build everything it needs, run it on 127.0.0.1, stop everything it started
demo: build envoy-module sim sim-plot-deps
	bash scripts/demo.sh
