"""End-to-end: Debian's nginx + libnginx-mod-http-lua + resty.llmproxy (examples/nginx.conf)
with 2 workers in front of the fake OpenAI-compatible upstreams (tests/common/fake_openai.py), all
on 127.0.0.1."""

import asyncio
import json
import os
import random
import socket
import time

import pytest

import aclient
from conftest import MAX_BODY, POOLS
from harness import CHAT, COMPLETIONS, chat, metrics, random_text, read_sse, request, wait_settled


def post(gw, body, headers=None, path=CHAT):
    return request(gw.port, "POST", path, body, headers)


def assert_our_error(status, hdrs, data, expected_status, code):
    assert status == expected_status, data
    assert hdrs.get("content-type") == "application/json", hdrs
    err = json.loads(data)["error"]
    assert err["code"] == code, err
    assert err["message"] and err["type"]
    assert "x-served-by" not in hdrs  # answered by the gateway, not a server


# ---------------------------------------------------------------------------------------------
# workers and routing


def test_router_per_worker(gateway):
    m = metrics(gateway.port)
    pids = gateway.worker_pids()
    assert len(pids) == 2
    # one router per worker process (built in init_worker), none in the master
    assert [int(p) for p in m.workers()] == pids
    assert str(gateway.proc.pid) not in m.workers()
    for p in pids:
        assert m.value("llmproxy_nginx_worker_start_time_seconds", worker=p) > 0


def test_routed_request_reaches_pool_with_headers(gateway):
    status, hdrs, data = post(gateway, chat("m-a", "hello"),
                              headers={"x-gateway-destination-endpoint": "127.0.0.1:1",
                                       "x-llmproxy-cluster": "pool_b"})
    assert status == 200, data
    echo = json.loads(data)
    assert echo["served_by"] in POOLS["pool_a"]
    assert hdrs["x-served-by"] == echo["served_by"]
    seen = echo["received_headers"]
    assert seen["x-llmproxy-endpoint"] == gateway.servers.addr(echo["served_by"])
    assert seen["x-llmproxy-cluster"] == "pool_a"  # the client's value was replaced
    assert seen["x-llmproxy-scene"] == "chat-a"
    assert "x-gateway-destination-endpoint" not in seen
    assert echo["body_bytes"] == len(json.dumps(chat("m-a", "hello")))
    status, _, data = post(gateway, {"model": "m-b", "prompt": "once upon a time"}, path=COMPLETIONS)
    assert status == 200, data
    assert json.loads(data)["served_by"] in POOLS["pool_b"]


def test_passthrough_is_untouched(gateway):
    before = metrics(gateway.port)
    served = set()
    for _ in range(9):
        status, hdrs, data = request(gateway.port, "GET", "/v1/models")
        assert status == 200
        served.add(json.loads(data)["served_by"])
        assert "x-llmproxy-endpoint" not in hdrs
    assert served <= set(POOLS["pool_a"]) and len(served) >= 2  # the passthrough upstream's round robin
    # not an intercepted path / method: proxied as is, whatever the body says
    status, _, data = post(gateway, {"model": "m-b", "input": "x"}, path="/v1/embeddings")
    assert status == 200 and json.loads(data)["served_by"] in POOLS["pool_a"]
    status, _, data = request(gateway.port, "GET", CHAT)
    assert status == 404 and json.loads(data)["method"] == "GET"  # the upstream's own 404
    after = metrics(gateway.port)
    assert after.total("llmproxy_nginx_requests_total", kind="passthrough") - \
        before.total("llmproxy_nginx_requests_total", kind="passthrough") == 11
    assert after.total("llmproxy_picks_total") == before.total("llmproxy_picks_total")


def prefix_run(gw, n, seed):
    prefix = random_text(6000, seed=seed)
    runs = []
    for i in range(n):
        status, hdrs, data = post(gw, chat("m-a", prefix + " question number %d?" % i))
        assert status == 200, data
        runs.append((hdrs["x-llmproxy-worker"], json.loads(data)["served_by"]))
    return runs


