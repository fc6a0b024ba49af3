"""The one follower of catalog events in a process.

It applies each event to the catalog, then tells the listeners (a worker loads a new block;
moderation mirrors the status into its database). Events come from every process that
changes characters (the bot, trainers); one that does not validate or contradicts the
catalog is logged and skipped, never raised: one bad event must not stop a worker or the bot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from neeko.characters import CatalogError, Status

if TYPE_CHECKING:
    from neeko.catalog import Catalog
    from neeko.events import EventBus
    from neeko.protocol import CatalogEvent

log = logging.getLogger(__name__)
Listener = Callable[["CatalogEvent"], Awaitable[None]]


class CatalogFollower:
    """Reads the event bus from its start and applies every event to `catalog`, in order."""

    def __init__(self, catalog: Catalog, events: EventBus, interval_s: float = 0.5) -> None:
        """A follower; `poll()` applies what is new, `start()` polls in the background."""
        self.catalog, self.events, self.interval_s = catalog, events, interval_s
        self._cursor = "0"
        self._listeners: list[Listener] = []
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    def listen(self, listener: Listener) -> None:
        """Call `listener(event)` after each event is applied.

        Also for events that changed nothing here: a listener may keep state of its own,
        such as a bank's slots.
        """
        self._listeners.append(listener)

    async def poll(self) -> int:
        """Apply the events not applied yet; returns how many were read."""
        async with self._lock:
            new = await self.events.read(self._cursor)
            for event_id, event in new:
                self._cursor = event_id
                try:
                    self.catalog.apply(event)
                except CatalogError as exc:
                    log.warning(
                        "catalog event %s (%s %s) skipped: %s", event_id, event.kind, event.key, exc
                    )
                    continue
                for listener in self._listeners:
                    try:
                        await listener(event)
                    except Exception:
                        log.exception("a listener failed on catalog event %s", event_id)
            return len(new)

    async def wait_for(self, key: str, status: Status, timeout_s: float = 30.0) -> bool:
        """Poll until `key` has `status` (True) or `timeout_s` passes (False)."""
        deadline = time.monotonic() + timeout_s
        while True:
            await self.poll()
            char = self.catalog.get(key)
            if char is not None and char.status == status:
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(min(0.1, self.interval_s))

    def start(self) -> None:
        """Poll every `interval_s` in a background task until `stop()`."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="catalog-follower")

    async def stop(self) -> None:
        """Stop the background task."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception as exc:  # the bus is unreachable: try again later
                log.warning("catalog events unavailable (%s)", exc)
            await asyncio.sleep(self.interval_s)
