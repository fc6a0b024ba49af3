"""Workers: run queued turns as mixed batches on the engine, and run expansion jobs.

An inference `Worker` keeps one `DecodeBatch` going (continuous batching): between decode
steps it admits new turns up to `max_batch`, publishes the new reply text of every row,
and completes the rows that finished. Turns of different characters share each forward
pass (per-row gates). A catalog event (a character got its block) is applied when the
batch is empty: the worker stops admitting until it drains, loads the block, goes on.

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
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from neeko.cards import CharacterCard
from neeko.characters import Character, slug
from neeko.dialogues import parse_dialogue
from neeko.engine import DecodeBatch, GenerationRequest
from neeko.errors import GateError
from neeko.lora import Gate
from neeko.protocol import CatalogEvent, JobStatus, Reply, Turn
from neeko.queue import Delivery, JobDelivery, TurnQueue
from neeko.train import TrainConfig
from neeko.workflows import Runtime

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

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.block_ms < 1 or self.gather_ms < 0:
            raise ValueError("max_batch and block_ms must be >= 1, gather_ms >= 0")


def worker_name(kind: str = "worker") -> str:
    """A unique consumer name: host, pid and a random suffix."""
    return f"{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class _Flight:
    delivery: Delivery
    chunks: list[str] = field(default_factory=list)


class Worker:
    """Serves turns from `queue` with the model, blocks and catalog of `runtime`."""

    def __init__(
        self,
        queue: TurnQueue,
        runtime: Runtime,
        config: WorkerConfig | None = None,
        name: str | None = None,
    ) -> None:
        """A worker; `run()` serves until `stop()` (or, in burst mode, an empty queue)."""
        self.queue, self.runtime = queue, runtime
        self.config = config or WorkerConfig()
        self.name = name or worker_name()
        self.batch = DecodeBatch(runtime.engine)
        self.flights: dict[int, _Flight] = {}
        self._stopping = asyncio.Event()
        self._events: list[tuple[str, CatalogEvent]] = []
        self._held: list[Delivery] = []  # turns waiting for a block that is being loaded
        self._last_event = "0"
        self._counts: dict[str, int] = {"turns": 0, "steps": 0, "step_rows": 0, "failed": 0}
        self._timers = {"heartbeat": 0.0, "events": 0.0, "log": time.monotonic()}

    def stop(self) -> None:
        """Stop taking turns; `run()` returns once the turns in flight are answered."""
        self._stopping.set()

    async def run(self, burst: bool = False) -> None:
        """Serve until stopped; with `burst`, return when the queue is empty and idle."""
        cfg = self.config
        await self.queue.heartbeat(self.name)
        await self._check_events(force=True)
        stopped = asyncio.Event()
        keepalive = asyncio.create_task(self._keepalive(stopped))
        try:
            while not (self._stopping.is_set() and not self.flights and not self._held):
                await self._periodic()
                if not self.flights and self._events:
                    await self._apply_events()
                if self._admitting():
                    wait = 0 if self.flights else cfg.block_ms
                    new = await self.queue.fetch(self.name, self._room(), wait)
                    if new and not self.flights and cfg.gather_ms and len(new) < self._room():
                        await asyncio.sleep(cfg.gather_ms / 1000)
                        new += await self.queue.fetch(self.name, self._room() - len(new), 0)
                    if not new and not self.flights and burst:
                        break
                    await self._admit(new)
                if self.flights:
                    await self._step()
        finally:
            stopped.set()  # not cancel(): a Redis call in flight may swallow a cancellation
            await keepalive
            await self._flush_counts()
            await self.queue.leave(self.name)

    # -- the loop's parts --------------------------------------------------------------

    def _room(self) -> int:
        return self.config.max_batch - len(self.flights)

    def _admitting(self) -> bool:
        return not self._stopping.is_set() and self._room() > 0 and not self._events

    async def _keepalive(self, stopped: asyncio.Event) -> None:
        """Heartbeat and refresh the claims of the turns in flight until `stopped` is set.

        A task of its own: a decode step runs in a thread, so this keeps going while the
        model works, however long a prefill takes.
        """
        interval = min(self.config.heartbeat_s, self.queue.config.claim_idle_ms / 3000)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopped.wait(), interval)
            if stopped.is_set():
                return
            try:
                await self.queue.heartbeat(self.name)
                await self.queue.touch(self.name, [f.delivery for f in self.flights.values()])
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
                stats = await self.queue.stats()
            except Exception as exc:  # a status line is not worth dying for
                log.warning("%s: no stats (%s)", self.name, exc)
            else:
                log.info("%s: %s", self.name, " ".join(f"{k}={v}" for k, v in stats.items()))

    async def _admit(self, deliveries: list[Delivery]) -> None:
        """Prefill new turns into the batch; a turn that cannot run is retried or dead."""
        ready: list[tuple[_Flight, GenerationRequest]] = []
        running = {f.delivery.msg_id for f in self.flights.values()}
        for d in deliveries:
            if d.msg_id in running:  # reclaimed from ourselves: it is decoding already
                continue
            try:
                gate = self.gate(d.turn)
            except (GateError, KeyError) as exc:
                await self._check_events()
                if self._events:  # its character may be in a block not loaded yet
                    self._held.append(d)
                else:
                    await self._failed(d, exc)
                continue
            flight = _Flight(d)
            req = GenerationRequest(
                [m.model_dump() for m in d.turn.messages],
                gate,
                d.turn.sampling.params(),
                on_text=flight.chunks.append,  # called in the decode thread
            )
            ready.append((flight, req))
        if not ready:
            return
        try:
            indices = await asyncio.to_thread(self.batch.add, [r for _, r in ready])
            self.flights.update(zip(indices, (f for f, _ in ready), strict=True))
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
            self.batch = DecodeBatch(self.runtime.engine)
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
        await self.queue.publish(chunks)
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
            await self.queue.complete(flight.delivery, reply)
            self._counts["turns"] += 1

    async def _failed(self, delivery: Delivery, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"
        dead = await self.queue.fail(delivery, error)
        log.warning("turn %s failed (%s)%s", delivery.turn.id, error, "; dead" if dead else "")
        self._counts["failed"] += 1

    async def _flush_counts(self) -> None:
        counts = {k: v for k, v in self._counts.items() if v}
        if counts:
            await self.queue.count(**counts)
        self._counts = dict.fromkeys(self._counts, 0)

    # -- characters --------------------------------------------------------------------

    def gate(self, turn: Turn) -> Gate | None:
        """The block gate of a turn: its character's, or its mix over trained characters."""
        catalog = self.runtime.catalog
        if turn.mix:
            return catalog.gate_from_weights(turn.mix)
        if turn.character is None:
            return None
        char = catalog.characters.get(turn.character) or catalog.find(turn.character)
        if char is None:
            raise GateError(f"unknown character {turn.character!r} on worker {self.name}")
        return catalog.gate(char.key)

    async def _check_events(self, force: bool = False) -> None:
        self._timers["events"] = time.monotonic()
        new = await self.queue.read_events(self._last_event)
        if new:
            self._last_event = new[-1][0]
            self._events += new
        if force and self._events:
            await self._apply_events()

    async def _apply_events(self) -> None:
        """Load newly trained blocks (only while no row is decoding)."""
        catalog = self.runtime.catalog
        for _, event in self._events:
            known = catalog.characters.get(event.key)
            if known is not None and known.status == "trained":
                continue
            data = await self.queue.get_block(event.key)
            block = await asyncio.to_thread(_load_block_bytes, self.runtime, data)
            card = CharacterCard.from_dict(event.card)
            catalog.characters[event.key] = Character(event.key, card, "trained", block=block)
            log.info("%s: loaded the block of %s", self.name, card.name)
        self._events.clear()
        held, self._held = self._held, []
        await self._admit(held)