def cache_ratio(before, after):
    prompt = after.total("llmproxy_prompt_chars_total") - before.total("llmproxy_prompt_chars_total")
    cached = after.total("llmproxy_cached_prompt_chars_total") - before.total("llmproxy_cached_prompt_chars_total")
    return cached / prompt


def test_prefix_affinity_and_spreading_single_worker(gateway1):
    runs = prefix_run(gateway1, 8, seed=1)
    assert len({w for w, _ in runs}) == 1
    assert len({s for _, s in runs}) == 1, "shared prefix spread over %s" % runs
    spread = set()
    for i in range(15):
        status, _, data = post(gateway1, chat("m-a", random_text(6000, seed=1000 + i)))
        assert status == 200
        spread.add(json.loads(data)["served_by"])
    assert len(spread) >= 2, "distinct prefixes all went to %s" % spread


def test_prefix_affinity_is_shared_by_the_workers(gateway, gateway1):
    """The workers route on one shared state (examples/nginx.conf: shared_state): a prefix
    learned by one worker is followed by the other, so every request sharing it goes to one
    endpoint whichever worker takes it, and 2 workers lose nothing to 1. Same load on a
    1-worker and a 2-worker nginx: 16 requests sharing a 6000-char prefix. (With per-worker
    state each worker paid its own cold request: 0.802 instead of 0.859.)"""
    ratios = {}
    for name, gw, seed in (("1 worker", gateway1, 3), ("2 workers", gateway, 4)):
        before = metrics(gw.port)
        runs = prefix_run(gw, 16, seed=seed)
        ratios[name] = cache_ratio(before, metrics(gw.port))
        workers = {w for w, _ in runs}
        homes = {s for _, s in runs}
        assert len(workers) == gw.workers, "reuseport should spread 16 connections over every worker: %s" % runs
        assert len(homes) == 1, "%s: the shared prefix went to %s" % (name, runs)
        print("\n%s: 16 requests sharing a prefix -> %s from %d worker(s), cache ratio %.3f"
              % (name, homes.pop(), len(workers), ratios[name]))
    # one cold request in all (15/16 of the cacheable chunks), however many workers
    assert ratios["2 workers"] == pytest.approx(ratios["1 worker"], abs=1e-9), ratios
    assert ratios["2 workers"] > 0.8, ratios


# ---------------------------------------------------------------------------------------------
# streaming


def test_sse_streams_incrementally_and_reports_first_token(gateway):
    wait_settled(gateway.port)
    before = metrics(gateway.port)
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
    try:
        body = json.dumps(chat("m-b", "stream please", stream=True)).encode()
        sock.sendall(("POST %s HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                      "x-test-chunks: 5\r\nx-test-chunk-delay-ms: 250\r\nconnection: close\r\n\r\n"
                      % (CHAT, len(body))).encode() + body)
        t0 = time.perf_counter()
        f = sock.makefile("rb")
        status_line = f.readline()
        assert b" 200 " in status_line
        hdrs = {}
        while True:
            line = f.readline().strip()
            if not line:
                break
            k, _, v = line.decode().partition(":")
            hdrs[k.strip().lower()] = v.strip()
        assert hdrs["content-type"] == "text/event-stream"
        assert hdrs["transfer-encoding"] == "chunked"
        worker = hdrs["x-llmproxy-worker"]

        def first_event(events):
            if len(events) == 1:
                served = gateway.servers.addr(json.loads(events[0])["served_by"])
                mid = metrics(gateway.port)
                assert mid.total("llmproxy_in_flight_requests") == 1
                assert mid.value("llmproxy_in_flight_requests", worker=worker) == 1
                # the first chunk released the prompt's prefill load on the chosen endpoint (the
                # endpoint series are the workers' shared state: once, without a worker label)
                assert mid.value("llmproxy_endpoint_prefill_chars", cluster="pool_b", endpoint=served) == 0
                assert mid.value("llmproxy_endpoint_in_flight_requests", cluster="pool_b", endpoint=served) == 1

        events, arrivals = read_sse(f.readline, t0, first_event)
    finally:
        sock.close()
    assert len(events) == 6 and events[-1] == b"[DONE]"
    assert json.loads(events[0])["served_by"] in POOLS["pool_b"]
    assert arrivals[-1] - arrivals[0] >= 0.8, arrivals  # not buffered: events came as written
    after = wait_settled(gateway.port)
    assert after.total("llmproxy_finished_requests_total", status="2xx") == \
        before.total("llmproxy_finished_requests_total", status="2xx") + 1
    assert after.total("llmproxy_time_to_first_token_seconds_count") > \
        before.total("llmproxy_time_to_first_token_seconds_count")


