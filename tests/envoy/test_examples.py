"""`envoy --mode validate` on every example: loads our module and runs config_new on its config."""

import json
import os
import subprocess

import pytest
import yaml

import harness

EXAMPLES = harness.REPO / "examples"


def validate(config_path):
    env = dict(os.environ, ENVOY_DYNAMIC_MODULES_SEARCH_PATH=str(harness.BUILD_DIR))
    p = subprocess.run([harness.envoy_binary(), "--mode", "validate", "-c", str(config_path),
                        "--disable-hot-restart", "-l", "info"],
                       env=env, capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout + p.stderr


def test_validate_envoy_yaml(module_built):
    rc, out = validate(EXAMPLES / "envoy.yaml")
    assert rc == 0, out[-3000:]
    assert "OK" in out
    assert "llmproxy: filter \"llmproxy\" configured" in out


def test_envoy_yaml_retries_through_the_llmproxy_lb_policy():
    with open(EXAMPLES / "envoy.yaml") as f:
        cfg = yaml.safe_load(f)
    for cluster in cfg["static_resources"]["clusters"]:
        policy = cluster["load_balancing_policy"]["policies"][0]["typed_extension_config"]
        assert policy["name"] == "envoy.load_balancing_policies.dynamic_modules"
        assert policy["typed_config"]["lb_policy_name"] == "llmproxy"
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    picked = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert picked["cluster_header"] == "x-llmproxy-cluster"
    assert picked["retry_policy"] == harness.RETRY_POLICY


def envoyfilter_docs():
    with open(EXAMPLES / "envoyfilter.yaml") as f:
        return list(yaml.safe_load_all(f))


def test_validate_istio_envoyfilter(module_built, tmp_path):
    docs = envoyfilter_docs()
    ef = next(d for d in docs if d["kind"] == "EnvoyFilter")
    patch = ef["spec"]["configPatches"][0]
    assert patch["applyTo"] == "HTTP_FILTER"
    assert patch["patch"]["operation"] == "INSERT_BEFORE"
    assert patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"
    http_filter = patch["patch"]["value"]
    # Put the patched filter in front of the router of a minimal bootstrap, as istiod would.
    boot = harness.envoy_bootstrap(10080, 19080, [harness.static_cluster("default", ["127.0.0.1:8000"])],
                                   llmproxy_config=None, default_cluster="default")
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"].insert(0, http_filter)
    path = tmp_path / "istio.json"
    path.write_text(json.dumps(boot))
    rc, out = validate(path)
    assert rc == 0, out[-3000:]
    assert "llmproxy: filter \"llmproxy\" configured" in out


def test_envoyfilter_virtualservice_matches_rule_clusters():
    docs = envoyfilter_docs()
    ef = next(d for d in docs if d["kind"] == "EnvoyFilter")
    cfg = ef["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["filter_config"]["value"]
    clusters = {r["cluster"] for m in cfg["model_mapping_rule"].values() for r in m["rules"]}
    vs = next(d for d in docs if d["kind"] == "VirtualService")
    matched = {m["headers"]["x-llmproxy-cluster"]["exact"] for h in vs["spec"]["http"] for m in h.get("match", [])}
    assert clusters == matched
    for c in clusters:  # Istio's outbound|PORT||HOST names the destination of the same route
        _, port, _, host = c.split("|")
        route = next(h for h in vs["spec"]["http"]
                     if any(m["headers"]["x-llmproxy-cluster"]["exact"] == c for m in h.get("match", [])))
        dest = route["route"][0]["destination"]
        assert dest["host"] == host and dest["port"]["number"] == int(port)


def test_bad_config_rejected_with_our_message(module_built, tmp_path):
    boot = harness.envoy_bootstrap(10081, 19081, [harness.static_cluster("default", ["127.0.0.1:8000"])],
                                   llmproxy_config={"protocol": "openai", "no_such_key": True},
                                   default_cluster="default")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(boot))
    rc, out = validate(path)
    assert rc != 0
    assert "invalid llmproxy config" in out
    assert "no_such_key" in out


@pytest.mark.parametrize("kind", ["struct", "string"])
def test_struct_and_string_configs_both_accepted(module_built, tmp_path, kind):
    cfg = {"protocol": "openai", "algorithm": "inference_lb",
           "model_mapping_rule": {"m": {"rules": [{"scene_name": "s", "cluster": "default", "backend": "vllm"}]}},
           "clusters": {"default": {"endpoints": ["127.0.0.1:8000"]}}, "max_body_bytes": 1048576}
    boot = harness.envoy_bootstrap(10082, 19082, [harness.static_cluster("default", ["127.0.0.1:8000"])],
                                   llmproxy_config=cfg, default_cluster="default")
    flt = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]
    if kind == "struct":
        flt["typed_config"]["filter_config"] = {"@type": "type.googleapis.com/google.protobuf.Struct", "value": cfg}
    path = tmp_path / ("%s.json" % kind)
    path.write_text(json.dumps(boot))
    rc, out = validate(path)
    assert rc == 0, out[-3000:]
    assert "max_body_bytes 1048576" in out  # the library read our config
