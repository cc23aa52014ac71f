"""nginx gateways sharing load through the Metadata-Center server (started here).

Each worker's router starts its own sync thread (in init_worker, after fork): it reports its
picks/first tokens/finishes to the server and polls the cluster's total load, keeping what the
others put on each endpoint as remote load (the total minus what its own counters hold). Who
"the others" are depends on where the workers keep their counters:
- per-worker state (shared_state = false): every other worker of the same nginx, and every
  other gateway;
- shared state (examples/nginx.conf): the workers of one nginx count on the same endpoint
  counters, so remote load is the other gateways' only — never a sibling worker's, which would
  be counted twice.
Without the server, nothing is remote (llmproxy_endpoint_remote_in_flight_requests stays 0).
"""

import json
import re
import socket
import time
import urllib.request

import pytest

import harness
from conftest import POOLS, library_config
from harness import CHAT, chat, metrics, wait_settled

@pytest.fixture(scope="module")
def metadata_center():
    with harness.MetadataCenter() as mc:
        yield mc


def _gateway_mc(servers, metadata_center, **render):
    cfg = library_config(servers, servers.dead)
    cfg["metadata_center"] = {"enabled": True, "host": "127.0.0.1", "port": metadata_center.port,
                              "load_poll_ms": 50}
    gw = harness.Nginx(cfg, [servers.addr(n) for n in POOLS["pool_a"]], workers=2, **render)
    gw.servers = servers
    return gw


@pytest.fixture(scope="module")
def gateway_mc(servers, metadata_center):
    """2 workers with per-worker state (shared_state = false): they share load only through
    the Metadata-Center."""
    gw = _gateway_mc(servers, metadata_center, shared_state=False)
    yield gw
    gw.close()


@pytest.fixture(scope="module")
def gateway_mc_shared(servers, metadata_center):
    """2 workers on one shared state (the example as shipped), and the Metadata-Center."""
    gw = _gateway_mc(servers, metadata_center)
    yield gw
    gw.close()


@pytest.fixture(scope="module")
def gateway_lookups(servers, metadata_center):
    """A second nginx whose routers also ask the Metadata-Center where a prompt's prefix is
    cached (remote cache lookups: pick_start + polling, yielding with ngx.sleep)."""
    cfg = library_config(servers, servers.dead)
    cfg["metadata_center"] = {"enabled": True, "host": "127.0.0.1", "port": metadata_center.port,
                              "load_poll_ms": 50, "cache_enabled": True, "timeout_ms": 200}
    gw = harness.Nginx(cfg, [servers.addr(n) for n in POOLS["pool_a"]], workers=2)
    gw.servers = servers
    yield gw
    gw.close()


def mc_metric(port, name):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
        m = re.search(r"^%s (\d+)" % re.escape(name), r.read().decode(), re.M)
    return int(m.group(1)) if m else 0


def test_remote_cache_lookups_send_a_prompt_where_another_gateway_cached_it(gateway_mc, gateway_lookups,
                                                                           metadata_center):
    """Gateway A serves long prompts and saves where their prefixes went; gateway B, whose
    routers never saw them, sends the same prompts to the same servers, by asking."""
    wait_settled(gateway_mc.port)
    saves_before = mc_metric(metadata_center.port, 'metadata_center_cache_ops_total{op="save"}')
    prompts = [harness.random_text(3000, seed=900 + i) for i in range(6)]
    warmed = []
    for p in prompts:
        status, _, data = harness.request(gateway_mc.port, "POST", CHAT, chat("m-a", p))
        assert status == 200, data
        warmed.append(json.loads(data)["served_by"])
    deadline = time.time() + 5
    while mc_metric(metadata_center.port, 'metadata_center_cache_ops_total{op="save"}') < saves_before + 6:
        assert time.time() < deadline, "gateway A's cache saves did not reach the metadata-center"
        time.sleep(0.05)

    before = metrics(gateway_lookups.port)
    served = []
    for p in prompts:
        status, _, data = harness.request(gateway_lookups.port, "POST", CHAT, chat("m-a", p))
        assert status == 200, data
        served.append(json.loads(data)["served_by"])
    after = wait_settled(gateway_lookups.port)
    # Without the lookup each pick would be a load-based draw among three idle servers.
    assert served == warmed, (served, warmed)
    delta = lambda name, **l: after.total(name, **l) - before.total(name, **l)
    assert delta("llmproxy_remote_cache_lookups_total", result="remote") == 6
    assert delta("llmproxy_nginx_picks_total", event="waited_for_lookup") == 6
    assert delta("llmproxy_nginx_picks_total", event="lookup_abandoned") == 0
    print("\nremote cache lookups: %d of %d prompts went where the other gateway cached them"
          % (sum(a == b for a, b in zip(served, warmed)), len(prompts)))


