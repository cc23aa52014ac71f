"""What the Envoy and nginx test harnesses share (tests/envoy/harness.py and
tests/nginx/harness.py build on it; the soak and the benchmarks use it through them): free ports,
processes started and stopped by their PID with bounded waits, waiting until something is ready,
the fake OpenAI-compatible upstreams (fake_openai.py) and the Metadata-Center server as
processes, one-shot HTTP requests, chat bodies, Prometheus text parsing, and the log tails of
failed tests. Everything listens on 127.0.0.1. Python stdlib only: the benchmarks run it without
pytest."""

import http.client
import json
import os
import random
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

COMMON = Path(__file__).resolve().parent
REPO = COMMON.parent.parent
BUILD_DIR = Path(os.environ.get("LLMPROXY_BUILD_DIR", REPO / "build"))
METADATA_CENTER_BIN = Path(os.environ.get("LLMPROXY_METADATA_CENTER",
                                          REPO / "target" / "release" / "llmproxy-metadata-center"))
FAKE_OPENAI = COMMON / "fake_openai.py"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"
GENERATE = "/generate"
LLAMA_COMPLETION = "/completion"


# ---------------------------------------------------------------------------------------------
# ports


def free_ports(n):
    """n distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def free_port():
    return free_ports(1)[0]


# Sockets holding the ports of refused_port(), open until the test process exits.
_REFUSING = []


def refused_port():
    """A 127.0.0.1 port that refuses connections for the rest of the test process: bound by a
    socket that never listens and stays open, so no server started later can take it. A port
    only found free and released (free_port) may be handed again to the next process that
    binds one, a gateway's listener say, which then answers for the "dead" endpoint: a request
    sent there loops back into the gateway."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _REFUSING.append(s)
    return s.getsockname()[1]


class PortClash(RuntimeError):
    """A port chosen as free was taken by someone else before our process bound it."""


def retry_on_port_clash(start, attempts=3):
    """Runs start() (which picks free ports itself) again when it raises PortClash."""
    for i in range(attempts):
        try:
            return start()
        except PortClash:
            if i == attempts - 1:
                raise


def raise_fd_limit(want=16384):
    """Thousands of concurrent client sockets (and the processes we start inherit the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, want) if hard != resource.RLIM_INFINITY else want
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# ---------------------------------------------------------------------------------------------
# processes


def stop(proc, sig=signal.SIGTERM, timeout=5, group=False):
    """Stops a process we started, by its PID: SIGCONT (a SIGSTOPped process would not act on
    anything else), then `sig`, up to `timeout` seconds, then SIGKILL — to its whole process group
    with `group` (a process started with start_new_session, e.g. nginx and its workers, also when
    the master is gone) — and a bounded wait."""
    if proc is None:
        return
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGCONT)
            proc.send_signal(sig)
            proc.wait(timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            pass
    if group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass


def readline_within(stream, timeout, what="process"):
    """The first line a process prints, waiting at most `timeout` seconds ("" at its end)."""
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise RuntimeError("%s printed nothing within %ss" % (what, timeout))
    return stream.readline()


def drain(stream):
    """Reads what a process still prints (so it never blocks on a full pipe), in the background."""
    threading.Thread(target=stream.read, daemon=True).start()


def wait_until(cond, timeout=5.0, what="condition", interval=0.05):
    """Polls cond() until it returns something true, and returns that; AssertionError after
    `timeout` seconds."""
    deadline = time.time() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.time() >= deadline:
            raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)


def port_open(port):
    """True when something accepts connections on 127.0.0.1:port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def wait_port(port, timeout=10):
    wait_until(lambda: port_open(port), timeout, "127.0.0.1:%d to accept connections" % port)


def wait_ready(proc, probe, log_tail, what, timeout=20):
    """Waits until probe() returns True for the process `proc` (probe may raise OSError, an
    HTTP or an assertion error while it starts; anything else it returns is the state reported
    on timeout). Raises with log_tail() when the process exits first (PortClash when its log says
    a port was taken) or after `timeout` seconds."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = log_tail()
            kind = PortClash if "Address already in use" in tail else RuntimeError
            raise kind("%s exited with %s:\n%s" % (what, proc.returncode, tail))
        try:
            last = probe()
            if last is True:
                return
        except (OSError, http.client.HTTPException, AssertionError, ValueError) as e:
            last = e
        time.sleep(0.05)
    raise RuntimeError("%s not ready after %ss (last: %r):\n%s" % (what, timeout, last, log_tail()))


class Closing:
    """`with X(...) as x:` stops x (close()) at the end of the block, also on failure."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LoggedProcess(Closing):
    """A process started by a harness (Envoy, nginx), its Popen in .proc and its log file in
    .log_path: the log's tail is attached to the report of a failed test that used it (see
    log_tails_on_failure)."""

    kind = "process"
    proc = None
    log_path = None

    def log_text(self):
        try:
            return Path(self.log_path).read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    def log_tail(self, n=60):
        return "\n".join(self.log_text().splitlines()[-n:]) or "(no log at %s)" % self.log_path


