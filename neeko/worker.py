"""Workers: run queued turns as mixed batches on the engine, and run expansion jobs.

An inference `Worker` keeps one `DecodeBatch` going (continuous batching): between decode
steps it admits new turns up to `max_batch`, publishes the new reply text of every row,
and completes the rows that finished. Turns of different characters share each forward
pass (per-row gates). The process's catalog follower applies catalog events; a block trained
elsewhere is loaded when the batch is empty: the worker stops admitting until it drains,
loads the block, goes on.

A `Trainer` runs one expansion job at a time, refreshing its claim while it trains so a
live job is never reclaimed, and publishes the block when it is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field

from neeko.cards import CharacterCard
from neeko.dialogues import parse_dialogue
from neeko.engine import GenerationRequest
from neeko.events import EventBus
from neeko.follower import CatalogFollower
from neeko.jobs import JobDelivery, JobQueue
from neeko.kvcache import PrefixCache
from neeko.lora import Gate
from neeko.protocol import CatalogEvent, JobStatus, Reply, Turn
from neeko.queue import Delivery, TurnQueue
from neeko.runtime import Runtime
from neeko.train import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker batches."""

    max_batch: int = 16
    """Most turns decoding together."""
    block_ms: int = 1000
    """How long an idle worker waits for turns in one read."""
    gather_ms: float = 0.0
    """After the first turn reaches an idle worker, wait this long for more to prefill
    together. Off by default: later turns join the running batch at the next decode step
    anyway (continuous batching), and the wait would add to every first-token latency."""
    heartbeat_s: float = 3.0
    """Seconds between heartbeats and claim refreshes of the turns in flight (at most a
    third of the queue's `claim_idle_ms`, so live turns are never reclaimed)."""
    events_s: float = 0.5
    """Seconds between checks for catalog events."""
    log_s: float = 30.0
    """Seconds between status log lines."""
    kv_cache_mb: int = 512
    """Memory for the KV caches of finished turns, reused by their conversation's next
    turn (`neeko.kvcache`); 0 turns reuse off."""

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.block_ms < 1 or self.gather_ms < 0 or self.kv_cache_mb < 0:
            raise ValueError("max_batch and block_ms must be >= 1, gather_ms and kv_cache_mb >= 0")


def worker_name(kind: str = "worker") -> str:
    """A unique consumer name: host, pid and a random suffix."""
    return f"{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class _Flight:
    delivery: Delivery
    chunks: list[str] = field(default_factory=list)


