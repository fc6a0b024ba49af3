"""The chat service: everything a front end does, free of Discord.

Per channel it keeps who speaks and the history (SQLite through SQLAlchemy), builds the
prompt window from the latest turns that fit a token budget, and sends turns through the
queue to the workers. One generation runs per channel at a time; later messages wait their
turn in order. Moderators submit characters (playable at once by fusion) and start their
expansion jobs; progress comes back as lines for the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from neeko import db
from neeko.cards import CharacterCard, card_from_fields, parse_card
from neeko.characters import Catalog, Character, system_prompt
from neeko.chat_types import Answer, Author, CharacterInfo, Speaker, TextCallback
from neeko.dialogues import DataError, job_dialogues
from neeko.errors import NeekoError
from neeko.protocol import JobStatus, Message, Reply, Sampling, TrainJob, Turn
from neeko.queue import Chunk, QueueError, TurnQueue
from neeko.settings import ChatSettings

log = logging.getLogger(__name__)
MULTI_USER = "Several people may talk to you here; each of their messages starts with their name."
MAX_PERSONA_CHARS = 200
_MENTION = re.compile(r"@(everyone|here)|<(@[!&]?|#)(\d+)>")
_TITLES = ("Dr", "Mr", "Mrs", "Ms", "St", "Jr", "Sr", "Prof", "Capt", "Col", "Gen", "Lt")
_SENTENCE_END = re.compile("".join(rf"(?<!\b{t}\.)" for t in _TITLES) + r"(?<=[.!?])\s")
"""A sentence break: after . ! or ?, but not after a title such as "Dr."."""


def neutralise_mentions(text: str) -> str:
    """Break @everyone, @here and <@id> / <@&id> / <#id> so no client renders a ping."""
    return _MENTION.sub(
        lambda m: m.group(0).replace("@", "@\u200b").replace("<#", "<#\u200b"), text
    )


@dataclass
class _Voice:
    """Who speaks in a channel, resolved: the turn fields and the system prompt."""

    speaker: Speaker
    system: str
    character: str | None
    mix: dict[str, float]
    greeting: str = ""


