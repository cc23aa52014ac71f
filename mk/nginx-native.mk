# nginx host without Lua: nginx/ngx_http_llmproxy_*.c, a dynamic module that links the
# staticlib, built against Debian's nginx-dev (nginx's build tree in /usr/share/nginx/src, the
# same version and configure flags as the packaged nginx, --with-compat).
#
#   make nginx-module        build/ngx_http_llmproxy_module.so (load_module it into nginx 1.22)
#   make test-nginx-native   the e2e scenarios against both hosts + the module under valgrind
#   make bench-nginx-instructions   instructions per request (callgrind): native vs round robin

NGINX_SRC        ?= /usr/share/nginx/src
NGINX_MOD_BUILD  := target/nginx-module
NGINX_MOD_SO     := $(BUILD_DIR)/ngx_http_llmproxy_module.so
NGINX_MOD_CFLAGS ?= -g -O2 -Wall -Wextra -Wno-unused-parameter -Werror

.PHONY: nginx-dev-deps nginx-module test-nginx-native bench-nginx-instructions

## nginx-dev-deps: Debian's nginx-dev (nginx's headers and configure tree) when missing
nginx-dev-deps:
	@if [ ! -x $(NGINX_SRC)/configure ]; then scripts/apt-install.sh nginx nginx-dev; fi

## nginx-module: build/ngx_http_llmproxy_module.so against $(NGINX_SRC) and build/libllmproxy.a
nginx-module: build-lib nginx-dev-deps
	@scripts/build-nginx-module.sh "$(NGINX_SRC)" "$(NGINX_MOD_BUILD)" "$(NGINX_MOD_SO)" "$(NGINX_MOD_CFLAGS)"

## test-nginx-native: e2e scenarios over the Lua host and the native module, and the module
## under valgrind (nginx with master_process off)
test-nginx-native: nginx-module venv nginx-deps valgrind-deps
	$(NGINX_TEST_ENV) timeout 300 $(VENV_PY) -m pytest -q -p no:cacheprovider tests/nginx/test_native.py

TEST_TARGETS += test-nginx-native

## bench-nginx-instructions: gateway instructions per 1 KiB request under callgrind, native module
## vs plain round robin (repeatable on a noisy machine; not in CI, ~2 min). BENCH_CG_ARGS:
## --size BYTES, --small N, --large N, --keep DIR
bench-nginx-instructions: nginx-module nginx-deps valgrind-deps
	$(NGINX_TEST_ENV) $(PYTHON) tests/nginx/bench/callgrind_nginx.py $(BENCH_CG_ARGS)

## bench-parse-instructions: instructions of the library's parse steps (a 1 KiB request, a JSON
## answer, a 100-chunk stream) beside serde_json's floor for the same documents (callgrind,
## examples/parse_cost.rs; not in CI, ~1 min)
bench-parse-instructions: valgrind-deps
	scripts/parse-instructions.sh

valgrind-deps:
	@command -v valgrind >/dev/null 2>&1 || scripts/apt-install.sh valgrind || true
.PHONY: valgrind-deps bench-parse-instructions
