"""`EventBus` on a Redis stream (`keys.EVENTS`) that every process reads in full.

Block bytes are stored under `keys.block(key)`, written before the event that announces
them. An entry that is not a valid event is logged once and skipped, so no process is kept
from starting or from applying the events after it.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis

from neeko import keys
from neeko.events import EventBus
from neeko.protocol import CatalogEvent
from neeko.redis_client import retry

log = logging.getLogger(__name__)
PAGE = 1000
"""Events read per `XREAD`."""
MAX_EVENTS = 100_000
"""Approximate cap of the event stream."""


class RedisEventBus(EventBus):
    """Catalog events on one Redis server."""

    def __init__(self, client: aioredis.Redis) -> None:
        """A bus over `client` (`neeko.redis_client.connect`); the caller closes it."""
        self.redis = client
        self._skipped: set[str] = set()  # malformed entries already logged

    async def publish(self, event: CatalogEvent, block: bytes | None = None) -> None:
        """Store the block bytes (when given) and append the event, in one transaction."""
        data = event.model_dump_json()

        async def write() -> None:
            pipe = self.redis.pipeline(transaction=True)
            if block is not None:
                pipe.set(keys.block(event.key), block)
            pipe.xadd(keys.EVENTS, {"data": data}, maxlen=MAX_EVENTS)
            await pipe.execute()

        await retry("publish event", write)

    async def read(self, after: str) -> list[tuple[str, CatalogEvent]]:
        """Valid events after `after`; reads on past pages of malformed entries only."""
        out: list[tuple[str, CatalogEvent]] = []
        while not out:
            got = await retry(
                "events", lambda a=after: self.redis.xread({keys.EVENTS: a}, count=PAGE)
            )
            entries = [e for _, batch in got for e in batch]
            for raw_id, fields in entries:
                event_id = raw_id.decode()
                try:
                    out.append((event_id, CatalogEvent.model_validate_json(fields[b"data"])))
                except Exception as exc:  # any entry that is not an event (pydantic, recursion)
                    self._skip(event_id, exc)
            if len(entries) < PAGE:
                break
            after = entries[-1][0].decode()
        return out

    def _skip(self, event_id: str, exc: Exception) -> None:
        if event_id not in self._skipped:
            self._skipped.add(event_id)
            log.error(
                "skipping malformed catalog event %s: %s: %s", event_id, type(exc).__name__, exc
            )

    async def block(self, key: str) -> bytes:
        """A trained block's bytes."""
        data = await retry("block", lambda: self.redis.get(keys.block(key)))
        if data is None:
            raise KeyError(f"no block for {key!r} in redis")
        return data
