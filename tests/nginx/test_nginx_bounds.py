"""Issue #13 on the nginx host (real nginx from examples/nginx.conf, test upstreams, all on
127.0.0.1): only the endpoint's own failures eject it (a proxy_read_timeout on a long
generation or a client leaving does not), client routing headers never reach any upstream,
subrequests cannot leak picks, and the example works from a directory the workers cannot
enter."""

import asyncio
import http.client
import json
import os
import subprocess
import time

import pytest

import aclient
import harness
from harness import CHAT, chat, metrics, request, wait_settled

NAMES = ["s1", "s2", "c1", "p1", "p2"]
CLUSTER_HEADER = "x-target-pool"  # a cluster header outside the x-llmproxy- prefix

# Test-only locations: a Lua handler calling an llmproxy location with ngx.location.capture,
# and a mirror of every request to one.
SUBREQUEST_LOCATIONS = """
        location = /test/capture {
            content_by_lua_block {
                ngx.req.read_body()
                local res = ngx.location.capture(ngx.var.arg_uri, {
                    method = ngx.var.arg_method == "GET" and ngx.HTTP_GET or ngx.HTTP_POST,
                    body = ngx.req.get_body_data() })
                ngx.status = res.status
                ngx.header["content-type"] = res.header["Content-Type"]
                ngx.print(res.body)
            }
        }

        location = /test/mirror {
            mirror /v1/chat/completions;
            content_by_lua_block {
                ngx.req.read_body()
                ngx.header["content-type"] = "application/json"
                ngx.print('{"main":"done"}')
            }
        }
"""


def library_config(up):
    return {
        "protocol": "openai",
        "algorithm": "round_robin",
        "cluster_header": CLUSTER_HEADER,
        "model_mapping_rule": {
            "m-slow": {"rules": [{"scene_name": "slow", "cluster": "pool_slow", "backend": "vllm"}]},
            "m-stall": {"rules": [{"scene_name": "stall", "cluster": "pool_stall", "backend": "vllm"}]},
            "m-close": {"rules": [{"scene_name": "close", "cluster": "pool_close", "backend": "vllm"}]},
            "m-ok": {"rules": [{"scene_name": "ok", "cluster": "pool_ok", "backend": "vllm"}]},
        },
        "clusters": {
            "pool_slow": {"endpoints": [up.addr("s1")]},
            "pool_stall": {"endpoints": [up.addr("s2")]},
            "pool_close": {"endpoints": [up.addr("c1")]},
            "pool_ok": {"endpoints": [up.addr("p1"), up.addr("p2")]},
        },
    }


@pytest.fixture(scope="module")
def up():
    with harness.FakeUpstreams(NAMES) as u:
        yield u


@pytest.fixture(scope="module")
def gw(up):
    """One worker (one router sees every request), proxy_read_timeout 1s."""
    g = harness.Nginx(library_config(up), [up.addr("p1"), up.addr("p2")], workers=1, read_timeout="1s",
                      extra_locations=SUBREQUEST_LOCATIONS)
    yield g
    g.close()


def ep(up, name):
    return {"endpoint": up.addr(name)}


def concurrently(port, reqs, timeout=20):
    async def run():
        return await asyncio.gather(*(aclient.fetch(port, "POST", CHAT, body, headers, timeout=timeout)
                                      for body, headers in reqs))
    return asyncio.run(run())


def assert_gateway_error(res, status, code):
    assert res.status == status, (res.status, res.body[:300])
    assert json.loads(res.body)["error"]["code"] == code, res.body
    assert "x-served-by" not in res.headers


# ---------------------------------------------------------------------------------------------
# 1. only the endpoint's own failures eject it


def test_proxy_read_timeouts_on_long_generations_do_not_eject(gw, up):
    """Four non-streaming requests outlast proxy_read_timeout (1 s here): nginx answers its own
    504 each time, and the endpoint — one slow generation, not a dead server — stays in: no
    failure, no ejection (before: 504 counted as an endpoint failure, ejected after 3)."""
    before = wait_settled(gw.port)
    results = concurrently(gw.port, [(chat("m-slow", "long generation %d" % i), {"x-test-delay-ms": "2500"})
                                     for i in range(4)])
    for res in results:
        assert_gateway_error(res, 504, "upstream_timeout")
    after = wait_settled(gw.port)
    assert after.total("llmproxy_endpoint_failures_total", **ep(up, "s1")) == \
        before.total("llmproxy_endpoint_failures_total", **ep(up, "s1"))
    assert after.total("llmproxy_endpoint_ejections_total", **ep(up, "s1")) == 0
    assert after.total("llmproxy_endpoint_ejected", **ep(up, "s1")) == 0
    assert after.total("llmproxy_nginx_finished_total", outcome="local") - \
        before.total("llmproxy_nginx_finished_total", outcome="local") == 4
    # counted as what the client got
    assert after.total("llmproxy_finished_requests_total", status="5xx") - \
        before.total("llmproxy_finished_requests_total", status="5xx") == 4
    status, hdrs, data = request(gw.port, "POST", CHAT, chat("m-slow", "quick one"))
    assert status == 200 and hdrs["x-served-by"] == "s1", data


