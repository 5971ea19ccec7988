"""The store's Lua scripts (``gateway.store.redis``): each compound operation, atomic in one round trip.

Each script touches only ``KEYS`` that share one hash slot (``base.one_slot``), so it runs on a Redis
Cluster as on one node; a ``PUBLISH`` inside one names a channel, not a key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.store.resp import ReplyError, RespClient

# ARGV: expected, channel or ''.
COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[2] ~= '' then redis.call('PUBLISH', ARGV[2], 'released') end
return 1
"""

# ARGV: expected, value, ttl ms or '', channel or ''.
COMPARE_AND_SET = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == '' then redis.call('SET', KEYS[1], ARGV[2])
else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[4], 'done') end
return 1
"""

# ARGV: ttl ms or '', then field, amount pairs.
HINCR_MANY = """
for i = 2, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[1] ~= '' and redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 1
"""

# KEYS: counters; ARGV: amount, then limit and ttl ms per key. -1 when reserved, else the
# 0-based index of the first counter the amount would overrun.
RESERVE = """
local amount = tonumber(ARGV[1])
for i = 1, #KEYS do
  local current = tonumber(redis.call('GET', KEYS[i]) or '0')
  if current + amount > tonumber(ARGV[2 * i]) + 1e-12 then return i - 1 end
end
for i = 1, #KEYS do
  if amount < 0 and tonumber(redis.call('GET', KEYS[i]) or '0') + amount < 0 then
    redis.call('SET', KEYS[i], '0', 'KEEPTTL')  -- never below zero: what was given back was never there
  else
    redis.call('INCRBYFLOAT', KEYS[i], ARGV[1])
  end
  if redis.call('PTTL', KEYS[i]) == -1 then redis.call('PEXPIRE', KEYS[i], ARGV[2 * i + 1]) end
end
return -1
"""

# ARGV: value, ttl ms. Nil when claimed, else the value that holds the key.
CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX') then return false end
return redis.call('GET', KEYS[1])
"""

# ARGV: command (INCRBY | INCRBYFLOAT | HINCRBYFLOAT), ttl ms or '', command arguments.
# The TTL goes on when the key has none yet, i.e. at the first increment of a window.
COUNTER = """
local v = redis.call(ARGV[1], KEYS[1], unpack(ARGV, 3))
if ARGV[2] ~= '' and redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return v
"""

# ARGV: ttl ms, channel or '', items. One round trip: push, expire, announce the new length.
APPEND = """
local n = redis.call('RPUSH', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then redis.call('PUBLISH', ARGV[2], n) end
return n
"""

# GCRA as in redis-cell: several takes, all or nothing (``Store.take_all``; ``take`` is one of them), as a function
# ``GCRA_ALL`` and ``CLAIM_FIRST`` share: the takes' keys are KEYS after the first ``k0``, each take's delay
# tolerance and increment (seconds) ARGV ``a0 + 2i - 1`` and ``a0 + 2i``; ``now`` nil for TIME. Returns {allowed,
# retry_after (-1 = never), ttl} per key, flattened, and whether one was refused; floats as %.17g strings because a
# Lua number returned to Redis is truncated to an integer.
_GCRA = """
local function gcra(now, k0, a0)
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  end
  local function f(x) return string.format('%.17g', x) end
  local out, writes, refused = {}, {}, false
  for i = 1, #KEYS - k0 do
    local key = KEYS[k0 + i]
    local tolerance, increment = tonumber(ARGV[a0 + 2 * i - 1]), tonumber(ARGV[a0 + 2 * i])
    local tat = math.max(tonumber(redis.call('GET', key)) or now, now)
    local new_tat = tat + increment
    local allow_at = new_tat - tolerance
    if now < allow_at then
      local retry = -1
      if increment <= tolerance then retry = allow_at - now end
      refused = true
      table.insert(out, 0); table.insert(out, f(retry)); table.insert(out, f(tat - now))
    else
      table.insert(out, 1); table.insert(out, '0'); table.insert(out, f(new_tat - now))
      if increment > 0 then table.insert(writes, {key, new_tat}) end
    end
  end
  if not refused then
    for _, w in ipairs(writes) do
      redis.call('SET', w[1], f(w[2]), 'PX', math.ceil((w[2] - now) * 1000))
    end
  end
  return out, refused
end
"""

