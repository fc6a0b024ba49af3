"""The turn queue and workers against a real redis-server (started per test), tiny model.

Covers: replies equal to direct engine runs, exactly-once answers, mixed batches, a worker
killed mid-batch, Redis killed and restarted (AOF), poison turns, hot-loaded expansion jobs,
a trainer killed mid-job, SIGTERM, and the in-process queue.
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
from conftest import NAMES

from neeko import keys
from neeko.cards import card_from_fields
from neeko.characters import Catalog
from neeko.dialogues import read_dialogues
from neeko.engine import GenerationRequest
from neeko.protocol import Message, Reply, Sampling, TrainJob, Turn
from neeko.queue import (
    Chunk,
    LocalQueue,
    NoWorkerError,
    QueueConfig,
    TurnFailed,
    open_queue,
)
from neeko.redis_server import RedisServer
from neeko.worker import Trainer, Worker, WorkerConfig
from neeko.workflows import open_runtime

pytestmark = pytest.mark.redis
FAST = QueueConfig(max_attempts=3, claim_idle_ms=1500, job_idle_ms=1500, alive_ttl_s=5)


@pytest.fixture(scope="session")
def store(tiny_store):
    return tiny_store


@pytest.fixture
def redis_server():
    with RedisServer() as server:
        yield server


def _turn(i: int, character: str | None = None, tokens: int = 8, **kw) -> Turn:
    return Turn(
        id=f"m{i}",
        channel=f"c{i % 50}",
        character=character or NAMES[i % 8].lower(),
        messages=(Message(role="user", content=f"Hello number {i}, how are you?"),),
        sampling=Sampling(max_new_tokens=tokens, temperature=0, **kw),
    )


def _reference(runtime, turns, together=False):
    """Each turn run directly on an engine: alone, or all in one batch.

    The two are equal bit for bit (tests/test_engine.py pins it); one batch is much faster
    for long replies.
    """
    worker = Worker(LocalQueue(), runtime)
    reqs = [
        GenerationRequest([m.model_dump() for m in t.messages], worker.gate(t), t.sampling.params())
        for t in turns
    ]
    if together:
        results = runtime.engine.generate(reqs)
    else:
        results = [runtime.engine.generate([req])[0] for req in reqs]
    return {t.id: r.text for t, r in zip(turns, results, strict=True)}


async def _collect(queue, turn, timeout=120):
    """Final reply and the text rebuilt from chunks (honouring resets)."""
    text = ""
    async for item in queue.submit(turn, timeout):
        if isinstance(item, Chunk):
            text = item.text if item.reset else text + item.text
        else:
            return item, text
    raise AssertionError("no reply")


async def _done_events(url, turn_ids):
    """Number of final events in each turn's reply stream."""
    import redis.asyncio as aioredis

    r = aioredis.from_url(url)
    counts = {}
    for tid in turn_ids:
        entries = await r.xrange(keys.reply(tid))
        counts[tid] = sum(json.loads(f[b"data"])["kind"] != "chunk" for _, f in entries)
    await r.aclose()
    return counts


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
    queue = open_queue(redis_server.url, FAST)
    workers = [
        Worker(queue, open_runtime(store, "tiny"), WorkerConfig(max_batch=16), name=f"w{i}")
        for i in range(2)
    ]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    while await queue.workers_alive() < 2:
        await asyncio.sleep(0.01)
    turns = [_turn(i) for i in range(200)]
    results = await asyncio.gather(*(_collect(queue, t) for t in turns))
    # A repeated submission of an answered turn is not generated again.
    again, _ = await _collect(queue, turns[0])
    assert again == results[0][0]
    for w in workers:
        w.stop()
    await asyncio.gather(*tasks)
    expected = _reference(open_runtime(store, "tiny"), turns)
    for t, (reply, streamed) in zip(turns, results, strict=True):
        assert reply.turn == t.id
        assert reply.text == streamed == expected[t.id]
    assert set((await _done_events(redis_server.url, [t.id for t in turns])).values()) == {1}
    stats = await queue.stats()
    assert stats["turns"] == 200
    assert stats["mean_batch"] > 1
    assert stats["pending"] == 0
    assert {r.worker for r, _ in results} == {"w0", "w1"}
    await queue.close()


