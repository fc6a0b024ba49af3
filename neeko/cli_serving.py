"""`neeko worker`, `neeko status`, `neeko job`: the serving side of the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import uuid

from neeko.errors import NeekoError
from neeko.queue import QueueConfig
from neeko.transport import Transport, open_transport


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the serving sub-commands."""
    worker = sub.add_parser("worker", help="serve turns (or expansion jobs) from Redis")
    worker.add_argument("--redis-url", default=None, help="default: $REDIS_URL")
    worker.add_argument("--store", default=None, help="character store (default: the cast's)")
    worker.add_argument("--model", default="default", help="default | tiny | PATH | hub id")
    worker.add_argument("--device", default=None)
    worker.add_argument("--train", action="store_true", help="run expansion jobs instead")
    worker.add_argument("--max-batch", type=int, default=16)
    worker.add_argument(
        "--gather-ms", type=float, default=0.0, help="wait for more turns before a prefill"
    )
    worker.add_argument(
        "--kv-cache-mb",
        type=int,
        default=512,
        help="memory for finished turns' KV caches, reused by the next turn (0: off)",
    )
    worker.add_argument(
        "--decode",
        choices=("eager", "compiled", "auto"),
        default=os.environ.get("NEEKO_DECODE") or "auto",
        help="decode step: eager, compiled (torch.compile; CUDA graphs on a GPU), or auto "
        "(compiled where the native CPU step runs, else eager)",
    )
    worker.add_argument(
        "--weights",
        choices=("fp32", "bf16", "int8", "int4"),
        default=os.environ.get("NEEKO_WEIGHTS") or "fp32",
        help="weight storage of the compiled step (weight-only; int8, int4 on CPU only)",
    )
    worker.add_argument("--max-attempts", type=int, default=3)
    worker.add_argument("--claim-idle-ms", type=int, default=30_000)
    worker.add_argument("--job-idle-ms", type=int, default=60_000)
    worker.add_argument("--log-s", type=float, default=30.0, help="seconds between status logs")
    worker.add_argument("--name", default=None, help="consumer name (default: host-pid-random)")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.set_defaults(func=worker_main)

    status = sub.add_parser("status", help="queue counters as JSON")
    status.add_argument("--redis-url", default=None, help="default: $REDIS_URL")
    status.set_defaults(func=status_main)

    job = sub.add_parser("job", help="queue an expansion job for a trainer and follow it")
    job.add_argument("--redis-url", default=None, help="default: $REDIS_URL")
    job.add_argument("--card", required=True, help="character card (JSON or PNG)")
    job.add_argument("--data", required=True, help="the character's dialogues (JSONL)")
    job.add_argument("--epochs", type=int, default=2)
    job.add_argument("--max-steps", type=int, default=None)
    job.add_argument("--id", default=None, help="job id (default: random)")
    job.add_argument("--no-wait", action="store_true", help="queue it and return")
    job.set_defaults(func=job_main)


def _transport(url: str | None, config: QueueConfig | None = None) -> Transport:
    url = url or os.environ.get("REDIS_URL", "")
    if not url:
        raise NeekoError("set REDIS_URL or pass --redis-url (workers serve a Redis queue)")
    return open_transport(url, config)


def worker_main(args: argparse.Namespace) -> int:
    """Run a worker or trainer until SIGTERM / SIGINT (or an empty queue with --burst)."""
    logging.getLogger("neeko").setLevel(logging.INFO)
    config = QueueConfig(
        max_attempts=args.max_attempts,
        claim_idle_ms=args.claim_idle_ms,
        job_idle_ms=args.job_idle_ms,
    )
    transport = _transport(args.redis_url, config)
    return asyncio.run(_serve(transport, args))


async def _serve(transport: Transport, args: argparse.Namespace) -> int:
    from neeko.follower import CatalogFollower
    from neeko.runtime import CAST_STORE, open_runtime, writable_store
    from neeko.worker import Trainer, Worker, WorkerConfig

    named = args.store or os.environ.get("NEEKO_STORE")
    if args.train and not named:
        raise NeekoError("a trainer writes blocks: pass --store DIR (or set NEEKO_STORE)")
    store = writable_store(named, args.model) if named else CAST_STORE
    decode, weights = ("eager", "fp32") if args.train else (args.decode, args.weights)
    runtime = await asyncio.to_thread(
        open_runtime, store, args.model, args.device, None, decode, weights
    )
    follower = CatalogFollower(runtime.catalog, transport.events)
    if args.train:
        await follower.poll()  # learn the characters submitted elsewhere (their keys)
        follower.start()
        server: Worker | Trainer = Trainer(
            transport.jobs, transport.events, runtime, name=args.name
        )
    else:
        cfg = WorkerConfig(
            max_batch=args.max_batch,
            gather_ms=args.gather_ms,
            log_s=args.log_s,
            kv_cache_mb=args.kv_cache_mb,
        )
        server = Worker(transport.turns, follower, runtime, cfg, name=args.name)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    logging.getLogger("neeko").info("%s ready (store %s, model %s)", server.name, store, args.model)
    print(f"ready {server.name}", flush=True)
    try:
        await server.run(burst=args.burst)
    finally:
        await follower.stop()
        await transport.close()
    return 0


def status_main(args: argparse.Namespace) -> int:
    """Print the queue's counters as one JSON object."""

    async def run() -> dict:
        async with _transport(args.redis_url) as transport:
            return await transport.turns.stats()

    print(json.dumps(asyncio.run(run())))
    return 0


def job_main(args: argparse.Namespace) -> int:
    """Queue an expansion job and print its progress until it ends."""
    from neeko.cards import read_card_file
    from neeko.characters import SHARED, scope_key
    from neeko.dialogues import read_dialogues
    from neeko.protocol import TrainJob

    card = read_card_file(args.card)
    dialogues = read_dialogues(args.data)
    rows = [
        {
            "character": card.name,
            "messages": [{"role": role, "content": text} for role, text in d.messages],
        }
        for d in dialogues
    ]
    job = TrainJob(
        id=args.id or f"job-{uuid.uuid4().hex[:12]}",
        key=scope_key(SHARED, card.name),
        card=card.to_dict(),
        dialogues=rows,
        epochs=args.epochs,
        max_steps=args.max_steps,
    )

    async def run() -> int:
        async with _transport(args.redis_url) as transport:
            status = await transport.jobs.submit(job, card.name)
            print(json.dumps(status.model_dump()), flush=True)
            if args.no_wait:
                return 0
            async for status in transport.jobs.watch(job.id):
                print(json.dumps(status.model_dump()), flush=True)
            return 0 if status.state == "done" else 1

    code = asyncio.run(run())
    if code:
        print(f"neeko: job {job.id} failed", file=sys.stderr)
    return code
