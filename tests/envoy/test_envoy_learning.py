"""Learning from the answer (issue #19, lever 1) through real Envoy: the second turn of a
conversation, which sends the first answer back, goes to the endpoint that produced it because
the router learned the answer's prefix chunks at the end of the first turn.

The proof that it is the answer and not the question: the first turn's prompt is a few 16-byte
chunks, the answer some thirty; without learning the second turn could match at most the
question's chunks (a cache ratio under 0.2), with it the decision's ratio is above 0.75."""

import json

import pytest

import harness
from conftest import MAX_BODY
from harness import CHAT, metrics, random_text


def start_gateway(servers, tmp_path_factory, learn_bytes):
    def start():
        listen_port, admin_port = harness.free_ports(2)
        down_port = harness.refused_port()
        llmproxy = harness.pools_config(servers, "127.0.0.1:%d" % down_port, MAX_BODY, {
            "m-l": [{"scene_name": "learn", "cluster": "pool_b", "backend": "vllm"}],
        })
        llmproxy["hash_chunk_bytes"] = 16
        llmproxy["learn_response_bytes"] = learn_bytes
        clusters = [harness.static_cluster(pool, c["endpoints"]) for pool, c in llmproxy["clusters"].items()]
        bootstrap = harness.envoy_bootstrap(listen_port, admin_port, clusters, llmproxy, default_cluster="pool_a")
        return harness.Envoy(bootstrap, tmp_path_factory.mktemp("envoy-learn"))

    return harness.retry_on_port_clash(start)


def streamed_answer(data):
    """The assistant text of an SSE body."""
    text = ""
    for line in data.split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:])["choices"]:
                text += choice.get("delta", {}).get("content") or ""
    return text


def conversations(gw, n=6):
    """n two-turn conversations; the endpoints of each turn: [(first, second)]."""
    turns = []
    for conv in range(n):
        question = random_text(30, seed=500 + conv)
        messages = [{"role": "user", "content": question}]
        status, hdrs, data, _ = harness.request(gw.port, "POST", CHAT,
                                                {"model": "m-l", "stream": True, "messages": messages},
                                                {"x-test-chunks": "80"})
        assert status == 200, data[:300]
        first = hdrs["x-served-by"]
        answer = streamed_answer(data)
        assert answer.startswith("tok0 tok1 ") and answer.endswith("tok79 ")
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "go on"}]
        status, hdrs, data, _ = harness.request(gw.port, "POST", CHAT, {"model": "m-l", "messages": messages})
        assert status == 200, data[:300]
        turns.append((first, hdrs["x-served-by"]))
    return turns


def high_ratio_decisions(m):
    ratio = "llmproxy_decision_cache_ratio"
    return m.value(ratio + "_count") - m.value(ratio + "_bucket", le="0.75")


def test_second_turn_follows_the_learned_answer(module_built, servers, tmp_path_factory):
    with start_gateway(servers, tmp_path_factory, 64 * 1024) as gw:
        turns = conversations(gw)
        m = metrics(gw)
    for conv, (first, second) in enumerate(turns):
        assert first == second, "conversation %d: turn 2 went to %s, turn 1 to %s" % (conv, second, first)
    assert m.value("llmproxy_learned_response_chunks_total") >= 6 * 25
    # Every second turn was decided on a cache ratio above 0.75: only the learned answer gives that.
    assert high_ratio_decisions(m) >= 6, m.text


def test_without_learning_the_answer_is_unknown(module_built, servers, tmp_path_factory):
    with start_gateway(servers, tmp_path_factory, 0) as gw:
        conversations(gw)
        m = metrics(gw)
    assert m.value("llmproxy_learned_response_chunks_total") == 0
    assert high_ratio_decisions(m) == 0, m.text
