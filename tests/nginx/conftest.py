import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "common"))  # shared harness and cases

import harness  # noqa: E402

harness.raise_fd_limit()  # 1,000 concurrent client sockets, and the upstreams inherit it

MAX_BODY = 1024 * 1024  # the library's max_body_bytes; nginx's client_max_body_size is 2m

POOLS = harness.POOLS  # pool -> fake upstream names (tests/common/harness_base.py)


def library_config(servers, dead):
    return harness.pools_config(servers, dead, MAX_BODY, {
        # the backend gets another model name (body rewritten by the library)
        "m-r": [{"scene_name": "rewrite", "cluster": "pool_b", "backend": "vllm", "target_model": "m-r-upstream"}],
        # Triton generate: path and body rebuilt, response transcoded back to OpenAI
        "m-t": [{"scene_name": "triton", "cluster": "pool_b", "backend": "triton"}],
        # every endpoint dead: two tries, then nginx's 502 (error_page JSON)
        "m-dead2": [{"scene_name": "dead2", "cluster": "pool_dead2", "backend": "vllm"}],
        # one endpoint, dead: the retry finds no other endpoint
        "m-dead1": [{"scene_name": "dead1", "cluster": "pool_dead1", "backend": "vllm"}],
        # a cluster without endpoints: the library answers 503
        "m-none": [{"scene_name": "none", "cluster": "pool_none", "backend": "vllm"}],
        # a dead endpoint beside a live one, used by one test only (never ejected before it)
        "m-retry": [{"scene_name": "retry", "cluster": "pool_retry", "backend": "vllm"}],
    }, clusters={"pool_dead2": [dead, servers.dead2], "pool_dead1": [servers.dead2],
                 "pool_retry": [servers.dead2, servers.addr(POOLS["pool_b"][0])]})


@pytest.fixture(scope="session")
def servers():
    names = [n for pool in POOLS.values() for n in pool]
    with harness.FakeUpstreams(names) as s:
        s.dead = "127.0.0.1:%d" % harness.refused_port()  # nothing listens there, ever
        s.dead2 = "127.0.0.1:%d" % harness.refused_port()
        yield s


def _nginx(servers, workers, **render):
    cfg = library_config(servers, servers.dead)
    passthrough = [servers.addr(n) for n in POOLS["pool_a"]]
    gw = harness.Nginx(cfg, passthrough, workers=workers, **render)
    gw.servers = servers
    return gw


@pytest.fixture(scope="module")
def gateway(servers):
    """nginx with 2 workers, examples/nginx.conf, in front of the test servers."""
    gw = _nginx(servers, 2)
    yield gw
    gw.close()


@pytest.fixture(scope="module")
def gateway1(servers):
    """The same with a single worker (one router for every request), and bodies above 16 KiB
    spooled to client_body_temp_path (the example keeps them in memory): access() reads them
    back from the file."""
    gw = _nginx(servers, 1, body_buffer="16k")
    yield gw
    gw.close()


# a failed test's report shows the error log tail of every nginx it used
pytest_runtest_makereport = pytest.hookimpl(hookwrapper=True)(harness.log_tails_on_failure)
