"""Istio-style cluster names (outbound|PORT||HOST) with no endpoint list: the library resolves the
name by DNS, the filter sets it as the cluster header, and a cluster_header route selects the
Envoy cluster of the same name, as on an Istio gateway (here HOST = localhost)."""

import json
import socket

import pytest

import harness


@pytest.fixture(scope="module")
def istio_gateway(module_built, servers, tmp_path_factory):
    if {a[4][0] for a in socket.getaddrinfo("localhost", 80, proto=socket.IPPROTO_TCP)} != {"127.0.0.1"}:
        pytest.skip("localhost must resolve to 127.0.0.1 only (the test servers listen there)")
    port = servers.ports["b1"]
    name = "outbound|%d||localhost" % port

    def start():
        listen_port, admin_port = harness.free_ports(2)
        cfg = {"protocol": "openai", "algorithm": "inference_lb",
               "model_mapping_rule": {"m-i": {"rules": [{"scene_name": "istio", "cluster": name, "backend": "vllm"}]}}}
        clusters = [harness.static_cluster(name, [servers.addr("b1")]),
                    harness.static_cluster("default", [servers.addr("a1")])]
        boot = harness.envoy_bootstrap(listen_port, admin_port, clusters, cfg, default_cluster="default")
        return harness.Envoy(boot, tmp_path_factory.mktemp("envoy-istio"))

    gw = harness.retry_on_port_clash(start)
    gw.cluster_name = name
    yield gw
    gw.close()


def test_dns_resolved_istio_cluster_name(istio_gateway):
    body = {"model": "m-i", "messages": [{"role": "user", "content": "via an Istio cluster name"}]}
    status, hdrs, data, _ = harness.request(istio_gateway.port, "POST", "/v1/chat/completions", body)
    assert status == 200, data
    echo = json.loads(data)
    assert echo["served_by"] == "b1"  # not the default route's cluster
    assert echo["received_headers"]["x-llmproxy-cluster"] == istio_gateway.cluster_name
    assert echo["received_headers"]["x-llmproxy-endpoint"] == "127.0.0.1:%d" % int(
        istio_gateway.cluster_name.split("|")[1])
