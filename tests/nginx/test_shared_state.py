"""One routing state for every nginx worker (examples/nginx.conf: shared_state), with 4 workers
in front of the fake upstreams, all on 127.0.0.1.

Every request goes on a new connection, so `listen ... reuseport` spreads them over the
workers; the x-llmproxy-worker debug header says which worker took each one. The endpoint
series of the metrics (llmproxy_endpoint_*, no worker label) are the shared counters.
"""

import json
import re
import socket
import threading
import time

import pytest

import harness
from conftest import POOLS, library_config
from harness import CHAT, chat, metrics, random_text, request, wait_settled, wait_until

WORKERS = 4
# The library's reaper runs every 500 ms (REAP_INTERVAL) in every attached router; the metrics
# location itself waits up to 1 s for the killed worker's snapshot until its liveness key
# expires, so the reaped state is seen ~1 s after the kill.
REAP_WITHIN = 2.5


@pytest.fixture(scope="module")
def gw(servers):
    """nginx with 4 workers on one shared state (the example as shipped)."""
    g = harness.Nginx(library_config(servers, servers.dead), [servers.addr(n) for n in POOLS["pool_a"]],
                      workers=WORKERS)
    g.servers = servers
    yield g
    g.close()


def post(g, body, headers=None):
    """(status, worker pid, server name) of one request on a new connection."""
    status, hdrs, data = request(g.port, "POST", CHAT, body, headers)
    assert status == 200, data
    return status, int(hdrs["x-llmproxy-worker"]), json.loads(data)["served_by"]


def endpoint_view(g, m, family, pool):
    """{server: value} of a shared endpoint family (exactly one series per endpoint)."""
    return {n: m.value(family, cluster=pool, endpoint=g.servers.addr(n)) for n in POOLS[pool]}