class Worker:
    """Serves turns from `turns` with the model, blocks and catalog of `runtime`.

    Blocks trained meanwhile arrive through `follower`, the process's catalog follower.
    """

    def __init__(
        self,
        turns: TurnQueue,
        follower: CatalogFollower,
        runtime: Runtime,
        config: WorkerConfig | None = None,
        name: str | None = None,
    ) -> None:
        """A worker; `run()` serves until `stop()` (or, in burst mode, an empty queue)."""
        self.turns, self.follower, self.runtime = turns, follower, runtime
        self.config = config or WorkerConfig()
        self.name = name or worker_name()
        mb = self.config.kv_cache_mb
        runtime.engine.prefix_cache = PrefixCache(mb * 2**20) if mb else None
        self.batch = runtime.engine.new_batch()
        self.flights: dict[int, _Flight] = {}
        self._stopping = asyncio.Event()
        self._blocks: list[str] = []  # keys whose blocks were trained, not loaded yet
        self._held: list[Delivery] = []  # turns waiting for a block that is being loaded
        follower.listen(self._on_event)
        self._counts: dict[str, int] = {"turns": 0, "steps": 0, "step_rows": 0, "failed": 0}
        self._timers = {"heartbeat": 0.0, "events": 0.0, "log": time.monotonic()}

    def stop(self) -> None:
        """Stop taking turns; `run()` returns once the turns in flight are answered."""
        self._stopping.set()

    async def run(self, burst: bool = False) -> None:
        """Serve until stopped; with `burst`, return when the queue is empty and idle."""
        cfg = self.config
        await self.turns.heartbeat(self.name)
        await self._check_events(force=True)
        stopped = asyncio.Event()
        keepalive = asyncio.create_task(self._keepalive(stopped))
        try:
            while not (self._stopping.is_set() and not self.flights and not self._held):
                await self._periodic()
                if not self.flights and self._blocks:
                    await self._load_blocks()
                if self._admitting():
                    wait = 0 if self.flights else cfg.block_ms
                    new = await self.turns.fetch(self.name, self._room(), wait)
                    if new and not self.flights and cfg.gather_ms and len(new) < self._room():
                        await asyncio.sleep(cfg.gather_ms / 1000)
                        new += await self.turns.fetch(self.name, self._room() - len(new), 0)
                    if not new and not self.flights and burst:
                        break
                    await self._admit(new)
                if self.flights:
                    await self._step()
        finally:
            stopped.set()  # not cancel(): a Redis call in flight may swallow a cancellation
            await keepalive
            await self._flush_counts()
            await self.turns.leave(self.name)

    # -- the loop's parts --------------------------------------------------------------

    def _room(self) -> int:
        return self.config.max_batch - len(self.flights)

    def _admitting(self) -> bool:
        return not self._stopping.is_set() and self._room() > 0 and not self._blocks

    async def _keepalive(self, stopped: asyncio.Event) -> None:
        """Heartbeat and refresh the claims of the turns in flight until `stopped` is set.

        A task of its own: a decode step runs in a thread, so this keeps going while the
        model works, however long a prefill takes.
        """
        interval = min(self.config.heartbeat_s, self.turns.config.claim_idle_ms / 3000)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopped.wait(), interval)
            if stopped.is_set():
                return
            try:
                await self.turns.heartbeat(self.name)
                await self.turns.touch(self.name, [f.delivery for f in self.flights.values()])
            except Exception as exc:  # the queue retries outages itself; keep beating
                log.warning("%s: heartbeat failed (%s)", self.name, exc)

    async def _periodic(self) -> None:
        now = time.monotonic()
        if now - self._timers["heartbeat"] >= self.config.heartbeat_s:
            self._timers["heartbeat"] = now
            await self._flush_counts()
        if now - self._timers["events"] >= self.config.events_s:
            await self._check_events()
        if now - self._timers["log"] >= self.config.log_s:
            self._timers["log"] = now
            try:
                stats = await self.turns.stats()
            except Exception as exc:  # a status line is not worth dying for
                log.warning("%s: no stats (%s)", self.name, exc)
            else:
                log.info("%s: %s", self.name, " ".join(f"{k}={v}" for k, v in stats.items()))

    async def _admit(self, deliveries: list[Delivery]) -> None:
        """Prefill new turns into the batch; a turn that cannot run is retried or dead.

        Nothing one turn carries (an unknown character, a mix naming a block that is not
        loaded, bad sampling) can stop the worker or the other turns of its batch.
        """
        ready: list[tuple[_Flight, GenerationRequest]] = []
        running = {f.delivery.msg_id for f in self.flights.values()}
        for d in deliveries:
            if d.msg_id in running:  # reclaimed from ourselves: it is decoding already
                continue
            flight = _Flight(d)
            try:
                req = GenerationRequest(
                    [m.model_dump() for m in d.turn.messages],
                    self.gate(d.turn),
                    d.turn.sampling.params(),
                    on_text=flight.chunks.append,  # called in the decode thread
                )
            except Exception as exc:
                await self._check_events()
                if self._blocks:  # its character may be in a block not loaded yet
                    self._held.append(d)
                else:
                    await self._failed(d, exc)
                continue
            ready.append((flight, req))
        if not ready:
            return
        try:
            indices = await asyncio.to_thread(self.batch.add, [r for _, r in ready])
            self.flights.update(zip(indices, (f for f, _ in ready), strict=True))
            log.debug(
                "%s: prefilled %d turn(s) together: %s",
                self.name,
                len(ready),
                " ".join(f.delivery.turn.id for f, _ in ready),
            )
        except Exception:  # one bad turn fails the batch's prefill: isolate it
            for flight, req in ready:
                try:
                    (index,) = await asyncio.to_thread(self.batch.add, [req])
                    self.flights[index] = flight
                except Exception as exc:
                    await self._failed(flight.delivery, exc)
        await self._publish()

    async def _step(self) -> None:
        rows = len(self.batch)
        try:
            await asyncio.to_thread(self.batch.step)
        except Exception as exc:  # the whole batch is lost; every turn is retried
            log.exception("decode step failed; retrying %d turn(s)", len(self.flights))
            flights, self.flights = self.flights, {}
            self.batch = self.runtime.engine.new_batch()
            for f in flights.values():
                await self._failed(f.delivery, exc)
            return
        self._counts["steps"] += 1
        self._counts["step_rows"] += rows
        await self._publish()

    async def _publish(self) -> None:
        """Send new text of every row; complete rows that finished."""
        chunks = []
        for f in self.flights.values():
            if f.chunks:
                chunks.append((f.delivery, "".join(f.chunks)))
                f.chunks.clear()
        await self.turns.publish(chunks)
        for index in [i for i in self.flights if i in self.batch.results]:
            flight, result = self.flights.pop(index), self.batch.results.pop(index)
            reply = Reply(
                turn=flight.delivery.turn.id,
                text=result.text,
                finish_reason=result.finish_reason,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                worker=self.name,
                ttft_s=result.ttft_s,
            )
            await self.turns.complete(flight.delivery, reply)
            self._counts["turns"] += 1

    async def _failed(self, delivery: Delivery, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"
        dead = await self.turns.fail(delivery, error)
        log.warning("turn %s failed (%s)%s", delivery.turn.id, error, "; dead" if dead else "")
        self._counts["failed"] += 1

    async def _flush_counts(self) -> None:
        counts = {k: v for k, v in self._counts.items() if v}
        if counts:
            await self.turns.count(**counts)
        self._counts = dict.fromkeys(self._counts, 0)

    # -- characters --------------------------------------------------------------------

    def gate(self, turn: Turn) -> Gate | None:
        """The block gate of a turn: its character's, or its mix over trained characters."""
        if turn.mix:
            return self.runtime.mix_gate(turn.mix)
        if turn.character is None:
            return None
        return self.runtime.gate(turn.character)

    async def _on_event(self, event: CatalogEvent) -> None:
        """Follower listener: a block trained elsewhere is to be loaded into this bank."""
        if event.kind == "trained" and event.key not in self.runtime.slots:
            self._blocks.append(event.key)

    async def _check_events(self, force: bool = False) -> None:
        self._timers["events"] = time.monotonic()
        try:
            await self.follower.poll()
        except Exception as exc:  # the bus is unreachable: serve what is loaded
            log.warning("%s: no catalog events (%s)", self.name, exc)
        if force and self._blocks:
            await self._load_blocks()

    async def _load_blocks(self) -> None:
        """Load newly trained blocks (only while no row is decoding).

        A block that cannot be loaded (missing, or not a valid block file) is logged and
        skipped; the worker goes on serving the characters it has.
        """
        for key in dict.fromkeys(self._blocks):
            try:
                data = await self.follower.events.block(key)
                await asyncio.to_thread(self.runtime.load_block, key, data)
                log.info("%s: loaded the block of %s", self.name, key)
            except Exception as exc:
                log.error("%s: could not load the block of %s: %s", self.name, key, exc)
        self._blocks.clear()
        held, self._held = self._held, []
        await self._admit(held)


class Trainer:
    """Runs expansion jobs from `jobs` one at a time on the store of `runtime`.

    Each trained block is announced on `events`, with its bytes.
    """

    def __init__(
        self,
        jobs: JobQueue,
        events: EventBus,
        runtime: Runtime,
        name: str | None = None,
        block_ms: int = 1000,
    ) -> None:
        """A trainer; `run()` serves until `stop()` (or, in burst mode, no job is queued)."""
        self.jobs, self.events, self.runtime = jobs, events, runtime
        self.name = name or worker_name("trainer")
        self.block_ms = block_ms
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Finish the current job, then return from `run()`."""
        self._stopping.set()

    async def run(self, burst: bool = False) -> None:
        """Take jobs until stopped; no job, however it fails, stops the loop."""
        while not self._stopping.is_set():
            delivery = await self.jobs.fetch(self.name, self.block_ms)
            if delivery is None:
                if burst:
                    return
                continue
            try:
                await self.run_job(delivery)
            except Exception:  # not even finished: it stays pending and is taken over later
                log.exception("%s: job %s could not be finished", self.name, delivery.job.id)

    async def run_job(self, delivery: JobDelivery) -> JobStatus:
        """Train the job's character, heartbeating progress; publish its block when done.

        Any error of the job (in training, reading or publishing its block) is recorded
        with `JobQueue.finish`: the job is retried, or failed after `max_attempts`.
        """
        job = delivery.job
        try:
            await self._train_and_report(delivery)
            data = await asyncio.to_thread(self.runtime.catalog.block_path(job.key).read_bytes)
            event = CatalogEvent(
                kind="trained", key=job.key, scope=job.scope, card=job.card, job=job.id
            )
            await self.events.publish(event, data)
        except Exception as exc:
            log.exception("job %s failed", job.id)
            return await self.jobs.finish(delivery, f"{type(exc).__name__}: {exc}")
        return await self.jobs.finish(delivery)

    async def _train_and_report(self, delivery: JobDelivery) -> None:
        """Train in a thread; meanwhile report progress and refresh the claim on the job.

        Returns only once training has ended, even if a report fails, so two jobs never
        train at once.
        """
        job = delivery.job
        status = (await self.jobs.status(job.id)) or JobStatus(id=job.id)
        status = status.model_copy(update={"state": "running", "attempts": delivery.attempt})
        await self.jobs.update(status, delivery)
        latest: dict[str, float] = {}
        task = asyncio.create_task(asyncio.to_thread(self._train, delivery, latest))
        interval = min(5.0, self.jobs.config.job_idle_ms / 3000)
        while not task.done():
            await asyncio.wait({task}, timeout=interval)
            if latest:
                status = status.model_copy(
                    update={
                        "progress": latest["progress"],
                        "loss": latest["loss"],
                        "updated": time.time(),
                    }
                )
            try:
                await self.jobs.update(status, delivery)
            except Exception as exc:  # a missed report is not worth the job
                log.warning("%s: no progress report for job %s (%s)", self.name, job.id, exc)
        task.result()

    def _train(self, delivery: JobDelivery, latest: dict[str, float]) -> None:
        """Train the job's character, `job.key` of the catalog, into the store.

        The key comes from the catalog that queued the job, so a trainer never derives one
        of its own; `expand` refuses a key that belongs to another character.
        """
        from neeko.train import expand

        job, rt = delivery.job, self.runtime
        card = CharacterCard.from_dict(job.card)
        dialogues = [
            parse_dialogue(d, f"job {job.id}, dialogue {i}") for i, d in enumerate(job.dialogues)
        ]
        existing = rt.catalog.get(job.key)
        if existing is not None and existing.status == "trained" and job.key in rt.slots:
            return  # done by an earlier attempt
        ckpt = rt.catalog.folder / "checkpoints" / job.id
        cfg = TrainConfig(epochs=job.epochs, lr=job.lr, max_steps=job.max_steps, seed=job.seed)

        def on_step(step: int, total: int, loss: float) -> None:
            latest.update(progress=step / total, loss=loss)

        expand(rt, card, dialogues, cfg, ckpt, False, on_step, key=job.key, scope=job.scope)
        shutil.rmtree(ckpt, ignore_errors=True)