def log_tails_on_failure(item, call):
    """A pytest_runtest_makereport hook wrapper (conftest.py: wrap it in
    pytest.hookimpl(hookwrapper=True)): a failed test's report gets the log tail of every
    LoggedProcess among its fixtures."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed:
        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, LoggedProcess):
                rep.sections.append(("%s log of fixture %s (tail)" % (value.kind, name), value.log_tail()))


class FakeUpstreams(Closing):
    """The fake OpenAI-compatible upstreams (tests/common/fake_openai.py, see its doc for what they
    answer and the x-test-* request headers that control it): one process, one 127.0.0.1 port per
    name, any free one unless `ports` gives it. Its stderr goes to `stderr` (a file) when given."""

    def __init__(self, names, ports=None, stderr=None, timeout=10):
        specs = ["%s=%d" % (n, (ports or {}).get(n, 0)) for n in names]
        self.proc = subprocess.Popen([sys.executable, str(FAKE_OPENAI)] + specs, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            line = readline_within(self.proc.stdout, timeout, "fake upstreams")
        except Exception:
            self.close()
            raise
        if not line.startswith("READY "):
            self.close()
            raise PortClash("fake upstreams did not start: %r" % line)
        self.ports = json.loads(line[6:])

    def addr(self, name):
        return "127.0.0.1:%d" % self.ports[name]

    def name_of(self, addr):
        return next((n for n in self.ports if self.addr(n) == addr), None)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # it exits when its stdin closes
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        stop(self.proc)


class MetadataCenter(Closing):
    """Our llmproxy-metadata-center on 127.0.0.1: `port` 0 takes any free port, which start()
    keeps, so kill() then start() brings it back at the same address."""

    def __init__(self, port=0, binary=METADATA_CENTER_BIN, timeout=10):
        self.port, self.binary, self.timeout = port, Path(binary), timeout
        self.proc = None
        self.start()

    def start(self):
        if not self.binary.exists():
            raise RuntimeError("%s missing: run `make build`" % self.binary)
        self.proc = subprocess.Popen([str(self.binary), "run", "--host", "127.0.0.1", "--port", str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            line = readline_within(self.proc.stdout, self.timeout, "metadata-center")
        except Exception:
            stop(self.proc)
            raise
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if not m:
            stop(self.proc)
            raise PortClash("metadata-center did not start: %r" % line)
        self.port = int(m.group(1))
        drain(self.proc.stdout)

    def kill(self):
        self.proc.kill()
        self.proc.wait(5)

    def close(self):
        stop(self.proc)

    def saves(self):
        """`/v1/cache/save` calls the server has handled (its own /metrics)."""
        return metadata_center_saves(self.port)


def metadata_center_saves(port):
    """`/v1/cache/save` calls handled by the metadata-center on `port` (its /metrics)."""
    _, _, data, _ = request(port, "GET", "/metrics", timeout=5)
    m = re.search(rb'^metadata_center_cache_ops_total\{op="save"\} (\d+)', data, re.M)
    return int(m.group(1)) if m else 0


def steady_value(read, what, quiet, timeout=10):
    """`read()` once it has not changed for `quiet` seconds (counters that other threads or
    processes are still moving)."""
    deadline = time.time() + timeout
    last = read()
    while time.time() < deadline:
        time.sleep(quiet)
        now = read()
        if now == last:
            return now
        last = now
    raise AssertionError("%s kept moving for %d s" % (what, timeout))


def settled_saves(port, quiet=0.5, timeout=10):
    """The metadata-center's save count once it has settled (gateways send their saves from a
    background thread)."""
    return steady_value(lambda: metadata_center_saves(port), "the save count", quiet, timeout)


# ---------------------------------------------------------------------------------------------
# HTTP and JSON


def request(port, method, path, body=None, headers=None, timeout=30, close=False):
    """One HTTP/1.1 request on a fresh connection (`close`: with `connection: close`); a dict or
    list body is sent as JSON. Returns (status, headers lower-cased, body bytes, seconds)."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    hdrs = {"content-type": "application/json"}
    if close:
        hdrs["connection"] = "close"
    hdrs.update(headers or {})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.perf_counter()
    try:
        c.request(method, path, body=body, headers=hdrs)
        r = c.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data, time.perf_counter() - t0
    finally:
        c.close()


