"""The real PENDING path: with the Metadata-Center's remote cache lookups enabled, the library
answers picks PENDING and decides on its sync thread; the filter resumes through Envoy's
scheduler. Real processes: our llmproxy-metadata-center server, Envoy with the module, test
servers."""

import json
import time
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
    gw = start_mc_gateway(servers, metadata_center, tmp_path_factory)
    yield gw
    gw.close()


@pytest.fixture(scope="module")
def mc_gateway_b(module_built, servers, metadata_center, tmp_path_factory):
    """A second gateway sharing the Metadata-Center (another Envoy replica)."""
    gw = start_mc_gateway(servers, metadata_center, tmp_path_factory)
    yield gw
    gw.close()


def start_mc_gateway(servers, metadata_center, tmp_path_factory):
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

    return harness.retry_on_port_clash(start)


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


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_the_prefix_is_saved_at_the_pick_before_the_server_answers(mc_gateway, metadata_center, stream):
    """The prompt's prefix reaches the Metadata-Center at the pick (as the local index records
    it), not when the server first answers: another gateway routes the same document there
    while this request is still in its prefill, instead of computing it on a second server."""
    before = harness.settled_saves(metadata_center)  # the earlier tests' saves have all landed
    body = chat("m-a", harness.random_text(3000, seed=4242 + stream), stream=stream)
    # a 2.5 s "prefill": the server sends nothing, not even its headers, before then
    headers = {"x-test-delay-ms": "2500", "x-test-chunks": "3"}
    with ThreadPoolExecutor(1) as ex:
        answer = ex.submit(harness.request, mc_gateway.port, "POST", "/v1/chat/completions", body, headers)
        harness.wait_until(lambda: harness.metadata_center_saves(metadata_center) > before, timeout=2,
                           what="the prefix saved while the server computes the prompt")
        assert not answer.done(), "the server had already answered"
        status, _, data, secs = answer.result()
    assert status == 200 and secs >= 2.5, (status, secs)
    if stream:
        assert data.count(b"data: ") == 4  # 3 events and [DONE], nothing lost
    else:
        assert json.loads(data)["choices"], data[:200]
    # one claim per pick; the answer's end adds at most the learned next-turn chain
    wait_in_flight_zero(mc_gateway)
    assert before + 1 <= harness.settled_saves(metadata_center) <= before + 2


def test_a_responses_chain_continues_through_another_gateway(mc_gateway, mc_gateway_b, metadata_center):
    """Turns of a Responses API conversation that names each previous answer, sent to two
    gateway replicas in turn: the fake engines keep their answers per server (404 elsewhere,
    as vLLM and SGLang), and a gateway that did not see an answer finds its server through the
    Metadata-Center, where the other saved it. The save is sent from the answering gateway's
    sync thread when the answer's first bytes pass: a client of these instant fake engines
    sends its next turn before it lands, so each turn waits for the saves to settle (a real
    engine's generation gives them its whole duration)."""
    previous, home = None, None
    for turn in range(6):
        harness.settled_saves(metadata_center)
        gw = (mc_gateway, mc_gateway_b)[turn % 2]
        body = {"model": "m-a", "input": harness.random_text(300), "stream": turn % 3 == 1}
        if previous:
            body["previous_response_id"] = previous
        status, _, data, _ = harness.request(gw.port, "POST", harness.RESPONSES, body)
        assert status == 200, "turn %d: %s" % (turn, data[:300])
        previous, served = harness.responses_answer(data)
        home = home or served
        assert served == home, "turn %d went to %s, the chain is on %s" % (turn, served, home)
    # each gateway found three turns: two through the Metadata-Center (the other's answers)
    for gw in (mc_gateway, mc_gateway_b):
        harness.wait_until(lambda: metrics(gw).total("llmproxy_response_chains_total", result="pinned") >= 2,
                           timeout=5, what="pinned chains")
    # a client polls the last answer (GET /v1/responses/{id}, no body) through either gateway:
    # both send it to its server; the one that did not answer it asks the Metadata-Center
    harness.settled_saves(metadata_center)
    for gw in (mc_gateway, mc_gateway_b, mc_gateway, mc_gateway_b):
        status, _, data, _ = harness.request(gw.port, "GET", "%s/%s" % (harness.RESPONSES, previous))
        got = json.loads(data)
        assert (status, got["id"], got["served_by"]) == (200, previous, home), got
    for gw in (mc_gateway, mc_gateway_b):
        harness.wait_until(lambda: stored(gw, "pinned") >= 2, timeout=5, what="pinned polls")
    # an id that neither gateway nor the Metadata-Center knows passes through untouched: a
    # server's own 404, not the gateway's
    status, _, data, _ = harness.request(mc_gateway_b.port, "GET", harness.RESPONSES + "/resp_nowhere")
    assert status == 404 and json.loads(data)["served_by"], data
    harness.wait_until(lambda: stored(mc_gateway_b, "unknown") >= 1, timeout=5, what="a passed-through poll")
    wait_in_flight_zero(mc_gateway)
    wait_in_flight_zero(mc_gateway_b)


def stored(gw, result):
    """`llmproxy_stored_response_requests_total{result}` of `gw`."""
    return metrics(gw).total("llmproxy_stored_response_requests_total", result=result)
