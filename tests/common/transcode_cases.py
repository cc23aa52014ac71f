"""The end-to-end transcode scenarios, driven with the official `openai` Python client, that the
Envoy host (tests/envoy/test_transcode_openai.py) and the nginx host
(tests/nginx/test_transcode_openai.py) both run against their real gateway: an OpenAI-compatible
test upstream (target_model rewrite), a Triton generate-extension test server (transcoded both
ways), and LoRA / label subsets.

A Triton answer is scripted with the request header `x-test-triton-script: 1` (the server then
reports what it read in `x-test-triton-request`), and `x-test-triton-error` makes it fail (see the
fake upstream both hosts use: tests/common/fake_openai.py).

A host's test file starts its test servers (one per name in POOLS, `.addr(name)` -> "host:port")
and its gateway (configured with llmproxy_config(servers); `.port` is where it listens) as the
module fixtures `tc_servers` and `gateway`, and runs the cases by subclassing TranscodeOpenAICases
as a `Test...` class that sets what differs between hosts (see the class).
"""

import base64
import json
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from fake_openai import SCRIPTED_TEXT, TRITON_ERROR, TRITON_REQUEST, TRITON_SCRIPT

POOLS = {
    "pool_oai": ["o1", "o2"],
    "pool_tri": ["t1", "t2"],
    "pool_tri_err": ["t3"],  # error tests only: failures there cannot sway the other pools
    "pool_lora": ["l1", "l2", "l3", "l4"],
    "pool_color": ["c1", "c2", "c3", "c4", "c5"],
}
SERVER_NAMES = [n for names in POOLS.values() for n in names]

# Endpoint objects: only l1 and l2 serve the sql-lora adapter.
ENDPOINT_META = {
    "l1": {"lora_adapters": ["sql-lora"]},
    "l2": {"lora_adapters": ["other-lora", "sql-lora"]},
    "l3": {},
    "l4": {"lora_adapters": ["other-lora"]},
    "c1": {"labels": {"color": "blue", "tier": "gold"}},
    "c2": {"labels": {"color": "blue"}},
    "c3": {"labels": {"color": "green"}},
    "c4": {},
    "c5": {"labels": {"color": "green", "tier": "gold"}},
}

SCRIPT = {TRITON_SCRIPT: "1"}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
RENDERED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "plain": "system: Be brief.\nuser: Hi\nassistant:",
}


def llmproxy_config(servers):
    """The library's configuration for these cases, endpoints at servers.addr(name)."""
    def endpoint(name):
        return dict({"address": servers.addr(name)}, **ENDPOINT_META.get(name, {}))

    def rule(scene, cluster, backend, **extra):
        return {"rules": [dict({"scene_name": scene, "cluster": cluster, "backend": backend}, **extra)]}

    return {
        "protocol": "openai",
        "algorithm": "inference_lb",
        "model_mapping_rule": {
            "m-alias": rule("alias", "pool_oai", "vllm", target_model="served-model"),
            "m-tri": rule("tri", "pool_tri", "triton", target_model="ensemble", chat_template="chatml"),
            "m-tri-llama3": rule("tri-l3", "pool_tri", "triton", target_model="ensemble", chat_template="llama3"),
            "m-tri-plain": rule("tri-plain", "pool_tri", "triton", target_model="ensemble", chat_template="plain"),
            "m-tri-err": rule("tri-err", "pool_tri_err", "triton", target_model="ensemble"),
            "m-sql": rule("sql", "pool_lora", "vllm", subset=[{"name": "sql", "lora": "sql-lora"}]),
            "m-split": rule("split", "pool_color", "vllm", subset=[
                {"name": "blue", "labels": {"color": "blue"}, "weight": 3},
                {"name": "green", "labels": {"color": "green"}, "weight": 1}]),
            "m-gold-blue": rule("gold-blue", "pool_color", "vllm", subset=[
                {"name": "gold-blue", "labels": {"color": "blue", "tier": "gold"}}]),
            "m-resp": rule("resp", "pool_color", "vllm"),
        },
        "clusters": {pool: {"endpoints": [endpoint(n) for n in names]} for pool, names in POOLS.items()},
    }