def test_a_dead_metadata_center_costs_lookups_nothing_but_their_timeout(servers):
    """Remote cache lookups against a port where nothing listens: every pick still answers
    (decided from local data), none waits longer than the lookup timeout."""
    cfg = library_config(servers, servers.dead)
    cfg["metadata_center"] = {"enabled": True, "host": "127.0.0.1", "port": harness.refused_port(),
                              "cache_enabled": True, "timeout_ms": 100}
    gw = harness.Nginx(cfg, [servers.addr(n) for n in POOLS["pool_a"]], workers=1)
    try:
        for i in range(5):
            started = time.time()
            status, _, data = harness.request(gw.port, "POST", CHAT, chat("m-a", harness.random_text(2000, seed=i)))
            assert status == 200, data
            assert time.time() - started < 1.0
        m = wait_settled(gw.port)
        assert m.total("llmproxy_nginx_picks_total", event="waited_for_lookup") == 5
        assert m.total("llmproxy_remote_cache_lookups_total", result="local_fallback") == 5
        assert m.total("llmproxy_nginx_picks_total", event="lookup_abandoned") == 0
    finally:
        gw.close()


def open_stream(port, i, chunks=20):
    """An SSE request that stays open chunks × 200 ms (~4 s); returns (socket, worker pid,
    serving server) once its first event arrived."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    body = json.dumps(chat("m-b", "long stream %d" % i, stream=True)).encode()
    sock.sendall(("POST %s HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                  "x-test-chunks: %d\r\nx-test-chunk-delay-ms: 200\r\nconnection: close\r\n\r\n"
                  % (CHAT, len(body), chunks)).encode() + body)
    data = b""
    while b"data: " not in data or b"\n\n" not in data.split(b"data: ", 1)[1]:
        got = sock.recv(65536)
        assert got, data
        data += got
    head, _, rest = data.partition(b"\r\n\r\n")
    worker = re.search(rb"x-llmproxy-worker: (\d+)", head, re.I).group(1).decode()
    first = json.loads(rest.split(b"data: ", 1)[1].split(b"\n", 1)[0])
    return sock, worker, first["served_by"]


def open_streams_on_every_worker(gw, first, per_worker=2, chunks=20, limit=30):
    """Opens streams (new connections: reuseport spreads them) until every worker of `gw` holds
    at least `per_worker`; returns [(socket, worker, server)]."""
    streams = []
    try:
        while len(streams) < limit:
            streams.append(open_stream(gw.port, first + len(streams), chunks))
            held = per_worker_count(streams)
            if len(held) == gw.workers and min(held.values()) >= per_worker:
                return streams
    except BaseException:
        close_streams(streams)
        raise
    close_streams(streams)
    raise AssertionError("%d streams did not reach every worker: %s" % (limit, per_worker_count(streams)))


def per_worker_count(streams):
    held = {}
    for _, w, _ in streams:
        held[w] = held.get(w, 0) + 1
    return held


def close_streams(streams):
    for s, _, _ in streams:
        s.close()


def on_servers(streams, keep=lambda w: True):
    """{server: streams of `streams` it serves} over pool_b, counting only workers `keep` accepts."""
    return {n: sum(1 for _, w, s in streams if s == n and keep(w)) for n in POOLS["pool_b"]}


def remote_view(m, workers, servers):
    """{worker: {server: remote in-flight as that worker sees it}} for pool_b (per-worker state)."""
    return {w: {n: m.value("llmproxy_endpoint_remote_in_flight_requests", worker=w, cluster="pool_b",
                           endpoint=servers.addr(n)) for n in POOLS["pool_b"]} for w in workers}


def shared_view(m, name, servers):
    """{server: value} of an endpoint family of a shared state (one series, no worker label)."""
    return {n: m.value(name, cluster="pool_b", endpoint=servers.addr(n)) for n in POOLS["pool_b"]}


def poll(read, expected, timeout=3.0):
    """read() until it returns `expected` or `timeout` seconds passed; returns the last value."""
    deadline = time.time() + timeout
    while True:
        seen = read()
        if seen == expected or time.time() > deadline:
            return seen
        time.sleep(0.05)


def wait_drained(*gws):
    """Until nothing is in flight or remote on any of `gws` (the streams were closed: client
    aborts), then settled."""
    for gw in gws:
        deadline = time.time() + 5
        while True:
            m = metrics(gw.port)
            if (m.total("llmproxy_endpoint_remote_in_flight_requests") == 0
                    and m.total("llmproxy_in_flight_requests") == 0) or time.time() > deadline:
                break
            time.sleep(0.05)
        assert m.total("llmproxy_endpoint_remote_in_flight_requests") == 0, gw.port
        wait_settled(gw.port)


def test_workers_share_load_through_the_metadata_center(gateway_mc, gateway):
    """Per-worker state: every worker sees the streams the *other* worker holds as remote load,
    its own as local. With shared state and no Metadata-Center (`gateway`), the load of every
    worker is in the one shared endpoint series instead, and nothing is remote."""
    gw = gateway_mc
    wait_settled(gw.port)
    wait_settled(gateway.port)
    streams = open_streams_on_every_worker(gw, 0)
    try:
        workers = sorted(per_worker_count(streams))
        expected = {w: on_servers(streams, lambda w2: w2 != w) for w in workers}
        own = {w: on_servers(streams, lambda w2: w2 == w) for w in workers}
        seen = poll(lambda: remote_view(metrics(gw.port), workers, gw.servers), expected)
        # every worker sees exactly the streams the *other* worker holds on each endpoint...
        assert seen == expected, (seen, expected)
        # ...besides its own, which it counts locally
        m = metrics(gw.port)
        for w in workers:
            for n in POOLS["pool_b"]:
                assert m.value("llmproxy_endpoint_in_flight_requests", worker=w, cluster="pool_b",
                               endpoint=gw.servers.addr(n)) == own[w][n]
        assert m.total("llmproxy_metadata_center_calls_total") > 0
        assert not m.select("llmproxy_shared_state_bytes")
        print("\nMetadata-Center, per-worker state: %d streams, own %s, remote as seen %s" % (len(streams), own, seen))

        # shared state without the Metadata-Center: the shared series count every worker's
        # streams, endpoint by endpoint; nothing is remote
        plain = open_streams_on_every_worker(gateway, 100, per_worker=1)
        try:
            pm = metrics(gateway.port)
            assert pm.total("llmproxy_endpoint_remote_in_flight_requests") == 0
            assert pm.total("llmproxy_in_flight_requests") == len(plain)
            assert shared_view(pm, "llmproxy_endpoint_in_flight_requests", gateway.servers) == on_servers(plain)
        finally:
            close_streams(plain)
    finally:
        close_streams(streams)
    # once the streams are gone (client aborts), the shared load drains too
    wait_drained(gw, gateway)


def test_gateways_with_shared_state_see_only_other_gateways_as_remote(gateway_mc_shared, gateway_mc):
    """Two gateways on one Metadata-Center: `shared` (2 workers, one shared state) and `plain`
    (2 workers, per-worker state). The shared gateway's remote load is exactly the plain
    gateway's streams — its own workers' streams are in its local shared counters and
    subtracted from the server's total, whichever worker reported them; each plain worker's
    remote load is every stream but its own."""
    shared, plain = gateway_mc_shared, gateway_mc
    wait_settled(shared.port)
    wait_settled(plain.port)
    s_streams = open_streams_on_every_worker(shared, 200, per_worker=1, chunks=40)
    try:
        p_streams = open_streams_on_every_worker(plain, 300, per_worker=1, chunks=40)
        try:
            expected_local = on_servers(s_streams)
            expected_remote = on_servers(p_streams)
            seen = poll(lambda: shared_view(metrics(shared.port), "llmproxy_endpoint_remote_in_flight_requests",
                                            shared.servers), expected_remote)
            assert seen == expected_remote, ("remote as the shared gateway sees it", seen, expected_remote,
                                             "its own streams", expected_local)
            m = metrics(shared.port)
            assert shared_view(m, "llmproxy_endpoint_in_flight_requests", shared.servers) == expected_local
            assert len(per_worker_count(s_streams)) == 2 and m.value("llmproxy_shared_state_workers") == 2

            workers = sorted(per_worker_count(p_streams))
            expected = {w: {n: expected_local[n] + on_servers(p_streams, lambda w2: w2 != w)[n]
                            for n in POOLS["pool_b"]} for w in workers}
            seen_plain = poll(lambda: remote_view(metrics(plain.port), workers, plain.servers), expected)
            assert seen_plain == expected, (seen_plain, expected)
            print("\nMetadata-Center, two gateways: shared %s (local) sees %s as remote; plain workers see %s"
                  % (expected_local, seen, seen_plain))
        finally:
            close_streams(p_streams)
    finally:
        close_streams(s_streams)
    wait_drained(shared, plain)


def test_a_responses_chain_started_on_one_gateway_continues_on_another(gateway_mc, gateway_lookups,
                                                                    metadata_center):
    """A Responses API conversation answered by gateway A, continued through gateway B by
    naming A's answer (`previous_response_id`): the fake engines keep their answers per server
    (404 elsewhere, as vLLM and SGLang), and B, which never saw the answer, finds its server
    through the Metadata-Center where A saved it; then B's own answers keep the chain there."""
    status, _, data = harness.request(gateway_mc.port, "POST", harness.RESPONSES,
                                      {"model": "m-a", "input": harness.random_text(300)})
    assert status == 200, data
    previous, home = harness.responses_answer(data)
    # A's sync thread saves the answer's id when its first bytes pass: let it land (these fake
    # engines answer at once; a real one's generation gives it its whole duration)
    harness.settled_saves(metadata_center.port)
    before = metrics(gateway_lookups.port)
    for turn in range(4):
        body = {"model": "m-a", "input": harness.random_text(300), "previous_response_id": previous,
                "stream": turn % 2 == 0}
        status, _, data = harness.request(gateway_lookups.port, "POST", harness.RESPONSES, body)
        assert status == 200, "turn %d: %s" % (turn, data[:300])
        previous, served = harness.responses_answer(data)
        assert served == home, "turn %d went to %s, the chain is on %s" % (turn, served, home)
    after = wait_settled(gateway_lookups.port)
    assert after.total("llmproxy_response_chains_total", result="pinned") \
        - before.total("llmproxy_response_chains_total", result="pinned") == 4


def test_a_stored_answer_made_on_one_gateway_is_polled_through_another(gateway_mc, gateway_lookups,
                                                                      metadata_center):
    """GET /v1/responses/{id} through gateway B (Lua, pick with lookups, yielding) for an answer
    gateway A made: sent to the server that stored it; an unknown id passes through."""
    harness.check_stored_answer_found_elsewhere(gateway_mc.port, gateway_lookups.port,
                                                lambda: metrics(gateway_lookups.port), "m-a",
                                                metadata_center.port)
    wait_settled(gateway_lookups.port)

