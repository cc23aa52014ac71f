"""Lua unit tests (tests/nginx/lua/unit.lua) run by nginx's own LuaJIT in init_by_lua of a
one-process nginx that exits from init_worker; and examples/nginx.conf as shipped (only its
listen port changed) started for real. (`nginx -t` does not run init_by_lua.)"""

import os
import shutil
import subprocess
import time

from harness import LIB, NGINX, ROOT, free_port, metrics, request


def run_nginx(prefix, conf):
    return subprocess.run([NGINX, "-p", "%s/" % prefix, "-c", str(conf)], capture_output=True, text=True,
                          timeout=60)


HEAD = """load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
pid nginx.pid;
error_log stderr notice;
daemon off;
master_process off;
events {}
"""


def test_lua_units(tmp_path):
    lib = tmp_path / "libllmproxy.so"
    shutil.copy2(LIB, lib)
    conf = tmp_path / "unit.conf"
    conf.write_text(HEAD + """http {
    lua_package_path "%s/openresty/lib/?.lua;;";
    init_by_lua_block { LLMPROXY_UNIT_LIB = "%s"; dofile("%s/tests/nginx/lua/unit.lua") }
    init_worker_by_lua_block { io.stderr:write("UNIT-EXIT\\n"); os.exit(0) }
}
""" % (ROOT, lib, ROOT))
    r = run_nginx(tmp_path, conf)
    assert r.returncode == 0 and "LLMPROXY-UNIT OK" in r.stderr and "UNIT-EXIT" in r.stderr, r.stderr


def test_unit_failures_are_reported(tmp_path):
    """The harness above can fail: a broken expectation makes `nginx -t` fail."""
    conf = tmp_path / "unit.conf"
    conf.write_text(HEAD + """http {
    lua_package_path "%s/openresty/lib/?.lua;;";
    init_by_lua_block { error("1 unit test(s) failed") }
    init_worker_by_lua_block { os.exit(0) }
}
""" % ROOT)
    r = run_nginx(tmp_path, conf)
    assert r.returncode != 0 and "unit test(s) failed" in r.stderr


def test_example_config_as_shipped(tmp_path):
    """examples/nginx.conf with examples/config.json, only the port changed: nginx starts,
    two workers build their routers, the metrics location answers, graceful quit works."""
    (tmp_path / "build" / "nginx").mkdir(parents=True)
    shutil.copy2(LIB, tmp_path / "build" / "libllmproxy.so")
    os.symlink(ROOT / "openresty", tmp_path / "openresty")
    os.symlink(ROOT / "examples", tmp_path / "examples")
    port = free_port()
    text = (ROOT / "examples" / "nginx.conf").read_text()
    assert text.count("listen 127.0.0.1:8080 ") == 1
    conf = tmp_path / "example.conf"
    conf.write_text(text.replace("listen 127.0.0.1:8080 ", "listen 127.0.0.1:%d " % port))
    os.chmod(tmp_path, 0o755)
    r = run_nginx(tmp_path, conf)  # daemonizes, as the example says
    assert r.returncode == 0, r.stderr
    try:
        deadline = time.time() + 10
        m = None
        while time.time() < deadline:
            try:
                m = metrics(port)
                if m.value("llmproxy_nginx_workers") == 2:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        assert m and m.value("llmproxy_nginx_workers") == 2
        assert m.total("llmproxy_endpoint_in_flight_requests", cluster="qwen3-8b") == 0
        status, _, data = request(port, "POST", "/v1/chat/completions", {"model": "no-such", "messages": []})
        assert status in (400, 404), data
    finally:
        q = subprocess.run([NGINX, "-p", "%s/" % tmp_path, "-c", str(conf), "-s", "quit"], capture_output=True,
                           text=True, timeout=30)
        pidfile = tmp_path / "build" / "nginx" / "nginx.pid"
        deadline = time.time() + 10
        while pidfile.exists() and time.time() < deadline:
            time.sleep(0.05)
    assert q.returncode == 0, q.stderr
    assert not pidfile.exists()


def test_example_refuses_a_bad_library_config(tmp_path):
    (tmp_path / "build" / "nginx").mkdir(parents=True)
    shutil.copy2(LIB, tmp_path / "build" / "libllmproxy.so")
    os.symlink(ROOT / "openresty", tmp_path / "openresty")
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "config.json").write_text('{"algorithm": "fastest"}')
    r = run_nginx(tmp_path, ROOT / "examples" / "nginx.conf")  # fails before binding any port
    assert r.returncode != 0
    assert "invalid configuration" in r.stderr and "algorithm" in r.stderr, r.stderr