def chat(model, text, stream=False, **extra):
    """A chat completion body: a system message and the user's `text`."""
    body = {"model": model, "messages": [{"role": "system", "content": "You are a test."},
                                         {"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
    body.update(extra)
    return body


def random_text(n, seed=None):
    """n characters of words, the same for the same seed (distinct prompts, or shared prefixes)."""
    rnd = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "lambda", "zeta"]
    out, size = [], 0
    while size < n:
        w = rnd.choice(words) + str(rnd.randint(0, 9999))
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n]


def read_sse(readline, t0, on_event=None):
    """The `data:` events of a Server-Sent Events body read line by line (readline() -> bytes, b""
    at its end) up to `data: [DONE]`: (payloads, arrival seconds since perf_counter() t0).
    on_event(payloads) runs as each one arrives (checks in the middle of a stream)."""
    events, arrivals = [], []
    while True:
        line = readline()
        if not line:
            break
        line = line.strip()
        if line.startswith(b"data: "):
            arrivals.append(time.perf_counter() - t0)
            events.append(line[6:])
            if on_event:
                on_event(events)
            if line == b"data: [DONE]":
                break
    return events, arrivals


# ---------------------------------------------------------------------------------------------
# the fleet of the end-to-end suites

# pool -> fake upstream names, the same on both hosts (tests/envoy/conftest.py,
# tests/nginx/conftest.py); pool_d also has an endpoint where nothing listens.
POOLS = {
    "pool_a": ["a1", "a2", "a3"],
    "pool_b": ["b1", "b2"],
    "pool_d": ["d1", "d2"],
}


def pools_config(servers, dead, max_body, models, clusters=None):
    """The library config of the end-to-end suites: m-a (pool_a, vllm), m-b (pool_b, sglang), m-d
    (pool_d, `dead` first), m-fb (pool_fb: pool_b's servers as a cluster of their own, for
    `check_cache_feedback`) and the host's own `models` (name -> rule list); endpoints at
    servers.addr(name), and the host's own `clusters` (name -> endpoints)."""
    endpoints = {pool: [servers.addr(n) for n in names] for pool, names in POOLS.items()}
    endpoints["pool_d"].insert(0, dead)
    # What check_cache_feedback teaches the gateway (an engine that evicts a prefix a second
    # after its use: cache trust, learned capacity) belongs to a cluster's endpoints; on a
    # cluster of its own it stays out of the affinity checks on m-b.
    endpoints["pool_fb"] = list(endpoints["pool_b"])
    endpoints.update(clusters or {})
    rules = {"m-a": [{"scene_name": "chat-a", "cluster": "pool_a", "backend": "vllm"}],
             "m-b": [{"scene_name": "chat-b", "cluster": "pool_b", "backend": "sglang"}],
             "m-d": [{"scene_name": "chat-d", "cluster": "pool_d", "backend": "vllm"}],
             "m-fb": [{"scene_name": "feedback", "cluster": "pool_fb", "backend": "sglang"}]}
    rules.update(models)
    return {
        "protocol": "openai",
        "algorithm": "inference_lb",
        "model_mapping_rule": {model: {"rules": r} for model, r in rules.items()},
        "clusters": {pool: {"endpoints": eps} for pool, eps in endpoints.items()},
        "max_body_bytes": max_body,
    }


def sse_payloads(body):
    """The `data:` payloads of a whole Server-Sent Events body (bytes): JSON decoded, `[DONE]` as
    the string "[DONE]"."""
    out = []
    for line in body.split(b"\n"):
        line = line.strip()
        if line.startswith(b"data:"):
            data = line[5:].strip()
            out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


def check_forced_stream_usage(send, log_path, page, model):
    """`force_stream_usage` through a gateway: `send(body, headers) -> (status, body bytes)`
    posts a chat request, `page()` is its metrics. A streamed request whose client did not ask
    for usage reaches the server with `stream_options.include_usage` and the client gets no
    usage chunk; one that asked gets it; both answers' tokens reach the request log (at
    `log_path`) and llmproxy_tokens_total of the endpoint that answered."""
    run = "%x" % random.getrandbits(32)
    quiet, asked = run + "-usage-forced", run + "-usage-asked"
    status, data = send(chat(model, "count my tokens %s" % run, stream=True),
                        {"x-request-id": quiet, "x-test-chunks": "3"})
    assert status == 200, data
    events = sse_payloads(data)
    assert len(events) == 4 and events[-1] == "[DONE]", events
    assert events[0]["stream_options"] == {"include_usage": True}, "the server was asked for usage"
    assert not any("usage" in e for e in events[:-1]), "the usage chunk reached a client that did not ask"
    status, data = send(chat(model, "and mine %s" % run, stream=True,
                             stream_options={"include_usage": True, "continuous_usage_stats": False}),
                        {"x-request-id": asked, "x-test-chunks": "3"})
    assert status == 200, data
    events = sse_payloads(data)
    assert len(events) == 5 and events[-2]["choices"] == [], events
    assert events[-2]["usage"]["completion_tokens"] == 3
    assert events[0]["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}
    lines = request_log_lines(log_path, {quiet, asked})
    for rid, line in lines.items():
        assert line["completion_tokens"] == 3 and line["prompt_tokens"] > 10, line
        assert "cached_tokens" not in line and line["stream"] is True, line  # (none reported)

    def counted():
        # (a native nginx page merges the other workers' routers as published each second)
        m = page()
        return all(m.total("llmproxy_tokens_total", model=model, endpoint=l["endpoint"], kind="completion") >= 3
                   for l in lines.values()) and m.total("llmproxy_tokens_total", model=model, kind="prompt") >= sum(
            l["prompt_tokens"] for l in lines.values())
    wait_until(counted, timeout=5, what="llmproxy_tokens_total of both answers")


def responses_answer(data):
    """(id, served_by) of a Responses answer: a response object, or the typed events of one
    (the id and the echo in `response.created`; the stream must end with `response.completed`)."""
    if not data.lstrip().startswith(b"event:") and not data.lstrip().startswith(b"data:"):
        doc = json.loads(data)
        return doc["id"], doc["served_by"]
    events = [json.loads(line[5:]) for line in data.split(b"\n") if line.startswith(b"data:")]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    created = events[0]["response"]
    return created["id"], created["served_by"]


def check_response_chains(send, page, model):
    """The Responses API through a gateway: `send(body, headers, path) -> (status, body bytes)`,
    `page()` its metrics. A conversation that names each previous answer (`previous_response_id`)
    must go to the server that stored it: the fake upstream, like vLLM and SGLang, keeps its
    answers per server and answers 404 for one it does not have. Eight turns, streamed and not,
    with nothing else in common (a fresh input each), all on the first turn's server; an id no
    server stored is the server's own 404. Then requests on the last stored answer (GET, its
    input items, cancel, DELETE: `send(None, {}, path, method)`) on that same server; an id the
    gateway never saw passes through."""
    start = page()
    previous, home = None, None
    for i in range(8):
        body = {"model": model, "input": random_text(200, seed=random.getrandbits(32)), "stream": i % 2 == 1}
        if previous:
            body["previous_response_id"] = previous
        status, data = send(body, {}, RESPONSES)
        assert status == 200, "turn %d: %s" % (i, data[:300])
        previous, served = responses_answer(data)
        home = home or served
        assert served == home, "turn %d went to %s, the chain is on %s" % (i, served, home)

    def chains(result):
        return page().total("llmproxy_response_chains_total", result=result) \
            - start.total("llmproxy_response_chains_total", result=result)
    # (a native nginx page merges the other workers' routers as published each second)
    wait_until(lambda: chains("pinned") >= 7, timeout=5, what="7 pinned turns")
    status, data = send({"model": model, "input": "hi", "previous_response_id": "resp_nowhere"}, {}, RESPONSES)
    assert status == 404 and "resp_nowhere" in json.loads(data)["error"]["message"], data
    wait_until(lambda: chains("unknown") >= 1, timeout=5, what="1 unknown chain")

    # Requests on the stored answer (a client polling a background answer, reading its items,
    # cancelling, deleting it) go to the server that stored it; they have no body.
    def stored(result):
        return page().total("llmproxy_stored_response_requests_total", result=result) \
            - start.total("llmproxy_stored_response_requests_total", result=result)

    def on_answer(method, rid, suffix=""):
        status, data = send(None, {}, "%s/%s%s" % (RESPONSES, rid, suffix), method)
        return status, json.loads(data)
    for _ in range(4):
        status, got = on_answer("GET", previous)
        assert (status, got["id"], got["served_by"]) == (200, previous, home), got
    status, got = on_answer("GET", previous, "?stream=false")
    assert (status, got["served_by"]) == (200, home), got
    status, got = on_answer("GET", previous, "/input_items")
    assert (status, got["object"], got["served_by"]) == (200, "list", home), got
    status, got = on_answer("POST", previous, "/cancel")
    assert (status, got["status"], got["served_by"]) == (200, "cancelled", home), got
    status, got = on_answer("DELETE", previous)
    assert (status, got["deleted"], got["served_by"]) == (200, True, home), got
    # gone from its server, which says so itself
    status, got = on_answer("GET", previous)
    assert (status, got["served_by"]) == (404, home), got
    wait_until(lambda: stored("pinned") >= 9, timeout=5, what="9 pinned requests on stored answers")
    # an id this gateway never saw passes through untouched: a server's own 404
    status, got = on_answer("GET", "resp_nowhere")
    assert status == 404 and got["served_by"] and "resp_nowhere" in got["error"]["message"], got
    wait_until(lambda: stored("unknown") >= 1, timeout=5, what="1 passed-through stored answer")


def check_stored_answer_found_elsewhere(port_a, port_b, page_b, model, mc_port):
    """A Responses answer made through gateway A (port `port_a`), then polled (GET
    /v1/responses/{id}, no body) through gateway B (`port_b`, remote cache lookups on, `page_b()`
    its metrics), which never saw it: B asks the Metadata-Center (on `mc_port`, where A saved the
    id) and sends every poll to the server that stored the answer. An id no one knows passes
    through B untouched: a server's own 404."""
    status, _, data, _ = request(port_a, "POST", RESPONSES, {"model": model, "input": random_text(300),
                                                              "background": True})
    assert status == 200, data
    rid, home = responses_answer(data)
    settled_saves(mc_port)  # (A saves from its sync thread: instant fake engines outrun it)
    start = page_b()

    def stored(result):
        return page_b().total("llmproxy_stored_response_requests_total", result=result) \
            - start.total("llmproxy_stored_response_requests_total", result=result)
    for _ in range(3):
        status, _, data, _ = request(port_b, "GET", "%s/%s" % (RESPONSES, rid), close=True)
        got = json.loads(data)
        assert (status, got["id"], got["served_by"]) == (200, rid, home), got
    wait_until(lambda: stored("pinned") >= 3, timeout=5, what="3 pinned polls")
    status, _, data, _ = request(port_b, "GET", RESPONSES + "/resp_nowhere", close=True)
    assert status == 404 and json.loads(data)["served_by"], data
    wait_until(lambda: stored("unknown") >= 1, timeout=5, what="a passed-through poll")


def check_anthropic_messages(send, page, model):
    """The Anthropic Messages API (`/v1/messages`, as Claude Code sends it) through a gateway:
    `send(body, headers, path) -> (status, body bytes)`, `page()` its metrics. A conversation
    of a long shared system prompt, whose every turn resends the previous answer (text and a
    tool_use block) and a tool_result, stays on one server; a streamed answer is learned as the
    next turn's prefix (`llmproxy_learned_response_chunks_total`); the usage is counted."""
    start = page()
    system = [{"type": "text", "text": random_text(3000, seed=random.getrandbits(32)),
               "cache_control": {"type": "ephemeral"}}]
    messages = [{"role": "user", "content": [{"type": "text", "text": "fix the bug in a.py"}]}]
    served = set()
    for turn in range(6):
        body = {"model": model, "max_tokens": 256, "system": system, "messages": messages, "stream": turn % 2 == 0,
                "tools": [{"name": "read", "input_schema": {"type": "object"}}]}
        status, data = send(body, {"x-test-chunks": "40"}, MESSAGES)
        assert status == 200, data[:300]
        if turn % 2 == 0:
            events = [json.loads(line[5:]) for line in data.split(b"\n") if line.startswith(b"data: {")]
            assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop", events
            served.add(events[0]["message"]["served_by"])
            text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
        else:
            answer = json.loads(data)
            served.add(answer["served_by"])
            text = answer["content"][0]["text"]
        messages += [{"role": "assistant", "content": [
                         {"type": "text", "text": text},
                         {"type": "tool_use", "id": "t%d" % turn, "name": "read", "input": {"path": "a.py"}}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t%d" % turn,
                                                   "content": "line %d" % turn}]}]
    assert len(served) == 1, "the conversation went to %s" % served

    def grew(name):
        return page().total(name) - start.total(name)
    # (a native nginx page merges the other workers' routers as published each second)
    wait_until(lambda: grew("llmproxy_learned_response_chunks_total") > 0, timeout=5, what="learned answers")
    wait_until(lambda: page().total("llmproxy_tokens_total", kind="prompt")
               - start.total("llmproxy_tokens_total", kind="prompt") > 6 * 700, timeout=5, what="6 prompts' tokens")


def check_sglang_generate(send, page, model):
    """SGLang's native `/generate` through a gateway: `send(body, headers, path) -> (status, body
    bytes)`, `page()` its metrics. A multi-turn client (an RL rollout, an agent) resends the whole
    text each turn: prompt, answer, new input; its turns stay on one server, streamed answers
    (each event the whole text so far) are learned, the `meta_info` token counts are counted.
    A rollout of token ids (each turn the ids, the answer's `output_ids`, new ids) stays on one
    server and its output ids are learned. Without a model in the body, a gateway routing
    several models answers 400."""
    start = page()
    text = random_text(3000, seed=random.getrandbits(32))
    served = set()
    for turn in range(6):
        body = {"model": model, "text": text, "sampling_params": {"max_new_tokens": 64}, "stream": turn % 2 == 0}
        status, data = send(body, {"x-test-chunks": "40"}, GENERATE)
        assert status == 200, data[:300]
        if body["stream"]:
            events = [json.loads(line[5:]) for line in data.split(b"\n") if line.startswith(b"data: {")]
            assert data.rstrip().endswith(b"data: [DONE]"), data[-200:]
            answer = events[-1]
        else:
            answer = json.loads(data)
        served.add(answer["served_by"])
        text += answer["text"] + " next input %d: " % turn
    assert len(served) == 1, "the conversation went to %s" % served
    # An RL rollout of token ids: each turn resends the ids, the answer's output_ids, new ids.
    # Its output ids learned, the prefix index matches all of turns 1-3 on their server;
    # without them, only the previous prompt (about 0.77 of each on average).
    ratio = "llmproxy_decision_cache_ratio"
    ids = [random.randrange(1, 50000) for _ in range(800)]
    homes = set()
    for turn in range(4):
        if turn == 1:
            before = settled_totals(page, [ratio + "_sum", ratio + "_count"])
        body = {"model": model, "input_ids": ids, "stream": turn % 2 == 1}
        status, data = send(body, {"x-test-chunks": "300"}, GENERATE)
        assert status == 200, data[:300]
        if body["stream"]:
            answer = [json.loads(line[5:]) for line in data.split(b"\n") if line.startswith(b"data: {")][-1]
        else:
            answer = json.loads(data)
        homes.add(answer["served_by"])
        ids = ids + answer["output_ids"] + [random.randrange(1, 50000) for _ in range(20)]
        # (nginx learns an answer in its log phase, after the last byte went out: a client of
        # this instant fake engine could send its next turn first; a rollout's tool call and
        # a real engine's generation leave it the time)
        time.sleep(0.2)
    assert len(homes) == 1, "a rollout of token ids went to %s" % homes
    wait_until(lambda: page().total(ratio + "_count") >= before[1] + 3, timeout=5, what="3 more picks")
    matched = (settled_total(page, ratio + "_sum") - before[0]) / 3
    assert matched > 0.9, "turns 1-3 matched %.2f of their prompt on average" % matched
    status, data = send({"text": "which model?"}, {}, GENERATE)
    assert status == 400 and "model" in json.loads(data)["error"]["message"], data
    # Text Generation Inference's /generate (`inputs`; a gateway routing one model needs no
    # `model`) is routed by its prompt as well, not refused
    tgi = random_text(2000, seed=random.getrandbits(32))
    homes = set()
    for _ in range(3):
        status, data = send({"model": model, "inputs": tgi, "parameters": {"max_new_tokens": 8}}, {}, GENERATE)
        assert status == 200, data[:300]
        homes.add(json.loads(data)["served_by"])
    assert len(homes) == 1, "one TGI prompt went to %s" % homes

    wait_until(lambda: page().total("llmproxy_tokens_total", kind="prompt")
               - start.total("llmproxy_tokens_total", kind="prompt") > 6 * 700, timeout=5, what="6 prompts' tokens")


def check_llama_completion(send, page, model):
    """llama.cpp server's native `/completion` through a gateway: `send(body, headers, path)`,
    `page()` its metrics. A multi-turn client resends the whole text (prompt, answer, new input)
    each turn: its turns stay on one server, its answers (streamed: each event the new text, no
    [DONE]) are learned, and their counts read (`tokens_evaluated`, `timings.cache_n` as cached
    tokens: the engine's word feeds llmproxy_cache_prediction_error). Without a model in the body,
    a gateway routing several models answers 400."""
    start = page()
    text = random_text(3000, seed=random.getrandbits(32))
    served = set()
    for turn in range(6):
        body = {"model": model, "prompt": text, "n_predict": 64, "cache_prompt": True, "stream": turn % 2 == 0}
        status, data = send(body, {"x-test-chunks": "40", "x-test-cached-tokens": "500"}, LLAMA_COMPLETION)
        assert status == 200, data[:300]
        if body["stream"]:
            events = [json.loads(line[5:]) for line in data.split(b"\n") if line.startswith(b"data: {")]
            assert events[-1]["stop"] and b"[DONE]" not in data, data[-200:]
            answer = "".join(e["content"] for e in events)
            served.add(events[-1]["served_by"])
        else:
            doc = json.loads(data)
            answer = doc["content"]
            served.add(doc["served_by"])
        text += answer + " next input %d: " % turn
    assert len(served) == 1, "the conversation went to %s" % served
    status, data = send({"prompt": "which model?"}, {}, LLAMA_COMPLETION)
    assert status == 400 and "model" in json.loads(data)["error"]["message"], data

    def grew(name, **labels):
        return page().total(name, **labels) - start.total(name, **labels)
    wait_until(lambda: grew("llmproxy_learned_response_chunks_total") > 0, timeout=5, what="learned answers")
    wait_until(lambda: grew("llmproxy_tokens_total", kind="cached") >= 6 * 500, timeout=5, what="6 answers' cached tokens")
    wait_until(lambda: grew("llmproxy_cache_prediction_error_count") >= 6, timeout=5, what="6 answers' prediction errors")


def check_media_parts(send, page, model):
    """Images, audio and video in a prompt (`image_url`, `input_audio`, `video_url` parts) through a
    gateway: `send(body, headers, path)`, `page()` its metrics. Each media part counts
    `media_part_tokens` (576 by default) tokens of prefill in the prompt's length
    (`llmproxy_prompt_chars_total`, 4 characters a token); a request showing the same image again
    goes where the first went."""
    before = settled_total(page, "llmproxy_prompt_chars_total")
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 4000}}
    audio = {"type": "input_audio", "input_audio": {"data": "UklGR" + "B" * 2000, "format": "wav"}}
    system = random_text(2000, seed=random.getrandbits(32))
    body = {"model": model, "messages": [{"role": "system", "content": system},
                                         {"role": "user", "content": [image, audio, {"type": "text", "text": "what?"}]}]}
    status, data = send(body, {}, CHAT)
    assert status == 200, data[:300]
    first = json.loads(data)["served_by"]
    # two media parts: 2 x 576 tokens of 4 characters, beside the text's ~2,000
    wait_until(lambda: page().total("llmproxy_prompt_chars_total") - before >= 2 * 576 * 4 + 2000,
               timeout=5, what="the media parts' tokens in the prompt's length")
    assert page().total("llmproxy_prompt_chars_total") - before < 2 * 576 * 4 + 2200
    for _ in range(3):
        status, data = send(body, {}, CHAT)
        assert status == 200 and json.loads(data)["served_by"] == first, data[:300]


