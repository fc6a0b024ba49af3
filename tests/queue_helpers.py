"""Helpers of the queue tests: turns and jobs of the tiny cast, replies collected, references."""

import json

from conftest import NAMES

from neeko import keys
from neeko.cards import card_from_fields
from neeko.characters import SHARED, scope_key
from neeko.engine import GenerationRequest
from neeko.events import LocalEventBus
from neeko.follower import CatalogFollower
from neeko.protocol import Message, Sampling, TrainJob, Turn
from neeko.queue import Chunk, LocalTurnQueue, QueueConfig
from neeko.worker import Worker

FAST = QueueConfig(max_attempts=3, claim_idle_ms=1500, job_idle_ms=1500, alive_ttl_s=5)
"""Short timeouts, so reclaiming and dead workers show within a test."""


def make_turn(i: int, character: str | None = None, tokens: int = 8, **kw) -> Turn:
    return Turn(
        id=f"m{i}",
        channel=f"c{i % 50}",
        character=character or NAMES[i % 8].lower(),
        messages=(Message(role="user", content=f"Hello number {i}, how are you?"),),
        sampling=Sampling(max_new_tokens=tokens, temperature=0, **kw),
    )


def reference(runtime, turns, together=False):
    """Each turn run directly on an engine: alone, or all in one batch.

    The two are equal bit for bit (tests/test_engine.py pins it); one batch is much faster
    for long replies.
    """
    worker = serving_worker(LocalTurnQueue(), LocalEventBus(), runtime)
    reqs = [
        GenerationRequest([m.model_dump() for m in t.messages], worker.gate(t), t.sampling.params())
        for t in turns
    ]
    if together:
        results = runtime.engine.generate(reqs)
    else:
        results = [runtime.engine.generate([req])[0] for req in reqs]
    return {t.id: r.text for t, r in zip(turns, results, strict=True)}


async def collect(queue, turn, timeout=120):
    """Final reply and the text rebuilt from chunks (honouring resets)."""
    text = ""
    async for item in queue.submit(turn, timeout):
        if isinstance(item, Chunk):
            text = item.text if item.reset else text + item.text
        else:
            return item, text
    raise AssertionError("no reply")


async def done_events(url, turn_ids):
    """Number of final events in each turn's reply stream."""
    import redis.asyncio as aioredis

    r = aioredis.from_url(url)
    counts = {}
    for tid in turn_ids:
        entries = await r.xrange(keys.reply(tid))
        counts[tid] = sum(json.loads(f[b"data"])["kind"] != "chunk" for _, f in entries)
    await r.aclose()
    return counts


def make_job(job_id: str, name: str, epochs: int, n: int = 4, **kw) -> TrainJob:
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
    return TrainJob(
        id=job_id,
        key=scope_key(SHARED, name),
        card=card.to_dict(),
        dialogues=dialogues,
        epochs=epochs,
        **kw,
    )


def serving_worker(turns, events, runtime, config=None, name=None) -> Worker:
    """A worker on `runtime`, with a catalog follower of its own over `events`."""
    return Worker(turns, CatalogFollower(runtime.catalog, events), runtime, config, name)
