"""The catalog event bus: how every process hears that a character got a new block.

A trainer publishes a `CatalogEvent` with the block's bytes; workers and front ends read
the events after the last one they applied. `LocalEventBus` keeps them in one process,
`RedisEventBus` (`neeko.redis_events`) in a stream every process reads in full, so a
process that starts later replays them. The bus treats an event as opaque apart from its
`key`, under which the block's bytes are stored.
"""

from __future__ import annotations

import abc

from neeko.protocol import CatalogEvent


class EventBus(abc.ABC):
    """Catalog events and the block bytes that travel with them."""

    @abc.abstractmethod
    async def publish(self, event: CatalogEvent, block: bytes | None = None) -> None:
        """Store `block` (when given) under `event.key`, then append `event`."""

    @abc.abstractmethod
    async def read(self, after: str) -> list[tuple[str, CatalogEvent]]:
        """Events after the event id `after` ("0" for all), without waiting.

        Never raises for an entry that is not a valid event: it is logged and skipped.
        """

    @abc.abstractmethod
    async def block(self, key: str) -> bytes:
        """The block bytes published with `key`'s event.

        Raises:
            KeyError: None were published.
        """

    async def close(self) -> None:  # noqa: B027
        """Release what this bus holds of its own."""


class LocalEventBus(EventBus):
    """Events in one process (ids are their positions, from "1")."""

    def __init__(self) -> None:
        """An empty bus."""
        self._events: list[CatalogEvent] = []
        self._blocks: dict[str, bytes] = {}

    async def publish(self, event: CatalogEvent, block: bytes | None = None) -> None:
        """Keep the block and record the event."""
        if block is not None:
            self._blocks[event.key] = block
        self._events.append(event)

    async def read(self, after: str) -> list[tuple[str, CatalogEvent]]:
        """Events after position `after`."""
        start = int(after.split("-")[0]) if after != "0" else 0
        return [(str(i + 1), e) for i, e in enumerate(self._events) if i >= start]

    async def block(self, key: str) -> bytes:
        """A stored block."""
        try:
            return self._blocks[key]
        except KeyError:
            raise KeyError(f"no block was published for {key!r}") from None
