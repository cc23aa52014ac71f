# Soak, fault injection and abuse of the Envoy module (and nginx reloads) — docs/soak.md.
#
#   make soak        everything, long: 1M requests through Envoy + faults + abuse (minutes, not in CI)
#   make test-soak   the same scenarios with small counts (pytest, < 2 minutes)

SOAK_ENV  := LLMPROXY_BUILD_DIR=$(abspath $(BUILD_DIR)) LLMPROXY_ENVOY=$(abspath $(VENV))/bin/envoy
SOAK_ARGS ?=

.PHONY: soak soak-deps test-soak

# wrk (Debian) for the steady soak; the simulator and metadata-center binaries.
soak-deps: venv envoy-module nginx-deps
	@command -v wrk >/dev/null 2>&1 || scripts/apt-install.sh wrk
	@test -x $(RELEASE)/llmproxy-sim -a -x $(RELEASE)/llmproxy-metadata-center || \
	  $(CARGO) build --release -p llmproxy-sim -p llmproxy-metadata-center

## soak: 1M requests through Envoy + module, faults under load, abuse; results in build/soak.json
soak: soak-deps
	$(SOAK_ENV) $(VENV_PY) tests/soak/soak.py --json $(BUILD_DIR)/soak.json $(SOAK_ARGS)

## test-soak: the scenarios of `make soak`, shortened (CI)
test-soak: soak-deps
	$(SOAK_ENV) timeout 240 $(VENV_PY) -m pytest -q -p no:cacheprovider tests/soak

TEST_TARGETS += test-soak
