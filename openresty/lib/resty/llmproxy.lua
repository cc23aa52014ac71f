-- resty.llmproxy: LuaJIT FFI binding of libllmproxy (include/llmproxy.h) with a small Lua API.
--
--   local llmproxy = require "resty.llmproxy"
--   llmproxy.load("/abs/path/libllmproxy.so")         -- once, e.g. in init_by_lua (optional:
--                                                    -- the first new() loads the default name)
--   local router, err = llmproxy.new(config_json, { sleep = ngx.sleep })
--                                                    -- one per nginx worker (init_worker_by_lua)
--   local d, status, body = router:pick(headers, body, path, method)
--   if not d then ngx.status = status; ngx.print(body) ... end   -- 400/404/413/500/503 + JSON
--   d.host, d.port, d.endpoint, d.cluster, d.scene, d.model, d.backend, d.stream,
--   d.upstream_model, d.upstream_path (nil: keep the client's), d:upstream_body() (nil: keep),
--   d.needs_transcoding -> d:response_status(status), d:transcode(chunk, eof)
--   d:retry()          -- after a connect failure: another endpoint of the cluster, or nil, err
--   d:first_token()    -- first response byte seen (idempotent)
--   d:observe(chunk, eof) -- every answer chunk (learning the next turn's prefix)
--   d:finish(status, outcome) -- exactly once; outcome (OUTCOME_*) says whether the endpoint
--                      is to blame; without it, status is the upstream's (0: none)
--   router:metrics()   -- Prometheus text
--
-- Every C call is cheap and runs on the worker's event loop; none blocks. With remote cache
-- lookups enabled (`metadata_center.cache_enabled`) and a `sleep` option (ngx.sleep), pick()
-- waits for the Metadata-Center's answer by polling the library every millisecond, yielding
-- the request's coroutine in between (so pick() must then run where ngx.sleep may: access,
-- content, timers). Without `sleep`, pick() decides from local data at once.
-- A decision that is garbage-collected without finish() is finished with status 0 by a
-- finalizer and counted in llmproxy.stats.leaked (a bug in the caller: the test asserts 0).

local ffi = require "ffi"
local C_NULL = nil

local ffi_new, ffi_string, ffi_gc, ffi_cast = ffi.new, ffi.string, ffi.gc, ffi.cast
local tonumber, type, pairs, setmetatable = tonumber, type, pairs, setmetatable
local string_sub, string_find = string.sub, string.find

-- The declarations below must match include/llmproxy.h exactly: LuaJIT silently accepts a
-- drifted declaration, so tests/nginx/test_cdef.py compares every one of them with the
-- header (normalised signatures) and compiles them against it with the C compiler.
-- Functions of the header deliberately not bound here are listed on "-- unbound:" lines.
--
-- unbound: llmproxy_pick_async (its callback runs on a foreign thread: unsafe in LuaJIT;
--          llmproxy_pick_start + llmproxy_pick_poll give the same decision by polling)
-- unbound: llmproxy_pick_callback (the callback type of llmproxy_pick_async)
-- CDEF-BEGIN
ffi.cdef [[
typedef enum llmproxy_status {
  LLMPROXY_OK = 0,
  LLMPROXY_PENDING = 1,
  LLMPROXY_INVALID_ARGUMENT = 2,
  LLMPROXY_INVALID_CONFIG = 3,
  LLMPROXY_BAD_REQUEST = 4,
  LLMPROXY_MODEL_NOT_FOUND = 5,
  LLMPROXY_PAYLOAD_TOO_LARGE = 6,
  LLMPROXY_NO_ENDPOINT = 7,
  LLMPROXY_INTERNAL = 8,
  LLMPROXY_PASSTHROUGH = 9,
} llmproxy_status;

typedef enum llmproxy_outcome {
  LLMPROXY_OUTCOME_UPSTREAM = 0,
  LLMPROXY_OUTCOME_ENDPOINT_FAILED = 1,
  LLMPROXY_OUTCOME_LOCAL = 2,
} llmproxy_outcome;

typedef enum llmproxy_metrics_part {
  LLMPROXY_METRICS_ALL = 0,
  LLMPROXY_METRICS_ROUTER = 1,
  LLMPROXY_METRICS_STATE = 2,
} llmproxy_metrics_part;

typedef struct llmproxy_pick_ticket llmproxy_pick_ticket;
typedef struct llmproxy_request llmproxy_request;
typedef struct llmproxy_router llmproxy_router;
typedef struct llmproxy_shared_state llmproxy_shared_state;

typedef struct llmproxy_str {
  const char *ptr;
  size_t len;
} llmproxy_str;

typedef struct llmproxy_header {
  const char *name;
  size_t name_len;
  const char *value;
  size_t value_len;
} llmproxy_header;

const char *llmproxy_version(void);
enum llmproxy_status llmproxy_router_new(const char *config_json, size_t len,
                                         struct llmproxy_router **out, char *err, size_t err_cap);
enum llmproxy_status llmproxy_config_validate(const char *config_json, size_t len,
                                              char *err, size_t err_cap);
void llmproxy_router_free(struct llmproxy_router *router);
enum llmproxy_status llmproxy_router_set_endpoints(struct llmproxy_router *router,
                                                   const char *cluster, size_t cluster_len,
                                                   const struct llmproxy_str *endpoints, size_t n);
enum llmproxy_status llmproxy_router_metrics(const struct llmproxy_router *router, char **out,
                                             size_t *out_len);
enum llmproxy_status llmproxy_router_metrics_part(const struct llmproxy_router *router,
                                                  uint32_t part, char **out, size_t *out_len);
void llmproxy_string_free(char *s);
uint64_t llmproxy_router_in_flight(const struct llmproxy_router *router);
uint64_t llmproxy_router_max_body_bytes(const struct llmproxy_router *router);
uint64_t llmproxy_router_pick_deadline_ms(const struct llmproxy_router *router);
bool llmproxy_router_should_intercept(const struct llmproxy_router *router, const char *method,
                                      size_t method_len, const char *path, size_t path_len);
bool llmproxy_router_strict_override(const struct llmproxy_router *router);
const char *llmproxy_router_cluster_header(const struct llmproxy_router *router, size_t *len);
const char *llmproxy_router_metrics_path(const struct llmproxy_router *router, size_t *len);
enum llmproxy_status llmproxy_shared_state_new(const char *name, size_t name_len,
                                               uint64_t size_bytes,
                                               struct llmproxy_shared_state **out, char *err,
                                               size_t err_cap);
bool llmproxy_shared_state_reused(const struct llmproxy_shared_state *shared);
uint64_t llmproxy_shared_state_in_flight(const struct llmproxy_shared_state *shared);
uint64_t llmproxy_shared_state_reap(const struct llmproxy_shared_state *shared);
void llmproxy_shared_state_free(struct llmproxy_shared_state *shared);
enum llmproxy_status llmproxy_router_new_shared(const char *config_json, size_t len,
                                                const struct llmproxy_shared_state *shared,
                                                struct llmproxy_router **out, char *err,
                                                size_t err_cap);
enum llmproxy_status llmproxy_pick(struct llmproxy_router *router,
                                   const struct llmproxy_header *headers, size_t n_headers,
                                   const uint8_t *body, size_t body_len,
                                   struct llmproxy_request **out);
enum llmproxy_status llmproxy_pick_start(struct llmproxy_router *router,
                                         const struct llmproxy_header *headers, size_t n_headers,
                                         const uint8_t *body, size_t body_len,
                                         struct llmproxy_pick_ticket **ticket,
                                         struct llmproxy_request **out);
enum llmproxy_status llmproxy_pick_poll(struct llmproxy_pick_ticket *ticket,
                                        struct llmproxy_request **out);
void llmproxy_pick_ticket_free(struct llmproxy_pick_ticket *ticket);
enum llmproxy_status llmproxy_request_status(const struct llmproxy_request *req);
uint32_t llmproxy_request_http_status(const struct llmproxy_request *req);
const char *llmproxy_request_endpoint(const struct llmproxy_request *req, size_t *len);
const char *llmproxy_request_cluster(const struct llmproxy_request *req, size_t *len);
const char *llmproxy_request_backend(const struct llmproxy_request *req, size_t *len);
const char *llmproxy_request_model(const struct llmproxy_request *req, size_t *len);
const char *llmproxy_request_scene(const struct llmproxy_request *req, size_t *len);
const char *llmproxy_request_error_body(const struct llmproxy_request *req, size_t *len);
const char *llmproxy_request_upstream_model(const struct llmproxy_request *req, size_t *len);
const char *llmproxy_request_upstream_path(const struct llmproxy_request *req, size_t *len);
const uint8_t *llmproxy_request_upstream_body(const struct llmproxy_request *req, size_t *len);
bool llmproxy_request_needs_transcoding(const struct llmproxy_request *req);
uint32_t llmproxy_request_response_status(struct llmproxy_request *req, uint32_t upstream_status);
const char *llmproxy_request_response_content_type(const struct llmproxy_request *req, size_t *len);
enum llmproxy_status llmproxy_request_transcode_response(struct llmproxy_request *req,
                                                         const uint8_t *chunk, size_t len,
                                                         bool end_of_stream, const uint8_t **out,
                                                         size_t *out_len);
void llmproxy_request_observe_response(struct llmproxy_request *req, const uint8_t *chunk,
                                       size_t len, bool end_of_stream);
bool llmproxy_request_is_stream(const struct llmproxy_request *req);
enum llmproxy_status llmproxy_request_retry(struct llmproxy_request *req);
void llmproxy_request_first_token(struct llmproxy_request *req);
void llmproxy_request_finish(struct llmproxy_request *req, uint32_t upstream_status);
void llmproxy_request_finish_outcome(struct llmproxy_request *req, uint32_t status,
                                     uint32_t outcome);
size_t llmproxy_error_body(uint32_t http_status, const char *message, size_t message_len,
                           char *out, size_t out_cap);
uint32_t llmproxy_status_http(uint32_t status);
]]
-- CDEF-END

local _M = { _VERSION = "0.1.0" }

_M.OK = 0
_M.PENDING = 1
_M.INVALID_ARGUMENT = 2
_M.INVALID_CONFIG = 3
_M.BAD_REQUEST = 4
_M.MODEL_NOT_FOUND = 5
_M.PAYLOAD_TOO_LARGE = 6
_M.NO_ENDPOINT = 7
_M.INTERNAL = 8
_M.PASSTHROUGH = 9 -- not routed, nothing to answer: proxy the request untouched

-- How a request ended, for the endpoint's passive health (d:finish(status, outcome)):
-- UPSTREAM: `status` is the endpoint's own response (502-504 failures, 100-498 successes);
-- ENDPOINT_FAILED: connect failure, or reset/closed/garbage before any response (a failure);
-- LOCAL: the proxy or the client ended it (proxy timeout, own reply, client gone): neutral.
_M.OUTCOME_UPSTREAM = 0
_M.OUTCOME_ENDPOINT_FAILED = 1
_M.OUTCOME_LOCAL = 2

-- Per-process counters of this binding (each nginx worker has its own copy).
-- pending: picks that waited for a remote cache lookup; lookup_abandoned: of those, the ones
-- that gave up after `lookup_wait` seconds and decided from local data.
local stats = { picks = 0, routed = 0, finished = 0, leaked = 0, retries = 0, pending = 0,
                lookup_abandoned = 0 }
_M.stats = stats

local C            -- the loaded library (ffi.load result)
local lib_path

--- Loads the shared library. `path` should be absolute (nginx clears LD_LIBRARY_PATH);
--- without it the loader looks for "libllmproxy.so" (or $LLMPROXY_LIB when `env` exposes it).
--- Loading twice with the same path is a no-op; another path is an error.
function _M.load(path)
    path = path or os.getenv("LLMPROXY_LIB") or "libllmproxy.so"
    if C then
        if path ~= lib_path then
            return nil, "libllmproxy already loaded from " .. lib_path
        end
        return true
    end
    local ok, lib = pcall(ffi.load, path)
    if not ok then
        return nil, "cannot load " .. path .. ": " .. tostring(lib)
    end
    C, lib_path = lib, path
    return true
end

local function lib()
    if not C then
        local ok, err = _M.load()
        if not ok then
            error(err, 2)
        end
    end
    return C
end

-- The OpenAI error JSON the library renders for an HTTP status and a message (the same body
-- as its own errors: one renderer for every host).
function _M.error_body(http_status, message)
    local C = lib()
    message = message or ""
    local n = tonumber(C.llmproxy_error_body(http_status, message, #message, nil, 0))
    local buf = ffi_new("char[?]", n + 1)
    C.llmproxy_error_body(http_status, message, #message, buf, n + 1)
    return ffi_string(buf, n)
end

function _M.version()
    return ffi_string(lib().llmproxy_version())
end

function _M.library_path()
    return lib_path
end

-- Scratch buffers reused by every call of this process (LuaJIT runs one request handler at a
-- time per worker, and no pointer passed in is kept by the library after a call returns).
local len_out = ffi_new("size_t[1]")
local req_out = ffi_new("llmproxy_request*[1]")
local ticket_out = ffi_new("llmproxy_pick_ticket*[1]")
local str_out = ffi_new("char*[1]")
local hdr_cap = 32
local hdr_buf = ffi_new("llmproxy_header[?]", hdr_cap)

local function accessor(fn, req)
    local p = fn(req, len_out)
    if p == C_NULL then
        return ""
    end
    return ffi_string(p, len_out[0])
end

--------------------------------------------------------------------------------------------
-- Decision: one routed request, from pick to finish.

local Decision = {}
Decision.__index = Decision

-- Finalizer of a request handle that was never finished: finish it so the router's
-- in-flight accounting stays right, and count the caller's bug.
local function leaked_finalizer(req)
    stats.leaked = stats.leaked + 1
    C.llmproxy_request_finish_outcome(req, 0, _M.OUTCOME_LOCAL)
end

local function split_endpoint(endpoint)
    -- "1.2.3.4:80" or "[::1]:80"
    local colon = nil
    local i = 0
    while true do
        local j = string_find(endpoint, ":", i + 1, true)
        if not j then break end
        colon, i = j, j
    end
    if not colon then
        return nil, nil
    end
    local host = string_sub(endpoint, 1, colon - 1)
    if string_sub(host, 1, 1) == "[" then
        host = string_sub(host, 2, -2)
    end
    return host, tonumber(string_sub(endpoint, colon + 1))
end

local function fill_endpoint(self)
    local req = self._req
    self.endpoint = accessor(C.llmproxy_request_endpoint, req)
    self.host, self.port = split_endpoint(self.endpoint)
end

--- Re-picks an untried endpoint of the same cluster after a connect failure (the library
--- counts the failure of the previous one). Returns true, or nil, err when none is left.
function Decision:retry()
    local req = self._req
    if not req then
        return nil, "request already finished"
    end
    stats.retries = stats.retries + 1
    local rc = C.llmproxy_request_retry(req)
    if rc ~= 0 then
        self.endpoint, self.host, self.port = "", nil, nil
        return nil, accessor(C.llmproxy_request_error_body, req), tonumber(rc)
    end
    fill_endpoint(self)
    self.tries = self.tries + 1
    return true
end

--- The body to send upstream instead of the client's (model rewrite, Triton), or nil when
--- the client's body goes unchanged.
function Decision:upstream_body()
    local req = self._req
    if not req then return nil end
    local p = C.llmproxy_request_upstream_body(req, len_out)
    if p == C_NULL or len_out[0] == 0 then
        return nil
    end
    return ffi_string(p, len_out[0])
end

--- Call once at the upstream response headers: the status to send to the client, and the
--- content-type to set (nil: keep the upstream's). Only needed when d.needs_transcoding.
function Decision:response_status(upstream_status)
    local req = self._req
    if not req then return upstream_status end
    local status = tonumber(C.llmproxy_request_response_status(req, upstream_status))
    local ct = accessor(C.llmproxy_request_response_content_type, req)
    return status, ct ~= "" and ct or nil
end

local transcode_out = ffi_new("const uint8_t*[1]")

--- Transcodes one upstream body chunk (d.needs_transcoding): returns the bytes for the client
--- (possibly "" while the transcoder buffers), or nil, err. Marks the first token itself.
function Decision:transcode(chunk, eof)
    local req = self._req
    if not req then return chunk end
    chunk = chunk or ""
    local rc = C.llmproxy_request_transcode_response(req, ffi_cast("const uint8_t *", chunk), #chunk,
        eof and true or false, transcode_out, len_out)
    if rc ~= 0 then
        return nil, "llmproxy_request_transcode_response failed with status " .. tostring(rc)
    end
    self.first_token_seen = self.first_token_seen or len_out[0] > 0
    if transcode_out[0] == C_NULL or len_out[0] == 0 then
        return ""
    end
    return ffi_string(transcode_out[0], len_out[0])
end

--- Lets the library read one chunk of the answer (every chunk, in order; `eof` with the last):
--- at finish it learns the next turn's prefix from it. Cheap no-op when learning is off or
--- the answer is transcoded (d:transcode reads its own output).
function Decision:observe(chunk, eof)
    local req = self._req
    if not req then return end
    chunk = chunk or ""
    C.llmproxy_request_observe_response(req, ffi_cast("const uint8_t *", chunk), #chunk,
        eof and true or false)
end

--- The first response byte arrived (releases the prompt's prefill load). Idempotent.
function Decision:first_token()
    if self._req and not self.first_token_seen then
        self.first_token_seen = true
        C.llmproxy_request_first_token(self._req)
    end
end

--- Finishes the request. With an `outcome` (_M.OUTCOME_*), `status` is what the client got
--- (0 none, 499 client gone) and the outcome alone says whether the endpoint failed; without
--- one, `status` is the endpoint's own response status (0 when there was none), as
--- OUTCOME_UPSTREAM. Safe to call more than once: only the first call reaches the library.
function Decision:finish(status, outcome)
    local req = self._req
    if not req then
        return false
    end
    self._req = nil
    ffi_gc(req, nil)
    C.llmproxy_request_finish_outcome(req, tonumber(status) or 0, tonumber(outcome) or _M.OUTCOME_UPSTREAM)
    stats.finished = stats.finished + 1
    return true
end

function Decision:finished()
    return self._req == nil
end

--------------------------------------------------------------------------------------------
-- Router

local Router = {}
Router.__index = Router

--- Validates the library's JSON configuration without creating a router (starts no thread:
--- safe in nginx's master). Returns true, or nil and the library's message.
function _M.validate(config_json)
    if type(config_json) ~= "string" then
        return nil, "config must be a JSON string"
    end
    local cap = 1024
    local err = ffi_new("char[?]", cap)
    local rc = lib().llmproxy_config_validate(config_json, #config_json, err, cap)
    if rc ~= 0 then
        local msg = ffi_string(err)
        return nil, msg ~= "" and msg or ("llmproxy_config_validate failed with status " .. tostring(rc))
    end
    return true
end

--------------------------------------------------------------------------------------------
-- Shared state

local SharedState = {}
SharedState.__index = SharedState

--- Parses a size: a number of bytes, or a string with an optional k/m/g suffix ("64m").
local function parse_size(v)
    if type(v) == "number" then
        return v
    end
    if type(v) ~= "string" then
        return nil
    end
    local n, unit = v:lower():match("^%s*(%d+)%s*([kmg]?)%s*$")
    if not n then
        return nil
    end
    local mult = ({ [""] = 1, k = 1024, m = 1024 * 1024, g = 1024 * 1024 * 1024 })[unit]
    return tonumber(n) * mult
end
_M.parse_size = parse_size

--- Creates (or, by name, finds again) a shared-state region: call it before fork (nginx's
--- master, init_by_lua) and pass it to new() in every worker (opts.shared). The same name and
--- size on a reload give back the same region (learned prefixes survive); see docs/nginx.md.
---   o.size: bytes, or "64m" (16 MiB minimum);  o.name: registry name ("" or nil: unnamed)
--- Returns the region, or nil and a message naming shared_state.size.
function _M.shared_state(o)
    o = o or {}
    local size = parse_size(o.size)
    if not size or size <= 0 then
        return nil, "shared_state.size: must be a byte count or a string like \"64m\", got " .. tostring(o.size)
    end
    local name = o.name or ""
    local lib_ = lib()
    local out = ffi_new("llmproxy_shared_state*[1]")
    local cap = 512
    local err = ffi_new("char[?]", cap)
    local rc = lib_.llmproxy_shared_state_new(name, #name, size, out, err, cap)
    if rc ~= 0 or out[0] == C_NULL then
        return nil, ffi_string(err)
    end
    local s = ffi_gc(out[0], lib_.llmproxy_shared_state_free)
    return setmetatable({ _s = s, size = size, name = name,
                          reused = lib_.llmproxy_shared_state_reused(s) }, SharedState)
end

--- Requests in flight on the region's endpoints, all workers together.
function SharedState:in_flight()
    return tonumber(C.llmproxy_shared_state_in_flight(self._s))
end

--- Takes back now the load of attached workers that are gone; returns how many.
function SharedState:reap()
    return tonumber(C.llmproxy_shared_state_reap(self._s))
end

--- Creates a router from the library's JSON configuration.
---   opts.sleep:       a yielding sleep, ngx.sleep: pick() then waits for remote cache lookups
---                     (when the config enables them); without it pick() decides at once
---   opts.lookup_wait: the longest pick() waits for a lookup, in seconds (default 1); past it
---                     the pick decides from local data (counted in stats.lookup_abandoned)
---   opts.shared:      a region from shared_state(): the router's endpoint load, health and
---                     prefix index live there, shared with every router attached to it
--- Returns the router, or nil and the library's message (which names the offending field).
function _M.new(config_json, opts)
    if type(config_json) ~= "string" then
        return nil, "config must be a JSON string"
    end
    opts = opts or {}
    if opts.sleep ~= nil and type(opts.sleep) ~= "function" then
        return nil, "opts.sleep must be a function (ngx.sleep)"
    end
    local lookup_wait = opts.lookup_wait or 1
    if type(lookup_wait) ~= "number" or lookup_wait < 0 then
        return nil, "opts.lookup_wait must be a number of seconds >= 0"
    end
    if opts.shared ~= nil and (type(opts.shared) ~= "table" or not opts.shared._s) then
        return nil, "opts.shared must be a region from llmproxy.shared_state()"
    end
    local lib_ = lib()
    local out = ffi_new("llmproxy_router*[1]")
    local cap = 1024
    local err = ffi_new("char[?]", cap)
    local rc
    if opts.shared then
        rc = lib_.llmproxy_router_new_shared(config_json, #config_json, opts.shared._s, out, err, cap)
    else
        rc = lib_.llmproxy_router_new(config_json, #config_json, out, err, cap)
    end
    if rc ~= 0 or out[0] == C_NULL then
        local msg = ffi_string(err)
        if msg == "" then
            msg = "llmproxy_router_new failed with status " .. tostring(rc)
        end
        return nil, msg
    end
    local self = setmetatable({ _r = ffi_gc(out[0], lib_.llmproxy_router_free),
                                _sleep = opts.sleep, _lookup_wait = lookup_wait,
                                -- the region this router is attached to (kept alive with it)
                                shared = opts.shared }, Router)
    local ch = lib_.llmproxy_router_cluster_header(self._r, len_out)
    self.cluster_header = ch ~= C_NULL and ffi_string(ch, len_out[0]) or "x-llmproxy-cluster"
    -- nginx serves metrics from the location of examples/nginx.conf; this is the config's value.
    local mp = lib_.llmproxy_router_metrics_path(self._r, len_out)
    self.metrics_path = mp ~= C_NULL and ffi_string(mp, len_out[0]) or ""
    self.max_body_bytes = tonumber(lib_.llmproxy_router_max_body_bytes(self._r))
    -- the longest the library takes to decide a pick that waits for a remote cache lookup
    -- (0: lookups off, every pick decided at once)
    self.pick_deadline_ms = tonumber(lib_.llmproxy_router_pick_deadline_ms(self._r))
    self.strict_override = lib_.llmproxy_router_strict_override(self._r)
    return self
end

--- Frees the router now (instead of at garbage collection). In-flight decisions stay valid.
function Router:free()
    local r = self._r
    if r then
        self._r = nil
        ffi_gc(r, nil)
        C.llmproxy_router_free(r)
    end
end

function Router:should_intercept(method, path)
    local r = self._r
    if not r then return false end
    return C.llmproxy_router_should_intercept(r, method, #method, path, #path)
end

function Router:in_flight()
    return tonumber(C.llmproxy_router_in_flight(self._r))
end

--- Replaces the endpoints ("ip:port" strings) of a cluster. Returns true or nil, err.
function Router:set_endpoints(cluster, endpoints)
    local n = #endpoints
    local arr = ffi_new("llmproxy_str[?]", n > 0 and n or 1)
    for i = 1, n do
        local e = endpoints[i]
        arr[i - 1].ptr = e
        arr[i - 1].len = #e
    end
    local rc = C.llmproxy_router_set_endpoints(self._r, cluster, #cluster, arr, n)
    if rc ~= 0 then
        return nil, "llmproxy_router_set_endpoints failed with status " .. tostring(rc)
    end
    return true
end

--- The router's metrics as Prometheus text.
local METRICS_PARTS = { router = 1, state = 2 }

--- The router's metrics as Prometheus text; `part` "router" (what this router counted) or
--- "state" (endpoint counters and prefix index: with a shared state, the same in every worker).
function Router:metrics(part)
    local r = self._r
    if not r then
        return nil, "router freed"
    end
    local rc
    if part then
        local p = METRICS_PARTS[part]
        if not p then
            return nil, "part must be \"router\" or \"state\""
        end
        rc = C.llmproxy_router_metrics_part(r, p, str_out, len_out)
    else
        rc = C.llmproxy_router_metrics(r, str_out, len_out)
    end
    if rc ~= 0 or str_out[0] == C_NULL then
        return nil, "llmproxy_router_metrics failed with status " .. tostring(rc)
    end
    local s = ffi_string(str_out[0], len_out[0])
    C.llmproxy_string_free(str_out[0])
    str_out[0] = C_NULL
    return s
end

local function put_header(i, name, value)
    if i >= hdr_cap then
        local cap = hdr_cap * 2
        local buf = ffi_new("llmproxy_header[?]", cap)
        ffi.copy(buf, hdr_buf, ffi.sizeof("llmproxy_header") * hdr_cap)
        hdr_buf, hdr_cap = buf, cap
    end
    local h = hdr_buf[i]
    h.name, h.name_len = name, #name
    h.value, h.value_len = value, #value
    return i + 1
end

-- Fills the scratch header array; returns the number of headers.
local function fill_headers(headers, path, method)
    local n = 0
    if path then n = put_header(n, ":path", path) end
    if method then n = put_header(n, ":method", method) end
    if headers then
        for name, value in pairs(headers) do
            if type(value) == "table" then
                for k = 1, #value do
                    n = put_header(n, name, value[k])
                end
            else
                n = put_header(n, name, value)
            end
        end
    end
    return n
end

-- One llmproxy_pick (or llmproxy_pick_start when `start`) call. Returns status, request
-- handle, ticket handle (each NULL when not given). Nothing points at the Lua strings once it
-- returns, and the scratch outputs are read before anything can yield.
local function call_pick(r, headers, body, path, method, start)
    local n = fill_headers(headers, path, method)
    local body_ptr = ffi_cast("const uint8_t *", body)
    local rc
    if start then
        rc = C.llmproxy_pick_start(r, hdr_buf, n, body_ptr, #body, ticket_out, req_out)
    else
        rc = C.llmproxy_pick(r, hdr_buf, n, body_ptr, #body, req_out)
    end
    for k = 0, n - 1 do
        hdr_buf[k].name, hdr_buf[k].value = C_NULL, C_NULL
    end
    local req, ticket = req_out[0], ticket_out[0]
    req_out[0], ticket_out[0] = C_NULL, C_NULL
    return tonumber(rc), req, ticket
end

local POLL_STEP = 0.001 -- seconds between polls of a pending pick (nginx's timer resolution)

-- Waits for a pending pick: polls the ticket, sleeping POLL_STEP (yielding) in between, for
-- at most `max_wait` seconds. Returns status, request handle; nil when it gave up (the late
-- decision is then finished by the library when it arrives).
local function wait_decision(ticket, sleep, max_wait)
    ticket = ffi_gc(ticket, C.llmproxy_pick_ticket_free) -- freed even if sleep() raises
    local waited = 0
    while true do
        local rc = tonumber(C.llmproxy_pick_poll(ticket, req_out))
        local req = req_out[0]
        req_out[0] = C_NULL
        if rc ~= _M.PENDING or waited >= max_wait then
            C.llmproxy_pick_ticket_free(ffi_gc(ticket, nil))
            if rc == _M.PENDING then
                return nil
            end
            return rc, req
        end
        sleep(POLL_STEP)
        waited = waited + POLL_STEP
    end
end

--- Routes one request.
---   headers: table name -> value (string, or a list of strings for repeated headers),
---            e.g. ngx.req.get_headers(); names are matched case-insensitively.
---   body:    the request body, a Lua string (or nil for none)
---   path:    the request path (decides chat vs completions), e.g. ngx.var.uri
---   method:  e.g. "POST" (optional)
--- Returns a Decision, or nil, http_status, json_error_body, status (the handle is already
--- finished); status PASSTHROUGH (http_status 0): nothing to route or answer, proxy the
--- request untouched (a stored Responses answer whose endpoint no one knows).
--- With remote cache lookups and a `sleep` option, it may yield while the Metadata-Center
--- answers (at most `lookup_wait` seconds; see new()).
function Router:pick(headers, body, path, method)
    local r = self._r
    if not r then
        return nil, 500, '{"error":{"message":"llmproxy router is not initialised",'
            .. '"type":"server_error","param":null,"code":"internal_error"}}'
    end
    body = body or ""
    stats.picks = stats.picks + 1
    local sleep = self._sleep
    local rc, req, ticket = call_pick(r, headers, body, path, method, sleep ~= nil)
    if rc == _M.PENDING and ticket ~= C_NULL then
        stats.pending = stats.pending + 1
        rc, req = wait_decision(ticket, sleep, self._lookup_wait)
        if not rc then
            stats.lookup_abandoned = stats.lookup_abandoned + 1
            r = self._r -- the router may have been freed while this request waited
            if not r then
                return nil, 500, '{"error":{"message":"llmproxy router was freed during the pick",'
                    .. '"type":"server_error","param":null,"code":"internal_error"}}'
            end
            rc, req = call_pick(r, headers, body, path, method, false)
        end
    end
    if req == C_NULL then
        return nil, 500, '{"error":{"message":"llmproxy_pick returned no request",'
            .. '"type":"server_error","param":null,"code":"internal_error"}}'
    end
    if rc ~= 0 then
        local status = tonumber(C.llmproxy_request_http_status(req))
        local err_body = accessor(C.llmproxy_request_error_body, req)
        C.llmproxy_request_finish_outcome(req, 0, _M.OUTCOME_LOCAL)
        return nil, status, err_body, tonumber(rc)
    end
    stats.routed = stats.routed + 1
    local d = setmetatable({
        _req = ffi_gc(req, leaked_finalizer),
        cluster = accessor(C.llmproxy_request_cluster, req),
        scene = accessor(C.llmproxy_request_scene, req),
        model = accessor(C.llmproxy_request_model, req),
        backend = accessor(C.llmproxy_request_backend, req),
        stream = C.llmproxy_request_is_stream(req),
        upstream_model = accessor(C.llmproxy_request_upstream_model, req),
        needs_transcoding = C.llmproxy_request_needs_transcoding(req),
        tries = 1,
        first_token_seen = false,
    }, Decision)
    local up = accessor(C.llmproxy_request_upstream_path, req)
    d.upstream_path = up ~= "" and up or nil
    fill_endpoint(d)
    return d
end

_M.Router = Router
_M.Decision = Decision
_M._split_endpoint = split_endpoint

return _M
