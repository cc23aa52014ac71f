-- resty.llmproxy.nginx: the nginx phases around resty.llmproxy (see examples/nginx.conf and
-- docs/nginx.md).
--
--   init_by_lua_block        { require("resty.llmproxy.nginx").init{ config_file = ..., lib = ... } }
--   init_worker_by_lua_block { require("resty.llmproxy.nginx").init_worker() }
--   exit_worker_by_lua_block { require("resty.llmproxy.nginx").exit_worker() }
--   rewrite_by_lua_block     { require("resty.llmproxy.nginx").rewrite() }       (subrequest guard)
--   access_by_lua_block      { require("resty.llmproxy.nginx").access() }
--   balancer_by_lua_block    { require("resty.llmproxy.nginx").balancer() }      (upstream block)
--   body_filter_by_lua_block { require("resty.llmproxy.nginx").body_filter() }
--   log_by_lua_block         { require("resty.llmproxy.nginx").log() }
--   content_by_lua_block     { require("resty.llmproxy.nginx").metrics() }       (metrics location)
--   content_by_lua_block     { require("resty.llmproxy.nginx").error_page() }    (error_page target)
--
-- Every worker builds its own router in init_worker (never in the master, which must not run
-- library threads). With `shared_state` (examples/nginx.conf) the master maps one region before
-- fork and every worker's router attaches to it: endpoint load, health and the prefix index are
-- then one state for all workers (docs/nginx.md, Several workers); request handles and threads
-- stay per worker. The metrics location merges what each router counted through a
-- lua_shared_dict (each sample gets a worker="<pid>" label) and adds the shared state's part
-- once: see resty.llmproxy.metrics.

local llmproxy = require "resty.llmproxy"
local metrics = require "resty.llmproxy.metrics"
local balancer = require "ngx.balancer"
local base = require "resty.core.base"
local ffi = require "ffi"

local ngx = ngx
local ngx_var = ngx.var
local ngx_req = ngx.req
local ngx_log, ERR, WARN, INFO, NOTICE = ngx.log, ngx.ERR, ngx.WARN, ngx.INFO, ngx.NOTICE
local tonumber, tostring, pairs, ipairs, type = tonumber, tostring, pairs, ipairs, type
local string_find, string_sub, string_gsub, string_format, string_lower =
    string.find, string.sub, string.gsub, string.format, string.lower

local _M = { _VERSION = "0.1.0" }

local opts = {
    -- absolute path of libllmproxy.so (default: $prefix/build/libllmproxy.so if it exists,
    -- else the loader path)
    lib = nil,
    -- the library's JSON configuration: a file (read in the master) or the JSON text itself
    config_file = nil,
    config_json = nil,
    -- lua_shared_dict used for cross-worker metrics (optional but recommended)
    shm = "llmproxy",
    -- one routing state for all workers (docs/nginx.md, Shared state): { size = "64m" },
    -- made by the master before fork; false or nil: every worker routes on its own state
    shared_state = nil,
    -- nginx variable naming the upstream block proxy_pass uses; access() sets it to
    -- `upstream` for intercepted requests and leaves it alone for the rest
    upstream_var = "llmproxy_upstream",
    upstream = "llmproxy_backend",
    -- add x-llmproxy-worker / x-llmproxy-endpoint response headers (tests, debugging)
    debug_headers = false,
    -- headers set on the proxied request (client-supplied copies are replaced)
    endpoint_header = "x-llmproxy-endpoint",
    scene_header = "x-llmproxy-scene",
    -- Client-supplied routing headers, removed from every request access() sees (intercepted
    -- or not) before anything reads them: every header whose name starts with strip_prefix,
    -- the ones listed here, and the library's cluster header (router.cluster_header).
    strip_prefix = "x-llmproxy-",
    strip_headers = { "x-gateway-destination-endpoint" },
    -- how often (seconds) each worker looks for a metrics snapshot request
    snapshot_poll = 0.05,
    -- remote cache lookups (metadata_center.cache_enabled): the longest access() waits for
    -- the Metadata-Center's answer (seconds) before deciding from local data
    lookup_wait = 1,
}

