"""The training-job queue between front ends (`neeko job`, `/character train`) and trainers.

`JobQueue` is the interface; `LocalJobQueue` runs it in one process, `RedisJobQueue`
(`neeko.redis_jobs`) on a Redis stream read by the consumer group of trainers. A job is
delivered to one trainer at a time, which refreshes its claim while it trains; a job that
fails is queued again, and marked failed after `QueueConfig.max_attempts` starts.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

from neeko.protocol import JobStatus, TrainJob
from neeko.queue import QueueConfig


@dataclass(frozen=True)
class JobDelivery:
    """An expansion job handed to a trainer."""

    job: TrainJob
    msg_id: str
    attempt: int
    consumer: str = ""


class JobQueue(abc.ABC):
    """What front ends and trainers share about expansion jobs."""

    def __init__(self, config: QueueConfig | None = None) -> None:
        """A job queue with `config` (attempts and claim timeouts)."""
        self.config = config or QueueConfig()

    @abc.abstractmethod
    async def submit(self, job: TrainJob, character: str) -> JobStatus:
        """Queue an expansion job (once per id); its status as recorded."""

    @abc.abstractmethod
    async def fetch(self, consumer: str, block_ms: int) -> JobDelivery | None:
        """The next job to run, if any within `block_ms`."""

    @abc.abstractmethod
    async def update(self, status: JobStatus, delivery: JobDelivery | None = None) -> None:
        """Record a job's progress (and refresh its claim, so it is not reclaimed)."""

    @abc.abstractmethod
    async def finish(self, delivery: JobDelivery, error: str | None = None) -> JobStatus:
        """Mark a job done, or queue it again (failed after `max_attempts`)."""

    @abc.abstractmethod
    async def status(self, job_id: str) -> JobStatus | None:
        """A job's current status."""

    async def watch(self, job_id: str, poll_s: float = 0.5) -> AsyncIterator[JobStatus]:
        """Yield a job's status whenever it changes, until it is done or failed."""
        last = None
        while True:
            status = await self.status(job_id)
            if status is not None and status != last:
                yield status
                last = status
                if status.state in ("done", "failed"):
                    return
            await asyncio.sleep(poll_s)

    async def close(self) -> None:  # noqa: B027
        """Release what this queue holds of its own."""


def ended_status(
    old: JobStatus | None, delivery: JobDelivery, error: str | None, max_attempts: int
) -> JobStatus:
    """A job's status at the end of an attempt: done, queued again, or failed for good."""
    old = old or JobStatus(id=delivery.job.id)
    if error is None:
        state, progress = "done", 1.0
    else:
        state = "failed" if delivery.attempt >= max_attempts else "queued"
        progress = old.progress
    return old.model_copy(
        update={
            "state": state,
            "progress": progress,
            "attempts": delivery.attempt,
            "error": error or "",
            "updated": time.time(),
        }
    )


def counter_of(status: JobStatus) -> str:
    """The stats counter an ended attempt adds to: jobs_done, jobs_queued or jobs_failed."""
    return f"jobs_{status.state}"


class LocalJobQueue(JobQueue):
    """The job queue in one process, over an asyncio queue."""

    def __init__(
        self, config: QueueConfig | None = None, counters: Counter[str] | None = None
    ) -> None:
        """An empty job queue; `counters` may be shared with a `LocalTurnQueue`."""
        super().__init__(config)
        self._jobs: asyncio.Queue[tuple[str, TrainJob]] = asyncio.Queue()
        self._status: dict[str, JobStatus] = {}
        self._attempts: Counter[str] = Counter()
        self.counters: Counter[str] = Counter() if counters is None else counters

    async def submit(self, job: TrainJob, character: str) -> JobStatus:
        """Queue a job once."""
        if job.id not in self._status:
            self._status[job.id] = JobStatus(id=job.id, character=character)
            await self._jobs.put((job.id, job))
        return self._status[job.id]

    async def fetch(self, consumer: str, block_ms: int) -> JobDelivery | None:
        """The next job."""
        try:
            msg_id, job = await asyncio.wait_for(self._jobs.get(), block_ms / 1000)
        except TimeoutError:
            return None
        self._attempts[job.id] += 1
        return JobDelivery(job, msg_id, self._attempts[job.id], consumer)

    async def update(self, status: JobStatus, delivery: JobDelivery | None = None) -> None:
        """Record progress."""
        self._status[status.id] = status

    async def finish(self, delivery: JobDelivery, error: str | None = None) -> JobStatus:
        """Done, queued again, or failed."""
        old = self._status.get(delivery.job.id)
        status = ended_status(old, delivery, error, self.config.max_attempts)
        self._status[status.id] = status
        self.counters[counter_of(status)] += 1
        if status.state == "queued":
            await self._jobs.put((delivery.msg_id, delivery.job))
        return status

    async def status(self, job_id: str) -> JobStatus | None:
        """A job's status."""
        return self._status.get(job_id)