class Stream:
    """An SSE request held open (`chunks` events 200 ms apart), known by the worker that took it
    and the server that streams it once its first event arrived."""

    def __init__(self, g, model, text, chunks=40):
        self.sock = socket.create_connection(("127.0.0.1", g.port), timeout=10)
        body = json.dumps(chat(model, text, stream=True)).encode()
        self.sock.sendall(("POST %s HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                           "content-length: %d\r\nx-test-chunks: %d\r\nx-test-chunk-delay-ms: 200\r\n"
                           "connection: close\r\n\r\n" % (CHAT, len(body), chunks)).encode() + body)
        data = b""
        while b"data: " not in data or b"\n\n" not in data.split(b"data: ", 1)[1]:
            got = self.sock.recv(65536)
            assert got, data
            data += got
        head, _, rest = data.partition(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n", 1)[0], head
        self.worker = int(re.search(rb"x-llmproxy-worker: (\d+)", head, re.I).group(1))
        self.served = json.loads(rest.split(b"data: ", 1)[1].split(b"\n", 1)[0])["served_by"]
        self.events = rest.count(b"data: ")

    def more_events(self, timeout=5):
        """Reads until at least one more event arrived; False when the connection ended first."""
        want = self.events + 1
        deadline = time.time() + timeout
        while self.events < want and time.time() < deadline:
            try:
                got = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not got:
                return False
            self.events += got.count(b"data: ")
        return self.events >= want

    def ended_early(self, timeout=5):
        """True when the connection ends (FIN or reset) without `data: [DONE]`."""
        self.sock.settimeout(timeout)
        try:
            while True:
                got = self.sock.recv(65536)
                if not got:
                    return True
                if b"[DONE]" in got:
                    return False
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()


def open_streams(g, model, seed, at_least, workers_at_least, chunks=40, limit=30):
    """Opens streams until there are `at_least` of them on at least `workers_at_least` workers."""
    streams = []
    try:
        while len(streams) < limit:
            streams.append(Stream(g, model, "held stream %d" % (seed + len(streams)), chunks))
            if len(streams) >= at_least and len({s.worker for s in streams}) >= workers_at_least:
                return streams
    except BaseException:
        close_all(streams)
        raise
    close_all(streams)
    raise AssertionError("%d streams landed on workers %s only" % (limit, sorted({s.worker for s in streams})))


def close_all(streams):
    for s in streams:
        s.close()


def count_by_server(streams, pool):
    return {n: sum(1 for s in streams if s.served == n) for n in POOLS[pool]}


def wait_drained(g, pool):
    """Until the shared in-flight counters of `pool` are back to 0 (closed streams are client
    aborts, finished by the log phase), then settled."""
    wait_until(lambda: sum(endpoint_view(g, metrics(g.port), "llmproxy_endpoint_in_flight_requests", pool).values())
               == 0, 5, "the shared in-flight count of %s to drain" % pool)
    return wait_settled(g.port)


# ---------------------------------------------------------------------------------------------


def test_a_shared_prefix_stays_on_one_server_whichever_worker_takes_it(gw):
    """24 requests sharing a 6000-char prefix, spread over the 4 workers: one server serves them
    all, and only the first request is a cache miss (per-worker state: one miss per worker)."""
    before = wait_settled(gw.port)
    assert before.value("llmproxy_shared_state_bytes") == 64 * 1024 * 1024
    assert before.value("llmproxy_shared_state_workers") == WORKERS
    prefix = random_text(6000, seed=71)
    cached = lambda m: m.total("llmproxy_cached_prompt_chars_total")
    runs, per_request = [], []
    for i in range(24):
        runs.append(post(gw, chat("m-a", prefix + " question number %d?" % i)))
        if i < 2:  # what the cold request and a warm one found in the cache
            m = wait_settled(gw.port)
            per_request.append(cached(m) - cached(before) - sum(per_request))
    workers = {w for _, w, _ in runs}
    homes = {s for _, _, s in runs}
    assert len(workers) >= 3, "reuseport should spread 24 connections over the workers: %s" % runs
    assert len(homes) == 1, "the shared prefix went to %s" % runs
    home = homes.pop()
    after = wait_settled(gw.port)
    cold, warm = per_request
    assert cold == 0 and warm >= 5000, per_request  # a fresh prefix, then most of its 6000 chars
    # Every later request, whichever worker took it, found the prefix the first one left (the
    # cached chars of a request grow with its length: the later ones are as long or longer).
    # One more miss, a worker learning the prefix on its own, would lose a whole `warm`.
    assert 23 * warm <= cached(after) - cached(before) < 23 * warm + 100, (cached(after) - cached(before), warm)
    # The endpoint families are the shared counters: once per endpoint, no worker label, with
    # the picks of every worker in them.
    for family in ("llmproxy_endpoint_picks_total", "llmproxy_endpoint_in_flight_requests",
                   "llmproxy_prefix_index_entries"):
        samples = after.select(family)
        assert samples and not any("worker" in labels for labels, _ in samples), (family, samples[:3])
    picks = lambda m: m.value("llmproxy_endpoint_picks_total", cluster="pool_a", endpoint=gw.servers.addr(home))
    assert picks(after) - picks(before) == 24
    print("\n24 requests sharing a prefix, workers %s -> %s; cached chars per warm request %d"
          % (sorted(workers), home, warm))


def test_b_load_counted_by_one_worker_is_seen_by_the_others(gw):
    """Streams held open on several workers: the shared in-flight counters hold all of them,
    the picks of every worker kept pool_b balanced, and a new request — whichever worker takes
    it — goes to the less loaded server."""
    wait_settled(gw.port)
    streams = open_streams(gw, "m-b", 0, at_least=5, workers_at_least=3)
    try:
        if len(streams) % 2 == 0:  # an odd count: one server of the two holds one more
            streams.append(Stream(gw, "m-b", "held stream extra"))
        n = len(streams)
        held = count_by_server(streams, "pool_b")
        m = metrics(gw.port)
        assert endpoint_view(gw, m, "llmproxy_endpoint_in_flight_requests", "pool_b") == held
        assert sum(held.values()) == n
        assert m.total("llmproxy_in_flight_requests") == n  # the workers' own counts, summed
        # every pick saw the streams the other workers had placed: never more than one apart
        assert max(held.values()) - min(held.values()) == 1, held
        light = min(held, key=held.get)
        probes = []
        for i in range(12):
            # the previous probe finished (its worker's log phase may run a moment after we read
            # the answer): the counters hold the streams only, one server strictly lighter
            wait_until(lambda: endpoint_view(gw, metrics(gw.port), "llmproxy_endpoint_in_flight_requests",
                                             "pool_b") == held, 5, "the probes to finish")
            probes.append(post(gw, chat("m-b", "probe %d" % i)))
        assert len({w for _, w, _ in probes}) >= 2, probes
        assert all(s == light for _, _, s in probes), ("held %s" % held, probes)
        print("\n%d streams on workers %s, held %s; 12 probes from workers %s all went to %s"
              % (n, sorted({s.worker for s in streams}), held, sorted({w for _, w, _ in probes}), light))
    finally:
        close_all(streams)
    wait_drained(gw, "pool_b")


def test_c_a_killed_workers_share_is_taken_back(gw):
    """kill -9 of a worker holding streams: its share of the shared in-flight counters is taken
    back by the other workers' reaper (REAP_WITHIN; exactly its share, endpoint by endpoint),
    the master starts a new worker that attaches to the same state, and nobody is wedged."""
    wait_settled(gw.port)
    before = metrics(gw.port)
    reaped = before.value("llmproxy_shared_state_reaped_workers_total")
    streams = open_streams(gw, "m-a", 100, at_least=6, workers_at_least=3, chunks=80)
    try:
        by_worker = {}
        for s in streams:
            by_worker.setdefault(s.worker, []).append(s)
        victim = max(by_worker, key=lambda w: len(by_worker[w]))
        doomed = by_worker[victim]
        survivors = [s for s in streams if s.worker != victim]
        m = metrics(gw.port)
        assert endpoint_view(gw, m, "llmproxy_endpoint_in_flight_requests", "pool_a") == \
            count_by_server(streams, "pool_a")
        expected = count_by_server(survivors, "pool_a")

        before_kill = set(gw.worker_pids())
        killed_at = time.time()
        gw.kill_worker(victim)
        seen = None
        while True:
            m = metrics(gw.port)
            seen = endpoint_view(gw, m, "llmproxy_endpoint_in_flight_requests", "pool_a")
            took = time.time() - killed_at
            if seen == expected or took > REAP_WITHIN:
                break
            time.sleep(0.05)
        # exactly the dead worker's share is gone: nothing of it left, nothing of the others lost
        assert seen == expected, ("in flight per server", seen, "expected", expected,
                                  "the killed worker held", count_by_server(doomed, "pool_a"))
        assert m.value("llmproxy_shared_state_reaped_workers_total") == reaped + 1
        print("\nkilled worker %d holding %d of %d streams: its share taken back after %.2fs"
              % (victim, len(doomed), len(streams), took))

        # its clients lost their streams; the other workers' streams go on
        assert all(s.ended_early() for s in doomed)
        assert all(s.more_events() for s in survivors)
        # the other workers keep routing (nobody wedged on the dead worker's state) ...
        served = [post(gw, chat("m-a", "after the kill %d" % i)) for i in range(8)]
        assert {w for _, w, _ in served} - {victim} and all(s in POOLS["pool_a"] for _, _, s in served)
        # ... and the master started a new worker, which attached to the same state
        wait_until(lambda: len(gw.worker_pids()) == WORKERS and victim not in gw.worker_pids(), 10,
                   "the master to replace the killed worker")
        assert "process %d exited on signal 9" % victim in gw.log_text()
        gw.wait_ready()
        new = set(gw.worker_pids()) - before_kill
        assert len(new) == 1, (before_kill, gw.worker_pids())
        for i in range(100):  # reuseport: each new connection has 1 chance in 4
            _, w, _ = post(gw, chat("m-a", "to the new worker %d" % i))
            if w in new:
                break
        assert w in new, "the new worker %s never served" % new
        m = metrics(gw.port)
        assert m.value("llmproxy_shared_state_workers") == WORKERS
        # no phantom: the survivors' streams are still exactly what is in flight
        assert endpoint_view(gw, m, "llmproxy_endpoint_in_flight_requests", "pool_a") == expected
    finally:
        close_all(streams)
    m = wait_drained(gw, "pool_a")
    assert m.value("llmproxy_shared_state_reaped_workers_total") == reaped + 1
    assert not gw.crashes()


class Traffic:
    """Background requests (new connection each, 30 ms at the upstream) until stop(): every
    answer's status and worker."""

    def __init__(self, g, threads=2):
        self.g, self.results, self.errors = g, [], []
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(t,), daemon=True) for t in range(threads)]
        for t in self.threads:
            t.start()

    def run(self, t):
        i = 0
        while not self.done.is_set():
            try:
                status, hdrs, data = request(self.g.port, "POST", CHAT, chat("m-a", "traffic %d %d" % (t, i)),
                                             {"x-test-delay-ms": "30"}, timeout=10)
                self.results.append((status, int(hdrs.get("x-llmproxy-worker", 0)), data[:200]))
            except Exception as e:  # noqa: BLE001 - every failure is reported by the test
                self.errors.append(repr(e))
            i += 1

    def served_by(self, pids):
        return sum(1 for _, w, _ in self.results if w in pids)

    def stop(self):
        self.done.set()
        for t in self.threads:
            t.join(15)


