"""`TurnQueue` on Redis Streams: consumer groups, reclaiming, dead letters.

Key names live in `neeko.keys`. Every multi-step state change that must not be torn by a
crash (final reply + its publication + acknowledgement) runs as one Lua script, and every
write that a retry after a lost answer could repeat (a queued turn, a reply chunk, a
counter, a dead letter) checks in its script whether it was done already.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from neeko import keys
from neeko.protocol import Reply, ReplyEvent, Turn
from neeko.queue import Delivery, QueueConfig, TurnQueue, mean_batch, stop_task
from neeko.redis_client import DROP, UNAVAILABLE, ensure_group, retry

log = logging.getLogger(__name__)
READ_BLOCK_MS = 20
"""How long the shared reply reader blocks; a newly awaited stream joins within this."""
APPLIED_TTL_S = 3600
"""How long a counter update is remembered as applied (a retry within it adds nothing)."""

# KEYS: turn stream, then each turn's submitted marker. ARGV: ttl, stream cap, the turns.
# Queues each turn unless its id was queued before (in one step: a retry never loses one,
# and a worker reads a group of turns all together or not at all).
SUBMIT = """
local added = 0
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], 1, 'NX', 'EX', ARGV[1]) then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'data', ARGV[i + 1])
    added = added + 1
  end
end
return added
"""

# KEYS: per chunk, its reply stream and that turn's `sent` hash. ARGV: ttl, then per chunk
# its delivery tag, its number within the delivery (from 1) and its event.
# Appends each chunk unless a chunk with its number (or a later one) is there already.
PUBLISH = """
local written = 0
for i = 1, #KEYS / 2 do
  local stream, sent = KEYS[2 * i - 1], KEYS[2 * i]
  local tag, n, event = ARGV[3 * i - 1], tonumber(ARGV[3 * i]), ARGV[3 * i + 1]
  if tonumber(redis.call('HGET', sent, tag) or '0') < n then
    redis.call('XADD', stream, '*', 'data', event)
    redis.call('HSET', sent, tag, n)
    redis.call('EXPIRE', stream, ARGV[1])
    redis.call('EXPIRE', sent, ARGV[1])
    written = written + 1
  end
end
return written
"""

# KEYS: applied marker, stats hash. ARGV: ttl, then name, amount pairs.
# Adds to the counters once per marker.
COUNT = """
if not redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[1]) then return 0 end
for i = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1]) end
return 1
"""

# KEYS: result, reply stream, turn stream, dead-letter stream, stats hash.
# ARGV: final event, ttl, group, message id, dead letter ('' if none), error, attempts,
# dead-letter cap.
# Writes the final event once; publishes it (and records the dead letter) only if this
# call wrote it; always acks.
FINISH = """
local wrote = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
if wrote then
  redis.call('XADD', KEYS[2], '*', 'data', ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  if ARGV[5] ~= '' then
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*',
               'data', ARGV[5], 'error', ARGV[6], 'attempts', ARGV[7])
    redis.call('HINCRBY', KEYS[5], 'dead', 1)
  end
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

# KEYS: turn stream. ARGV: group, message id, turn.
# Queues a failed turn again, if this call is the one that acknowledges its delivery.
REQUEUE = """
local first = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1
if first then redis.call('XADD', KEYS[1], '*', 'data', ARGV[3]) end
redis.call('XDEL', KEYS[1], ARGV[2])
return first and 1 or 0
"""


