"""Several nginx workers sharing load through the Metadata-Center server (started here).

Each worker's router starts its own sync thread (in init_worker, after fork): it reports its
picks/first tokens/finishes to the server and polls the cluster's total load, keeping what the
*other* workers (and gateways) put on each endpoint as remote load. Without the server, each
worker sees only its own requests (llmproxy_endpoint_remote_in_flight_requests stays 0).
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


@pytest.fixture(scope="module")
def gateway_mc(servers, metadata_center):
    cfg = library_config(servers, servers.dead)
    cfg["metadata_center"] = {"enabled": True, "host": "127.0.0.1", "port": metadata_center.port,
                              "load_poll_ms": 50}
    gw = harness.Nginx(cfg, [servers.addr(n) for n in POOLS["pool_a"]], workers=2)
    gw.servers = servers
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
    cfg["metadata_center"] = {"enabled": True, "host": "127.0.0.1", "port": harness.free_port(),
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


def open_stream(port, i):
    """An SSE request that stays open ~4 s; returns (socket, worker pid, serving server)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    body = json.dumps(chat("m-b", "long stream %d" % i, stream=True)).encode()
    sock.sendall(("POST %s HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                  "x-test-chunks: 20\r\nx-test-chunk-delay-ms: 200\r\nconnection: close\r\n\r\n"
                  % (CHAT, len(body))).encode() + body)
    data = b""
    while b"data: " not in data or b"\n\n" not in data.split(b"data: ", 1)[1]:
        got = sock.recv(65536)
        assert got, data
        data += got
    head, _, rest = data.partition(b"\r\n\r\n")
    worker = re.search(rb"x-llmproxy-worker: (\d+)", head, re.I).group(1).decode()
    first = json.loads(rest.split(b"data: ", 1)[1].split(b"\n", 1)[0])
    return sock, worker, first["served_by"]


def remote_view(m, workers, servers):
    """{worker: {server: remote in-flight as that worker sees it}} for pool_b."""
    return {w: {n: m.value("llmproxy_endpoint_remote_in_flight_requests", worker=w, cluster="pool_b",
                           endpoint=servers.addr(n)) for n in POOLS["pool_b"]} for w in workers}


def test_workers_share_load_through_the_metadata_center(gateway_mc, gateway):
    gw = gateway_mc
    wait_settled(gw.port)
    streams = []
    try:
        # open streams until both workers hold at least two (reuseport spreads connections)
        while len(streams) < 30:
            streams.append(open_stream(gw.port, len(streams)))
            per_worker = {}
            for _, w, _ in streams:
                per_worker[w] = per_worker.get(w, 0) + 1
            if len(per_worker) == 2 and min(per_worker.values()) >= 2:
                break
        workers = sorted(per_worker)
        assert len(workers) == 2, per_worker
        expected = {w: {n: sum(1 for _, w2, s in streams if w2 != w and s == n) for n in POOLS["pool_b"]}
                    for w in workers}
        own = {w: {n: sum(1 for _, w2, s in streams if w2 == w and s == n) for n in POOLS["pool_b"]}
               for w in workers}
        deadline = time.time() + 3
        while True:
            m = metrics(gw.port)
            seen = remote_view(m, workers, gw.servers)
            if seen == expected or time.time() > deadline:
                break
            time.sleep(0.05)
        # every worker sees exactly the streams the *other* worker holds on each endpoint...
        assert seen == expected, (seen, expected)
        # ...besides its own, which it counts locally
        for w in workers:
            for n in POOLS["pool_b"]:
                assert m.value("llmproxy_endpoint_in_flight_requests", worker=w, cluster="pool_b",
                               endpoint=gw.servers.addr(n)) == own[w][n]
        assert m.total("llmproxy_metadata_center_calls_total") > 0
        print("\nMetadata-Center: %d streams, own %s, remote as seen %s" % (len(streams), own, seen))

        # without the Metadata-Center, a worker never sees the other's requests
        plain = [open_stream(gateway.port, 100 + i) for i in range(6)]
        try:
            pm = metrics(gateway.port)
            assert pm.total("llmproxy_endpoint_remote_in_flight_requests") == 0
            assert pm.total("llmproxy_in_flight_requests") == 6
        finally:
            for s, _, _ in plain:
                s.close()
    finally:
        for s, _, _ in streams:
            s.close()
    # once the streams are gone (client aborts), the shared load drains too
    deadline = time.time() + 5
    while time.time() < deadline:
        m = metrics(gw.port)
        if m.total("llmproxy_endpoint_remote_in_flight_requests") == 0 and m.total("llmproxy_in_flight_requests") == 0:
            break
        time.sleep(0.05)
    assert m.total("llmproxy_endpoint_remote_in_flight_requests") == 0
    wait_settled(gw.port)
    wait_settled(gateway.port)
