"""`JobQueue` on a Redis stream read by the consumer group of trainers.

A job's status is a hash (`keys.job`), its progress also a stream (`keys.job_events`).
A payload that is not a valid job is acknowledged, moved to `keys.DEAD_JOBS` and its job
marked failed (when its id can be read), and the trainer gets the next job instead.
"""

from __future__ import annotations

import json
import logging
import re
import time

import redis.asyncio as aioredis
from pydantic import TypeAdapter
from redis.exceptions import ResponseError

from neeko import keys
from neeko.jobs import JobDelivery, JobQueue, counter_of, ended_status
from neeko.protocol import Id, JobStatus, TrainJob
from neeko.queue import QueueConfig
from neeko.redis_client import DROP, ensure_group, retry

log = logging.getLogger(__name__)
_LEADING_ID = re.compile(rb'\s*\{\s*"id"\s*:\s*"([^"\\]{1,128})"')
"""The id of a serialised `TrainJob` (its first field), for payloads `json` cannot read."""
_ID = TypeAdapter(Id)
ENTRY_ATTEMPTS_TTL_S = 86_400
"""How long the attempts of a job whose id cannot be read are counted (by entry id)."""

# KEYS: job hash, job stream. ARGV: status, job.
# Records the status and queues the job, unless a job with its id exists.
SUBMIT = """
if redis.call('HSETNX', KEYS[1], 'data', ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', 'data', ARGV[2])
return 1
"""

# KEYS: job stream, job hash, job events stream, stats hash.
# ARGV: group, message id, status, counter name, job to queue again ('' if none).
# Ends one delivery of a job. Only the call that acknowledges it records the status,
# counts it and queues the job again, so a retried call whose first run reached Redis
# (or a trainer whose job was taken over meanwhile) changes nothing.
FINISH = """
local first = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1
redis.call('XDEL', KEYS[1], ARGV[2])
if not first then return 0 end
redis.call('HSET', KEYS[2], 'data', ARGV[3])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 1000, '*', 'data', ARGV[3])
redis.call('HINCRBY', KEYS[4], ARGV[4], 1)
if ARGV[5] ~= '' then redis.call('XADD', KEYS[1], '*', 'data', ARGV[5]) end
return 1
"""


def job_id_of(raw: bytes) -> str | None:
    """The job id in a job payload, valid or not, if one can be read."""
    try:
        data = json.loads(raw)
        found = data.get("id") if isinstance(data, dict) else None
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        match = _LEADING_ID.match(raw)
        found = match.group(1).decode(errors="replace") if match else None
    try:
        return _ID.validate_python(found)
    except ValueError:
        return None


