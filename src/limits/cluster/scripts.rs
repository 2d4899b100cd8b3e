//! The Lua scripts the store runs (by EVALSHA; redis-rs loads a script the server does not know
//! yet and retries). Each runs atomically on the server and reads the server's clock (`TIME`),
//! so replicas with skewed clocks agree. Every key a script writes gets an expiry, so an agent
//! that goes away leaves nothing behind.
//!
//! All keys of one agent carry the same hash tag (`PREFIX{agent}:…`), so on a Redis Cluster they
//! live in one slot and a script may touch several of them.

/// Admission of one request or tunnel: concurrency, byte budgets, then the rate (GCRA), in one
/// round trip.
///
/// KEYS: 1 the rate key (GCRA theoretical arrival time, µs), 2 the lease set (member → expiry
/// ms), 3… the agent's byte budget counters that have a limit. ARGV: 1 emission interval T
/// (µs, ≥ 1), 2 burst, 3 max_concurrent, 4 lease member, 5 lease TTL (ms), 6 `1` in report mode
/// (the lease is taken whatever the verdict, as the in-process permit is), then per budget key
/// its limit and its kind number, then the members of this replica's released leases, removed
/// before the count (so a release costs no round trip of its own). Returns `0` when admitted
/// (the common reply, kept the cheapest to parse), else `{verdict, wait_us, kind}`: verdict 1
/// over `max_concurrent`, 2 over the rate, 3 a byte budget (of `kind`) spent; `wait_us` until
/// a request would conform (the rate), or until the budget's window ends. In report mode the
/// lease is taken whatever the verdict.
///
/// GCRA (virtual scheduling): a request at `now` conforms unless `now < TAT - T·(burst-1)`;
/// then `TAT = max(TAT, now) + T`. The key expires when its TAT has passed: from then on a
/// missing key and the stored one mean the same (a full burst).
pub(super) const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local nowms = math.floor(now / 1000)
local T = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local maxc = tonumber(ARGV[3])
local ttl = tonumber(ARGV[5])
local report = ARGV[6] == '1'
local released = 7 + (#KEYS - 2) * 2
if #ARGV >= released then
  redis.call('ZREM', KEYS[2], unpack(ARGV, released))
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', nowms)
local open = redis.call('ZCARD', KEYS[2])
local verdict = 0
local wait = 0
local kind = -1
if open >= maxc then
  verdict = 1
end
if verdict == 0 then
  for i = 3, #KEYS do
    local used = tonumber(redis.call('GET', KEYS[i]) or '0')
    local limit = tonumber(ARGV[7 + (i - 3) * 2])
    if used >= limit then
      verdict = 3
      kind = tonumber(ARGV[8 + (i - 3) * 2])
      wait = math.max(redis.call('PTTL', KEYS[i]), 1) * 1000
      break
    end
  end
end
if verdict == 0 then
  local stored = redis.call('GET', KEYS[1])
  local tat = now
  if stored then
    tat = math.max(tonumber(stored), now)
  end
  local tolerance = T * (burst - 1)
  if now < tat - tolerance then
    verdict = 2
    wait = tat - tolerance - now
  else
    local tat_next = tat + T
    redis.call('SET', KEYS[1], string.format('%.0f', tat_next), 'PX', math.ceil((tat_next - now) / 1000) + 1)
  end
end
if verdict == 0 or report then
  redis.call('ZADD', KEYS[2], nowms + ttl, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ttl)
end
if verdict == 0 then
  return 0
end
return {verdict, wait, kind}
";

/// Add a request's new bytes to the agent's byte budget counters.
///
/// KEYS: the counters that have a limit. ARGV: per key, the bytes to add, the window length
/// (s) and the limit. A counter made in a window expires at the window's end (fixed UTC
/// windows on the store's clock). Returns the highest used / limit ratio, in thousandths.
pub(super) const ADD_BYTES: &str = r"
local t = redis.call('TIME')
local nowms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local worst = 0
for i = 1, #KEYS do
  local n = tonumber(ARGV[(i - 1) * 3 + 1])
  local win = tonumber(ARGV[(i - 1) * 3 + 2]) * 1000
  local limit = tonumber(ARGV[(i - 1) * 3 + 3])
  local used = redis.call('INCRBY', KEYS[i], n)
  if redis.call('PTTL', KEYS[i]) < 0 then
    redis.call('PEXPIREAT', KEYS[i], (math.floor(nowms / win) + 1) * win)
  end
  worst = math.max(worst, math.floor(used * 1000 / limit))
end
return worst
";

/// Give back released leases of one agent that no admission took (see `store::RELEASE_AFTER`).
///
/// KEYS: 1 the lease set. ARGV: the members. Returns how many were still there.
pub(super) const RELEASE: &str = r"
return redis.call('ZREM', KEYS[1], unpack(ARGV))
";

/// Renew this replica's leases of one agent (or put them back, after the store lost them).
///
/// KEYS: 1 the lease set. ARGV: 1 lease TTL (ms), 2… the members. Returns how many.
pub(super) const RENEW: &str = r"
local t = redis.call('TIME')
local nowms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], nowms + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ttl)
return #ARGV - 1
";

/// This replica's heartbeat: register it with a TTL, forget replicas not seen within theirs,
/// and count the live ones (the divisor of the `local` fallback).
///
/// KEYS: 1 the replica set. ARGV: 1 this replica's id, 2 TTL (ms). Returns the live count.
pub(super) const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local nowms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', nowms)
redis.call('ZADD', KEYS[1], nowms + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return redis.call('ZCARD', KEYS[1])
";