def _load_block_bytes(runtime: Runtime, data: bytes) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "block.safetensors"
        path.write_bytes(data)
        return runtime.bank.load_block(path)


class Trainer:
    """Runs expansion jobs one at a time on the store of `runtime`."""

    def __init__(
        self, queue: TurnQueue, runtime: Runtime, name: str | None = None, block_ms: int = 1000
    ) -> None:
        """A trainer; `run()` serves until `stop()` (or, in burst mode, no job is queued)."""
        self.queue, self.runtime = queue, runtime
        self.name = name or worker_name("trainer")
        self.block_ms = block_ms
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Finish the current job, then return from `run()`."""
        self._stopping.set()

    async def run(self, burst: bool = False) -> None:
        """Take jobs until stopped."""
        while not self._stopping.is_set():
            delivery = await self.queue.fetch_job(self.name, self.block_ms)
            if delivery is None:
                if burst:
                    return
                continue
            await self.run_job(delivery)

    async def run_job(self, delivery: JobDelivery) -> JobStatus:
        """Train the job's character, heartbeating progress; publish its block when done."""
        job = delivery.job
        status = (await self.queue.job_status(job.id)) or JobStatus(id=job.id)
        status = status.model_copy(update={"state": "running", "attempts": delivery.attempt})
        await self.queue.update_job(status, delivery)
        latest: dict[str, float] = {}
        task = asyncio.create_task(asyncio.to_thread(self._train, delivery, latest))
        interval = min(5.0, self.queue.config.job_idle_ms / 3000)
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
            await self.queue.update_job(status, delivery)
        try:
            key, card = task.result()
        except Exception as exc:
            log.exception("job %s failed", job.id)
            return await self.queue.finish_job(delivery, f"{type(exc).__name__}: {exc}")
        data = self.runtime.catalog.block_path(key).read_bytes()
        await self.queue.publish_block(CatalogEvent(key=key, card=card, job=job.id), data)
        return await self.queue.finish_job(delivery)

    def _train(self, delivery: JobDelivery, latest: dict[str, float]) -> tuple[str, dict]:
        from neeko.train import expand

        job, rt = delivery.job, self.runtime
        card = CharacterCard.from_dict(job.card)
        dialogues = [
            parse_dialogue(d, f"job {job.id}, dialogue {i}") for i, d in enumerate(job.dialogues)
        ]
        existing = rt.catalog.find(card.name)
        if existing is not None and existing.status == "trained":  # done by an earlier attempt
            return existing.key, card.to_dict()
        ckpt = rt.catalog.folder / "checkpoints" / job.id
        cfg = TrainConfig(epochs=job.epochs, lr=job.lr, max_steps=job.max_steps, seed=job.seed)

        def on_step(step: int, total: int, loss: float) -> None:
            latest.update(progress=step / total, loss=loss)

        expand(rt.catalog, rt.loaded, rt.bank, card, dialogues, cfg, ckpt, False, on_step)
        shutil.rmtree(ckpt, ignore_errors=True)
        return slug(card.name), card.to_dict()