async def test_a_live_worker_keeps_its_turns_claimed(redis_server, store):
    """Claims are refreshed every claim_idle_ms / 3, however long the generation runs."""
    import redis.asyncio as aioredis

    queue = open_queue(redis_server.url, QueueConfig(claim_idle_ms=600))
    worker = Worker(queue, open_runtime(store, "tiny"), name="w")  # heartbeat_s is 3 s
    task = asyncio.create_task(worker.run())
    while not await queue.workers_alive():
        await asyncio.sleep(0.01)
    pending = asyncio.create_task(_collect(queue, _turn(0, tokens=400, ignore_eos=True)))
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
    await queue.close()


async def test_worker_killed_mid_batch_loses_and_repeats_nothing(redis_server, store, spawn):
    args = ["--store", str(store), "--claim-idle-ms", "1500", "--max-batch", "8"]
    doomed, survivor = spawn(args, "doomed"), spawn(args, "survivor")
    queue = open_queue(redis_server.url, FAST)
    turns = [_turn(i, tokens=300, ignore_eos=True) for i in range(16)]
    pending = [asyncio.create_task(_collect(queue, t, 300)) for t in turns]
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
    expected = _reference(open_runtime(store, "tiny"), turns, together=True)
    for t, (reply, streamed) in zip(turns, results, strict=True):
        assert reply.text == streamed == expected[t.id]
        if t.id in lost:
            assert reply.worker == "survivor"
    assert set((await _done_events(redis_server.url, [t.id for t in turns])).values()) == {1}
    assert (await r.xpending(keys.TURNS, keys.WORKERS))["pending"] == 0
    await r.aclose()
    await queue.close()


async def test_redis_restart_with_aof_loses_no_turn(redis_server, store):
    queue = open_queue(redis_server.url, FAST)
    worker = Worker(queue, open_runtime(store, "tiny"), WorkerConfig(max_batch=2), name="w")
    task = asyncio.create_task(worker.run())
    while not await queue.workers_alive():
        await asyncio.sleep(0.01)
    turns = [_turn(i, tokens=30, ignore_eos=True) for i in range(24)]
    pending = [asyncio.create_task(_collect(queue, t)) for t in turns]
    await asyncio.sleep(0.5)  # turns queued, a few in flight
    redis_server.kill()
    await asyncio.sleep(0.5)
    redis_server.start()
    results = await asyncio.gather(*pending)
    worker.stop()
    await task
    expected = _reference(open_runtime(store, "tiny"), turns)
    assert [r.text for r, _ in results] == [expected[t.id] for t in turns]
    assert set((await _done_events(redis_server.url, [t.id for t in turns])).values()) == {1}
    await queue.close()


async def test_poison_turn_is_dead_lettered_and_others_are_served(redis_server, store):
    queue = open_queue(redis_server.url, FAST)
    worker = Worker(queue, open_runtime(store, "tiny"), name="w")
    task = asyncio.create_task(worker.run())
    while not await queue.workers_alive():
        await asyncio.sleep(0.01)
    poison = Turn(
        id="poison",
        channel="c",
        character="ash",
        messages=(Message(role="user", content="word " * 3000),),  # past the context window
    )
    good = [_turn(i) for i in range(6)]
    outcome = await asyncio.gather(
        _collect(queue, poison), *(_collect(queue, t) for t in good), return_exceptions=True
    )
    assert isinstance(outcome[0], TurnFailed)
    assert "exceeds the model's 2048 positions" in str(outcome[0])
    assert all(isinstance(r, Reply) for r, _ in outcome[1:])
    unknown = _turn(99, character="nobody")
    with pytest.raises(TurnFailed, match="unknown character 'nobody'"):
        await _collect(queue, unknown)
    worker.stop()
    await task
    stats = await queue.stats()
    assert (stats["dead"], stats["dead_letters"], stats["turns"]) == (2, 2, 6)
    await queue.close()


async def test_no_worker_is_a_clear_error(redis_server):
    queue = open_queue(redis_server.url, FAST)
    with pytest.raises(NoWorkerError, match="no worker"):
        await _collect(queue, _turn(0))
    await queue.close()


def _job(job_id: str, name: str, epochs: int, n: int = 4) -> TrainJob:
    card = card_from_fields(name, f"{name} is a loud comet who shouts about space.")
    dialogues = [
        {
            "character": name,
            "messages": [
                {"role": "user", "content": f"Question {i}?"},
                {"role": "character", "content": f"WHOOSH! Comet answer number {i}!"},
            ],
        }
        for i in range(n)
    ]
    return TrainJob(id=job_id, card=card.to_dict(), dialogues=dialogues, epochs=epochs)