local config_json      -- read in the master by init(), inherited by the workers
local shared           -- the shared-state region, made by init() in the master (or nil)
local router           -- this worker's router
local router_pid       -- pid that created `router` (init_worker is idempotent per pid)
local router_cluster_header -- the router's cluster header, lower case
local init_error       -- why the router could not be built, answered as 500 JSON
local started_at

-- Decisions in flight in this worker, keyed by the request (the ngx_http_request_t address as
-- a number: the cdata itself would be a new object, a new key, every time): ngx.ctx is emptied
-- by internal redirects (error_page) but the request stays the same, and the log phase must
-- still find the decision.
local pending = {}
local pending_n = 0

local function request_key()
    return tonumber(ffi.cast("uintptr_t", base.get_request()))
end

-- What the metrics render of this worker; they read `opts` (shm, snapshot_poll) at every use.
metrics.configure(opts, function()
    return router, pending_n, started_at
end)

-- Per-worker counters of the nginx side, rendered with the router's metrics.
local counters = metrics.counters

-- An OpenAI-style error body: the library renders it (the same JSON as its own errors; the
-- type and code follow the HTTP status).
local function error_json(status, message)
    return llmproxy.error_body(status, message)
end
_M.error_json = error_json

local function send_json(status, body)
    ngx.status = status
    ngx.header["content-type"] = "application/json"
    ngx.header["content-length"] = #body + 1
    ngx.print(body, "\n")
    return ngx.exit(status)
end

local function read_file(path)
    local f, err = io.open(path, "rb")
    if not f then
        return nil, err
    end
    local data = f:read("*a")
    f:close()
    return data
end

--------------------------------------------------------------------------------------------
-- init (master, before fork; again on every reload)


--- Loads the library and the configuration, and validates the configuration so a bad one
--- stops nginx from starting. Runs in init_by_lua*; starts no thread.
function _M.init(o)
    o = o or {}
    for k, v in pairs(o) do
        opts[k] = v
    end
    local path = opts.lib
    if not path then
        local candidate = ngx.config.prefix() .. "build/libllmproxy.so"
        if io.open(candidate, "rb") then
            path = candidate
        end
    end
    local ok, err = llmproxy.load(path)
    if not ok then
        error("llmproxy: " .. err)
    end
    if opts.config_json then
        config_json = opts.config_json
    elseif opts.config_file then
        local data, ferr = read_file(opts.config_file)
        if not data then
            error("llmproxy: cannot read config_file " .. tostring(opts.config_file) .. ": " .. tostring(ferr))
        end
        config_json = data
    else
        error("llmproxy: init() needs config_file or config_json")
    end
    -- Validate now, so a bad config stops nginx from starting. llmproxy_config_validate builds
    -- no router and starts no thread: the master stays thread-free, and every worker builds its
    -- own router (and its Metadata-Center / DNS thread) after fork.
    local ok, verr = llmproxy.validate(config_json)
    if not ok then
        error("llmproxy: invalid configuration: " .. verr)
    end
    -- The shared-state region is mapped here, before fork, so every worker inherits it. On a
    -- reload the master runs this again: the same name and size give the same region back.
    shared = nil
    local ss = opts.shared_state
    if ss then
        if type(ss) ~= "table" then
            error("llmproxy: shared_state must be a table like { size = \"64m\" }")
        end
        local region, serr = llmproxy.shared_state { name = ss.name or "llmproxy", size = ss.size or "64m" }
        if not region then
            error("llmproxy: " .. serr)
        end
        shared = region
        ngx_log(NOTICE, "llmproxy: shared state of ", region.size, " bytes ",
                region.reused and "kept from before the reload" or "created")
    end
    return true
end

--- The shared-state region (nil: per-worker state).
function _M.shared_state()
    return shared
end

--------------------------------------------------------------------------------------------
-- init_worker: one router per worker process

