# Envoy host: the C++ shim as an Envoy dynamic module, its tests, Bazel build and benchmark.
#
#   make envoy-module   build/libllmproxy_envoy.so (cpp_shim + build/libllmproxy.a)
#   make test-envoy     fake-host unit tests of the shim + real Envoy end-to-end tests (pytest)
#   make test-bazel     Bazel (Debian bazel-bootstrap, offline) build of the module + cc_test
#   make bench-envoy    overhead benchmark: Envoy + module vs Envoy round robin (not in CI)

CXX           ?= g++
ENVOY_MODULE  := $(BUILD_DIR)/libllmproxy_envoy.so
# The shim is every .cc of cpp_shim/ (layout in docs/envoy.md); each object depends on every header.
ENVOY_SHIM_SRCS := $(sort $(wildcard cpp_shim/*.cc))
ENVOY_SHIM_HDRS := $(wildcard cpp_shim/*.h) include/llmproxy.h
ENVOY_SHIM_OBJS := $(patsubst cpp_shim/%.cc,$(BUILD_DIR)/envoy_shim/%.o,$(ENVOY_SHIM_SRCS))
ENVOY_CXXFLAGS  := -std=c++17 -O2 -g -fPIC -fvisibility=hidden -fvisibility-inlines-hidden \
                   -Wall -Wextra -Werror -Iinclude -Icpp_shim
# What a Rust staticlib needs from the system (rustc --print native-static-libs).
ENVOY_RUST_LIBS := -lpthread -ldl -lm -lrt -lutil
ENVOY_FAKE_HOST := $(BUILD_DIR)/envoy_fake_host
ENVOY_TEST_ENV  := LLMPROXY_BUILD_DIR=$(abspath $(BUILD_DIR)) LLMPROXY_ENVOY=$(abspath $(VENV))/bin/envoy

.PHONY: envoy-module test-envoy test-envoy-fake-host test-envoy-e2e test-bazel bench-envoy

## envoy-module: the Envoy dynamic module (exports only the hook symbols)
envoy-module: build-lib
	@$(MAKE) --no-print-directory $(ENVOY_MODULE)

$(BUILD_DIR)/envoy_shim/%.o: cpp_shim/%.cc $(ENVOY_SHIM_HDRS)
	@mkdir -p $(dir $@)
	$(CXX) $(ENVOY_CXXFLAGS) -c $< -o $@

# Statically links libstdc++/libgcc so the module only needs libc on the Envoy host; the version
# script hides everything but envoy_dynamic_module_on_*; debug info is stripped.
$(ENVOY_MODULE): $(ENVOY_SHIM_OBJS) $(BUILD_DIR)/libllmproxy.a cpp_shim/exports.map
	$(CXX) -shared -o $@ $(ENVOY_SHIM_OBJS) $(BUILD_DIR)/libllmproxy.a \
	  -static-libstdc++ -static-libgcc -Wl,--version-script=cpp_shim/exports.map -Wl,--gc-sections \
	  -Wl,-z,relro -Wl,-S $(ENVOY_RUST_LIBS)
	@n=$$(nm -D --defined-only $@ | grep -vc ' envoy_dynamic_module_on_'); \
	  if [ "$$n" != "0" ]; then echo "$@ exports symbols other than the hooks:"; nm -D --defined-only $@ | grep -v ' envoy_dynamic_module_on_'; exit 1; fi

# Fake Envoy host (tests/envoy/fake_host): the shim object + real library, with ASan/UBSan/LSan
# (Debian's clang++ when `make sanitizer-deps` installed its runtimes, else g++), and
# --wrap=llmproxy_pick_async so tests can drive the PENDING path (--wrap=llmproxy_router_pick_deadline_ms
# sets the shim's deadline for it; --wrap=llmproxy_request_finish_outcome shows what the shim reports).
ENVOY_SAN := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
ENVOY_SAN_CXX = $(shell scripts/sanitizer-cc.sh c++)
ENVOY_FAKE_HOST_WRAPS := -Wl,--wrap=llmproxy_pick_async -Wl,--wrap=llmproxy_request_finish_outcome \
                         -Wl,--wrap=llmproxy_router_pick_deadline_ms
$(ENVOY_FAKE_HOST): tests/envoy/fake_host/fake_host.cc $(ENVOY_SHIM_SRCS) $(ENVOY_SHIM_HDRS) $(BUILD_DIR)/libllmproxy.a \
                   scripts/sanitizer-cc.sh
	$(ENVOY_SAN_CXX) -std=c++17 -O1 -g $(ENVOY_SAN) -Wall -Wextra -Werror -Iinclude -Icpp_shim \
	  tests/envoy/fake_host/fake_host.cc $(ENVOY_SHIM_SRCS) $(BUILD_DIR)/libllmproxy.a \
	  $(ENVOY_FAKE_HOST_WRAPS) $(ENVOY_RUST_LIBS) -o $@

# Test-only variant of the module whose picks are all PENDING (tests/envoy/pending_wrap.cc), so
# the e2e tests drive the Envoy scheduler path (and the shim's pick deadline) in a real Envoy.
ENVOY_PENDING_MODULE := $(BUILD_DIR)/test-pending/libllmproxy_envoy.so
$(ENVOY_PENDING_MODULE): $(ENVOY_SHIM_OBJS) tests/envoy/pending_wrap.cc $(BUILD_DIR)/libllmproxy.a cpp_shim/exports.map
	@mkdir -p $(dir $@)
	$(CXX) $(ENVOY_CXXFLAGS) -shared -o $@ $(ENVOY_SHIM_OBJS) tests/envoy/pending_wrap.cc \
	  $(BUILD_DIR)/libllmproxy.a -Wl,--wrap=llmproxy_pick_async -Wl,--wrap=llmproxy_router_pick_deadline_ms \
	  -static-libstdc++ -static-libgcc \
	  -Wl,--version-script=cpp_shim/exports.map -Wl,--gc-sections $(ENVOY_RUST_LIBS)

test-envoy-fake-host: build-lib sanitizer-deps
	@$(MAKE) --no-print-directory $(ENVOY_FAKE_HOST)
	ASAN_OPTIONS=detect_leaks=1 $(ENVOY_FAKE_HOST)

# PyYAML reads the Istio EnvoyFilter example for `envoy --mode validate`.
$(VENV)/.envoy-test-deps: $(VENV)/.installed
	$(VENV_PY) -m pip install -q --disable-pip-version-check pyyaml
	@touch $@

test-envoy-e2e: venv envoy-module $(VENV)/.envoy-test-deps
	@$(MAKE) --no-print-directory $(ENVOY_PENDING_MODULE)
	$(ENVOY_TEST_ENV) $(VENV_PY) -m pytest -q -p no:cacheprovider tests/envoy

## test-envoy: shim unit tests in a fake host, then real Envoy end-to-end tests
test-envoy: venv envoy-module
	@$(MAKE) --no-print-directory test-envoy-fake-host test-envoy-e2e

## bench-envoy: overhead of the module vs plain round robin, 1 KiB / 64 KiB bodies (not in CI)
bench-envoy: venv envoy-module
	@command -v wrk >/dev/null 2>&1 || scripts/apt-install.sh wrk
	$(ENVOY_TEST_ENV) $(VENV_PY) tests/envoy/bench_overhead.py

## test-bazel: Debian's bazel-bootstrap, offline: build the module and the static variant, run the
## fake-host cc_tests against both, `envoy --mode validate` with the Bazel-built module, and check
## the static variant defines every hook the module exports, prefixed llmproxy_ (deploy/envoy/bazel).
BAZEL ?= bazel
test-bazel: build-lib venv
	@command -v $(BAZEL) >/dev/null 2>&1 || scripts/apt-install.sh bazel-bootstrap
	@set -e; trap '$(BAZEL) shutdown >/dev/null 2>&1 || true' EXIT; \
	  $(BAZEL) test --noshow_progress //:envoy_shim_fake_host_test //:envoy_shim_static_fake_host_test; \
	  $(BAZEL) build --noshow_progress //:libllmproxy_envoy.so //:llmproxy_envoy_static; \
	  bin=$$($(BAZEL) info bazel-bin 2>/dev/null); \
	  ENVOY_DYNAMIC_MODULES_SEARCH_PATH=$$bin $(VENV)/bin/envoy --mode validate -c examples/envoy.yaml \
	    --disable-hot-restart -l error; \
	  static=$$bin/libllmproxy_envoy_static.lo; [ -f $$static ] || static=$$bin/libllmproxy_envoy_static.a; \
	  scripts/check-static-hooks.sh $$bin/libllmproxy_envoy.so $$static llmproxy_

TEST_TARGETS += test-envoy test-bazel
