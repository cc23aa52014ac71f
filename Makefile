# llmproxy — build, test and benchmark entry points.
#
#   make demo    the main job: simulated fleet + metadata-center + Envoy with our module
#   make test    every test (Rust, C ABI under valgrind, real Envoy, real nginx, simulator)
#
# Host-specific targets live in mk/*.mk; each one appends its test target to TEST_TARGETS.

CARGO      ?= cargo
PYTHON     ?= python3
BUILD_DIR  := build
VENV       := .venv
VENV_PY    := $(VENV)/bin/python
RELEASE    := target/release

TEST_TARGETS :=

.PHONY: all build build-lib build-local header verify fmt fmt-check lint vet check test test-rust test-c sanitizer-deps bench clean venv

all: build

## build: every artifact the README names: the libraries, the Envoy module
## (build/libllmproxy_envoy.so) and, when nginx's build tree is installed, the native nginx module
## (build/ngx_http_llmproxy_module.so; without it one line says how to get it, and build goes on)
build: build-lib envoy-module
	@if [ -x $(NGINX_SRC)/configure ]; then \
	  $(MAKE) --no-print-directory nginx-module; \
	else \
	  echo "build: skipped $(NGINX_MOD_SO): no nginx build tree in $(NGINX_SRC) (apt-get install nginx-dev, or make nginx-module)"; \
	fi

## build-lib: release build of the library (staticlib + cdylib) and the workspace, copied to build/
build-lib:
	$(CARGO) build --release --workspace
	@mkdir -p $(BUILD_DIR)
	# --remove-destination: a running host keeps its mapped copy intact (no in-place overwrite)
	cp --remove-destination $(RELEASE)/libllmproxy.a $(RELEASE)/libllmproxy.so $(BUILD_DIR)/

## build-local: debug build, for quick iteration
build-local:
	$(CARGO) build --workspace

## header: regenerate include/llmproxy.h with cbindgen (CI fails when it drifts)
header:
	LLMPROXY_BLESS_HEADER=1 $(CARGO) test --release --test c_header

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

## lint: clippy with warnings denied
lint:
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

## vet: the origin's name for lint (aigw's `make vet`)
vet: lint

## verify: formatting, lints and the header drift check
verify: fmt-check lint
	$(CARGO) test --release --test c_header

## venv: project virtualenv with Envoy and the Python test tools
venv: $(VENV)/.installed
$(VENV)/.installed: tests/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install -q --disable-pip-version-check -r tests/requirements.txt
	@touch $@

## test-rust: every Rust test of the workspace, compiled once: the library, the Metadata-Center
## with its Redis store against real redis-server processes (LLMPROXY_REQUIRE_REDIS=1: fail
## rather than skip without one), the simulator with its TTFT plot
test-rust: build-lib redis-server sim-plot-deps
	LLMPROXY_REQUIRE_REDIS=1 LLMPROXY_SIM_PLOT_PYTHON=$(abspath $(VENV_PY)) \
	  $(CARGO) test --release --workspace

## sanitizer-deps: Debian's clang with its sanitizer runtimes, for the ASan+UBSan+LSan builds of
## the C test and the Envoy fake host (installed when root; without it they build with gcc's)
sanitizer-deps:
	@scripts/sanitizer-cc.sh clang >/dev/null || scripts/apt-install.sh clang libclang-rt-14-dev || \
	  echo "clang unavailable: sanitizer builds use gcc's runtimes"

## test-c: the C test program, -Wall -Wextra -Werror, against the staticlib, under valgrind and
## built with ASan+UBSan+LSan
test-c: build-lib sanitizer-deps
	$(MAKE) -C tests/c run

TEST_TARGETS += test-rust test-c

-include mk/*.mk

## test: the whole suite (what CI runs)
test: build
	@set -e; total=$$(date +%s); times=""; \
	for t in $(TEST_TARGETS); do \
	  echo "==> $$t"; start=$$(date +%s); \
	  $(MAKE) --no-print-directory $$t; \
	  times="$$times $$t=$$(( $$(date +%s) - start ))s"; \
	done; \
	echo "==> every test passed in $$(( $$(date +%s) - total )) s:$$times"

## bench: criterion benchmarks of the hot path and the response transcoder (results go to
## docs/benchmarks.md by hand)
bench:
	$(CARGO) bench --bench pick --bench transcode

clean:
	$(CARGO) clean
	rm -rf $(BUILD_DIR)
