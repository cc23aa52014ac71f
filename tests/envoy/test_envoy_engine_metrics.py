"""engine_metrics through real Envoy: the router's reader thread reads every endpoint's own
Prometheus page (the fake upstreams serve what the test tells them: a busy engine, one that
hangs, one that returns garbage); picks stay off the engine that says it is busy with traffic
this gateway never sent, and the pages that hang or lie cost the requests nothing."""

import json
import time

import pytest

import harness
from conftest import POOLS
from harness import chat, metrics, wait_in_flight_zero

BUSY = ("# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="m-a"} 6\n'
        'vllm:num_requests_waiting{model_name="m-a"} 40\n')
IDLE = ('vllm:num_requests_running{model_name="m-a"} 0\n'
        'vllm:num_requests_waiting{model_name="m-a"} 0\n')


def set_metrics(servers, name, mode, page=""):
    port = servers.ports[name]
    status, _, data, _ = harness.request(port, "POST", "/test/metrics", {"mode": mode, "page": page})
    assert status == 200, data


@pytest.fixture()
def engines_gateway(module_built, servers, tmp_path_factory):
    a1, a2, a3 = POOLS["pool_a"]
    set_metrics(servers, a1, "page", BUSY)
    set_metrics(servers, a2, "hang")
    set_metrics(servers, a3, "garbage")

    def start():
        listen_port, admin_port = harness.free_ports(2)
        endpoints = [servers.addr(n) for n in POOLS["pool_a"]]
        cfg = {"protocol": "openai", "algorithm": "prefix_cost",
               "model_mapping_rule": {"m-a": {"rules": [{"scene_name": "chat-a", "cluster": "pool_a",
                                                         "backend": "vllm"}]}},
               "clusters": {"pool_a": {"endpoints": endpoints}},
               "engine_metrics": {"enabled": True, "period_ms": 100, "timeout_ms": 100, "stale_ms": 5000}}
        boot = harness.envoy_bootstrap(listen_port, admin_port, [harness.static_cluster("pool_a", endpoints)], cfg,
                                       default_cluster="pool_a")
        return harness.Envoy(boot, tmp_path_factory.mktemp("envoy-engines"))

    gw = harness.retry_on_port_clash(start)
    try:
        yield gw
    finally:
        gw.close()
        for n in POOLS["pool_a"]:
            set_metrics(servers, n, "off")


def reads(gw, result):
    return metrics(gw).total("llmproxy_engine_metrics_reads_total", result=result)


def test_a_busy_engine_is_avoided_and_hanging_or_garbage_pages_cost_nothing(engines_gateway, servers):
    gw = engines_gateway
    a1, a2, a3 = POOLS["pool_a"]
    harness.wait_until(lambda: reads(gw, "ok") >= 1 and reads(gw, "failed") >= 2, timeout=10,
                       what="the busy page read, the hanging and the garbage ones failed")
    served = {}
    started = time.time()
    for i in range(30):  # new prompts: nothing cached anywhere
        status, _, data, _ = harness.request(gw.port, "POST", "/v1/chat/completions",
                                             chat("m-a", "a brand new question %d about engines" % i))
        assert status == 200, data[:300]
        name = json.loads(data)["served_by"]
        served[name] = served.get(name, 0) + 1
    # the hanging page (100 ms per read, on the reader thread) never showed on the requests
    assert time.time() - started < 10
    assert a1 not in served, served
    assert sum(served.values()) == 30 and set(served) <= {a2, a3}, served
    # the engine catches up (idle now): it gets traffic again once its reading says so
    set_metrics(servers, a1, "page", IDLE)
    ok = reads(gw, "ok")
    harness.wait_until(lambda: reads(gw, "ok") >= ok + 2, timeout=10, what="the idle page read")
    again = set()
    for i in range(30):
        status, _, data, _ = harness.request(gw.port, "POST", "/v1/chat/completions",
                                             chat("m-a", "another new question %d, engine idle" % i))
        assert status == 200, data[:300]
        again.add(json.loads(data)["served_by"])
    assert a1 in again, again
    m = metrics(gw)
    assert m.total("llmproxy_engine_metrics_reads_total", result="failed") >= 2
    assert m.value("llmproxy_picks_total", outcome="routed") >= 60
    wait_in_flight_zero(gw)
