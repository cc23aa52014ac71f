#!/usr/bin/env bash
# The metadata-center API benchmark behind `make bench-metadata-center`: calls/s and p50/p99 per
# API (metadata-center/examples/mc_bench.rs), in one run, with
#   - the in-memory store, one replica;
#   - the Redis store, one replica;
#   - the Redis store, two replicas over the same Redis (the load generator's connections split
#     between them);
#   - the Redis store called directly, without HTTP (16 tasks, then 1: the unloaded latency);
# then the in-memory stores' own cost without HTTP. Redis (Debian's redis-server) is started on
# a free 127.0.0.1 port, and every process started here is stopped by PID at the end.
#
#   scripts/bench-metadata-center.sh MC_BIN BENCH_BIN SECS CONC "memory redis"
#
# Each table also gives the CPU time per API call of the metadata-center(s) and of redis-server
# (mc_bench's MC_BENCH_CPU): steadier than calls/s on a shared machine.
#
# MC_BENCH_REDIS_CPU=N puts redis-server alone on CPU N and everything else (the servers of both
# stores, the load generator) on the other CPUs: Redis on its own core, as it is deployed,
# and the same CPUs for the in-memory baseline.
#
# MC_BENCH_CLIENT_CPU=N runs the load generator on CPU N instead (with MC_BENCH_REDIS_CPU=N as
# well: the metadata-center alone on the other CPUs, Redis and the client sharing CPU N). The
# lookup latency is then the server's, not the wait for a core the client is using; in a
# deployment the gateways run on other machines.
set -euo pipefail
BIN=$1 BENCH=$2 SECS=$3 CONC=$4 STORES=${5:-memory redis}
REDIS_CPU=${MC_BENCH_REDIS_CPU:-}
ON_REDIS_CPU=() ON_OTHER_CPUS=()
if [ -n "$REDIS_CPU" ]; then
  others=$(python3 -c "import os; print(','.join(str(c) for c in sorted(os.sched_getaffinity(0)) if c != int('$REDIS_CPU')))")
  if [ -z "$others" ]; then
    echo "MC_BENCH_REDIS_CPU=$REDIS_CPU leaves no CPU for the rest" >&2
    exit 2
  fi
  ON_REDIS_CPU=(taskset -c "$REDIS_CPU") ON_OTHER_CPUS=(taskset -c "$others")
  echo "redis-server on CPU $REDIS_CPU, the metadata-center(s) and the load generator on CPU(s) $others"
fi
ON_CLIENT_CPU=("${ON_OTHER_CPUS[@]}")
if [ -n "${MC_BENCH_CLIENT_CPU:-}" ]; then
  ON_CLIENT_CPU=(taskset -c "$MC_BENCH_CLIENT_CPU")
  echo "the load generator on CPU $MC_BENCH_CLIENT_CPU"
fi
tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_mc ARGS...: sets MC_ADDR and MC_PID
start_mc() {
  local out="$tmp/mc.${#pids[@]}"
  "${ON_OTHER_CPUS[@]}" "$BIN" run --host 127.0.0.1 --port 0 "$@" >"$out" 2>/dev/null &
  MC_PID=$!; pids+=("$MC_PID")
  for _ in $(seq 50); do grep -q 'listening on' "$out" && break; sleep 0.1; done
  MC_ADDR=$(sed -n 's/^listening on //p' "$out")
  test -n "$MC_ADDR"
}

# store_failures ADDR: the Redis store's errors + timeouts (answered from nothing) on a replica
store_failures() {
  curl -s "http://$1/metrics" | grep '^metadata_center_store_ops_total' | grep -v 'result="ok"' |
    awk '{s += $2} END {print s + 0}'
}

stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

for store in $STORES; do
  case $store in
  memory)
    echo "== in-memory store, 1 replica"
    start_mc
    MC_BENCH_CPU="server:$MC_PID" "${ON_CLIENT_CPU[@]}" "$BENCH" "http://$MC_ADDR" "$SECS" "$CONC"
    echo "server RSS after the run: $(ps -o rss= -p "$MC_PID") KiB, threads: $(ps -o nlwp= -p "$MC_PID")"
    stop "$MC_PID"
    ;;
  redis)
    if ! command -v redis-server >/dev/null; then
      echo "== Redis store: skipped, redis-server is not installed (apt-get install redis-server)"
      continue
    fi
    port=$(free_port)
    "${ON_REDIS_CPU[@]}" redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$tmp" \
      >"$tmp/redis.log" 2>&1 &
    rpid=$!; pids+=("$rpid")
    for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    for n in 1 2; do
      redis-cli -p "$port" flushall >/dev/null
      echo "== Redis store (redis-server $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p') on 127.0.0.1:$port), $n replica(s)"
      addrs=() mcs=()
      for _ in $(seq "$n"); do
        start_mc --store "redis://127.0.0.1:$port"
        addrs+=("http://$MC_ADDR"); mcs+=("$MC_PID")
      done
      MC_BENCH_CPU="server:$(IFS=+; echo "${mcs[*]}"),redis:$rpid" \
        "${ON_CLIENT_CPU[@]}" "$BENCH" "$(IFS=,; echo "${addrs[*]}")" "$SECS" "$CONC"
      for a in "${addrs[@]}"; do
        echo "store errors + timeouts on ${a#http://}: $(store_failures "${a#http://}")"
      done
      echo "redis-server: $(redis-cli -p "$port" dbsize) keys, used_memory $(redis-cli -p "$port" info memory | sed -n 's/^used_memory_human:\(.*\)\r$/\1/p')"
      for p in "${mcs[@]}"; do stop "$p"; done
    done
    for c in "$CONC" 1; do
      redis-cli -p "$port" flushall >/dev/null
      echo "== Redis store called directly (no HTTP, no metadata-center process), $c task(s)"
      MC_BENCH_CPU="redis:$rpid" "${ON_CLIENT_CPU[@]}" "$BENCH" --redis "redis://127.0.0.1:$port" "$SECS" "$c"
    done
    stop "$rpid"
    ;;
  *) echo "unknown store $store (memory, redis)" >&2; exit 2 ;;
  esac
done
echo "== the same work without HTTP (in-memory stores, one thread)"
"$BENCH" --in-process
