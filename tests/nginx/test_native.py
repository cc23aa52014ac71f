"""One scenario set, two nginx hosts: the Lua module (examples/nginx.conf) and the native module
(examples/nginx-native.conf, build/ngx_http_llmproxy_module.so, no Lua), both with 2 workers and
the shared routing state, in front of the fake OpenAI-compatible upstreams on 127.0.0.1. The
assertions use what both hosts export the same way: the llmproxy_nginx_* counters (summed over
the workers), the shared state's endpoint series, and the answers themselves. At the end the
native module serves every kind of request under valgrind (nginx with master_process off)."""

import asyncio
import json
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import harness
import test_shared_state as ss
from conftest import MAX_BODY, POOLS, library_config
from harness import CHAT, COMPLETIONS, chat, metrics, random_text, request, request_log_lines, wait_settled
from test_nginx_e2e import assert_our_error, check_responses, mixed_requests, raw_send, run_all

HOSTS = ["lua", "native"]


@pytest.fixture(scope="module", params=HOSTS)
def gw(request, servers):
    cfg = library_config(servers, servers.dead)
    # the request log, written by every worker's router (workers run as nobody when we are
    # root: a directory they can enter and write, outside pytest's private temp tree)
    log_dir = Path(tempfile.mkdtemp(prefix="llmproxy-request-log-"))
    os.chmod(log_dir, 0o777)
    cfg["log"] = {"enabled": True, "path": str(log_dir / "requests.log")}
    cfg["force_stream_usage"] = True  # streams ask for usage; clients that did not never see it
    passthrough = [servers.addr(n) for n in POOLS["pool_a"]]
    g = harness.HOSTS[request.param](cfg, passthrough, workers=2)
    g.servers = servers
    g.request_log = log_dir / "requests.log"
    yield g
    g.close()
    shutil.rmtree(log_dir, ignore_errors=True)


def post(gw, body, headers=None, path=CHAT):
    return request(gw.port, "POST", path, body, headers)


def settled(gw):
    """Nothing in flight in any worker: every pick finished (module counters) and every
    endpoint's load released (the shared state)."""
    m = wait_settled(gw.port, timeout=15)
    assert m.total("llmproxy_endpoint_in_flight_requests") == 0
    assert m.total("llmproxy_endpoint_prefill_chars") == 0
    assert m.total("llmproxy_nginx_picks_total", event="leaked") == 0
    return m


def delta(before, after, name, **labels):
    return after.total(name, **labels) - before.total(name, **labels)


# ---------------------------------------------------------------------------------------------
# routing


def test_routing_by_model_and_headers(gw):
    before = settled(gw)
    status, hdrs, data = post(gw, chat("m-a", "hello"),
                              headers={"x-gateway-destination-endpoint": "127.0.0.1:1",
                                       "x-llmproxy-cluster": "pool_b", "X-LLMProxy-Endpoint": "127.0.0.1:2"})
    assert status == 200, data
    echo = json.loads(data)
    assert echo["served_by"] in POOLS["pool_a"]
    seen = echo["received_headers"]
    assert seen["x-llmproxy-endpoint"] == gw.servers.addr(echo["served_by"])  # the client's was replaced
    assert seen["x-llmproxy-cluster"] == "pool_a"
    assert seen["x-llmproxy-scene"] == "chat-a"
    assert "x-gateway-destination-endpoint" not in seen
    assert hdrs["x-llmproxy-endpoint"] == seen["x-llmproxy-endpoint"]
    status, _, data = post(gw, {"model": "m-b", "prompt": "once upon a time"}, path=COMPLETIONS)
    assert status == 200 and json.loads(data)["served_by"] in POOLS["pool_b"], data
    # target_model: the body the backend gets names another model
    status, _, data = post(gw, chat("m-r", "rewrite me"))
    assert status == 200 and json.loads(data)["model"] == "m-r-upstream", data
    # not intercepted: proxied as is (the native host: round robin over the upstream's servers)
    served = set()
    for _ in range(6):
        status, hdrs, data = request(gw.port, "GET", "/v1/models", headers={"x-llmproxy-endpoint": "1.2.3.4:5"})
        assert status == 200
        echo = json.loads(data)
        served.add(echo["served_by"])
    assert served <= set(POOLS["pool_a"]) and len(served) >= 2
    after = settled(gw)
    assert delta(before, after, "llmproxy_nginx_requests_total", kind="passthrough") == 6
    assert delta(before, after, "llmproxy_nginx_picks_total", event="routed") == 3
    assert delta(before, after, "llmproxy_nginx_stripped_headers_total") >= 3 + 6


def test_prefix_sticks_across_workers(gw):
    """The same long prefix from fresh connections (reuseport spreads them over both workers)
    goes to one endpoint: the prefix index is the workers' shared state."""
    settled(gw)
    prefix = random_text(6000, seed=77 if gw.host == "lua" else 78)
    runs = []
    for i in range(16):
        status, hdrs, data = post(gw, chat("m-a", prefix + " question %d?" % i))
        assert status == 200, data
        runs.append((hdrs["x-llmproxy-worker"], json.loads(data)["served_by"]))
    assert len({w for w, _ in runs}) == 2, runs  # both workers took some
    assert len({s for _, s in runs[1:]}) == 1, runs  # after the first (cold) pick: one endpoint
    settled(gw)


