"""Building the chat service and moderation from settings, embedded or against Redis.

One catalog per process and store, and one follower of catalog events feeding it, shared by
the chat service, moderation and (embedded) the in-process worker and trainer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from neeko import db
from neeko.catalog import Catalog
from neeko.characters import key_base
from neeko.chat import ChatService
from neeko.follower import CatalogFollower
from neeko.moderation import Moderation
from neeko.runtime import CAST_STORE, Runtime, open_runtime, writable_store
from neeko.settings import ChatSettings
from neeko.transport import Transport, open_transport


@contextlib.asynccontextmanager
async def open_services(
    settings: ChatSettings | None = None,
) -> AsyncIterator[tuple[ChatService, Moderation]]:
    """A ready chat service and moderation: database upgraded, queues open, catalog loaded.

    With no `REDIS_URL`, an in-process worker serves the model (and an in-process trainer
    starts on the first expansion job), on a writable copy of the starter cast's store.
    """
    cfg = settings or ChatSettings()
    url = db.database_url(cfg.database_url, cfg.db_path)
    if url.startswith("sqlite"):
        Path(cfg.db_path).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    await db.upgrade(url)
    engine = db.make_engine(url)
    transport = open_transport(cfg.redis_url)
    store = CAST_STORE
    if cfg.store or not cfg.redis_url:  # embedded, one process trains and serves
        default = Path(cfg.db_path).expanduser().resolve().parent / f"store-{key_base(cfg.model)}"
        store = await asyncio.to_thread(writable_store, cfg.store or default, cfg.model)
    catalog = await asyncio.to_thread(Catalog.open, store)
    follower = CatalogFollower(catalog, transport.events)
    embedded = _Embedded(transport, follower, cfg, store) if not cfg.redis_url else None
    moderation: Moderation | None = None
    try:
        count_tokens, context = await _token_counter(cfg, embedded)
        sessions = db.sessionmaker(engine)
        chat = ChatService(cfg, sessions, transport.turns, catalog, count_tokens, context)
        moderation = Moderation(
            cfg,
            sessions,
            transport.jobs,
            transport.events,
            follower,
            count_tokens,
            context,
            embedded.start_trainer if embedded is not None else None,
        )
        await moderation.load_submitted()
        follower.start()
        yield chat, moderation
    finally:
        await follower.stop()
        if embedded is not None:
            await embedded.stop()  # answers the turns and finishes the training job in flight
        if moderation is not None:
            await moderation.aclose()  # after the job, so its follower can report the end
        await transport.close()
        await engine.dispose()


async def _token_counter(
    cfg: ChatSettings, embedded: _Embedded | None
) -> tuple[Callable[[str], int], int]:
    """(count_tokens, context_tokens) of the model: the embedded worker's, else loaded."""
    from neeko.model import context_tokens, load_tokenizer

    if embedded is not None:
        rt = await embedded.start()
        tokenizer, context = rt.loaded.tokenizer, rt.loaded.model.config.max_position_embeddings
    else:
        tokenizer = await asyncio.to_thread(load_tokenizer, cfg.model)
        context = await asyncio.to_thread(context_tokens, cfg.model)
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False)), int(context)


class _Embedded:
    """The in-process worker (and, on demand, trainer) of a service without Redis."""

    def __init__(
        self, transport: Transport, follower: CatalogFollower, settings: ChatSettings, store: Path
    ) -> None:
        self.transport, self.follower, self.settings, self.store = (
            transport,
            follower,
            settings,
            store,
        )
        self.servers: list = []
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> Runtime:
        from neeko.worker import Worker

        rt = await self._runtime(serving=True)
        await self._run(Worker(self.transport.turns, self.follower, rt, name="embedded-worker"))
        while not await self.transport.turns.workers_alive():
            await asyncio.sleep(0.01)
        return rt

    async def start_trainer(self) -> None:
        from neeko.worker import Trainer

        if any(isinstance(s, Trainer) for s in self.servers):
            return
        rt = await self._runtime()
        t = self.transport
        await self._run(Trainer(t.jobs, t.events, rt, name="embedded-trainer"))

    async def _runtime(self, serving: bool = False) -> Runtime:
        """The model with the store's blocks, over the process's one catalog.

        A worker's (`serving`) decodes as the settings say; a trainer's eagerly.
        """
        s = self.settings
        decode, weights = (s.decode, s.weights) if serving else ("eager", "fp32")
        return await asyncio.to_thread(
            open_runtime, self.store, s.model, s.device, self.follower.catalog, decode, weights
        )

    async def _run(self, server: object) -> None:
        self.servers.append(server)
        self.tasks.append(asyncio.create_task(server.run()))  # type: ignore[attr-defined]

    async def stop(self) -> None:
        for server in self.servers:
            server.stop()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
