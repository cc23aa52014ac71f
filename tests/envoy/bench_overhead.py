#!/usr/bin/env python3
"""Overhead of the llmproxy Envoy module (not part of CI).

Same load, same machine, one run: wrk against
  A) Envoy + llmproxy module (inference_lb, strict override, header route), and
  B) Envoy with plain round robin (no filter),
both in front of the same fast upstream (a separate Envoy answering with direct_response from
several listeners, so the upstream is never the bottleneck). For 1 KiB and 64 KiB chat bodies:
  - latency: one connection, closed loop (p50/p99 = per-request cost, no queueing),
  - throughput: many connections (requests/s at saturation).
Runs alternate A/B --repeat times and medians are reported (the machine may be shared).
Bodies vary per request (a rotating set) so picks are not all the same prefix.

    make envoy-module && python3 tests/envoy/bench_overhead.py [--duration 10] [--json out.json]

Needs wrk (apt-get install wrk) and Envoy (the project venv).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

N_UPSTREAMS = 4
VARIANTS = 64


def upstream_bootstrap(ports, admin_port):
    body = json.dumps({"id": "cmpl-bench", "object": "chat.completion", "model": "bench",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                    "finish_reason": "stop"}]})
    listeners = []
    for p in ports:
        listeners.append({
            "name": "up%d" % p,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": p}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "up",
                    "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
                        "match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": body}},
                        "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
                    }]}]},
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                },
            }]}],
        })
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
            "static_resources": {"listeners": listeners}}


def wrk_script(path, body_bytes):
    """Lua for wrk: POST chat bodies of ~body_bytes, rotating over VARIANTS distinct prompts."""
    filler = ("lorem ipsum dolor sit amet " * (body_bytes // 27 + 2))
    bodies = []
    for i in range(VARIANTS):
        head = '{"model":"bench","messages":[{"role":"user","content":"conversation %d: ' % i
        tail = '"}]}'
        bodies.append(head + filler[:max(0, body_bytes - len(head) - len(tail))] + tail)
    lua = ["wrk.method = \"POST\"", "wrk.headers[\"content-type\"] = \"application/json\"", "local bodies = {"]
    lua += ["  %s," % json.dumps(b) for b in bodies]
    lua += ["}", "local i = 0",
            "request = function()",
            "  i = i + 1",
            "  return wrk.format(nil, \"/v1/chat/completions\", nil, bodies[(i %% %d) + 1])" % VARIANTS,
            "end"]
    Path(path).write_text("\n".join(lua) + "\n")


UNIT = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def cpu_seconds(pid):
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(port, script, connections, duration, threads=1, pid=None):
    cpu0 = cpu_seconds(pid) if pid else None
    out = subprocess.run(
        ["wrk", "-t%d" % threads, "-c%d" % connections, "-d%ds" % duration, "--latency", "-s", script,
         "http://127.0.0.1:%d" % port],
        capture_output=True, text=True, check=True).stdout
    res = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    if pid:  # gateway CPU per request: robust against other load on the machine
        res["cpu_us"] = (cpu_seconds(pid) - cpu0) * 1e6 / max(1, requests)
    for pct in ("50", "99"):
        m = re.search(r"^\s+%s(?:\.0+)?%%\s+([\d.]+)(us|ms|s)\s*$" % pct, out, re.M)
        res["p" + pct] = float(m.group(1)) * UNIT[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non2xx"] = int(errors.group(1)) if errors else 0
    sock = re.search(r"Socket errors: (.*)", out)
    res["socket_errors"] = sock.group(1) if sock else ""
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=32, help="connections for the throughput runs")
    ap.add_argument("--concurrency", type=int, default=1, help="Envoy worker threads of each gateway")
    ap.add_argument("--repeat", type=int, default=3, help="alternating A/B rounds (medians reported)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 65536], help="body sizes in bytes")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install -y wrk")
    if not harness.MODULE.exists():
        sys.exit("%s missing: make envoy-module" % harness.MODULE)

    tmp = Path(tempfile.mkdtemp(prefix="llmproxy-bench-"))
    procs = []
    try:
        ports = harness.free_ports(N_UPSTREAMS + 5)
        up_ports, up_admin, a_port, a_admin, b_port, b_admin = (ports[:N_UPSTREAMS], *ports[N_UPSTREAMS:])
        upstream = harness.Envoy(upstream_bootstrap(up_ports, up_admin), tmp / "upstream", concurrency=2,
                                 log_level="warn")
        procs.append(upstream)
        addrs = ["127.0.0.1:%d" % p for p in up_ports]
        cfg = {"protocol": "openai", "algorithm": "inference_lb",
               "model_mapping_rule": {"bench": {"rules": [{"scene_name": "bench", "cluster": "pool", "backend": "vllm"}]}},
               "clusters": {"pool": {"endpoints": addrs}}}
        clusters = [harness.static_cluster("pool", addrs)]
        gw_a = harness.Envoy(harness.envoy_bootstrap(a_port, a_admin, clusters, cfg, default_cluster="pool"),
                             tmp / "module", concurrency=args.concurrency, log_level="warn")
        procs.append(gw_a)
        gw_b = harness.Envoy(harness.envoy_bootstrap(b_port, b_admin, clusters, None, default_cluster="pool"),
                             tmp / "roundrobin", concurrency=args.concurrency, log_level="warn")
        procs.append(gw_b)

        results = []
        for size in args.sizes:
            script = str(tmp / ("body%d.lua" % size))
            wrk_script(script, size)
            runs = {k: [] for k in ("module_lat", "module_tput", "roundrobin_lat", "roundrobin_tput")}
            for name, gw in (("module", gw_a), ("roundrobin", gw_b)):
                run_wrk(gw.port, script, 4, 2)  # warm-up
            # Alternate A/B so drift in machine load hits both alike; report medians.
            for _ in range(args.repeat):
                for name, gw in (("module", gw_a), ("roundrobin", gw_b)):
                    runs[name + "_lat"].append(run_wrk(gw.port, script, 1, args.duration))
                    runs[name + "_tput"].append(run_wrk(gw.port, script, args.connections, args.duration,
                                                        threads=2, pid=gw.proc.pid))
            row = {"body": size, "runs": runs}
            for k, rs in runs.items():
                row[k] = {m: statistics.median(r[m] for r in rs) for m in ("rps", "p50", "p99", "cpu_us") if m in rs[0]}
                row[k]["non2xx"] = sum(r["non2xx"] for r in rs)
                row[k]["socket_errors"] = ";".join(r["socket_errors"] for r in rs if r["socket_errors"])
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)

        print()
        print("| body | p50 module / rr (µs) | added p50 | p99 module / rr (µs) | added p99 | "
              "throughput module / rr (req/s) | ratio | gateway CPU/req module / rr (µs) | CPU ratio rr/module |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in results:
            ml, bl, mt, bt = r["module_lat"], r["roundrobin_lat"], r["module_tput"], r["roundrobin_tput"]
            print("| %s | %.0f / %.0f | %+.0f µs | %.0f / %.0f | %+.0f µs | %.0f / %.0f | %.2f | %.0f / %.0f | %.2f |" % (
                "%d KiB" % (r["body"] // 1024), ml["p50"], bl["p50"], ml["p50"] - bl["p50"],
                ml["p99"], bl["p99"], ml["p99"] - bl["p99"], mt["rps"], bt["rps"], mt["rps"] / bt["rps"],
                mt["cpu_us"], bt["cpu_us"], bt["cpu_us"] / mt["cpu_us"]))
        bad = [(r["body"], k) for r in results for k in r if k not in ("body", "runs")
               and (r[k]["non2xx"] or r[k]["socket_errors"])]
        if bad:
            print("\nWARNING: errors during runs: %s" % bad)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    finally:
        for p in reversed(procs):
            p.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