class PickMeter:
    """What each pick of a gateway matched and how long its prompt was, read from its metrics
    (`page()`): `ask(send, body)` sends one chat request and answers (endpoint, share of the
    prompt the pick found cached there, the prompt's length in characters)."""
    RATIO = "llmproxy_decision_cache_ratio"

    def __init__(self, page):
        self.page = page
        self.last = self.totals()

    def totals(self):
        return settled_totals(self.page, [self.RATIO + "_sum", self.RATIO + "_count", "llmproxy_prompt_chars_total"])

    def ask(self, send, body):
        status, data = send(body, {}, CHAT)
        assert status == 200, data[:300]
        wait_until(lambda: self.page().total(self.RATIO + "_count") >= self.last[1] + 1, timeout=5, what="the pick's cache ratio")
        now = self.totals()
        matched, chars = now[0] - self.last[0], now[2] - self.last[2]
        self.last = now
        return json.loads(data)["served_by"], matched, chars

    def state(self):
        """What the gateway's page shows that moves a pick away from a cached prefix: loads,
        ejections, a cache trust below 1, a residency (for an assertion's message)."""
        m = self.page()
        shown = {"llmproxy_endpoint_in_flight_requests": bool, "llmproxy_endpoint_prefill_chars": bool,
                 "llmproxy_endpoint_ejected": bool, "llmproxy_endpoint_cache_trust": lambda v: v != 1.0,
                 "llmproxy_endpoint_cache_residency_seconds": lambda v: True}
        return ["%s%s=%g" % (n[len("llmproxy_endpoint_"):], sorted(l.items()), v)
                for n, l, v in m.samples if n in shown and shown[n](v)]


