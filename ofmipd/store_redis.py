"""The Redis store: counters and records shared by every ofmipd node that names one server.

The rules are those of ofmipd/store.py's Counter, in Lua, so each step on one key is
atomic and timed by Redis' own clock (nodes need not agree on the time). Each key
lives in its own hash slot ({key} hash tags), so a Redis Cluster works: a reservation
over several keys takes them one by one and gives back what it took if one is full.
No retries: a login must not wait for Redis to come back (the limiter fails open or
closed instead).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from ofmipd.errors import ConfigError
from ofmipd.store import Blocked, Grant, Limit, StoreDown, new_token

# KEYS: counter hash, holds sorted set (member "token:units", score expiry ms).
# ARGV: budget, units, hold ms, token, has ladder (1/0).
# Returns {0, expiry ms, units used} granted, {1, ms} locked or spent, {2, ms} full of holds.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local c = redis.call('HMGET', KEYS[1], 'used', 'window_end', 'locked_until')
local used = tonumber(c[1]) or 0
local window_end = tonumber(c[2]) or 0
local locked_until = tonumber(c[3]) or 0
if locked_until > now then return {1, locked_until - now} end
if now >= window_end then used = 0 end
local budget, units = tonumber(ARGV[1]), tonumber(ARGV[2])
if ARGV[5] == '0' and used + units > budget then return {1, window_end - now} end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local held, first = 0, nil
local items = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = 1, #items, 2 do
  held = held + tonumber(string.match(items[i], ':(%d+)$'))
  local expires = tonumber(items[i + 1])
  if first == nil or expires < first then first = expires end
end
local needed = units
if ARGV[5] == '1' then needed = 1 end
if used + held + needed > budget then return {2, (first or now) - now} end
local hold = tonumber(ARGV[3])
redis.call('ZADD', KEYS[2], now + hold, ARGV[4] .. ':' .. ARGV[2])
if redis.call('PTTL', KEYS[2]) < hold then redis.call('PEXPIRE', KEYS[2], hold) end
return {0, now + hold, used}
"""

# KEYS: counter hash, holds sorted set. ARGV: hold member, charge, budget, window ms,
# has ladder (1/0), base ms, max ms, memory ms. Returns the ms of a lock it started.
_SETTLE = """
redis.call('ZREM', KEYS[2], ARGV[1])
local charge = tonumber(ARGV[2])
if charge <= 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local c = redis.call('HMGET', KEYS[1], 'used', 'window_end', 'level', 'level_end', 'locked_until')
local used = tonumber(c[1]) or 0
local window_end = tonumber(c[2]) or 0
local level = tonumber(c[3]) or 0
local level_end = tonumber(c[4]) or 0
local locked_until = tonumber(c[5]) or 0
if now >= window_end then used = 0; window_end = now + tonumber(ARGV[4]) end
if now >= level_end then level = 0 end
used = used + charge
local started = 0
if ARGV[5] == '1' and used >= tonumber(ARGV[3]) then
  used, window_end = 0, 0
  level = math.min(level + 1, 60)
  started = math.floor(math.min(tonumber(ARGV[6]) * 2 ^ (level - 1), tonumber(ARGV[7])))
  if started < 1 then started = 1 end
  locked_until = now + started
  level_end = locked_until + tonumber(ARGV[8])
end
redis.call('HSET', KEYS[1], 'used', used, 'window_end', string.format('%d', window_end),
  'level', level, 'level_end', string.format('%d', level_end),
  'locked_until', string.format('%d', locked_until))
local last = math.max(window_end, level_end, locked_until, now + 1)
redis.call('PEXPIREAT', KEYS[1], string.format('%d', last))
return started
"""


class RedisStore:
    name = "redis"

    def __init__(self, url: str, timeout: float = 0.5, key_prefix: str = "ofmipd:rl:") -> None:
        try:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import RedisError
        except ImportError as error:
            raise ConfigError(
                "ratelimit: a redis:// store needs the redis package (pip install redis)"
            ) from error
        self.url = url
        self.timeout = timeout
        self.key_prefix = key_prefix
        self._errors: tuple[type[BaseException], ...] = (RedisError, TimeoutError, OSError)
        from ofmipd.urls import split_url

        split_url(url, "ratelimit: Redis URL")  # brackets and port, the password hidden
        try:
            self._redis = aioredis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as error:
            from ofmipd.logs import redact_url

            raise ConfigError(f"ratelimit: bad Redis URL {redact_url(url)!r}: {error}") from None
        self._reserve = self._redis.register_script(_RESERVE)
        self._settle = self._redis.register_script(_SETTLE)

    def describe(self) -> str:
        from ofmipd.logs import redact_url

        return f"redis {redact_url(self.url)}"

    def _keys(self, key: str) -> list[str]:
        base = f"{self.key_prefix}{{{key}}}"
        return [base + ":c", base + ":h"]

    async def _run(self, work: Any) -> Any:
        try:
            return await asyncio.wait_for(work, self.timeout * 2)
        except self._errors as error:
            raise StoreDown(f"{type(error).__name__}: {error}".rstrip(": ")) from error

    async def reserve(self, limits: Sequence[Limit], units: int, hold: float) -> Grant | Blocked:
        token = new_token()
        taken: list[Limit] = []
        used: list[int] = []
        expires = 0.0
        for limit in limits:
            args: list[str | int] = [limit.budget, units, max(1, int(hold * 1000)), token,
                                     0 if limit.ladder is None else 1]  # fmt: skip
            reply = await self._run(self._reserve(keys=self._keys(limit.key), args=args))
            status, ms = int(reply[0]), int(reply[1])
            if status != 0:
                if taken:
                    await self._release(taken, f"{token}:{units}")
                return Blocked(limit.key, max(0, ms) / 1000.0, status == 1)
            taken.append(limit)
            used.append(int(reply[2]))
            expires = ms / 1000.0
        return Grant(token, tuple(limits), units, expires, tuple(used))

    async def _release(self, limits: Sequence[Limit], member: str) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for limit in limits:
                pipe.zrem(self._keys(limit.key)[1], member)
            await self._run(pipe.execute())

    async def settle(
        self, grant: Grant, charge: int, keys: Sequence[str] | None = None
    ) -> list[float]:
        member = f"{grant.token}:{grant.units}"
        started = []
        for limit in grant.limits:
            counted = charge if keys is None or limit.key in keys else 0
            ladder = limit.ladder
            args: list[str | int] = [
                member, counted, limit.budget, max(1, int(limit.window * 1000)),
                0 if ladder is None else 1,
                int(ladder.base * 1000) if ladder else 0,
                int(ladder.max * 1000) if ladder else 0,
                int(ladder.memory * 1000) if ladder else 0,
            ]  # fmt: skip
            ms = await self._run(self._settle(keys=self._keys(limit.key), args=args))
            started.append(int(ms) / 1000.0)
        return started

    async def forgive(self, keys: Sequence[str]) -> None:
        if keys:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hdel(self._keys(key)[0], "used", "window_end")
                await self._run(pipe.execute())

    async def get(self, key: str) -> str | None:
        value = await self._run(self._redis.get(self.key_prefix + "r:" + key))
        return None if value is None else value.decode("utf-8", "replace")

    async def put(self, key: str, value: str, ttl: float) -> None:
        await self._run(
            self._redis.set(self.key_prefix + "r:" + key, value, px=max(1, int(ttl * 1000)))
        )

    async def close(self) -> None:
        await self._redis.aclose()
