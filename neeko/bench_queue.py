"""`neeko bench queue`: what the Redis queue costs, and what batching across turns gains.

One run, one process: a worker serves a Redis queue (a private `redis-server` unless a URL
is given) with the starter cast on the model; the client is an asyncio task beside it.

- First-token latency: turns are sent one at a time, alternating with direct engine calls
  of the same request. `queue_overhead_ms` of a turn is the client's time to its first
  chunk minus the engine's own time to that turn's first token (`Reply.ttft_s`): the
  queue's whole cost (serialisation, Redis round trips, the gather window, thread hops).
  `ttft_direct_ms_p50` / `ttft_queue_ms_p50` are the two end-to-end medians side by side.
- Throughput: 64 concurrent turns over 8 characters (the 4 trained cast members and 4
  fused mixes), first with `max_batch=16`, then with `max_batch=1`; tokens per second of
  each, and their ratio `batching_speedup`. EOS is ignored so every turn has equal length.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid

import torch

from neeko.catalog import Catalog
from neeko.engine import GenerationRequest
from neeko.follower import CatalogFollower
from neeko.protocol import Message, Reply, Sampling, Turn
from neeko.queue import Chunk, QueueConfig, TurnQueue
from neeko.redis_server import RedisServer
from neeko.runtime import CAST_STORE, Runtime, open_runtime, untrained_cast_runtime
from neeko.transport import Transport, open_transport
from neeko.worker import Worker, WorkerConfig

QUESTIONS = [
    "What are you doing today?",
    "Tell me about the strangest thing you have seen.",
    "What do you fear most?",
    "Give me one piece of advice.",
]


def run_queue_bench(
    model: str = "default",
    quick: bool = False,
    device: str | None = None,
    redis_url: str | None = None,
) -> dict:
    """Run both measurements; returns the JSON-ready figures.

    The starter cast's blocks serve the model they were trained on; another model gets the
    cast with empty blocks (the same amount of work per row).
    """
    if Catalog.open(CAST_STORE).model == model:
        runtime = open_runtime(CAST_STORE, model, device)
    else:
        runtime = untrained_cast_runtime(model, device)
    with contextlib.ExitStack() as stack:
        url = redis_url or stack.enter_context(RedisServer(appendonly=False)).url
        return asyncio.run(_bench(runtime, url, quick))


async def _bench(rt: Runtime, url: str, quick: bool) -> dict:
    async with open_transport(url, QueueConfig()) as transport:
        latency = await _latency(rt, transport, pairs=20 if quick else 100)
        tokens = 16 if quick else 32
        batched = await _throughput(rt, transport, max_batch=16, new_tokens=tokens)
        single = await _throughput(rt, transport, max_batch=1, new_tokens=tokens)
    return {
        **latency,
        "tok_s_batched": round(batched, 2),
        "tok_s_max_batch_1": round(single, 2),
        "batching_speedup": round(batched / single, 3),
        "turns": 64,
        "characters": 8,
        "new_tokens": tokens,
        "model": rt.loaded.name,
        "device": str(rt.loaded.device),
        "threads": torch.get_num_threads(),
    }


def _speakers(rt: Runtime) -> list[dict]:
    """Turn fields of 8 speakers: each trained character, and 4 fused two-way mixes."""
    keys = [c.key for c in rt.catalog.trained()]
    out: list[dict] = [{"character": k} for k in keys]
    for i in range(len(keys)):
        out.append({"mix": {keys[i]: 0.6, keys[(i + 1) % len(keys)]: 0.4}})
    return out[:8]


def _turn(speaker: dict, question: str, new_tokens: int, greedy_seed: int = 0) -> Turn:
    return Turn(
        id=f"bench-{uuid.uuid4().hex}",
        channel="bench",
        messages=(Message(role="user", content=question),),
        sampling=Sampling(max_new_tokens=new_tokens, temperature=0, ignore_eos=True),
        **speaker,
    )


async def _latency(rt: Runtime, transport: Transport, pairs: int) -> dict:
    """Alternate direct engine calls and queued turns; first-token times of both."""
    queue = transport.turns
    cfg = WorkerConfig(max_batch=16, block_ms=50)
    follower = CatalogFollower(rt.catalog, transport.events)
    worker = Worker(queue, follower, rt, cfg, name="bench-latency")
    task = asyncio.create_task(worker.run())
    await _until_alive(queue)
    speakers = _speakers(rt)
    direct, queued, overhead = [], [], []
    try:
        await _first_token(queue, _turn(speakers[0], QUESTIONS[0], 4))  # warm-up
        for i in range(pairs):
            turn = _turn(speakers[i % len(speakers)], QUESTIONS[i % len(QUESTIONS)], 4)
            direct.append(await _direct_first_token(rt, worker, turn))
            ttft, reply = await _first_token(queue, turn)
            queued.append(ttft)
            overhead.append(ttft - reply.ttft_s)
    finally:
        worker.stop()
        await task
    ms = [x * 1e3 for x in overhead]
    return {
        "queue_overhead_ms_p50": round(statistics.median(ms), 3),
        "queue_overhead_ms_p99": round(_quantile(ms, 0.99), 3),
        "ttft_direct_ms_p50": round(statistics.median(direct) * 1e3, 3),
        "ttft_queue_ms_p50": round(statistics.median(queued) * 1e3, 3),
        "latency_pairs": pairs,
    }


async def _direct_first_token(rt: Runtime, worker: Worker, turn: Turn) -> float:
    first: list[float] = []
    req = GenerationRequest(
        [m.model_dump() for m in turn.messages],
        worker.gate(turn),
        turn.sampling.params(),
        on_text=lambda _: first.append(time.perf_counter()) if not first else None,
    )
    t0 = time.perf_counter()
    await asyncio.to_thread(rt.engine.generate, [req])
    return first[0] - t0


async def _first_token(queue: TurnQueue, turn: Turn) -> tuple[float, Reply]:
    t0 = time.perf_counter()
    ttft = None
    async for item in queue.submit(turn, timeout=120):
        if isinstance(item, Chunk) and ttft is None:
            ttft = time.perf_counter() - t0
        elif isinstance(item, Reply):
            return (ttft if ttft is not None else time.perf_counter() - t0), item
    raise RuntimeError("no reply")  # pragma: no cover (submit raises on timeout)


async def _throughput(rt: Runtime, transport: Transport, max_batch: int, new_tokens: int) -> float:
    """Tokens per second of 64 concurrent turns over 8 speakers."""
    queue = transport.turns
    cfg = WorkerConfig(max_batch=max_batch, block_ms=50)
    follower = CatalogFollower(rt.catalog, transport.events)
    worker = Worker(queue, follower, rt, cfg, name="bench-tput")
    task = asyncio.create_task(worker.run())
    await _until_alive(queue)
    speakers = _speakers(rt)
    turns = [
        _turn(speakers[i % len(speakers)], QUESTIONS[i % len(QUESTIONS)], new_tokens)
        for i in range(64)
    ]
    try:
        await queue.ask(_turn(speakers[0], QUESTIONS[0], 2))  # warm-up, worker registered
        t0 = time.perf_counter()
        replies = await asyncio.gather(*(queue.ask(t, timeout=1800) for t in turns))
        wall = time.perf_counter() - t0
    finally:
        worker.stop()
        await task
    return sum(r.completion_tokens for r in replies) / wall


async def _until_alive(queue: TurnQueue) -> None:
    while not await queue.workers_alive():
        await asyncio.sleep(0.01)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
