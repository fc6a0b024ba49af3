"""`TurnQueue` on Redis Streams: consumer groups, reclaiming, dead letters, expansion jobs.

Key names live in `neeko.keys`. Every multi-step state change that must not be torn by a
crash (final reply + its publication + acknowledgement) runs as one Lua script.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
import redis.exceptions as rex
from pydantic import ValidationError
from redis.exceptions import ResponseError

from neeko import keys
from neeko.protocol import CatalogEvent, JobStatus, Reply, ReplyEvent, TrainJob, Turn
from neeko.queue import (
    Delivery,
    JobDelivery,
    QueueConfig,
    TurnQueue,
    _derived,
    _finished,
    _retry,
    log,
    stop_task,
)

READ_BLOCK_MS = 20
"""How long the shared reply reader blocks; a newly awaited stream joins within this."""

# KEYS: result, reply stream, turn stream. ARGV: final event, ttl, group, message id.
# Writes the final event once; publishes it only if this call wrote it; always acks.
FINISH = """
local wrote = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
if wrote then
  redis.call('XADD', KEYS[2], '*', 'data', ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
if ARGV[4] ~= '' then
  redis.call('XACK', KEYS[3], ARGV[3], ARGV[4])
  redis.call('XDEL', KEYS[3], ARGV[4])
end
return wrote and 1 or 0
"""

# KEYS: result, reply stream, turn stream. ARGV: ttl, group, message id.
# A redelivered turn that was already answered: publish the stored final event again if
# the reply stream lost it (it expired), then ack. Returns 1 if there was a result.
REPUBLISH = """
local final = redis.call('GET', KEYS[1])
if not final then return 0 end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #last == 0 or last[1][2][2] ~= final then
  redis.call('XADD', KEYS[2], '*', 'data', final)
  redis.call('EXPIRE', KEYS[2], ARGV[1])
end
redis.call('XACK', KEYS[3], ARGV[2], ARGV[3])
redis.call('XDEL', KEYS[3], ARGV[3])
return 1
"""


class RedisQueue(TurnQueue):
    """The queue on one Redis server (any number of front ends, workers and trainers)."""

    def __init__(self, url: str, config: QueueConfig | None = None) -> None:
        """Connect lazily to `url` (`redis://host:port/db`)."""
        super().__init__(config)
        self.url = url
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=32, timeout=60, socket_connect_timeout=5, health_check_interval=15
        )  # callers wait for a free connection instead of failing
        self.redis = aioredis.Redis(connection_pool=pool)
        self._finish = self.redis.register_script(FINISH)
        self._republish = self.redis.register_script(REPUBLISH)
        self._groups_ready = False
        self._last_claim = 0.0
        self._waiters: dict[str, list] = {}  # reply stream -> [last id read, inbox]
        self._reader: asyncio.Task | None = None

    async def close(self) -> None:
        """Stop the reply reader and close the connection pool."""
        if self._reader is not None:
            await stop_task(self._reader)
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()

    async def _groups(self) -> None:
        if self._groups_ready:
            return
        for stream, group in ((keys.TURNS, keys.WORKERS), (keys.TRAIN, keys.TRAINERS)):
            try:
                await self.redis.xgroup_create(stream, group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._groups_ready = True

    # -- front ends ----------------------------------------------------------------

    async def _enqueue(self, turn: Turn) -> None:
        async def put() -> None:
            first = await self.redis.set(
                keys.submitted(turn.id), 1, nx=True, ex=self.config.reply_ttl_s
            )
            if first:
                await self.redis.xadd(
                    keys.TURNS,
                    {"data": turn.model_dump_json()},
                    maxlen=self.config.max_turns,
                    approximate=True,
                )

        await _retry("submit", put)

    async def _reply_events(self, turn_id: str, deadline: float) -> AsyncIterator[ReplyEvent]:
        """Events of one reply stream, read by the shared reader (one connection for all)."""
        inbox: asyncio.Queue[ReplyEvent] = asyncio.Queue()
        stream = keys.reply(turn_id)
        self._waiters[stream] = ["0", inbox]
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_replies())
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    event = await asyncio.wait_for(inbox.get(), remaining)
                except TimeoutError:
                    return
                yield event
                if event.kind != "chunk":
                    return
        finally:
            self._waiters.pop(stream, None)

    async def _read_replies(self) -> None:
        """One `XREAD` over every awaited reply stream at a time; hands events to waiters.

        New waiters join within `READ_BLOCK_MS`; events of joined streams arrive at once.
        """
        delay = 0.05
        while self._waiters:
            streams = {s: w[0] for s, w in self._waiters.items()}
            try:
                got = await self.redis.xread(streams, block=READ_BLOCK_MS)
            except (rex.ConnectionError, rex.TimeoutError, rex.BusyLoadingError) as exc:
                log.warning("redis unavailable while reading replies (%s)", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
            for name, entries in got:
                waiter = self._waiters.get(name.decode())
                for msg_id, fields in entries:
                    if waiter is not None:
                        waiter[0] = msg_id.decode()
                        waiter[1].put_nowait(ReplyEvent.model_validate_json(fields[b"data"]))

    # -- workers -------------------------------------------------------------------

    async def fetch(self, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        """Reclaimed turns of dead workers first, then new ones (`XREADGROUP`).

        Survives Redis restarts: entries delivered by a read whose answer was lost stay
        pending and are reclaimed after `claim_idle_ms`.
        """

        async def read() -> list[Delivery]:
            await self._groups()
            entries = await self._reclaim(consumer, count)
            if len(entries) < count:
                try:
                    got = await self.redis.xreadgroup(
                        keys.WORKERS,
                        consumer,
                        {keys.TURNS: ">"},
                        count=count - len(entries),
                        block=block_ms or None,
                    )
                except ResponseError as exc:  # the server lost its data: recreate the group
                    if "NOGROUP" not in str(exc):
                        raise
                    self._groups_ready = False
                    got = []
                entries += [e for _, batch in got for e in batch]
            return await self._admit(entries)

        return await _retry("fetch", read)

    async def _reclaim(self, consumer: str, count: int) -> list:
        """`XAUTOCLAIM` turns idle past `claim_idle_ms` (at most every few seconds)."""
        now = time.monotonic()
        if now - self._last_claim < min(5.0, self.config.claim_idle_ms / 3000):
            return []
        self._last_claim = now
        _, claimed, deleted = await self.redis.xautoclaim(
            keys.TURNS, keys.WORKERS, consumer, self.config.claim_idle_ms, "0-0", count=count
        )
        if deleted:  # trimmed away while pending: nothing left to run
            await self.redis.xack(keys.TURNS, keys.WORKERS, *deleted)
        if claimed:
            log.warning("reclaimed %d turn(s) of a dead worker", len(claimed))
        return [(i, f) for i, f in claimed if f]

    async def _admit(self, entries: list) -> list[Delivery]:
        """Parse entries, count attempts, skip answered turns and dead-letter spent ones."""
        out = []
        for msg_id, fields in entries:
            msg_id = msg_id.decode() if isinstance(msg_id, bytes) else msg_id
            try:
                turn = Turn.model_validate_json(fields[b"data"])
            except (ValidationError, KeyError) as exc:
                await self._drop_malformed(msg_id, fields, str(exc))
                continue
            args = [self.config.reply_ttl_s, keys.WORKERS, msg_id]
            stream_keys = [keys.result(turn.id), keys.reply(turn.id), keys.TURNS]
            if await self._republish(keys=stream_keys, args=args):
                continue
            pipe = self.redis.pipeline(transaction=False)
            pipe.incr(keys.attempts(turn.id))
            pipe.expire(keys.attempts(turn.id), self.config.reply_ttl_s)
            attempt = int((await pipe.execute())[0])
            delivery = Delivery(turn, msg_id, attempt)
            if attempt > self.config.max_attempts:
                await self._dead_letter(delivery, "the turn was started too many times")
                continue
            out.append(delivery)
        return out

    async def _drop_malformed(self, msg_id: str, fields: dict, error: str) -> None:
        log.error("dead-lettering malformed turn %s: %s", msg_id, error)
        raw = fields.get(b"data", b"")
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(keys.DEAD, {"data": raw, "error": error[:2000]}, maxlen=self.config.max_dead)
        pipe.xack(keys.TURNS, keys.WORKERS, msg_id)
        pipe.xdel(keys.TURNS, msg_id)
        pipe.hincrby(keys.STATS, "dead", 1)
        await pipe.execute()

    async def publish(self, chunks: list[tuple[Delivery, str]]) -> None:
        """Append chunk events to reply streams, in one round trip."""
        if not chunks:
            return
        pipe = self.redis.pipeline(transaction=False)
        for d, text in chunks:
            event = ReplyEvent(kind="chunk", text=text, attempt=d.tag).model_dump_json()
            pipe.xadd(keys.reply(d.turn.id), {"data": event})
            pipe.expire(keys.reply(d.turn.id), self.config.reply_ttl_s)
        await _retry("publish", pipe.execute)

    async def complete(self, delivery: Delivery, reply: Reply) -> bool:
        """Final event once (`SET NX`), published, then `XACK` + `XDEL`."""
        event = ReplyEvent(kind="done", reply=reply).model_dump_json()
        return await self._final(delivery, event, delivery.msg_id)

    async def _final(self, delivery: Delivery, event: str, msg_id: str) -> bool:
        turn_id = delivery.turn.id

        async def run() -> int:
            return await self._finish(
                keys=[keys.result(turn_id), keys.reply(turn_id), keys.TURNS],
                args=[event, self.config.reply_ttl_s, keys.WORKERS, msg_id],
            )

        return bool(await _retry("complete", run))

    async def fail(self, delivery: Delivery, error: str) -> bool:
        """Queue the turn again, or dead-letter it after `max_attempts` starts."""
        if delivery.attempt >= self.config.max_attempts:
            await self._dead_letter(delivery, error)
            return True

        async def again() -> None:
            pipe = self.redis.pipeline(transaction=True)
            pipe.xadd(keys.TURNS, {"data": delivery.turn.model_dump_json()})
            pipe.xack(keys.TURNS, keys.WORKERS, delivery.msg_id)
            pipe.xdel(keys.TURNS, delivery.msg_id)
            await pipe.execute()

        await _retry("retry", again)
        return False

    async def _dead_letter(self, delivery: Delivery, error: str) -> None:
        log.error(
            "dead-lettering turn %s after %d attempts: %s",
            delivery.turn.id,
            delivery.attempt,
            error,
        )
        entry = {
            "data": delivery.turn.model_dump_json(),
            "error": error[:2000],
            "attempts": delivery.attempt,
        }
        await _retry(
            "dead-letter",
            lambda: self.redis.xadd(keys.DEAD, entry, maxlen=self.config.max_dead),
        )
        await self.redis.hincrby(keys.STATS, "dead", 1)
        event = ReplyEvent(kind="error", error=error).model_dump_json()
        await self._final(delivery, event, delivery.msg_id)

    async def touch(self, consumer: str, deliveries: list[Delivery]) -> None:
        """Reset the idle time of turns in flight (`XCLAIM ... JUSTID`)."""
        if deliveries:
            ids = [d.msg_id for d in deliveries]
            await _retry(
                "touch",
                lambda: self.redis.xclaim(keys.TURNS, keys.WORKERS, consumer, 0, ids, justid=True),
            )

    async def heartbeat(self, consumer: str) -> None:
        """Record that `consumer` is alive (and forget workers silent for a day)."""

        async def beat() -> None:
            now = time.time()
            pipe = self.redis.pipeline(transaction=False)
            pipe.zadd(keys.ALIVE, {consumer: now})
            pipe.zremrangebyscore(keys.ALIVE, "-inf", now - 86_400)
            await pipe.execute()

        await _retry("heartbeat", beat)

    async def leave(self, consumer: str) -> None:
        """Remove `consumer` from the live set."""
        await self.redis.zrem(keys.ALIVE, consumer)

    async def workers_alive(self) -> int:
        """Workers with a heartbeat within `alive_ttl_s`."""
        since = time.time() - self.config.alive_ttl_s
        return int(await _retry("alive", lambda: self.redis.zcount(keys.ALIVE, since, "+inf")))

    async def count(self, **counters: int) -> None:
        """`HINCRBY` the shared counters."""
        pipe = self.redis.pipeline(transaction=False)
        for name, n in counters.items():
            pipe.hincrby(keys.STATS, name, n)
        await _retry("count", pipe.execute)

    async def stats(self) -> dict:
        """Counters, workers alive, queue lag and pending turns, dead letters."""
        await self._groups()
        raw = await self.redis.hgetall(keys.STATS)
        out = _derived({k.decode(): int(v) for k, v in raw.items()})
        groups = {g["name"].decode(): g for g in await self.redis.xinfo_groups(keys.TURNS)}
        group = groups.get(keys.WORKERS, {})
        out["lag"] = int(group.get("lag") or 0)
        out["pending"] = int(group.get("pending") or 0)
        out["dead_letters"] = int(await self.redis.xlen(keys.DEAD))
        out["workers_alive"] = await self.workers_alive()
        return out

    # -- catalog events ------------------------------------------------------------

    async def publish_block(self, event: CatalogEvent, data: bytes) -> None:
        """Store the block bytes, then append the event (workers load it between batches)."""
        await self.redis.set(keys.block(event.key), data)
        await self.redis.xadd(keys.EVENTS, {"data": event.model_dump_json()}, maxlen=100_000)

    async def read_events(self, after: str) -> list[tuple[str, CatalogEvent]]:
        """Events after `after`."""
        got = await _retry("events", lambda: self.redis.xread({keys.EVENTS: after}, count=1000))
        return [
            (i.decode(), CatalogEvent.model_validate_json(f[b"data"]))
            for _, entries in got
            for i, f in entries
        ]

    async def get_block(self, key: str) -> bytes:
        """A trained block's bytes."""
        data = await _retry("block", lambda: self.redis.get(keys.block(key)))
        if data is None:
            raise KeyError(f"no block for {key!r} in redis")
        return data

    # -- expansion jobs ------------------------------------------------------------

    async def submit_job(self, job: TrainJob, character: str) -> JobStatus:
        """Queue `job` unless a job with its id exists."""
        await self._groups()
        status = JobStatus(id=job.id, character=character)
        if await self.redis.hsetnx(keys.job(job.id), "data", status.model_dump_json()):
            await self.redis.xadd(keys.TRAIN, {"data": job.model_dump_json()})
            return status
        return await self.job_status(job.id) or status

    async def fetch_job(self, consumer: str, block_ms: int) -> JobDelivery | None:
        """A job of a dead trainer (idle past `job_idle_ms`), else the next queued one."""
        await self._groups()
        _, claimed, _ = await self.redis.xautoclaim(
            keys.TRAIN, keys.TRAINERS, consumer, self.config.job_idle_ms, "0-0", count=1
        )
        entries = [(i, f) for i, f in claimed if f]
        if not entries:
            got = await self.redis.xreadgroup(
                keys.TRAINERS, consumer, {keys.TRAIN: ">"}, count=1, block=block_ms or None
            )
            entries = [e for _, batch in got for e in batch]
        if not entries:
            return None
        msg_id, fields = entries[0]
        job = TrainJob.model_validate_json(fields[b"data"])
        attempt = int(await self.redis.incr(keys.attempts(job.id)))
        return JobDelivery(job, msg_id.decode(), attempt, consumer)

    async def update_job(self, status: JobStatus, delivery: JobDelivery | None = None) -> None:
        """Record progress; with `delivery`, also refresh the trainer's claim on the job."""
        data = status.model_dump_json()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.job(status.id), "data", data)
        pipe.xadd(keys.job_events(status.id), {"data": data}, maxlen=1000)
        if delivery is not None:
            pipe.xclaim(
                keys.TRAIN, keys.TRAINERS, delivery.consumer, 0, [delivery.msg_id], justid=True
            )
        await _retry("job update", pipe.execute)

    async def finish_job(self, delivery: JobDelivery, error: str | None = None) -> JobStatus:
        """Done; or queued again; or failed after `max_attempts`. Acks the delivery."""
        status = await _finished(self, delivery, error)
        pipe = self.redis.pipeline(transaction=True)
        if status.state == "queued":
            pipe.xadd(keys.TRAIN, {"data": delivery.job.model_dump_json()})
        pipe.xack(keys.TRAIN, keys.TRAINERS, delivery.msg_id)
        pipe.xdel(keys.TRAIN, delivery.msg_id)
        await _retry("finish job", pipe.execute)
        return status

    async def job_status(self, job_id: str) -> JobStatus | None:
        """A job's last recorded status."""
        data = await self.redis.hget(keys.job(job_id), "data")
        return JobStatus.model_validate_json(data) if data else None
