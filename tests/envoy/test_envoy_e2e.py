"""End-to-end: real Envoy 1.40 + build/libllmproxy_envoy.so + OpenAI-compatible test servers."""

import http.client
import json
import random
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import harness
from conftest import MAX_BODY, POOLS
from harness import CHAT, COMPLETIONS, chat, metrics, random_text, request_log_lines, wait_in_flight_zero


def post(gw, body, headers=None, path=CHAT):
    return harness.request(gw.port, "POST", path, body, headers)


def assert_our_error(status, hdrs, data, expected_status, code):
    assert status == expected_status, data
    assert hdrs.get("content-type") == "application/json"
    err = json.loads(data)["error"]
    assert err["code"] == code, err
    assert err["message"]
    assert "x-served-by" not in hdrs  # answered by the gateway, not a server


# ---------------------------------------------------------------------------------------------


def test_routed_request_reaches_pool_with_headers(gateway):
    status, hdrs, data, _ = post(gateway, chat("m-a", "hello"))
    assert status == 200, data
    echo = json.loads(data)
    assert echo["served_by"] in POOLS["pool_a"]
    seen = echo["received_headers"]
    assert seen["x-llmproxy-endpoint"] == gateway.servers.addr(echo["served_by"])
    assert seen["x-llmproxy-scene"] == "chat-a"
    assert seen["x-llmproxy-cluster"] == "pool_a"
    status, _, data, _ = post(gateway, chat("m-b", "hello"))
    assert status == 200
    assert json.loads(data)["served_by"] in POOLS["pool_b"]


def test_passthrough_is_untouched(gateway):
    # Not an inference request: the route's default cluster and its own round robin serve it.
    served = set()
    for _ in range(6):
        status, hdrs, data, _ = harness.request(gateway.port, "GET", "/v1/models",
                                                headers={"x-llmproxy-cluster": "pool_b"})
        assert status == 200
        served.add(hdrs["x-served-by"])
    assert served <= set(POOLS["pool_a"])  # the client-supplied cluster header was ignored
    assert len(served) >= 2  # round robin of the cluster, not a forced endpoint
    status, hdrs, _, _ = harness.request(gateway.port, "GET", "/health")
    assert status == 200 and hdrs["x-served-by"] in POOLS["pool_a"]
    status, hdrs, data, _ = post(gateway, {"model": "m-b", "input": "x"}, path="/v1/embeddings")
    assert status == 200 and json.loads(data)["served_by"] in POOLS["pool_a"]


def test_prefix_stickiness_and_spreading(gateway):
    prefix = random_text(6000, seed=1)
    first = None
    for i in range(6):
        status, _, data, _ = post(gateway, chat("m-a", prefix + " question number %d?" % i))
        assert status == 200
        served = json.loads(data)["served_by"]
        first = first or served
        assert served == first, "request %d with the shared prefix went to %s, not %s" % (i, served, first)
    spread = set()
    for i in range(15):
        status, _, data, _ = post(gateway, chat("m-a", random_text(6000, seed=1000 + i)))
        assert status == 200
        spread.add(json.loads(data)["served_by"])
    assert len(spread) >= 2, "distinct prefixes all went to %s" % spread


def test_completions_of_token_ids_stick_by_their_prefix(gateway):
    # The OpenAI API (and vLLM, SGLang) take a completion's prompt as token ids too: routed by
    # the ids' prefix like text; a malformed id list is the gateway's 400, not the server's.
    rnd = random.Random(7)
    shared = [rnd.randrange(100_000) for _ in range(1500)]
    first = None
    for i in range(5):
        status, _, data, _ = post(gateway, {"model": "m-a", "prompt": shared + [i, i + 1]}, path=COMPLETIONS)
        assert status == 200, data
        served = json.loads(data)["served_by"]
        first = first or served
        assert served == first, "token prompt %d with the shared ids went to %s, not %s" % (i, served, first)
    status, _, data, _ = post(gateway, {"model": "m-a", "prompt": [shared, [1, 2]]}, path=COMPLETIONS)
    assert status == 200 and json.loads(data)["served_by"] == first, data
    status, hdrs, data, _ = post(gateway, {"model": "m-a", "prompt": [1, "two"]}, path=COMPLETIONS)
    assert_our_error(status, hdrs, data, 400, "invalid_request")
    assert "mixes strings, token ids and arrays" in json.loads(data)["error"]["message"]


