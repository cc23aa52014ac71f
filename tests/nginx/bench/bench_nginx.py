#!/usr/bin/env python3
"""Overhead of llmproxy in nginx (not part of CI; `make bench-nginx`).

Same machine, same load, same upstreams (a separate plain nginx answering fixed JSON on 4
ports), same proxy settings; the only difference is how the gateway picks the peer:
  * llmproxy (Lua): examples/nginx.conf (access_by_lua reads the body + pick, balancer_by_lua,
                 body_filter first token, log finish), 1 worker
  * llmproxy (native) (issue #18; --native, on by default when build/ngx_http_llmproxy_module.so
                 exists): examples/nginx-native.conf, the C module, no Lua, 1 worker, shared state
                 as shipped
  * round robin: plain nginx `upstream` with the same 4 servers, no Lua module, 1 worker
  * with --lookups, also llmproxy + lookups: the llmproxy gateway with the Metadata-Center
                 (our server, started here) and remote cache lookups on: every pick waits for
                 a cache query, polled every millisecond with ngx.sleep
  * shared state vs per-worker state (issue #15; --state-workers N, 2 by default, 0 = skip):
                 two llmproxy gateways with N workers each, the same example, one with the
                 shipped `shared_state = { size = "64m" }` (one routing state for all workers),
                 one with `shared_state = false` (each worker its own prefix index and load
                 counters); compared on gateway CPU per request (target: shared <= 1.10x)
Load: wrk (1 thread, --latency), 64 distinct chat bodies of 1 KiB or 64 KiB (all gateways keep
bodies in memory: client_body_buffer_size = client_max_body_size, as in the examples), at
saturation (--connections, 32) and, for round robin, Lua and native, also closed loop on
--latency-connections (1; 0 = skip) connections: the per-request latency without queueing, from
which "added p50" is read as in the Envoy benchmark. Rounds are interleaved, in alternating
order (A B .. B A ..) so that drift of the machine's load weighs on every variant alike.
Gateway CPU per request: user + system CPU time of the gateway's nginx master and workers (all
threads, /proc/<pid>/stat) over the run, divided by the requests wrk completed; it is the steadiest number on a shared machine (the load generator, the
upstreams and other jobs are not counted). wrk's connections are spread over the workers by
the kernel's `reuseport` hash; the requests each worker routed are printed.

    python3 tests/nginx/bench/bench_nginx.py [--seconds 8] [--connections 32] [--rounds 2] [--lookups]
                                             [--no-native] [--latency-connections 1] [--latency-seconds S]
                                             [--state-workers 2] [--state-only] [--json-out FILE]
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import harness  # noqa: E402
from harness import free_ports, wait_port  # noqa: E402

NGINX = harness.NGINX
MODULES = """load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
"""

FLEET_CONF = """worker_processes 1;
pid {prefix}/fleet.pid;
error_log {prefix}/fleet-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/fleet-body;
    client_body_buffer_size 128k;
    keepalive_requests 100000;
{servers}
}}
"""

FLEET_SERVER = """    server {{
        listen 127.0.0.1:{port};
        location / {{
            add_header x-served-by {name};
            default_type application/json;
            return 200 '{{"id":"cmpl-bench","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"ok from {name}"}},"finish_reason":"stop"}}]}}';
        }}
    }}
