"""The turn queue between front ends and inference workers.

`TurnQueue` is what the chat service and the workers share; two implementations:

- `RedisTurnQueue` (`neeko.redis_queue`, when `REDIS_URL` is set): turns go on a stream read
  by a consumer group of workers (`XREADGROUP`). A worker streams reply chunks to the turn's
  reply stream, writes the final event once (`SET NX`, in one script with its publication)
  and acknowledges the turn. Delivery is at-least-once and replies are at-most-once: a
  redelivered turn whose result exists is re-published, not regenerated. A dead worker's
  turns are reclaimed with `XAUTOCLAIM` (live workers keep theirs fresh with
  `XCLAIM ... JUSTID`); a turn started `max_attempts` times goes to the dead-letter stream
  and its requester gets the error.
- `LocalTurnQueue`: the same protocol over asyncio primitives, for the terminal chat and
  single-process bots.

Training jobs (`neeko.jobs`) and catalog events (`neeko.events`) have interfaces of their
own; `neeko.transport.open_transport` opens the three together.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from neeko.errors import NeekoError
from neeko.protocol import Reply, ReplyEvent, Turn

log = logging.getLogger(__name__)
MAX_RESULTS = 100_000
"""The in-process queue remembers this many answered turns (for idempotent resubmission)."""


class QueueError(NeekoError):
    """The queue cannot serve a turn."""


class NoWorkerError(QueueError):
    """No worker is alive to answer."""


class TurnTimeout(QueueError):
    """No reply came in time."""


class TurnFailed(QueueError):
    """The turn failed on every attempt (it is in the dead-letter stream)."""


@dataclass(frozen=True)
class QueueConfig:
    """Delivery and retention settings shared by clients and workers."""

    max_attempts: int = 3
    """Starts of a turn or job before it is dead-lettered / marked failed."""
    claim_idle_ms: int = 30_000
    """A pending turn idle this long belonged to a dead worker and is reclaimed. Live
    workers refresh their turns every `claim_idle_ms / 3`, so a long generation is safe."""
    job_idle_ms: int = 60_000
    """The same for expansion jobs (trainers heartbeat every `job_idle_ms / 3`)."""
    reply_ttl_s: int = 3600
    """Reply streams, results and attempt counters expire after this."""
    max_turns: int = 100_000
    """Approximate cap of the turn stream (acknowledged turns are deleted at once)."""
    max_dead: int = 10_000
    """Approximate cap of the dead-letter stream."""
    alive_ttl_s: float = 15.0
    """A worker that has not sent a heartbeat for this long counts as dead."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.claim_idle_ms < 1 or self.reply_ttl_s < 1:
            raise ValueError("max_attempts, claim_idle_ms and reply_ttl_s must be >= 1")


def _attempt_of(tag: str) -> int:
    """The delivery number in a chunk's tag (`Delivery.tag`, `msg_id#N`)."""
    _, _, number = tag.rpartition("#")
    return int(number) if number.isdigit() else 0


@dataclass(frozen=True)
class Delivery:
    """A turn handed to a worker."""

    turn: Turn
    msg_id: str
    attempt: int

    @property
    def tag(self) -> str:
        """Names this delivery in chunk events: `msg_id#attempt`, attempts counting up per turn.

        Chunks of a later attempt restart the reply; those of an earlier one are dropped.
        """
        return f"{self.msg_id}#{self.attempt}"


@dataclass(frozen=True)
class Chunk:
    """A piece of reply text; `reset` means drop the text so far (a retried generation)."""

    text: str
    reset: bool = False