def test_tool_call_arguments_sent_as_an_object_are_routed(gateway):
    # OpenAI encodes a tool call's arguments as a JSON string; some clients send the object
    # itself, which vLLM takes too: routed, not refused.
    history = [{"role": "user", "content": "weather in Paris?"},
               {"role": "assistant", "content": None,
                "tool_calls": [{"id": "c1", "type": "function",
                                "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    status, _, data, _ = post(gateway, {"model": "m-a", "messages": history})
    assert status == 200, data


def test_invalid_json_400(gateway):
    status, hdrs, data, _ = post(gateway, b'{"model": "m-a", "messages": [')
    assert_our_error(status, hdrs, data, 400, "invalid_request")


def test_unknown_model_404(gateway):
    status, hdrs, data, _ = post(gateway, chat("no-such-model", "hi"))
    assert_our_error(status, hdrs, data, 404, "model_not_found")


def test_missing_body_400(gateway):
    status, hdrs, data, _ = post(gateway, None, headers={"content-length": "0"})
    assert_our_error(status, hdrs, data, 400, "invalid_request")


def early_reply(port, head, body_chunks, timeout=10):
    """Sends a request whose body the gateway may refuse before reading it: the body is written
    by a helper thread while this one reads the response, as a careful HTTP/1.1 client does
    (the server closes the connection after an early reply)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def writer():
        try:
            sock.sendall(head)
            for chunk in body_chunks:
                sock.sendall(chunk)
        except OSError:
            pass  # the gateway answered and closed: expected

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            got = sock.recv(65536)
            if not got:
                break
            data += got
        head_part, _, rest = data.partition(b"\r\n\r\n")
        lines = head_part.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
        n = int(hdrs.get("content-length", "0"))
        while len(rest) < n:
            got = sock.recv(65536)
            if not got:
                break
            rest += got
        return status, hdrs, rest[:n]
    finally:
        sock.close()
        t.join(timeout)


def test_body_over_limit_413(gateway):
    payload = json.dumps(chat("m-a", "x" * (MAX_BODY + 1000))).encode()
    head = ("POST %s HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
            % (CHAT, len(payload))).encode()
    t0 = time.perf_counter()
    status, hdrs, data = early_reply(gateway.port, head, (payload[i:i + 65536] for i in range(0, len(payload), 65536)))
    assert_our_error(status, hdrs, data, 413, "request_too_large")
    assert time.perf_counter() - t0 < 5


def test_chunked_body_over_limit_413(gateway):
    payload = json.dumps(chat("m-a", "y" * (MAX_BODY + 1000))).encode()
    head = ("POST %s HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            % CHAT).encode()

    def chunks():
        for i in range(0, len(payload), 256 * 1024):
            part = payload[i:i + 256 * 1024]
            yield b"%x\r\n%s\r\n" % (len(part), part)
        yield b"0\r\n\r\n"

    status, hdrs, data = early_reply(gateway.port, head, chunks())
    assert_our_error(status, hdrs, data, 413, "request_too_large")


def test_two_megabyte_prompt_succeeds(gateway):
    body = json.dumps(chat("m-a", random_text(2 * 1000 * 1000, seed=7))).encode()
    assert len(body) > 2_000_000  # above Envoy's default 1 MiB buffer limit
    status, _, data, _ = post(gateway, body)
    assert status == 200, data[:300]
    echo = json.loads(data)
    assert echo["body_bytes"] == len(body)  # the upstream got the whole body
    assert echo["served_by"] in POOLS["pool_a"]


def test_sse_streams_incrementally_and_finishes(gateway):
    c = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    try:
        t0 = time.perf_counter()
        c.request("POST", CHAT, body=json.dumps(chat("m-b", "stream please", stream=True)),
                  headers={"content-type": "application/json", "x-test-chunks": "5",
                           "x-test-chunk-delay-ms": "250", "x-test-delay-ms": "400"})
        time.sleep(0.2)
        # Before the first token: the prompt counts as prefill load on the picked endpoint.
        during_prefill = metrics(gateway)
        assert during_prefill["llmproxy_envoy_in_flight"] == 1
        assert during_prefill.total("llmproxy_endpoint_prefill_chars", cluster="pool_b") > 0
        r = c.getresponse()
        assert r.status == 200
        assert r.getheader("content-type") == "text/event-stream"
        mid = {}

        def first_event(events):
            if len(events) == 1:
                # Mid-stream: picked and not finished, and the first chunk released prefill.
                served = gateway.servers.addr(json.loads(events[0])["served_by"])
                mid["m"] = metrics(gateway)
                assert mid["m"]["llmproxy_envoy_in_flight"] == 1
                key = 'llmproxy_endpoint_prefill_chars{cluster="pool_b",endpoint="%s"}' % served
                assert mid["m"][key] == 0, key

        events, arrivals = harness.read_sse(r.readline, t0, first_event)
        finished_before = mid["m"]['llmproxy_finished_requests_total{status="2xx"}']
        assert events[-1] == b"[DONE]"
        assert len(events) == 6
        first = json.loads(events[0])
        assert first["served_by"] in POOLS["pool_b"]
        # Incremental: the first event arrived long before the last one was even written.
        assert arrivals[-1] - arrivals[0] >= 0.8, arrivals
        assert arrivals[0] < arrivals[-1] - 0.7, arrivals
    finally:
        c.close()
    wait_in_flight_zero(gateway)
    assert metrics(gateway)['llmproxy_finished_requests_total{status="2xx"}'] == finished_before + 1


def test_an_answer_not_streamed_stops_counting_as_prefill_when_a_later_stream_starts(gateway):
    # A non-streamed answer shows its first byte only when it is complete; its prompt must not
    # count as prefill until then. A stream picked after it on the same endpoint that shows its
    # first token says the engine is past the earlier prompt too.
    endpoint = gateway.endpoints["pool_one"][0]
    key = 'llmproxy_endpoint_prefill_chars{cluster="pool_one",endpoint="%s"}' % endpoint
    whole_prompt = random_text(3000, seed=77)
    done = {}

    def whole():
        done["whole"] = post(gateway, chat("m-one", whole_prompt), headers={"x-test-delay-ms": "4000"})

    t = threading.Thread(target=whole)
    t.start()
    try:
        deadline = time.monotonic() + 3
        while metrics(gateway).by_key.get(key, 0) == 0:
            assert time.monotonic() < deadline, "the non-streamed request never counted as prefill"
            time.sleep(0.05)
        c = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
        try:
            c.request("POST", CHAT, body=json.dumps(chat("m-one", "a short stream", stream=True)),
                      headers={"content-type": "application/json", "x-test-chunks": "3",
                               "x-test-chunk-delay-ms": "300"})
            r = c.getresponse()
            assert r.status == 200
            seen = {}

            def first_event(events):
                if len(events) == 1:
                    seen["m"] = metrics(gateway)

            harness.read_sse(r.readline, time.perf_counter(), first_event)
        finally:
            c.close()
        assert "whole" not in done, "the slow answer came before the stream: nothing measured"
        m = seen["m"]
        assert m['llmproxy_endpoint_in_flight_requests{cluster="pool_one",endpoint="%s"}' % endpoint] == 2
        assert m[key] == 0, "the non-streamed prompt still counted as prefill"
    finally:
        t.join()
    assert done["whole"][0] == 200
    wait_in_flight_zero(gateway)
    assert metrics(gateway)[key] == 0


def test_metrics_surface_in_flight_back_to_zero(gateway):
    before = metrics(gateway)
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda i: post(gateway, chat("m-a", "count %d" % i))[0], range(16)))
    assert results == [200] * 16
    wait_in_flight_zero(gateway)
    after = metrics(gateway)
    assert after["llmproxy_envoy_routed_total"] - before["llmproxy_envoy_routed_total"] >= 16
    assert after["llmproxy_envoy_hook_exceptions_total"] == 0


def test_client_routing_headers_are_ignored(gateway):
    prefix = random_text(5000, seed=42)
    status, _, data, _ = post(gateway, chat("m-a", prefix + " first"))
    assert status == 200
    home = json.loads(data)["served_by"]
    other = next(n for n in POOLS["pool_a"] if n != home)
    for i in range(5):
        status, _, data, _ = post(gateway, chat("m-a", prefix + " again %d" % i), headers={
            "x-gateway-destination-endpoint": gateway.servers.addr(other),
            "x-llmproxy-endpoint": gateway.servers.addr(other),
            "x-llmproxy-cluster": "pool_b",
        })
        assert status == 200
        echo = json.loads(data)
        assert echo["served_by"] == home
        seen = echo["received_headers"]
        assert "x-gateway-destination-endpoint" not in seen
        assert seen["x-llmproxy-endpoint"] == gateway.servers.addr(home)
        assert seen["x-llmproxy-cluster"] == "pool_a"
    # Repeated and mixed-case copies are all removed.
    c = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        payload = json.dumps(chat("m-a", prefix + " duplicates")).encode()
        c.putrequest("POST", CHAT)
        c.putheader("content-type", "application/json")
        c.putheader("content-length", str(len(payload)))
        for name in ("x-gateway-destination-endpoint", "X-Gateway-Destination-Endpoint"):
            c.putheader(name, gateway.servers.addr(other))
        for value in ("pool_b", "pool_d"):
            c.putheader("X-LLMProxy-Cluster", value)
        c.putheader("x-llmproxy-anything", "1")
        c.endheaders(payload)
        r = c.getresponse()
        echo = json.loads(r.read())
        assert r.status == 200 and echo["served_by"] == home
        seen = echo["received_headers"]
        assert "x-gateway-destination-endpoint" not in seen and "x-llmproxy-anything" not in seen
        assert seen["x-llmproxy-cluster"] == "pool_a"
    finally:
        c.close()


def test_down_server_strict_503_then_avoided(gateway):
    statuses = []
    since_fail = 0
    # The down endpoint is one of three; its failures eject it (library: 3 consecutive failures).
    for i in range(120):
        status, hdrs, data, secs = post(gateway, chat("m-d", random_text(300, seed=5000 + i)))
        statuses.append(status)
        since_fail = 0 if status == 503 else since_fail + 1
        if status == 503:
            assert secs < 1.5, "strict override to a down server took %.2fs" % secs
            assert "x-served-by" not in hdrs
        else:
            assert status == 200, data
            assert json.loads(data)["served_by"] in POOLS["pool_d"]
        if 503 in statuses and since_fail >= 25:
            break  # 25 successes in a row after the last failure
    failures = statuses.count(503)
    assert failures >= 1, "the down endpoint was never picked in %d requests" % len(statuses)
    last_fail = len(statuses) - 1 - statuses[::-1].index(503)
    tail = statuses[last_fail + 1:]
    assert len(tail) >= 25 and all(s == 200 for s in tail), statuses
    assert failures <= 10, statuses
    wait_in_flight_zero(gateway)


def test_200_concurrent_mixed_models(gateway):
    def one(i):
        model = "m-a" if i % 2 else "m-b"
        stream = i % 5 == 0
        text = random_text(2000, seed=i % 20) + " turn %d" % i
        if stream:
            status, hdrs, data, _ = post(gateway, chat(model, text, stream=True),
                                         headers={"x-test-chunks": "3"})
            ok = status == 200 and data.rstrip().endswith(b"data: [DONE]")
            served = hdrs.get("x-served-by")
        else:
            status, hdrs, data, _ = post(gateway, chat(model, text))
            ok = status == 200
            served = json.loads(data).get("served_by") if ok else None
        pool = POOLS["pool_a"] if model == "m-a" else POOLS["pool_b"]
        return ok and served in pool, status, served

    with ThreadPoolExecutor(50) as ex:
        results = list(ex.map(one, range(200)))
    bad = [r for r in results if not r[0]]
    assert not bad, bad[:5]
    wait_in_flight_zero(gateway)


def test_client_abort_during_prefill_does_not_eject_endpoint(gateway):
    prefix = random_text(5000, seed=77)
    status, _, data, _ = post(gateway, chat("m-a", prefix + " warm"))
    assert status == 200
    home = json.loads(data)["served_by"]
    before = metrics(gateway)
    for i in range(4):  # more than the library's 3 consecutive failures
        payload = json.dumps(chat("m-a", prefix + " abandoned %d" % i)).encode()
        sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
        sock.sendall(("POST %s HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json\r\n"
                      "x-test-delay-ms: 700\r\ncontent-length: %d\r\n\r\n" % (CHAT, len(payload))).encode()
                     + payload)
        time.sleep(0.15)  # forwarded, the server is still "prefilling"
        sock.close()  # the client gives up
        # finished before the next pick (another Envoy worker may pick it): an abort still in
        # flight would be queued prefill on the home, and the next request could fairly go
        # elsewhere, so the home would not see four in a row
        wait_in_flight_zero(gateway)
    after = metrics(gateway)
    home_addr = gateway.servers.addr(home)
    picks = after.total("llmproxy_endpoint_picks_total", endpoint=home_addr) - \
        before.total("llmproxy_endpoint_picks_total", endpoint=home_addr)
    assert picks == 4, "the aborted requests went to their prefix's endpoint"
    assert after['llmproxy_finished_requests_total{status="none"}'] == before['llmproxy_finished_requests_total{status="none"}']
    assert after['llmproxy_finished_requests_total{status="4xx"}'] >= before['llmproxy_finished_requests_total{status="4xx"}'] + 4
    for name in ("llmproxy_endpoint_failures_total", "llmproxy_endpoint_ejections_total"):
        assert after.total(name, endpoint=home_addr) == before.total(name, endpoint=home_addr), name
    status, _, data, _ = post(gateway, chat("m-a", prefix + " after the aborts"))
    assert status == 200
    assert json.loads(data)["served_by"] == home  # still sticky: not ejected


def test_http2_downstream_large_prompt(gateway, tmp_path):
    curl = shutil.which("curl")
    if not curl or "HTTP2" not in subprocess.run([curl, "--version"], capture_output=True, text=True).stdout:
        pytest.skip("curl with HTTP/2 support needed for an h2c client")
    body = tmp_path / "body.json"
    body.write_text(json.dumps(chat("m-b", random_text(1_500_000, seed=9))))
    out = subprocess.run([curl, "-s", "--http2-prior-knowledge", "-H", "content-type: application/json",
                          "--data-binary", "@%s" % body, "-w", "\n%{http_version} %{http_code}",
                          "http://127.0.0.1:%d%s" % (gateway.port, CHAT)],
                         capture_output=True, text=True, timeout=30).stdout
    payload, _, tail = out.rpartition("\n")
    assert tail == "2 200", tail
    echo = json.loads(payload)
    assert echo["served_by"] in POOLS["pool_b"]
    assert echo["body_bytes"] == body.stat().st_size


def test_target_model_rewrite_reaches_upstream(gateway):
    status, _, data, _ = post(gateway, chat("m-t", "rewrite the model name"))
    assert status == 200, data
    echo = json.loads(data)
    assert echo["model"] == "served-t"  # what the upstream read in the body
    assert echo["served_by"] in POOLS["pool_a"]
    assert int(echo["received_headers"]["content-length"]) == echo["body_bytes"]


def test_triton_generate_is_transcoded(gateway):
    status, hdrs, data, _ = post(gateway, chat("m-tr", "hello triton"))
    assert status == 200, data
    assert hdrs["x-served-by"] in POOLS["pool_b"]
    body = json.loads(data)
    assert body["object"] == "chat.completion"
    text = body["choices"][0]["message"]["content"]
    assert text.startswith("hi from " + hdrs["x-served-by"] + " ("), text


def test_triton_generate_stream_is_transcoded(gateway):
    status, hdrs, data, _ = post(gateway, chat("m-tr", "hello stream", stream=True))
    assert status == 200, data
    assert hdrs["x-served-by"] in POOLS["pool_b"]
    assert hdrs["content-type"].startswith("text/event-stream")
    events = [l[6:] for l in data.decode().splitlines() if l.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "tok0 tok1 tok2 ", text
    wait_in_flight_zero(gateway)


def sender(gw):
    """`send(body, headers, path, method) -> (status, body bytes)` through `gw`, for the shared
    checks."""
    def send(body, headers, path=CHAT, method="POST"):
        status, _, data, _ = harness.request(gw.port, method, path, body, headers)
        return status, data
    return send


def test_force_stream_usage_counts_streams_without_showing_clients_what_they_did_not_ask(gateway):
    harness.check_forced_stream_usage(sender(gateway), gateway.request_log, lambda: metrics(gateway), "m-b")


def test_answers_usage_corrects_the_cache_model(gateway):
    harness.check_cache_feedback(sender(gateway), lambda: metrics(gateway), "m-fb")


def test_responses_api_chains_stay_on_the_server_that_stored_them(gateway):
    harness.check_response_chains(sender(gateway), lambda: metrics(gateway), "m-b")


def test_anthropic_messages_follow_their_conversation(gateway):
    harness.check_anthropic_messages(sender(gateway), lambda: metrics(gateway), "m-b")


def test_media_parts_count_their_tokens(gateway):
    harness.check_media_parts(sender(gateway), lambda: metrics(gateway), "m-b")


def test_tool_definitions_are_part_of_the_prompt(gateway):
    harness.check_tool_definitions(sender(gateway), lambda: metrics(gateway), "m-b")


def test_cache_salts_keep_prompts_apart(gateway):
    harness.check_cache_salt(sender(gateway), lambda: metrics(gateway), "m-b")


def test_llama_completion_follows_its_conversation(gateway):
    harness.check_llama_completion(sender(gateway), lambda: metrics(gateway), "m-b")


def test_sglang_generate_follows_its_conversation(gateway):
    harness.check_sglang_generate(sender(gateway), lambda: metrics(gateway), "m-b")


def test_request_log_has_one_line_per_finished_request(gateway):
    """log.enabled with a path: the library's writer thread appends one JSON line per finished
    request, with the host's x-request-id, the decision, status, outcome and timings: a plain
    answer, a stream, a 404 of the pick, and an endpoint that refuses connections."""
    run = "%x" % random.getrandbits(32)
    ids = {k: "%s-%s" % (run, k) for k in ("plain", "stream", "unknown", "down")}
    status, _, data, _ = post(gateway, chat("m-a", "log me"), {"x-request-id": ids["plain"]})
    assert status == 200, data
    served = json.loads(data)["served_by"]
    status, _, data, _ = post(gateway, chat("m-b", "log my stream", stream=True),
                              {"x-request-id": ids["stream"], "x-test-chunks": "3"})
    assert status == 200, data
    status, _, data, _ = post(gateway, chat("m-unknown", "x"), {"x-request-id": ids["unknown"]})
    assert status == 404, data
    status, _, data, _ = post(gateway, chat("m-down", "nobody listens"), {"x-request-id": ids["down"]})
    assert status == 503, data
    lines = request_log_lines(gateway.request_log, set(ids.values()))
    plain, stream = lines[ids["plain"]], lines[ids["stream"]]
    assert plain["model"] == "m-a" and plain["cluster"] == "pool_a" and plain["scene"] == "chat-a"
    assert plain["endpoint"] == gateway.servers.addr(served)
    assert plain["status"] == 200 and plain["outcome"] == "upstream" and plain["stream"] is False
    assert plain["algorithm"] == "inference_lb" and plain["bytes_in"] > 0 and plain["retries"] == 0
    assert plain["total_ms"] >= plain["ttft_ms"] >= 0
    assert "prompt" not in plain and "completion" not in plain, "no text without log.include_prompt"
    # include_candidates: the pick as weighed, every endpoint of the pool with its inference_lb
    # score, the served one among the best
    pick = plain["pick"]
    assert pick["decided_by"] == "algorithm", pick
    weighed = {c["endpoint"]: c for c in pick["candidates"]}
    assert set(weighed) == set(gateway.endpoints["pool_a"]), pick
    assert all("in_flight" in c and "cache_ratio" in c for c in weighed.values()), pick
    assert weighed[plain["endpoint"]]["score"] == max(c["score"] for c in weighed.values()), pick
    assert "pick" not in lines[ids["unknown"]], "no pick, no candidates"
    assert plain["bytes_out"] > 0 and stream["bytes_out"] > plain["bytes_out"] // 2
    assert stream["stream"] is True and stream["status"] == 200 and stream["model"] == "m-b"
    assert lines[ids["unknown"]]["error"] == "model_not_found" and "endpoint" not in lines[ids["unknown"]]
    down = lines[ids["down"]]
    assert down["endpoint"] == gateway.down and down["outcome"] == "endpoint_failed", down
    assert "ttft_ms" not in down
    m = metrics(gateway)
    assert m.total("llmproxy_request_log_lines_total", result="written") >= 4
    assert m.total("llmproxy_request_log_lines_total", result="dropped") == 0