# ---------------------------------------------------------------------------------------------
# SSE and first token


def test_sse_incremental_first_token_releases_prefill(gw):
    settled(gw)
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    try:
        body = json.dumps(chat("m-b", "stream please " + "p" * 2000, stream=True)).encode()
        sock.sendall(("POST %s HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                      "x-test-chunks: 5\r\nx-test-chunk-delay-ms: 250\r\nconnection: close\r\n\r\n"
                      % (CHAT, len(body))).encode() + body)
        t0 = time.perf_counter()
        f = sock.makefile("rb")
        assert b" 200 " in f.readline()
        hdrs = {}
        while True:
            line = f.readline().strip()
            if not line:
                break
            k, _, v = line.decode().partition(":")
            hdrs[k.strip().lower()] = v.strip()
        assert hdrs["content-type"] == "text/event-stream"

        def first_event(events):
            if len(events) == 1:
                served = gw.servers.addr(json.loads(events[0])["served_by"])
                mid = metrics(gw.port)
                # the stream is still open, and its first byte released the prompt's prefill load
                assert mid.value("llmproxy_endpoint_in_flight_requests", cluster="pool_b", endpoint=served) == 1
                assert mid.value("llmproxy_endpoint_prefill_chars", cluster="pool_b", endpoint=served) == 0
                assert mid.total("llmproxy_nginx_pending_requests") == 1

        events, arrivals = harness.read_sse(f.readline, t0, first_event)
    finally:
        sock.close()
    assert len(events) == 6 and events[-1] == b"[DONE]"
    assert arrivals[-1] - arrivals[0] >= 0.8, arrivals  # not buffered
    settled(gw)


def test_triton_transcoded(gw):
    status, hdrs, data = post(gw, chat("m-t", "to triton"))
    assert status == 200, data
    body = json.loads(data)
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"].startswith("hi from b")
    status, hdrs, data = post(gw, chat("m-t", "to triton, streamed", stream=True))
    assert status == 200 and hdrs["content-type"] == "text/event-stream", data
    events = [l[6:] for l in data.decode().splitlines() if l.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[0])["object"] == "chat.completion.chunk", data
    settled(gw)


# ---------------------------------------------------------------------------------------------
# errors


def test_errors_are_json(gw):
    before = settled(gw)
    assert_our_error(*post(gw, b"{not json"), 400, "invalid_request")
    assert_our_error(*post(gw, b""), 400, "invalid_request")
    assert_our_error(*post(gw, chat("m-unknown", "x")), 404, "model_not_found")
    assert_our_error(*post(gw, chat("m-none", "x")), 503, "no_endpoint")
    # over the library's max_body_bytes: refused by Content-Length before the body is read
    status, hdrs, data = post(gw, json.dumps(chat("m-a", "x" * (MAX_BODY + 1000))).encode())
    assert_our_error(status, hdrs, data, 413, "request_too_large")
    assert str(MAX_BODY) in json.loads(data)["error"]["message"]
    # over nginx's client_max_body_size (2m here): error_page makes nginx's 413 our JSON
    assert_our_error(*post(gw, b"z" * (3 * 1024 * 1024)), 413, "request_too_large")
    after = settled(gw)
    assert delta(before, after, "llmproxy_nginx_picks_total", event="routed") == 0


# ---------------------------------------------------------------------------------------------
# upstream failures


def test_dead_endpoint_retried_elsewhere(gw):
    before = settled(gw)
    for i in range(20):
        status, _, data = post(gw, chat("m-d", random_text(300, seed=9000 + i)))
        assert status == 200, data  # never the dead endpoint's failure: retried on another one
        assert json.loads(data)["served_by"] in POOLS["pool_d"]
    after = settled(gw)
    retries = delta(before, after, "llmproxy_nginx_retries_total")
    assert retries >= 1
    assert delta(before, after, "llmproxy_endpoint_failures_total", cluster="pool_d",
                 endpoint=gw.servers.dead) >= 1
    assert delta(before, after, "llmproxy_nginx_errors_total", reason="retry_exhausted") == 0


def test_all_endpoints_dead_502_json_and_finished(gw):
    before = settled(gw)
    for model in ("m-dead2", "m-dead1"):
        assert_our_error(*post(gw, chat(model, "anyone?")), 502, "upstream_unavailable")
    after = settled(gw)  # finished after the error_page redirect too
    assert delta(before, after, "llmproxy_nginx_picks_total", event="routed") == 2
    assert delta(before, after, "llmproxy_nginx_finished_total", outcome="endpoint_failed") == 2


