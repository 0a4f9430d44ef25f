-- One rate-limit decision for one tenant: daily quota, then token bucket, atomically.
--
-- KEYS[1]  the bucket hash (fields `tokens`, `ts`)
-- KEYS[2]  the quota counter's base name; the UTC date (from server time) is appended,
--          so the counter for a new day starts at zero by itself. The caller gives both
--          names the same hash tag, so the derived key lives in the bucket's slot.
-- ARGV     rate (tokens/s), burst, daily quota, cost, consume ("1": acquire, "0": peek),
--          and optionally the time in Unix seconds (tests drive it; absent: server TIME)
--
-- Returns one space-separated string: allowed (1|0), reason, capacity, remaining,
-- refill_rate, seconds_until_full, quota_limit, quota_used, quota_remaining,
-- quota_reset_seconds, retry_after. Strings, because Redis truncates Lua numbers in
-- replies to integers; one string, because parsing an 11-element array reply costs the
-- pure-Python client about as much as the script itself.

local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local quota_limit = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local consume = ARGV[5] == '1'

-- Keeps a bucket this long after it would be full again: expiring a full bucket is
-- exact (a missing bucket reads as full), the margin only absorbs rounding.
local BUCKET_MARGIN_MS = 1000
-- Keeps yesterday's counter a little past midnight for anyone reading the day's total.
local QUOTA_MARGIN_S = 3600
-- An upper bound that keeps the TTL a finite integer for absurdly slow refill rates.
local MAX_TTL_MS = 1e15

local now
if ARGV[6] then
  now = tonumber(ARGV[6])
else
  local time = redis.call('TIME')
  now = tonumber(time[1]) + tonumber(time[2]) / 1e6
end
local seconds = math.floor(now)
local day = math.floor(seconds / 86400)
local quota_reset = (day + 1) * 86400 - now

-- Days since 1970-01-01 to a civil date (H. Hinnant's algorithm): the sandbox has no os.date.
local function civil_date(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return string.format('%04d-%02d-%02d', y, m, d)
end

local quota_key = KEYS[2] .. civil_date(day)
local quota_used = tonumber(redis.call('GET', quota_key)) or 0

local tokens = burst
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
if state[1] and state[2] then
  -- max(0, ...): a server clock stepped back (failover) must not drain the bucket.
  local elapsed = math.max(0, now - tonumber(state[2]))
  tokens = math.min(burst, tonumber(state[1]) + elapsed * rate)
end

local allowed = 0
local reason = 'ok'
local retry_after = 0
if cost > burst then
  reason = 'too_large'
elseif quota_used + cost > quota_limit then
  reason = 'quota'
  retry_after = quota_reset
elseif tokens < cost then
  reason = 'rate'
  retry_after = (cost - tokens) / rate
else
  allowed = 1
end

if allowed == 1 and consume then
  tokens = tokens - cost
  quota_used = redis.call('INCRBY', quota_key, cost)
  redis.call('EXPIRE', quota_key, math.ceil(quota_reset) + QUOTA_MARGIN_S)
  local ttl_ms = math.min(MAX_TTL_MS, math.ceil((burst - tokens) / rate * 1000) + BUCKET_MARGIN_MS)
  -- %.17g round-trips a double; HSET would format it with only 14 digits.
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
    'ts', string.format('%.17g', now))
  -- %d: a large Lua number would otherwise be sent as "1e+15", which PEXPIRE rejects.
  redis.call('PEXPIRE', KEYS[1], string.format('%d', ttl_ms))
end

local function num(x)
  return string.format('%.17g', x)
end

return table.concat({
  tostring(allowed), reason,
  num(burst), num(tokens), num(rate), num((burst - tokens) / rate),
  num(quota_limit), num(quota_used), num(math.max(0, quota_limit - quota_used)),
  num(quota_reset), num(retry_after),
}, ' ')
