"""Shared pieces of the soak, fault and abuse scenarios (tests/soak).

Reuses the test harnesses (tests/common/harness_base.py, tests/envoy/harness.py,
tests/nginx/harness.py): their fake OpenAI-compatible upstreams (tests/common/fake_openai.py),
the metadata-center server, Envoy and nginx; and the simulator (`llmproxy-sim serve`).
Everything listens on 127.0.0.1 on ports chosen at run time; every process started here is
registered with a `Procs` and stopped by it, also on failure.
"""

import asyncio
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "tests" / "common"))

import harness_base  # noqa: E402
from harness_base import FakeUpstreams, MetadataCenter, Metrics, PortClash, free_ports, metrics  # noqa: E402,F401


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


envoy_harness = _load("llmproxy_envoy_harness", REPO / "tests" / "envoy" / "harness.py")
nginx_harness = _load("llmproxy_nginx_harness", REPO / "tests" / "nginx" / "harness.py")
# the Envoy direct_response upstream of the overhead benchmark (a gateway-bound upstream)
bench_overhead = _load("llmproxy_bench_overhead", REPO / "tests" / "envoy" / "bench_overhead.py")

SIM = Path(os.environ.get("LLMPROXY_SIM", REPO / "target" / "release" / "llmproxy-sim"))
CHAT = harness_base.CHAT
stop_proc = harness_base.stop


def log(*a):
    print("[soak %s]" % time.strftime("%H:%M:%S"), *a, flush=True)


def rss_kib(pid):
    """Resident set size of a process, KiB (VmRSS)."""
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS for %d" % pid)


class Procs:
    """Owns every process and helper started by a scenario; close() stops them all."""

    def __init__(self):
        self.items = []

    def add(self, item):
        self.items.append(item)
        return item

    def close(self):
        for it in reversed(self.items):
            try:
                if isinstance(it, subprocess.Popen):
                    harness_base.stop(it)
                else:
                    it.close()
            except Exception as e:  # keep stopping the others
                log("cleanup error: %r" % e)
        self.items = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------
# upstreams


