"""Moderation: submitting and training characters, per scope, with limits.

Who may do what: a moderator manages the characters of the scope they act in (their
Discord server, or the terminal); the bot's owners also manage the shared cast. A
submitted card is fused at once, so it is playable; `train` queues an expansion job whose
status is mirrored into the database and posted as lines for the channel.

Every submission checks everything first (card, name, key, prompt size, limits), then
writes the database, publishes the event and changes the catalog, in that order: it fully
happens or not at all. Character state changes only through the catalog's methods; this
module keeps the database rows in step with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from neeko import db
from neeko.cards import CharacterCard, card_from_fields, parse_card
from neeko.catalog import Pending
from neeko.characters import SHARED, CatalogError, Character, system_prompt
from neeko.chat_types import Answer, Author, refusal
from neeko.dialogues import job_dialogues
from neeko.errors import NeekoError
from neeko.events import EventBus
from neeko.follower import CatalogFollower
from neeko.jobs import JobQueue
from neeko.protocol import CatalogEvent, JobStatus, TrainJob
from neeko.queue import stop_task
from neeko.settings import ChatSettings

log = logging.getLogger(__name__)
MODERATORS_ONLY = "Only moderators (Manage Server, or the moderator role) may do that."
OWNERS_ONLY = "Only the bot's owners may change the shared cast."
MIN_HISTORY_TOKENS = 256
"""Least room a character's system prompt must leave for the conversation."""
Announce = Callable[[str, str], Awaitable[None]]
"""Posts a line in a channel, by id."""
Progress = Callable[[str], Awaitable[None]]