def check_tool_definitions(send, page, model):
    """Tool definitions (`tools`) through a gateway: `send(body, headers, path)`, `page()` its
    metrics. The engine's chat template renders them into the prompt after the system prompt;
    the gateway does too: their size counts in the prompt's length (`llmproxy_prompt_chars_total`),
    a new session of an agent matches its tools where an earlier session left them
    (`llmproxy_decision_cache_ratio`) and goes there, and an agent with other tools (the same
    system prompt) matches nothing."""
    def tools(seed):
        return [{"type": "function", "function": {
            "name": "tool_%d" % i, "description": random_text(1500, seed=seed + i),
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}} for i in range(4)]

    def body(tools, user):
        return {"model": model, "messages": [{"role": "system", "content": "You are a coding agent."},
                                             {"role": "user", "content": user}], "tools": tools}

    meter = PickMeter(page)
    mine = tools(random.getrandbits(32))
    home, matched, chars = meter.ask(send, body(mine, "fix a.py"))
    assert matched < 0.2, "a new agent's tools matched %.2f of its prompt" % matched
    assert chars > len(json.dumps(mine)), "the prompt's length (%d) leaves its tools out" % chars
    served, matched, _ = meter.ask(send, body(mine, "now write the tests of b.py"))
    assert matched > 0.8, "a session of the same agent matched %.2f of its prompt" % matched
    assert served == home, "a session of the same agent went to %s, its tools are on %s" % (served, home)
    _, matched, _ = meter.ask(send, body(tools(random.getrandbits(32)), "fix a.py"))
    assert matched < 0.2, "an agent with other tools matched %.2f of its prompt" % matched