class ChatService:
    """Channels, characters and turns; front ends call it and render its `Answer`s."""

    def __init__(
        self,
        settings: ChatSettings,
        sessions: async_sessionmaker[AsyncSession],
        queue: TurnQueue,
        catalog: Catalog,
        count_tokens: Callable[[str], int],
        start_trainer: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Wire the service; `open_service` builds everything from settings."""
        self.settings, self.sessions, self.queue = settings, sessions, queue
        self.catalog, self.count_tokens = catalog, count_tokens
        self._start_trainer = start_trainer
        self._locks: dict[str, asyncio.Lock] = {}
        self._last_message: dict[str, float] = {}
        self._cut_notified: set[tuple[str, int]] = set()
        self._followers: dict[str, asyncio.Task] = {}
        """Job id -> the task that mirrors the job's status and posts its progress."""
        self._last_event = "0"
        self.announce: Callable[[str, str], Awaitable[None]] | None = None
        """Posts a line in a channel (by id): a front end sets it to hear from training jobs
        that outlived the request that started them (a restart)."""

    # -- messages ----------------------------------------------------------------------

    async def handle_message(
        self,
        channel: str,
        author: Author,
        content: str,
        message_id: str,
        on_text: TextCallback | None = None,
    ) -> Answer:
        """Answer a channel message in the voice of the channel's character."""
        content = content.strip()
        limit = self.settings.max_message_chars
        if not content:
            return _error("Say something first.")
        if len(content) > limit:
            return _error(f"Your message has {len(content)} characters; the limit is {limit}.")
        now = time.monotonic()
        last = self._last_message.get(author.id)
        if last is not None and now - last < self.settings.cooldown_s:
            wait = self.settings.cooldown_s - (now - last)
            return Answer(False, f"Slow down: wait {wait:.1f} s.", private=True, kind="busy")
        self._last_message[author.id] = now
        async with self._lock(channel):
            return await self._answer(channel, author, content, message_id, on_text)

    async def _answer(
        self,
        channel: str,
        author: Author,
        content: str,
        message_id: str,
        on_text: TextCallback | None,
    ) -> Answer:
        await self._sync_catalog()
        async with self.sessions() as s:
            state = await self._state(s, channel)
            voice = self._voice(state)
            reply_id = f"{message_id}:reply"
            known = await s.scalar(
                select(db.MessageRow).where(db.MessageRow.platform_message_id == reply_id)
            )
            if known is not None:  # a redelivered platform message: answered already
                return Answer(True, known.content, voice.speaker, kind="reply")
            history = await self._history(s, channel, state.session)
            if not any(m.platform_message_id == message_id for m in history):
                row = db.MessageRow(
                    channel_id=channel,
                    session=state.session,
                    role="user",
                    author_id=author.id,
                    author_name=author.name,
                    content=content,
                    platform_message_id=message_id,
                )
                s.add(row)
                await s.commit()
                history.append(row)
            session = state.session
        messages, cut = self._window(voice, history)
        notices = []
        if cut and (channel, session) not in self._cut_notified:
            self._cut_notified.add((channel, session))
            notices.append(
                f"This conversation is longer than {voice.speaker.name} can keep in mind; "
                "the oldest messages are left out from now on."
            )
        turn = Turn(
            id=_turn_id(message_id),
            channel=channel,
            character=voice.character,
            mix=voice.mix,
            messages=tuple(messages),
            sampling=Sampling(
                max_new_tokens=self.settings.reply_tokens,
                temperature=self.settings.temperature,
                top_p=self.settings.top_p,
            ),
        )
        try:
            reply = await self._generate(turn, on_text)
        except QueueError as exc:
            return Answer(False, f"No reply: {exc}", voice.speaker, notices, kind="error")
        text = neutralise_mentions(reply.text.strip()) or "…"
        async with self.sessions() as s:
            s.add(
                db.MessageRow(
                    channel_id=channel,
                    session=session,
                    role="character",
                    author_id=f"character:{voice.character or 'persona'}",
                    author_name=voice.speaker.name,
                    content=text,
                    platform_message_id=reply_id,
                )
            )
            await s.commit()
        return Answer(True, text, voice.speaker, notices, kind="reply")

    async def _generate(self, turn: Turn, on_text: TextCallback | None) -> Reply:
        text = ""
        async for item in self.queue.submit(turn, self.settings.turn_timeout_s):
            if isinstance(item, Chunk):
                text = item.text if item.reset else text + item.text
                if on_text is not None:
                    await on_text(neutralise_mentions(text))
            else:
                return item
        raise QueueError("the reply stream ended early")  # pragma: no cover

    def _window(self, voice: _Voice, history: list[db.MessageRow]) -> tuple[list[Message], bool]:
        """System prompt plus the newest history that fits the token budget.

        Turns alternate user / assistant, as strict chat templates demand: consecutive user
        messages (several people talking) are merged, and an opening line of the character
        (its greeting) goes into the system prompt.
        """
        budget = self.settings.history_tokens
        picked: list[db.MessageRow] = []
        for row in reversed(history):
            cost = self.count_tokens(row.content) + 8
            if picked and cost > budget:
                break
            budget -= cost
            picked.append(row)
        cut = len(picked) < len(history)
        turns: list[tuple[str, str]] = []
        for row in reversed(picked):
            role = "user" if row.role == "user" else "assistant"
            text = f"{row.author_name}: {row.content}" if role == "user" else row.content
            if turns and turns[-1][0] == role:
                turns[-1] = (role, f"{turns[-1][1]}\n{text}")
            else:
                turns.append((role, text))
        system = f"{voice.system}\n{MULTI_USER}"
        if turns and turns[0][0] == "assistant":
            system += f"\nYou opened the conversation with: {turns.pop(0)[1]}"
        return [Message(role="system", content=system)] + [
            Message(role=r, content=t) for r, t in turns
        ], cut

    # -- commands ----------------------------------------------------------------------

    async def become(self, channel: str, author: Author, text: str) -> Answer:
        """Switch the channel's character: a name or alias, else a fused free-text persona."""
        text = " ".join(text.split())
        if not text:
            return _error("Name a character, or describe one.")
        if len(text) > MAX_PERSONA_CHARS:
            return _error(f"A persona description is at most {MAX_PERSONA_CHARS} characters.")
        await self._sync_catalog()
        found = self.catalog.resolve(text)
        if found.kind == "suggestions":
            names = ", ".join(found.suggestions)
            return _error(
                f"No character is called {text!r}. Did you mean: {names}?",
                suggestions=found.suggestions,
            )
        async with self._lock(channel), self.sessions() as s:
            state = await self._state(s, channel)
            state.session += 1
            if found.kind == "character" and found.character is not None:
                state.character_key, state.persona, state.mix = found.character.key, None, {}
                voice = self._voice(state)
                message = f"**{voice.speaker.name}** now speaks in this channel."
            else:
                if not self.catalog.trained():
                    return Answer(False, "No trained character to fuse from.", kind="error")
                query = await asyncio.to_thread(self.catalog.encoder.encode, [text])
                state.character_key, state.persona = None, text
                state.mix = self.catalog.fusion_weights(query[0])
                voice = self._voice(state)
                mix = ", ".join(
                    f"{self.catalog.characters[k].name} {w:.0%}" for k, w in state.mix.items()
                )
                message = f"A fused persona now speaks: **{voice.speaker.name}** ({mix})."
            if voice.greeting:  # the opening line of the new conversation
                s.add(
                    db.MessageRow(
                        channel_id=channel,
                        session=state.session,
                        role="character",
                        author_id=f"character:{voice.character or 'persona'}",
                        author_name=voice.speaker.name,
                        content=voice.greeting,
                    )
                )
            await s.commit()
        return Answer(True, message, voice.speaker, greeting=voice.greeting)

    async def characters(self) -> list[CharacterInfo]:
        """Every character of the catalog (starter cast and submitted ones)."""
        await self._sync_catalog()
        return [_info(c) for c in self.catalog.characters.values()]

    def autocomplete(self, prefix: str, limit: int = 25) -> list[str]:
        """Character names matching `prefix` (by name or alias start, then anywhere)."""
        want = prefix.casefold().strip()
        starts, inside = [], []
        for c in self.catalog.characters.values():
            names = [n.casefold() for n in (c.name, *c.card.aliases)]
            if any(n.startswith(want) for n in names):
                starts.append(c.name)
            elif any(want in n for n in names):
                inside.append(c.name)
        return (sorted(starts) + sorted(inside))[:limit]

    async def reset(self, channel: str, author: Author) -> Answer:
        """Start a new conversation in the channel (earlier history leaves the prompt)."""
        async with self._lock(channel), self.sessions() as s:
            state = await self._state(s, channel)
            state.session += 1
            await s.commit()
            voice = self._voice(state)
        return Answer(
            True, f"Conversation reset: {voice.speaker.name} starts afresh.", voice.speaker
        )

    async def speaker(self, channel: str) -> Speaker:
        """Who speaks in `channel` now."""
        async with self.sessions() as s:
            return self._voice(await self._state(s, channel)).speaker

    # -- moderation --------------------------------------------------------------------

    async def submit_character(
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
            return _refused()
        try:
            if card is not None:
                parsed = parse_card(card, filename or "card")
            elif name and profile:
                parsed = card_from_fields(name, profile, greeting=greeting)
            else:
                return _error("Attach a card, or give a name and a profile.")
            await self._sync_catalog()
            char = await asyncio.to_thread(self.catalog.fuse, parsed)
        except NeekoError as exc:
            return _error(f"Character not added: {exc}")
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

    async def train_character(
        self,
        author: Author,
        name: str,
        channel: str,
        dialogues: bytes | None = None,
        on_progress: Callable[[str], Awaitable[None]] | None = None,
    ) -> Answer:
        """Queue an expansion job for a submitted character; progress goes to `on_progress`."""
        if not author.moderator:
            return _refused()
        await self._sync_catalog()
        char = self.catalog.find(name)
        if char is None:
            return _error(f"No character is called {name!r}.")
        if char.status != "fused":
            return _error(f"{char.name} is already {char.status}.")
        try:
            data = job_dialogues(char.card, dialogues)
        except DataError as exc:
            return _error(str(exc))
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

    async def character_status(self, name: str) -> Answer:
        """A character's status, with its latest training job."""
        await self._sync_catalog()
        char = self.catalog.find(name)
        if char is None:
            return _error(f"No character is called {name!r}.")
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
                await self._sync_catalog(wait_for=char.key)
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

    # -- state -------------------------------------------------------------------------

    def _lock(self, channel: str) -> asyncio.Lock:
        return self._locks.setdefault(channel, asyncio.Lock())

    async def _state(self, s: AsyncSession, channel: str) -> db.ChannelState:
        state = await s.get(db.ChannelState, channel)
        if state is None:
            first = next(iter(self.catalog.trained()), None)
            state = db.ChannelState(
                channel_id=channel,
                character_key=first.key if first else None,
                persona=None if first else "a helpful assistant",
                mix={},
                session=0,
            )
            s.add(state)
            await s.flush()
        return state

    async def _history(self, s: AsyncSession, channel: str, session: int) -> list[db.MessageRow]:
        rows = await s.scalars(
            select(db.MessageRow)
            .where(db.MessageRow.channel_id == channel, db.MessageRow.session == session)
            .order_by(db.MessageRow.id)
        )
        return list(rows)

    def _voice(self, state: db.ChannelState) -> _Voice:
        char = self.catalog.characters.get(state.character_key or "")
        if char is not None:
            trained = char.status == "trained"
            return _Voice(
                Speaker(char.name, char.card.avatar_url),
                system_prompt(char.card),
                char.key if trained else None,
                {} if trained else dict(char.fused_from),
                char.card.greeting,
            )
        persona = state.persona or "a helpful assistant"
        name = neutralise_mentions(persona)[:80]
        return _Voice(
            Speaker(name), f"You are {persona}. Stay in character.", None, dict(state.mix)
        )

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
        await self._sync_catalog()
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

    async def _sync_catalog(self, wait_for: str | None = None) -> None:
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
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _turn_id(message_id: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_.:-]", "_", message_id)[:100]
    return f"msg-{clean}"


def _error(text: str, suggestions: list[str] | None = None) -> Answer:
    """A private refusal: nothing changed, `text` says why."""
    return Answer(False, text, suggestions=suggestions or [], private=True, kind="error")


def _refused() -> Answer:
    return _error("Only moderators (Manage Server, or the moderator role) may do that.")


def _info(c: Character) -> CharacterInfo:
    first = _SENTENCE_END.split(c.card.profile.strip(), maxsplit=1)[0]
    return CharacterInfo(
        c.key, c.name, tuple(c.card.aliases), c.status, first[:200], c.card.avatar_url
    )
