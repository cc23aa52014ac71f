"""The nginx side of the test harness (tests/nginx, the nginx benchmark, the soak), on top of
tests/common/harness_base.py (ports, processes, the fake upstreams, HTTP, metrics): an nginx
instance built from examples/nginx.conf, and waiting until its workers have settled. Everything
runs on 127.0.0.1 and is stopped by its owner (fixtures), also on failure."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "common"))

import harness_base  # noqa: E402
# the shared part (tests/common/harness_base.py), re-exported as harness.<name>
from harness_base import (BUILD_DIR, CHAT, check_cache_feedback, check_forced_stream_usage, check_response_chains, check_stored_answer_found_elsewhere, check_anthropic_messages, check_sglang_generate, check_media_parts, check_llama_completion, check_tool_definitions, check_cache_salt, GENERATE, LLAMA_COMPLETION, settled_saves, responses_answer, RESPONSES, metadata_center_saves, COMPLETIONS, POOLS, FakeUpstreams, LoggedProcess, MetadataCenter,  # noqa: E402,F401
                          Metrics, PortClash, chat, free_port, free_ports, refused_port, log_tails_on_failure, metrics,
                          pools_config, raise_fd_limit, random_text, read_sse, request_log_lines, stop, wait_port, wait_ready,
                          wait_until)

ROOT = harness_base.REPO
EXAMPLE = ROOT / "examples" / "nginx.conf"
NATIVE_EXAMPLE = ROOT / "examples" / "nginx-native.conf"
LIB = BUILD_DIR / "libllmproxy.so"
MODULE = BUILD_DIR / "ngx_http_llmproxy_module.so"
NGINX = os.environ.get("LLMPROXY_NGINX", shutil.which("nginx") or "/usr/sbin/nginx")
# The example's shared routing state for all workers (render_example's `shared_state` replaces it).
SHARED_STATE = 'shared_state = { size = "64m" }'


def render_example(port, workers, config_path, passthrough, client_max_body_size="2m", body_buffer=None,
                   read_timeout=None, extra_locations=None, shared_state=None):
    """examples/nginx.conf with the test's port, worker count, library config, passthrough
    servers and debug headers. Every substitution must match exactly once, so the tests keep
    exercising the example as shipped. Optional: another client_body_buffer_size (e.g. "16k",
    to spool bodies to client_body_temp_path), proxy_read_timeout, test-only locations
    added to the server block, and `shared_state`: None keeps the example's shared routing
    state (SHARED_STATE), False gives every worker its own state, a size (e.g. "80m") resizes
    the region."""
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
    if shared_state is not None:
        sub(re.escape(SHARED_STATE),
            "shared_state = false" if shared_state is False else 'shared_state = { size = "%s" }' % shared_state)
    if extra_locations:
        block = "\n" + extra_locations.rstrip() + "\n\n        location = /llmproxy/metrics {"
        sub(r"\n        location = /llmproxy/metrics \{", lambda m: block)
    sub(r"(        server 127\.0\.0\.1:800\d;\n)+",
        "".join("        server %s;\n" % a for a in passthrough))
    return text


def render_native_example(port, workers, config_path, passthrough, client_max_body_size="2m", body_buffer=None,
                          read_timeout=None, extra_locations=None, shared_state=None, master_process=True):
    """examples/nginx-native.conf (the native module, no Lua) with the same substitutions as
    render_example; `master_process=False` runs one process in the foreground (valgrind)."""
    text = NATIVE_EXAMPLE.read_text()

    def sub(pattern, repl, count=1):
        nonlocal text
        text, n = re.subn(pattern, repl, text)
        assert n == count, "examples/nginx-native.conf: %r matched %d times, expected %d" % (pattern, n, count)

    sub(r"worker_processes 2;", "worker_processes %d;" % workers)
    sub(r"listen 127\.0\.0\.1:8080 reuseport backlog=4096;", "listen 127.0.0.1:%d reuseport backlog=4096;" % port)
    sub(r"llmproxy_config examples/config\.json;", "llmproxy_config %s;" % config_path)
    sub(r"llmproxy_debug_headers off;", "llmproxy_debug_headers on;")
    sub(r"client_max_body_size 9m;", "client_max_body_size %s;" % client_max_body_size)
    if body_buffer:
        sub(r"client_body_buffer_size 9m;", "client_body_buffer_size %s;" % body_buffer)
    if read_timeout:
        sub(r"proxy_read_timeout 600s;", "proxy_read_timeout %s;" % read_timeout)
    if shared_state is not None:
        sub(r"llmproxy_shared_state 64m;",
            "" if shared_state is False else "llmproxy_shared_state %s;" % shared_state)
    if not master_process:
        text = "master_process off;\n" + text
    if extra_locations:
        block = "\n" + extra_locations.rstrip() + "\n\n        location = /llmproxy/metrics {"
        sub(r"\n        location = /llmproxy/metrics \{", lambda m: block)
    sub(r"(        server 127\.0\.0\.1:800\d;\n)+",
        "".join("        server %s;\n" % a for a in passthrough))
    return text


class Nginx(LoggedProcess):
    """nginx (master + workers) in its own prefix under /tmp, from examples/nginx.conf.
    `private`: the prefix stays 0700 (mkdtemp's mode), like a home directory: when we are
    root, the workers run as `nobody` and cannot enter it. Other keywords go to
    render_example."""

    kind = "nginx error"

    host = "lua"

    def __init__(self, llmproxy_config, passthrough, workers=2, private=False, wrapper=(), ready_timeout=15, **render):
        if not LIB.exists():
            raise RuntimeError("%s missing: run `make build`" % LIB)
        if self.host == "native" and not MODULE.exists():
            raise RuntimeError("%s missing: run `make nginx-module`" % MODULE)
        self.workers = workers
        self.killed = set()  # worker pids a test killed on purpose (kill_worker)
        self.prefix = Path(tempfile.mkdtemp(prefix="llmproxy-nginx-"))
        if not private:
            os.chmod(self.prefix, 0o755)  # workers run as `nobody` when we are root
        (self.prefix / "build" / "nginx").mkdir(parents=True)
        # A private copy: `make build` overwrites build/libllmproxy.so in place, which would
        # crash workers that have it mapped (seen while another build ran during the tests).
        shutil.copy2(LIB, self.prefix / "build" / "libllmproxy.so")
        if self.host == "native":
            shutil.copy2(MODULE, self.prefix / "build" / MODULE.name)
        os.symlink(ROOT / "openresty", self.prefix / "openresty")
        cfg = self.prefix / "llmproxy.json"
        cfg.write_text(json.dumps(llmproxy_config))
        self.conf = self.prefix / "nginx.conf"
        self.log_path = self.error_log = self.prefix / "build" / "nginx" / "error.log"
        for attempt in range(3):
            # a port found free may be taken by another test before nginx binds it: retry
            self.port = free_port()
            self.conf.write_text(self.render(self.port, workers, cfg, passthrough, **render))
            self.proc = subprocess.Popen(list(wrapper) + [NGINX, "-p", "%s/" % self.prefix, "-c", str(self.conf), "-g", "daemon off;"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
            try:
                self.wait_ready(timeout=ready_timeout)
                return
            except Exception as e:
                self.close(keep_prefix=True)
                if not isinstance(e, PortClash) or attempt == 2:
                    shutil.rmtree(self.prefix, ignore_errors=True)
                    raise
                self.error_log.unlink(missing_ok=True)

    @staticmethod
    def render(*args, **kw):
        return render_example(*args, **kw)

    def nginx_cmd(self, *args):
        return subprocess.run([NGINX, "-p", "%s/" % self.prefix, "-c", str(self.conf)] + list(args),
                              capture_output=True, text=True, timeout=30)

    def _ready(self):
        m = metrics(self.port)
        n = m.value("llmproxy_nginx_workers")
        return n == self.workers and m.value("llmproxy_nginx_stale_snapshots") == 0 or "%s workers" % n

    def _startup_log(self):
        """What nginx said before it exited (stderr), and its error log."""
        err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
        return err + self.log_tail()

    def wait_ready(self, timeout=15):
        """Until every worker has built its router and answers the metrics location."""
        wait_ready(self.proc, self._ready, self._startup_log, "nginx", timeout)

    def worker_pids(self):
        out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return sorted(int(l.split()[0]) for l in out.stdout.splitlines() if "worker process" in l)

    def kill_worker(self, pid, sig=signal.SIGKILL):
        """Sends `sig` to one of this nginx's worker processes (a child of our master, checked
        first), recorded as a deliberate kill: close() keeps no crash evidence for it."""
        assert pid in self.worker_pids(), "%d is not a worker of nginx %d" % (pid, self.proc.pid)
        self.killed.add(pid)
        os.kill(pid, sig)

    def crashes(self):
        """Lines of the error log that say a worker died of a signal nobody sent on purpose."""
        return [l for l in self.log_text().splitlines() if "exited on signal" in l
                and not any("process %d exited on signal" % p in l for p in self.killed)]

    def close(self, keep_prefix=False):
        stop(self.proc, signal.SIGQUIT, timeout=10, group=True)  # graceful: lets exit_worker run
        log = self.log_text()
        if self.crashes():  # keep the evidence of a crashed worker
            keep = Path(tempfile.gettempdir()) / ("llmproxy-nginx-crash-%d.log" % self.proc.pid)
            keep.write_text(log)
        if not keep_prefix:
            shutil.rmtree(self.prefix, ignore_errors=True)


class NativeNginx(Nginx):
    """The same nginx from examples/nginx-native.conf: the native module, no Lua. Its
    llmproxy_nginx_* counters are one set for the whole nginx (a shared zone, no worker
    label); the router's own metrics are those of the worker that answers."""

    host = "native"

    @staticmethod
    def render(*args, **kw):
        return render_native_example(*args, **kw)

    def _ready(self):
        m = metrics(self.port)
        n = m.value("llmproxy_nginx_workers")
        return n == self.workers or "%s workers" % n


HOSTS = {"lua": Nginx, "native": NativeNginx}


# ---------------------------------------------------------------------------------------------
# HTTP and metrics


def request(port, method, path, body=None, headers=None, timeout=30):
    """One request on a fresh connection, closed after the answer (so reuseport spreads requests
    over the workers). Returns (status, headers lower-cased, body bytes)."""
    return harness_base.request(port, method, path, body, headers, timeout, close=True)[:3]


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