def test_target_model_rewrites_the_upstream_body(gateway):
    body = chat("m-r", "rewrite me " + "x" * 30_000)  # spooled, then replaced
    status, hdrs, data = post(gateway, body)
    assert status == 200, data
    echo = json.loads(data)
    assert echo["served_by"] in POOLS["pool_b"]
    assert echo["model"] == "m-r-upstream"
    sent = dict(body, model="m-r-upstream")
    assert echo["body_bytes"] == int(echo["received_headers"]["content-length"])
    assert abs(echo["body_bytes"] - len(json.dumps(sent, separators=(",", ":")))) < 64


def test_triton_backend_is_transcoded(gateway):
    status, hdrs, data = post(gateway, chat("m-t", "hello triton"), path=CHAT + "?x=1")
    assert status == 200, data
    assert hdrs["x-served-by"] in POOLS["pool_b"]
    out = json.loads(data)
    assert out["object"] == "chat.completion", out
    assert out["choices"][0]["message"]["content"].startswith("hi from " + hdrs["x-served-by"])
    # streamed: Triton SSE pieces become OpenAI chunks, ending with [DONE]
    status, hdrs, data = post(gateway, chat("m-t", "stream triton", stream=True), headers={"x-test-chunks": "4"})
    assert status == 200, data
    assert hdrs["content-type"].startswith("text/event-stream")
    events = [l[6:] for l in data.decode().splitlines() if l.startswith("data: ")]
    assert events[-1] == "[DONE]", events
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == "tok0 tok1 tok2 tok3 ", events
    wait_settled(gateway.port)


# ---------------------------------------------------------------------------------------------
# errors


def test_invalid_json_400(gateway):
    status, hdrs, data = post(gateway, b'{"model": "m-a", "messages": [')
    assert_our_error(status, hdrs, data, 400, "invalid_request")


def test_missing_body_400(gateway):
    status, hdrs, data = post(gateway, b"")
    assert_our_error(status, hdrs, data, 400, "invalid_request")


def test_unknown_model_404(gateway):
    status, hdrs, data = post(gateway, chat("no-such-model", "hi"))
    assert_our_error(status, hdrs, data, 404, "model_not_found")
    assert json.loads(data)["error"]["param"] == "model"


def test_no_endpoint_503(gateway):
    status, hdrs, data = post(gateway, chat("m-none", "hi"))
    assert_our_error(status, hdrs, data, 503, "no_endpoint")
    assert "pool_none" in json.loads(data)["error"]["message"]


def test_over_library_limit_413_before_reading(gateway):
    body = json.dumps(chat("m-a", "x" * (MAX_BODY + 1000))).encode()
    status, hdrs, data = post(gateway, body)
    assert_our_error(status, hdrs, data, 413, "request_too_large")
    assert str(MAX_BODY) in json.loads(data)["error"]["message"]


