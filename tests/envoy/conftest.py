import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "common"))  # shared harness and cases

import harness  # noqa: E402

MAX_BODY = 4 * 1024 * 1024

POOLS = harness.POOLS  # pool -> fake upstream names (tests/common/harness_base.py)


@pytest.fixture(scope="session")
def module_built():
    if not harness.MODULE.exists():
        pytest.fail("%s missing: run `make envoy-module`" % harness.MODULE)
    return harness.MODULE


@pytest.fixture(scope="session")
def servers():
    names = [n for pool in POOLS.values() for n in pool]
    with harness.FakeUpstreams(names) as s:
        yield s


@pytest.fixture(scope="session")
def gateway(module_built, servers, tmp_path_factory):
    """Envoy (2 workers) + our module in front of the test servers."""
    envoy = harness.retry_on_port_clash(lambda: start_gateway(servers, tmp_path_factory))
    yield envoy
    envoy.close()


def start_gateway(servers, tmp_path_factory):
    listen_port, admin_port = harness.free_ports(2)
    down_port = harness.refused_port()
    down = "127.0.0.1:%d" % down_port
    llmproxy = harness.pools_config(servers, down, MAX_BODY, {
        "m-t": [{"scene_name": "chat-t", "cluster": "pool_a", "backend": "vllm", "target_model": "served-t"}],
        "m-tr": [{"scene_name": "triton", "cluster": "pool_b", "backend": "triton", "target_model": "ensemble",
                  "chat_template": "llama3"}],
        # only the down endpoint: every request fails to connect (the request log's test)
        "m-down": [{"scene_name": "chat-down", "cluster": "pool_down", "backend": "vllm"}],
        # one endpoint: every request of m-one meets the others there
        "m-one": [{"scene_name": "chat-one", "cluster": "pool_one", "backend": "vllm"}],
    }, clusters={"pool_down": [down], "pool_one": [servers.addr("b2")]})
    endpoints = {pool: c["endpoints"] for pool, c in llmproxy["clusters"].items()}
    clusters = [harness.static_cluster(pool, eps) for pool, eps in endpoints.items()]
    request_log = tmp_path_factory.mktemp("request-log") / "requests.log"
    llmproxy["log"] = {"enabled": True, "path": str(request_log), "include_candidates": True}
    # every stream here asks the server for usage; clients that did not ask never see it
    llmproxy["force_stream_usage"] = True
    bootstrap = harness.envoy_bootstrap(listen_port, admin_port, clusters, llmproxy, default_cluster="pool_a")
    envoy = harness.Envoy(bootstrap, tmp_path_factory.mktemp("envoy"))
    envoy.request_log = request_log
    envoy.down = down
    envoy.endpoints = endpoints
    envoy.servers = servers
    return envoy


# a failed test's report shows the log tail of every Envoy it used
pytest_runtest_makereport = pytest.hookimpl(hookwrapper=True)(harness.log_tails_on_failure)
