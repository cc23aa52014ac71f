#!/usr/bin/env bash
# Builds nginx/ (ngx_http_llmproxy_module: nginx/config lists its ngx_http_llmproxy_*.c) as a
# dynamic module against nginx's build tree.
#
#   scripts/build-nginx-module.sh NGINX_SRC BUILD_DIR OUT_SO [CFLAGS]
#
# NGINX_SRC is Debian's /usr/share/nginx/src (nginx-dev) or an nginx source tree of the same
# version as the nginx that loads the module. It is copied to BUILD_DIR (configure writes
# objs/ there) and configured with the packaged nginx's flags (conf_flags, when the tree has
# one) plus --with-compat; `make modules` builds only our module. configure runs again only
# when nginx/config or the tree changed.
set -euo pipefail
src=$1 bld=$2 out=$3 cflags=${4:-}
root=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$src/configure" ] || { echo "$src/configure missing: install nginx-dev (make nginx-dev-deps)" >&2; exit 1; }
[ -f "$root/build/libllmproxy.a" ] || { echo "build/libllmproxy.a missing: run make build" >&2; exit 1; }

stamp="$bld/.configured"
if [ ! -f "$stamp" ] || [ "$root/nginx/config" -nt "$stamp" ] || [ "$src/configure" -nt "$stamp" ]; then
  rm -rf "$bld"
  mkdir -p "$bld"
  cp -a "$src/." "$bld/"
  flags=()
  if [ -f "$bld/conf_flags" ]; then
    # shellcheck disable=SC1091
    . "$bld/conf_flags"          # NGX_CONF_FLAGS=( ... ) of the packaged nginx
    flags=("${NGX_CONF_FLAGS[@]}")
  fi
  case " ${flags[*]} " in *" --with-compat "*) ;; *) flags+=(--with-compat) ;; esac
  (cd "$bld" && ./configure "${flags[@]}" --with-cc-opt="$cflags" \
      --add-dynamic-module="$root/nginx" >configure.log 2>&1) || {
    tail -30 "$bld/configure.log" >&2; exit 1; }
  touch "$stamp"
fi
# the staticlib is an input the nginx makefile does not know about: relink when it changed
if [ -f "$bld/objs/ngx_http_llmproxy_module.so" ] && [ "$root/build/libllmproxy.a" -nt "$bld/objs/ngx_http_llmproxy_module.so" ]; then
  rm -f "$bld/objs/ngx_http_llmproxy_module.so"
fi
make -s -C "$bld" -f objs/Makefile modules
mkdir -p "$(dirname "$out")"
# --remove-destination: a running nginx keeps its mapped copy intact
cp --remove-destination "$bld/objs/ngx_http_llmproxy_module.so" "$out"
echo "built $out"