def test_chunked_over_library_limit_413_from_library(gateway):
    """No content-length: nginx reads (and spools) the body, the library refuses it."""
    before = metrics(gateway.port)
    payload = json.dumps(chat("m-a", "y" * (MAX_BODY + 1000))).encode()
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
    try:
        sock.sendall(("POST %s HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                      "transfer-encoding: chunked\r\nconnection: close\r\n\r\n" % CHAT).encode())
        for i in range(0, len(payload), 256 * 1024):
            part = payload[i:i + 256 * 1024]
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        sock.sendall(b"0\r\n\r\n")
        data = b""
        while True:
            got = sock.recv(65536)
            if not got:
                break
            data += got
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    assert_our_error(int(lines[0].split()[1]), hdrs, body, 413, "request_too_large")
    after = metrics(gateway.port)
    assert after.total("llmproxy_picks_total", outcome="payload_too_large") == \
        before.total("llmproxy_picks_total", outcome="payload_too_large") + 1


def test_over_nginx_limit_413_json(gateway):
    """Over client_max_body_size (2m here): nginx refuses before Lua runs; error_page makes
    it our JSON."""
    body = b"z" * (3 * 1024 * 1024)
    status, hdrs, data = post(gateway, body)
    assert_our_error(status, hdrs, data, 413, "request_too_large")


# ---------------------------------------------------------------------------------------------
# upstream failures


def test_dead_upstream_is_retried_elsewhere_then_ejected(gateway):
    before = metrics(gateway.port)
    served = []
    for i in range(60):  # the dead endpoint fails 3 times in a row (counted in the workers' shared state)
        status, hdrs, data = post(gateway, chat("m-d", random_text(300, seed=5000 + i)))
        assert status == 200, data  # never the dead endpoint's failure: retried on another one
        served.append(json.loads(data)["served_by"])
    assert set(served) <= set(POOLS["pool_d"])
    after = wait_settled(gateway.port)
    dead = gateway.servers.dead
    retries = after.total("llmproxy_retries_total") - before.total("llmproxy_retries_total")
    assert retries >= 1
    assert after.total("llmproxy_nginx_retries_total") - before.total("llmproxy_nginx_retries_total") == retries
    assert after.total("llmproxy_endpoint_failures_total", endpoint=dead) >= retries
    # three consecutive connect failures eject it (library default)
    assert after.total("llmproxy_endpoint_ejections_total", endpoint=dead) >= 1
    assert after.total("llmproxy_nginx_errors_total", reason="retry_exhausted") == \
        before.total("llmproxy_nginx_errors_total", reason="retry_exhausted")


@pytest.mark.parametrize("model", ["m-dead2", "m-dead1"])
def test_all_endpoints_dead_502_json_and_finished(gateway, model):
    """Both tries fail (m-dead2), or the retry finds no endpoint left (m-dead1): our 502 JSON
    through error_page, and the log phase still finishes the decision after the redirect."""
    before = wait_settled(gateway.port)
    for i in range(4):
        status, hdrs, data = post(gateway, chat(model, "anyone there %d" % i))
        assert_our_error(status, hdrs, data, 502, "upstream_unavailable")
    after = wait_settled(gateway.port)  # nothing pending, routed == finished
    assert after.total("llmproxy_nginx_picks_total", event="leaked") == 0
    routed = after.total("llmproxy_picks_total", outcome="routed") - before.total("llmproxy_picks_total", outcome="routed")
    assert routed == 4
    if model == "m-dead1":
        assert after.total("llmproxy_nginx_errors_total", reason="retry_exhausted") - \
            before.total("llmproxy_nginx_errors_total", reason="retry_exhausted") == 4
    else:
        # finished with the 502 nginx recorded for the last try: counted as an endpoint failure
        assert after.total("llmproxy_finished_requests_total", status="5xx") - \
            before.total("llmproxy_finished_requests_total", status="5xx") == 4


def test_upstream_503_counts_as_failure_and_passes_through(gateway):
    before = metrics(gateway.port)
    status, hdrs, data = post(gateway, chat("m-b", "fail please"), headers={"x-test-status": "503"})
    assert status == 503 and hdrs["x-served-by"] in POOLS["pool_b"]  # the upstream's own answer
    after = wait_settled(gateway.port)
    assert after.total("llmproxy_finished_requests_total", status="5xx") == \
        before.total("llmproxy_finished_requests_total", status="5xx") + 1
    assert after.total("llmproxy_endpoint_failures_total", cluster="pool_b") == \
        before.total("llmproxy_endpoint_failures_total", cluster="pool_b") + 1


# ---------------------------------------------------------------------------------------------
# bodies


@pytest.mark.parametrize("gw_name, source", [("gateway", "memory"), ("gateway1", "file")])
def test_200kb_prompt_is_routed(request, gw_name, source):
    """The example keeps bodies in memory (client_body_buffer_size = client_max_body_size);
    gateway1 spools them above 16 KiB to client_body_temp_path, and access() reads the file."""
    gw = request.getfixturevalue(gw_name)
    before = metrics(gw.port)
    body = json.dumps(chat("m-b", random_text(200 * 1000, seed=7))).encode()
    assert len(body) > 200_000
    status, _, data = post(gw, body)
    assert status == 200, data[:300]
    echo = json.loads(data)
    assert echo["served_by"] in POOLS["pool_b"]  # the model came from the body
    assert echo["body_bytes"] == len(body)
    after = metrics(gw.port)
    assert after.total("llmproxy_nginx_request_bodies_total", source=source) == \
        before.total("llmproxy_nginx_request_bodies_total", source=source) + 1
    assert after.total("llmproxy_prompt_chars_total") - before.total("llmproxy_prompt_chars_total") >= 200_000
    # the same 200 KB prompt again
    status, hdrs, data = post(gw, body)
    assert status == 200


# ---------------------------------------------------------------------------------------------
# client aborts


def raw_send(port, body, extra_headers):
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    body = json.dumps(body).encode()
    sock.sendall(("POST %s HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s"
                  "connection: close\r\n\r\n" % (CHAT, len(body), extra_headers)).encode() + body)
    return sock


def test_client_abort_mid_stream_finishes_with_the_received_status(gateway):
    before = wait_settled(gateway.port)
    sock = raw_send(gateway.port, chat("m-a", "long story", stream=True),
                    "x-test-chunks: 20\r\nx-test-chunk-delay-ms: 200\r\n")
    data = b""
    while b"data: " not in data:
        data += sock.recv(65536)
    assert b" 200 " in data.split(b"\r\n")[0]
    sock.close()  # abort after the first event
    after = wait_settled(gateway.port)
    assert after.total("llmproxy_nginx_client_aborts_total") == before.total("llmproxy_nginx_client_aborts_total") + 1
    assert after.total("llmproxy_finished_requests_total", status="2xx") == \
        before.total("llmproxy_finished_requests_total", status="2xx") + 1


def test_client_abort_before_the_response_finishes_with_499_neutral(gateway):
    """The client left before the endpoint answered: finished as 499, LOCAL (says nothing
    about the endpoint)."""
    before = wait_settled(gateway.port)
    sock = raw_send(gateway.port, chat("m-a", "slow"), "x-test-delay-ms: 1500\r\n")
    time.sleep(0.3)
    sock.close()  # before the upstream answered
    after = wait_settled(gateway.port, timeout=10)
    assert after.total("llmproxy_nginx_client_aborts_total") == before.total("llmproxy_nginx_client_aborts_total") + 1
    assert after.total("llmproxy_finished_requests_total", status="4xx") == \
        before.total("llmproxy_finished_requests_total", status="4xx") + 1
    assert after.total("llmproxy_nginx_finished_total", outcome="local") == \
        before.total("llmproxy_nginx_finished_total", outcome="local") + 1
    assert after.total("llmproxy_endpoint_failures_total") == before.total("llmproxy_endpoint_failures_total")


# ---------------------------------------------------------------------------------------------
# concurrency and reload


def mixed_requests(n, seed):
    """(method, path, body, headers, expected status, expected pool or None)"""
    rnd = random.Random(seed)
    shared = [random_text(3000, seed=seed * 100 + k) for k in range(8)]
    reqs = []
    for i in range(n):
        r = rnd.random()
        if r < 0.45:
            reqs.append(("POST", CHAT, chat("m-a", rnd.choice(shared) + " q%d" % i), {}, 200, "pool_a"))
        elif r < 0.60:
            reqs.append(("POST", CHAT, chat("m-b", "stream %d" % i, stream=True),
                         {"x-test-chunks": "3", "x-test-chunk-delay-ms": "20"}, 200, "pool_b"))
        elif r < 0.75:
            reqs.append(("POST", COMPLETIONS, {"model": "m-a", "prompt": "complete %d " % i + "w" * rnd.randint(10, 2000)},
                         {}, 200, "pool_a"))
        elif r < 0.80:
            reqs.append(("POST", CHAT, chat("m-b", random_text(30_000, seed=i)), {}, 200, "pool_b"))  # spooled
        elif r < 0.90:
            reqs.append(("GET", "/v1/models", b"", {}, 200, None))
        elif r < 0.95:
            reqs.append(("POST", CHAT, chat("m-d", "maybe dead %d" % i), {}, 200, "pool_d"))
        else:
            reqs.append(("POST", CHAT, chat("m-unknown", "x"), {}, 404, None))
    return reqs


async def run_all(port, reqs):
    async def one(spec):
        method, path, body, headers, _, _ = spec
        try:
            return await aclient.fetch(port, method, path, body, headers, timeout=90)
        except Exception as e:  # reported by the caller
            return e
    return await asyncio.gather(*(one(s) for s in reqs))


def check_responses(reqs, results):
    problems = []
    for spec, res in zip(reqs, results):
        method, path, body, _, status, pool = spec
        if isinstance(res, Exception):
            problems.append("%s %s: %r" % (method, path, res))
            continue
        if res.status != status:
            problems.append("%s %s: %d %r" % (method, path, res.status, res.body[:200]))
            continue
        if pool:
            text = res.body.decode()
            if body.get("stream"):
                first = json.loads(text.split("data: ", 2)[1].split("\n")[0])
                ok = first["served_by"] in POOLS[pool] and text.rstrip().endswith("data: [DONE]")
            else:
                ok = json.loads(text)["served_by"] in POOLS[pool]
            if not ok:
                problems.append("%s %s: wrong pool or truncated: %r" % (method, path, text[:200]))
    return problems


def test_1000_concurrent_mixed_requests(gateway):
    before = wait_settled(gateway.port)
    reqs = mixed_requests(1000, seed=11)
    t0 = time.perf_counter()
    results = asyncio.run(run_all(gateway.port, reqs))
    secs = time.perf_counter() - t0
    problems = check_responses(reqs, results)
    assert not problems, "%d problems, first: %s" % (len(problems), problems[:5])
    after = wait_settled(gateway.port, timeout=20)
    routed = after.total("llmproxy_picks_total", outcome="routed") - before.total("llmproxy_picks_total", outcome="routed")
    finished = after.total("llmproxy_finished_requests_total") - before.total("llmproxy_finished_requests_total")
    expected_routed = sum(1 for r in reqs if r[5])
    assert routed == expected_routed
    assert finished == routed  # every pick finished, by the library's own count
    assert after.total("llmproxy_in_flight_requests") == 0
    assert after.total("llmproxy_nginx_picks_total", event="leaked") == 0
    assert after.total("llmproxy_picks_total", outcome="model_not_found") - \
        before.total("llmproxy_picks_total", outcome="model_not_found") == sum(1 for r in reqs if r[4] == 404)
    served_workers = [w for w in after.workers()
                      if after.value("llmproxy_nginx_requests_total", worker=w, kind="intercepted")
                      > before.value("llmproxy_nginx_requests_total", worker=w, kind="intercepted")]
    assert len(served_workers) == 2
    print("\n1000 concurrent mixed requests in %.2fs, %d routed" % (secs, routed))


def test_reload_with_a_bad_config_keeps_the_old_workers(gateway):
    wait_settled(gateway.port)
    cfg = gateway.prefix / "llmproxy.json"
    good = cfg.read_text()
    old_pids = gateway.worker_pids()
    cfg.write_text('{"algorithm": "fastest"}')
    try:
        r = gateway.nginx_cmd("-s", "reload")
        assert r.returncode == 0, r.stderr  # the signal was sent; the master refuses the new config
        deadline = time.time() + 10
        while time.time() < deadline and "invalid configuration" not in gateway.log_text():
            time.sleep(0.05)
        assert "invalid configuration" in gateway.log_text()
        assert "algorithm" in gateway.log_text()
        time.sleep(0.3)
        assert gateway.worker_pids() == old_pids
        status, _, data = post(gateway, chat("m-a", "still served"))
        assert status == 200, data
    finally:
        cfg.write_text(good)


def test_reload_with_requests_in_flight(gateway):
    wait_settled(gateway.port)
    old_pids = gateway.worker_pids()
    streams = [("POST", CHAT, chat("m-b", "reload stream %d" % i, stream=True),
                {"x-test-chunks": "10", "x-test-chunk-delay-ms": "150"}, 200, "pool_b") for i in range(8)]
    slow = [("POST", CHAT, chat("m-a", "reload slow %d" % i), {"x-test-delay-ms": "800"}, 200, "pool_a")
            for i in range(8)]

    async def scenario():
        inflight = asyncio.ensure_future(run_all(gateway.port, streams + slow))
        await asyncio.sleep(0.4)  # requests are in flight in the old workers
        r = await asyncio.get_running_loop().run_in_executor(None, gateway.nginx_cmd, "-s", "reload")
        assert r.returncode == 0, r.stderr
        # new requests keep being served while the old workers drain
        during = mixed_requests(60, seed=12)
        late = await run_all(gateway.port, during)
        return await inflight, during, late

    results, during, late = asyncio.run(scenario())
    problems = check_responses(streams + slow, results) + check_responses(during, late)
    assert not problems, problems[:5]
    for res in results[:len(streams)]:
        assert res.body.count(b"data: ") == 11  # every event of every stream, none cut

    deadline = time.time() + 15
    while time.time() < deadline and any(os.path.exists("/proc/%d" % p) for p in old_pids):
        time.sleep(0.1)
    assert not any(os.path.exists("/proc/%d" % p) for p in old_pids), "old workers still running"
    m = wait_settled(gateway.port)
    new_pids = [int(p) for p in m.workers()]
    assert len(new_pids) == 2 and not set(new_pids) & set(old_pids)  # routers rebuilt in new workers
    assert sorted(new_pids) == gateway.worker_pids()
    # the old workers' routers had nothing left in flight when they exited
    for p in old_pids:
        rec = {l["field"]: v for l, v in m.select("llmproxy_nginx_exited_worker", worker=p)}
        assert rec, "no exit record for worker %d" % p
        assert rec["in_flight"] == 0 and rec["pending"] == 0 and rec["leaked"] == 0, rec
        assert rec["routed"] == rec["finished"], rec
    assert "exits with" not in gateway.log_text()
    status, _, data = post(gateway, chat("m-a", "after reload"))
    assert status == 200 and json.loads(data)["served_by"] in POOLS["pool_a"]


def test_no_lua_errors_and_no_crash_logged(gateway):
    log = gateway.log_text()
    assert "exited on signal" not in log
    bad = [l for l in log.splitlines() if "lua" in l.lower() and ("[error]" in l or "[alert]" in l or "[crit]" in l)
           and 'unknown algorithm "fastest"' not in l]  # the deliberate bad reload above
    assert not bad, bad[:5]
