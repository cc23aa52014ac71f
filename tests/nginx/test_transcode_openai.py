"""End-to-end with the official `openai` Python client: real nginx (examples/nginx.conf, 2 workers)
+ our OpenResty module in front of the fake upstreams of tests/common/fake_openai.py. The scenarios
(target_model rewrite, Triton transcoded both ways, errors, LoRA / label subsets) are shared with
the Envoy host: see tests/common/transcode_cases.py. This file only starts nginx and says how to
talk to it.
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


@pytest.fixture(scope="module")
def gateway(tc_servers):
    gw = harness.Nginx(llmproxy_config(tc_servers), [tc_servers.addr(n) for n in POOLS["pool_oai"]], workers=2)
    yield gw
    gw.close()


class TestTranscodeOpenAINginx(TranscodeOpenAICases):
    def post(self, gateway, path, body, headers=None):
        return harness.request(gateway.port, "POST", path, body, headers)

    def check_pick(self, raw, name):
        # examples/nginx.conf answers with the endpoint our module picked (a debug header)
        assert raw.headers["x-llmproxy-endpoint"].endswith(":%d" % TC_PORTS[name])