def reload(g, old_pids):
    """nginx -s reload, then until every old worker has exited and new ones answer."""
    r = g.nginx_cmd("-s", "reload")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: len(g.worker_pids()) == WORKERS and not set(g.worker_pids()) & set(old_pids), 15,
               "new workers to replace %s" % old_pids)
    g.wait_ready()
    return set(g.worker_pids())


def state_log(g, what):
    """Lines of the master's "llmproxy: shared state of ... <what>" notices."""
    return [l for l in g.log_text().splitlines()
            if "llmproxy: shared state of" in l and l.rstrip().endswith(what) and "%d#" % g.proc.pid in l]


def test_d_reload_under_load_keeps_what_the_workers_learned(gw):
    """nginx -s reload with requests arriving all along (every one answered 200): the master
    gets the same shared state back, and the new workers send a prefix learned before the reload
    to the same server, as a cache hit. A reload with another size gets a fresh state."""
    wait_settled(gw.port)
    prefixes = [random_text(6000, seed=300 + i) for i in range(3)]
    homes = []
    for i, p in enumerate(prefixes):
        runs = [post(gw, chat("m-a", p + " before the reload %d" % j)) for j in range(2)]
        assert runs[0][2] == runs[1][2], runs
        homes.append(runs[0][2])
    assert len(state_log(gw, "created")) == 1 and not state_log(gw, "kept from before the reload")

    old = set(gw.worker_pids())
    traffic = Traffic(gw)
    try:
        wait_until(lambda: traffic.served_by(old) >= 5 or traffic.errors, 10, "traffic on the old workers")
        new = reload(gw, old)
        wait_until(lambda: traffic.served_by(new) >= 5 or traffic.errors, 10, "traffic on the new workers")
    finally:
        traffic.stop()
    assert not traffic.errors, traffic.errors[:3]
    bad = [r for r in traffic.results if r[0] != 200]
    assert not bad, "%d of %d requests failed during the reload: %s" % (len(bad), len(traffic.results), bad[:3])
    print("\nreload under load: %d requests, %d by the old workers, %d by the new ones"
          % (len(traffic.results), traffic.served_by(old), traffic.served_by(new)))
    kept = state_log(gw, "kept from before the reload")
    assert len(kept) == 1 and "shared state of %d bytes" % (64 << 20) in kept[0], kept

    # the new workers route a prefix they never saw to where the old workers put it, as a hit
    m0 = wait_settled(gw.port)
    assert m0.value("llmproxy_shared_state_workers") == WORKERS  # the old workers detached
    cached = lambda m: m.total("llmproxy_cached_prompt_chars_total")
    for p, home in zip(prefixes, homes):
        _, w, s = post(gw, chat("m-a", p + " after the reload"))
        assert w in new and s == home, (w, new, s, home)
    m1 = wait_settled(gw.port)
    assert cached(m1) - cached(m0) >= 3 * 5000, (cached(m0), cached(m1))

    # another size: a fresh region, which knows no prefix
    text = gw.conf.read_text()
    assert text.count(harness.SHARED_STATE) == 1
    gw.conf.write_text(text.replace(harness.SHARED_STATE, 'shared_state = { size = "80m" }'))
    newer = reload(gw, new)
    created = state_log(gw, "created")
    assert len(created) == 2 and "shared state of %d bytes" % (80 << 20) in created[1], created
    m2 = wait_settled(gw.port)
    assert m2.value("llmproxy_shared_state_bytes") == 80 << 20
    _, w, _ = post(gw, chat("m-a", prefixes[0] + " after the resize"))
    assert w in newer
    m3 = wait_settled(gw.port)
    assert cached(m3) - cached(m2) == 0  # a cold request again: nothing was carried over
    assert not gw.crashes()


def test_e_per_worker_state_still_routes(servers):
    """shared_state = false: every worker routes on its own state (the endpoint series then
    carry a worker label, one per worker), no region is made."""
    g = harness.Nginx(library_config(servers, servers.dead), [servers.addr(n) for n in POOLS["pool_a"]],
                      workers=2, shared_state=False)
    try:
        _, w, s = post(g, chat("m-a", "per-worker state"))
        assert s in POOLS["pool_a"]
        m = wait_settled(g.port)
        assert not m.select("llmproxy_shared_state_bytes")
        samples = m.select("llmproxy_endpoint_picks_total", cluster="pool_a", endpoint=servers.addr(s))
        assert sorted(l["worker"] for l, _ in samples) == sorted(str(p) for p in g.worker_pids())
        assert m.value("llmproxy_endpoint_picks_total", cluster="pool_a", endpoint=servers.addr(s), worker=w) == 1
        assert "llmproxy: shared state of" not in g.log_text()
    finally:
        g.close()