def test_upstream_503_passes_through_and_counts_as_failure(gw):
    before = settled(gw)
    status, hdrs, data = post(gw, chat("m-b", "busy"), headers={"x-test-status": "503"})
    assert status == 503 and hdrs.get("x-served-by") in POOLS["pool_b"], data
    after = settled(gw)
    assert delta(before, after, "llmproxy_endpoint_failures_total", cluster="pool_b") == 1
    assert delta(before, after, "llmproxy_nginx_finished_total", outcome="upstream") == 1


def test_client_abort_before_the_response_is_local(gw):
    before = settled(gw)
    sock = raw_send(gw.port, chat("m-a", "slow"), "x-test-delay-ms: 1500\r\n")
    time.sleep(0.3)
    sock.close()
    after = settled(gw)
    assert delta(before, after, "llmproxy_nginx_client_aborts_total") == 1
    assert delta(before, after, "llmproxy_nginx_finished_total", outcome="local") == 1
    assert delta(before, after, "llmproxy_endpoint_failures_total") == 0


def test_spooled_body_is_routed(gw):
    """A 200 KB prompt (client_body_buffer_size is 9m: in memory) and the file path in the
    1-worker variant below."""
    status, _, data = post(gw, chat("m-b", random_text(200_000, seed=3)))
    assert status == 200 and json.loads(data)["served_by"] in POOLS["pool_b"], data
    settled(gw)


# ---------------------------------------------------------------------------------------------
# concurrency and reload


def test_1000_concurrent_mixed_requests(gw):
    before = settled(gw)
    reqs = mixed_requests(1000, seed=21)
    results = asyncio.run(run_all(gw.port, reqs))
    problems = check_responses(reqs, results)
    assert not problems, "%d problems, first: %s" % (len(problems), problems[:5])
    after = settled(gw)
    routed = delta(before, after, "llmproxy_nginx_picks_total", event="routed")
    assert routed == sum(1 for r in reqs if r[5])
    assert delta(before, after, "llmproxy_nginx_picks_total", event="finished") == routed


def test_reload_under_load(gw):
    settled(gw)
    old_pids = gw.worker_pids()
    streams = [("POST", CHAT, chat("m-b", "reload stream %d" % i, stream=True),
                {"x-test-chunks": "8", "x-test-chunk-delay-ms": "120"}, 200, "pool_b") for i in range(8)]
    slow = [("POST", CHAT, chat("m-a", "reload slow %d" % i), {"x-test-delay-ms": "700"}, 200, "pool_a")
            for i in range(8)]

    async def scenario():
        inflight = asyncio.ensure_future(run_all(gw.port, streams + slow))
        await asyncio.sleep(0.4)
        r = await asyncio.get_running_loop().run_in_executor(None, gw.nginx_cmd, "-s", "reload")
        assert r.returncode == 0, r.stderr
        during = mixed_requests(60, seed=22)
        late = await run_all(gw.port, during)
        return await inflight, during, late

    results, during, late = asyncio.run(scenario())
    problems = check_responses(streams + slow, results) + check_responses(during, late)
    assert not problems, problems[:5]
    for res in results[:len(streams)]:
        assert res.body.count(b"data: ") == 9  # every event of every stream
    deadline = time.time() + 15
    while time.time() < deadline and any(os.path.exists("/proc/%d" % p) for p in old_pids):
        time.sleep(0.1)
    assert not any(os.path.exists("/proc/%d" % p) for p in old_pids), "old workers still running"
    harness.wait_until(lambda: metrics(gw.port).value("llmproxy_nginx_workers") == 2, timeout=10,
                       what="2 workers after the reload")
    settled(gw)
    assert "exits with" not in gw.log_text()
    assert "kept from before the reload" in gw.log_text()
    assert not gw.crashes()


def sender(g):
    """`send(body, headers, path, method) -> (status, body bytes)` through `g`, for the shared
    checks."""
    def send(body, headers, path=CHAT, method="POST"):
        status, _, data = request(g.port, method, path, body, headers)
        return status, data
    return send


def test_force_stream_usage_counts_streams_without_showing_clients_what_they_did_not_ask(gw):
    harness.check_forced_stream_usage(sender(gw), gw.request_log, lambda: metrics(gw.port), "m-b")


def test_answers_usage_corrects_the_cache_model(gw):
    harness.check_cache_feedback(sender(gw), lambda: metrics(gw.port), "m-fb")


def test_responses_api_chains_stay_on_the_server_that_stored_them(gw):
    harness.check_response_chains(sender(gw), lambda: metrics(gw.port), "m-b")


def test_anthropic_messages_follow_their_conversation(gw):
    harness.check_anthropic_messages(sender(gw), lambda: metrics(gw.port), "m-b")


def test_media_parts_count_their_tokens(gw):
    harness.check_media_parts(sender(gw), lambda: metrics(gw.port), "m-b")


def test_tool_definitions_are_part_of_the_prompt(gw):
    harness.check_tool_definitions(sender(gw), lambda: metrics(gw.port), "m-b")


def test_cache_salts_keep_prompts_apart(gw):
    harness.check_cache_salt(sender(gw), lambda: metrics(gw.port), "m-b")