def test_stream_without_response_headers_is_an_endpoint_failure(gw, up):
    """A stream's response headers come before its first token: none within
    proxy_read_timeout is the endpoint's failure (3 in a row eject it)."""
    before = wait_settled(gw.port)
    for i in range(3):
        status, hdrs, data = request(gw.port, "POST", CHAT, chat("m-stall", "stream %d" % i, stream=True),
                                     headers={"x-test-delay-ms": "1600"})
        assert status == 504, data
    after = wait_settled(gw.port)
    assert after.total("llmproxy_endpoint_failures_total", **ep(up, "s2")) - \
        before.total("llmproxy_endpoint_failures_total", **ep(up, "s2")) == 3
    assert after.total("llmproxy_endpoint_ejected", **ep(up, "s2")) == 1


def test_endpoint_closing_before_any_byte_is_still_ejected(gw, up):
    """Connection closed (FIN) or reset (RST) before a response byte: nginx's 502, the
    endpoint's failure; three in a row eject it."""
    before = wait_settled(gw.port)
    for how in ("fin", "reset", "fin"):
        status, hdrs, data = request(gw.port, "POST", CHAT, chat("m-close", "bye " + how),
                                     headers={"x-test-close": how})
        assert status == 502 and json.loads(data)["error"]["code"] == "upstream_unavailable", data
    after = wait_settled(gw.port)
    assert after.total("llmproxy_nginx_finished_total", outcome="endpoint_failed") - \
        before.total("llmproxy_nginx_finished_total", outcome="endpoint_failed") == 3
    assert after.total("llmproxy_endpoint_ejections_total", **ep(up, "c1")) == 1
    assert after.total("llmproxy_endpoint_ejected", **ep(up, "c1")) == 1


# ---------------------------------------------------------------------------------------------
# 2. client routing headers never reach an upstream


ROUTING = ["X-LLMProxy-Endpoint", "x-llmproxy-cluster", "x-llmproxy-scene", "X-Llmproxy-Anything",
           "x-gateway-destination-endpoint", "X-Target-Pool"]


