"""End-to-end with the official `openai` Python client: real Envoy 1.40 + our module in front of
the fake upstreams of tests/common/fake_openai.py. The scenarios (target_model rewrite, Triton
transcoded both ways, errors, LoRA / label subsets) are shared with the nginx host: see
tests/common/transcode_cases.py. This file only starts Envoy and says how to talk to it.
"""

import pytest

import harness
from transcode_cases import POOLS, SERVER_NAMES, TranscodeOpenAICases, llmproxy_config


@pytest.fixture(scope="module")
def tc_servers():
    with harness.FakeUpstreams(SERVER_NAMES) as s:
        yield s


@pytest.fixture(scope="module")
def gateway(module_built, tc_servers, tmp_path_factory):
    def start():
        listen_port, admin_port = harness.free_ports(2)
        clusters = [harness.static_cluster(pool, [tc_servers.addr(n) for n in names])
                    for pool, names in POOLS.items()]
        bootstrap = harness.envoy_bootstrap(listen_port, admin_port, clusters, llmproxy_config(tc_servers),
                                            default_cluster="pool_oai")
        return harness.Envoy(bootstrap, tmp_path_factory.mktemp("envoy-transcode"))

    envoy = harness.retry_on_port_clash(start)
    yield envoy
    envoy.close()


class TestTranscodeOpenAIEnvoy(TranscodeOpenAICases):
    def post(self, gateway, path, body, headers=None):
        status, hdrs, data, _ = harness.request(gateway.port, "POST", path, body, headers)
        return status, hdrs, data
