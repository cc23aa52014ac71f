#!/usr/bin/env bash
# Routing-quality benchmark on a simulated fleet (llmproxy-sim): the same seeded trace through
# every target, the fleet reset between runs; one table (stdout, results.md), results.json and a
# TTFT CDF plot (ttft_cdf.png) in $BENCH_OUT.
#
#   scripts/bench_routing.sh [NAME=URL ...]
#
# Targets, in this order:
#   NAME=URL arguments     already running routers pointed at the fleet (e.g. Envoy + llmproxy);
#                          start them with BENCH_PRE_CMD if they must come after the fleet
#   BENCH_ENVOY_TARGETS    "NAME:ALGO ...": Envoy instances started here (scripts/bench_envoy_configs.py),
#                          ALGO = envoy_round_robin | envoy_least_request (plain Envoy) or an llmproxy
#                          algorithm run by the module (inference_lb, least_request, round_robin, random);
#                          K=V parameters after a third colon; `replicas=N`: N gateway replicas splitting
#                          the trace, sharing state through a metadata-center started here ($MC
#                          [target/release/llmproxy-metadata-center]); with `store=redis` one
#                          metadata-center per replica over one redis-server started here; with
#                          `shared=false` replicas that share nothing;
#                          needs $ENVOY [.venv/bin/envoy] and $LLMPROXY_BUILD_DIR/libllmproxy_envoy.so
#   BENCH_BASELINE_ENVOY_TARGETS  the same for Envoy instances that load the module of another build,
#                          $BENCH_BASELINE_BUILD_DIR/libllmproxy_envoy.so (e.g. the commit before a change,
#                          built in a git worktree): a before/after comparison in one run
#   BENCH_NGINX_TARGETS    "NAME:WORKERS:MODE[:ALGO] ...": nginx + llmproxy started here, examples/nginx.conf
#                          rendered by scripts/bench_nginx_configs.py; MODE = shared (one routing state for
#                          all workers, as shipped) | local (shared_state = false: per-worker state);
#                          ALGO [prefix_cost]; e.g. "nginx-1w:1:shared nginx-4w-local:4:local nginx-4w-shared:4:shared";
#                          K=V after a fourth colon as for Envoy, `replicas=N` and `store=redis` included
#                          (e.g. "ngx-2gw:2:shared:prefix_cost:replicas=2").
#                          Every request comes on its own connection (keepalive_timeout 0) so that
#                          reuseport spreads them over the workers; results.md gets a per-worker table
#                          from the access logs. Needs $NGINX [nginx] with the Lua module (make nginx-deps)
#                          and $LLMPROXY_BUILD_DIR/libllmproxy.so
#   rr, least              llmproxy-sim's reference proxy (round robin, least request)
#   sglang-rr, sglang-cache_aware, vllm-consistent_hash, vllm-cache_aware
#                          peer routers from PyPI (.venv), when BENCH_PEERS=1 (default)
#
# Environment (defaults in brackets):
#   SIM_SERVERS [4]  SIM_BASE_PORT [18000]  SIM_SERVE_ARGS []     the fleet: ports BASE..BASE+N-1
#   SIM_DURATION [60]  SIM_RATE [simulator default]  SIM_LOAD_ARGS []  the trace (see docs/simulator.md)
#   BENCH_PORT_BASE [18200]  ports for the proxies and peer routers started here
#   BENCH_SGLANG_POLICIES ["round_robin cache_aware"]  BENCH_VLLM_POLICIES ["consistent_hash cache_aware"]
#                    the peer policies run when BENCH_PEERS=1 (empty: none of that router)
#   BENCH_PEER_REPLICAS [1]  routers per peer policy, a list (e.g. "1 2": each policy once alone and
#                    once as NAME-x2, each router with its own state and the trace split over them:
#                    what peers lose without shared state)
#   BENCH_PEERS [1]  BENCH_REFS [1] (rr, least)  BENCH_OUT [build/bench-routing]  BENCH_PRE_CMD []
#   PY [.venv/bin/python]  LLMPROXY_BUILD_DIR [build]  the library and the Envoy module
#   BENCH_CALIBRATE=1   instead: round robin at SIM_CAL_RATES ["3 4 5 6 7 8"], prints utilisation
#   BENCH_SATURATION=1  instead: `llmproxy-sim saturation` through round robin (the reference proxy):
#                       the rate where its queue grows, and 75 % / 95 % of it, for the trace of
#                       SIM_LOAD_ARGS; SIM_SAT_ARGS [--from 4] more options; $OUT/saturation.json
#   BENCH_SATURATION=targets  instead: the same search through every target of the run in turn
#                       (Envoy, nginx, rr/least with BENCH_REFS=1, the peers): the rate each keeps
#                       up with, one after the other on the same fleet (reset before each probe;
#                       the routers' own state is not); $OUT/saturation-NAME.json each, a table in
#                       $OUT/saturation.md. Targets of several replicas are left out.
set -euo pipefail
cd "$(dirname "$0")/.."