def triton_seen(raw):
    """What the Triton test server read: {"path", "body"}."""
    return json.loads(base64.b64decode(raw.headers[TRITON_REQUEST]))


class TranscodeOpenAICases:
    """The cases. Not collected by itself (no `Test` prefix): a host subclasses it as
    `class TestTranscodeOpenAI<Host>(TranscodeOpenAICases)` and sets
      post()          one raw POST to the gateway
      check_pick()    (optional) the host's own evidence of the endpoint the module picked
    """

    def post(self, gateway, path, body, headers=None):
        """One POST on a fresh connection: (status, headers lower-cased, body bytes)."""
        raise NotImplementedError("the host's test class must implement post()")

    def check_pick(self, raw, name):
        """Extra host-specific assertion that the module picked server `name` for this response."""

    @pytest.fixture(scope="class")
    def client(self, gateway):
        with openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % gateway.port, api_key="test-key",
                           max_retries=0, timeout=10) as c:
            yield c

    def scripted(self, name):
        return SCRIPTED_TEXT % name

    def served_by(self, raw, pool):
        name = raw.headers["x-served-by"]
        assert name in POOLS[pool], name
        self.check_pick(raw, name)
        return name

    # -----------------------------------------------------------------------------------------
    # (a) OpenAI-compatible upstream with a target_model rewrite

    def test_chat_target_model_rewrite(self, client):
        raw = client.chat.completions.with_raw_response.create(model="m-alias", messages=MESSAGES, temperature=0.5)
        r = raw.parse()
        name = self.served_by(raw, "pool_oai")
        assert r.model == "served-model"  # the upstream echoes the model it read in the body
        assert r.choices[0].message.content == "hi from " + name
        assert r.choices[0].finish_reason == "stop"
        extra = r.model_extra
        assert int(extra["received_headers"]["content-length"]) == extra["body_bytes"]

    def test_chat_stream_target_model_rewrite(self, client):
        raw = client.chat.completions.with_raw_response.create(model="m-alias", messages=MESSAGES, stream=True)
        self.served_by(raw, "pool_oai")
        chunks = list(raw.parse())
        assert len(chunks) == 5 and chunks[0].model == "served-model"  # the upstream echoes it first
        assert "".join(c.choices[0].delta.content for c in chunks) == "tok0 tok1 tok2 tok3 tok4 "

    def test_completions_target_model_rewrite(self, client):
        raw = client.completions.with_raw_response.create(model="m-alias", prompt="Once upon a time")
        r = raw.parse()
        name = self.served_by(raw, "pool_oai")
        assert r.model == "served-model"
        assert r.choices[0].text == "hi from " + name
        chunks = list(client.completions.create(model="m-alias", prompt="Once", stream=True))
        assert "".join(c.choices[0].text for c in chunks) == "tok0 tok1 tok2 tok3 tok4 "
        assert chunks[0].model == "served-model"

    # -----------------------------------------------------------------------------------------
    # (b) Triton generate extension behind the module

    @pytest.mark.parametrize("model,template", [("m-tri", "chatml"), ("m-tri-llama3", "llama3"),
                                                ("m-tri-plain", "plain")])
    def test_triton_chat(self, client, model, template):
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=MESSAGES, max_tokens=32, temperature=0.25, top_p=0.9, seed=7, stop="END",
            extra_headers=SCRIPT)
        assert raw.status_code == 200
        assert raw.headers["content-type"].startswith("application/json")
        name = self.served_by(raw, "pool_tri")
        seen = triton_seen(raw)
        assert seen["path"] == "/v2/models/ensemble/generate"
        assert seen["body"] == {"text_input": RENDERED[template], "max_tokens": 32, "stream": False,
                                "exclude_input_in_output": True, "temperature": 0.25, "top_p": 0.9,
                                "random_seed": 7, "stop_words": ["END"]}
        r = raw.parse()
        assert r.object == "chat.completion"
        assert r.model == model  # the client's model name, not the backend's
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == self.scripted(name)
        assert r.choices[0].finish_reason == "stop"

    def test_triton_chat_stream(self, client):
        raw = client.chat.completions.with_raw_response.create(model="m-tri", messages=MESSAGES, stream=True,
                                                               extra_headers=SCRIPT)
        assert raw.headers["content-type"].startswith("text/event-stream")
        name = self.served_by(raw, "pool_tri")
        seen = triton_seen(raw)
        assert seen["path"] == "/v2/models/ensemble/generate_stream"
        assert seen["body"]["stream"] is True and seen["body"]["max_tokens"] == 256  # the default
        chunks = list(raw.parse())
        assert len(chunks) >= 3
        assert all(c.object == "chat.completion.chunk" and c.model == "m-tri" for c in chunks)
        assert len({c.id for c in chunks}) == 1
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == self.scripted(name)
        assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        assert chunks[-1].choices[0].finish_reason == "stop"

    def test_triton_stream_ends_with_done(self, gateway):
        body = {"model": "m-tri", "messages": MESSAGES, "stream": True}
        status, hdrs, data = self.post(gateway, "/v1/chat/completions", body, SCRIPT)
        assert status == 200
        assert "content-length" not in hdrs
        text = data.decode()
        assert text.endswith("data: [DONE]\n\n") and text.count("[DONE]") == 1

    def test_triton_completions(self, client):
        raw = client.completions.with_raw_response.create(model="m-tri", prompt="Once upon", max_tokens=8,
                                                          extra_headers=SCRIPT)
        name = self.served_by(raw, "pool_tri")
        seen = triton_seen(raw)
        assert seen["path"] == "/v2/models/ensemble/generate"
        assert seen["body"]["text_input"] == "Once upon" and seen["body"]["max_tokens"] == 8
        r = raw.parse()
        assert r.object == "text_completion" and r.model == "m-tri"
        assert r.choices[0].text == self.scripted(name)
        assert r.choices[0].finish_reason == "stop"

        raw = client.completions.with_raw_response.create(model="m-tri", prompt=["Once upon"], stream=True,
                                                          extra_headers=SCRIPT)
        name = self.served_by(raw, "pool_tri")
        assert triton_seen(raw)["path"] == "/v2/models/ensemble/generate_stream"
        chunks = list(raw.parse())
        assert all(c.object == "text_completion" for c in chunks)
        assert "".join(c.choices[0].text for c in chunks) == self.scripted(name)
        assert chunks[-1].choices[0].finish_reason == "stop"

    @pytest.mark.parametrize("stream", [False, True])
    def test_triton_error_before_inference(self, client, stream):
        with pytest.raises(openai.BadRequestError) as e:
            r = client.chat.completions.create(model="m-tri-err", messages=MESSAGES, stream=stream,
                                               extra_headers={TRITON_ERROR: "400"})
            list(r) if stream else None
        assert e.value.status_code == 400
        assert e.value.response.headers["content-type"].startswith("application/json")
        assert "scripted triton failure 400" in e.value.message
        assert e.value.body["message"] == "scripted triton failure 400"
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="m-tri-err", prompt="x", stream=stream,
                                      extra_headers={TRITON_ERROR: "500"})
        assert e.value.status_code == 500
        assert "scripted triton failure 500" in e.value.message

    def test_triton_error_mid_stream(self, client):
        got = []
        # `with` closes the response: an abandoned streamed response closed later by the garbage
        # collector can deadlock httpx's connection pool (seen as a hang in a later test).
        with client.chat.completions.create(model="m-tri-err", messages=MESSAGES, stream=True,
                                            extra_headers={TRITON_ERROR: "stream"}) as stream:
            with pytest.raises(openai.APIError) as e:
                for c in stream:
                    got.append(c.choices[0].delta.content or "")
        assert "".join(got) == self.scripted("t3")[:8]  # the two pieces before the failure
        assert "mid-stream" in e.value.message

    def test_triton_error_in_a_200_answer_keeps_200(self, gateway):
        # Documented limit: the status is sent before the body is seen, so a non-streamed Triton
        # answer that turns out to be an error keeps 200; the body is an OpenAI error object.
        body = {"model": "m-tri-err", "messages": MESSAGES}
        status, hdrs, data = self.post(gateway, "/v1/chat/completions", body, {TRITON_ERROR: "answer"})
        assert status == 200
        assert hdrs["content-type"].startswith("application/json")
        err = json.loads(data)["error"]
        assert err["message"] == "scripted triton failure in a 200 answer" and err["code"] == 502

    # -----------------------------------------------------------------------------------------
    # LoRA and label subsets

    def test_lora_rule_picks_adapter_endpoints_and_rewrites_model(self, client):
        served = Counter()
        for i in range(20):
            prompt = "sql question %d %s" % (i, random.Random(i).random())
            raw = client.chat.completions.with_raw_response.create(
                model="m-sql", messages=[{"role": "user", "content": prompt}])
            r = raw.parse()
            name = self.served_by(raw, "pool_lora")
            served[name] += 1
            assert r.model == "sql-lora"  # what the upstream read
            assert r.choices[0].message.content == "hi from " + name
        assert set(served) <= {"l1", "l2"}, served
        assert len(served) == 2, served  # both adapter endpoints take traffic
        chunks = list(client.chat.completions.create(model="m-sql", messages=MESSAGES, stream=True))
        assert chunks[0].model == "sql-lora"

    def served_counts(self, gateway, model, n):
        """Which server answered each of n concurrent raw chat requests for `model`."""
        def one(i):
            body = {"model": model, "messages": [{"role": "user", "content": "weighted %d" % i}]}
            status, hdrs, data = self.post(gateway, "/v1/chat/completions", body)
            assert status == 200, data
            assert json.loads(data)["model"] == model  # no adapter: the model is unchanged
            return hdrs["x-served-by"]

        with ThreadPoolExecutor(16) as pool:
            return Counter(pool.map(one, range(n)))

    def test_label_subsets_split_by_weight(self, gateway):
        n = 240
        served = self.served_counts(gateway, "m-split", n)
        assert set(served) <= {"c1", "c2", "c3", "c5"}, served  # c4 has no labels
        blue = served["c1"] + served["c2"]
        share = blue / n
        assert 0.63 <= share <= 0.87, served  # weight 3:1 -> 0.75 (about 4.5 standard deviations)
        assert served["c3"] + served["c5"] > 0

    def test_every_subset_label_must_match(self, gateway):
        served = self.served_counts(gateway, "m-gold-blue", 12)
        assert set(served) == {"c1"}, served

    # -----------------------------------------------------------------------------------------
    # (d) the Responses API: stored answers continued by id stay on the server that stored them

    def test_responses_chain_with_the_openai_client(self, client):
        raw = client.responses.with_raw_response.create(model="m-resp", input="Tell me a story",
                                                        instructions="be brief")
        home = self.served_by(raw, "pool_color")
        r = raw.parse()
        assert r.output_text == "hi from " + home and r.usage.input_tokens > 0
        previous = r.id
        for i in range(6):  # 5 servers, none of which has another's answers: 5^-6 by chance
            stream = i % 2 == 0
            raw = client.responses.with_raw_response.create(model="m-resp", input="go on %d" % i,
                                                            previous_response_id=previous, stream=stream)
            assert self.served_by(raw, "pool_color") == home, "turn %d" % i
            if stream:
                events = list(raw.parse())
                assert [e.type for e in events][-1] == "response.completed"
                assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == \
                    "tok0 tok1 tok2 tok3 tok4 "
                previous = events[-1].response.id
            else:
                previous = raw.parse().id
        # a stored answer of no server: the server's own 404
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model="m-resp", input="x", previous_response_id="resp_nowhere")
        # the client reads and deletes the stored answer: both on the server that stored it
        for _ in range(3):
            raw = client.responses.with_raw_response.retrieve(previous)
            assert self.served_by(raw, "pool_color") == home and raw.parse().id == previous
        client.responses.delete(previous)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(previous)

    def test_responses_messages_and_engine_apis_to_a_triton_backend_are_refused_by_the_gateway(self, client, gateway):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model="m-tri", input="x")
        assert "not served by a triton backend" in e.value.message
        status, _, data = self.post(gateway, "/v1/messages", {
            "model": "m-tri", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]})
        assert status == 400 and "not served by a triton backend" in json.loads(data)["error"]["message"], data
        for path, body in [("/generate", {"model": "m-tri", "text": "x"}), ("/completion", {"model": "m-tri", "prompt": "x"})]:
            status, _, data = self.post(gateway, path, body)
            assert status == 400 and "not served by a triton backend" in json.loads(data)["error"]["message"], data