def test_llama_completion_follows_its_conversation(gw):
    harness.check_llama_completion(sender(gw), lambda: metrics(gw.port), "m-b")


def test_sglang_generate_follows_its_conversation(gw):
    harness.check_sglang_generate(sender(gw), lambda: metrics(gw.port), "m-b")


def test_request_log_has_one_line_per_finished_request(gw):
    """log.enabled with a path, both hosts, 2 workers appending to one file: one JSON line per
    finished request with the client's x-request-id: a plain answer, a stream, a 404 of the
    pick, a dead endpoint retried on another (retries 1), and every endpoint dead (nginx's
    502 through error_page)."""
    run = "%x" % random.getrandbits(32)
    ids = {k: "%s-%s" % (run, k) for k in ("plain", "stream", "unknown", "retried", "dead2")}
    status, _, data = post(gw, chat("m-a", "log me"), {"x-request-id": ids["plain"]})
    assert status == 200, data
    served = json.loads(data)["served_by"]
    status, _, data = post(gw, chat("m-b", "log my stream", stream=True),
                           {"x-request-id": ids["stream"], "x-test-chunks": "3"})
    assert status == 200, data
    status, _, data = post(gw, chat("m-unknown", "x"), {"x-request-id": ids["unknown"]})
    assert status == 404, data
    status, _, data = post(gw, chat("m-dead2", "x"), {"x-request-id": ids["dead2"]})
    assert status == 502, data
    retried = None
    for i in range(20):  # until a pick lands on the dead endpoint first and is retried
        rid = "%s-%d" % (ids["retried"], i)
        status, _, data = post(gw, chat("m-retry", random_text(300, seed=7100 + i)), {"x-request-id": rid})
        assert status == 200, data
        rec = request_log_lines(gw.request_log, {rid})[rid]
        if rec["retries"] == 1:
            retried = rec
            break
    assert retried, "no pick of m-retry went to the dead endpoint first"
    ids.pop("retried")
    lines = request_log_lines(gw.request_log, set(ids.values()))
    plain, stream = lines[ids["plain"]], lines[ids["stream"]]
    assert plain["model"] == "m-a" and plain["cluster"] == "pool_a" and plain["scene"] == "chat-a"
    assert plain["endpoint"] == gw.servers.addr(served)
    assert plain["status"] == 200 and plain["outcome"] == "upstream" and plain["retries"] == 0
    assert plain["total_ms"] >= plain["ttft_ms"] >= 0 and plain["bytes_in"] > 0
    assert "prompt" not in plain and "completion" not in plain, "no text without log.include_prompt"
    assert plain["bytes_out"] > 0 and stream["bytes_out"] > 0
    assert stream["stream"] is True and stream["status"] == 200 and stream["model"] == "m-b"
    assert lines[ids["unknown"]]["error"] == "model_not_found"
    assert lines[ids["dead2"]]["outcome"] == "endpoint_failed" and lines[ids["dead2"]]["retries"] == 1
    assert retried["status"] == 200 and retried["endpoint"] == gw.servers.addr(POOLS["pool_b"][0])
    m = metrics(gw.port)
    assert m.total("llmproxy_request_log_lines_total", result="dropped") == 0
    assert m.total("llmproxy_request_log_lines_total", result="failed") == 0


# ---------------------------------------------------------------------------------------------
# the native module alone


def test_metrics_state_once_every_workers_router_merged(gw):
    """The metrics location with the shared state, on both hosts: the state's series
    (endpoints, prefix index, the region) once and unlabelled; every worker's router series
    (picks, finishes, latencies), each sample labelled worker="<pid>", whichever worker answers
    (native: its own rendered now, the others' published snapshots, at most 1 s old); one
    HELP/TYPE per family; and the routers' picks add up to what the module counted."""
    settled(gw)
    time.sleep(1.2)  # every worker's snapshot is current (native: published every second)
    before = metrics(gw.port)
    for i in range(40):  # spread requests over both workers (reuseport)
        status, _, data = request(gw.port, "POST", CHAT, chat("m-a", "merge %d" % i))
        assert status == 200, data[:200]
    pids = {str(p) for p in gw.worker_pids()}
    # the routers' picks (summed over the workers) grow by what the module counted: 40
    deadline = time.time() + 5
    while True:
        m = metrics(gw.port)
        routed = m.total("llmproxy_picks_total", outcome="routed") - before.total("llmproxy_picks_total", outcome="routed")
        if routed == 40 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert routed == 40
    assert m.total("llmproxy_nginx_picks_total", event="routed") - before.total("llmproxy_nginx_picks_total", event="routed") == 40
    for family in ("llmproxy_endpoint_in_flight_requests", "llmproxy_endpoint_picks_total",
                   "llmproxy_prefix_index_entries", "llmproxy_shared_state_workers"):
        samples = m.select(family)
        assert samples and not any("worker" in labels for labels, _ in samples), (family, samples[:3])
    assert len(m.select("llmproxy_endpoint_picks_total", cluster="pool_a",
                        endpoint=gw.servers.addr(POOLS["pool_a"][0]))) == 1
    for family in ("llmproxy_picks_total", "llmproxy_in_flight_requests",
                   "llmproxy_pick_duration_seconds_count"):
        samples = m.select(family)
        assert samples and all("worker" in labels for labels, _ in samples), (family, samples[:3])
        assert {labels["worker"] for labels, _ in samples} == pids, (family, pids)
    types = [l.split()[2] for l in m.text.splitlines() if l.startswith("# TYPE ")]
    assert len(types) == len(set(types)), sorted(t for t in types if types.count(t) > 1)
    helps = [l.split()[2] for l in m.text.splitlines() if l.startswith("# HELP ")]
    assert len(helps) == len(set(helps)), sorted(t for t in helps if helps.count(t) > 1)
    # every sample of a family sits under its own TYPE line (Prometheus wants families whole)
    seen, current = set(), None
    for line in m.text.splitlines():
        if line.startswith("# TYPE "):
            current = line.split()[2]
            assert current not in seen, current
            seen.add(current)
        elif line and not line.startswith("#"):
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0)
            base = re.sub(r"_(bucket|sum|count|total)$", "", name)
            assert current in (name, base, base + "_total") or current is None, (current, line)
    assert m.value("llmproxy_nginx_stale_snapshots") == 0