function _M.init_worker()
    local pid = ngx.worker.pid()
    if router and router_pid == pid then
        return true -- idempotent per pid
    end
    if not config_json then
        init_error = "llmproxy: init() was not called in init_by_lua"
        ngx_log(ERR, init_error)
        return nil, init_error
    end
    -- ngx.sleep lets a pick wait for a remote cache lookup (when the config enables them)
    -- by polling the library, yielding the request in between: the worker never blocks.
    local r, err = llmproxy.new(config_json, { sleep = ngx.sleep, lookup_wait = opts.lookup_wait,
                                                shared = shared })
    if not r and shared then
        -- The region refused this worker (all its worker slots held by live processes): route
        -- on this worker's own state rather than not at all.
        ngx_log(ERR, "llmproxy: worker ", pid, " cannot attach to the shared state (", tostring(err),
                "): it routes on its own state")
        r, err = llmproxy.new(config_json, { sleep = ngx.sleep, lookup_wait = opts.lookup_wait })
    end
    if not r then
        init_error = "llmproxy: cannot build the router: " .. tostring(err)
        ngx_log(ERR, init_error)
        return nil, init_error
    end
    router, router_pid, init_error = r, pid, nil
    router_cluster_header = string_lower(r.cluster_header)
    ngx.update_time()
    started_at = ngx.now()

    -- Metadata-Center: llmproxy_router_new starts the router's sync thread itself when the
    -- config (or METADATA_CENTER_* variables, which nginx passes only when named by `env`)
    -- enables it; building the router here, after fork, is what gives every worker its own
    -- thread. Workers then share endpoint load through the server, and with
    -- metadata_center.cache_enabled every worker asks it where a prompt's prefix is cached.

    metrics.init_worker()
    ngx_log(INFO, "llmproxy: worker ", pid, " built its router (library ", llmproxy.version(), ")")
    return true
end

--- exit_worker: records what the router still had in flight (must be 0 after a graceful
--- shutdown or reload) in the shared dict, then frees the router.
function _M.exit_worker()
    if not router then
        return
    end
    local pid = ngx.worker.pid()
    local in_flight = router:in_flight()
    metrics.exit_worker(in_flight, pending_n)
    if in_flight ~= 0 or pending_n ~= 0 then
        ngx_log(ERR, "llmproxy: worker ", pid, " exits with ", in_flight, " requests in flight")
    end
    router:free()
    router = nil
end

function _M.router()
    return router
end

--------------------------------------------------------------------------------------------
-- access: read the body, pick, answer errors, arm the balancer

local function read_body()
    ngx_req.read_body()
    local body = ngx_req.get_body_data()
    if body then
        counters.body_memory = counters.body_memory + 1
        return body
    end
    local file = ngx_req.get_body_file()
    if file then
        -- The body was larger than client_body_buffer_size: nginx spooled it to a temp file
        -- (page cache; a blocking read on the event loop, bounded by client_max_body_size).
        local data, err = read_file(file)
        if not data then
            return nil, "cannot read the spooled request body: " .. tostring(err)
        end
        counters.body_file = counters.body_file + 1
        return data
    end
    counters.body_memory = counters.body_memory + 1
    return ""
end