def check_cache_salt(send, page, model):
    """Cache domains through a gateway: `send(body, headers, path)`, `page()` its metrics. The
    engine shares no KV cache between requests of different `cache_salt` (vLLM; SGLang's
    `extra_key`), so the gateway matches a prompt only where the same prompt ran under the same
    salt (`llmproxy_decision_cache_ratio`)."""
    prompt = random_text(6000, seed=random.getrandbits(32))

    def body(salt):
        return {"model": model, "messages": [{"role": "user", "content": prompt}], "cache_salt": salt}

    meter = PickMeter(page)
    home, matched, _ = meter.ask(send, body("tenant-a"))
    assert matched < 0.2, "a new prompt matched %.2f" % matched
    served, matched, _ = meter.ask(send, body("tenant-a"))
    assert matched > 0.8 and served == home, "the same prompt and salt matched %.2f on %s (first on %s); %s" % (
        matched, served, home, meter.state())
    _, matched, _ = meter.ask(send, body("tenant-b"))
    assert matched < 0.2, "the same prompt under another salt matched %.2f" % matched


def settled_totals(page, names, quiet=1.2, timeout=10):
    """The totals of counters `names` on `page()` once none has moved for `quiet` seconds (a
    native nginx page merges the other workers' routers as they publish them, each second):
    one wait for all of them."""
    return list(steady_value(lambda: tuple(page().total(n) for n in names), ", ".join(names), quiet, timeout))


