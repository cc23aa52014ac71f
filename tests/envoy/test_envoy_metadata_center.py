"""The real PENDING path: with the Metadata-Center's remote cache lookups enabled, the library
answers picks PENDING and decides on its sync thread; the filter resumes through Envoy's
scheduler. Real processes: our llmproxy-metadata-center server, Envoy with the module, test
servers."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

import harness
from conftest import POOLS
from harness import chat, metrics, wait_in_flight_zero


@pytest.fixture(scope="module")
def metadata_center():
    with harness.MetadataCenter() as mc:
        yield mc.port


@pytest.fixture(scope="module")
def mc_gateway(module_built, servers, metadata_center, tmp_path_factory):
    def start():
        listen_port, admin_port = harness.free_ports(2)
        endpoints = [servers.addr(n) for n in POOLS["pool_a"]]
        cfg = {"protocol": "openai", "algorithm": "inference_lb",
               "model_mapping_rule": {"m-a": {"rules": [{"scene_name": "chat-a", "cluster": "pool_a",
                                                         "backend": "vllm"}]}},
               "clusters": {"pool_a": {"endpoints": endpoints}},
               "metadata_center": {"enabled": True, "host": "127.0.0.1", "port": metadata_center,
                                   "cache_enabled": True, "timeout_ms": 200}}
        boot = harness.envoy_bootstrap(listen_port, admin_port, [harness.static_cluster("pool_a", endpoints)], cfg,
                                       default_cluster="pool_a")
        return harness.Envoy(boot, tmp_path_factory.mktemp("envoy-mc"))

    gw = harness.retry_on_port_clash(start)
    yield gw
    gw.close()


def test_remote_cache_lookups_resume_through_scheduler(mc_gateway):
    before = metrics(mc_gateway)["llmproxy_envoy_pending_total"]
    prefix = "shared system prompt " * 200

    def one(i):
        body = {"model": "m-a", "messages": [{"role": "system", "content": prefix},
                                             {"role": "user", "content": "question %d" % i}]}
        status, _, data, _ = harness.request(mc_gateway.port, "POST", "/v1/chat/completions", body)
        return status, json.loads(data).get("served_by") if status == 200 else data

    first = one(-1)
    assert first[0] == 200, first
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, range(24)))
    assert all(r[0] == 200 and r[1] in POOLS["pool_a"] for r in results), results[:3]
    after = metrics(mc_gateway)
    # Most picks (the library may still decide some locally) were decided off the worker thread.
    assert after["llmproxy_envoy_pending_total"] - before >= 10
    assert after["llmproxy_envoy_hook_exceptions_total"] == 0
    wait_in_flight_zero(mc_gateway)


def test_a_streamed_answer_saves_its_prefix_before_it_ends(mc_gateway, metadata_center):
    """The prompt's prefix reaches the Metadata-Center at the stream's first event (the server
    has computed the prompt), not when the answer ends: another gateway can route it there
    while this answer is still streaming."""
    before = harness.metadata_center_saves(metadata_center)
    body = chat("m-a", harness.random_text(3000, seed=4242), stream=True)
    # 6 events 0.5 s apart: the answer takes 2.5 s
    headers = {"x-test-chunks": "6", "x-test-chunk-delay-ms": "500"}
    with ThreadPoolExecutor(1) as ex:
        answer = ex.submit(harness.request, mc_gateway.port, "POST", "/v1/chat/completions", body, headers)
        harness.wait_until(lambda: harness.metadata_center_saves(metadata_center) > before, timeout=2,
                           what="the prefix saved while the answer streams")
        assert not answer.done(), "the answer had already ended"
        status, _, data, secs = answer.result()
    assert status == 200 and secs >= 2.0, (status, secs)
    assert data.count(b"data: ") == 7  # 6 events and [DONE], nothing lost
