"""Building a ready chat service from settings, embedded or against Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from neeko import db
from neeko.characters import Catalog, slug
from neeko.chat import ChatService
from neeko.queue import TurnQueue, open_queue
from neeko.serve import writable_store
from neeko.settings import ChatSettings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@contextlib.asynccontextmanager
async def open_service(settings: ChatSettings | None = None) -> AsyncIterator[ChatService]:
    """A ready service: database upgraded, queue open, catalog loaded.

    With no `REDIS_URL`, an in-process worker serves the model (and an in-process trainer
    starts on the first expansion job), on a writable copy of the starter cast's store.
    """
    from neeko.model import load_tokenizer
    from neeko.workflows import CAST_STORE

    cfg = settings or ChatSettings()
    url = db.database_url(cfg.database_url, cfg.db_path)
    if url.startswith("sqlite"):
        Path(cfg.db_path).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    await db.upgrade(url)
    engine = db.make_engine(url)
    queue = open_queue(cfg.redis_url)
    store = CAST_STORE
    if cfg.store or not cfg.redis_url:  # embedded, one process trains and serves
        default = Path(cfg.db_path).expanduser().resolve().parent / f"store-{slug(cfg.model)}"
        store = await asyncio.to_thread(writable_store, cfg.store or default, cfg.model)
    catalog = await asyncio.to_thread(Catalog.open, store)
    embedded = _Embedded(queue, cfg, store) if not cfg.redis_url else None
    service: ChatService | None = None
    try:
        if embedded is not None:
            tokenizer = await embedded.start()
        else:
            tokenizer = await asyncio.to_thread(load_tokenizer, cfg.model)
        service = ChatService(
            cfg,
            db.sessionmaker(engine),
            queue,
            catalog,
            lambda text: len(tokenizer.encode(text, add_special_tokens=False)),
            embedded.start_trainer if embedded is not None else None,
        )
        await service.moderation.load_submitted()
        yield service
    finally:
        if embedded is not None:
            await embedded.stop()  # answers the turns and finishes the training job in flight
        if service is not None:
            await service.aclose()  # after the job, so its follower can report the end
        await queue.close()
        await engine.dispose()


class _Embedded:
    """The in-process worker (and, on demand, trainer) of a service without Redis."""

    def __init__(self, queue: TurnQueue, settings: ChatSettings, store: Path) -> None:
        self.queue, self.settings, self.store = queue, settings, store
        self.servers: list = []
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> PreTrainedTokenizerBase:
        from neeko.worker import Worker
        from neeko.workflows import open_runtime

        rt = await asyncio.to_thread(
            open_runtime, self.store, self.settings.model, self.settings.device
        )
        await self._run(Worker(self.queue, rt, name="embedded-worker"))
        while not await self.queue.workers_alive():
            await asyncio.sleep(0.01)
        return rt.loaded.tokenizer

    async def start_trainer(self) -> None:
        from neeko.worker import Trainer
        from neeko.workflows import open_runtime

        if any(isinstance(s, Trainer) for s in self.servers):
            return
        rt = await asyncio.to_thread(
            open_runtime, self.store, self.settings.model, self.settings.device
        )
        await self._run(Trainer(self.queue, rt, name="embedded-trainer"))

    async def _run(self, server: object) -> None:
        self.servers.append(server)
        self.tasks.append(asyncio.create_task(server.run()))  # type: ignore[attr-defined]

    async def stop(self) -> None:
        for server in self.servers:
            server.stop()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