class RedisTurnQueue(TurnQueue):
    """The turn queue on one Redis server (any number of front ends and workers)."""

    def __init__(self, client: aioredis.Redis, config: QueueConfig | None = None) -> None:
        """A queue over `client` (`neeko.redis_client.connect`); the caller closes it."""
        super().__init__(config)
        self.redis = client
        self._submit = client.register_script(SUBMIT)
        self._publish = client.register_script(PUBLISH)
        self._count = client.register_script(COUNT)
        self._finish = client.register_script(FINISH)
        self._republish = client.register_script(REPUBLISH)
        self._requeue = client.register_script(REQUEUE)
        self._drop = client.register_script(DROP)
        self._group_ready = False
        self._last_claim = 0.0
        self._sent: dict[str, int] = {}  # delivery tag -> chunks published
        self._waiters: dict[str, list] = {}  # reply stream -> [last id read, inbox]
        self._reader: asyncio.Task | None = None

    async def close(self) -> None:
        """Stop the reply reader (the client is closed by its owner)."""
        if self._reader is not None:
            await stop_task(self._reader)

    async def _group(self) -> None:
        if not self._group_ready:
            await ensure_group(self.redis, keys.TURNS, keys.WORKERS)
            self._group_ready = True

    # -- front ends ----------------------------------------------------------------

    async def _enqueue(self, turns: Sequence[Turn]) -> None:
        """Queue `turns` in one script: a worker reads all of them or none."""
        args = [self.config.reply_ttl_s, self.config.max_turns]
        args += [t.model_dump_json() for t in turns]
        stream_keys = [keys.TURNS] + [keys.submitted(t.id) for t in turns]
        await retry("submit", lambda: self._submit(keys=stream_keys, args=args))

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
            except UNAVAILABLE as exc:
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
            await self._group()
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
                    self._group_ready = False
                    got = []
                entries += [e for _, batch in got for e in batch]
            return await self._admit(entries)

        return await retry("fetch", read)

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
            except Exception as exc:  # any payload that is not a turn (pydantic, recursion)
                await self._drop_malformed(msg_id, fields, f"{type(exc).__name__}: {exc}")
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
        stream_keys = [keys.TURNS, keys.DEAD, keys.STATS]
        raw = fields.get(b"data", b"")
        args = [keys.WORKERS, msg_id, raw, error[:2000], self.config.max_dead, "dead"]
        await retry("drop", lambda: self._drop(keys=stream_keys, args=args))

    async def publish(self, chunks: list[tuple[Delivery, str]]) -> None:
        """Append chunk events to reply streams, in one round trip, each chunk once."""
        if not chunks:
            return
        stream_keys: list[str] = []
        args: list[str | int] = [self.config.reply_ttl_s]
        for d, text in chunks:
            n = self._sent[d.tag] = self._sent.get(d.tag, 0) + 1
            event = ReplyEvent(kind="chunk", text=text, attempt=d.tag).model_dump_json()
            stream_keys += [keys.reply(d.turn.id), keys.sent(d.turn.id)]
            args += [d.tag, n, event]
        await retry("publish", lambda: self._publish(keys=stream_keys, args=args))

    async def complete(self, delivery: Delivery, reply: Reply) -> bool:
        """Final event once (`SET NX`), published, then `XACK` + `XDEL`."""
        event = ReplyEvent(kind="done", reply=reply).model_dump_json()
        return await self._final(delivery, event)

    async def _final(self, delivery: Delivery, event: str, dead: str = "", error: str = "") -> bool:
        turn_id = delivery.turn.id
        self._sent.pop(delivery.tag, None)
        stream_keys = [keys.result(turn_id), keys.reply(turn_id), keys.TURNS, keys.DEAD, keys.STATS]
        args = [
            event,
            self.config.reply_ttl_s,
            keys.WORKERS,
            delivery.msg_id,
            dead,
            error[:2000],
            delivery.attempt,
            self.config.max_dead,
        ]
        return bool(await retry("complete", lambda: self._finish(keys=stream_keys, args=args)))

    async def fail(self, delivery: Delivery, error: str) -> bool:
        """Queue the turn again, or dead-letter it after `max_attempts` starts."""
        if delivery.attempt >= self.config.max_attempts:
            await self._dead_letter(delivery, error)
            return True
        self._sent.pop(delivery.tag, None)
        args = [keys.WORKERS, delivery.msg_id, delivery.turn.model_dump_json()]
        await retry("retry", lambda: self._requeue(keys=[keys.TURNS], args=args))
        return False

    async def _dead_letter(self, delivery: Delivery, error: str) -> None:
        log.error(
            "dead-lettering turn %s after %d attempts: %s",
            delivery.turn.id,
            delivery.attempt,
            error,
        )
        event = ReplyEvent(kind="error", error=error).model_dump_json()
        await self._final(delivery, event, delivery.turn.model_dump_json(), error)

    async def touch(self, consumer: str, deliveries: list[Delivery]) -> None:
        """Reset the idle time of turns in flight (`XCLAIM ... JUSTID`)."""
        if deliveries:
            ids = [d.msg_id for d in deliveries]
            await retry(
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

        await retry("heartbeat", beat)

    async def leave(self, consumer: str) -> None:
        """Remove `consumer` from the live set."""
        await self.redis.zrem(keys.ALIVE, consumer)

    async def workers_alive(self) -> int:
        """Workers with a heartbeat within `alive_ttl_s`."""
        since = time.time() - self.config.alive_ttl_s
        return int(await retry("alive", lambda: self.redis.zcount(keys.ALIVE, since, "+inf")))

    async def count(self, **counters: int) -> None:
        """`HINCRBY` the shared counters, once even when the call is retried."""
        if not counters:
            return
        marker = keys.applied(uuid.uuid4().hex)
        args: list[str | int] = [APPLIED_TTL_S]
        for name, n in counters.items():
            args += [name, n]
        await retry("count", lambda: self._count(keys=[marker, keys.STATS], args=args))

    async def stats(self) -> dict:
        """Counters, workers alive, queue lag and pending turns, dead letters."""
        await self._group()
        raw = await self.redis.hgetall(keys.STATS)
        out = mean_batch({k.decode(): int(v) for k, v in raw.items()})
        groups = {g["name"].decode(): g for g in await self.redis.xinfo_groups(keys.TURNS)}
        group = groups.get(keys.WORKERS, {})
        out["lag"] = int(group.get("lag") or 0)
        out["pending"] = int(group.get("pending") or 0)
        out["dead_letters"] = int(await self.redis.xlen(keys.DEAD))
        out["workers_alive"] = await self.workers_alive()
        return out
