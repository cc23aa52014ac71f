#!/usr/bin/env python3
"""Gateway instructions per request, counted by valgrind's callgrind: nginx + the native
llmproxy module vs plain nginx round robin, on the same 1 KiB chat bodies and the same fleet.

Wall-clock benchmarks (bench_nginx.py) are the real measure, but on a shared 2-core machine
their ratios wander by several percent from run to run. Callgrind counts instructions, not
seconds: the same binary, inputs and requests give the same count whatever else the machine
is doing, so a change to the pick path shows up as a number that does not drift.

Each gateway runs as one nginx process (master_process off) under callgrind twice, serving
--small and then --large requests on one keep-alive connection; the difference of the two
totals divided by the difference of the request counts is the cost of one request, without
the startup (config parsing, mapping and zeroing the shared region).

    make bench-nginx-instructions    (or: python3 tests/nginx/bench/callgrind_nginx.py)
"""

import argparse
import http.client
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
from bench_nginx import FLEET_CONF, FLEET_SERVER, RR_CONF, Proc  # noqa: E402
from harness import free_ports, wait_port  # noqa: E402

NGINX = harness.NGINX
VALGRIND = shutil.which("valgrind")


def bodies(size, n=64):
    """`n` distinct chat bodies of about `size` bytes (as bench_nginx.py makes them)."""
    out = []
    for i in range(n):
        head = "request %d:" % i
        body = {"model": "qwen3-8b", "messages": [{"role": "user", "content": head}]}
        pad = size - len(json.dumps(body))
        body["messages"][0]["content"] = head + " " + harness.random_text(max(pad - 1, 0), seed=10_000 + i)
        out.append(json.dumps(body).encode())
    return out


def send(port, reqs):
    """POSTs every body on one keep-alive connection; every answer must be a 200."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for b in reqs:
        conn.request("POST", "/v1/chat/completions", body=b, headers={"content-type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise SystemExit("gateway answered %d: %r" % (r.status, data[:300]))
    conn.close()


def count(conf_text, prefix, port, reqs, out):
    """Runs nginx from `conf_text` under callgrind, sends `reqs`, quits it; the instructions
    it executed in all."""
    conf = prefix / ("nginx-%d.conf" % len(reqs))
    conf.write_text(conf_text)
    # the module's snapshot timer (ngx_http_llmproxy_publish_handler, every
    # LLMPROXY_SNAPSHOT_MS) fires by the wall clock, and under callgrind a run of 600 requests
    # lasts long enough for several more than one of 100: left in, its metrics rendering would
    # count as ~1,400 instructions per request that nginx does not spend per request.
    # --collect-atstart=yes must come after --toggle-collect, which turns it off
    p = subprocess.Popen([VALGRIND, "--tool=callgrind", "--callgrind-out-file=%s" % out,
                          "--toggle-collect=ngx_http_llmproxy_publish_handler", "--collect-atstart=yes",
                          NGINX, "-p", "%s/" % prefix, "-c", str(conf), "-g", "daemon off;"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_port(port, timeout=120)
        send(port, reqs)
    finally:
        harness.stop(p, signal.SIGQUIT, timeout=120, group=True)
    m = re.search(r"^(?:summary|totals): (\d+)", Path(out).read_text(), re.M)
    if not m:
        raise SystemExit("callgrind wrote no total to %s" % out)
    return int(m.group(1))


def per_request(name, conf_text, prefix, port, small, large):
    a = count(conf_text, prefix, port, small, prefix / ("cg-%s-small.out" % name))
    b = count(conf_text, prefix, port, large, prefix / ("cg-%s-large.out" % name))
    return (b - a) / (len(large) - len(small))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="body size in bytes (1024)")
    ap.add_argument("--small", type=int, default=100, help="requests of the first run (100)")
    ap.add_argument("--large", type=int, default=600, help="requests of the second run (600)")
    ap.add_argument("--keep", metavar="DIR", help="copy the callgrind outputs here (callgrind_annotate)")
    args = ap.parse_args()
    if VALGRIND is None:
        sys.exit("valgrind missing (apt-get install valgrind)")
    if not harness.MODULE.exists():
        sys.exit("%s missing: run `make nginx-module`" % harness.MODULE)
    tmp = Path(tempfile.mkdtemp(prefix="llmproxy-callgrind-"))
    fleet = None
    try:
        fleet_ports = free_ports(4)
        (tmp / "fleet.conf").write_text(FLEET_CONF.format(prefix=tmp, servers="".join(
            FLEET_SERVER.format(port=p, name="f%d" % i) for i, p in enumerate(fleet_ports))))
        fleet = Proc([NGINX, "-p", "%s/" % tmp, "-c", str(tmp / "fleet.conf"), "-g", "daemon off;"])
        for p in fleet_ports:
            wait_port(p)
        addrs = ["127.0.0.1:%d" % p for p in fleet_ports]
        body_list = bodies(args.size)
        small = [body_list[i % len(body_list)] for i in range(args.small)]
        large = [body_list[i % len(body_list)] for i in range(args.large)]

        rr_port = harness.free_port()
        rr_conf = "master_process off;\n" + RR_CONF.format(prefix=tmp, port=rr_port, upstreams="".join(
            "        server %s;\n" % a for a in addrs))
        rr = per_request("rr", rr_conf, tmp, rr_port, small, large)

        # the native gateway as bench_nginx.py runs it: examples/nginx-native.conf, one worker,
        # the shipped shared state, no access log, no debug headers
        cfg = {
            "algorithm": "inference_lb",
            "model_mapping_rule": {"qwen3-8b": {"rules": [{"scene_name": "chat", "cluster": "fleet", "backend": "vllm"}]}},
            "lb_mapping_rule": {"qwen3-8b": {"load_aware_enable": True, "cache_aware_enable": True}},
            "clusters": {"fleet": {"endpoints": addrs}},
        }
        (tmp / "llmproxy.json").write_text(json.dumps(cfg))
        (tmp / "build" / "nginx").mkdir(parents=True)
        shutil.copy2(harness.MODULE, tmp / "build" / harness.MODULE.name)
        native_port = harness.free_port()
        text = harness.render_native_example(native_port, 1, tmp / "llmproxy.json", addrs, master_process=False)
        text = text.replace("access_log build/nginx/access.log;", "access_log off;")
        text = text.replace("llmproxy_debug_headers on;", "llmproxy_debug_headers off;")
        native = per_request("native", text, tmp, native_port, small, large)

        print("| gateway | instructions per request (callgrind) | vs round robin |")
        print("|---|---|---|")
        print("| round robin | %.0f | 1.00x |" % rr)
        print("| llmproxy (native) | %.0f | %.2fx |" % (native, native / rr))
        print("\nadded by llmproxy: %.0f instructions per %d-byte request (%d and %d requests per run)"
              % (native - rr, args.size, args.small, args.large))
    finally:
        if fleet:
            fleet.close()
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            for f in tmp.glob("cg-*.out"):
                shutil.copy2(f, Path(args.keep) / f.name)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
