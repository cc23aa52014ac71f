//! The Lua scripts the Redis store runs (one round trip and one atomic step each; every key a
//! script touches carries the same `{cluster}` hash tag, so it runs on one node). Time comes from
//! the Redis server (`TIME`), so replicas with skewed clocks agree on expiry.
//!
//! Cache scripts keep one hash of prefix nodes per cluster; a query reads the nodes it needs
//! with one `HMGET` and the walk is done in the metadata-center (`RedisStore::cache_query`).
//! A query is a plain `HMGET` (no script, about half of Redis's work) when the replica
//! knows Redis's clock from a script's answer of the last second, else `CACHE_QUERY`.
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

/// `KEYS[1]`: the cluster's prefix nodes (hash: digest → `loc=ms,loc=ms,…`, newest first),
/// `KEYS[2]`: its LRU (sorted set: digest → last write, ms). `ARGV`: cache TTL (ms), max
/// prefixes per cluster, max locations per prefix, the location, the refresh granularity (ms),
/// then the digests of the saved prefixes. Tags each prefix with the location; a tag written
/// less than the granularity ago is left as is (so re-saving a hot prefix costs one `HMGET`).
/// Then expired prefixes and those beyond the cap (least recently written first) are removed,
/// and both keys' TTLs refreshed. Returns the number of prefixes removed and the server's
/// clock (ms).
const CACHE_SAVE: &str = r#"
local nodes, lru = KEYS[1], KEYS[2]
local ttl, maxn, maxl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local loc, gran = ARGV[4], tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live_after = now - ttl
local tag = loc .. '='
local n = #ARGV - 5
local CHUNK = 1000

-- In chunks: Lua's unpack is limited to a few thousand values.
local function call_chunked(cmd, key, args, step)
  for i = 1, #args, CHUNK * step do
    redis.call(cmd, key, unpack(args, i, math.min(i + CHUNK * step - 1, #args)))
  end
end

-- Where `loc`'s tag starts in a node's value (at the start or after a comma), or nil.
local function find_tag(v)
  local p = string.find(v, tag, 1, true)
  while p and p > 1 and string.byte(v, p - 1) ~= 44 do
    p = string.find(v, tag, p + 1, true)
  end
  return p
end

-- The other locations' live tags (`,loc=ms…`, newest first), at most maxl - 1 of them.
local function others(v)
  local out, k = {}, 0
  for l, ms in string.gmatch(v, '([^,=]+)=(%d+)') do
    if k < maxl - 1 and l ~= loc and tonumber(ms) > live_after then
      k = k + 1
      out[k] = ',' .. l .. '=' .. ms
    end
  end
  return table.concat(out)
end

local hset, zadd = {}, {}
for base = 0, n - 1, CHUNK do
  local last = math.min(base + CHUNK, n)
  local vals = redis.call('HMGET', nodes, unpack(ARGV, base + 6, last + 5))
  for j = 1, last - base do
    local d, v = ARGV[base + 5 + j], vals[j]
    local p = v and find_tag(v)
    local fresh = false
    if p then
      local q = string.find(v, ',', p + #tag, true)
      local prev = tonumber(string.sub(v, p + #tag, q and q - 1 or -1))
      fresh = prev ~= nil and now - prev < gran
    end
    if not fresh then
      hset[#hset + 1] = d
      hset[#hset + 1] = tag .. now .. (v and others(v) or '')
      zadd[#zadd + 1] = now
      zadd[#zadd + 1] = d
    end
  end
end
if #hset > 0 then
  call_chunked('HSET', nodes, hset, 2)
  call_chunked('ZADD', lru, zadd, 2)
end

local removed = 0
local function drop(ds)
  if #ds > 0 then
    call_chunked('HDEL', nodes, ds, 1)
    removed = removed + #ds
  end
end
local old = redis.call('ZRANGEBYSCORE', lru, '-inf', live_after - gran, 'LIMIT', 0, 1000)
if #old > 0 then
  drop(old)
  call_chunked('ZREM', lru, old, 1)
end
local over = redis.call('ZCARD', lru) - maxn
if over > 0 then
  local popped = redis.call('ZPOPMIN', lru, over)
  local ds = {}
  for j = 1, #popped, 2 do ds[#ds + 1] = popped[j] end
  drop(ds)
end
redis.call('PEXPIRE', nodes, ttl)
redis.call('PEXPIRE', lru, ttl)
return {removed, now}
"#;

/// `KEYS[1]`: the cluster's prefix nodes; `ARGV`: the query's prefix digests, shortest first.
/// Returns the server's clock (`[seconds, microseconds]`) and the nodes' values (nil when
/// absent), in one round trip; the walk is done by the caller. Used when the replica does not
/// know Redis's clock (otherwise the same `HMGET` is sent alone).
const CACHE_QUERY: &str = r#"
local out = redis.call('TIME')
for i = 1, #ARGV, 1000 do
  local vals = redis.call('HMGET', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  for j = 1, #vals do out[#out + 1] = vals[j] end
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
        // `#!lua` (Redis 7): every key declared, and a script that may write is refused as a
        // whole when Redis is out of memory, instead of failing halfway through.
        let script = |body: &str| Script::new(&format!("#!lua{body}"));
        let load = |body: &str| script(&format!("{LOAD_PRELUDE}{body}"));
        Scripts {
            add: load(ADD),
            delete: load(DELETE),
            query_load: load(QUERY_LOAD),
            cache_save: script(CACHE_SAVE),
            cache_query: script(CACHE_QUERY),
        }
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}
