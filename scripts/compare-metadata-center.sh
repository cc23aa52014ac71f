#!/usr/bin/env bash
# Compares metadata-center binaries on the in-memory store and the Redis store (one replica),
# in rounds, the binaries' order rotating from round to round (and reversed every other round),
# so a slow minute on a shared machine does not land on one binary only. Per run: calls/s and
# the CPU time per API call of the server and of redis-server (mc_bench's MC_BENCH_CPU); at the
# end, medians per binary and scenario.
#
#   scripts/compare-metadata-center.sh BENCH_BIN ROUNDS BIN_A BIN_B [BIN_C ...]
#
# BENCH_BIN is target/release/examples/mc_bench. One redis-server on a free 127.0.0.1 port
# (flushed before each run). MC_BENCH_REDIS_CPU=N (default 1) pins redis-server to CPU N and the
# rest to the other CPUs, as scripts/bench-metadata-center.sh does; MC_BENCH_SECS (5) and
# MC_BENCH_CONC (16) as there. Every process started here is stopped by PID at the end.
set -euo pipefail
BENCH=$1 ROUNDS=$2
shift 2
BINS=("$@")
[ ${#BINS[@]} -ge 2 ] || { echo "usage: $0 BENCH_BIN ROUNDS BIN_A BIN_B [BIN_C ...]" >&2; exit 2; }
SECS=${MC_BENCH_SECS:-5} CONC=${MC_BENCH_CONC:-16} REDIS_CPU=${MC_BENCH_REDIS_CPU:-1}
others=$(python3 -c "import os; print(','.join(str(c) for c in sorted(os.sched_getaffinity(0)) if c != int('$REDIS_CPU')))")
[ -n "$others" ] || { echo "MC_BENCH_REDIS_CPU=$REDIS_CPU leaves no CPU for the rest" >&2; exit 2; }
tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
taskset -c "$REDIS_CPU" redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$tmp" >"$tmp/redis.log" 2>&1 &
rpid=$!; pids+=("$rpid")
for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done

# one_run BIN CPU_EXTRA [SERVER ARGS...]: "calls/server-µs/redis-µs" per scenario, one line
one_run() {
  local bin=$1 extra=$2; shift 2
  taskset -c "$others" "$bin" run --host 127.0.0.1 --port 0 "$@" >"$tmp/mc" 2>/dev/null &
  local mp=$!; pids+=("$mp")
  for _ in $(seq 50); do grep -q 'listening on' "$tmp/mc" && break; sleep 0.1; done
  local addr; addr=$(sed -n 's/^listening on //p' "$tmp/mc")
  MC_BENCH_CPU="server:$mp$extra" taskset -c "$others" "$BENCH" "http://$addr" "$SECS" "$CONC" |
    awk -F'|' '/^\| [a-z]/ && !/scenario/ {
      for (i = 3; i <= NF; i++) gsub(/ /, "", $i)
      printf "%s/%s/%s ", $3, $8, ($9 == "" ? "-" : $9) }'
  kill "$mp"; wait "$mp" 2>/dev/null || true
}

echo "compare: ${BINS[*]}; $ROUNDS rounds, $SECS s x $CONC connections per scenario, redis-server on CPU $REDIS_CPU"
echo "per run and scenario: calls/s / server µs CPU per call / redis-server µs CPU per call"
for r in $(seq "$ROUNDS"); do
  order=()
  for j in "${!BINS[@]}"; do order+=("${BINS[$(((j + r) % ${#BINS[@]}))]}"); done
  if [ $((r % 2)) = 0 ]; then
    for ((i = 0, j = ${#order[@]} - 1; i < j; i++, j--)); do t=${order[i]}; order[i]=${order[j]}; order[j]=$t; done
  fi
  for bin in "${order[@]}"; do
    redis-cli -p "$port" flushall >/dev/null
    mem=$(one_run "$bin" "")
    red=$(one_run "$bin" ",redis:$rpid" --store "redis://127.0.0.1:$port")
    echo "$(date -u +%H:%M:%S) round $r $bin memory: $mem redis: $red" | tee -a "$tmp/runs"
  done
done

python3 - "$tmp/runs" <<'EOF'
import re, statistics as st, sys
names = ["lifecycle (3 calls)", "load query", "cache save", "cache query", "query at half rate"]
runs = {}
for line in open(sys.argv[1]):
    m = re.match(r"\S+ round \d+ (\S+) memory: (.*) redis: (.*)", line.strip())
    if m:
        cells = lambda s: [c.split("/") for c in s.split()]
        runs.setdefault(m.group(1), []).append((cells(m.group(2)), cells(m.group(3))))
print("\nmedians | scenario | Redis calls/s | ratio to in-memory | server µs/call (in-memory) | server µs/call (Redis) | redis-server µs/call")
for binary, rs in runs.items():
    for i, name in enumerate(names):
        if any(len(mem) <= i or len(red) <= i for mem, red in rs):
            continue
        med = lambda f: st.median(f(mem, red) for mem, red in rs)
        print(f"{binary} | {name} | {med(lambda m, r: float(r[i][0])):.0f} | "
              f"{med(lambda m, r: float(r[i][0]) / float(m[i][0])):.2f} | "
              f"{med(lambda m, r: float(m[i][1])):.1f} | {med(lambda m, r: float(r[i][1])):.1f} | "
              f"{med(lambda m, r: float(r[i][2])):.1f}")
EOF
