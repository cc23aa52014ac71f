#!/usr/bin/env bash
# make demo: the main job, on 127.0.0.1 only, stopping everything it started.
#
#   metadata-center  ─┐
#   simulated fleet  ─┼─ Envoy 1.40, one listener per policy on the same fleet:
#   (llmproxy-sim)    │    llmproxy-<algorithm>   dynamic module (metadata-center on), one per
#                     │                           algorithm in DEMO_ALGORITHMS
#                     │    envoy-round-robin      plain Envoy ROUND_ROBIN
#                     └─ llmproxy-sim compare: the same seeded trace through each, side by side
#
# Output: a table on stdout; build/demo/{results.md,results.json,ttft_cdf.png,envoy.yaml,logs/}.
# Environment: DEMO_DURATION [40] seconds of load per policy, DEMO_SERVERS [4], DEMO_RATE
# [simulator default, ~75-80 % fleet utilisation under round robin], DEMO_OUT [build/demo],
# DEMO_ALGORITHMS ["prefix_cost inference_lb": the default and the origin's formula], DEMO_STORE [memory]: `redis` starts a
# redis-server on a free 127.0.0.1 port and runs the metadata-center with `--store redis://…`.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${DEMO_OUT:-build/demo}
DURATION=${DEMO_DURATION:-40}
SERVERS=${DEMO_SERVERS:-4}
SIM=target/release/llmproxy-sim
MC=target/release/llmproxy-metadata-center
ENVOY=.venv/bin/envoy
PY=.venv/bin/python
MODEL=sim-llama-3-8b
read -r -a ALGORITHMS <<< "${DEMO_ALGORITHMS:-prefix_cost inference_lb}"
RATE_ARGS=()
[ -n "${DEMO_RATE:-}" ] && RATE_ARGS=(--rate "$DEMO_RATE")

STORE=${DEMO_STORE:-memory}
case $STORE in
  memory) ;;
  redis)
    command -v redis-server >/dev/null || {
      echo "demo: DEMO_STORE=redis needs redis-server: apt-get install redis-server (or scripts/apt-install.sh redis-server as root)" >&2
      exit 1
    } ;;
  *) echo "demo: DEMO_STORE=$STORE: expected memory or redis" >&2; exit 2 ;;
esac

for f in "$SIM" "$MC" "$ENVOY" build/libllmproxy_envoy.so; do
  [ -e "$f" ] || { echo "demo: missing $f (run 'make demo', which builds everything)" >&2; exit 1; }
done
rm -rf "$OUT"
mkdir -p "$OUT/logs"

PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start() {  # start NAME CMD...: own process group, output to logs/NAME.log
  local name=$1; shift
  setsid "$@" > "$OUT/logs/$name.log" 2>&1 &
  PIDS+=($!)
}

# free_ports N: a base port with N consecutive free ports on 127.0.0.1.
free_ports() {
  "$PY" - "$1" <<'EOF'
import random, socket, sys
n = int(sys.argv[1])
for _ in range(200):
    base = random.randint(20000, 40000)
    socks = []
    try:
        for p in range(base, base + n):
            s = socket.socket(); s.bind(("127.0.0.1", p)); socks.append(s)
        print(base); break
    except OSError:
        pass
    finally:
        for s in socks: s.close()
else:
    sys.exit("no free port range")
EOF
}

