"""cache_residency through real Envoy: the router reads the engine's KV cache capacity from its
metrics page (vLLM's `vllm:cache_config_info`), measures how fast the answers (their `usage`)
write into that cache, and stops counting a prefix as cached once its last use is older than
the cache can keep it; with `cache_residency: false` the same repeat counts as cached."""

import time

import pytest

import harness
from conftest import POOLS
from harness import chat, metrics, wait_in_flight_zero

# 4 blocks of 16 tokens: a 64-token cache, which every long prompt below overflows
TINY_CACHE = ("# TYPE vllm:cache_config_info gauge\n"
              'vllm:cache_config_info{block_size="16",enable_prefix_caching="True",num_gpu_blocks="4"} 1.0\n')


def set_metrics(servers, name, mode, page="", **settings):
    status, _, data, _ = harness.request(servers.ports[name], "POST", "/test/metrics",
                                         {"mode": mode, "page": page, **settings})
    assert status == 200, data


def solo_gateway(servers, engine, tmp_path_factory, **settings):
    """Envoy + llmproxy (`prefix_cost`, 64-byte chunks, `settings` on top) routing model m-a to
    the one `engine`."""
    def start():
        listen_port, admin_port = harness.free_ports(2)
        endpoints = [servers.addr(engine)]
        cfg = {"protocol": "openai", "algorithm": "prefix_cost", "hash_chunk_bytes": 64,
               "model_mapping_rule": {"m-a": {"rules": [{"cluster": "solo", "backend": "vllm"}]}},
               "clusters": {"solo": {"endpoints": endpoints}}, **settings}
        boot = harness.envoy_bootstrap(listen_port, admin_port, [harness.static_cluster("solo", endpoints)], cfg,
                                       default_cluster="solo")
        return harness.Envoy(boot, tmp_path_factory.mktemp("envoy-solo"))
    return harness.retry_on_port_clash(start)


def running_solo_gateway(servers, tmp_path_factory, param, **settings):
    """The body of a fixture: a `solo_gateway` to pool_a's first engine with `settings`,
    yielded as (gateway, the fixture's param, the engine's address), closed after the test."""
    engine = POOLS["pool_a"][0]
    gw = solo_gateway(servers, engine, tmp_path_factory, **settings)
    try:
        yield gw, param, servers.addr(engine)
    finally:
        gw.close()


@pytest.fixture(params=[True, False], ids=["residency", "no-residency"])
def residency_gateway(request, module_built, servers, tmp_path_factory):
    engine = POOLS["pool_a"][0]
    set_metrics(servers, engine, "page", TINY_CACHE)
    try:
        yield from running_solo_gateway(servers, tmp_path_factory, request.param, cache_feedback=False,
                                        cache_residency=request.param,
                                        engine_metrics={"enabled": True, "period_ms": 100, "timeout_ms": 100})
    finally:
        set_metrics(servers, engine, "off")


def uncached_picks(gw):
    """Picks whose prompt the index counted as not cached at all (cache ratio 0)."""
    return metrics(gw).value("llmproxy_decision_cache_ratio_bucket", le="0")


def test_a_prefix_older_than_the_engines_cache_residency_stops_counting(residency_gateway):
    gw, residency, engine = residency_gateway
    harness.wait_until(lambda: metrics(gw).total("llmproxy_engine_metrics_reads_total", result="ok") >= 1,
                       timeout=10, what="the engine's page read")
    document = "a long shared document about caches, " * 200  # ~7 KiB: ~1,800 tokens written
    status, _, data, _ = harness.request(gw.port, "POST", "/v1/chat/completions", chat("m-a", document + " q1"))
    assert status == 200, data[:300]
    # the next pick after the first 2 s window measures the write rate (~1,800 tokens in ~2 s
    # into a 64-token cache: a prefix stays ~0.1 s)
    time.sleep(2.2)
    status, _, data, _ = harness.request(gw.port, "POST", "/v1/chat/completions", chat("m-a", "short"))
    assert status == 200, data[:300]
    before = uncached_picks(gw)
    # the same document again, >2 s after its last use
    status, _, data, _ = harness.request(gw.port, "POST", "/v1/chat/completions", chat("m-a", document + " q2"))
    assert status == 200, data[:300]
    m = metrics(gw)
    if residency:
        assert uncached_picks(gw) == before + 1, "the evicted document counted as cached"
        secs = m.value("llmproxy_endpoint_cache_residency_seconds", cluster="solo", endpoint=engine)
        assert 0 < secs < 0.5, secs
    else:
        assert uncached_picks(gw) == before, "without residency the index is taken at its word"
        assert not m.select("llmproxy_endpoint_cache_residency_seconds")
    wait_in_flight_zero(gw)