class SimServer:
    """One simulated model server (`llmproxy-sim serve --servers 1`) on a fixed port, so that it
    can be killed and started again at the same address. Fast settings: one output token,
    steps cost nothing, so the gateway is what is measured."""

    def __init__(self, port):
        self.port = port
        self.addr = "127.0.0.1:%d" % port
        self.proc = None
        self.start()

    def start(self):
        if not SIM.exists():
            raise RuntimeError("%s missing: cargo build --release -p llmproxy-sim" % SIM)
        self.proc = subprocess.Popen(
            [str(SIM), "serve", "--servers", "1", "--base-port", str(self.port), "--default-max-tokens", "1",
             "--step-base-ms", "0", "--prefill-us-per-token", "0", "--decode-us-per-seq", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 10
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("servers:"):
                harness_base.drain(self.proc.stdout)
                return
        out = self.proc.stdout.read() if self.proc.poll() is not None else ""
        harness_base.stop(self.proc)
        raise PortClash("sim on %d did not start: %s" % (self.port, out))

    def kill(self):
        self.proc.kill()
        self.proc.wait(5)

    def close(self):
        if self.proc:
            harness_base.stop(self.proc)


class TestServers(FakeUpstreams):
    """The fake upstreams (tests/common/fake_openai.py: echo what they received, slow streams on
    request), their stderr (tracebacks of clients that went away, which the abuse and abort
    scenarios cause on purpose) in a file, not the terminal."""

    def __init__(self, names):
        self._err = tempfile.TemporaryFile()
        super().__init__(names, stderr=self._err)

    def close(self):
        super().close()
        self._err.close()


class DirectUpstream:
    """A separate Envoy answering a fixed chat completion from several listeners
    (bench_overhead's upstream): never the bottleneck of a gateway soak."""

    def __init__(self, n, workdir):
        def start():
            ports = free_ports(n + 1)
            self.addrs = ["127.0.0.1:%d" % p for p in ports[:n]]
            return envoy_harness.Envoy(bench_overhead.upstream_bootstrap(ports[:n], ports[n]), workdir,
                                       concurrency=1, log_level="warn")
        self.envoy = envoy_harness.retry_on_port_clash(start)

    def close(self):
        self.envoy.close()


# ---------------------------------------------------------------------------------------------
# the gateway


def llmproxy_config(endpoints, **extra):
    cfg = {
        "protocol": "openai",
        "algorithm": "inference_lb",
        "model_mapping_rule": {"m": {"rules": [{"scene_name": "soak", "cluster": "pool", "backend": "vllm"}]}},
        "clusters": {"pool": {"endpoints": list(endpoints)}},
    }
    cfg.update(extra)
    return cfg


def gateway(endpoints, workdir, concurrency=2, log_level="warn", **extra):
    """Envoy + our module in front of `endpoints` (one cluster "pool", model "m")."""
    def start():
        listen, admin = free_ports(2)
        boot = envoy_harness.envoy_bootstrap(listen, admin, [envoy_harness.static_cluster("pool", endpoints)],
                                             llmproxy_config(endpoints, **extra), default_cluster="pool")
        return envoy_harness.Envoy(boot, workdir, concurrency=concurrency, log_level=log_level)
    if not envoy_harness.MODULE.exists():
        raise RuntimeError("%s missing: make envoy-module" % envoy_harness.MODULE)
    return envoy_harness.retry_on_port_clash(start)


def in_flight(m):
    """(router in flight, sum of per-endpoint in flight, shim in flight)."""
    return (m.total("llmproxy_in_flight_requests"), m.total("llmproxy_endpoint_in_flight_requests"),
            m.total("llmproxy_envoy_in_flight"))


def wait_idle(port, timeout=15):
    """Waits until every in-flight counter of the gateway is back to zero; returns the last
    reading (in_flight tuple, per-endpoint values, metrics)."""
    deadline = time.time() + timeout
    while True:
        m = metrics(port)
        f = in_flight(m)
        per_ep = {l.get("endpoint"): v for l, v in m.select("llmproxy_endpoint_in_flight_requests")}
        if f == (0, 0, 0) and all(v == 0 for v in per_ep.values()):
            return f, per_ep, m
        if time.time() > deadline:
            return f, per_ep, m
        time.sleep(0.1)


def chat_body(text, stream=False, **extra):
    b = {"model": "m", "messages": [{"role": "user", "content": text}]}
    if stream:
        b["stream"] = True
    b.update(extra)
    return json.dumps(b).encode()


# ---------------------------------------------------------------------------------------------
# a keep-alive load generator that records every response (for the fault scenarios)


class Record:
    __slots__ = ("t0", "t1", "status", "served_by", "error")

    def __init__(self, t0, t1, status, served_by, error):
        self.t0, self.t1, self.status, self.served_by, self.error = t0, t1, status, served_by, error


class KeepAliveClosed(Exception):
    """The server closed a reused keep-alive connection before sending any byte of the answer
    (the usual race when a server shuts an idle connection down, e.g. at a reload)."""


async def read_response(reader):
    """One HTTP/1.1 response: (status, headers, body)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            raise KeepAliveClosed() from e
        raise
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for l in lines[1:]:
        if l:
            k, _, v = l.partition(":")
            headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size + 2)
            del body[-2:]
        return status, headers, bytes(body)
    n = int(headers.get("content-length", "0"))
    return status, headers, await reader.readexactly(n)


class Loader:
    """`connections` keep-alive HTTP/1.1 connections in a background thread, each sending the
    next request as soon as the previous answer arrived, until stop(). make_body(i) gives the
    i-th request body. Every response is recorded with its time, status and x-served-by."""

    def __init__(self, port, connections, make_body=None, path=CHAT, timeout=30, rate=None):
        self.port, self.connections, self.path, self.timeout = port, connections, path, timeout
        self.interval = connections / rate if rate else 0.0  # per connection, seconds
        self.make_body = make_body or (lambda i: chat_body("soak request %d %s" % (i, "x" * (i % 97))))
        self.records = []
        self._stop = threading.Event()
        self._n = 0
        self.t_start = time.time()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()

    async def _main(self):
        await asyncio.gather(*(self._conn() for _ in range(self.connections)))

    async def _conn(self):
        writer = None
        used = 0  # requests answered on the current connection
        next_t = time.time()
        while not self._stop.is_set():
            if self.interval:
                next_t += self.interval
                await asyncio.sleep(max(0.0, next_t - time.time()))
            t0 = time.time()
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 5)
                    used = 0
                self._n += 1
                body = self.make_body(self._n)
                writer.write(b"POST %s HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (self.path.encode(), len(body), body))
                await writer.drain()
                status, headers, _ = await asyncio.wait_for(read_response(reader), self.timeout)
                self.records.append(Record(t0, time.time(), status, headers.get("x-served-by"), None))
                used += 1
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                    writer = None
            except Exception as e:
                kind = type(e).__name__
                if used and isinstance(e, (KeepAliveClosed, ConnectionResetError, BrokenPipeError)):
                    kind = "KeepAliveClosed"  # nothing answered on a reused connection: a client retries
                self.records.append(Record(t0, time.time(), None, None, kind))
                if writer is not None:
                    writer.close()
                    writer = None
                await asyncio.sleep(0.01)
        if writer is not None:
            writer.close()

    def stop(self):
        self._stop.set()
        self._thread.join(self.timeout + 10)
        return self.records

    def window(self, t_from, t_to):
        return [r for r in self.records if t_from <= r.t1 < t_to]


def summarize(records):
    ok = sum(1 for r in records if r.status == 200)
    by_status = {}
    for r in records:
        k = str(r.status) if r.status is not None else "error:" + r.error
        by_status[k] = by_status.get(k, 0) + 1
    lat = sorted(r.t1 - r.t0 for r in records if r.status == 200)
    return {"requests": len(records), "ok": ok, "not_ok": len(records) - ok, "by_status": by_status,
            "p50_ms": round(lat[len(lat) // 2] * 1000, 2) if lat else None,
            "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2) if lat else None}


# ---------------------------------------------------------------------------------------------
# wrk


def wrk_script(path, total_per_thread, body_bytes=400):
    """Lua for wrk: POST chat bodies, every prompt distinct (a counter at its start, so the
    prefix index keeps learning new prefixes and must evict); each thread stops after
    total_per_thread responses and counts non-200 answers itself. wrk itself still waits for
    its -d duration: the caller interrupts it (SIGINT prints the summary) once done."""
    filler = "lorem ipsum dolor sit amet " * (body_bytes // 27 + 1)
    Path(path).write_text("""
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
local filler = %s
local limit = %d
n, sent, bad = 0, 0, 0  -- globals: done() reads each thread's `bad` with thread:get
tid = 0
local threads = {}
function setup(thread)
  tid = tid + 1
  thread:set("tid", tid)
  table.insert(threads, thread)
end
function request()
  sent = sent + 1
  return wrk.format(nil, "/v1/chat/completions", nil,
    '{"model":"m","messages":[{"role":"user","content":"t' .. tostring(tid) .. ' r' .. sent .. ' ' .. filler .. '"}]}')
end
function response(status, headers, body)
  n = n + 1
  if status ~= 200 then bad = bad + 1 end
  if n >= limit then wrk.thread:stop() end
end
function done(summary, latency, requests)
  local total_bad = 0
  for _, t in ipairs(threads) do total_bad = total_bad + t:get("bad") end
  io.write(string.format("SOAK non200=%%d\\n", total_bad))
end
""" % (json.dumps(filler[:body_bytes]), total_per_thread))


def _wrk_seconds(out):
    """wrk's run time: "... requests in 1.62m, ..." (us, ms, s, m or h)."""
    m = re.search(r"requests in ([\d.]+)(us|ms|s|m|h),", out)
    if not m:
        return None
    return round(float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2)], 2)


def parse_wrk(out):
    res = {"requests": int(re.search(r"(\d+) requests in", out).group(1)),
           "seconds": _wrk_seconds(out),
           "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    m = re.search(r"SOAK non200=(\d+)", out)
    res["non200"] = int(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()))) if m else {}
    for pct in ("50", "99"):
        m = re.search(r"^\s+%s(?:\.0+)?%%\s+([\d.]+)(us|ms|s)\s*$" % pct, out, re.M)
        if m:
            res["p%s_ms" % pct] = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    return res


def ensure_wrk():
    import shutil
    if shutil.which("wrk"):
        return
    if os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], env=env, capture_output=True).returncode:
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
            subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], env=env, check=True)
    if not shutil.which("wrk"):
        raise RuntimeError("wrk missing: apt-get install -y wrk")
