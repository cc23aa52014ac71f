"""PENDING decisions in a real Envoy: the test variant of the module (build/test-pending, built by
`make test-envoy`) answers every pick PENDING and decides on a helper thread, so the filter must
resume through Envoy's scheduler (scheduler_new, commit from a foreign thread, on_scheduled on the
worker, continue_decoding)."""

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import harness
from conftest import POOLS
from harness import CHAT, metrics, wait_in_flight_zero

PENDING_DIR = harness.BUILD_DIR / "test-pending"


def start_pending_gateway(servers, tmp_path_factory, env):
    if not (PENDING_DIR / "libllmproxy_envoy.so").exists():
        pytest.fail("%s missing: run `make test-envoy`" % (PENDING_DIR / "libllmproxy_envoy.so"))

    def start():
        listen_port, admin_port = harness.free_ports(2)
        endpoints = {pool: [servers.addr(n) for n in names] for pool, names in POOLS.items()}
        cfg = {"protocol": "openai", "algorithm": "inference_lb",
               "model_mapping_rule": {
                   "m-a": {"rules": [{"scene_name": "chat-a", "cluster": "pool_a", "backend": "vllm"}]},
                   "m-b": {"rules": [{"scene_name": "chat-b", "cluster": "pool_b", "backend": "sglang"}]}},
               "clusters": {pool: {"endpoints": eps} for pool, eps in endpoints.items()}}
        clusters = [harness.static_cluster(pool, eps) for pool, eps in endpoints.items()]
        boot = harness.envoy_bootstrap(listen_port, admin_port, clusters, cfg, default_cluster="pool_a")
        return harness.Envoy(boot, tmp_path_factory.mktemp("envoy-pending"), module_dir=PENDING_DIR, env=env)

    return harness.retry_on_port_clash(start)


@pytest.fixture(scope="module")
def pending_gateway(servers, tmp_path_factory):
    gw = start_pending_gateway(servers, tmp_path_factory, {"LLMPROXY_TEST_PENDING_DELAY_MS": "150"})
    yield gw
    gw.close()


@pytest.fixture(scope="module")
def overdue_gateway(servers, tmp_path_factory):
    """Every decision comes 1 s late, past the shim's 200 ms deadline."""
    gw = start_pending_gateway(servers, tmp_path_factory, {"LLMPROXY_TEST_PENDING_DELAY_MS": "1000",
                                                           "LLMPROXY_TEST_PICK_DEADLINE_MS": "200"})
    yield gw
    gw.close()


def chat(model, text):
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def test_pending_decisions_resume_through_scheduler(pending_gateway):
    before = metrics(pending_gateway)["llmproxy_envoy_pending_total"]

    def one(i):
        model = "m-a" if i % 2 else "m-b"
        status, hdrs, data, secs = harness.request(pending_gateway.port, "POST", CHAT, chat(model, "async %d" % i))
        served = json.loads(data).get("served_by") if status == 200 else None
        return status, served in POOLS["pool_a" if model == "m-a" else "pool_b"], secs

    with ThreadPoolExecutor(20) as ex:
        results = list(ex.map(one, range(40)))
    assert all(r[0] == 200 and r[1] for r in results), results[:5]
    assert min(r[2] for r in results) >= 0.14  # held until the helper thread decided
    assert metrics(pending_gateway)["llmproxy_envoy_pending_total"] - before == 40
    wait_in_flight_zero(pending_gateway)


def test_pending_error_is_a_local_reply(pending_gateway):
    status, hdrs, data, _ = harness.request(pending_gateway.port, "POST", CHAT, chat("no-such-model", "x"))
    assert status == 404
    assert hdrs["content-type"] == "application/json"
    assert json.loads(data)["error"]["code"] == "model_not_found"
    wait_in_flight_zero(pending_gateway)


def test_client_gone_before_pending_decision(pending_gateway):
    before = metrics(pending_gateway)
    for i in range(3):
        payload = json.dumps(chat("m-a", "abandoned %d" % i)).encode()
        sock = socket.create_connection(("127.0.0.1", pending_gateway.port), timeout=5)
        sock.sendall(("POST %s HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                      % (CHAT, len(payload))).encode() + payload)
        time.sleep(0.03)  # the decision comes after 150 ms
        sock.close()
    time.sleep(0.4)  # the helper threads deliver decisions for streams that are gone
    wait_in_flight_zero(pending_gateway)
    after = metrics(pending_gateway)
    # Finished by the callback with 499: not counted as an endpoint failure.
    assert after['llmproxy_finished_requests_total{status="none"}'] == before['llmproxy_finished_requests_total{status="none"}']
    assert after['llmproxy_finished_requests_total{status="4xx"}'] >= before['llmproxy_finished_requests_total{status="4xx"}'] + 3
    status, _, _, _ = harness.request(pending_gateway.port, "POST", CHAT, chat("m-a", "still fine"))
    assert status == 200


def test_overdue_decision_is_made_locally_within_the_deadline(overdue_gateway):
    gw = overdue_gateway
    before = metrics(gw)

    def one(i):
        model = "m-a" if i % 2 else "m-b"
        status, _, data, secs = harness.request(gw.port, "POST", CHAT, chat(model, "overdue %d" % i), timeout=10)
        served = json.loads(data).get("served_by") if status == 200 else None
        return status, served in POOLS["pool_a" if model == "m-a" else "pool_b"], secs

    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(one, range(6)))
    assert all(r[0] == 200 and r[1] for r in results), results
    # Answered at the 200 ms deadline (plus slack), not when the late decision came (1 s).
    assert all(0.18 <= r[2] < 0.8 for r in results), [round(r[2], 3) for r in results]
    after = metrics(gw)
    assert after["llmproxy_envoy_pending_timeouts_total"] - before["llmproxy_envoy_pending_timeouts_total"] == 6
    # The late decisions are finished by the callback (499, not an endpoint failure): nothing leaks.
    wait_in_flight_zero(gw)
    time.sleep(1.2)
    after = metrics(gw)
    assert after["llmproxy_envoy_in_flight"] == 0
    assert after['llmproxy_finished_requests_total{status="4xx"}'] - before['llmproxy_finished_requests_total{status="4xx"}'] == 6
    assert after['llmproxy_finished_requests_total{status="2xx"}'] - before['llmproxy_finished_requests_total{status="2xx"}'] == 6