@pytest.fixture(params=[True, False], ids=["learning", "no-feedback"])
def learning_gateway(request, module_built, servers, tmp_path_factory):
    """A gateway to one engine whose capacity nobody gives (no metrics page, no config):
    with `cache_feedback` it is learned from the answers' `cached_tokens`."""
    yield from running_solo_gateway(servers, tmp_path_factory, request.param, cache_feedback=request.param)


def test_the_engines_cache_capacity_is_learned_from_its_answers(learning_gateway):
    gw, feedback, engine = learning_gateway
    document = "a long shared document about caches, " * 200  # ~7 KiB: ~1,850 tokens written

    def ask(question, cached=0):
        status, _, data, _ = harness.request(gw.port, "POST", "/v1/chat/completions", chat("m-a", document + question),
                                             headers={"x-test-cached-tokens": str(cached)})
        assert status == 200, data[:300]

    # the engine reports its hits (16 tokens of a chat template), so its zeros count from then on
    ask(" q1", cached=16)
    # 2.2 s later the index still lists the document, and the engine reports it evicted: about
    # what was written since (~1,850 tokens) is more than the cache holds
    time.sleep(2.2)
    ask(" q2")

    def learned():
        return metrics(gw).select("llmproxy_endpoint_learned_cache_capacity_tokens")
    if feedback:
        harness.wait_until(learned, timeout=5, what="a learned capacity")
        [(labels, tokens)] = learned()
        assert labels["endpoint"] == engine and 1_000 < tokens < 3_000, (labels, tokens)
    # 4 s after q2 (residency ≈ 2.5 s by then) the document no longer counts as cached when
    # learned; without feedback the index is taken at its word
    time.sleep(4)
    before = uncached_picks(gw)
    ask(" q3")
    if feedback:
        assert uncached_picks(gw) == before + 1, "the evicted document counted as cached"
    else:
        assert uncached_picks(gw) == before, "nothing learned: the index at its word"
        assert not learned()
    wait_in_flight_zero(gw)


@pytest.fixture(params=[True, False], ids=["pressure", "no-pressure"])
def pressure_gateway(request, module_built, servers, tmp_path_factory):
    """A gateway to one engine whose capacity the config gives (nothing to learn): only
    `eviction_pressure` measures the engine's eviction share."""
    yield from running_solo_gateway(servers, tmp_path_factory, request.param, cache_capacity_tokens=1_000_000,
                                    eviction_pressure=request.param)


def test_the_share_of_writes_that_recompute_evicted_prefixes_is_measured(pressure_gateway):
    gw, pressure, engine = pressure_gateway
    document = "a long shared document about caches, " * 200
    # q1's engine reports its hits (16 tokens of a chat template), so its zeros count from then on
    for question, cached in ((" q1", 16), (" q2", 0), (" q3", 0)):
        status, _, data, _ = harness.request(gw.port, "POST", "/v1/chat/completions", chat("m-a", document + question),
                                             headers={"x-test-cached-tokens": str(cached)})
        assert status == 200, data[:300]
        # the index lists the document for the engine, which reports it evicted 1.1 s later
        time.sleep(1.1)
    wait_in_flight_zero(gw)
    share = metrics(gw).value("llmproxy_endpoint_cache_eviction_share", cluster="solo", endpoint=engine)
    if pressure:
        # q2 and q3 recompute the document (~99 % of what they write); q1 was new
        assert 0.9 < share <= 1.0, share
    else:
        assert share == 0.0, share


@pytest.fixture()
def busy_engine_gateway(module_built, servers, tmp_path_factory):
    """A gateway to one engine with a 65,536-token KV cache (vLLM's page) whose prompt token
    counter grows 10 per ms: traffic this gateway never sent."""
    engine = POOLS["pool_a"][0]
    set_metrics(servers, engine, "growing", 'vllm:cache_config_info{block_size="16",num_gpu_blocks="4096"} 1.0\n',
                tokens_per_ms=10)
    try:
        yield from running_solo_gateway(servers, tmp_path_factory, None,
                                        engine_metrics={"enabled": True, "period_ms": 100, "timeout_ms": 100})
    finally:
        set_metrics(servers, engine, "off")


def test_the_write_rate_comes_from_the_engines_own_token_counters(busy_engine_gateway):
    gw, _, engine = busy_engine_gateway

    def residency():
        return metrics(gw).select("llmproxy_endpoint_cache_residency_seconds", cluster="solo", endpoint=engine)
    # no request through this gateway: 65,536 tokens of cache at 10,000 tokens/s, ~6.6 s,
    # measured once the reader closed a first 2 s window
    harness.wait_until(residency, timeout=10, what="a residency from the engine's counters")
    [(_, secs)] = residency()
    assert 5.5 < secs < 7.5, secs
    [(labels, rate)] = metrics(gw).select("llmproxy_endpoint_cache_write_tokens_per_second", endpoint=engine)
    assert labels["source"] == "engine" and 8_500 < rate < 11_500, (labels, rate)
