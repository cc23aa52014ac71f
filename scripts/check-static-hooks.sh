#!/usr/bin/env bash
# Checks the static (Bazel //:llmproxy_envoy_static) variant of the Envoy shim against the dynamic
# module: for every hook envoy_dynamic_module_on_X the .so exports, the archive defines PREFIX +
# envoy_dynamic_module_on_X, and it defines no unprefixed hook (which would clash in an Envoy
# binary and not be found for `dynamic_module_config: {name: <PREFIX without _>}`).
#
#   scripts/check-static-hooks.sh MODULE.so ARCHIVE PREFIX      (e.g. ... llmproxy_)
set -euo pipefail
[ $# = 3 ] || { echo "usage: $0 MODULE.so ARCHIVE PREFIX" >&2; exit 2; }
so=$1 archive=$2 prefix=$3
hooks=$(nm -D --defined-only "$so" | awk '{print $3}' | grep '^envoy_dynamic_module_on_' | sort)
defined=$(nm --defined-only "$archive" 2>/dev/null | awk '$2 == "T" {print $3}' | sort -u)
[ -n "$hooks" ] || { echo "$so exports no hook" >&2; exit 1; }
bad=0
for h in $hooks; do
  grep -qx "$prefix$h" <<<"$defined" || { echo "missing in $archive: $prefix$h"; bad=1; }
done
if grep '^envoy_dynamic_module_on_' <<<"$defined"; then echo "unprefixed hooks in $archive (above)"; bad=1; fi
[ $bad = 0 ] && echo "static variant defines all $(wc -w <<<"$hooks") hooks as ${prefix}envoy_dynamic_module_on_*"
exit $bad
