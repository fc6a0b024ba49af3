"""The turn queue and workers against a real redis-server (started per test), tiny model.

Covers: replies equal to direct engine runs, exactly-once answers, mixed batches, a worker
killed mid-batch, Redis killed and restarted (AOF), poison turns, hot-loaded expansion jobs,
a trainer killed mid-job, SIGTERM, the in-process queue; writes retried across a restart,
malformed jobs and catalog events, and one bad turn, event or job never stopping a worker.
"""

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from queue_helpers import FAST, collect, done_events, make_job, make_turn, reference, serving_worker

from neeko import keys
from neeko.cards import card_from_fields
from neeko.catalog import Catalog
from neeko.dialogues import read_dialogues
from neeko.events import LocalEventBus
from neeko.jobs import LocalJobQueue
from neeko.protocol import CatalogEvent, JobStatus, Message, Reply, Sampling, Turn
from neeko.queue import Chunk, LocalTurnQueue, NoWorkerError, QueueConfig, TurnFailed
from neeko.redis_server import RedisServer
from neeko.runtime import open_runtime
from neeko.transport import open_transport
from neeko.worker import Trainer, WorkerConfig

pytestmark = pytest.mark.redis


@pytest.fixture(scope="session")
def store(tiny_store):
    return tiny_store


@pytest.fixture
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture
def spawn(redis_server, tmp_path):
    """Start `neeko worker` subprocesses; every one still running is killed at teardown."""
    procs = []

    def start(args, name):
        procs.append(_spawn(args, redis_server.url, tmp_path, name))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _spawn(args, redis_url, tmp_path, name):
    """A `neeko worker` subprocess; returns once it printed `ready`."""
    log = open(tmp_path / f"{name}.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "neeko.cli", "worker", "--redis-url", redis_url, "--name", name,
         "--model", "tiny", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while "ready" not in (tmp_path / f"{name}.log").read_text():
        assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()
        assert time.monotonic() < deadline, "worker did not start"
        time.sleep(0.1)
    return proc


async def test_200_turns_2_workers_exactly_once_and_equal_to_direct(redis_server, store):
    transport = open_transport(redis_server.url, FAST)
    queue = transport.turns
    workers = [
        serving_worker(
            queue, transport.events, open_runtime(store, "tiny"), WorkerConfig(16), f"w{i}"
        )
        for i in range(2)
    ]  # fmt: skip
    tasks = [asyncio.create_task(w.run()) for w in workers]
    while await queue.workers_alive() < 2:
        await asyncio.sleep(0.01)
    turns = [make_turn(i) for i in range(200)]
    results = await asyncio.gather(*(collect(queue, t) for t in turns))
    # A repeated submission of an answered turn is not generated again.
    again, _ = await collect(queue, turns[0])
    assert again == results[0][0]
    for w in workers:
        w.stop()
    await asyncio.gather(*tasks)
    expected = reference(open_runtime(store, "tiny"), turns)
    for t, (reply, streamed) in zip(turns, results, strict=True):
        assert reply.turn == t.id
        assert reply.text == streamed == expected[t.id]
    assert set((await done_events(redis_server.url, [t.id for t in turns])).values()) == {1}
    stats = await queue.stats()
    assert stats["turns"] == 200
    assert stats["mean_batch"] > 1
    assert stats["pending"] == 0
    assert {r.worker for r, _ in results} == {"w0", "w1"}
    await transport.close()


async def test_a_live_worker_keeps_its_turns_claimed(redis_server, store):
    """Claims are refreshed every claim_idle_ms / 3, however long the generation runs."""
    import redis.asyncio as aioredis

    transport = open_transport(redis_server.url, QueueConfig(claim_idle_ms=600))
    queue = transport.turns
    worker = serving_worker(
        queue, transport.events, open_runtime(store, "tiny"), name="w"
    )  # beats 3 s
    task = asyncio.create_task(worker.run())
    while not await queue.workers_alive():
        await asyncio.sleep(0.01)
    pending = asyncio.create_task(collect(queue, make_turn(0, tokens=400, ignore_eos=True)))
    r = aioredis.from_url(redis_server.url)
    idle: list[int] = []
    while not pending.done():
        entries = await r.xpending_range(keys.TURNS, keys.WORKERS, "-", "+", 10)
        idle += [e["time_since_delivered"] for e in entries]
        await asyncio.sleep(0.05)
    reply, streamed = await pending
    worker.stop()
    await task
    assert len(idle) > 10
    assert max(idle) < 600  # never reclaimable while alive
    assert int(await r.get(keys.attempts(reply.turn))) == 1
    assert streamed == reply.text
    await r.aclose()
    await transport.close()


async def test_worker_killed_mid_batch_loses_and_repeats_nothing(redis_server, store, spawn):
    args = ["--store", str(store), "--claim-idle-ms", "1500", "--max-batch", "8"]
    doomed, survivor = spawn(args, "doomed"), spawn(args, "survivor")
    transport = open_transport(redis_server.url, FAST)
    queue = transport.turns
    turns = [make_turn(i, tokens=300, ignore_eos=True) for i in range(16)]
    pending = [asyncio.create_task(collect(queue, t, 300)) for t in turns]
    import redis.asyncio as aioredis

    r = aioredis.from_url(redis_server.url)

    async def held_by(name):
        entries = await r.xpending_range(keys.TURNS, keys.WORKERS, "-", "+", 100, name)
        return [e["message_id"] for e in entries]

    while not (await held_by("doomed") and await held_by("survivor")):  # both mid-batch
        await asyncio.sleep(0.02)
    lost = {
        json.loads(fields[b"data"])["id"]
        for i in await held_by("doomed")
        for _, fields in await r.xrange(keys.TURNS, i, i)
    }
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    try:
        results = await asyncio.gather(*pending)
    finally:
        survivor.terminate()
        assert survivor.wait(60) == 0
    assert lost
    expected = reference(open_runtime(store, "tiny"), turns, together=True)
    for t, (reply, streamed) in zip(turns, results, strict=True):
        assert reply.text == streamed == expected[t.id]
        if t.id in lost:
            assert reply.worker == "survivor"
    assert set((await done_events(redis_server.url, [t.id for t in turns])).values()) == {1}
    assert (await r.xpending(keys.TURNS, keys.WORKERS))["pending"] == 0
    await r.aclose()
    await transport.close()


async def test_redis_restart_with_aof_loses_no_turn(redis_server, store):
    transport = open_transport(redis_server.url, FAST)
    queue = transport.turns
    rt = open_runtime(store, "tiny")
    worker = serving_worker(queue, transport.events, rt, WorkerConfig(max_batch=2), name="w")
    task = asyncio.create_task(worker.run())
    while not await queue.workers_alive():
        await asyncio.sleep(0.01)
    turns = [make_turn(i, tokens=30, ignore_eos=True) for i in range(24)]
    pending = [asyncio.create_task(collect(queue, t)) for t in turns]
    await asyncio.sleep(0.5)  # turns queued, a few in flight
    redis_server.kill()
    await asyncio.sleep(0.5)
    redis_server.start()
    results = await asyncio.gather(*pending)
    worker.stop()
    await task
    expected = reference(open_runtime(store, "tiny"), turns)
    assert [r.text for r, _ in results] == [expected[t.id] for t in turns]
    assert set((await done_events(redis_server.url, [t.id for t in turns])).values()) == {1}
    await transport.close()


async def test_poison_turn_is_dead_lettered_and_others_are_served(redis_server, store):
    transport = open_transport(redis_server.url, FAST)
    queue = transport.turns
    worker = serving_worker(queue, transport.events, open_runtime(store, "tiny"), name="w")
    task = asyncio.create_task(worker.run())
    while not await queue.workers_alive():
        await asyncio.sleep(0.01)
    poison = Turn(
        id="poison",
        channel="c",
        character="ash",
        messages=(Message(role="user", content="word " * 3000),),  # past the context window
    )
    good = [make_turn(i) for i in range(6)]
    outcome = await asyncio.gather(
        collect(queue, poison), *(collect(queue, t) for t in good), return_exceptions=True
    )
    assert isinstance(outcome[0], TurnFailed)
    assert "exceeds the model's 2048 positions" in str(outcome[0])
    assert all(isinstance(r, Reply) for r, _ in outcome[1:])
    unknown = make_turn(99, character="nobody")
    with pytest.raises(TurnFailed, match="unknown character 'nobody'"):
        await collect(queue, unknown)
    worker.stop()
    await task
    stats = await queue.stats()
    assert (stats["dead"], stats["dead_letters"], stats["turns"]) == (2, 2, 6)
    await transport.close()


async def test_no_worker_is_a_clear_error(redis_server):
    async with open_transport(redis_server.url, FAST) as transport:
        with pytest.raises(NoWorkerError, match="no worker"):
            await collect(transport.turns, make_turn(0))


async def test_expansion_job_is_served_by_running_workers(redis_server, store, tmp_path):
    transport = open_transport(redis_server.url, FAST)
    queue, events = transport.turns, transport.events
    worker = serving_worker(queue, events, open_runtime(store, "tiny"), name="w")
    served = asyncio.create_task(worker.run())
    train_store = tmp_path / "trainer-store"
    shutil.copytree(store, train_store)
    trainer = Trainer(transport.jobs, events, open_runtime(train_store, "tiny"), name="t")
    training = asyncio.create_task(trainer.run())
    while not await queue.workers_alive():
        await asyncio.sleep(0.01)
    await transport.jobs.submit(make_job("job1", "Nova", epochs=6), "Nova")
    states = []
    async for status in transport.jobs.watch("job1", poll_s=0.05):
        states.append(status.state)
        await collect(queue, make_turn(1000 + len(states)))  # turns keep flowing meanwhile
    assert states[-1] == "done"
    assert "running" in states
    nova = Turn(id="nova1", channel="c", character="nova",
                messages=(Message(role="user", content="Who are you?"),),
                sampling=Sampling(max_new_tokens=10, temperature=0))  # fmt: skip
    reply, _ = await collect(queue, nova)
    expected = reference(open_runtime(train_store, "tiny"), [nova])
    assert reply.text == expected["nova1"]
    assert worker.runtime.catalog.find("Nova").status == "trained"
    worker.stop()
    trainer.stop()
    await asyncio.gather(served, training)
    await transport.close()


async def test_trainer_killed_mid_job_is_retried_and_finishes(redis_server, store, tmp_path, spawn):
    train_store = tmp_path / "trainer-store"
    shutil.copytree(store, train_store)
    args = ["--train", "--store", str(train_store), "--job-idle-ms", "1500"]
    doomed = spawn(args, "t1")
    transport = open_transport(redis_server.url, FAST)
    jobs = transport.jobs
    await jobs.submit(make_job("job2", "Nova", epochs=25, n=8), "Nova")
    while (s := await jobs.status("job2")).progress < 0.05:
        assert s.state in ("queued", "running")
        await asyncio.sleep(0.05)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    assert (await jobs.status("job2")).state == "running"
    second = spawn(args, "t2")
    try:
        statuses = [s async for s in jobs.watch("job2", poll_s=0.1)]
    finally:
        second.terminate()
        assert second.wait(60) == 0
    assert (statuses[-1].state, statuses[-1].attempts) == ("done", 2)
    assert Catalog.open(train_store).find("Nova").status == "trained"
    await transport.close()


async def test_sigterm_finishes_turns_in_flight_then_exits_0(redis_server, store, spawn):
    proc = spawn(["--store", str(store)], "w")
    transport = open_transport(redis_server.url, FAST)
    queue = transport.turns
    turns = [make_turn(i, tokens=100, ignore_eos=True) for i in range(4)]
    pending = [asyncio.create_task(collect(queue, t)) for t in turns]
    import redis.asyncio as aioredis

    r = aioredis.from_url(redis_server.url)
    while not all([await r.exists(keys.reply(t.id)) for t in turns]):
        await asyncio.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    results = await asyncio.gather(*pending)
    assert await asyncio.to_thread(proc.wait, 60) == 0
    assert all(reply.completion_tokens == 100 for reply, _ in results)
    assert await queue.workers_alive() == 0
    await r.aclose()
    await transport.close()


@pytest.mark.parametrize("backend", ["local", "redis"])
async def test_chunks_of_a_superseded_delivery_are_dropped(backend, request):
    """A worker taken over while still running (slow, not dead) cannot garble the stream."""
    url = request.getfixturevalue("redis_server").url if backend == "redis" else ""
    transport = open_transport(url, FAST)
    queue = transport.turns
    await queue.heartbeat("hand")
    turn = make_turn(0)

    async def items():
        return [item async for item in queue.submit(turn, 30)]

    task = asyncio.create_task(items())
    (first,) = await queue.fetch("hand", 1, 5000)
    second = dataclasses.replace(first, attempt=first.attempt + 1)
    for delivery, text in [(first, "a"), (second, "x"), (first, "b"), (second, "y"), (first, "c")]:
        await queue.publish([(delivery, text)])
    reply = Reply(
        turn=turn.id,
        text="xy",
        finish_reason="eos",
        prompt_tokens=1,
        completion_tokens=2,
        worker="hand",
    )
    assert await queue.complete(second, reply)
    assert await asyncio.wait_for(task, 30) == [
        Chunk("a"),
        Chunk("x", reset=True),
        Chunk("y"),
        reply,
    ]
    await transport.close()


@pytest.mark.parametrize("backend", ["local", "redis"])
async def test_a_group_of_turns_reaches_a_waiting_worker_in_one_read(backend, request):
    """A worker already blocked in `fetch` gets a scene's turns all at once, not one by one."""
    url = request.getfixturevalue("redis_server").url if backend == "redis" else ""
    transport = open_transport(url, FAST)
    queue = transport.turns
    await queue.heartbeat("hand")
    waiting = asyncio.create_task(queue.fetch("hand", 16, 5000))
    await asyncio.sleep(0.2)  # the read is blocked before the group is queued
    turns = [make_turn(i) for i in range(3)]
    streams = await queue.submit_group(turns, 30)
    got = await asyncio.wait_for(waiting, 10)
    assert [d.turn.id for d in got] == [t.id for t in turns]
    assert len(streams) == 3
    assert await queue.fetch("hand", 16, 0) == []
    with pytest.raises(ValueError, match="distinct ids"):
        await queue.submit_group([turns[0], turns[0]])
    await transport.close()


async def test_local_queue_serves_retries_and_dead_letters(store):
    queue = LocalTurnQueue(QueueConfig(max_attempts=2))
    runtime = open_runtime(store, "tiny")
    worker = serving_worker(queue, LocalEventBus(), runtime, name="local")
    task = asyncio.create_task(worker.run())
    while not await queue.workers_alive():
        await asyncio.sleep(0.01)
    turns = [make_turn(i) for i in range(12)]
    poison = Turn(id="p", channel="c", messages=(Message(role="user", content="x " * 3000),))
    results = await asyncio.gather(
        *(collect(queue, t) for t in turns), collect(queue, poison), return_exceptions=True
    )
    expected = reference(open_runtime(store, "tiny"), turns)
    assert [r.text for r, _ in results[:-1]] == [expected[t.id] for t in turns]
    assert isinstance(results[-1], TurnFailed)
    assert [t.id for t, _ in queue.dead] == ["p"]
    worker.stop()
    await task
    stats = await queue.stats()
    assert (stats["turns"], stats["dead"]) == (12, 1)


def test_status_command_prints_counters(redis_server):
    out = subprocess.run(
        [sys.executable, "-m", "neeko.cli", "status", "--redis-url", redis_server.url],
        capture_output=True,
        text=True,
        check=True,
    )
    stats = json.loads(out.stdout)
    assert {"lag", "pending", "dead_letters", "workers_alive", "mean_batch"} <= set(stats)


def test_worker_without_redis_url_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    out = subprocess.run(
        [sys.executable, "-m", "neeko.cli", "worker", "--model", "tiny"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 1
    assert "REDIS_URL" in out.stderr


def test_turn_payloads_are_validated():
    with pytest.raises(ValueError, match="not both"):
        Turn(id="a", channel="c", character="x", mix={"y": 1.0},
             messages=(Message(role="user", content="hi"),))  # fmt: skip
    with pytest.raises(ValueError, match="pattern"):
        Turn(id="bad id with spaces", channel="c", messages=(Message(role="user", content="x"),))
    with pytest.raises(ValueError, match="at least 1"):
        Turn(id="a", channel="c", messages=())
    assert keys.reply("x") == "neeko:reply:x"


def test_job_command_queues_an_expansion_job(redis_server, tmp_path):
    cast = Path(__file__).parent.parent / "neeko" / "data" / "cast" / "bolt"
    out = subprocess.run(
        [sys.executable, "-m", "neeko.cli", "job", "--redis-url", redis_server.url,
         "--card", str(cast / "card.json"), "--data", str(cast / "train.jsonl"),
         "--id", "job-bolt", "--no-wait"],
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    status = json.loads(out.stdout)
    assert (status["id"], status["state"], status["character"]) == ("job-bolt", "queued", "BOLT-7")

    async def queued():
        async with open_transport(redis_server.url, FAST) as transport:
            return await transport.jobs.fetch("t", 100)

    delivery = asyncio.run(queued())
    assert delivery.job.card["name"] == "BOLT-7"
    assert len(delivery.job.dialogues) == len(read_dialogues(cast / "train.jsonl"))


# -- faults and malformed payloads -------------------------------------------------------


async def test_chunks_and_counters_sent_while_redis_is_down_arrive_once(redis_server):
    """Writes retried across a restart are rebuilt each try: nothing is lost or doubled."""
    transport = open_transport(redis_server.url, FAST)
    turns = transport.turns
    await turns.heartbeat("hand")
    turn = make_turn(0)
    client = asyncio.create_task(_items(turns, turn))
    (delivery,) = await turns.fetch("hand", 1, 5000)
    await turns.publish([(delivery, "a")])
    await turns.count(turns=1, steps=1)
    redis_server.kill()
    during = [
        asyncio.create_task(turns.publish([(delivery, "b")])),
        asyncio.create_task(turns.count(turns=1, steps=2)),
    ]
    await asyncio.sleep(0.3)  # both fail at least once
    assert not any(t.done() for t in during)
    redis_server.start()
    await asyncio.gather(*during)
    await turns.publish([(delivery, "c")])
    assert await turns.complete(delivery, _reply(turn.id, "abc"))
    items = await asyncio.wait_for(client, 30)
    assert items == [Chunk("a"), Chunk("b"), Chunk("c"), _reply(turn.id, "abc")]
    stats = await turns.stats()
    assert (stats["turns"], stats["steps"]) == (2, 3)
    await transport.close()


async def _items(turns, turn):
    return [item async for item in turns.submit(turn, 30)]


def _reply(turn_id, text):
    return Reply(
        turn=turn_id,
        text=text,
        finish_reason="eos",
        prompt_tokens=1,
        completion_tokens=len(text),
        worker="hand",
    )


async def test_malformed_jobs_are_dead_lettered_and_the_next_job_is_fetched(redis_server):
    import redis.asyncio as aioredis

    r = aioredis.from_url(redis_server.url)
    transport = open_transport(redis_server.url, FAST)
    jobs = transport.jobs
    await r.hset(keys.job("half"), "data", JobStatus(id="half", character="Half").model_dump_json())
    deep = b'{"id": "deep", "card": %s%s, "dialogues": []}' % (b"[" * 100_000, b"]" * 100_000)
    spent = make_job("spent", "Spent", epochs=1)  # a trainer died on it max_attempts times
    await r.set(keys.attempts("spent"), FAST.max_attempts)
    entries = [
        {"data": b"\xff not json"},
        {"data": b'{"id": "half"}'},  # fields missing
        {"data": deep},  # past every parser's nesting limit
        {"data": b'{"id": "not an id", "card": {}}'},
        {"other": b"no data field"},
        {"data": spent.model_dump_json().encode()},  # valid, dropped before it is parsed
    ]
    for fields in entries:
        await r.xadd(keys.TRAIN, fields)
    await jobs.submit(make_job("good", "Nova", epochs=1), "Nova")
    delivery = await jobs.fetch("t", 2000)
    assert (delivery.job.id, delivery.attempt) == ("good", 1)
    assert await jobs.fetch("t", 10) is None
    dead = await r.xrange(keys.DEAD_JOBS)
    assert [f[b"data"] for _, f in dead] == [e.get("data", b"") for e in entries]
    half, deep_status, spent_status = [await jobs.status(i) for i in ("half", "deep", "spent")]
    assert (half.state, half.character, half.attempts) == ("failed", "Half", 1)
    assert "ValidationError" in half.error
    assert "Field required" in half.error
    assert deep_status.state == "failed"
    assert "recursion" in deep_status.error.lower()
    assert (spent_status.state, spent_status.attempts) == ("failed", FAST.max_attempts + 1)
    assert "started too many times" in spent_status.error
    assert (await transport.turns.stats())["jobs_failed"] == len(entries)
    assert (await r.xpending(keys.TRAIN, keys.TRAINERS))["pending"] == 1  # the good job only
    assert (await jobs.finish(delivery)).state == "done"
    assert await r.xlen(keys.TRAIN) == 0
    await r.aclose()
    await transport.close()


async def test_malformed_catalog_events_are_skipped(redis_server):
    import redis.asyncio as aioredis

    r = aioredis.from_url(redis_server.url)
    transport = open_transport(redis_server.url, FAST)
    bus = transport.events
    nova, vega = (card_from_fields(n, f"{n} is a star.").to_dict() for n in ("Nova", "Vega"))
    await r.xadd(keys.EVENTS, {"data": b"garbage"})
    await r.xadd(keys.EVENTS, {"data": json.dumps({"kind": "exploded", "key": "nova"})})
    await r.xadd(keys.EVENTS, {"other": b"no data field"})
    await bus.publish(CatalogEvent(kind="trained", key="nova", card=nova), b"block bytes")
    pipe = r.pipeline(transaction=False)
    for i in range(1001):  # more than a page of nothing valid
        pipe.xadd(keys.EVENTS, {"data": f"[{i}"})
    await pipe.execute()
    await bus.publish(CatalogEvent(kind="trained", key="vega", card=vega))
    (first,) = await bus.read("0")
    assert first[1].key == "nova"
    (second,) = await bus.read(first[0])
    assert second[1].key == "vega"
    assert await bus.read(second[0]) == []
    assert await bus.block("nova") == b"block bytes"
    with pytest.raises(KeyError, match="vega"):
        await bus.block("vega")  # published without one
    await r.aclose()
    await transport.close()


@pytest.mark.parametrize("backend", ["local", "redis"])
async def test_one_bad_turn_fails_alone_and_the_worker_serves_on(backend, request, store):
    """A mix naming an unknown block fails its turn only, never the worker or its batch."""
    url = request.getfixturevalue("redis_server").url if backend == "redis" else ""
    transport = open_transport(url, FAST)
    turns = transport.turns
    await turns.heartbeat("hand")  # submit before the worker starts: one batch for all
    bad = Turn(id="bad", channel="c", mix={"ash": 0.5, "nobody": 0.5},
               messages=(Message(role="user", content="Hi?"),))  # fmt: skip
    good = [make_turn(i) for i in range(4)]
    outcome = asyncio.gather(
        *(collect(turns, t) for t in [good[0], good[1], bad, good[2], good[3]]),
        return_exceptions=True,
    )
    while (s := await turns.stats()).get("queued", s.get("lag")) != 5:
        await asyncio.sleep(0.01)
    await turns.leave("hand")
    worker = serving_worker(turns, transport.events, open_runtime(store, "tiny"), name="w")
    task = asyncio.create_task(worker.run())
    results = await outcome
    failed = results.pop(2)
    assert isinstance(failed, TurnFailed)
    assert "'nobody'" in str(failed)
    expected = reference(open_runtime(store, "tiny"), good)
    assert [reply.text for reply, _ in results] == [expected[t.id] for t in good]
    assert not task.done()
    again, _ = await collect(turns, make_turn(7))  # still serving
    assert again.worker == "w"
    worker.stop()
    await task
    stats = await turns.stats()
    assert (stats["turns"], stats["dead"], stats["failed"]) == (5, 1, FAST.max_attempts)
    await transport.close()


async def test_a_catalog_event_that_cannot_be_applied_is_skipped(store):
    turns, events = LocalTurnQueue(FAST), LocalEventBus()
    runtime = open_runtime(store, "tiny")
    ash_block = runtime.catalog.block_path("ash").read_bytes()
    cards = {n: card_from_fields(n, f"{n} is a star.").to_dict() for n in ("Nova", "Vega", "Ash2")}
    await events.publish(CatalogEvent(kind="trained", key="nova", card=cards["Nova"]), b"junk")
    await events.publish(CatalogEvent(kind="trained", key="vega", card=cards["Vega"]))  # no block
    worker = serving_worker(turns, events, runtime, WorkerConfig(events_s=0.05), name="w")
    task = asyncio.create_task(worker.run())
    while not await turns.workers_alive():
        await asyncio.sleep(0.01)
    ash = make_turn(0, character="ash")
    reply, _ = await collect(turns, ash)
    await events.publish(CatalogEvent(kind="trained", key="ash2", card=cards["Ash2"]), ash_block)
    async with asyncio.timeout(30):
        while "ash2" not in runtime.slots:  # loaded between batches
            await asyncio.sleep(0.01)
    twin, _ = await collect(turns, ash.model_copy(update={"id": "twin", "character": "ash2"}))
    with pytest.raises(TurnFailed, match="Nova's block is not loaded"):
        await collect(turns, make_turn(2, character="nova"))
    assert not task.done()
    worker.stop()
    await task
    assert reply.text == reference(runtime, [ash])[ash.id]
    assert twin.text == reply.text  # the same block, loaded from the event


class _BusDownOnce(LocalEventBus):
    """An event bus whose first publication fails (the job's block cannot be announced)."""

    def __init__(self):
        super().__init__()
        self.failures = 1

    async def publish(self, event, block=None):
        if self.failures:
            self.failures -= 1
            raise RuntimeError("event bus down")
        await super().publish(event, block)


async def test_a_job_failing_outside_training_does_not_stop_the_trainer(store, tmp_path):
    train_store = tmp_path / "trainer-store"
    shutil.copytree(store, train_store)
    jobs, events = LocalJobQueue(QueueConfig(max_attempts=1)), _BusDownOnce()
    trainer = Trainer(jobs, events, open_runtime(train_store, "tiny"), name="t", block_ms=50)
    task = asyncio.create_task(trainer.run())
    await jobs.submit(make_job("j1", "Nova", epochs=1, max_steps=2), "Nova")
    await jobs.submit(make_job("j2", "Vega", epochs=1, max_steps=2), "Vega")
    async with asyncio.timeout(120):
        first = [s async for s in jobs.watch("j1", poll_s=0.05)][-1]
        second = [s async for s in jobs.watch("j2", poll_s=0.05)][-1]
    assert (first.state, first.error) == ("failed", "RuntimeError: event bus down")
    assert second.state == "done"
    assert not task.done()
    assert [e.key for _, e in await events.read("0")] == ["vega"]
    trainer.stop()
    await task
