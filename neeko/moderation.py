"""The moderators' side of the chat service: submitted characters and their training jobs.

A submitted card is fused at once, so it is playable; `train` queues an expansion job whose
status is mirrored into the database and posted as lines for the channel. Catalog events (a
block was trained, here or by another process) make characters `trained`. Jobs outlive a
restart: one the queue still has is followed again, one it lost is failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from neeko import db
from neeko.cards import CharacterCard, card_from_fields, parse_card
from neeko.characters import Catalog, Character
from neeko.chat_types import Answer, Author, refusal
from neeko.dialogues import DataError, job_dialogues
from neeko.errors import NeekoError
from neeko.protocol import JobStatus, TrainJob
from neeko.queue import TurnQueue, stop_task

MODERATORS_ONLY = "Only moderators (Manage Server, or the moderator role) may do that."
Announce = Callable[[str, str], Awaitable[None]]
"""Posts a line in a channel, by id."""


class Moderation:
    """Submitting and training characters; keeps the catalog in step with trained blocks."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        queue: TurnQueue,
        catalog: Catalog,
        start_trainer: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Moderation over the service's database, queue and catalog.

        `start_trainer` is awaited before a job is queued (an embedded trainer starts then).
        """
        self.sessions, self.queue, self.catalog = sessions, queue, catalog
        self._start_trainer = start_trainer
        self._followers: dict[str, asyncio.Task] = {}
        """Job id -> the task that mirrors the job's status and posts its progress."""
        self._last_event = "0"
        self.announce: Announce | None = None
        """Set by a front end to hear from jobs that outlived the request that started them."""

    async def submit(
        self,
        author: Author,
        *,
        card: bytes | None = None,
        filename: str = "",
        name: str | None = None,
        profile: str | None = None,
        greeting: str = "",
    ) -> Answer:
        """Register a character from a card file or fields; playable at once by fusion."""
        if not author.moderator:
            return refusal(MODERATORS_ONLY)
        try:
            if card is not None:
                parsed = parse_card(card, filename or "card")
            elif name and profile:
                parsed = card_from_fields(name, profile, greeting=greeting)
            else:
                return refusal("Attach a card, or give a name and a profile.")
            await self.sync_catalog()
            char = await asyncio.to_thread(self.catalog.fuse, parsed)
        except NeekoError as exc:
            return refusal(f"Character not added: {exc}")
        async with self.sessions() as s:
            s.add(
                db.CharacterRow(
                    key=char.key,
                    name=char.name,
                    card=char.card.to_dict(),
                    status="fused",
                    fused_from=char.fused_from,
                    submitted_by=author.id,
                )
            )
            await s.commit()
        mix = ", ".join(
            f"{self.catalog.characters[k].name} {w:.0%}" for k, w in char.fused_from.items()
        )
        return Answer(
            True,
            f"**{char.name}** is playable now (fused from {mix or 'the base model'}). "
            f"`/character train {char.name}` gives it a block of its own.",
            private=True,
        )

    async def train(
        self,
        author: Author,
        name: str,
        channel: str,
        dialogues: bytes | None = None,
        on_progress: Callable[[str], Awaitable[None]] | None = None,
    ) -> Answer:
        """Queue an expansion job for a submitted character; progress goes to `on_progress`."""
        if not author.moderator:
            return refusal(MODERATORS_ONLY)
        await self.sync_catalog()
        char = self.catalog.find(name)
        if char is None:
            return refusal(f"No character is called {name!r}.")
        if char.status != "fused":
            return refusal(f"{char.name} is already {char.status}.")
        try:
            data = job_dialogues(char.card, dialogues)
        except DataError as exc:
            return refusal(str(exc))
        job = TrainJob(
            id=f"train-{uuid.uuid4().hex[:16]}", card=char.card.to_dict(), dialogues=data
        )
        if self._start_trainer is not None:
            await self._start_trainer()
        status = await self.queue.submit_job(job, char.name)
        char.status = "training"
        async with self.sessions() as s:
            row = await s.get(db.CharacterRow, char.key)
            if row is not None:
                row.status = "training"
            s.add(
                db.TrainingJob(
                    id=job.id, character_key=char.key, requested_by=author.id, channel_id=channel
                )
            )
            await s.commit()
        self._start_following(job.id, char, on_progress)
        return Answer(
            True,
            f"Training {char.name} on {len(data)} dialogues (job {status.id}); "
            "progress will be posted here.",
            private=True,
        )

    async def status(self, name: str) -> Answer:
        """A character's status, with its latest training job."""
        await self.sync_catalog()
        char = self.catalog.find(name)
        if char is None:
            return refusal(f"No character is called {name!r}.")
        text = f"**{char.name}**: {char.status}"
        async with self.sessions() as s:
            job = await s.scalar(
                select(db.TrainingJob)
                .where(db.TrainingJob.character_key == char.key)
                .order_by(db.TrainingJob.created_at.desc())
            )
        if job is not None:
            text += f"; last job {job.id}: {job.state}, {job.progress:.0%}"
            if job.error:
                text += f" ({job.error})"
        return Answer(True, text, private=True)

    async def _follow(
        self, job_id: str, char: Character, on_progress: Callable[[str], Awaitable[None]] | None
    ) -> None:
        """Mirror a job's status into the database and post progress every 25 %."""
        posted = -1
        async for status in self.queue.watch_job(job_id):
            await self._record_job(status)
            step = int(status.progress * 4)
            line = None
            if status.state == "running" and step > posted:
                posted = step
                loss = f", loss {status.loss:.3f}" if status.loss is not None else ""
                line = f"Training {char.name}: {status.progress:.0%}{loss}"
            elif status.state == "done":
                await self.sync_catalog(wait_for=char.key)
                line = f"{char.name} has a block of its own now."
            elif status.state == "failed":
                char.status = "fused"
                await self._set_status(char.key, "fused")
                line = f"Training {char.name} failed: {status.error}"
            if line and on_progress is not None:
                with contextlib.suppress(Exception):
                    await on_progress(line)

    async def _record_job(self, status: JobStatus) -> None:
        async with self.sessions() as s:
            row = await s.get(db.TrainingJob, status.id)
            if row is not None:
                row.state, row.progress, row.loss = status.state, status.progress, status.loss
                row.error = status.error
                await s.commit()

    async def _set_status(self, key: str, status: str) -> None:
        async with self.sessions() as s:
            row = await s.get(db.CharacterRow, key)
            if row is not None:
                row.status = status
                await s.commit()

    async def load_submitted(self) -> None:
        """Put the characters moderators submitted (in the database) into the catalog."""
        async with self.sessions() as s:
            rows = list(await s.scalars(select(db.CharacterRow)))
        for row in rows:
            if row.key in self.catalog.characters:
                continue
            card = CharacterCard.from_dict(row.card)
            status = row.status if row.status in ("fused", "training", "trained") else "fused"
            self.catalog.characters[row.key] = Character(
                row.key, card, status, dict(row.fused_from)
            )
        await self.sync_catalog()
        await self._resume_jobs()

    async def _resume_jobs(self) -> None:
        """Take up the training jobs an earlier run left unfinished.

        A job the queue still has (Redis) is followed again, its lines going to `announce`;
        one it lost (the in-process queue) is failed, so the character can be trained again.
        """
        async with self.sessions() as s:
            jobs = list(
                await s.scalars(
                    select(db.TrainingJob).where(db.TrainingJob.state.in_(("queued", "running")))
                )
            )
        for job in jobs:
            char = self.catalog.characters.get(job.character_key)
            if char is None:
                continue
            found = await self.queue.job_status(job.id)
            if found is not None:
                self._start_following(job.id, char, self._announcer(job.channel_id))
                continue
            done = char.status == "trained"  # its block reached the store before the restart
            status = JobStatus(
                id=job.id,
                state="done" if done else "failed",
                progress=1.0 if done else job.progress,
                loss=job.loss,
                error="" if done else "interrupted by a restart; train it again",
            )
            await self._record_job(status)
            char.status = "trained" if done else "fused"
            await self._set_status(char.key, char.status)

    def _announcer(self, channel: str | None) -> Callable[[str], Awaitable[None]] | None:
        if channel is None:
            return None

        async def post(line: str) -> None:
            if self.announce is not None:
                await self.announce(channel, line)

        return post

    async def sync_catalog(self, wait_for: str | None = None) -> None:
        """Apply catalog events: characters whose blocks were trained become `trained`."""
        deadline = time.monotonic() + 30
        while True:
            for event_id, event in await self.queue.read_events(self._last_event):
                self._last_event = event_id
                char = self.catalog.characters.get(event.key)
                if char is None:
                    card = CharacterCard.from_dict(event.card)
                    char = self.catalog.characters[event.key] = Character(event.key, card)
                if char.status != "trained":
                    char.status, char.fused_from = "trained", {}
                    await self._set_status(event.key, "trained")
                    if event.key not in self.catalog.embeddings:
                        emb = await asyncio.to_thread(
                            self.catalog.encoder.encode, [char.card.persona_text()]
                        )
                        self.catalog.embeddings[event.key] = emb[0]
            done = wait_for is None or self.catalog.characters[wait_for].status == "trained"
            if done or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.2)

    def _start_following(
        self, job_id: str, char: Character, on_progress: Callable[[str], Awaitable[None]] | None
    ) -> None:
        task = asyncio.ensure_future(self._follow(job_id, char, on_progress))
        self._followers[job_id] = task
        task.add_done_callback(lambda _: self._followers.pop(job_id, None))

    async def aclose(self, grace_s: float = 10.0) -> None:
        """Stop following jobs; those that have just ended get `grace_s` to report it."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):  # also if the queue cannot be reached
                ended = []
                for job_id, task in list(self._followers.items()):
                    status = await self.queue.job_status(job_id)
                    if status is not None and status.state in ("done", "failed"):
                        ended.append(task)
                if ended:
                    await asyncio.wait(ended)
        for task in list(self._followers.values()):
            await stop_task(task)