class Moderation:
    """Submitting, training and inspecting characters; the database's side of the catalog."""

    def __init__(
        self,
        settings: ChatSettings,
        sessions: async_sessionmaker[AsyncSession],
        jobs: JobQueue,
        events: EventBus,
        follower: CatalogFollower,
        count_tokens: Callable[[str], int],
        context_tokens: int,
        start_trainer: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Moderation over the database, the job queue and the process's catalog follower.

        `start_trainer` is awaited before a job is queued (an embedded trainer starts then).
        """
        self.settings, self.sessions, self.jobs, self.events = settings, sessions, jobs, events
        self.follower, self.catalog = follower, follower.catalog
        self.count_tokens, self.context_tokens = count_tokens, context_tokens
        self._start_trainer = start_trainer
        self._followers: dict[str, asyncio.Task] = {}
        """Job id -> the task that mirrors the job's status and posts its progress."""
        self._writing = asyncio.Lock()
        self.announce: Announce | None = None
        """Set by a front end to hear from jobs that outlived the request that started them."""
        follower.listen(self._mirror)

    # -- commands ----------------------------------------------------------------------

    async def submit(
        self,
        author: Author,
        *,
        card: bytes | None = None,
        filename: str = "",
        name: str | None = None,
        profile: str | None = None,
        greeting: str = "",
        shared: bool = False,
    ) -> Answer:
        """Add a character to the author's scope (or, for owners, the shared cast)."""
        if refused := self._may_manage(author, SHARED if shared else author.scope):
            return refused
        scope = SHARED if shared else author.scope
        try:
            if card is not None:
                parsed = parse_card(card, filename or "card")
            elif name and profile:
                parsed = card_from_fields(name, profile, greeting=greeting)
            else:
                return refusal("Attach a card, or give a name and a profile.")
            self._check_prompt(parsed)
            self._check_room(scope)
            pending = await asyncio.to_thread(
                self.catalog.prepare, parsed, scope, "fused", submitted_by=author.id
            )
            char = await self._add(pending)
        except NeekoError as exc:
            return refusal(f"Character not added: {exc}")
        mix = ", ".join(f"{self.catalog.require(k).name} {w:.0%}" for k, w in char.mix.items())
        where = "every server" if scope == SHARED else "here"
        return Answer(
            True,
            f"**{char.name}** is playable now in {where} (fused from {mix or 'the base model'}). "
            f"`/character train {char.name}` gives it a block of its own.",
            private=True,
        )

    async def train(
        self,
        author: Author,
        name: str,
        channel: str,
        dialogues: bytes | None = None,
        on_progress: Progress | None = None,
    ) -> Answer:
        """Queue an expansion job for a fused character; progress goes to `on_progress`."""
        char = self.catalog.find(name, author.scope)
        if char is None:
            return refusal(f"No character is called {name!r}.")
        if refused := self._may_manage(author, char.scope):
            return refused
        if char.status != "fused":
            return refusal(f"{char.name} is already {char.status}.")
        try:
            await self._check_jobs(char.scope)
            data = job_dialogues(char.card, dialogues, count_tokens=self.count_tokens)
        except NeekoError as exc:
            return refusal(str(exc))
        job = TrainJob(
            id=f"train-{uuid.uuid4().hex[:16]}",
            key=char.key,
            scope=char.scope,
            card=char.card.to_dict(),
            dialogues=data,
        )
        if self._start_trainer is not None:
            await self._start_trainer()
        async with self._writing:
            if self.catalog.require(char.key).status != "fused":  # trained meanwhile
                return refusal(f"{char.name} is already {self.catalog.require(char.key).status}.")
            status = await self._queue_job(job, char, author, channel)
        self._start_following(job.id, char, on_progress)
        return Answer(
            True,
            f"Training {char.name} on {len(data)} dialogues (job {status.id}); "
            "progress will be posted here.",
            private=True,
        )

    async def status(self, author: Author, name: str) -> Answer:
        """A character's status, with its latest training job."""
        char = self.catalog.find(name, author.scope)
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

    # -- checks ------------------------------------------------------------------------

    def _may_manage(self, author: Author, scope: str) -> Answer | None:
        """A refusal unless `author` may change the characters of `scope`."""
        if scope == SHARED and not author.owner:
            return refusal(OWNERS_ONLY if author.moderator else MODERATORS_ONLY)
        if scope != SHARED and not (author.moderator and scope == author.scope):
            return refusal(MODERATORS_ONLY)
        return None

    def _check_prompt(self, card: CharacterCard) -> None:
        """Refuse a card whose system prompt leaves too little room for the conversation."""
        used = self.count_tokens(system_prompt(card)) + self.settings.reply_tokens
        room = self.context_tokens - used
        if room < MIN_HISTORY_TOKENS:
            raise CatalogError(
                f"its system prompt and a reply take {used} of the model's "
                f"{self.context_tokens} tokens, leaving {max(room, 0)} for the conversation "
                f"(at least {MIN_HISTORY_TOKENS} are needed); shorten the profile"
            )

    def _check_room(self, scope: str) -> None:
        limit = self.settings.max_characters_per_scope
        if scope == SHARED:
            return
        count = sum(c.scope == scope for c in self.catalog.visible(scope))
        if count >= limit:
            raise CatalogError(
                f"this server has {count} characters, the most it may have ({limit})"
            )

    async def _check_jobs(self, scope: str) -> None:
        limit = self.settings.max_jobs_per_scope
        async with self.sessions() as s:
            running = await s.scalar(
                select(func.count())
                .select_from(db.TrainingJob)
                .join(db.CharacterRow, db.CharacterRow.key == db.TrainingJob.character_key)
                .where(
                    db.CharacterRow.scope == scope,
                    db.TrainingJob.state.in_(("queued", "running")),
                )
            )
        if running >= limit:
            raise CatalogError(
                f"{running} training jobs of this server are queued or running, the most it "
                f"may have ({limit}); wait for one to finish"
            )

    # -- writes, in step with the catalog ----------------------------------------------

    async def _add(self, pending: Pending) -> Character:
        """Database row, then the event, then the catalog: all of it or nothing."""
        char = pending.character
        event = CatalogEvent(
            kind="added", key=char.key, scope=char.scope, card=char.card.to_dict(), mix=char.mix
        )
        async with self._writing, self.sessions() as s:
            self.catalog.recheck(pending)  # another submission may have taken a name since
            s.add(_row(char))
            try:
                await s.flush()
            except IntegrityError:
                raise CatalogError(f"the key {char.key!r} is taken") from None
            await self.events.publish(event)
            try:
                await s.commit()
            except Exception:
                await self._publish_quietly(event.model_copy(update={"kind": "removed"}))
                raise
            return self.catalog.commit(pending)

    async def _queue_job(
        self, job: TrainJob, char: Character, author: Author, channel: str
    ) -> JobStatus:
        async with self.sessions() as s:
            row = await s.get(db.CharacterRow, char.key)
            if row is None:  # a shared character of a store: give it a row to follow
                s.add(row := _row(char))
            row.status = "training"
            s.add(
                db.TrainingJob(
                    id=job.id, character_key=char.key, requested_by=author.id, channel_id=channel
                )
            )
            await s.flush()
            status = await self.jobs.submit(job, char.name)
            await s.commit()
        self.catalog.mark_training(char.key)
        await self._publish_quietly(CatalogEvent(kind="training", key=char.key, scope=char.scope))
        return status

    async def _publish_quietly(self, event: CatalogEvent) -> None:
        try:
            await self.events.publish(event)
        except Exception as exc:  # other processes learn it from the next event or a restart
            log.warning("could not publish %s of %s: %s", event.kind, event.key, exc)

    async def _mirror(self, event: CatalogEvent) -> None:
        """Follower listener: keep a submitted character's row at the catalog's status."""
        char = self.catalog.get(event.key)
        if char is None:
            return
        async with self.sessions() as s:
            row = await s.get(db.CharacterRow, char.key)
            if row is not None and (row.status, row.mix) != (char.status, dict(char.mix)):
                row.status, row.mix = char.status, dict(char.mix)
                await s.commit()

    async def _set_failed(self, char: Character) -> None:
        with contextlib.suppress(CatalogError):
            self.catalog.mark_failed(char.key)
        event = CatalogEvent(kind="failed", key=char.key, scope=char.scope)
        await self._mirror(event)
        await self._publish_quietly(event)

    # -- jobs --------------------------------------------------------------------------

    async def _follow(self, job_id: str, char: Character, on_progress: Progress | None) -> None:
        """Mirror a job's status into the database and post progress every 25 %."""
        posted = -1
        async for status in self.jobs.watch(job_id):
            await self._record_job(status)
            step = int(status.progress * 4)
            line = None
            if status.state == "running" and step > posted:
                posted = step
                loss = f", loss {status.loss:.3f}" if status.loss is not None else ""
                line = f"Training {char.name}: {status.progress:.0%}{loss}"
            elif status.state == "done":
                await self.follower.wait_for(char.key, "trained")
                line = f"{char.name} has a block of its own now."
            elif status.state == "failed":
                await self._set_failed(char)
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

    async def load_submitted(self) -> None:
        """Put the characters moderators submitted (in the database) into the catalog.

        A row the catalog refuses (a name now taken, a malformed card) is logged and left
        out; it never stops the start.
        """
        async with self.sessions() as s:
            rows = list(
                await s.scalars(select(db.CharacterRow).order_by(db.CharacterRow.created_at))
            )
        for row in rows:
            if row.key in self.catalog.characters:
                continue
            try:
                card = CharacterCard.from_dict(row.card)
                status = "trained" if row.status == "trained" else "fused"
                self.catalog.add(
                    card, row.scope, status, key=row.key, mix=row.mix, submitted_by=row.submitted_by
                )
                if row.status == "training":
                    self.catalog.mark_training(row.key)
            except NeekoError as exc:
                log.error("submitted character %s left out: %s", row.key, exc)
        await self.follower.poll()
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
            char = self.catalog.get(job.character_key)
            if char is None:
                continue
            if await self.jobs.status(job.id) is not None:
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
            if not done:
                await self._set_failed(char)

    def _announcer(self, channel: str | None) -> Progress | None:
        if channel is None:
            return None

        async def post(line: str) -> None:
            if self.announce is not None:
                await self.announce(channel, line)

        return post

    def _start_following(self, job_id: str, char: Character, on_progress: Progress | None) -> None:
        task = asyncio.ensure_future(self._follow(job_id, char, on_progress))
        self._followers[job_id] = task
        task.add_done_callback(lambda _: self._followers.pop(job_id, None))

    async def aclose(self, grace_s: float = 10.0) -> None:
        """Stop following jobs; those that have just ended get `grace_s` to report it."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):  # also if the queue cannot be reached
                ended = []
                for job_id, task in list(self._followers.items()):
                    status = await self.jobs.status(job_id)
                    if status is not None and status.state in ("done", "failed"):
                        ended.append(task)
                if ended:
                    await asyncio.wait(ended)
        for task in list(self._followers.values()):
            await stop_task(task)


def _row(char: Character) -> db.CharacterRow:
    return db.CharacterRow(
        key=char.key,
        scope=char.scope,
        name=char.name,
        card=char.card.to_dict(),
        status=char.status,
        mix=dict(char.mix),
        submitted_by=char.submitted_by,
    )