-- True for a (lower-case) header name a client must not send upstream: it could name an
-- endpoint or a cluster.
local function routing_header(lname, cluster_header)
    if string_sub(lname, 1, #opts.strip_prefix) == opts.strip_prefix or lname == cluster_header
        or lname == opts.endpoint_header or lname == opts.scene_header then
        return true
    end
    for _, h in ipairs(opts.strip_headers) do
        if lname == h then
            return true
        end
    end
    return false
end
_M._routing_header = routing_header

-- Removes every client-supplied routing header from the request (all values, any case) and
-- from `headers` (ngx.req.get_headers(0, true): every header, raw names). Returns `headers`.
local function strip_routing_headers()
    -- 0: no limit; nginx bounds the header block itself (large_client_header_buffers), and a
    -- client must not hide a routing header behind 100 others
    local headers = ngx_req.get_headers(0, true)
    local cluster_header = router_cluster_header
    for name, value in pairs(headers) do
        if routing_header(string_lower(name), cluster_header) then
            ngx_req.clear_header(name) -- every value of it, any case
            headers[name] = nil
            counters.stripped_headers = counters.stripped_headers + (type(value) == "table" and #value or 1)
        end
    end
    return headers
end

function _M.access()
    local r = router
    if not r then
        return send_json(500, error_json(500, init_error or "llmproxy: no router in this worker"))
    end
    -- A client never chooses the endpoint or the cluster, on any request that passes here
    -- (also the ones proxied untouched): the same rule as the Envoy shim's.
    local headers = strip_routing_headers()
    local method = ngx_req.get_method()
    local uri = ngx_var.uri
    if not r:should_intercept(method, uri) then
        counters.passthrough = counters.passthrough + 1
        return
    end
    counters.intercepted = counters.intercepted + 1

    local max = r.max_body_bytes
    local cl = tonumber(ngx_var.http_content_length)
    if cl and max and cl > max then
        -- Refuse before reading it: the same answer the library gives for a read body.
        counters.early_413 = counters.early_413 + 1
        ngx_req.discard_body()
        return send_json(413, error_json(413, string_format(
            "request body of %d bytes is larger than the limit of %d bytes", cl, max)))
    end

    local body, berr = read_body()
    if not body then
        return send_json(500, error_json(500, berr))
    end
    local d, status, err_body, rc = r:pick(headers, body, uri, method)
    if not d and rc == llmproxy.PASSTHROUGH then
        -- nothing to route (a stored Responses answer no one knows): the passthrough upstream
        counters.passthrough = counters.passthrough + 1
        return
    end
    if not d then
        counters.pick_errors = counters.pick_errors + 1
        return send_json(status, err_body)
    end

    local key = request_key()
    if pending[key] then
        -- the same request through access() again (an internal redirect into another
        -- location that runs it): the earlier decision never reached an upstream
        pending[key]:finish(0, llmproxy.OUTCOME_LOCAL)
        pending_n = pending_n - 1
    end
    pending[key] = d
    pending_n = pending_n + 1
    ngx.ctx.llmproxy = d

    -- What the backend receives when it differs from what the client sent: the model
    -- rewritten (target_model, LoRA), or a Triton generate request.
    local up_body = d:upstream_body()
    if up_body then
        ngx_req.set_body_data(up_body) -- also sets content-length
    end
    if d.upstream_path then
        ngx_req.set_uri(d.upstream_path)
        ngx_req.set_uri_args("")
    end

    ngx_req.set_header(r.cluster_header, d.cluster)
    ngx_req.set_header(opts.endpoint_header, d.endpoint)
    ngx_req.set_header(opts.scene_header, d.scene)
    ngx_var[opts.upstream_var] = opts.upstream
end

--------------------------------------------------------------------------------------------
-- rewrite: the guard of subrequests

--- rewrite_by_lua of the llmproxy locations. nginx skips the access phase of subrequests
--- (ngx.location.capture, mirror, auth_request, SSI), so access() never sees them: without
--- this guard they would be proxied unrouted to the passthrough upstream with whatever
--- routing headers they carry. For a subrequest: strips the client routing headers and
--- refuses an inference request (what access() would intercept) with a JSON 501 — a pick
--- made in a subrequest could never be finished, since nginx never runs a subrequest's log
--- phase (its endpoint's load would stay counted forever). Other subrequests pass. Main
--- requests: nothing (access() does the work after the access-phase modules).
function _M.rewrite()
    if not ngx.is_subrequest then
        return
    end
    strip_routing_headers()
    local r = router
    if not r then
        return send_json(500, error_json(500, init_error or "llmproxy: no router in this worker"))
    end
    if not r:should_intercept(ngx_req.get_method(), ngx_var.uri) then
        return
    end
    counters.subrequests = counters.subrequests + 1
    return send_json(501, error_json(501, "llmproxy does not route subrequests "
        .. "(ngx.location.capture, mirror, ...): a subrequest's log phase never runs, so its pick "
        .. "could never be finished; send the request to the gateway's own listener instead"))
end

--------------------------------------------------------------------------------------------
-- balancer: the chosen IP literal; one retry on another endpoint after a connect failure

function _M.balancer()
    local d = ngx.ctx.llmproxy
    if not d then
        counters.balancer_errors = counters.balancer_errors + 1
        ngx_log(ERR, "llmproxy: balancer without a decision (upstream used outside access())")
        return ngx.exit(500)
    end
    local state = balancer.get_last_failure()
    if state then
        -- "failed" (connect error/timeout) or "next" (status listed in proxy_next_upstream)
        counters.retries = counters.retries + 1
        local host, port = d.host, d.port
        local ok, err = d:retry()
        if not ok then
            -- No other endpoint: try the failed one again so nginx ends with its own 502
            -- (ngx.exit from a balancer would turn into a 500).
            counters.retry_exhausted = counters.retry_exhausted + 1
            ngx_log(WARN, "llmproxy: no endpoint left to retry: ", err)
            local sok, serr = balancer.set_current_peer(host, port)
            if not sok then
                ngx_log(ERR, "llmproxy: set_current_peer: ", serr)
                return ngx.exit(500)
            end
            return
        end
    else
        local ok, err = balancer.set_more_tries(1)
        if not ok then
            ngx_log(WARN, "llmproxy: set_more_tries: ", err)
        end
    end
    if not d.host then
        counters.balancer_errors = counters.balancer_errors + 1
        return ngx.exit(500)
    end
    local ok, err = balancer.set_current_peer(d.host, d.port)
    if not ok then
        counters.balancer_errors = counters.balancer_errors + 1
        ngx_log(ERR, "llmproxy: set_current_peer(", d.host, ", ", d.port, "): ", err)
        return ngx.exit(500)
    end
end

--------------------------------------------------------------------------------------------
-- header/body filter: first response byte, the answer read for learning

function _M.header_filter()
    local d = ngx.ctx.llmproxy
    if d and d.needs_transcoding then
        -- the response is rewritten (Triton -> OpenAI): status, content-type, no length
        local status, ct = d:response_status(ngx.status)
        ngx.status = status
        if ct then
            ngx.header["content-type"] = ct
        end
        ngx.header["content-length"] = nil
        d.transcoding = true
    end
    if opts.debug_headers then
        ngx.header["x-llmproxy-worker"] = ngx.worker.pid()
        if d then
            ngx.header["x-llmproxy-endpoint"] = d.endpoint
        end
    end
end

function _M.body_filter()
    local d = ngx.ctx.llmproxy
    if not d then
        return
    end
    if d.transcoding then
        local out, err = d:transcode(ngx.arg[1], ngx.arg[2])
        if not out then
            ngx_log(ERR, "llmproxy: ", err)
            out = ""
        end
        ngx.arg[1] = out
        return
    end
    local chunk, eof = ngx.arg[1], ngx.arg[2]
    if not d.first_token_seen then
        if (chunk and chunk ~= "") or eof then
            d:first_token()
        end
    end
    d:observe(chunk, eof)  -- the library learns the next turn's prefix from the answer
end

--------------------------------------------------------------------------------------------
-- log: every request ends here, also after a client abort or an error_page redirect

-- The last item of one of nginx's per-try lists ($upstream_status, $upstream_header_time,
-- $upstream_connect_time: "a, b" for tries of one upstream, "a : b" across internal
-- redirects), trimmed; nil when the list is empty.
local function last_try(s)
    if not s or s == "" then
        return nil
    end
    local i = 0
    while true do
        local j = string_find(s, "[,:]", i + 1)
        if not j then break end
        i = j
    end
    local last = string_gsub(string_sub(s, i + 1), "%s", "")
    if last == "" then
        return nil
    end
    return last
end

-- The status of the last upstream try ("502, 200" → 200); 0 when no response came back.
local function last_upstream_status()
    return tonumber(last_try(ngx_var.upstream_status)) or 0
end
_M._last_upstream_status = last_upstream_status

local OUTCOME_UPSTREAM = llmproxy.OUTCOME_UPSTREAM
local OUTCOME_ENDPOINT_FAILED = llmproxy.OUTCOME_ENDPOINT_FAILED
local OUTCOME_LOCAL = llmproxy.OUTCOME_LOCAL

--- How a routed request ended, from nginx's variables of its last upstream try (earlier
--- tries failed to connect and were already counted by d:retry() in the balancer):
---   upstream_status, header_time, connect_time: $upstream_status, $upstream_header_time,
---     $upstream_connect_time ("-" where a try had none)
---   stream: the request asked for a stream; client_status: what the client got (ngx.status,
---     0 none); client_gone: the client left before the response was complete
--- Returns the status to report and the outcome (llmproxy.OUTCOME_*):
---   a response header came from the endpoint → its status, UPSTREAM (the library's rule:
---     502-504 failure, 100-498 success, else neutral; a stream the client left after the
---     headers is the endpoint's 200);
---   no status at all (no try, or the client left before the endpoint answered) → LOCAL;
---   nginx's 502 without a response (connect refused/failed, reset or closed before any
---     byte, an invalid response header) → ENDPOINT_FAILED;
---   nginx's 504 without a response: connect timeout → ENDPOINT_FAILED; read/send timeout on
---     an established connection → LOCAL for a non-streaming request (a long generation
---     sends nothing until it is done: proxy_read_timeout says nothing about the endpoint),
---     ENDPOINT_FAILED for a stream (its response header comes before the first token);
---   anything else nginx made up (500, ...) → LOCAL.
local function classify(upstream_status, header_time, connect_time, stream, client_status, client_gone)
    local status = tonumber(last_try(upstream_status))
    local header = last_try(header_time)
    if status and header and header ~= "-" then
        return status, OUTCOME_UPSTREAM
    end
    local got = tonumber(client_status) or 0
    if client_gone and got == 0 then
        got = 499
    end
    if not status then
        return got, OUTCOME_LOCAL
    end
    if status == 502 then
        return got, OUTCOME_ENDPOINT_FAILED
    end
    if status == 504 then
        local connect = last_try(connect_time)
        if connect and connect ~= "-" and not stream then
            return got, OUTCOME_LOCAL
        end
        return got, OUTCOME_ENDPOINT_FAILED
    end
    return got, OUTCOME_LOCAL
end
_M._classify = classify

function _M.log()
    local key = request_key()
    local d = pending[key]
    if not d then
        return
    end
    pending[key] = nil
    pending_n = pending_n - 1
    local client_gone = ngx_var.request_completion ~= "OK"
    if client_gone then
        counters.client_aborts = counters.client_aborts + 1
    end
    local status, outcome = classify(ngx_var.upstream_status, ngx_var.upstream_header_time,
        ngx_var.upstream_connect_time, d.stream, ngx.status, client_gone)
    if outcome == OUTCOME_UPSTREAM then
        counters.outcome_upstream = counters.outcome_upstream + 1
    elseif outcome == OUTCOME_ENDPOINT_FAILED then
        counters.outcome_endpoint_failed = counters.outcome_endpoint_failed + 1
    else
        counters.outcome_local = counters.outcome_local + 1
    end
    counters.finished = counters.finished + 1
    d:finish(status, outcome)
end

--------------------------------------------------------------------------------------------
-- error_page target: our JSON for the errors nginx itself produces

local ERROR_PAGES = {
    [413] = "request body is larger than client_max_body_size",
    [500] = "internal gateway error",
    [502] = "the upstream endpoint could not be reached",
    [503] = "no upstream available",
    [504] = "the upstream endpoint timed out",
}

--- content_by_lua of the named location error_page points to; `status` defaults to the
--- status nginx was about to send.
function _M.error_page(status)
    status = tonumber(status) or ngx.status
    local body = error_json(status, ERROR_PAGES[status] or "gateway error")
    ngx.status = status
    ngx.header["content-type"] = "application/json"
    ngx.header["content-length"] = #body + 1
    ngx.print(body, "\n")
    return ngx.exit(ngx.HTTP_OK)
end

--------------------------------------------------------------------------------------------
-- metrics: every live worker's router, merged, each sample labelled worker="<pid>"
-- (resty.llmproxy.metrics)

_M.metrics = metrics.handler

return _M