class TurnQueue(abc.ABC):
    """What front ends (through the chat service) and inference workers share."""

    def __init__(self, config: QueueConfig | None = None) -> None:
        """A queue with `config` (delivery and retention settings)."""
        self.config = config or QueueConfig()

    # -- front ends ----------------------------------------------------------------

    async def submit(self, turn: Turn, timeout: float = 300.0) -> AsyncIterator[Chunk | Reply]:
        """Queue `turn` (once per id) and yield its reply chunks, then the final `Reply`.

        Raises:
            NoWorkerError: No worker is alive (the turn is not queued).
            TurnTimeout: No final reply within `timeout` seconds.
            TurnFailed: The turn was dead-lettered; the message says why.
        """
        (stream,) = await self.submit_group([turn], timeout)
        async for item in stream:
            yield item

    async def submit_group(
        self, turns: Sequence[Turn], timeout: float = 300.0
    ) -> list[AsyncIterator[Chunk | Reply]]:
        """Queue `turns` together and return each one's stream (what `submit` yields).

        A worker fetches the group in one read: several characters answering one message
        go this way, so their rows are prefilled and decoded as one batch.

        Raises:
            NoWorkerError: No worker is alive (no turn is queued).
        """
        if len({t.id for t in turns}) < len(turns):
            raise ValueError("the turns of a group need distinct ids")
        if not await self.workers_alive():
            raise NoWorkerError("no worker is running; start one with `neeko worker`")
        await self._enqueue(turns)
        deadline = time.monotonic() + timeout
        return [self._stream(t, deadline, timeout) for t in turns]

    async def _stream(
        self, turn: Turn, deadline: float, timeout: float
    ) -> AsyncIterator[Chunk | Reply]:
        current = 0  # the delivery whose text is shown
        async for event in self._reply_events(turn.id, deadline):
            if event.kind == "chunk":
                attempt = _attempt_of(event.attempt)
                if attempt < current:  # a worker taken over while still running: stale text
                    continue
                yield Chunk(event.text, reset=0 < current < attempt)
                current = attempt
            elif event.kind == "done" and event.reply is not None:
                yield event.reply
                return
            else:
                raise TurnFailed(f"turn {turn.id} failed: {event.error}")
        raise TurnTimeout(f"no reply to turn {turn.id} within {timeout:.0f} s")

    async def ask(self, turn: Turn, timeout: float = 300.0) -> Reply:
        """Submit `turn` and wait for its final reply."""
        async for item in self.submit(turn, timeout):
            if isinstance(item, Reply):
                return item
        raise TurnTimeout(f"no reply to turn {turn.id}")  # pragma: no cover (submit raises)

    @abc.abstractmethod
    async def _enqueue(self, turns: Sequence[Turn]) -> None:
        """Queue each turn whose id was never queued, all at once."""

    @abc.abstractmethod
    def _reply_events(self, turn_id: str, deadline: float) -> AsyncIterator[ReplyEvent]:
        """Reply events until a final one; stops silently at `deadline`."""

    # -- workers -------------------------------------------------------------------

    @abc.abstractmethod
    async def fetch(self, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        """Up to `count` turns to run (reclaimed ones first), waiting up to `block_ms`."""

    @abc.abstractmethod
    async def publish(self, chunks: list[tuple[Delivery, str]]) -> None:
        """Append reply chunks to their turns' reply streams."""

    @abc.abstractmethod
    async def complete(self, delivery: Delivery, reply: Reply) -> bool:
        """Write the final reply once and acknowledge; False if it was already answered."""

    @abc.abstractmethod
    async def fail(self, delivery: Delivery, error: str) -> bool:
        """Retry the turn, or dead-letter it after `max_attempts`; True if dead-lettered."""

    async def touch(self, consumer: str, deliveries: list[Delivery]) -> None:  # noqa: B027
        """Tell the queue these turns are still being worked on."""

    @abc.abstractmethod
    async def heartbeat(self, consumer: str) -> None:
        """Mark `consumer` alive."""

    @abc.abstractmethod
    async def leave(self, consumer: str) -> None:
        """Mark `consumer` gone (clean shutdown)."""

    @abc.abstractmethod
    async def workers_alive(self) -> int:
        """How many workers sent a heartbeat recently."""

    @abc.abstractmethod
    async def count(self, **counters: int) -> None:
        """Add to the shared counters (turns, steps, step_rows, ...)."""

    @abc.abstractmethod
    async def stats(self) -> dict:
        """Counters, queue lag and dead letters."""

    async def close(self) -> None:  # noqa: B027
        """Release connections."""


async def stop_task(task: asyncio.Task, timeout: float = 5.0) -> None:
    """Cancel `task` and wait up to `timeout` s for it to end.

    The wait is bounded because a cancellation can be swallowed on its way through a Redis
    call (the task then carries on as if nothing happened); such a task is left behind.
    """
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        log.warning("task %s did not stop within %.0f s", task.get_name(), timeout)
    elif not task.cancelled() and task.exception() is not None:
        log.warning("task %s failed: %r", task.get_name(), task.exception())


class LocalTurnQueue(TurnQueue):
    """The turn queue protocol in one process, over asyncio primitives."""

    def __init__(
        self, config: QueueConfig | None = None, counters: Counter[str] | None = None
    ) -> None:
        """An empty in-process queue; `counters` may be shared with a `LocalJobQueue`."""
        super().__init__(config)
        self._turns: asyncio.Queue[tuple[str, Turn]] = asyncio.Queue()
        self._replies: dict[str, list[ReplyEvent]] = defaultdict(list)
        self._results: OrderedDict[str, ReplyEvent] = OrderedDict()  # the newest MAX_RESULTS
        self._changed = asyncio.Condition()
        self._attempts: Counter[str] = Counter()
        self._seq = 0
        self.dead: list[tuple[Turn, str]] = []
        self._alive: dict[str, float] = {}
        self._stats: Counter[str] = Counter() if counters is None else counters

    async def _enqueue(self, turns: Sequence[Turn]) -> None:
        for turn in turns:  # no await between puts: a fetch sees all of them or none
            if turn.id in self._replies or turn.id in self._results:
                continue
            self._replies[turn.id] = []
            self._seq += 1
            self._turns.put_nowait((str(self._seq), turn))

    async def _put(self, turn: Turn) -> None:
        self._seq += 1
        await self._turns.put((str(self._seq), turn))

    async def _reply_events(self, turn_id: str, deadline: float) -> AsyncIterator[ReplyEvent]:
        seen = 0
        while True:
            events = self._replies.get(turn_id) or (
                [self._results[turn_id]] if turn_id in self._results else []
            )
            for event in events[seen:]:
                yield event
                if event.kind != "chunk":
                    self._replies.pop(turn_id, None)
                    return
            seen = len(events)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def fetch(self, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        """Up to `count` queued turns, waiting up to `block_ms` for the first."""
        out: list[Delivery] = []
        try:
            first = (
                await asyncio.wait_for(self._turns.get(), block_ms / 1000)
                if block_ms
                else (self._turns.get_nowait())
            )
        except (TimeoutError, asyncio.QueueEmpty):
            return out
        items = [first]
        while len(items) < count and not self._turns.empty():
            items.append(self._turns.get_nowait())
        for msg_id, turn in items:
            if turn.id in self._results:
                await self._notify()
                continue
            self._attempts[turn.id] += 1
            delivery = Delivery(turn, msg_id, self._attempts[turn.id])
            if delivery.attempt > self.config.max_attempts:
                await self._dead_letter(delivery, "too many attempts")
                continue
            out.append(delivery)
        return out

    async def publish(self, chunks: list[tuple[Delivery, str]]) -> None:
        """Append reply chunks."""
        for d, text in chunks:
            if d.turn.id in self._replies:
                self._replies[d.turn.id].append(ReplyEvent(kind="chunk", text=text, attempt=d.tag))
        await self._notify()

    async def complete(self, delivery: Delivery, reply: Reply) -> bool:
        """Write the final reply once."""
        return await self._finish(delivery.turn.id, ReplyEvent(kind="done", reply=reply))

    async def _finish(self, turn_id: str, event: ReplyEvent) -> bool:
        if turn_id in self._results:
            return False
        self._results[turn_id] = event
        self._attempts.pop(turn_id, None)
        while len(self._results) > MAX_RESULTS:
            self._results.popitem(last=False)
        if turn_id in self._replies:
            self._replies[turn_id].append(event)
        await self._notify()
        return True

    async def fail(self, delivery: Delivery, error: str) -> bool:
        """Retry, or dead-letter after `max_attempts`."""
        if delivery.attempt >= self.config.max_attempts:
            await self._dead_letter(delivery, error)
            return True
        await self._put(delivery.turn)
        return False

    async def _dead_letter(self, delivery: Delivery, error: str) -> None:
        self.dead.append((delivery.turn, error))
        self._stats["dead"] += 1
        await self._finish(delivery.turn.id, ReplyEvent(kind="error", error=error))

    async def heartbeat(self, consumer: str) -> None:
        """Mark `consumer` alive."""
        self._alive[consumer] = time.monotonic()

    async def leave(self, consumer: str) -> None:
        """Forget `consumer`."""
        self._alive.pop(consumer, None)

    async def workers_alive(self) -> int:
        """Workers with a recent heartbeat."""
        now = time.monotonic()
        return sum(now - t < self.config.alive_ttl_s for t in self._alive.values())

    async def count(self, **counters: int) -> None:
        """Add to the counters."""
        self._stats.update(counters)

    async def stats(self) -> dict:
        """Counters and queue length."""
        return {**mean_batch(dict(self._stats)), "queued": self._turns.qsize()}


def mean_batch(counters: dict) -> dict:
    """Counters as ints, plus `mean_batch`: the mean number of rows per decode step."""
    out = {k: int(v) for k, v in counters.items()}
    steps = out.get("steps", 0)
    out["mean_batch"] = round(out.get("step_rows", 0) / steps, 3) if steps else 0.0
    return out