SIM=${SIM:-target/release/llmproxy-sim}
PY=${PY:-.venv/bin/python}
SERVERS=${SIM_SERVERS:-4}
BASE=${SIM_BASE_PORT:-18000}
PBASE=${BENCH_PORT_BASE:-18200}
OUT=${BENCH_OUT:-build/bench-routing}
DURATION=${SIM_DURATION:-60}
PEERS=${BENCH_PEERS:-1}
BUILD=$(realpath "${LLMPROXY_BUILD_DIR:-build}")
read -r -a SERVE_ARGS <<< "${SIM_SERVE_ARGS:-}"
read -r -a LOAD_ARGS <<< "${SIM_LOAD_ARGS:-}"
RATE_ARGS=()
[ -n "${SIM_RATE:-}" ] && RATE_ARGS=(--rate "$SIM_RATE")

[ -x "$SIM" ] || { echo "missing $SIM: run 'make sim'" >&2; exit 1; }
mkdir -p "$OUT/logs"

PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CMD...: in its own process group (so the whole tree is stopped), output to a log.
start() {
  local name=$1; shift
  setsid "$@" > "$OUT/logs/$name.log" 2>&1 &
  PIDS+=($!)
}

# ready NAME URL: a real chat completion through URL answers 200 (routers register workers
# asynchronously), at most 90 s.
ready() {
  local name=$1 url=$2 i
  for i in $(seq 1 450); do
    if curl -s -o /dev/null -m 5 -w '%{http_code}' -H 'content-type: application/json' \
         -d '{"model":"sim-llama-3-8b","messages":[{"role":"user","content":"ping"}],"max_tokens":1}' \
         "$url/v1/chat/completions" | grep -q '^200$'; then
      return 0
    fi
    sleep 0.2
  done
  echo "$name ($url) not ready after 90 s; log: $OUT/logs/$name.log" >&2
  tail -n 20 "$OUT/logs/$name.log" >&2 || true
  exit 1
}