# ARGV: now or '' for TIME, then per key its delay tolerance and increment.
GCRA_ALL = _GCRA + """
return (gcra(tonumber(ARGV[1]), 0, 1))
"""

# Store.claim_first: KEYS the claims' keys, then the takes'. ARGV: the number of claims, now or '', per claim its
# value and ttl ms, then per take its delay tolerance and increment. Claims in order while each is free (a taken
# one's value is returned, and nothing after it is tried); then the takes, and when one is refused the claims are
# given back (nobody can have seen them). Returns {held per claim tried (nil: ours)} or {held, takes' results}.
CLAIM_FIRST = _GCRA + """
local n = tonumber(ARGV[1])
local held = {}
for i = 1, n do
  if not redis.call('SET', KEYS[i], ARGV[1 + 2 * i], 'PX', ARGV[2 + 2 * i], 'NX') then
    held[i] = redis.call('GET', KEYS[i])
    return {held}
  end
  held[i] = false
end
if #KEYS == n then return {held} end
local taken, refused = gcra(tonumber(ARGV[2]), n, 2 + 2 * n)
if refused then
  for i = 1, n do redis.call('DEL', KEYS[i]) end
end
return {held, taken}
"""

# Store.give_back: KEYS as CLAIM_FIRST's, ARGV: the number of claims, per claim its value, then per take its
# increment (seconds). Each claim still ours is deleted (and announced); when the last one was ours — exactly when
# the takes were taken — each bucket gets its increment back (its theoretical arrival time moved back, not before
# now). Returns 1 when it was, else 0.
GIVE_BACK = """
local n = tonumber(ARGV[1])
local ours = false
for i = 1, n do
  ours = redis.call('GET', KEYS[i]) == ARGV[1 + i]
  if ours then
    redis.call('DEL', KEYS[i])
    redis.call('PUBLISH', KEYS[i], 'released')
  end
end
if not ours then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for j = 1, #KEYS - n do
  local key = KEYS[n + j]
  local tat = tonumber(redis.call('GET', key))
  if tat then
    local back = tat - tonumber(ARGV[1 + n + j])
    if back > now then
      redis.call('SET', key, string.format('%.17g', back), 'PX', math.ceil((back - now) * 1000))
    else
      redis.call('DEL', key)
    end
  end
end
return 1
"""

# Store.commit: several fenced writes. Per key six ARGV: S (set) or D (delete), 1 when fenced, expected, value,
# ttl ms or '', channel or ''. Each write is checked and applied on its own; returns 1 or 0 per key.
COMMIT = """
local out = {}
for i, key in ipairs(KEYS) do
  local b = (i - 1) * 6
  if ARGV[b + 2] == '1' and redis.call('GET', key) ~= ARGV[b + 3] then
    out[i] = 0
  else
    if ARGV[b + 1] == 'D' then redis.call('DEL', key)
    elseif ARGV[b + 5] == '' then redis.call('SET', key, ARGV[b + 4])
    else redis.call('SET', key, ARGV[b + 4], 'PX', ARGV[b + 5]) end
    if ARGV[b + 6] ~= '' then redis.call('PUBLISH', ARGV[b + 6], ARGV[b + 1] == 'D' and 'released' or 'done') end
    out[i] = 1
  end
end
return out
"""


class Script:
    """A Lua script run by its SHA1; loaded on first use (and again after a Redis restart or on a
    node that has not seen it). ``run`` sends a command — a client's ``execute``, or a Cluster's
    routed by the script's first key."""

    def __init__(self, run: Callable[..., Awaitable[Any]] | RespClient, text: str) -> None:
        self.run = run.execute if isinstance(run, RespClient) else run
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA1

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.run("EVALSHA", self.sha, len(keys), *keys, *args)
        except ReplyError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
        return await self.run("EVAL", self.text, len(keys), *keys, *args)
