# nginx / OpenResty host: resty.llmproxy (LuaJIT FFI) on Debian's nginx + libnginx-mod-http-lua.
#
#   make test-nginx    cdef-vs-header check, Lua unit tests and real-nginx end-to-end tests (pytest)
#   make bench-nginx   overhead benchmark: nginx + llmproxy (Lua host and native module) vs nginx
#                      round robin, and the shared routing state vs per-worker state at the same
#                      worker count (gateway CPU per request; not in CI). BENCH_NGINX_ARGS:
#                      --lookups adds llmproxy with remote cache lookups, --no-native,
#                      --latency-connections N (1; 0 = no closed-loop runs), --state-workers N
#                      (2), --state-only, --rounds N

NGINX_APT_PKGS := nginx libnginx-mod-http-lua lua-resty-core
NGINX_TEST_ENV := LLMPROXY_BUILD_DIR=$(abspath $(BUILD_DIR))

.PHONY: nginx-deps test-nginx bench-nginx

## nginx-deps: Debian's nginx with the Lua module (installed with apt when root and missing)
nginx-deps:
	@if ! command -v nginx >/dev/null 2>&1 || [ ! -f /usr/lib/nginx/modules/ngx_http_lua_module.so ] || \
	    [ ! -f /usr/share/lua/5.1/resty/core.lua ]; then \
	  scripts/apt-install.sh $(NGINX_APT_PKGS); \
	fi

## test-nginx: everything under tests/nginx (real nginx, 2 workers, 127.0.0.1 only)
test-nginx: build-lib venv nginx-deps
	$(NGINX_TEST_ENV) timeout 300 $(VENV_PY) -m pytest -q -p no:cacheprovider tests/nginx --ignore=tests/nginx/test_native.py

## bench-nginx: nginx + llmproxy (Lua, native) vs nginx round robin, and shared vs per-worker state
## (2 workers), 1 KiB and 64 KiB bodies, gateway CPU per request (needs wrk)
bench-nginx: build-lib nginx-deps nginx-module
	@command -v wrk >/dev/null 2>&1 || scripts/apt-install.sh wrk
	$(NGINX_TEST_ENV) $(PYTHON) tests/nginx/bench/bench_nginx.py $(BENCH_NGINX_ARGS)

TEST_TARGETS += test-nginx
