"""Per-key rate limits that hold across gateway replicas, in Redis.

One gateway keeps its token buckets in process (`server.limits.RateLimiter`, the default). With
several replicas behind a load balancer that allows N times the configured rate, so
`--limits.backend redis` keeps every key's bucket in Redis instead: one Lua script refills and
takes a token atomically, on Redis's own clock (`TIME`), so replicas' clocks do not matter and
two replicas can never spend the same token. Idle buckets expire once they would be full again.

If Redis cannot be reached the gateway keeps serving with its in-process buckets (each replica
then enforces the rate on its own), logs it, and counts it in
`obliviate_shared_limit_fallbacks_total`; it goes back to Redis as soon as Redis answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from server.limits import RateLimiter

logger = logging.getLogger(__name__)

# KEYS[1]: the bucket; ARGV: capacity, refill per second. Returns the wait in seconds (string:
# Lua numbers would be truncated to integers on the way back).
TOKEN_BUCKET = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1]) or capacity
local stamp = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - stamp) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return tostring(wait)
"""


class RedisLimiter:
    """Token buckets in Redis, shared by every replica using the same Redis and prefix."""

    def __init__(
        self,
        url: str,
        per_minute: int,
        *,
        prefix: str = "obliviate:rate:",
        timeout_s: float = 0.5,
        on_fallback: Callable[[], None] | None = None,
    ) -> None:
        import redis.asyncio as redis

        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._script = self._client.register_script(TOKEN_BUCKET)
        self._capacity = float(per_minute)
        self._per_second = per_minute / 60.0
        self._prefix = prefix
        self._local = RateLimiter(per_minute)
        self._on_fallback = on_fallback
        self._warned_at = 0.0

    async def wait_s(self, key: str) -> float:
        try:
            wait = await self._script(
                keys=[self._prefix + key], args=[self._capacity, self._per_second]
            )
            return float(wait)
        except Exception as e:  # redis.RedisError, OSError, timeouts: keep serving
            if self._on_fallback is not None:
                self._on_fallback()
            if time.monotonic() - self._warned_at > 30:
                self._warned_at = time.monotonic()
                logger.warning(
                    "Redis rate limits unavailable (%s: %s); enforcing them per replica until it "
                    "answers again",
                    type(e).__name__,
                    e,
                )
            return self._local.wait_s(key)

    async def close(self) -> None:
        await self._client.aclose()
