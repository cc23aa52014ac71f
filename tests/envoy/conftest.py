import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "common"))  # shared test cases

import harness  # noqa: E402

MAX_BODY = 4 * 1024 * 1024

POOLS = {
    "pool_a": ["a1", "a2", "a3"],
    "pool_b": ["b1", "b2"],
    "pool_d": ["d1", "d2"],  # plus one endpoint where nothing listens
}


@pytest.fixture(scope="session")
def module_built():
    if not harness.MODULE.exists():
        pytest.fail("%s missing: run `make envoy-module`" % harness.MODULE)
    return harness.MODULE


@pytest.fixture(scope="session")
def servers():
    names = [n for pool in POOLS.values() for n in pool]
    s = harness.retry_on_port_clash(lambda: harness.Servers(names))
    yield s
    s.close()


@pytest.fixture(scope="session")
def gateway(module_built, servers, tmp_path_factory):
    """Envoy (2 workers) + our module in front of the test servers."""
    envoy = harness.retry_on_port_clash(lambda: start_gateway(servers, tmp_path_factory))
    yield envoy
    envoy.close()


def start_gateway(servers, tmp_path_factory):
    down_port, listen_port, admin_port = harness.free_ports(3)
    down = "127.0.0.1:%d" % down_port
    endpoints = {pool: [servers.addr(n) for n in names] for pool, names in POOLS.items()}
    endpoints["pool_d"].insert(0, down)
    llmproxy = {
        "protocol": "openai",
        "algorithm": "inference_lb",
        "model_mapping_rule": {
            "m-a": {"rules": [{"scene_name": "chat-a", "cluster": "pool_a", "backend": "vllm"}]},
            "m-b": {"rules": [{"scene_name": "chat-b", "cluster": "pool_b", "backend": "sglang"}]},
            "m-d": {"rules": [{"scene_name": "chat-d", "cluster": "pool_d", "backend": "vllm"}]},
            "m-t": {"rules": [{"scene_name": "chat-t", "cluster": "pool_a", "backend": "vllm",
                               "target_model": "served-t"}]},
            "m-tr": {"rules": [{"scene_name": "triton", "cluster": "pool_b", "backend": "triton",
                                "target_model": "ensemble", "chat_template": "llama3"}]},
        },
        "clusters": {pool: {"endpoints": eps} for pool, eps in endpoints.items()},
        "max_body_bytes": MAX_BODY,
    }
    clusters = [harness.static_cluster(pool, eps) for pool, eps in endpoints.items()]
    bootstrap = harness.envoy_bootstrap(listen_port, admin_port, clusters, llmproxy, default_cluster="pool_a")
    envoy = harness.Envoy(bootstrap, tmp_path_factory.mktemp("envoy"))
    envoy.down = down
    envoy.endpoints = endpoints
    envoy.servers = servers
    return envoy


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed and "gateway" in item.funcargs:
        rep.sections.append(("envoy log (tail)", item.funcargs["gateway"].log_tail()))