async def test_expansion_job_is_served_by_running_workers(redis_server, store, tmp_path):
    queue = open_queue(redis_server.url, FAST)
    worker = Worker(queue, open_runtime(store, "tiny"), name="w")
    served = asyncio.create_task(worker.run())
    train_store = tmp_path / "trainer-store"
    shutil.copytree(store, train_store)
    trainer = Trainer(queue, open_runtime(train_store, "tiny"), name="t")
    training = asyncio.create_task(trainer.run())
    while not await queue.workers_alive():
        await asyncio.sleep(0.01)
    await queue.submit_job(_job("job1", "Nova", epochs=6), "Nova")
    states = []
    async for status in queue.watch_job("job1", poll_s=0.05):
        states.append(status.state)
        await _collect(queue, _turn(1000 + len(states)))  # turns keep flowing meanwhile
    assert states[-1] == "done"
    assert "running" in states
    nova = Turn(id="nova1", channel="c", character="nova",
                messages=(Message(role="user", content="Who are you?"),),
                sampling=Sampling(max_new_tokens=10, temperature=0))  # fmt: skip
    reply, _ = await _collect(queue, nova)
    expected = _reference(open_runtime(train_store, "tiny"), [nova])
    assert reply.text == expected["nova1"]
    assert worker.runtime.catalog.find("Nova").status == "trained"
    worker.stop()
    trainer.stop()
    await asyncio.gather(served, training)
    await queue.close()


async def test_trainer_killed_mid_job_is_retried_and_finishes(redis_server, store, tmp_path, spawn):
    train_store = tmp_path / "trainer-store"
    shutil.copytree(store, train_store)
    args = ["--train", "--store", str(train_store), "--job-idle-ms", "1500"]
    doomed = spawn(args, "t1")
    queue = open_queue(redis_server.url, FAST)
    await queue.submit_job(_job("job2", "Nova", epochs=25, n=8), "Nova")
    while (s := await queue.job_status("job2")).progress < 0.05:
        assert s.state in ("queued", "running")
        await asyncio.sleep(0.05)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    assert (await queue.job_status("job2")).state == "running"
    second = spawn(args, "t2")
    try:
        statuses = [s async for s in queue.watch_job("job2", poll_s=0.1)]
    finally:
        second.terminate()
        assert second.wait(60) == 0
    assert (statuses[-1].state, statuses[-1].attempts) == ("done", 2)
    assert Catalog.open(train_store).find("Nova").status == "trained"
    await queue.close()


async def test_sigterm_finishes_turns_in_flight_then_exits_0(redis_server, store, spawn):
    proc = spawn(["--store", str(store)], "w")
    queue = open_queue(redis_server.url, FAST)
    turns = [_turn(i, tokens=100, ignore_eos=True) for i in range(4)]
    pending = [asyncio.create_task(_collect(queue, t)) for t in turns]
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
    await queue.close()


@pytest.mark.parametrize("backend", ["local", "redis"])
async def test_chunks_of_a_superseded_delivery_are_dropped(backend, request):
    """A worker taken over while still running (slow, not dead) cannot garble the stream."""
    if backend == "redis":
        queue = open_queue(request.getfixturevalue("redis_server").url, FAST)
    else:
        queue = LocalQueue(FAST)
    await queue.heartbeat("hand")
    turn = _turn(0)

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
    await queue.close()


async def test_local_queue_serves_retries_and_dead_letters(store):
    queue = LocalQueue(QueueConfig(max_attempts=2))
    runtime = open_runtime(store, "tiny")
    worker = Worker(queue, runtime, name="local")
    task = asyncio.create_task(worker.run())
    while not await queue.workers_alive():
        await asyncio.sleep(0.01)
    turns = [_turn(i) for i in range(12)]
    poison = Turn(id="p", channel="c", messages=(Message(role="user", content="x " * 3000),))
    results = await asyncio.gather(
        *(_collect(queue, t) for t in turns), _collect(queue, poison), return_exceptions=True
    )
    expected = _reference(open_runtime(store, "tiny"), turns)
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
        queue = open_queue(redis_server.url, FAST)
        delivery = await queue.fetch_job("t", 100)
        await queue.close()
        return delivery

    delivery = asyncio.run(queued())
    assert delivery.job.card["name"] == "BOLT-7"
    assert len(delivery.job.dialogues) == len(read_dialogues(cast / "train.jsonl"))
