"""Endpoint failures through a real Envoy 1.40 (issue #13, items 4 and 5).

- Only the endpoint's own failures count against it: route timeouts (a client can ask for a long
  generation) and Envoy's local replies do not eject it; a connect failure does.
- An Envoy retry after a connect failure re-picks another endpoint through the llmproxy
  load-balancing policy: when the server holding a prefix dies, the requests that arrive after
  the kill do not fail, and those in flight fail at most once each, counted against it.
"""

import json
import threading

import pytest

import harness
from harness import CHAT, metrics, wait_in_flight_zero, wait_until


def chat(model, text):
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def endpoint_metric(m, name, cluster, addr):
    return m['%s{cluster="%s",endpoint="%s"}' % (name, cluster, addr)]


def route(cluster_value, timeout, retry=False):
    """A route for the requests the filter sent to one rule cluster (x-llmproxy-cluster value)."""
    r = {"match": {"prefix": "/", "headers": [{"name": "x-llmproxy-cluster",
                                               "string_match": {"exact": cluster_value}}]},
         "route": {"cluster": cluster_value, "timeout": timeout}}
    if retry:
        r["route"]["retry_policy"] = harness.RETRY_POLICY
    return r


@pytest.fixture(scope="module")
def fleet(module_built, tmp_path_factory):
    """live (l1, l2, s1) in one process, the victim v1 in its own (a test kills it), and a gateway:
    pool_r = l1, l2, v1 with the llmproxy LB policy and retries; pool_slow = s1 behind a 0.5 s route
    timeout; pool_dead = a port where nothing listens; pool_rr = a dead port + l1, retries through
    Envoy's own round robin (no llmproxy LB policy)."""
    live = harness.FakeUpstreams(["l1", "l2", "s1"])
    victim = harness.FakeUpstreams(["v1"])

    def start():
        listen_port, admin_port = harness.free_ports(2)
        dead1, dead2 = harness.refused_port(), harness.refused_port()
        pools = {
            "pool_r": [live.addr("l1"), live.addr("l2"), victim.addr("v1")],
            "pool_slow": [live.addr("s1")],
            "pool_dead": ["127.0.0.1:%d" % dead1],
            "pool_rr": ["127.0.0.1:%d" % dead2, live.addr("l1")],
        }
        cfg = {"protocol": "openai", "algorithm": "inference_lb",
               "model_mapping_rule": {m: {"rules": [{"scene_name": m, "cluster": p, "backend": "vllm"}]}
                                      for m, p in [("m-r", "pool_r"), ("m-slow", "pool_slow"),
                                                   ("m-dead", "pool_dead"), ("m-rr", "pool_rr")]},
               "clusters": {p: {"endpoints": eps} for p, eps in pools.items()},
               "ejection": {"consecutive_failures": 3, "eject_ms": 60000}}
        clusters = [harness.llmproxy_cluster("pool_r", pools["pool_r"])] + [
            harness.static_cluster(p, pools[p]) for p in ("pool_slow", "pool_dead", "pool_rr")]
        boot = harness.envoy_bootstrap(listen_port, admin_port, clusters, cfg, default_cluster="pool_r")
        hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["route_config"]["virtual_hosts"][0]["routes"] = [
            route("pool_r", "30s", retry=True),
            route("pool_slow", "0.5s"),
            route("pool_dead", "5s"),
            route("pool_rr", "5s", retry=True),
            {"match": {"prefix": "/"}, "route": {"cluster": "pool_r", "timeout": "5s"}},
        ]
        gw = harness.Envoy(boot, tmp_path_factory.mktemp("envoy-failures"))
        gw.pools = pools
        return gw

    try:
        gw = harness.retry_on_port_clash(start)
    except Exception:
        live.close()
        victim.close()
        raise
    gw.live, gw.victim = live, victim
    yield gw
    gw.close()
    victim.close()
    live.close()


def test_route_timeouts_do_not_eject_the_endpoint(fleet):
    s1 = fleet.pools["pool_slow"][0]
    for i in range(4):  # more than the 3 consecutive failures that eject
        status, _, data, secs = harness.request(fleet.port, "POST", CHAT, chat("m-slow", "long generation %d" % i),
                                                headers={"x-test-delay-ms": "1500"})
        assert status == 504, data
        assert secs < 1.4
    m = metrics(fleet)
    assert endpoint_metric(m, "llmproxy_endpoint_failures_total", "pool_slow", s1) == 0
    assert endpoint_metric(m, "llmproxy_endpoint_ejected", "pool_slow", s1) == 0
    assert m['llmproxy_finished_requests_total{status="5xx"}'] >= 4  # what the clients got
    status, _, data, _ = harness.request(fleet.port, "POST", CHAT, chat("m-slow", "short"))
    assert status == 200 and json.loads(data)["served_by"] == "s1"