def settled_total(page, name, quiet=1.2, timeout=10):
    """The total of counter `name` on `page()` once it has settled (see `settled_totals`)."""
    return settled_totals(page, [name], quiet, timeout)[0]


def check_cache_feedback(send, page, model):
    """`cache_feedback` (default on) through a gateway: `send(body, headers) -> (status, body
    bytes)` posts a chat request, `page()` is its metrics. Requests that share a long prefix stick
    to one endpoint whose engine reports (x-test-cached-tokens) that it had nothing cached: every
    answer is measured in llmproxy_cache_prediction_error. As long as no answer ever reported a
    cache hit, those zeros are not the engine's word (a server that fills the field without
    measuring it) and every cache trust stays 1; once answers have reported hits, the endpoint's
    cache trust falls below 1 with the zeros, and an answer whose engine had the whole prompt
    cached raises it again. Needs a model (m-fb) whose endpoints no answer has reported cached
    tokens for yet, and that no other check routes to: what it teaches stays with them."""
    prefix = random_text(4000, seed=random.getrandbits(32))

    def ask(i, cached):
        status, data = send(chat(model, prefix + " question %d?" % i), {"x-test-cached-tokens": str(cached)})
        assert status == 200, data
        return json.loads(data)["served_by"]

    def trusts_now():
        return [v for _, v in page().select("llmproxy_endpoint_cache_trust")]

    start = page()
    served = {ask(i, 0) for i in range(8)}
    assert len(served) == 1, "the shared prefix went to %s" % served
    wait_until(lambda: page().total("llmproxy_cache_prediction_error_count")
               - start.total("llmproxy_cache_prediction_error_count") >= 8,
               timeout=5, what="8 answers in llmproxy_cache_prediction_error")
    assert trusts_now() and all(t == 1.0 for t in trusts_now()), \
        "zeros from an engine that never reported a hit lowered a trust: %s" % trusts_now()
    # the engine reports hits (every process sees some: 16 answers, 2^-16 to miss a worker)
    served |= {ask(i, 10 ** 9) for i in range(100, 116)}
    assert len(served) == 1, "the shared prefix went to %s" % served
    # all 24 measured before the baseline (a native nginx page publishes each worker's each second)
    wait_until(lambda: page().total("llmproxy_cache_prediction_error_count")
               - start.total("llmproxy_cache_prediction_error_count") >= 24,
               timeout=5, what="24 answers in llmproxy_cache_prediction_error")

    before = page()
    served |= {ask(i, 0) for i in range(8)}
    assert len(served) == 1, "the shared prefix went to %s" % served

    def measured():
        m = page()
        errors = m.total("llmproxy_cache_prediction_error_count") - before.total("llmproxy_cache_prediction_error_count")
        err_sum = m.total("llmproxy_cache_prediction_error_sum") - before.total("llmproxy_cache_prediction_error_sum")
        trusts = [v for _, v in m.select("llmproxy_endpoint_cache_trust")]
        return m, errors, err_sum, trusts
    # (a native nginx page merges the other workers' routers as published each second)
    wait_until(lambda: measured()[1] >= 8, timeout=5, what="8 answers in llmproxy_cache_prediction_error")
    m, errors, err_sum, trusts = measured()
    # the 8 were expected mostly cached (the index claimed ≥ 90 % of the prompt), the engine
    # had none: a large error for each, and the endpoint's trust down by 1/32 per answer
    assert err_sum > 7 * 0.5, (errors, err_sum)
    # (per process: with several workers, the one that took the most of the 8 has ≤ (31/32)^4)
    assert min(trusts) < 0.9, "no endpoint's cache trust fell: %s" % trusts
    # answers whose engine had the whole prompt raise it again. The trust is per process: with
    # several workers an answer that lands on a worker none of the 8 reached (trust still 1)
    # raises nothing, so ask until one lands where the trust fell (10 tries: a miss each time
    # is 2^-10 with two workers)
    for i in range(8, 18):
        ask(i, 10 ** 9)
        try:
            wait_until(lambda: sum(measured()[3]) > sum(trusts), timeout=1.5, what="the cache trust to rise again")
            return
        except AssertionError:
            continue
    raise AssertionError("no answer with the whole prompt cached raised a cache trust: %s" % measured()[3])


