"""Redis fault drill against a private redis-server (AOF, fsync always), tiny model.

(a) A malformed training job and malformed catalog events, written straight into their
streams, stop neither the training of a valid job queued after them nor the serving of
turns, before, during and after. (b) A redis-server killed and restarted while replies
stream loses no chunk and no counter, and repeats none.
"""

import asyncio
import json
import shutil

import pytest
import redis.asyncio as aioredis
from queue_helpers import FAST, collect, make_job, make_turn, reference, serving_worker

from neeko import keys
from neeko.protocol import Message, Sampling, Turn
from neeko.queue import Chunk, QueueConfig
from neeko.redis_server import RedisServer
from neeko.runtime import open_runtime
from neeko.transport import open_transport
from neeko.worker import Trainer, WorkerConfig

pytestmark = pytest.mark.redis


@pytest.fixture
def redis_server():
    with RedisServer() as server:
        yield server


async def test_poison_job_and_event_stop_neither_training_nor_serving(
    redis_server, tiny_store, tmp_path
):
    r = aioredis.from_url(redis_server.url)
    deep = b'{"id": "poison", "card": %s%s, "dialogues": []}' % (b"[" * 50_000, b"]" * 50_000)
    await r.xadd(keys.TRAIN, {"data": deep})
    await r.xadd(keys.EVENTS, {"data": b'{"kind": "exploded", "key": "nova"}'})
    await r.xadd(keys.EVENTS, {"data": b"\x00 not an event"})
    transport = open_transport(redis_server.url, FAST)
    turns, jobs = transport.turns, transport.jobs
    runtime = open_runtime(tiny_store, "tiny")
    worker = serving_worker(turns, transport.events, runtime, WorkerConfig(events_s=0.1), name="w")
    serving = asyncio.create_task(worker.run())  # starts past the malformed events
    train_store = tmp_path / "trainer-store"
    shutil.copytree(tiny_store, train_store)
    trainer_rt = open_runtime(train_store, "tiny")
    trainer = Trainer(jobs, transport.events, trainer_rt, name="t", block_ms=100)
    training = asyncio.create_task(trainer.run())
    while not await turns.workers_alive():
        await asyncio.sleep(0.01)
    before, _ = await collect(turns, make_turn(0))
    await jobs.submit(make_job("valid", "Nova", epochs=1, max_steps=4), "Nova")
    statuses, during = [], []
    async with asyncio.timeout(120):
        async for status in jobs.watch("valid", poll_s=0.05):
            statuses.append(status)
            during.append((await collect(turns, make_turn(1 + len(during))))[0])
    assert (statuses[-1].state, statuses[-1].attempts) == ("done", 1)
    poison = await jobs.status("poison")
    assert poison.state == "failed"
    assert "recursion limit" in poison.error
    assert await r.xlen(keys.DEAD_JOBS) == 1
    async with asyncio.timeout(30):
        while "nova" not in runtime.slots:  # the valid event after the bad ones
            await asyncio.sleep(0.02)
    nova = Turn(id="nova1", channel="c", character="nova",
                messages=(Message(role="user", content="Who are you?"),),
                sampling=Sampling(max_new_tokens=10, temperature=0))  # fmt: skip
    reply, _ = await collect(turns, nova)
    assert reply.text == reference(open_runtime(train_store, "tiny"), [nova])["nova1"]
    assert not serving.done()
    assert not training.done()
    worker.stop()
    trainer.stop()
    await asyncio.gather(serving, training)
    served = [before, *during]
    assert all(r.worker == "w" for r in served)
    stats = await turns.stats()
    assert (stats["jobs_failed"], stats["jobs_done"], stats["turns"]) == (1, 1, len(served) + 1)
    await r.aclose()
    await transport.close()


async def _stream(turns, turn, started: asyncio.Event):
    """The chunks of `turn` as they come, then its reply; sets `started` after 5 chunks."""
    chunks = []
    async for item in turns.submit(turn, 120):
        if not isinstance(item, Chunk):
            return chunks, item
        chunks.append(item)
        if len(chunks) == 5:
            started.set()
    raise AssertionError("no reply")


async def test_redis_restart_mid_reply_loses_no_chunk_and_no_counter(redis_server, tiny_store):
    config = QueueConfig(claim_idle_ms=10_000, alive_ttl_s=30)  # no takeover in the outage
    transport = open_transport(redis_server.url, config)
    turns = transport.turns
    runtime = open_runtime(tiny_store, "tiny")
    # A full batch reads no turns, so the outage hits publishing chunks and counters (they
    # flush every 50 ms), not a read.
    full = WorkerConfig(max_batch=3, heartbeat_s=0.05)
    worker = serving_worker(turns, transport.events, runtime, full, name="w")
    task = asyncio.create_task(worker.run())
    while not await turns.workers_alive():
        await asyncio.sleep(0.01)
    tokens = 120
    batch = [make_turn(i, tokens=tokens, ignore_eos=True) for i in range(3)]
    started = asyncio.Event()
    pending = [asyncio.create_task(_stream(turns, t, started)) for t in batch]
    await started.wait()
    redis_server.kill()
    await asyncio.sleep(0.5)
    redis_server.start()
    async with asyncio.timeout(120):
        results = await asyncio.gather(*pending)
    worker.stop()
    await task
    expected = reference(runtime, batch, together=True)
    r = aioredis.from_url(redis_server.url)
    for t, (chunks, reply) in zip(batch, results, strict=True):
        assert not any(c.reset for c in chunks)  # one delivery, never restarted
        assert "".join(c.text for c in chunks) == reply.text == expected[t.id]
        events = [json.loads(f[b"data"]) for _, f in await r.xrange(keys.reply(t.id))]
        assert [e["kind"] for e in events] == ["chunk"] * len(chunks) + ["done"]
        assert "".join(e["text"] for e in events) == reply.text  # no chunk twice
    stats = await turns.stats()
    assert stats["turns"] == len(batch)
    assert stats["step_rows"] == len(batch) * (tokens - 1)  # one token per row per step
    assert (stats.get("failed", 0), stats.get("dead", 0), stats["pending"]) == (0, 0, 0)
    await r.aclose()
    await transport.close()