# a main request outside the llmproxy locations that mirrors itself into one: the mirror is a
# subrequest, which the module refuses to route (JSON 501, discarded by nginx)
MIRROR = """
        location = /mirrored {
            mirror /v1/chat/completions;
            proxy_pass http://llmproxy_backend/v1/models;
        }"""


@pytest.fixture(scope="module")
def native1(servers):
    """The native module with 1 worker and bodies above 16 KiB spooled to a temp file."""
    cfg = library_config(servers, servers.dead)
    g = harness.NativeNginx(cfg, [servers.addr(n) for n in POOLS["pool_a"]], workers=1, body_buffer="16k",
                            extra_locations=MIRROR)
    g.servers = servers
    yield g
    g.close()


def test_native_body_from_temp_file(native1):
    before = settled(native1)
    status, _, data = post(native1, chat("m-b", random_text(200_000, seed=4)))
    assert status == 200 and json.loads(data)["served_by"] in POOLS["pool_b"], data
    after = settled(native1)
    assert delta(before, after, "llmproxy_nginx_request_bodies_total", source="file") == 1


@pytest.fixture(scope="module", params=HOSTS)
def learn_gw(request, servers):
    """Either host, 1 worker (its router metrics are the page's), 16-byte chunks, and a model
    on the two endpoints of pool_b: learning from the answer (issue #19)."""
    cfg = library_config(servers, servers.dead)
    cfg["hash_chunk_bytes"] = 16
    cfg["model_mapping_rule"]["m-l"] = {"rules": [{"scene_name": "learn", "cluster": "pool_b", "backend": "vllm"}]}
    g = harness.HOSTS[request.param](cfg, [servers.addr(n) for n in POOLS["pool_a"]], workers=1)
    g.servers = servers
    yield g
    g.close()


def test_second_turn_follows_the_learned_answer(learn_gw):
    """The second turn sends the first answer back: it goes to the endpoint that produced it,
    decided on a cache ratio above 0.75 that only the learned answer (some thirty 16-byte
    chunks, against the question's few) can give."""
    gw = learn_gw
    before = settled(gw)
    for conv in range(6):
        messages = [{"role": "user", "content": random_text(30, seed=700 + conv)}]
        status, hdrs, data = post(gw, {"model": "m-l", "stream": True, "messages": messages},
                                  {"x-test-chunks": "80"})
        assert status == 200, data[:300]
        answer = "".join(c.get("delta", {}).get("content") or ""
                         for line in data.split(b"\n") if line.startswith(b"data: {")
                         for c in json.loads(line[6:])["choices"])
        assert answer.endswith("tok79 ")
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "go on"}]
        status, hdrs2, data = post(gw, {"model": "m-l", "messages": messages})
        assert status == 200, data[:300]
        assert hdrs2["x-served-by"] == hdrs["x-served-by"], "conversation %d" % conv
    after = settled(gw)
    assert delta(before, after, "llmproxy_learned_response_chunks_total") >= 6 * 25
    ratio = "llmproxy_decision_cache_ratio"
    high = lambda m: m.total(ratio + "_count") - m.total(ratio + "_bucket", le="0.75")
    assert high(after) - high(before) >= 6, after.text


def test_native_subrequest_refused(native1):
    before = settled(native1)
    status, _, data = post(native1, chat("m-a", "mirror me"), path="/mirrored")
    assert json.loads(data)["served_by"] in POOLS["pool_a"], data  # the main request, proxied untouched
    harness.wait_until(lambda: delta(before, metrics(native1.port), "llmproxy_nginx_errors_total",
                                     reason="subrequest") == 1, timeout=5, what="the mirror refused")
    after = settled(native1)
    assert delta(before, after, "llmproxy_nginx_picks_total", event="routed") == 0


