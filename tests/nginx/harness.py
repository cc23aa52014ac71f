"""Helpers of the nginx end-to-end tests: test upstreams, an nginx instance built from
examples/nginx.conf, HTTP helpers and a Prometheus text parser. Everything runs on 127.0.0.1
and is stopped by its owner (fixtures), also on failure."""

import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
EXAMPLE = ROOT / "examples" / "nginx.conf"
BUILD = Path(os.environ.get("LLMPROXY_BUILD_DIR", ROOT / "build"))
LIB = BUILD / "libllmproxy.so"
NGINX = os.environ.get("LLMPROXY_NGINX", shutil.which("nginx") or "/usr/sbin/nginx")
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 16384) if hard != resource.RLIM_INFINITY else 16384
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Upstreams:
    """The OpenAI-compatible test servers (tests/nginx/upstream.py), one process."""

    def __init__(self, names):
        self.proc = subprocess.Popen([sys.executable, str(HERE / "upstream.py")] + ["%s=0" % n for n in names],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.close()
            raise RuntimeError("upstreams did not start: %r" % line)
        self.ports = json.loads(line[6:])

    def addr(self, name):
        return "127.0.0.1:%d" % self.ports[name]

    def name_of(self, addr):
        for n, p in self.ports.items():
            if addr == "127.0.0.1:%d" % p:
                return n
        return None

    def close(self, keep_prefix=False):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(5)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)


def render_example(port, workers, config_path, passthrough, client_max_body_size="2m", body_buffer=None,
                   read_timeout=None, extra_locations=None):
    """examples/nginx.conf with the test's port, worker count, library config, passthrough
    servers and debug headers. Every substitution must match exactly once, so the tests keep
    exercising the example as shipped. Optional: another client_body_buffer_size (e.g. "16k",
    to spool bodies to client_body_temp_path), proxy_read_timeout, and test-only locations
    added to the server block."""
    text = EXAMPLE.read_text()

    def sub(pattern, repl, count=1):
        nonlocal text
        text, n = re.subn(pattern, repl, text)
        assert n == count, "examples/nginx.conf: %r matched %d times, expected %d" % (pattern, n, count)

    sub(r"worker_processes 2;", "worker_processes %d;" % workers)
    sub(r"listen 127\.0\.0\.1:8080 reuseport backlog=4096;", "listen 127.0.0.1:%d reuseport backlog=4096;" % port)
    sub(r'config_file = ngx\.config\.prefix\(\) \.\. "examples/config\.json"',
        'config_file = "%s"' % config_path)
    sub(r"debug_headers = false", "debug_headers = true")
    sub(r"client_max_body_size 9m;", "client_max_body_size %s;" % client_max_body_size)
    if body_buffer:
        sub(r"client_body_buffer_size 9m;", "client_body_buffer_size %s;" % body_buffer)
    if read_timeout:
        sub(r"proxy_read_timeout 600s;", "proxy_read_timeout %s;" % read_timeout)
    if extra_locations:
        block = "\n" + extra_locations.rstrip() + "\n\n        location = /llmproxy/metrics {"
        sub(r"\n        location = /llmproxy/metrics \{", lambda m: block)
    sub(r"(        server 127\.0\.0\.1:800\d;\n)+",
        "".join("        server %s;\n" % a for a in passthrough))
    return text


