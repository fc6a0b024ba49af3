"""The Redis connection a process shares, and how its calls outlive a Redis restart.

`connect` opens one pool for the turn queue, the job queue and the event bus together.
`retry` re-runs a call while Redis is unreachable. A retried call must build its pipeline
inside the function it retries: redis-py empties a pipeline after a failed `execute()`, so
re-running the same pipeline object would send nothing. State changes that must not be
applied twice by a retry (the first run may have reached Redis before the connection
dropped) are Lua scripts that check before they write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
import redis.exceptions as rex

log = logging.getLogger(__name__)
T = TypeVar("T")
UNAVAILABLE = (rex.ConnectionError, rex.TimeoutError, rex.BusyLoadingError)
"""Errors of a Redis that is down, restarting or loading its data: worth waiting out."""


def connect(url: str) -> aioredis.Redis:
    """A client of `url` (`redis://host:port/db`) on a pool of its own; connects lazily.

    Callers wait for a free connection instead of failing when all 32 are in use.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=32, timeout=60, socket_connect_timeout=5, health_check_interval=15
    )
    return aioredis.Redis(connection_pool=pool)


async def disconnect(client: aioredis.Redis) -> None:
    """Close `client` and its pool."""
    await client.aclose()
    await client.connection_pool.disconnect()


async def retry(what: str, fn: Callable[[], Awaitable[T]], deadline: float | None = None) -> T:
    """Run `fn`, retrying while Redis is unavailable, with backoff (until `deadline`).

    Args:
        what: Names the call in log lines.
        fn: Makes the whole call afresh each time (build pipelines inside it).
        deadline: A `time.monotonic()` after which the last error is raised.
    """
    delay = 0.05
    while True:
        try:
            return await fn()
        except UNAVAILABLE as exc:
            if deadline is not None and time.monotonic() + delay > deadline:
                raise
            log.warning("redis unavailable during %s (%s); retrying in %.1f s", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def ensure_group(client: aioredis.Redis, stream: str, group: str) -> None:
    """Create consumer group `group` on `stream` (and the stream) unless it exists."""
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except rex.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


# KEYS: stream, dead-letter stream, stats hash[, job hash]. ARGV: group, message id,
# payload, error, dead-letter cap, counter name[, job status].
# Acknowledges and deletes a malformed entry. Only the call that acknowledges it records
# the dead letter, counts it (and marks the job failed), so a retried call whose first run
# reached Redis does none of it twice.
DROP = """
local first = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1
redis.call('XDEL', KEYS[1], ARGV[2])
if first then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'data', ARGV[3], 'error', ARGV[4])
  redis.call('HINCRBY', KEYS[3], ARGV[6], 1)
  if KEYS[4] then redis.call('HSET', KEYS[4], 'data', ARGV[7]) end
end
return first and 1 or 0
"""