class RedisJobQueue(JobQueue):
    """Expansion jobs on one Redis server (any number of submitters and trainers)."""

    def __init__(self, client: aioredis.Redis, config: QueueConfig | None = None) -> None:
        """A job queue over `client` (`neeko.redis_client.connect`); the caller closes it."""
        super().__init__(config)
        self.redis = client
        self._submit = client.register_script(SUBMIT)
        self._finish = client.register_script(FINISH)
        self._drop = client.register_script(DROP)
        self._group_ready = False

    async def _group(self) -> None:
        if not self._group_ready:
            await ensure_group(self.redis, keys.TRAIN, keys.TRAINERS)
            self._group_ready = True

    async def submit(self, job: TrainJob, character: str) -> JobStatus:
        """Queue `job` unless a job with its id exists."""
        await retry("job group", self._group)
        status = JobStatus(id=job.id, character=character)
        args = [status.model_dump_json(), job.model_dump_json()]
        stream_keys = [keys.job(job.id), keys.TRAIN]
        if await retry("submit job", lambda: self._submit(keys=stream_keys, args=args)):
            return status
        return await self.status(job.id) or status

    async def fetch(self, consumer: str, block_ms: int) -> JobDelivery | None:
        """A job of a dead trainer (idle past `job_idle_ms`), else the next queued one.

        A payload that is not a valid job is dropped (see the module) and the next taken.
        """
        deadline = time.monotonic() + block_ms / 1000
        while True:
            wait = max(0, round((deadline - time.monotonic()) * 1000))
            entry = await retry("fetch job", lambda w=wait: self._next(consumer, w))
            if entry is None:
                return None
            delivery = await self._admit(consumer, *entry)
            if delivery is not None:
                return delivery

    async def _next(self, consumer: str, block_ms: int) -> tuple[str, dict] | None:
        """One entry: reclaimed from a dead trainer, else new (waiting up to `block_ms`)."""
        await self._group()
        _, claimed, _ = await self.redis.xautoclaim(
            keys.TRAIN, keys.TRAINERS, consumer, self.config.job_idle_ms, "0-0", count=1
        )
        entries = [(i, f) for i, f in claimed if f]
        if not entries:
            try:
                got = await self.redis.xreadgroup(
                    keys.TRAINERS, consumer, {keys.TRAIN: ">"}, count=1, block=block_ms or None
                )
            except ResponseError as exc:  # the server lost its data: recreate the group
                if "NOGROUP" not in str(exc):
                    raise
                self._group_ready = False
                got = []
            entries = [e for _, batch in got for e in batch]
        if not entries:
            return None
        msg_id, fields = entries[0]
        return msg_id.decode(), fields

    async def _admit(self, consumer: str, msg_id: str, fields: dict) -> JobDelivery | None:
        """Count the attempt, then parse; a spent or malformed job is dropped (None)."""
        raw = fields.get(b"data", b"")
        job_id = job_id_of(raw)

        async def count() -> int:
            pipe = self.redis.pipeline(transaction=False)
            pipe.incr(keys.attempts(job_id or f"entry:{msg_id}"))
            if job_id is None:
                pipe.expire(keys.attempts(f"entry:{msg_id}"), ENTRY_ATTEMPTS_TTL_S)
            return int((await pipe.execute())[0])

        attempt = await retry("job attempt", count)
        if attempt > self.config.max_attempts:
            await self._drop_job(msg_id, raw, job_id, attempt, "the job was started too many times")
            return None
        try:
            job = TrainJob.model_validate_json(raw)
        except Exception as exc:  # any payload that is not a job (pydantic, recursion)
            await self._drop_job(msg_id, raw, job_id, attempt, f"{type(exc).__name__}: {exc}")
            return None
        return JobDelivery(job, msg_id, attempt, consumer)

    async def _drop_job(
        self, msg_id: str, raw: bytes, job_id: str | None, attempt: int, error: str
    ) -> None:
        """Ack and delete the entry, dead-letter it, count and mark its job failed."""
        error = error[:2000]
        log.error("dropping job %s (entry %s): %s", job_id or "?", msg_id, error)
        stream_keys = [keys.TRAIN, keys.DEAD_JOBS, keys.STATS]
        args: list[str | bytes | int] = [
            keys.TRAINERS, msg_id, raw, error, self.config.max_dead, "jobs_failed"
        ]  # fmt: skip
        if job_id is not None:
            old = await self.status(job_id) or JobStatus(id=job_id)
            failed = old.model_copy(
                update={
                    "state": "failed",
                    "attempts": attempt,
                    "error": error,
                    "updated": time.time(),
                }
            )
            stream_keys.append(keys.job(job_id))
            args.append(failed.model_dump_json())
        await retry("drop job", lambda: self._drop(keys=stream_keys, args=args))

    async def update(self, status: JobStatus, delivery: JobDelivery | None = None) -> None:
        """Record progress; with `delivery`, also refresh the trainer's claim on the job."""
        data = status.model_dump_json()

        async def write() -> None:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(keys.job(status.id), "data", data)
            pipe.xadd(keys.job_events(status.id), {"data": data}, maxlen=1000)
            if delivery is not None:
                pipe.xclaim(
                    keys.TRAIN, keys.TRAINERS, delivery.consumer, 0, [delivery.msg_id], justid=True
                )
            await pipe.execute()

        await retry("job update", write)

    async def finish(self, delivery: JobDelivery, error: str | None = None) -> JobStatus:
        """Done; or queued again; or failed after `max_attempts`. Acks the delivery."""
        old = await self.status(delivery.job.id)
        status = ended_status(old, delivery, error, self.config.max_attempts)
        again = delivery.job.model_dump_json() if status.state == "queued" else ""
        job_keys = [keys.TRAIN, keys.job(status.id), keys.job_events(status.id), keys.STATS]
        args = [keys.TRAINERS, delivery.msg_id, status.model_dump_json(), counter_of(status), again]
        if await retry("finish job", lambda: self._finish(keys=job_keys, args=args)):
            return status
        log.warning("job %s was finished elsewhere (taken over?)", status.id)
        return await self.status(status.id) or status

    async def status(self, job_id: str) -> JobStatus | None:
        """A job's last recorded status."""
        data = await retry("job status", lambda: self.redis.hget(keys.job(job_id), "data"))
        return JobStatus.model_validate_json(data) if data else None
