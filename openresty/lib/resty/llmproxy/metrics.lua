-- resty.llmproxy.metrics: the metrics of the nginx host (docs/nginx.md, Metrics), used by the
-- phase handlers of resty.llmproxy.nginx, which count into `counters` and serve handler() as
-- their metrics() location.
--
-- Every worker process has its own router. Each worker's timer (every `snapshot_poll` seconds)
-- watches a generation counter in the lua_shared_dict `shm`; the metrics location bumps it, and
-- every live worker then publishes its router's Prometheus text and its own counters as a
-- snapshot; the answering worker merges the snapshots, each sample labelled worker="<pid>".
-- Exiting workers leave a record of what they still had in flight (kept 1 h). Without the
-- shared dict the location shows the answering worker only.

local llmproxy = require "resty.llmproxy"

local ngx = ngx
local ngx_log, ERR, WARN = ngx.log, ngx.ERR, ngx.WARN
local tostring, ipairs = tostring, ipairs
local string_byte, string_find, string_sub, string_format =
    string.byte, string.find, string.sub, string.format
local table_concat = table.concat

local _M = {}

-- The settings read at every use: `shm` (the lua_shared_dict's name, nil: none) and
-- `snapshot_poll`; configure() replaces them with the phase handlers' options table.
local opts = { shm = "llmproxy", snapshot_poll = 0.05 }

-- This worker's state: router (or nil), decisions not finished yet, when the router was built.
local function no_state()
    return nil, 0, nil
end
local state = no_state

-- Per-worker counters of the nginx side, rendered with the router's metrics; the phase
-- handlers (resty.llmproxy.nginx) count into this table.
local counters = {
    intercepted = 0, passthrough = 0, body_memory = 0, body_file = 0, early_413 = 0,
    pick_errors = 0, retries = 0, retry_exhausted = 0, client_aborts = 0, finished = 0,
    balancer_errors = 0, subrequests = 0, stripped_headers = 0,
    outcome_upstream = 0, outcome_endpoint_failed = 0, outcome_local = 0,
}

_M.counters = counters

--- Where the settings and this worker's state come from: `options` is read at every use (so
--- init{...} can still change it), `worker_state()` returns router, pending decisions, start time.
function _M.configure(options, worker_state)
    opts = options
    state = worker_state or no_state
end

--------------------------------------------------------------------------------------------
-- this worker's snapshot, published to the shared dict

local function shm()
    return opts.shm and ngx.shared[opts.shm]
end

local function counters_text()
    local _, pending_n, started_at = state()
    local out = {
        "# HELP llmproxy_nginx_requests_total Requests seen by access(), by kind.",
        "# TYPE llmproxy_nginx_requests_total counter",
        "llmproxy_nginx_requests_total{kind=\"intercepted\"} " .. counters.intercepted,
        "llmproxy_nginx_requests_total{kind=\"passthrough\"} " .. counters.passthrough,
        "# HELP llmproxy_nginx_request_bodies_total Intercepted bodies by where nginx kept them.",
        "# TYPE llmproxy_nginx_request_bodies_total counter",
        "llmproxy_nginx_request_bodies_total{source=\"memory\"} " .. counters.body_memory,
        "llmproxy_nginx_request_bodies_total{source=\"file\"} " .. counters.body_file,
        "# HELP llmproxy_nginx_errors_total Requests answered with an error by the gateway.",
        "# TYPE llmproxy_nginx_errors_total counter",
        "llmproxy_nginx_errors_total{reason=\"pick\"} " .. counters.pick_errors,
        "llmproxy_nginx_errors_total{reason=\"early_413\"} " .. counters.early_413,
        "llmproxy_nginx_errors_total{reason=\"retry_exhausted\"} " .. counters.retry_exhausted,
        "llmproxy_nginx_errors_total{reason=\"balancer\"} " .. counters.balancer_errors,
        "llmproxy_nginx_errors_total{reason=\"subrequest\"} " .. counters.subrequests,
        "# HELP llmproxy_nginx_stripped_headers_total Client-supplied routing headers removed.",
        "# TYPE llmproxy_nginx_stripped_headers_total counter",
        "llmproxy_nginx_stripped_headers_total " .. counters.stripped_headers,
        "# HELP llmproxy_nginx_finished_total Routed requests finished, by what the endpoint is told it did.",
        "# TYPE llmproxy_nginx_finished_total counter",
        "llmproxy_nginx_finished_total{outcome=\"upstream\"} " .. counters.outcome_upstream,
        "llmproxy_nginx_finished_total{outcome=\"endpoint_failed\"} " .. counters.outcome_endpoint_failed,
        "llmproxy_nginx_finished_total{outcome=\"local\"} " .. counters.outcome_local,
        "# HELP llmproxy_nginx_retries_total Upstream retries on another endpoint.",
        "# TYPE llmproxy_nginx_retries_total counter",
        "llmproxy_nginx_retries_total " .. counters.retries,
        "# HELP llmproxy_nginx_client_aborts_total Routed requests the client abandoned.",
        "# TYPE llmproxy_nginx_client_aborts_total counter",
        "llmproxy_nginx_client_aborts_total " .. counters.client_aborts,
        "# HELP llmproxy_nginx_picks_total Picks made by this worker's binding, and finishes.",
        "# TYPE llmproxy_nginx_picks_total counter",
        "llmproxy_nginx_picks_total{event=\"picked\"} " .. llmproxy.stats.picks,
        "llmproxy_nginx_picks_total{event=\"routed\"} " .. llmproxy.stats.routed,
        "llmproxy_nginx_picks_total{event=\"finished\"} " .. llmproxy.stats.finished,
        "llmproxy_nginx_picks_total{event=\"leaked\"} " .. llmproxy.stats.leaked,
        "llmproxy_nginx_picks_total{event=\"waited_for_lookup\"} " .. llmproxy.stats.pending,
        "llmproxy_nginx_picks_total{event=\"lookup_abandoned\"} " .. llmproxy.stats.lookup_abandoned,
        "# HELP llmproxy_nginx_pending_requests Decisions held by this worker, not yet finished.",
        "# TYPE llmproxy_nginx_pending_requests gauge",
        "llmproxy_nginx_pending_requests " .. pending_n,
        "# HELP llmproxy_nginx_worker_start_time_seconds When this worker built its router.",
        "# TYPE llmproxy_nginx_worker_start_time_seconds gauge",
        "llmproxy_nginx_worker_start_time_seconds " .. string_format("%.3f", started_at or 0),
    }
    return table_concat(out, "\n") .. "\n"