"""

RR_CONF = """worker_processes 1;
worker_rlimit_nofile 16384;
pid {prefix}/rr.pid;
error_log {prefix}/rr-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/rr-body;
    proxy_temp_path {prefix}/rr-proxy;
    client_body_buffer_size 9m;
    client_max_body_size 9m;
    upstream fleet {{
{upstreams}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            proxy_pass http://fleet;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
            proxy_connect_timeout 2s;
            proxy_next_upstream error timeout;
            proxy_next_upstream_tries 2;
        }}
    }}
}}
"""

WRK_SCRIPT = """
local bodies = {{}}
local f = io.open("{bodies}", "rb")
for line in f:lines() do bodies[#bodies + 1] = line end
f:close()
local i = 0
request = function()
  i = i + 1
  return wrk.format("POST", "/v1/chat/completions", {{["content-type"] = "application/json"}},
                    bodies[(i % #bodies) + 1])
end
"""


class Proc:
    """A plain nginx of the benchmark, in its own process group."""

    def __init__(self, args):
        self.p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    def close(self):
        harness.stop(self.p, signal.SIGQUIT, timeout=10, group=True)


def make_bodies(path, size, n=64):
    with open(path, "w") as f:
        for i in range(n):
            head = "request %d: " % i + harness.random_text(200, seed=i)  # distinct prefixes
            body = {"model": "qwen3-8b", "messages": [{"role": "user", "content": head}]}
            pad = size - len(json.dumps(body))
            body["messages"][0]["content"] = head + " " + harness.random_text(max(pad - 1, 0), seed=10_000 + i)
            line = json.dumps(body)
            f.write(line[:size - 2] + line[-2:] if len(line) > size else line)
            f.write("\n")


UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def gateway_cpu_seconds(master_pid):
    """User + system CPU time of an nginx master and its workers (every thread), from /proc."""
    ticks = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path("/proc/%s/stat" % d).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(d) == master_pid or int(fields[1]) == master_pid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def parse_wrk(out):
    def ms(v):
        m = re.match(r"([\d.]+)(us|ms|s)", v)
        return float(m.group(1)) * UNIT[m.group(2)]
    p50 = ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"p50": p50, "p99": p99, "rps": rps, "requests": requests, "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "errors": errors.group(1) if errors else ""}


def wrk(port, script, seconds, connections, master_pid=None):
    cpu0 = gateway_cpu_seconds(master_pid) if master_pid else None
    out = subprocess.run(["wrk", "-t1", "-c%d" % connections, "-d%ds" % seconds, "--latency", "-s", script,
                          "http://127.0.0.1:%d/v1/chat/completions" % port],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    res = parse_wrk(out)
    if master_pid:
        res["cpu_us"] = (gateway_cpu_seconds(master_pid) - cpu0) * 1e6 / max(1, res["requests"])
    return res, out


SHARED_STATE = 'shared_state = { size = "64m" }'
LUA, NATIVE, RR = "llmproxy (Lua)", "llmproxy (native)", "round robin"
NATIVE_TARGET = {"ratio": 0.85, "added_p50_ms": 0.100}  # issue #18, at 1 KiB


def quiet_gateway(cfg, addrs, workers=1, shared=True, host="lua"):
    """examples/nginx.conf (host "lua") or examples/nginx-native.conf (host "native") through the
    test harness, `workers` workers, without debug headers or access log; `shared` False:
    shared_state = false (every worker its own routing state; Lua host only)."""
    gw = harness.HOSTS[host](cfg, addrs, workers=workers)
    text = gw.conf.read_text().replace("access_log build/nginx/access.log;", "access_log off;")
    if host == "native":
        assert shared, "the native gateway runs with the shipped llmproxy_shared_state only"
        assert text.count("llmproxy_debug_headers on;") == 1, "examples/nginx-native.conf: debug headers not found"
        text = text.replace("llmproxy_debug_headers on;", "llmproxy_debug_headers off;")
        assert "llmproxy_shared_state 64m;" in text, "examples/nginx-native.conf: shared state not found"
    else:
        text = text.replace("debug_headers = true", "debug_headers = false")
        if not shared:
            assert text.count(SHARED_STATE) == 1, "examples/nginx.conf: %r not found once" % SHARED_STATE
            text = text.replace(SHARED_STATE, "shared_state = false")
        elif SHARED_STATE not in text:
            raise SystemExit("examples/nginx.conf: %r not found" % SHARED_STATE)
    gw.conf.write_text(text)
    r = gw.nginx_cmd("-s", "reload")
    assert r.returncode == 0, r.stderr
    time.sleep(1.0)
    gw.wait_ready()
    return gw


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lookups", action="store_true", help="add llmproxy + remote cache lookups")
    ap.add_argument("--native", action=argparse.BooleanOptionalAction, default=harness.MODULE.exists(),
                    help="add the native module's gateway (default: when %s exists)" % harness.MODULE)
    ap.add_argument("--latency-connections", type=int, default=1,
                    help="closed-loop latency runs on this many connections (0: skip them)")
    ap.add_argument("--latency-seconds", type=int, help="length of a latency run (default: --seconds)")
    ap.add_argument("--state-workers", type=int, default=2,
                    help="workers of the shared-state vs per-worker-state gateways (0: skip them)")
    ap.add_argument("--state-only", action="store_true",
                    help="only the shared vs per-worker comparison (no round robin, no 1-worker llmproxy)")
    ap.add_argument("--json-out", help="write every round's results here")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk missing (apt-get install wrk)")
    if args.state_only and args.state_workers < 1:
        sys.exit("--state-only needs --state-workers >= 1")
    harness.raise_fd_limit()
    tmp = Path(tempfile.mkdtemp(prefix="llmproxy-nginx-bench-"))
    os.chmod(tmp, 0o755)
    procs, gateways = [], []
    try:
        fleet_ports = free_ports(4)
        names = ["f%d" % i for i in range(4)]
        (tmp / "fleet.conf").write_text(FLEET_CONF.format(prefix=tmp, servers="".join(
            FLEET_SERVER.format(port=p, name=n) for p, n in zip(fleet_ports, names))))
        procs.append(Proc([NGINX, "-p", "%s/" % tmp, "-c", str(tmp / "fleet.conf"), "-g", "daemon off;"]))
        for p in fleet_ports:
            wait_port(p)
        addrs = ["127.0.0.1:%d" % p for p in fleet_ports]

        cfg = {
            "algorithm": "inference_lb",
            "model_mapping_rule": {"qwen3-8b": {"rules": [{"scene_name": "chat", "cluster": "fleet", "backend": "vllm"}]}},
            "lb_mapping_rule": {"qwen3-8b": {"load_aware_enable": True, "cache_aware_enable": True}},
            "clusters": {"fleet": {"endpoints": addrs}},
        }
        # (name, port, nginx master pid, llmproxy gateway or None, closed-loop latency runs too)
        variants = []
        if not args.state_only:
            rr_port = harness.free_port()
            (tmp / "rr.conf").write_text(RR_CONF.format(prefix=tmp, port=rr_port, upstreams="".join(
                "        server %s;\n" % a for a in addrs)))
            rr = Proc([NGINX, "-p", "%s/" % tmp, "-c", str(tmp / "rr.conf"), "-g", "daemon off;"])
            procs.append(rr)
            wait_port(rr_port)
            gw = quiet_gateway(cfg, addrs)
            gateways.append(gw)
            variants += [(LUA, gw.port, gw.proc.pid, gw, True), (RR, rr_port, rr.p.pid, None, True)]
            if args.native:
                gw_native = quiet_gateway(cfg, addrs, host="native")
                gateways.append(gw_native)
                variants.insert(1, (NATIVE, gw_native.port, gw_native.proc.pid, gw_native, True))
            if args.lookups:
                mc = harness.MetadataCenter()
                procs.append(mc)
                lookup_cfg = dict(cfg, metadata_center={"enabled": True, "host": "127.0.0.1", "port": mc.port,
                                                        "cache_enabled": True, "timeout_ms": 100})
                gw_lookups = quiet_gateway(lookup_cfg, addrs)
                gateways.append(gw_lookups)
                variants.append(("llmproxy + lookups", gw_lookups.port, gw_lookups.proc.pid, gw_lookups, False))
        shared_name = local_name = None
        if args.state_workers > 0:
            w = args.state_workers
            shared_name, local_name = "shared state, %dw" % w, "per-worker state, %dw" % w
            gw_shared = quiet_gateway(cfg, addrs, workers=w, shared=True)
            gateways.append(gw_shared)
            gw_local = quiet_gateway(cfg, addrs, workers=w, shared=False)
            gateways.append(gw_local)
            variants += [(shared_name, gw_shared.port, gw_shared.proc.pid, gw_shared, False),
                         (local_name, gw_local.port, gw_local.proc.pid, gw_local, False)]

        # results[(body, gateway, "sat" | "lat")]: every round's wrk result
        results, rounds_log = {}, []
        lat_conns = args.latency_connections
        lat_seconds = args.latency_seconds or args.seconds
        for size_name, size in (("1 KiB", 1024), ("64 KiB", 64 * 1024)):
            bodies = tmp / ("bodies-%d.txt" % size)
            make_bodies(bodies, size)
            script = tmp / ("wrk-%d.lua" % size)
            script.write_text(WRK_SCRIPT.format(bodies=bodies))
            for variant, port, _, _, _ in variants:
                wrk(port, str(script), args.warmup, args.connections)  # warm-up: pools, JIT, caches
            for rnd in range(args.rounds):
                order = variants if rnd % 2 == 0 else variants[::-1]  # A B C D, D C B A, ...
                for variant, port, pid, _, latency in order:
                    runs = [("sat", args.connections, args.seconds)]
                    if latency and lat_conns > 0:
                        runs.append(("lat", lat_conns, lat_seconds))
                    for mode, conns, seconds in runs:
                        res, raw = wrk(port, str(script), seconds, conns, master_pid=pid)
                        if res["non2xx"] or res["errors"]:
                            print(raw, file=sys.stderr)
                            raise SystemExit("%s %s: errors during the run" % (variant, size_name))
                        results.setdefault((size_name, variant, mode), []).append(res)
                        rounds_log.append(dict(res, body=size_name, gateway=variant, round=rnd + 1,
                                               mode="saturated" if mode == "sat" else "closed loop",
                                               connections=conns, loadavg=os.getloadavg()[0]))
                        print("%-6s %-22s round %d -c%-3d p50 %.3f ms p99 %.3f ms %.0f req/s, gateway CPU %.1f us/req "
                              "(load average %.1f)" % (size_name, variant, rnd + 1, conns, res["p50"], res["p99"],
                                                       res["rps"], res["cpu_us"], os.getloadavg()[0]), file=sys.stderr)

        def med(size_name, variant, key, mode="sat"):
            return statistics.median(r[key] for r in results[(size_name, variant, mode)])

        sizes = ("1 KiB", "64 KiB")
        print("\n%s, wrk -t1 -c%d, %ds x %d interleaved rounds in alternating order (median), 4 upstreams, "
              "load average %.1f at the end" % (subprocess.run([NGINX, "-v"], capture_output=True, text=True)
                                                 .stderr.strip().replace("nginx version: ", ""),
                                                 args.connections, args.seconds, args.rounds, os.getloadavg()[0]))
        print("\nSaturated (-c%d):" % args.connections)
        print("\n| body | gateway | p50 ms | p99 ms | req/s | gateway CPU µs/req |")
        print("|---|---|---:|---:|---:|---:|")
        names = [v[0] for v in variants]
        if RR in names:
            names = [RR] + [v for v in names if v != RR]
        for size_name in sizes:
            for variant in names:
                print("| %s | %s | %.3f | %.3f | %.0f | %.1f |" % (
                    size_name, variant, med(size_name, variant, "p50"), med(size_name, variant, "p99"),
                    med(size_name, variant, "rps"), med(size_name, variant, "cpu_us")))
        lat_names = [n for n in names if ("1 KiB", n, "lat") in results]
        if lat_names:
            print("\nClosed loop (-c%d, %ds): the latency of one request without queueing" % (lat_conns, lat_seconds))
            print("\n| body | gateway | p50 µs | p99 µs | req/s | gateway CPU µs/req |")
            print("|---|---|---:|---:|---:|---:|")
            for size_name in sizes:
                for variant in lat_names:
                    print("| %s | %s | %.0f | %.0f | %.0f | %.1f |" % (
                        size_name, variant, 1000 * med(size_name, variant, "p50", "lat"),
                        1000 * med(size_name, variant, "p99", "lat"), med(size_name, variant, "rps", "lat"),
                        med(size_name, variant, "cpu_us", "lat")))
        hosts = [n for n in (LUA, NATIVE) if n in names]
        if hosts and RR in names:
            print("\nAgainst plain round robin (medians; per round: that round's pair, in round order)")
            print("\n| body | gateway | throughput ratio (saturated) | per round | added p50 µs (closed loop) "
                  "| added p50 ms (saturated) | added p99 ms (saturated) | gateway CPU µs/req, added |")
            print("|---|---|---:|---|---:|---:|---:|---:|")
            for size_name in sizes:
                for variant in hosts:
                    per_round = [a["rps"] / b["rps"] for a, b in zip(results[(size_name, variant, "sat")],
                                                                     results[(size_name, RR, "sat")])]
                    added_lat = ("%+.0f" % (1000 * (med(size_name, variant, "p50", "lat") - med(size_name, RR, "p50", "lat")))
                                 if lat_names else "-")
                    print("| %s | %s | %.3f | %s | %s | %+.3f | %+.3f | %+.1f |" % (
                        size_name, variant, med(size_name, variant, "rps") / med(size_name, RR, "rps"),
                        " ".join("%.2f" % r for r in per_round), added_lat,
                        med(size_name, variant, "p50") - med(size_name, RR, "p50"),
                        med(size_name, variant, "p99") - med(size_name, RR, "p99"),
                        med(size_name, variant, "cpu_us") - med(size_name, RR, "cpu_us")))
            if NATIVE in hosts:
                ratio = med("1 KiB", NATIVE, "rps") / med("1 KiB", RR, "rps")
                if lat_names:
                    added, how = med("1 KiB", NATIVE, "p50", "lat") - med("1 KiB", RR, "p50", "lat"), "closed loop"
                else:
                    added, how = med("1 KiB", NATIVE, "p50") - med("1 KiB", RR, "p50"), "saturated"
                print("\nIssue #18 targets, native module at 1 KiB: saturated throughput %.3f x round robin "
                      "(target >= %.2f: %s); added p50 %+.0f us, %s (target <= %.0f us: %s)" % (
                          ratio, NATIVE_TARGET["ratio"], "met" if ratio >= NATIVE_TARGET["ratio"] else "NOT met",
                          1000 * added, how, 1000 * NATIVE_TARGET["added_p50_ms"],
                          "met" if added <= NATIVE_TARGET["added_p50_ms"] else "NOT met"))
        if args.lookups and not args.state_only:
            print("\n| body | lookups: added p50 ms | added p99 ms | throughput ratio (lookups / llmproxy) |")
            print("|---|---:|---:|---:|")
            for size_name in sizes:
                print("| %s | %+.3f | %+.3f | %.3f |" % (
                    size_name, med(size_name, "llmproxy + lookups", "p50") - med(size_name, LUA, "p50"),
                    med(size_name, "llmproxy + lookups", "p99") - med(size_name, LUA, "p99"),
                    med(size_name, "llmproxy + lookups", "rps") / med(size_name, LUA, "rps")))
            ml = harness.metrics(gw_lookups.port)
            print("\nlookups gateway: %d picks waited for a lookup, %d abandoned; remote decisions %d, "
                  "local fallbacks %d" % (
                      ml.total("llmproxy_nginx_picks_total", event="waited_for_lookup"),
                      ml.total("llmproxy_nginx_picks_total", event="lookup_abandoned"),
                      ml.total("llmproxy_remote_cache_lookups_total", result="remote"),
                      ml.total("llmproxy_remote_cache_lookups_total", result="local_fallback")))
        if shared_name:
            print("\nShared state vs per-worker state, %d workers each (issue #15 target: shared <= 1.10x "
                  "per-worker CPU per request)" % args.state_workers)
            print("\n| body | CPU/req shared / per-worker (medians) | per round | req/s shared / per-worker | target |")
            print("|---|---:|---|---:|---|")
            for size_name in sizes:
                sh, lo = results[(size_name, shared_name, "sat")], results[(size_name, local_name, "sat")]
                ratio = med(size_name, shared_name, "cpu_us") / med(size_name, local_name, "cpu_us")
                per_round = [a["cpu_us"] / b["cpu_us"] for a, b in zip(sh, lo)]
                print("| %s | %.3f | %s | %.3f | %s |" % (
                    size_name, ratio, " ".join("%.3f" % r for r in per_round),
                    med(size_name, shared_name, "rps") / med(size_name, local_name, "rps"),
                    "met" if ratio <= 1.10 else "NOT met"))
        print()
        for variant, port, _, g, _ in variants:
            if g is None:
                continue
            m = harness.metrics(port)
            per_worker = sorted(int(v) for _, v in m.select("llmproxy_picks_total", outcome="routed"))
            print("%s: picks routed %d, finished %d, in flight %d; routed per worker %s" % (
                variant, m.total("llmproxy_picks_total", outcome="routed"),
                m.total("llmproxy_finished_requests_total"), m.total("llmproxy_in_flight_requests"),
                "/".join(str(n) for n in reversed(per_worker))))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({"args": vars(args), "rounds": rounds_log}, indent=1))
    finally:
        for g in gateways:
            g.close()
        for p in procs:
            p.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
