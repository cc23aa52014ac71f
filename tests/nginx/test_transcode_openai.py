"""End-to-end with the official `openai` Python client: real nginx with 2 workers, once per nginx
host (the OpenResty module from examples/nginx.conf, and the native module from
examples/nginx-native.conf, no Lua), in front of the fake upstreams of tests/common/fake_openai.py.
The scenarios (target_model rewrite, Triton transcoded both ways, errors, LoRA / label subsets)
are shared with the Envoy host: see tests/common/transcode_cases.py. This file only starts nginx
and says how to talk to it.
"""

import pytest

import harness
from transcode_cases import POOLS, SERVER_NAMES, TranscodeOpenAICases, llmproxy_config

TC_PORTS = {}  # server name -> port, filled by the tc_servers fixture


@pytest.fixture(scope="module")
def tc_servers():
    with harness.FakeUpstreams(SERVER_NAMES) as s:
        TC_PORTS.update(s.ports)
        yield s


# as in test_native.py: harness.HOSTS[name] is the gateway's class. `make test` builds the native
# module first (test-nginx-native); a lone `make test-nginx` without it skips that host.
HOSTS = ["lua", pytest.param("native", marks=pytest.mark.skipif(
    not harness.MODULE.exists(), reason="%s missing: run `make nginx-module`" % harness.MODULE))]


@pytest.fixture(scope="module", params=HOSTS)
def gateway(request, tc_servers):
    gw = harness.HOSTS[request.param](llmproxy_config(tc_servers), [tc_servers.addr(n) for n in POOLS["pool_oai"]],
                                      workers=2)
    yield gw
    gw.close()


class TestTranscodeOpenAINginx(TranscodeOpenAICases):
    def post(self, gateway, path, body, headers=None):
        return harness.request(gateway.port, "POST", path, body, headers)

    def check_pick(self, raw, name):
        # both example configs (debug headers on) answer with the endpoint the module picked
        assert raw.headers["x-llmproxy-endpoint"].endswith(":%d" % TC_PORTS[name])