def request_log_lines(path, ids, timeout=10):
    """The lines (JSON) of the request log at `path` (llmproxy `log.path`) whose request_id is in
    `ids`, once all are there."""
    deadline = time.time() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        found = {}
        for line in text.splitlines():
            rec = json.loads(line)
            if rec.get("request_id") in ids:
                found[rec["request_id"]] = rec
        if len(found) == len(ids) or time.time() > deadline:
            assert len(found) == len(ids), (sorted(found), text[-2000:])
            return found


# ---------------------------------------------------------------------------------------------
# Prometheus text

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Metrics:
    """A Prometheus text page: samples by name and labels (select, total, value), or by the text
    that names them on the page (m['name{a="b"}'])."""

    def __init__(self, text):
        self.text = text
        self.samples = []
        self.by_key = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = SAMPLE.match(line)
            assert m, "not a Prometheus sample: %r" % line
            labels = dict(LABEL.findall(m.group(2) or ""))
            self.samples.append((m.group(1), labels, float(m.group(3))))
            self.by_key[line.rpartition(" ")[0].rstrip()] = float(m.group(3))

    def __getitem__(self, key):
        return self.by_key[key]

    def select(self, name, **labels):
        return [(l, v) for n, l, v in self.samples
                if n == name and all(l.get(k) == str(val) for k, val in labels.items())]

    def total(self, name, **labels):
        """Sum over every label not given (every worker, endpoint, ...)."""
        return sum(v for _, v in self.select(name, **labels))

    def value(self, name, **labels):
        found = self.select(name, **labels)
        assert len(found) == 1, "%s %s: %d samples" % (name, labels, len(found))
        return found[0][1]

    def workers(self):
        """The worker="<pid>" labels of the routers on the page (nginx merges one per worker)."""
        return sorted({l["worker"] for n, l, v in self.samples if "worker" in l and n == "llmproxy_in_flight_requests"})


def metrics(gateway, path="/llmproxy/metrics", timeout=10):
    """The gateway's metrics page (`gateway`: a port, or anything with .port)."""
    status, _, data, _ = request(getattr(gateway, "port", gateway), "GET", path, timeout=timeout)
    assert status == 200, data[:300]
    return Metrics(data.decode())