class Nginx:
    """nginx (master + workers) in its own prefix under /tmp, from examples/nginx.conf.
    `private`: the prefix stays 0700 (mkdtemp's mode), like a home directory: when we are
    root, the workers run as `nobody` and cannot enter it. Other keywords go to
    render_example."""

    def __init__(self, llmproxy_config, passthrough, workers=2, private=False, **render):
        if not LIB.exists():
            raise RuntimeError("%s missing: run `make build`" % LIB)
        self.workers = workers
        self.prefix = Path(tempfile.mkdtemp(prefix="llmproxy-nginx-"))
        if not private:
            os.chmod(self.prefix, 0o755)  # workers run as `nobody` when we are root
        (self.prefix / "build" / "nginx").mkdir(parents=True)
        # A private copy: `make build` overwrites build/libllmproxy.so in place, which would
        # crash workers that have it mapped (seen while another build ran during the tests).
        shutil.copy2(LIB, self.prefix / "build" / "libllmproxy.so")
        os.symlink(ROOT / "openresty", self.prefix / "openresty")
        cfg = self.prefix / "llmproxy.json"
        cfg.write_text(json.dumps(llmproxy_config))
        self.conf = self.prefix / "nginx.conf"
        self.error_log = self.prefix / "build" / "nginx" / "error.log"
        for attempt in range(3):
            # a port found free may be taken by another test before nginx binds it: retry
            self.port = free_port()
            self.conf.write_text(render_example(self.port, workers, cfg, passthrough, **render))
            self.proc = subprocess.Popen([NGINX, "-p", "%s/" % self.prefix, "-c", str(self.conf), "-g", "daemon off;"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
            try:
                self.wait_ready()
                return
            except Exception as e:
                in_use = "Address already in use" in str(e) + self.log_text()
                self.close(keep_prefix=True)
                if not in_use or attempt == 2:
                    shutil.rmtree(self.prefix, ignore_errors=True)
                    raise
                self.error_log.unlink(missing_ok=True)

    def nginx_cmd(self, *args):
        return subprocess.run([NGINX, "-p", "%s/" % self.prefix, "-c", str(self.conf)] + list(args),
                              capture_output=True, text=True, timeout=30)

    def wait_ready(self, timeout=15):
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("nginx exited: %s\n%s" % (self.proc.stderr.read().decode(), self.log_tail()))
            try:
                m = metrics(self.port)
                if m.value("llmproxy_nginx_workers") == self.workers and m.value("llmproxy_nginx_stale_snapshots") == 0:
                    return
                last = m.value("llmproxy_nginx_workers")
            except (OSError, http.client.HTTPException, AssertionError) as e:
                last = e
            time.sleep(0.05)
        raise RuntimeError("nginx not ready: %s\n%s" % (last, self.log_tail()))

    def worker_pids(self):
        out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return sorted(int(l.split()[0]) for l in out.stdout.splitlines() if "worker process" in l)

    def log_tail(self, n=60):
        try:
            return "\n".join(self.error_log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no error log)"

    def log_text(self):
        try:
            return self.error_log.read_text(errors="replace")
        except OSError:
            return ""

    def close(self, keep_prefix=False):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: lets exit_worker run
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group we started, if anything is left
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        log = self.log_text()
        if "exited on signal" in log:  # keep the evidence of a crashed worker
            keep = Path(tempfile.gettempdir()) / ("llmproxy-nginx-crash-%d.log" % self.proc.pid)
            keep.write_text(log)
        if not keep_prefix:
            shutil.rmtree(self.prefix, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# HTTP

def request(port, method, path, body=None, headers=None, timeout=30):
    """One request on a fresh connection (so reuseport spreads requests over the workers).
    Returns (status, headers lower-cased, body bytes)."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    hdrs = {"content-type": "application/json", "connection": "close"}
    hdrs.update(headers or {})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=hdrs)
        r = c.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        c.close()


def chat(model, text, stream=False, **extra):
    body = {"model": model, "messages": [{"role": "system", "content": "You are a test."},
                                         {"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
    body.update(extra)
    return body


def random_text(n, seed):
    import random
    rnd = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "lambda", "zeta"]
    out, size = [], 0
    while size < n:
        w = rnd.choice(words) + str(rnd.randint(0, 9999))
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n]


# ---------------------------------------------------------------------------------------------
# Prometheus text

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Metrics:
    def __init__(self, text):
        self.text = text
        self.samples = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = SAMPLE.match(line)
            assert m, "not a Prometheus sample: %r" % line
            labels = dict(LABEL.findall(m.group(2) or ""))
            self.samples.append((m.group(1), labels, float(m.group(3))))

    def select(self, name, **labels):
        return [(l, v) for n, l, v in self.samples
                if n == name and all(l.get(k) == str(val) for k, val in labels.items())]

    def total(self, name, **labels):
        """Sum over every worker (and any other label not given)."""
        return sum(v for _, v in self.select(name, **labels))

    def value(self, name, **labels):
        found = self.select(name, **labels)
        assert len(found) == 1, "%s %s: %d samples" % (name, labels, len(found))
        return found[0][1]

    def workers(self):
        return sorted({l["worker"] for n, l, v in self.samples if "worker" in l and n == "llmproxy_in_flight_requests"})


def metrics(port):
    status, hdrs, data = request(port, "GET", "/llmproxy/metrics", timeout=10)
    assert status == 200, data
    return Metrics(data.decode())


def wait_settled(port, timeout=10.0):
    """Waits until every worker's router has nothing in flight and every routed pick was
    finished; returns the metrics."""
    deadline = time.time() + timeout
    m = None
    while time.time() < deadline:
        m = metrics(port)
        if settled(m):
            return m
        time.sleep(0.05)
    raise AssertionError("not settled: in_flight=%s routed=%s finished=%s pending=%s" % (
        m.total("llmproxy_in_flight_requests"), m.total("llmproxy_nginx_picks_total", event="routed"),
        m.total("llmproxy_nginx_picks_total", event="finished"), m.total("llmproxy_nginx_pending_requests")))


def settled(m):
    return (m.total("llmproxy_in_flight_requests") == 0
            and m.total("llmproxy_nginx_pending_requests") == 0
            and m.total("llmproxy_nginx_picks_total", event="routed")
            == m.total("llmproxy_nginx_picks_total", event="finished"))