# start_metadata_centers NAME DIR: the metadata-center(s) a target's gateway replicas share, one
# per port listed in DIR/NAME.mc; with DIR/NAME.store saying `redis`, over one redis-server
# started here (its port: the first metadata-center's + 5).
start_metadata_centers() {
  local name=$1 dir=$2 store_args=() rport r mc_port i
  MC=${MC:-target/release/llmproxy-metadata-center}
  [ -x "$MC" ] || { echo "missing $MC: run 'make build'" >&2; exit 1; }
  if [ "$(cat "$dir/$name.store")" = redis ]; then  # one Redis shared by their replicas
    command -v redis-server >/dev/null || { echo "store=redis needs redis-server (apt-get install redis-server)" >&2; exit 1; }
    rport=$(( $(head -n 1 "$dir/$name.mc") + 5 ))
    mkdir -p "$OUT/redis-$name"
    start "$name-redis" redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no \
      --dir "$(realpath "$OUT/redis-$name")"
    for i in $(seq 1 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
    redis-cli -p "$rport" ping >/dev/null || { echo "$name: redis-server on $rport did not start" >&2; exit 1; }
    store_args=(--store "redis://127.0.0.1:$rport")
  fi
  r=0
  while read -r mc_port; do
    start "$name-mc$r" env POD_IP=127.0.0.1 "$MC" run --host 127.0.0.1 --port "$mc_port" "${store_args[@]}"
    r=$((r + 1))
  done < "$dir/$name.mc"
}

WORKERS=()
for ((i = 0; i < SERVERS; i++)); do WORKERS+=("http://127.0.0.1:$((BASE + i))"); done
start fleet "$SIM" serve --servers "$SERVERS" --base-port "$BASE" "${SERVE_ARGS[@]}"
for w in "${WORKERS[@]}"; do ready fleet "$w"; done
echo "fleet: ${WORKERS[*]}"

if [ -n "${BENCH_PRE_CMD:-}" ]; then
  start pre-cmd bash -c "$BENCH_PRE_CMD"
fi

BACKENDS=$(IFS=,; echo "${WORKERS[*]}")
TARGETS=("$@")
port=$PBASE
ENVOY_TARGETS=()

# start_envoy_targets SPECS MODULE_DIR LISTEN_BASE: the Envoy targets of SPECS ("NAME:ALGO ..."),
# loading the module from MODULE_DIR, listeners from LISTEN_BASE on (admin +100, replicas'
# metadata-centers +200 + 10 i), configs in $OUT/envoy.
ENVOY_STARTED=0
start_envoy_targets() {
  local specs=$1 dir=$2 listen=$3 t name y log
  ENVOY=${ENVOY:-.venv/bin/envoy}
  [ -x "$ENVOY" ] || { echo "missing $ENVOY: run 'make venv'" >&2; exit 1; }
  [ -f "$dir/libllmproxy_envoy.so" ] || { echo "missing $dir/libllmproxy_envoy.so: run 'make envoy-module'" >&2; exit 1; }
  local -a specs_a targets
  read -r -a specs_a <<< "$specs"
  mapfile -t targets < <(python3 scripts/bench_envoy_configs.py "$OUT/envoy" "$BASE" "$SERVERS" \
    "$listen" "${specs_a[@]}")
  [ "${#targets[@]}" = "${#specs_a[@]}" ] || { echo "bench_envoy_configs.py failed" >&2; exit 1; }
  for t in "${targets[@]}"; do
    name=${t%%=*}
    # gateway replicas: their metadata-center(s) first
    if [ -f "$OUT/envoy/$name.mc" ]; then start_metadata_centers "$name" "$OUT/envoy"; fi
    for y in "$OUT/envoy/$name.yaml" "$OUT/envoy/$name".r*.yaml; do
      [ -f "$y" ] || continue
      log=$(basename "$y" .yaml)
      ENVOY_DYNAMIC_MODULES_SEARCH_PATH="$dir" start "$log" "$ENVOY" -c "$y" \
        --concurrency 2 --base-id "$(( ($$ % 1000) * 100 + ENVOY_STARTED ))" -l warning
      ENVOY_STARTED=$((ENVOY_STARTED + 1))
    done
    TARGETS+=("$t")
    ENVOY_TARGETS+=("$t")
  done
}
# Listeners at BENCH_PORT_BASE+50.. (the baseline's at +65..: its metadata-center ports end in 5)
if [ -n "${BENCH_ENVOY_TARGETS:-}" ]; then
  start_envoy_targets "$BENCH_ENVOY_TARGETS" "$BUILD" "$((PBASE + 50))"
fi
if [ -n "${BENCH_BASELINE_ENVOY_TARGETS:-}" ]; then
  [ -n "${BENCH_BASELINE_BUILD_DIR:-}" ] || { echo "BENCH_BASELINE_ENVOY_TARGETS needs BENCH_BASELINE_BUILD_DIR" >&2; exit 1; }
  start_envoy_targets "$BENCH_BASELINE_ENVOY_TARGETS" "$(realpath "$BENCH_BASELINE_BUILD_DIR")" "$((PBASE + 65))"
fi
NGINX_NAMES=() NGINX_TARGETS=()
if [ -n "${BENCH_NGINX_TARGETS:-}" ]; then
  NGINX=${NGINX:-nginx}
  command -v "$NGINX" >/dev/null || { echo "missing $NGINX: run 'make nginx-deps'" >&2; exit 1; }
  read -r -a NGINX_SPECS <<< "$BENCH_NGINX_TARGETS"
  # Listeners at BENCH_PORT_BASE+80..; one nginx prefix per target under $OUT/nginx/NAME/.
  mapfile -t NGINX_TARGETS < <(python3 scripts/bench_nginx_configs.py "$OUT/nginx" "$BASE" "$SERVERS" \
    "$((PBASE + 80))" "$BUILD/libllmproxy.so" "${NGINX_SPECS[@]}")
  [ "${#NGINX_TARGETS[@]}" = "${#NGINX_SPECS[@]}" ] || { echo "bench_nginx_configs.py failed" >&2; exit 1; }
  for t in "${NGINX_TARGETS[@]}"; do
    name=${t%%=*}
    # gateway replicas: their metadata-center(s) first
    if [ -f "$OUT/nginx/$name.mc" ]; then start_metadata_centers "$name" "$OUT/nginx"; fi
    while read -r prefix; do
      # master and workers in the process group start() makes: cleanup stops them all by its id
      start "$(basename "$prefix")" "$NGINX" -p "$prefix/" -c "$prefix/nginx.conf" -g 'daemon off;'
    done < <(python3 scripts/bench_nginx_configs.py --prefixes "$OUT/nginx" "$name")
    TARGETS+=("$t")
    NGINX_NAMES+=("$name")
  done
fi

# nginx_ready PREFIX URL: every worker's router of the nginx at PREFIX is up
# (llmproxy_nginx_workers = worker_processes), 30 s.
nginx_ready() {
  local prefix=$1 url=$2 want i
  want=$(sed -n 's/^worker_processes \([0-9]*\);/\1/p' "$prefix/nginx.conf")
  for i in $(seq 1 150); do
    if curl -s -m 5 "$url/llmproxy/metrics" | grep -Eq "^llmproxy_nginx_workers(\{\})? $want\$"; then
      return 0
    fi
    sleep 0.2
  done
  echo "$prefix: not $want workers after 30 s; log: $prefix/build/nginx/error.log" >&2
  tail -n 20 "$prefix/build/nginx/error.log" >&2 || true
  exit 1
}

# nginx_each TARGET: "PREFIX URL" per gateway of an nginx target NAME=URL[,URL...], in order.
nginx_each() {
  local t=$1 urls
  IFS=, read -r -a urls <<< "${t#*=}"
  python3 scripts/bench_nginx_configs.py --prefixes "$OUT/nginx" "${t%%=*}" | paste -d' ' - <(printf '%s\n' "${urls[@]}")
}

add_proxy() {  # add_proxy NAME POLICY
  start "$1" "$SIM" proxy --listen "127.0.0.1:$port" --policy "$2" --backend "$BACKENDS"
  TARGETS+=("$1=http://127.0.0.1:$port")
  port=$((port + 1))
}

if [ "${BENCH_CALIBRATE:-0}" = 1 ]; then
  add_proxy rr round-robin
  ready rr "${TARGETS[-1]#*=}"
  for r in ${SIM_CAL_RATES:-3 4 5 6 7 8}; do
    "$SIM" compare --target "rr@$r=${TARGETS[-1]#*=}" --stats-url "${WORKERS[0]}" --duration "$DURATION" \
      --rate "$r" "${LOAD_ARGS[@]}" --out-dir "$OUT/calibrate-$r" --no-plot --quiet | grep '^| rr@'
  done
  exit 0
fi

# saturate URL JSON: `llmproxy-sim saturation` through URL with the trace of SIM_LOAD_ARGS and
# SIM_SAT_ARGS, its probes and rate written to JSON.
saturate() {
  local -a sat_args
  read -r -a sat_args <<< "${SIM_SAT_ARGS:---from 4}"
  "$SIM" saturation --target "$1" --stats-url "${WORKERS[0]}" --duration "$DURATION" \
    "${LOAD_ARGS[@]}" "${sat_args[@]}" --json-out "$2" --quiet
}

if [ "${BENCH_SATURATION:-0}" = 1 ]; then
  add_proxy rr round-robin
  ready rr "${TARGETS[-1]#*=}"
  saturate "${TARGETS[-1]#*=}" "$OUT/saturation.json"
  exit 0
fi

if [ "${BENCH_REFS:-1}" = 1 ]; then
  add_proxy rr round-robin
  add_proxy least least-request
fi

if [ "$PEERS" = 1 ]; then
  if ! "$PY" -c 'import sglang_router, vllm_router' 2>/dev/null; then
    echo "sglang-router / vllm-router not installed for $PY: run 'make sim-peer-deps' (or BENCH_PEERS=0)" >&2
    exit 1
  fi
  VBIN=$(dirname "$PY")
  # add_peer NAME REPLICAS CMD...: REPLICAS routers (each with its own state: peers share none),
  # CMD given --port PORT --prometheus-port PORT+100; the trace is split over them
  add_peer() {
    local name=$1 n=$2 urls="" r; shift 2
    [ "$n" -gt 1 ] && name+="-x$n"
    for ((r = 0; r < n; r++)); do
      HF_ENDPOINT=http://127.0.0.1:9 start "$name.r$r" "$@" --host 127.0.0.1 --port "$port" \
        --prometheus-host 127.0.0.1 --prometheus-port "$((port + 100))"
      urls+="${urls:+,}http://127.0.0.1:$port"
      port=$((port + 1))
    done
    TARGETS+=("$name=$urls")
  }
  for n in ${BENCH_PEER_REPLICAS:-1}; do
    for policy in ${BENCH_SGLANG_POLICIES-round_robin cache_aware}; do
      add_peer "sglang-${policy/round_robin/rr}" "$n" "$PY" -m sglang_router.launch_router \
        --policy "$policy" --log-level warn --worker-urls "${WORKERS[@]}"
    done
    for policy in ${BENCH_VLLM_POLICIES-consistent_hash cache_aware}; do
      add_peer "vllm-$policy" "$n" "$VBIN/vllm-router" --policy "$policy" --log-level warning \
        --worker-urls "${WORKERS[@]}"
    done
  done
fi

[ "${#TARGETS[@]}" -gt 0 ] || { echo "no target: pass NAME=URL or keep BENCH_REFS=1" >&2; exit 1; }
ARGS=()
for t in "${TARGETS[@]}"; do
  IFS=, read -r -a urls <<< "${t#*=}"
  for u in "${urls[@]}"; do ready "${t%%=*}" "$u"; done
  ARGS+=(--target "$t")
done
for t in "${NGINX_TARGETS[@]}"; do
  while read -r prefix url; do nginx_ready "$prefix" "$url"; done < <(nginx_each "$t")
done

if [ "${BENCH_SATURATION:-0}" = targets ]; then
  rm -f "$OUT"/saturation-*.json  # an earlier run's would show in this run's table
  for t in "${TARGETS[@]}"; do
    name=${t%%=*}
    if [[ ${t#*=} == *,* ]]; then echo "$name: several replicas, left out of the saturation search" >&2; continue; fi
    echo "== $name"
    saturate "${t#*=}" "$OUT/saturation-$name.json"
  done
  python3 - "$OUT" "${TARGETS[@]%%=*}" > "$OUT/saturation.md" <<'PY'
import json, os, sys
out, names = sys.argv[1], sys.argv[2:]
print("| target | kept up at req/s | saturated at req/s | saturation ≈ req/s |")
print("|---|---:|---:|---:|")
for name in names:
    path = os.path.join(out, "saturation-%s.json" % name)
    if not os.path.exists(path):
        continue
    doc = json.load(open(path))
    ok = [p["rate"] for p in doc["probes"] if not p["saturated"]]
    bad = [p["rate"] for p in doc["probes"] if p["saturated"]]
    fmt = lambda v: "%.2f" % v if v is not None else "-"
    print("| %s | %s | %s | %s |" % (name, fmt(max(ok) if ok else None), fmt(min(bad) if bad else None),
                                   fmt(doc.get("saturation_rate"))))
PY
  cat "$OUT/saturation.md"
  exit 0
fi

"$SIM" compare "${ARGS[@]}" --stats-url "${WORKERS[0]}" --duration "$DURATION" "${RATE_ARGS[@]}" \
  "${LOAD_ARGS[@]}" --out-dir "$OUT" --plot-python "$PY" --title "TTFT per routing policy ($SERVERS simulated servers)"

# the Envoy gateways' own metrics at the end (learned capacities, cache trust, ...), per replica
for t in "${ENVOY_TARGETS[@]}"; do
  i=0 urls=${t#*=}
  for url in ${urls//,/ }; do
    curl -s -m 10 "$url/llmproxy/metrics" > "$OUT/logs/${t%%=*}.$i.metrics" || true
    i=$((i + 1))
  done
done
if [ "${#NGINX_NAMES[@]}" -gt 0 ]; then
  for t in "${NGINX_TARGETS[@]}"; do
    while read -r prefix url; do
      curl -s -m 10 "$url/llmproxy/metrics" > "$OUT/logs/$(basename "$prefix").metrics" || true
    done < <(nginx_each "$t")
  done
  python3 scripts/bench_nginx_configs.py --summary "$OUT/nginx" "${NGINX_NAMES[@]}" | tee -a "$OUT/results.md"
fi

{
  echo
  echo "- command: \`$0 $*\` (SIM_SERVERS=$SERVERS SIM_DURATION=$DURATION BENCH_ENVOY_TARGETS='${BENCH_ENVOY_TARGETS:-}'${BENCH_BASELINE_ENVOY_TARGETS:+ BENCH_BASELINE_ENVOY_TARGETS='$BENCH_BASELINE_ENVOY_TARGETS' BENCH_BASELINE_BUILD_DIR='$BENCH_BASELINE_BUILD_DIR'} BENCH_NGINX_TARGETS='${BENCH_NGINX_TARGETS:-}' SIM_RATE=${SIM_RATE:-default} SIM_SERVE_ARGS='${SIM_SERVE_ARGS:-}' SIM_LOAD_ARGS='${SIM_LOAD_ARGS:-}')"
  echo "- machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(uname -sr); load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
  if [ "${#NGINX_NAMES[@]}" -gt 0 ]; then echo "- nginx: $("$NGINX" -v 2>&1 | sed 's/^nginx version: //')"; fi
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- plot: ttft_cdf.png"
} >> "$OUT/results.md"
echo "results: $OUT/results.md $OUT/results.json $OUT/ttft_cdf.png"