def send_with_routing_headers(port, method, path, body=b""):
    """Every routing header twice (two cases), behind 120 others (more than
    ngx.req.get_headers' default limit of 100)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.putrequest(method, path)
        for i in range(120):
            c.putheader("x-padding-%d" % i, "p")
        for h in ROUTING:
            c.putheader(h, "127.0.0.1:1")
            c.putheader(h.lower(), "pool_evil")
        c.putheader("content-type", "application/json")
        c.putheader("content-length", str(len(body)))
        c.putheader("connection", "close")
        c.endheaders(body)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/v1/models", b""),
    ("GET", "/health", b""),
    ("POST", "/v1/embeddings", json.dumps({"model": "m-ok", "input": "x"}).encode()),
    # a Lua location passing the client's headers on to a subrequest (access() never runs there)
    ("GET", "/test/capture?uri=/v1/models&method=GET", b""),
])
def test_routing_headers_are_stripped_from_requests_not_intercepted(gw, method, path, body):
    before = metrics(gw.port)
    status, hdrs, data = send_with_routing_headers(gw.port, method, path, body)
    assert status == 200, data
    echo = json.loads(data)
    assert echo["served_by"] in ("p1", "p2")
    seen = echo["received_headers"]
    assert "x-padding-119" in seen
    leaked = [h for h in seen if h.startswith("x-llmproxy-") or h in ("x-gateway-destination-endpoint", CLUSTER_HEADER)]
    assert not leaked, leaked
    after = metrics(gw.port)
    assert after.total("llmproxy_nginx_stripped_headers_total") - \
        before.total("llmproxy_nginx_stripped_headers_total") == 2 * len(ROUTING)
    assert after.total("llmproxy_picks_total") == before.total("llmproxy_picks_total")


def test_routing_headers_are_replaced_on_intercepted_requests(gw, up):
    status, hdrs, data = send_with_routing_headers(gw.port, "POST", CHAT, json.dumps(chat("m-ok", "hi")).encode())
    assert status == 200, data
    echo = json.loads(data)
    seen = echo["received_headers"]
    assert seen["x-llmproxy-endpoint"] == up.addr(echo["served_by"])
    assert seen[CLUSTER_HEADER] == "pool_ok" and seen["x-llmproxy-scene"] == "ok"
    assert "x-llmproxy-cluster" not in seen and "x-llmproxy-anything" not in seen
    assert "x-gateway-destination-endpoint" not in seen
    wait_settled(gw.port)


# ---------------------------------------------------------------------------------------------
# 3. subrequests: refused, nothing in flight afterwards


def test_subrequests_are_refused_and_leave_nothing_in_flight(gw):
    """nginx skips a subrequest's access phase and never runs its log phase: a pick there
    could never be finished. ngx.location.capture and mirror of an inference request into an
    llmproxy location are refused with our JSON 501 by rewrite(); a passthrough subrequest
    still works; nothing is in flight afterwards (before: both were proxied unrouted to the
    passthrough upstream, the capture answered 200 by whichever server round robin chose)."""
    before = wait_settled(gw.port)
    body = chat("m-ok", "from a subrequest")
    status, hdrs, data = request(gw.port, "POST", "/test/capture?uri=/v1/chat/completions", body)
    assert status == 501, data
    err = json.loads(data)["error"]
    assert err["code"] == "not_implemented" and "subrequest" in err["message"], err
    status, hdrs, data = request(gw.port, "GET", "/test/capture?uri=/v1/models&method=GET")
    assert status == 200 and json.loads(data)["served_by"] in ("p1", "p2"), data
    status, hdrs, data = request(gw.port, "POST", "/test/mirror", body)
    assert status == 200 and json.loads(data) == {"main": "done"}, data
    deadline = time.time() + 10
    while True:  # the mirror subrequest runs in the background
        m = metrics(gw.port)
        done = m.total("llmproxy_nginx_errors_total", reason="subrequest") - \
            before.total("llmproxy_nginx_errors_total", reason="subrequest")
        if done >= 2 or time.time() > deadline:
            break
        time.sleep(0.05)
    after = wait_settled(gw.port)  # in flight 0, routed == finished, nothing pending
    assert after.total("llmproxy_in_flight_requests") == 0
    assert after.total("llmproxy_nginx_errors_total", reason="subrequest") - \
        before.total("llmproxy_nginx_errors_total", reason="subrequest") == 2
    assert after.total("llmproxy_picks_total") == before.total("llmproxy_picks_total")


# ---------------------------------------------------------------------------------------------
# 4. the example from a directory the workers cannot enter


@pytest.mark.skipif(os.geteuid() != 0, reason="workers run as `nobody` only when nginx starts as root")
def test_example_in_a_private_directory_takes_100k_bodies(up):
    """As the docs say (root, `-p` prefix = the checkout), from a 0700 directory such as a
    home: the workers run as `nobody` and cannot enter it. A 100 KiB prompt, and a 100 KiB
    body not intercepted, are answered by the upstream (before: 500, the body could not be
    spooled to client_body_temp_path under the prefix)."""
    g = harness.Nginx(library_config(up), [up.addr("p1"), up.addr("p2")], workers=2, private=True)
    try:
        assert os.stat(g.prefix).st_mode & 0o777 == 0o700
        users = subprocess.run(["ps", "-o", "user=", "-p", ",".join(map(str, g.worker_pids()))],
                               capture_output=True, text=True).stdout.split()
        assert users and "root" not in users, users
        prompt = json.dumps(chat("m-ok", harness.random_text(100 * 1024, seed=13))).encode()
        assert len(prompt) > 100 * 1024
        status, _, data = request(g.port, "POST", CHAT, prompt)
        assert status == 200, data[:300]
        assert json.loads(data)["body_bytes"] == len(prompt)
        status, _, data = request(g.port, "POST", "/v1/embeddings", prompt)
        assert status == 200 and json.loads(data)["body_bytes"] == len(prompt), data[:300]
        wait_settled(g.port)
        assert "Permission denied" not in g.log_text()
    finally:
        g.close()
