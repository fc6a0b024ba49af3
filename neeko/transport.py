"""Opening the turn queue, the job queue and the event bus of a process, together.

On Redis (a URL, or `$REDIS_URL`) the three share one client and its connection pool;
without one they run in this process (`neeko chat`, a single-process bot).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType

from neeko.events import EventBus, LocalEventBus
from neeko.jobs import JobQueue, LocalJobQueue
from neeko.queue import LocalTurnQueue, QueueConfig, TurnQueue
from neeko.redis_client import connect, disconnect
from neeko.redis_events import RedisEventBus
from neeko.redis_jobs import RedisJobQueue
from neeko.redis_queue import RedisTurnQueue


@dataclass
class Transport:
    """Everything a process sends and receives through: turns, training jobs, events."""

    turns: TurnQueue
    jobs: JobQueue
    events: EventBus
    release: Callable[[], Awaitable[None]] | None = None
    """Closes what the three share (the Redis client), after each has closed its own."""

    async def close(self) -> None:
        """Close the three, then what they share."""
        await self.turns.close()
        await self.jobs.close()
        await self.events.close()
        if self.release is not None:
            await self.release()

    async def __aenter__(self) -> Transport:
        """Itself."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close."""
        await self.close()


def open_transport(url: str | None = None, config: QueueConfig | None = None) -> Transport:
    """Redis at `url` (default `$REDIS_URL`; "" means none), else in-process queues."""
    url = url if url is not None else os.environ.get("REDIS_URL", "")
    if url:
        return _redis_transport(url, config)
    counters: Counter[str] = Counter()  # one set of counters, as in Redis
    return Transport(
        LocalTurnQueue(config, counters), LocalJobQueue(config, counters), LocalEventBus()
    )


def _redis_transport(url: str, config: QueueConfig | None) -> Transport:
    client = connect(url)

    async def release() -> None:
        await disconnect(client)

    return Transport(
        RedisTurnQueue(client, config),
        RedisJobQueue(client, config),
        RedisEventBus(client),
        release,
    )
