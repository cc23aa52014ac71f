"""deploy/istio: every manifest parses and passes the Kubernetes / Istio JSON schemas
(kubernetes-models + @kubernetes-models/istio from npm, installed by `make test-deploy` into
LLMPROXY_K8S_SCHEMAS), the objects agree with each other (selectors, the module's path and
environment variable, the headless Service whose port equals its targetPort, the Istio cluster
names of the rules), and every Envoy config they embed is accepted by `envoy --mode validate`
with our module, placed the way istiod would place it."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import harness

ISTIO = harness.REPO / "deploy" / "istio"
VALIDATOR = Path(__file__).resolve().parent / "validate_k8s.mjs"


def manifests():
    kust = yaml.safe_load((ISTIO / "kustomization.yaml").read_text())
    return [d for f in kust["resources"] for d in yaml.safe_load_all((ISTIO / f).read_text()) if d]


def one(kind, name=None):
    found = [d for d in manifests() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((ISTIO / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in ISTIO.glob("*.yaml") if p.name != "kustomization.yaml")
    for d in manifests():
        assert d["apiVersion"] and d["kind"] and d["metadata"]["name"], d
        assert d["kind"] == "Namespace" or d["metadata"].get("namespace"), d["metadata"]


def schema_check(tmp_path, docs):
    schemas = Path(os.environ.get("LLMPROXY_K8S_SCHEMAS", harness.REPO / "build" / "k8s-schemas"))
    if not (schemas / "node_modules" / "kubernetes-models").is_dir():
        pytest.fail("no schemas in %s: run `make test-deploy` (npm install kubernetes-models)" % schemas)
    shutil.copy(VALIDATOR, schemas / VALIDATOR.name)  # bare imports resolve next to node_modules
    path = tmp_path / "docs.json"
    path.write_text(json.dumps(docs))
    p = subprocess.run(["node", str(schemas / VALIDATOR.name), str(path)], capture_output=True, text=True, timeout=60)
    return p.returncode, [json.loads(line) for line in p.stdout.splitlines()], p.stderr


def test_manifests_pass_kubernetes_and_istio_schemas(tmp_path):
    docs = manifests()
    rc, results, err = schema_check(tmp_path, docs)
    assert len(results) == len(docs), err
    bad = [r for r in results if not r["ok"]]
    assert rc == 0 and not bad, bad or err


def test_schema_check_rejects_broken_objects(tmp_path):
    """The validator is not a rubber stamp: a wrong type and a wrong enum are refused."""
    svc = one("Service", "qwen3-8b")
    svc["spec"]["ports"][0]["targetPort"] = {"not": "a port"}
    ef = one("EnvoyFilter")
    ef["spec"]["configPatches"][0]["applyTo"] = "HTTP_FILTERS"
    rc, results, _ = schema_check(tmp_path, [svc, ef])
    assert rc == 1 and [r["ok"] for r in results] == [False, False], results


def rule_clusters():
    ef = one("EnvoyFilter")
    cfg = ef["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["filter_config"]["value"]
    return sorted({r["cluster"] for m in cfg["model_mapping_rule"].values() for r in m["rules"]})


def test_gateway_pod_gets_the_module_and_its_search_path():
    dep = one("Deployment", "llmproxy-gateway")
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert pod["metadata"]["annotations"]["inject.istio.io/templates"] == "gateway"
    # the EnvoyFilter, the Gateway and the Service select these pods
    assert one("EnvoyFilter")["spec"]["workloadSelector"]["labels"].items() <= labels.items()
    assert one("Gateway")["spec"]["selector"].items() <= labels.items()
    assert one("Service", "llmproxy-gateway")["spec"]["selector"].items() <= labels.items()
    proxy = next(c for c in pod["spec"]["containers"] if c["name"] == "istio-proxy")
    search = next(e["value"] for e in proxy["env"] if e["name"] == "ENVOY_DYNAMIC_MODULES_SEARCH_PATH")
    mount = next(m for m in proxy["volumeMounts"] if m["mountPath"] == search)
    # the init container copies the module's file into the volume istio-proxy mounts there
    init = pod["spec"]["initContainers"][0]
    init_mount = next(m for m in init["volumeMounts"] if m["name"] == mount["name"])
    src, dst = init["command"][-2:]
    assert Path(src).name == "libllmproxy_envoy.so" and dst.rstrip("/") == init_mount["mountPath"]
    # ... from the image deploy/envoy/Dockerfile builds, which has it at that path
    dockerfile = (harness.REPO / "deploy" / "envoy" / "Dockerfile").read_text()
    assert "COPY build/libllmproxy_envoy.so %s\n" % src in dockerfile
    # the image way (Dockerfile.proxyv2) puts it in the same directory with the same variable
    proxyv2 = (ISTIO / "Dockerfile.proxyv2").read_text()
    assert "COPY build/libllmproxy_envoy.so %s/libllmproxy_envoy.so\n" % search in proxyv2
    assert "ENV ENVOY_DYNAMIC_MODULES_SEARCH_PATH=%s\n" % search in proxyv2


def test_rule_clusters_are_headless_services_with_port_equal_to_target_port():
    """The strict override sends to <pod IP>:<port of the cluster name>; istiod's EDS cluster of a
    headless Service holds <pod IP>:<targetPort>: the two must be the same port."""
    clusters = rule_clusters()
    assert clusters
    for c in clusters:
        direction, port, subset, host = c.split("|")
        assert direction == "outbound" and subset == ""
        name, namespace = host.split(".")[:2]
        svc = one("Service", name)
        assert svc["metadata"]["namespace"] == namespace
        assert svc["spec"]["clusterIP"] == "None", "headless: DNS answers the pod IPs"
        sp = next(p for p in svc["spec"]["ports"] if p["port"] == int(port))
        assert sp.get("targetPort", sp["port"]) == sp["port"], "Service port must equal targetPort"
        # the pods serve on that port
        dep = next(d for d in manifests() if d["kind"] == "Deployment"
                   and d["spec"]["template"]["metadata"]["labels"].items() >= svc["spec"]["selector"].items())
        ports = {p["containerPort"] for ctr in dep["spec"]["template"]["spec"]["containers"] for p in ctr.get("ports", [])}
        assert int(port) in ports
        dr = one("DestinationRule", name)
        assert dr["spec"]["host"] == host
        assert "outlierDetection" not in dr["spec"].get("trafficPolicy", {}), "Envoy ejection breaks strict overrides"
        # the VirtualService's header match on this cluster routes to the same service and port
        vs = one("VirtualService")
        route = next(h for h in vs["spec"]["http"]
                     if any(m["headers"]["x-llmproxy-cluster"]["exact"] == c for m in h.get("match", [])))
        dest = route["route"][0]["destination"]
        assert dest["host"] == host and dest["port"]["number"] == int(port)
        assert route["retries"]["retryOn"] == harness.RETRY_POLICY["retry_on"]
        # and the llmproxy load-balancing policy is patched onto that cluster
        patch = next(p for p in one("EnvoyFilter")["spec"]["configPatches"] if p["applyTo"] == "CLUSTER"
                     and p["match"]["cluster"] == {"service": host, "portNumber": int(port)})
        assert patch["patch"]["value"]["load_balancing_policy"] == harness.LLMPROXY_LB_POLICY


def validate(config, tmp_path):
    path = tmp_path / "istio-envoy.json"
    path.write_text(json.dumps(config))
    env = dict(os.environ, ENVOY_DYNAMIC_MODULES_SEARCH_PATH=str(harness.BUILD_DIR))
    p = subprocess.run([harness.envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart",
                        "-l", "info"], env=env, capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout + p.stderr


def istio_like_bootstrap():
    """What istiod builds for the gateway, reduced: a listener whose HCM ends in the router, the
    EnvoyFilter's HTTP filter inserted before it, and each rule's cluster as istiod names it with
    the DestinationRule's lb_policy (STATIC standing in for EDS), the CLUSTER patch merged in."""
    ef = one("EnvoyFilter")
    patches = ef["spec"]["configPatches"]
    clusters = []
    for c in rule_clusters():
        _, port, _, host = c.split("|")
        cluster = harness.static_cluster(c, ["127.0.0.1:%s" % port])
        cluster["lb_policy"] = one("DestinationRule", host.split(".")[0])["spec"]["trafficPolicy"]["loadBalancer"]["simple"]
        for p in patches:
            if p["applyTo"] == "CLUSTER" and p["match"]["cluster"]["service"] == host:
                assert p["patch"]["operation"] == "MERGE"
                cluster.update(p["patch"]["value"])  # top-level keys only: a plain merge
        clusters.append(cluster)
    boot = harness.envoy_bootstrap(10090, 19090, clusters, llmproxy_config=None, default_cluster=clusters[0]["name"])
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    http_patch = next(p for p in patches if p["applyTo"] == "HTTP_FILTER")
    assert http_patch["patch"]["operation"] == "INSERT_BEFORE"
    assert http_patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == hcm["http_filters"][-1]["name"]
    hcm["http_filters"].insert(len(hcm["http_filters"]) - 1, http_patch["patch"]["value"])
    return boot