# ready NAME URL: a real chat completion through URL answers 200, at most 60 s.
ready() {
  "$PY" - "$1" "$2" "$MODEL" "$OUT/logs/$1.log" <<'EOF'
import json, sys, time, urllib.request
name, url, model, log = sys.argv[1:]
body = json.dumps({"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]}).encode()
deadline = time.time() + 60
while time.time() < deadline:
    try:
        req = urllib.request.Request(url + "/v1/chat/completions", body, {"content-type": "application/json"})
        if urllib.request.urlopen(req, timeout=5).status == 200:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.2)
print(f"{name} ({url}) not ready after 60 s; see {log}", file=sys.stderr)
sys.exit(1)
EOF
}

NALG=${#ALGORITHMS[@]}
PORTS=$(free_ports $((SERVERS + 4 + NALG)))
FLEET_BASE=$PORTS
MC_PORT=$((PORTS + SERVERS))
RR_PORT=$((PORTS + SERVERS + 1))
ADMIN_PORT=$((PORTS + SERVERS + 2))
REDIS_PORT=$((PORTS + SERVERS + 3))
LLM_BASE=$((PORTS + SERVERS + 4))   # one listener per algorithm

MC_STORE=()
if [ "$STORE" = redis ]; then
  echo "== starting redis-server on 127.0.0.1:$REDIS_PORT"
  mkdir -p "$OUT/redis"
  start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$OUT/redis"
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  MC_STORE=(--store "redis://127.0.0.1:$REDIS_PORT")
fi
echo "== starting metadata-center on 127.0.0.1:$MC_PORT (store: $STORE)"
start metadata-center env POD_IP=127.0.0.1 "$MC" run --host 127.0.0.1 --port "$MC_PORT" "${MC_STORE[@]}"

echo "== starting $SERVERS simulated model servers on 127.0.0.1:$FLEET_BASE..$((FLEET_BASE + SERVERS - 1))"
start fleet "$SIM" serve --servers "$SERVERS" --base-port "$FLEET_BASE"

ENDPOINTS_JSON=""
ENDPOINTS_YAML=""
for ((i = 0; i < SERVERS; i++)); do
  p=$((FLEET_BASE + i))
  ENDPOINTS_JSON+="${ENDPOINTS_JSON:+, }\"127.0.0.1:$p\""
  ENDPOINTS_YAML+="        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $p } } }"$'\n'
done

# One listener with the llmproxy module per algorithm.
module_listener() {  # module_listener ALGORITHM PORT
  cat <<EOF
  - name: llmproxy_$1
    address: { socket_address: { address: 127.0.0.1, port_value: $2 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: llmproxy_$1
          route_config:
            virtual_hosts:
            - name: fleet
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: fleet, timeout: 300s }
          http_filters:
          - name: envoy.filters.http.dynamic_modules
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
              dynamic_module_config: { name: llmproxy_envoy, do_not_close: true }
              filter_name: llmproxy
              filter_config:
                "@type": type.googleapis.com/google.protobuf.StringValue
                value: |
                  {
                    "protocol": "openai",
                    "algorithm": "$1",
                    "model_mapping_rule": {"$MODEL": {"rules": [{"scene_name": "demo", "cluster": "fleet", "backend": "vllm"}]}},
                    "clusters": {"fleet": {"endpoints": [$ENDPOINTS_JSON]}},
                    "metadata_center": {"enabled": true, "host": "127.0.0.1", "port": $MC_PORT}
                  }
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
EOF
}

{
  cat <<EOF
# Generated by scripts/demo.sh: one listener per policy on the same simulated fleet.
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: $ADMIN_PORT } }
static_resources:
  listeners:
EOF
  for ((a = 0; a < NALG; a++)); do module_listener "${ALGORITHMS[a]}" $((LLM_BASE + a)); done
  cat <<EOF
  - name: round_robin
    address: { socket_address: { address: 127.0.0.1, port_value: $RR_PORT } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: round_robin
          route_config:
            virtual_hosts:
            - name: fleet
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: fleet, timeout: 300s }
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: fleet
    type: STATIC
    connect_timeout: 2s
    lb_policy: ROUND_ROBIN
    circuit_breakers:
      thresholds: [{ max_connections: 100000, max_pending_requests: 100000, max_requests: 100000 }]
    load_assignment:
      cluster_name: fleet
      endpoints:
      - lb_endpoints:
$ENDPOINTS_YAML
EOF
} > "$OUT/envoy.yaml"

export ENVOY_DYNAMIC_MODULES_SEARCH_PATH="$PWD/build"
"$ENVOY" --mode validate -c "$OUT/envoy.yaml" --base-id $((RANDOM + 1000)) > "$OUT/logs/envoy-validate.log" 2>&1 \
  || { echo "demo: envoy rejected $OUT/envoy.yaml:" >&2; tail -n 20 "$OUT/logs/envoy-validate.log" >&2; exit 1; }
echo "== starting Envoy: llmproxy (${ALGORITHMS[*]}) on 127.0.0.1:$LLM_BASE.., round robin on 127.0.0.1:$RR_PORT"
start envoy "$ENVOY" -c "$OUT/envoy.yaml" --concurrency 2 --base-id $((RANDOM + 1000)) -l warning

for ((i = 0; i < SERVERS; i++)); do ready fleet "http://127.0.0.1:$((FLEET_BASE + i))"; done
TARGETS=()
for ((a = 0; a < NALG; a++)); do
  ready envoy "http://127.0.0.1:$((LLM_BASE + a))"
  TARGETS+=(--target "llmproxy-${ALGORITHMS[a]}=http://127.0.0.1:$((LLM_BASE + a))")
done
ready envoy "http://127.0.0.1:$RR_PORT"
TARGETS+=(--target "envoy-round-robin=http://127.0.0.1:$RR_PORT")

echo "== replaying the same trace through each policy (${DURATION}s each; progress on stderr)"
"$SIM" compare \
  "${TARGETS[@]}" \
  --stats-url "http://127.0.0.1:$FLEET_BASE" --duration "$DURATION" "${RATE_ARGS[@]}" \
  --out-dir "$OUT" --plot-python "$PY" \
  --title "TTFT: Envoy + llmproxy vs Envoy round robin ($SERVERS simulated servers)"

echo
echo "== llmproxy's own view (GET /llmproxy/metrics on the ${ALGORITHMS[0]} listener)"
"$PY" - "http://127.0.0.1:$LLM_BASE/llmproxy/metrics" <<'EOF'
import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()
keep = ("llmproxy_picks_total{", "llmproxy_in_flight_requests ", "llmproxy_metadata_center_calls_total",
        "llmproxy_prompt_chars_total ", "llmproxy_cached_prompt_chars_total ")
for line in text.splitlines():
    if line.startswith(keep):
        print("  " + line)
EOF
echo
echo "results: $OUT/results.md  $OUT/results.json  plot: $OUT/ttft_cdf.png"