def test_native_config_errors_stop_nginx(servers, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"algorithm": "fastest"}')
    conf = tmp_path / "nginx.conf"
    conf.write_text(harness.render_native_example(harness.free_port(), 1, bad, ["127.0.0.1:1"]))
    (tmp_path / "build" / "nginx").mkdir(parents=True)
    shutil.copy2(harness.MODULE, tmp_path / "build" / harness.MODULE.name)
    r = subprocess.run([harness.NGINX, "-p", "%s/" % tmp_path, "-c", str(conf), "-t"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "llmproxy: invalid configuration" in r.stderr and "algorithm" in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------
# remote cache lookups (metadata_center.cache_enabled): llmproxy_pick_start, polled from a timer
# while the worker serves other requests (as tests/nginx/test_metadata_center.py for Lua)


@pytest.fixture(scope="module")
def metadata_center():
    with harness.MetadataCenter() as mc:
        yield mc


def native_mc(servers, mc_port, workers=2, **mc):
    cfg = library_config(servers, servers.dead)
    cfg["metadata_center"] = dict({"enabled": True, "host": "127.0.0.1", "port": mc_port, "load_poll_ms": 50}, **mc)
    g = harness.NativeNginx(cfg, [servers.addr(n) for n in POOLS["pool_a"]], workers=workers)
    g.servers = servers
    return g


mc_saves = harness.metadata_center_saves


def test_native_remote_cache_lookups_follow_another_gateway(servers, metadata_center):
    """Gateway A (native, the Metadata-Center without lookups) serves long prompts and saves
    where their prefixes went; gateway B (native, cache_enabled, 2 workers), whose routers never
    saw them, sends each prompt to the server that served it, by asking."""
    a = native_mc(servers, metadata_center.port, workers=1)
    try:
        b = native_mc(servers, metadata_center.port, cache_enabled=True, timeout_ms=200)
    except BaseException:
        a.close()
        raise
    try:
        saves = mc_saves(metadata_center.port)
        prompts = [random_text(3000, seed=1900 + i) for i in range(6)]
        warmed = []
        for p in prompts:
            status, _, data = post(a, chat("m-a", p))
            assert status == 200, data
            warmed.append(json.loads(data)["served_by"])
        harness.wait_until(lambda: mc_saves(metadata_center.port) >= saves + 6, 5,
                           "gateway A's cache saves to reach the metadata-center")
        before = settled(b)
        served, workers = [], set()
        for p in prompts:
            status, hdrs, data = post(b, chat("m-a", p))
            assert status == 200, data
            served.append(json.loads(data)["served_by"])
            workers.add(hdrs["x-llmproxy-worker"])
        after = settled(b)
        # without the lookup each pick would be a load-based draw among three idle servers
        assert served == warmed, (served, warmed)
        assert delta(before, after, "llmproxy_nginx_picks_total", event="waited_for_lookup") == 6
        assert delta(before, after, "llmproxy_nginx_picks_total", event="lookup_abandoned") == 0
        assert delta(before, after, "llmproxy_nginx_picks_total", event="routed") == 6
        print("\nnative remote cache lookups: 6 of 6 prompts where gateway A cached them (workers %s)"
              % sorted(workers))

        # an answer A made, polled through B: on its server; an unknown id passes through
        harness.check_stored_answer_found_elsewhere(a.port, b.port, lambda: metrics(b.port), "m-a",
                                                    metadata_center.port)
        settled(b)
    finally:
        b.close()
        a.close()


def test_native_dead_or_silent_metadata_center_costs_only_the_timeout(servers):
    """cache_enabled against a port where nothing listens (refused at once) and one that takes
    connections and never answers (every lookup runs to its timeout): every pick answers from
    local data within the timeout, the worker keeps serving other requests meanwhile (1 worker),
    and a client that leaves while its pick is pending frees the ticket (nothing leaked)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # the kernel completes the handshakes; nobody ever reads
    try:
        for port, timeout_ms in ((harness.refused_port(), 100), (silent.getsockname()[1], 400)):
            g = native_mc(servers, port, workers=1, cache_enabled=True, timeout_ms=timeout_ms)
            try:
                before = settled(g)
                for i in range(4):
                    started = time.time()
                    status, _, data = post(g, chat("m-a", random_text(2000, seed=2000 + i)))
                    assert status == 200, data
                    assert time.time() - started < timeout_ms / 1000 + 0.5
                after = settled(g)
                assert delta(before, after, "llmproxy_nginx_picks_total", event="waited_for_lookup") == 4
                assert delta(before, after, "llmproxy_nginx_picks_total", event="lookup_abandoned") == 0
                assert delta(before, after, "llmproxy_remote_cache_lookups_total", result="local_fallback") == 4
                if timeout_ms < 400:
                    continue
                # the silent one: a pick pending for 400 ms does not hold the worker
                sock = raw_send(g.port, chat("m-a", random_text(2000, seed=2100)), "")
                time.sleep(0.05)
                started = time.time()
                status, _, _ = request(g.port, "GET", "/v1/models")
                assert status == 200 and time.time() - started < 0.2, time.time() - started
                assert b" 200 " in sock.recv(65536).split(b"\r\n", 1)[0]
                sock.close()
                # a client that leaves while its pick is pending
                sock = raw_send(g.port, chat("m-a", random_text(2000, seed=2200)), "")
                time.sleep(0.1)
                sock.close()
                harness.wait_until(lambda: delta(before, metrics(g.port), "llmproxy_nginx_picks_total",
                                                 event="lookup_cancelled") == 1, 5, "the pending pick cancelled")
                time.sleep(timeout_ms / 1000 + 0.2)  # the library finishes the decision nobody took
                after = settled(g)
                assert delta(before, after, "llmproxy_nginx_picks_total", event="waited_for_lookup") == 6
                assert delta(before, after, "llmproxy_nginx_picks_total", event="routed") == 5
            finally:
                g.close()
            assert not g.crashes()
    finally:
        silent.close()


# ---------------------------------------------------------------------------------------------
# a worker killed mid-request (4 workers, shared state; as test_shared_state.py::test_c for Lua)


def test_native_killed_workers_share_is_taken_back(servers):
    """kill -9 of a native worker holding streams: its share of the shared in-flight counters is
    taken back by the other workers' reaper within REAP_WITHIN (exactly its share, endpoint by
    endpoint), its pending picks count as lost in the module's counters (a slot per worker
    process, reaped when its pid is gone), the others keep serving, and the master's new worker
    routes."""
    g = harness.NativeNginx(library_config(servers, servers.dead), [servers.addr(n) for n in POOLS["pool_a"]],
                            workers=4)
    g.servers = servers
    streams = []
    try:
        before = settled(g)
        reaped = before.value("llmproxy_shared_state_reaped_workers_total")
        streams = ss.open_streams(g, "m-a", 500, at_least=6, workers_at_least=3, chunks=80)
        by_worker = {}
        for s in streams:
            by_worker.setdefault(s.worker, []).append(s)
        victim = max(by_worker, key=lambda w: len(by_worker[w]))
        doomed = by_worker[victim]
        survivors = [s for s in streams if s.worker != victim]
        m = metrics(g.port)
        assert ss.endpoint_view(g, m, "llmproxy_endpoint_in_flight_requests", "pool_a") == \
            ss.count_by_server(streams, "pool_a")
        assert m.value("llmproxy_nginx_pending_requests") == len(streams)
        expected = ss.count_by_server(survivors, "pool_a")

        killed_at = time.time()
        g.kill_worker(victim)
        while True:
            m = metrics(g.port)
            seen = ss.endpoint_view(g, m, "llmproxy_endpoint_in_flight_requests", "pool_a")
            took = time.time() - killed_at
            if seen == expected or took > ss.REAP_WITHIN:
                break
            time.sleep(0.05)
        assert seen == expected, ("in flight per server", seen, "expected", expected,
                                  "the killed worker held", ss.count_by_server(doomed, "pool_a"))
        assert m.value("llmproxy_shared_state_reaped_workers_total") == reaped + 1
        assert m.value("llmproxy_nginx_pending_requests") == len(survivors)
        assert delta(before, m, "llmproxy_nginx_picks_total", event="lost") == len(doomed)
        print("\nnative: killed worker %d holding %d of %d streams, its share taken back after %.2fs"
              % (victim, len(doomed), len(streams), took))

        assert all(s.ended_early() for s in doomed)
        assert all(s.more_events() for s in survivors)
        served = [ss.post(g, chat("m-a", "after the kill %d" % i)) for i in range(8)]
        assert {w for _, w, _ in served} - {victim} and all(s in POOLS["pool_a"] for _, _, s in served)
        harness.wait_until(lambda: len(g.worker_pids()) == 4 and victim not in g.worker_pids(), 10,
                           "the master to replace the killed worker")
        g.wait_ready()  # llmproxy_nginx_workers == 4 again: the dead worker's slot was reaped
        m = metrics(g.port)
        assert m.value("llmproxy_shared_state_workers") == 4
        assert ss.endpoint_view(g, m, "llmproxy_endpoint_in_flight_requests", "pool_a") == expected
    finally:
        ss.close_all(streams)
    try:
        after = ss.wait_drained(g, "pool_a")  # settled: routed == finished (lost included)
        assert delta(before, after, "llmproxy_nginx_picks_total", event="leaked") == 0
        assert "process %d exited on signal 9" % victim in g.log_text()
        assert not g.crashes()
    finally:
        g.close()


VALGRIND = shutil.which("valgrind")


def under_valgrind(cfg, servers, log):
    """The native nginx with master_process off (one process serving requests) under valgrind's
    memcheck, its report in `log`."""
    g = harness.NativeNginx(cfg, [servers.addr(n) for n in POOLS["pool_a"]], workers=1,
                            master_process=False, ready_timeout=90,
                            wrapper=[VALGRIND, "--error-exitcode=0", "--leak-check=full",
                                     "--errors-for-leak-kinds=definite", "--show-leak-kinds=definite",
                                     "--trace-children=no", "--num-callers=30",
                                     "--suppressions=%s" % (harness.ROOT / "tests" / "nginx" / "valgrind-nginx.supp"), "--log-file=%s" % log])
    g.servers = servers
    return g


def assert_valgrind_clean(log):
    """Zero memcheck errors, nothing definitely lost (after a graceful quit)."""
    text = log.read_text()
    assert re.search(r"total heap usage: [\d,]+ allocs", text), text[-3000:]
    summary = re.findall(r"ERROR SUMMARY: (\d+) errors", text)
    assert summary and summary[-1] == "0", text[-6000:]
    assert "definitely lost: 0 bytes" in text or "definitely lost" not in text, text[-6000:]


@pytest.mark.skipif(VALGRIND is None, reason="valgrind not installed")
def test_native_module_under_valgrind(servers, tmp_path):
    """nginx (master_process off: one process serving requests) with the module, under
    valgrind's memcheck: every kind of request, then a graceful quit; zero errors, nothing
    definitely lost."""
    log = tmp_path / "valgrind.log"
    g = under_valgrind(library_config(servers, servers.dead), servers, log)
    try:
        for body, hdrs in [(chat("m-a", "hello"), {"x-llmproxy-endpoint": "1.1.1.1:1"}),
                           (chat("m-b", "stream", stream=True), {"x-test-chunks": "3"}),
                           (chat("m-r", "rewrite"), {}), (chat("m-t", "triton"), {}),
                           (chat("m-t", "triton stream", stream=True), {}),
                           (b"{bad", {}), (chat("m-unknown", "x"), {}), (chat("m-none", "x"), {}),
                           (chat("m-d", "retry"), {}), (chat("m-dead2", "x"), {}),
                           (chat("m-b", "busy"), {"x-test-status": "503"}),
                           (json.dumps(chat("m-a", "x" * (MAX_BODY + 10))).encode(), {}),
                           (chat("m-b", random_text(50_000, seed=9)), {})]:
            status, _, data = request(g.port, "POST", CHAT, body, hdrs, timeout=60)
            assert status in (200, 400, 404, 413, 502, 503), (status, data)
        assert request(g.port, "GET", "/v1/models", timeout=60)[0] == 200
        sock = raw_send(g.port, chat("m-a", "slow"), "x-test-delay-ms: 800\r\n")
        time.sleep(0.3)
        sock.close()
        m = wait_settled(g.port, timeout=30)
        assert m.total("llmproxy_nginx_picks_total", event="leaked") == 0
    finally:
        g.close()
    assert_valgrind_clean(log)


@pytest.mark.skipif(VALGRIND is None, reason="valgrind not installed")
def test_native_pending_lookups_under_valgrind(servers, metadata_center, tmp_path):
    """The pending-pick path under memcheck: remote cache lookups answered by a real
    Metadata-Center (the timer polls the ticket until decided), and against one that never
    answers (every lookup runs to its timeout), with a client that leaves while its pick is
    pending (the pool cleanup frees the ticket), and a poll of an unknown stored answer that
    the pick passes through; zero errors, nothing definitely lost."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # the kernel completes the handshakes; nobody ever reads
    try:
        for name, port in (("real", metadata_center.port), ("silent", silent.getsockname()[1])):
            log = tmp_path / ("valgrind-%s.log" % name)
            cfg = library_config(servers, servers.dead)
            cfg["metadata_center"] = {"enabled": True, "host": "127.0.0.1", "port": port, "load_poll_ms": 50,
                                      "cache_enabled": True, "timeout_ms": 300}
            g = under_valgrind(cfg, servers, log)
            try:
                before = metrics(g.port, timeout=30)
                for i in range(3):
                    status, _, data = request(g.port, "POST", CHAT, chat("m-a", random_text(2000, seed=2300 + i)),
                                              timeout=60)
                    assert status == 200, data
                # a poll of a stored answer nobody knows: looked up, then passed through
                # untouched (LLMPROXY_PASSTHROUGH): a server's own 404
                status, _, data = request(g.port, "GET", harness.RESPONSES + "/resp_nowhere", timeout=60)
                assert status == 404 and json.loads(data)["served_by"], data
                sock = raw_send(g.port, chat("m-a", random_text(2000, seed=2400)), "")
                time.sleep(0.05)
                sock.close()  # gone while pending (silent) or after its answer (real)
                time.sleep(0.6)  # the library finishes a decision nobody took
                m = wait_settled(g.port, timeout=30)
                assert delta(before, m, "llmproxy_nginx_picks_total", event="waited_for_lookup") >= 3
                assert m.total("llmproxy_nginx_picks_total", event="leaked") == 0
            finally:
                g.close()
            assert_valgrind_clean(log)
    finally:
        silent.close()