end

local function worker_text()
    local router = state()
    local text = ""
    if router then
        -- With a shared state, the endpoint counters and the prefix index are the same in
        -- every worker: the metrics location adds them once (state_text), not per worker.
        local m, err = router:metrics(router.shared and "router" or nil)
        text = m or ("# llmproxy metrics error: " .. tostring(err) .. "\n")
    end
    return text .. counters_text()
end
_M._worker_text = worker_text

-- The shared state's part of the page (nil without a shared state), rendered by the answering
-- worker: endpoint counters and the prefix index of all workers, without a worker label.
local function state_text()
    local router = state()
    if not (router and router.shared) then
        return nil
    end
    local m, err = router:metrics("state")
    return m or ("# llmproxy metrics error: " .. tostring(err) .. "\n")
end

local function publish(dict, gen)
    local pid = ngx.worker.pid()
    local ok, err = dict:set("snap:" .. pid, worker_text())
    if not ok then
        ngx_log(WARN, "llmproxy: cannot publish metrics (lua_shared_dict ", opts.shm, " too small?): ", err)
        return
    end
    dict:set("snapgen:" .. pid, gen)
    dict:set("live:" .. pid, ngx.now(), 5)
end

local last_gen = 0
local function snapshot_timer(premature)
    if premature then
        return
    end
    local dict = shm()
    if not dict then
        return
    end
    local gen = dict:get("gen") or 0
    if gen ~= last_gen then
        last_gen = gen
        publish(dict, gen)
    else
        local live = dict:get("live:" .. ngx.worker.pid())
        if not live or ngx.now() - live > 1 then
            dict:set("live:" .. ngx.worker.pid(), ngx.now(), 5)
        end
    end
end

--- init_worker, once this worker has its router: marks it live and starts its snapshot timer.
function _M.init_worker()
    local dict = shm()
    if dict then
        dict:set("live:" .. ngx.worker.pid(), ngx.now(), 5)
        local ok, terr = ngx.timer.every(opts.snapshot_poll, snapshot_timer)
        if not ok then
            ngx_log(ERR, "llmproxy: cannot start the metrics timer: ", terr)
        end
    elseif opts.shm then
        ngx_log(WARN, "llmproxy: lua_shared_dict ", opts.shm, " missing: metrics show one worker only")
    end
end

--- exit_worker: records what this worker's router still had in flight (0 after a graceful
--- shutdown or reload) and its binding's counts, and withdraws its snapshot.
function _M.exit_worker(in_flight, pending_n)
    local dict = shm()
    if not dict then
        return
    end
    local pid = ngx.worker.pid()
    local rec = string_format("in_flight=%d pending=%d routed=%d finished=%d leaked=%d",
        in_flight, pending_n, llmproxy.stats.routed, llmproxy.stats.finished, llmproxy.stats.leaked)
    dict:set("exit:" .. pid, rec, 3600)
    dict:delete("live:" .. pid)
    dict:delete("snap:" .. pid)
    dict:delete("snapgen:" .. pid)
end

