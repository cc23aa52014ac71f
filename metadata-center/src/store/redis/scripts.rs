//! The Lua scripts the Redis store runs (one round trip and one atomic step each; every key a
//! script touches carries the same `{cluster}` hash tag, so it runs on one node). Time comes from
//! the Redis server (`TIME`), so replicas with skewed clocks agree on expiry.
//!
//! Load scripts (`KEYS`: requests, expiry, engines of one cluster; `ARGV[1]`: the load TTL in
//! ms) start by pruning: requests whose expiry has passed are removed and their load released,
//! at most 1,000 per call (the rest on the next). So load that no gateway deletes, because the
//! gateway died, disappears at its TTL and no counter can keep it.

use redis::Script;

/// Shared by the load scripts: clock, `release`, and the pruning of expired requests.
const LOAD_PRELUDE: &str = r#"
local req, exp, eng = KEYS[1], KEYS[2], KEYS[3]
local ttl = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_ns = t[1] .. string.format('%06d', tonumber(t[2])) .. '000'

local function parse(v)
  local nl = string.find(v, '\n', 1, true)
  return string.sub(v, 1, nl - 1), tonumber(string.sub(v, nl + 1))
end

local function dec(field, by)
  if redis.call('HINCRBY', eng, field, -by) < 0 then redis.call('HSET', eng, field, 0) end
end

-- Take the request's queue slot (when dequeue) and the prompt it still holds off its engine.
local function release(v, dequeue, stamp)
  local ep, left = parse(v)
  if dequeue then dec('q|' .. ep, 1) end
  if left > 0 then dec('p|' .. ep, left) end
  if stamp then redis.call('HSET', eng, 't|' .. ep, now_ns) end
  return ep
end

local old = redis.call('ZRANGEBYSCORE', exp, '-inf', now, 'LIMIT', 0, 1000)
for _, rid in ipairs(old) do
  local v = redis.call('HGET', req, rid)
  if v then
    release(v, true, false)
    redis.call('HDEL', req, rid)
  end
  redis.call('ZREM', exp, rid)
end
"#;

/// `ARGV[2..4]`: request id, engine, prompt length. Returns 1 when added, 0 for a duplicate.
const ADD: &str = r#"
local rid, ep, plen = ARGV[2], ARGV[3], tonumber(ARGV[4])
if redis.call('HEXISTS', req, rid) == 1 then return 0 end
redis.call('HSET', req, rid, ep .. '\n' .. plen)
redis.call('ZADD', exp, now + ttl, rid)
redis.call('HINCRBY', eng, 'q|' .. ep, 1)
redis.call('HINCRBY', eng, 'p|' .. ep, plen)
redis.call('HSET', eng, 't|' .. ep, now_ns)
redis.call('PEXPIRE', req, ttl)
redis.call('PEXPIRE', exp, ttl)
redis.call('PEXPIRE', eng, ttl)
return 1
"#;

/// `ARGV[2]`: request id, `ARGV[3]`: `1` to delete the request, `0` to release its prompt only.
/// Returns 1 when the request was found.
const DELETE: &str = r#"
local rid, full = ARGV[2], ARGV[3] == '1'
local v = redis.call('HGET', req, rid)
if not v then return 0 end
if full then
  release(v, true, true)
  redis.call('HDEL', req, rid)
  redis.call('ZREM', exp, rid)
else
  local ep, left = parse(v)
  if left > 0 then
    release(v, false, true)
    redis.call('HSET', req, rid, ep .. '\n0')
  end
end
redis.call('PEXPIRE', eng, ttl)
return 1
"#;

/// Returns nil for an unknown cluster, else `[engine, queued, prompt, updated_ns, …]`. Engines
/// with nothing queued and untouched for the TTL are dropped.
const QUERY_LOAD: &str = r#"
if redis.call('EXISTS', eng) == 0 then return false end
local kv = redis.call('HGETALL', eng)
local e = {}
for i = 1, #kv, 2 do
  local kind, ep = string.sub(kv[i], 1, 1), string.sub(kv[i], 3)
  e[ep] = e[ep] or {q = '0', p = '0', t = '0'}
  e[ep][kind] = kv[i + 1]
end
local out = {}
local stale = (tonumber(t[1]) - ttl / 1000) * 1e9
for ep, x in pairs(e) do
  if tonumber(x.q) <= 0 and tonumber(x.t) < stale then
    redis.call('HDEL', eng, 'q|' .. ep, 'p|' .. ep, 't|' .. ep)
  else
    table.insert(out, ep); table.insert(out, x.q); table.insert(out, x.p); table.insert(out, x.t)
  end
end
return out
"#;

/// `KEYS[1]`: the cluster's prefix LRU; `KEYS[2..]`: the saved prefixes' nodes. `ARGV`: cache
/// TTL (ms), max prefixes per cluster, max locations per node, the location, the node key
/// prefix, then the digests (one per node key, same order). Tags every node with the location,
/// refreshes the TTLs, then trims the cluster to its cap, least recently saved first.
const CACHE_SAVE: &str = r#"
local lru = KEYS[1]
local ttl, maxn, maxl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local loc, np = ARGV[4], ARGV[5]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #KEYS do
  local k = KEYS[i]
  redis.call('HSET', k, loc, now)
  redis.call('PEXPIRE', k, ttl)
  if redis.call('HLEN', k) > maxl then
    local kv = redis.call('HGETALL', k)
    local oldest, ot = nil, nil
    for j = 1, #kv, 2 do
      local tt = tonumber(kv[j + 1])
      if ot == nil or tt < ot then oldest, ot = kv[j], tt end
    end
    redis.call('HDEL', k, oldest)
  end
  redis.call('ZADD', lru, now, ARGV[4 + i])
end
redis.call('ZREMRANGEBYSCORE', lru, '-inf', now - ttl)
local over = redis.call('ZCARD', lru) - maxn
if over > 0 then
  local victims = redis.call('ZPOPMIN', lru, over)
  for j = 1, #victims, 2 do redis.call('DEL', np .. victims[j]) end
end
redis.call('PEXPIRE', lru, ttl)
return over > 0 and over or 0
"#;

/// `KEYS`: the query's prefix nodes, shortest first; `ARGV[1]`: cache TTL (ms). Walks down the
/// query until a prefix has no live location (as the tree stops at the first missing node) and
/// returns `[location, depth, last save ms, …]`, each location at its deepest node.
const CACHE_QUERY: &str = r#"
local ttl = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local best = {}
for i = 1, #KEYS do
  local kv = redis.call('HGETALL', KEYS[i])
  local live = false
  for j = 1, #kv, 2 do
    local tt = tonumber(kv[j + 1])
    if tt > now - ttl then
      best[kv[j]] = {i, tt}
      live = true
    end
  end
  if not live then break end
end
local out = {}
for loc, x in pairs(best) do
  table.insert(out, loc); table.insert(out, x[1]); table.insert(out, x[2])
end
return out
"#;

/// The scripts, hashed once (`EVALSHA`, loaded on `NOSCRIPT`).
pub struct Scripts {
    pub add: Script,
    pub delete: Script,
    pub query_load: Script,
    pub cache_save: Script,
    pub cache_query: Script,
}

impl Scripts {
    pub fn new() -> Self {
        let load = |body: &str| Script::new(&format!("{LOAD_PRELUDE}{body}"));
        Scripts {
            add: load(ADD),
            delete: load(DELETE),
            query_load: load(QUERY_LOAD),
            cache_save: Script::new(CACHE_SAVE),
            cache_query: Script::new(CACHE_QUERY),
        }
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}