def test_embedded_envoy_config_validates_with_the_module(module_built, tmp_path):
    rc, out = validate(istio_like_bootstrap(), tmp_path)
    assert rc == 0, out[-3000:]
    assert 'llmproxy: filter "llmproxy" configured' in out


def test_validation_would_catch_a_broken_embedded_config(module_built, tmp_path):
    boot = istio_like_bootstrap()
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"][0]["typed_config"]["filter_config"]["value"]["algorithm"] = "no_such_algorithm"
    rc, out = validate(boot, tmp_path)
    assert rc != 0 and "invalid llmproxy config" in out


def test_patched_cluster_retries_through_the_llmproxy_policy_despite_the_destination_rule(module_built, tmp_path):
    """The CLUSTER patch leaves istiod's lb_policy (from the DestinationRule) in the cluster next
    to load_balancing_policy. A real run shows which one Envoy uses: one of the two endpoints is
    dead, the route retries as the VirtualService says, and every retry must be re-picked by the
    llmproxy policy (lb_repicks), never chosen by LEAST_REQUEST (served_elsewhere)."""
    boot = istio_like_bootstrap()
    cluster = boot["static_resources"]["clusters"][0]
    assert cluster["lb_policy"] == "LEAST_REQUEST" and "load_balancing_policy" in cluster
    name = cluster["name"]
    vs_route = next(h for h in one("VirtualService")["spec"]["http"]
                    if any(m["headers"]["x-llmproxy-cluster"]["exact"] == name for m in h.get("match", [])))

    def start():
        listen_port, admin_port = harness.free_ports(2)
        dead_port = harness.refused_port()
        dead, live = "127.0.0.1:%d" % dead_port, servers.addr("live")
        cluster.update(harness.static_cluster(name, [dead, live]), lb_policy="LEAST_REQUEST")
        cluster.update(one("EnvoyFilter")["spec"]["configPatches"][1]["patch"]["value"])
        listener = boot["static_resources"]["listeners"][0]
        listener["address"]["socket_address"]["port_value"] = listen_port
        boot["admin"]["address"]["socket_address"]["port_value"] = admin_port
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        # explicit endpoints instead of DNS of the cluster's host (no cluster DNS here)
        hcm["http_filters"][0]["typed_config"]["filter_config"]["value"]["clusters"] = {name: {"endpoints": [dead, live]}}
        # the VirtualService's header route, as istiod writes it
        hcm["route_config"]["virtual_hosts"][0]["routes"].insert(0, {
            "match": {"prefix": "/", "headers": [{"name": "x-llmproxy-cluster",
                                                  "string_match": {"exact": name}}]},
            "route": {"cluster": name, "timeout": vs_route["timeout"],
                      "retry_policy": {"retry_on": vs_route["retries"]["retryOn"],
                                       "num_retries": vs_route["retries"]["attempts"]}}})
        return harness.Envoy(boot, tmp_path / "envoy")

    with harness.FakeUpstreams(["live"]) as servers:
        gw = harness.retry_on_port_clash(start)
        try:
            for i in range(12):
                status, headers, body, _ = harness.request(gw.port, "POST", "/v1/chat/completions",
                                                           harness.chat("qwen3-8b", "prompt %d %s" % (i, harness.random_text(200, i))))
                assert status == 200, body[:300]
                assert headers["x-served-by"] == "live"
            m = harness.metrics(gw)
            assert m.total("llmproxy_envoy_lb_repicks_total") >= 1, "the dead endpoint was never picked and retried"
            assert m.total("llmproxy_envoy_served_elsewhere_total") == 0
        finally:
            gw.close()
