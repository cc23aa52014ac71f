-- Unit tests of resty.llmproxy, resty.llmproxy.nginx and resty.llmproxy.metrics run inside
-- nginx's own LuaJIT (init_by_lua of a throwaway `nginx -t`): test_lua_units.py checks the
-- final marker.
local lib_path = LLMPROXY_UNIT_LIB
local llmproxy = require "resty.llmproxy"
local gw = require "resty.llmproxy.nginx"
local metrics = require "resty.llmproxy.metrics"

local failures = 0
local function check(cond, what)
    if not cond then
        failures = failures + 1
        io.stderr:write("FAIL: ", what, "\n")
    end
end

assert(llmproxy.load(lib_path))
check(llmproxy.load(lib_path) == true, "load twice with the same path is a no-op")
check(select(1, llmproxy.load("/elsewhere.so")) == nil, "load from another path is refused")
check(#llmproxy.version() > 0, "version")

-- endpoint parsing (IP literals for set_current_peer)
local h, p = llmproxy._split_endpoint("10.1.2.3:8000")
check(h == "10.1.2.3" and p == 8000, "ipv4 endpoint")
h, p = llmproxy._split_endpoint("[::1]:9000")
check(h == "::1" and p == 9000, "ipv6 endpoint")

local cfg = [[{"model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "vllm"}]}},
  "clusters": {"c": {"endpoints": ["127.0.0.1:1", "127.0.0.1:2"]}}, "max_body_bytes": 4096}]]
local r = assert(llmproxy.new(cfg))
check(r.max_body_bytes == 4096, "max_body_bytes")
check(r.cluster_header == "x-llmproxy-cluster", "cluster header")
check(r:should_intercept("POST", "/v1/completions?x=1") and not r:should_intercept("GET", "/v1/completions"),
  "should_intercept")
local bad, err = llmproxy.new('{"clusters": 3}')
check(bad == nil and err:find("clusters", 1, true), "config error names the field: " .. tostring(err))

local body = '{"model":"m","messages":[{"role":"user","content":"hello"}]}'
local d = r:pick({ ["Content-Type"] = "application/json", ["x-multi"] = { "a", "b" } }, body, "/v1/chat/completions", "POST")
check(d and (d.endpoint == "127.0.0.1:1" or d.endpoint == "127.0.0.1:2"), "pick routes")
check(d.cluster == "c" and d.model == "m" and d.backend == "vllm" and d.stream == false, "decision fields")
check(r:in_flight() == 1, "in flight after pick")
local first = d.endpoint
check(d:retry() == true and d.endpoint ~= first and d.tries == 2, "retry moves to the other endpoint")
local ok, rerr = d:retry()
check(ok == nil and rerr:find("no_endpoint", 1, true), "no third endpoint: " .. tostring(rerr))
check(r:in_flight() == 0, "nothing in flight once retries are exhausted")
d:first_token(); d:first_token()
check(d:finish(0) == true and d:finish(0) == false and d:finished(), "finish exactly once")

local nd, status, ebody = r:pick({}, '{"model":"zz","messages":[{"role":"user","content":"x"}]}', "/v1/chat/completions")
check(nd == nil and status == 404 and ebody:find("model_not_found", 1, true), "404 error")
nd, status, ebody = r:pick({}, string.rep("x", 5000), "/v1/chat/completions")
check(nd == nil and status == 413, "413 from the library")

-- a decision dropped without finish(): the finalizer finishes it and counts the leak
local leaked_before = llmproxy.stats.leaked
do
    local lost = r:pick({}, body, "/v1/chat/completions")
    check(lost ~= nil and r:in_flight() == 1, "picked")
end
collectgarbage(); collectgarbage()
check(llmproxy.stats.leaked == leaked_before + 1, "leak counted")
check(r:in_flight() == 0, "leaked decision finished by the finalizer")

local text = r:metrics()
check(text:find("llmproxy_in_flight_requests 0", 1, true) ~= nil, "metrics text")
r:free(); r:free()

-- remote cache lookups by polling (pick_start / pick_poll), against a metadata-center that
-- accepts connections and never answers: the pick gives up after lookup_wait and decides from
-- local data; the library finishes the late decision itself.
local ffi = require "ffi"
ffi.cdef [[
int usleep(unsigned int usec);
int socket(int domain, int type, int protocol);
int listen(int fd, int backlog);
int close(int fd);
typedef struct { uint16_t family; uint16_t port; uint32_t addr; uint8_t zero[8]; } unit_sockaddr_in;
int bind(int fd, const unit_sockaddr_in *addr, uint32_t len);
int getsockname(int fd, unit_sockaddr_in *addr, uint32_t *len);
]]
local function listen_never_accepting()
    local fd = ffi.C.socket(2, 1, 0) -- AF_INET, SOCK_STREAM
    local sa = ffi.new("unit_sockaddr_in", { family = 2, port = 0, addr = 0x0100007f }) -- 127.0.0.1
    assert(fd >= 0 and ffi.C.bind(fd, sa, ffi.sizeof(sa)) == 0 and ffi.C.listen(fd, 64) == 0)
    local len = ffi.new("uint32_t[1]", ffi.sizeof(sa))
    assert(ffi.C.getsockname(fd, sa, len) == 0)
    return fd, bit.rshift(bit.bswap(sa.port), 16)
end
local hang_fd, hang_port = listen_never_accepting()
local lookup_cfg = [[{"model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "vllm"}]}},
  "clusters": {"c": {"endpoints": ["127.0.0.1:1", "127.0.0.1:2"]}},
  "metadata_center": {"enabled": true, "host": "127.0.0.1", "port": ]] .. hang_port .. [[,
                      "cache_enabled": true, "timeout_ms": 300}}]]
local slept = 0
local function blocking_sleep(s) -- a unit test may block; nginx passes ngx.sleep (yields)
    slept = slept + s
    ffi.C.usleep(s * 1e6)
end
check(select(2, llmproxy.new(lookup_cfg, { sleep = 3 })):find("opts.sleep", 1, true), "opts.sleep checked")
check(select(2, llmproxy.new(lookup_cfg, { lookup_wait = -1 })):find("opts.lookup_wait", 1, true),
    "opts.lookup_wait checked")
local rl = assert(llmproxy.new(lookup_cfg, { sleep = blocking_sleep, lookup_wait = 0.02 }))
local pending_before, abandoned_before = llmproxy.stats.pending, llmproxy.stats.lookup_abandoned
local long_body = '{"model":"m","messages":[{"role":"user","content":"' .. string.rep("long prompt ", 400) .. '"}]}'
local ld = rl:pick({}, long_body, "/v1/chat/completions", "POST")
check(ld ~= nil and (ld.endpoint == "127.0.0.1:1" or ld.endpoint == "127.0.0.1:2"), "an abandoned lookup still routes")
check(llmproxy.stats.pending == pending_before + 1, "the pick waited for the lookup")
check(llmproxy.stats.lookup_abandoned == abandoned_before + 1, "and gave up after lookup_wait")
check(slept >= 0.02 and slept < 0.2, "slept about lookup_wait: " .. slept)
ld:finish(200)
-- the lookup times out after 300 ms; its late decision (made from local data, counted as a
-- fallback) is then finished by the library, as nobody polls for it any more
local late_decided = false
for _ = 1, 300 do
    late_decided = rl:metrics():find('llmproxy_remote_cache_lookups_total{result="local_fallback"} 1', 1, true) ~= nil
    if late_decided and rl:in_flight() == 0 then break end
    ffi.C.usleep(10000)
end
check(late_decided, "the late decision was made")
check(rl:in_flight() == 0, "the late decision was finished by the library")
rl:free()
ffi.C.close(hang_fd)

-- metrics: per-worker texts merged, every sample labelled with its worker
local merged = metrics._merge({
    { pid = "11", text = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 3\n# HELP b B.\n# TYPE b gauge\nb 1\n" },
    { pid = "12", text = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 4\n# HELP b B.\n# TYPE b gauge\nb 2\n" },
})
check(merged == '# HELP a_total A.\n# TYPE a_total counter\na_total{worker="11",x="1"} 3\na_total{worker="12",x="1"} 4\n'
    .. '# HELP b B.\n# TYPE b gauge\nb{worker="11"} 1\nb{worker="12"} 2\n', "merge:\n" .. merged)
check(gw.metrics == metrics.handler, "the phase handlers' metrics location is the metrics module's")
check(metrics.counters.intercepted == 0 and metrics.counters.outcome_local == 0, "counters start at 0")
-- a worker's snapshot: its router's text, then the phase handlers' counters and its state
local wr = assert(llmproxy.new(cfg))
metrics.counters.retries = 2
metrics.configure({ shm = false }, function() return wr, 3, 12.25 end)
local snap = metrics._worker_text()
local router_at = snap:find("\nllmproxy_in_flight_requests 0\n", 1, true)
check(router_at and router_at < snap:find("# HELP llmproxy_nginx_requests_total", 1, true),
    "snapshot: the router's metrics, then the counters")
check(snap:find("\nllmproxy_nginx_retries_total 2\n", 1, true) ~= nil, "snapshot has the counters")
check(snap:find("\nllmproxy_nginx_pending_requests 3\n", 1, true) ~= nil, "snapshot has the pending decisions")
check(snap:find("\nllmproxy_nginx_worker_start_time_seconds 12.250\n", 1, true) ~= nil, "snapshot has the start time")
metrics.configure({ shm = false })
snap = metrics._worker_text()
check(snap:find("# HELP llmproxy_nginx_requests_total", 1, true) == 1, "without a router: the counters only")
check(snap:find("\nllmproxy_nginx_pending_requests 0\n", 1, true) ~= nil, "without a state: nothing pending")
metrics.counters.retries = 0
wr:free()

-- nginx glue helpers
local ej = gw.error_json(504, 'say "hi"\n')
check(ej:find('"message":"say \\"hi\\"\\n"', 1, true) ~= nil, "json escaping: " .. ej)
check(ej:find('"code":"upstream_timeout"', 1, true) ~= nil and ej:find('"type":"upstream_error"', 1, true) ~= nil,
    "type and code from the status: " .. ej)

-- how a request ended (log phase): status and outcome from nginx's per-try variables
local UP, FAILED, LOCAL = llmproxy.OUTCOME_UPSTREAM, llmproxy.OUTCOME_ENDPOINT_FAILED, llmproxy.OUTCOME_LOCAL
for _, c in ipairs({
    -- upstream_status, header_time, connect_time, stream, ngx.status, client gone => status, outcome
    { "200", "0.010", "0.001", false, 200, false, 200, UP, "the endpoint's answer" },
    { "503", "0.010", "0.001", false, 503, false, 503, UP, "the endpoint's own 503" },
    { "502", "0.010", "0.001", false, 502, false, 502, UP, "the endpoint's own 502" },
    { "502, 200", "-, 0.020", "-, 0.001", false, 200, false, 200, UP, "retried elsewhere" },
    { "200", "0.010", "0.001", true, 200, true, 200, UP, "a stream the client left after the headers" },
    { "504", "-", "0.001", false, 504, false, 504, LOCAL, "read timeout: a long generation" },
    { "504", "-", "0.000", true, 504, false, 504, FAILED, "a stream without headers in proxy_read_timeout" },
    { "504", "-", "-", false, 504, false, 504, FAILED, "connect timeout" },
    { "502", "-", "-", false, 502, false, 502, FAILED, "connect refused" },
    { "502, 502", "-, -", "-, -", false, 502, false, 502, FAILED, "every try refused" },
    { "502", "-", "0.001", false, 502, false, 502, FAILED, "closed or reset before a response byte" },
    { "-", "-", "0.001", false, 499, true, 499, LOCAL, "the client left before the answer" },
    { "-", "-", "-", false, 0, true, 499, LOCAL, "the client left, no status recorded" },
    { nil, nil, nil, false, 0, false, 0, LOCAL, "no upstream try" },
    { "", "", "", false, 500, false, 500, LOCAL, "empty lists" },
    { "500", "-", "0.001", false, 500, false, 500, LOCAL, "nginx's own 500" },
    { "502 : 504", "- : -", "- : 0.002", false, 504, false, 504, LOCAL, "the last try after a redirect counts" },
}) do
    local st, oc = gw._classify(c[1], c[2], c[3], c[4], c[5], c[6])
    check(st == c[7] and oc == c[8], string.format("classify %s: got %s/%s, want %s/%s", c[9],
        tostring(st), tostring(oc), tostring(c[7]), tostring(c[8])))
end

-- the outcome reaches the library: only the endpoint's own failures eject it
local ej = assert(llmproxy.new([[{"model_mapping_rule": {"m": {"rules": [{"cluster": "c", "backend": "vllm"}]}},
  "clusters": {"c": {"endpoints": ["127.0.0.1:1"]}}, "ejection": {"consecutive_failures": 1, "eject_ms": 60000}}]]))
check(ej.pick_deadline_ms == 0, "no remote lookups: every pick decided at once")
local function ejected()
    return ej:metrics():find('llmproxy_endpoint_ejected{cluster="c",endpoint="127.0.0.1:1"} 1', 1, true) ~= nil
end
for _, f in ipairs({ { 504, LOCAL }, { 499, LOCAL }, { 0, LOCAL }, { 500, UP }, { 200 } }) do
    local x = assert(ej:pick({}, body, "/v1/chat/completions", "POST"))
    x:finish(f[1], f[2])
    check(not ejected(), "finish(" .. f[1] .. ", " .. tostring(f[2]) .. ") does not eject")
end
local x = assert(ej:pick({}, body, "/v1/chat/completions", "POST"))
check(x:finish(502, FAILED) and ejected(), "an endpoint failure ejects it")
check(ej:in_flight() == 0, "nothing in flight")
ej:free()
local lk = assert(llmproxy.new(lookup_cfg))
check(lk.pick_deadline_ms >= 300, "remote lookups: decided within timeout_ms and a slack: " .. lk.pick_deadline_ms)
lk:free()

-- client routing headers (stripped from every request access() sees)
for name, want in pairs({ ["x-llmproxy-endpoint"] = true, ["x-llmproxy-anything"] = true,
    ["x-gateway-destination-endpoint"] = true, ["x-pool"] = true, ["x-llmproxy"] = false,
    ["content-type"] = false, ["x-gateway-destination"] = false }) do
    check(gw._routing_header(name, "x-pool") == want, "routing header " .. name)
end

-- validation without a router (the master must stay thread-free)
check(llmproxy.validate('{"metadata_center": {"enabled": true}, "clusters": {"c": {"dns": "vllm:8000"}}}') == true,
    "a config with library threads validates without starting them")
local ok, verr = llmproxy.validate('{"algorithm": "fastest"}')
check(ok == nil and verr:find("config.algorithm: unknown algorithm", 1, true) == 1, "validate names the field: " .. tostring(verr))

if failures == 0 then
    io.stderr:write("LLMPROXY-UNIT OK\n")
else
    error(failures .. " unit test(s) failed")
end