def test_dead_endpoint_is_still_ejected(fleet):
    dead = fleet.pools["pool_dead"][0]
    for i in range(3):
        status, _, data, secs = harness.request(fleet.port, "POST", CHAT, chat("m-dead", "anyone? %d" % i))
        assert status == 503, data
        assert secs < 2
    m = metrics(fleet)
    assert endpoint_metric(m, "llmproxy_endpoint_failures_total", "pool_dead", dead) == 3
    assert endpoint_metric(m, "llmproxy_endpoint_ejected", "pool_dead", dead) == 1


def test_retry_through_another_lb_policy_does_not_credit_the_dead_pick(fleet):
    # Without the llmproxy LB policy Envoy's own round robin serves the retry: the client is
    # fine, and the library learns that its pick failed instead of crediting it with the answer.
    dead = fleet.pools["pool_rr"][0]
    before = metrics(fleet)
    picks = 0
    for i in range(30):
        status, _, data, _ = harness.request(fleet.port, "POST", CHAT, chat("m-rr", "rr %d" % i))
        assert status == 200, data
        picks = endpoint_metric(metrics(fleet), "llmproxy_endpoint_picks_total", "pool_rr", dead)
        if picks >= 3:
            break
    assert picks >= 3, "the dead endpoint was picked %d times" % picks
    m = metrics(fleet)
    assert endpoint_metric(m, "llmproxy_endpoint_failures_total", "pool_rr", dead) == picks
    assert endpoint_metric(m, "llmproxy_endpoint_ejected", "pool_rr", dead) == 1
    elsewhere = m["llmproxy_envoy_served_elsewhere_total"] - before["llmproxy_envoy_served_elsewhere_total"]
    assert elsewhere == picks


def test_killed_endpoint_costs_no_request_after_the_kill(fleet):
    v1 = fleet.victim.addr("v1")
    # A prefix the library keeps on the victim (cache-aware picks stick to where it was served).
    prefix = None
    for i in range(60):
        candidate = ("shared system prompt %d " % i) * 200
        status, _, data, _ = harness.request(fleet.port, "POST", CHAT, chat("m-r", candidate + "warm"))
        assert status == 200
        if json.loads(data)["served_by"] == "v1":
            prefix = candidate
            break
    assert prefix, "no prefix landed on the victim"
    status, _, data, _ = harness.request(fleet.port, "POST", CHAT, chat("m-r", prefix + "sticky?"))
    assert status == 200 and json.loads(data)["served_by"] == "v1"

    # Requests in flight ("prefilling" for 3 s) when the victim dies: at least one of them on it.
    in_flight = []

    def slow(i):
        in_flight.append(harness.request(fleet.port, "POST", CHAT, chat("m-r", prefix + "in flight %d" % i),
                                         headers={"x-test-delay-ms": "3000"}, timeout=20))

    threads = [threading.Thread(target=slow, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    wait_until(lambda: metrics(fleet)["llmproxy_envoy_in_flight"] == 2, what="two requests in flight")
    on_victim = endpoint_metric(metrics(fleet), "llmproxy_endpoint_in_flight_requests", "pool_r", v1)
    assert on_victim >= 1
    fleet.victim.proc.kill()
    fleet.victim.proc.wait(timeout=5)
    for t in threads:
        t.join(timeout=20)
    assert len(in_flight) == 2
    # Those on the victim fail once each (a reset after the request was sent is not retried: the
    # request may have caused it); the others are answered.
    failed_in_flight = [r for r in in_flight if r[0] != 200]
    assert len(failed_in_flight) == on_victim, [r[:3] for r in in_flight]
    assert all(r[0] == 503 for r in failed_in_flight), [r[:3] for r in in_flight]

    # Every request after the kill succeeds on the others, the first ones through Envoy retries.
    before = metrics(fleet)
    after_kill = []
    for i in range(20):
        status, _, data, _ = harness.request(fleet.port, "POST", CHAT, chat("m-r", prefix + "after the kill %d" % i))
        after_kill.append((status, json.loads(data).get("served_by") if status == 200 else data[:200]))
    assert [s for s, _ in after_kill if s != 200] == [], after_kill
    assert {who for _, who in after_kill} <= {"l1", "l2"}, after_kill

    m = metrics(fleet)
    # The library learned it all: the victim is ejected, and each of its failures is counted, one
    # per failed in-flight request and one per Envoy retry (llmproxy_request_retry re-picked).
    assert endpoint_metric(m, "llmproxy_endpoint_ejected", "pool_r", v1) == 1
    retries = m["llmproxy_retries_total"] - before["llmproxy_retries_total"]
    assert retries >= 1, "no request after the kill went through a retry"
    assert endpoint_metric(m, "llmproxy_endpoint_failures_total", "pool_r", v1) == len(failed_in_flight) + retries
    assert m["llmproxy_envoy_lb_repicks_total"] - before["llmproxy_envoy_lb_repicks_total"] == retries
    # Each retry was served where the library re-picked, never behind its back.
    assert m["llmproxy_envoy_served_elsewhere_total"] == before["llmproxy_envoy_served_elsewhere_total"]
    wait_in_flight_zero(fleet)