--------------------------------------------------------------------------------------------
-- the metrics location: every live worker's router, merged, each sample labelled worker="<pid>";
-- with a shared state, its part (endpoints, prefix index) once, without a worker label

local function add_label(line, label)
    local b = string_find(line, "[{ ]")
    if not b then
        return line
    end
    if string_sub(line, b, b) == "{" then
        return string_sub(line, 1, b) .. label .. "," .. string_sub(line, b + 1)
    end
    return string_sub(line, 1, b - 1) .. "{" .. label .. "}" .. string_sub(line, b)
end

-- Merges per-worker Prometheus texts: one HELP/TYPE per family, samples of every worker.
local function merge(texts)
    local order, families = {}, {}
    for _, t in ipairs(texts) do
        local label = 'worker="' .. t.pid .. '"'
        local fam
        for line in string.gmatch(t.text, "[^\n]+") do
            if string_sub(line, 1, 7) == "# HELP " then
                local name = string.match(line, "^# HELP (%S+)")
                fam = families[name]
                if not fam then
                    fam = { head = { line }, samples = {} }
                    families[name] = fam
                    order[#order + 1] = name
                    fam.new = true
                else
                    fam.new = false
                end
            elseif string_sub(line, 1, 7) == "# TYPE " then
                if fam and fam.new then
                    fam.head[#fam.head + 1] = line
                end
            elseif string_byte(line, 1) ~= 35 then -- not a comment
                if not fam then
                    fam = { head = {}, samples = {} }
                    families[""] = fam
                    order[#order + 1] = ""
                end
                fam.samples[#fam.samples + 1] = add_label(line, label)
            end
        end
    end
    local out = {}
    for _, name in ipairs(order) do
        local fam = families[name]
        for _, l in ipairs(fam.head) do out[#out + 1] = l end
        for _, l in ipairs(fam.samples) do out[#out + 1] = l end
    end
    return table_concat(out, "\n") .. "\n"
end
_M._merge = merge

--- content_by_lua of the metrics location (resty.llmproxy.nginx's metrics()): asks every live
--- worker for a fresh snapshot, waits (at most 1 s) until they have all answered, and answers
--- their texts merged, with the nginx side's own gauges and the exit records of old workers.
function _M.handler()
    local pid = ngx.worker.pid()
    local dict = shm()
    local texts = {}
    local stale = {}
    if not dict then
        texts[1] = { pid = pid, text = worker_text() }
    else
        -- Ask every worker for a fresh snapshot and wait (bounded) until they have all answered.
        local gen = dict:incr("gen", 1, 0)
        publish(dict, gen)
        last_gen = gen
        local deadline = ngx.now() + 1.0
        local pids
        while true do
            pids = {}
            local waiting = false
            for _, k in ipairs(dict:get_keys(0)) do
                if string_sub(k, 1, 5) == "live:" then
                    local p = string_sub(k, 6)
                    pids[#pids + 1] = p
                    if (dict:get("snapgen:" .. p) or 0) < gen then
                        waiting = true
                    end
                end
            end
            if not waiting then break end
            ngx.update_time()
            if ngx.now() >= deadline then break end
            ngx.sleep(0.01)
        end
        table.sort(pids)
        for _, p in ipairs(pids) do
            local text = dict:get("snap:" .. p)
            if text then
                texts[#texts + 1] = { pid = p, text = text }
                if (dict:get("snapgen:" .. p) or 0) < gen then
                    stale[#stale + 1] = p
                end
            end
        end
    end
    local extra = {
        "# HELP llmproxy_nginx_workers Worker processes whose router is merged here.",
        "# TYPE llmproxy_nginx_workers gauge",
        "llmproxy_nginx_workers " .. #texts,
        "# HELP llmproxy_nginx_stale_snapshots Workers that did not refresh their snapshot in time.",
        "# TYPE llmproxy_nginx_stale_snapshots gauge",
        "llmproxy_nginx_stale_snapshots " .. #stale,
    }
    if dict then
        extra[#extra + 1] = "# HELP llmproxy_nginx_exited_worker Last state of routers of exited workers."
        extra[#extra + 1] = "# TYPE llmproxy_nginx_exited_worker gauge"
        for _, k in ipairs(dict:get_keys(0)) do
            if string_sub(k, 1, 5) == "exit:" then
                local p = string_sub(k, 6)
                local rec = dict:get(k) or ""
                for name, value in string.gmatch(rec, "([%w_]+)=(%d+)") do
                    extra[#extra + 1] = string_format('llmproxy_nginx_exited_worker{worker="%s",field="%s"} %s',
                        p, name, value)
                end
            end
        end
    end
    local body = merge(texts) .. (state_text() or "") .. table_concat(extra, "\n") .. "\n"
    ngx.header["content-type"] = "text/plain; version=0.0.4"
    ngx.print(body)
end

return _M
