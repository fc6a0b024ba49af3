"""The chat service: everything a front end does, free of Discord.

Per channel it keeps who speaks and the history (SQLite through SQLAlchemy), builds the
prompt window from the latest turns that fit a token budget, and sends turns through the
queue to the workers. One generation runs per channel at a time; later messages wait their
turn in order. Each call names the author's scope (their server, or the terminal): a channel
speaks only as a character its scope sees. What moderators do (submit and train characters)
is `neeko.moderation`, held beside this service by the front ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from neeko import db
from neeko.catalog import Catalog
from neeko.characters import Character, fold, system_prompt
from neeko.chat_types import Answer, Author, CharacterInfo, Speaker, TextCallback, refusal
from neeko.lore import Lorebook, LoreEntry
from neeko.protocol import Message, Reply, Sampling, Turn
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


SceneMode = Literal["all", "addressed", "auto"]
SCENE_MODES: tuple[SceneMode, ...] = ("all", "addressed", "auto")
MAX_ALTERNATIVES = 10
"""Most versions one reply keeps (regenerating past it is refused)."""
MAX_RECALL_ROWS = 5000
"""Recall looks at most this many lines before the window (the newest of them)."""
MAX_EMBED_PER_TURN = 256
"""Most lines embedded for one turn (a long backlog is embedded over several turns)."""
MIN_SIMILARITY = 0.25
"""A line less like the newest ones than this (cosine) is never recalled."""
RECENT_LINES = 3
"""In `auto` mode, a character's newest lines that join its profile in the match."""


@dataclass(frozen=True)
class Member:
    """One character of a channel's scene: a catalog key, or a fused free-text persona."""

    key: str | None = None
    persona: str | None = None
    mix: dict[str, float] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """The author id of its lines in the history."""
        if self.key is not None:
            return f"character:{self.key}"
        digest = hashlib.sha256((self.persona or "").encode()).hexdigest()[:16]
        return f"persona:{digest}"

    def to_json(self) -> dict[str, Any]:
        """As stored in `ChannelState.scene`."""
        if self.key is not None:
            return {"key": self.key}
        return {"persona": self.persona, "mix": dict(self.mix)}

    @classmethod
    def from_json(cls, data: object) -> Member | None:
        """A stored member, or None for an entry that is not one (it is skipped)."""
        if not isinstance(data, dict):
            return None
        if isinstance(key := data.get("key"), str):
            return cls(key=key)
        persona, mix = data.get("persona"), data.get("mix") or {}
        if not isinstance(persona, str) or not persona.strip() or not isinstance(mix, dict):
            return None
        weights = {k: float(w) for k, w in mix.items() if isinstance(w, int | float)}
        return cls(persona=persona, mix=weights)


@dataclass
class _Voice:
    """Who speaks in a channel, resolved: the turn fields and the system prompt."""

    speaker: Speaker
    system: str
    character: str | None
    mix: dict[str, float]
    greeting: str = ""
    member: Member = field(default_factory=Member)
    names: tuple[str, ...] = ()
    """Name and aliases, folded (`neeko.characters.fold`): how a message addresses it."""
    profile: str = ""
    """What it is, for `auto` mode's match."""


class ChatService:
    """Channels, characters and turns; front ends call it and render its `Answer`s."""

    def __init__(
        self,
        settings: ChatSettings,
        sessions: async_sessionmaker[AsyncSession],
        turns: TurnQueue,
        catalog: Catalog,
        count_tokens: Callable[[str], int],
        context_tokens: int = 2048,
    ) -> None:
        """Wire the service; `open_services` builds everything from settings.

        `context_tokens` is the model's context: the system prompt, the history and the
        reply must fit in it together.
        """
        self.settings, self.sessions, self.turns = settings, sessions, turns
        self.catalog, self.count_tokens = catalog, count_tokens
        self.context_tokens = context_tokens
        self._locks: dict[str, asyncio.Lock] = {}
        self._last_message: dict[str, float] = {}
        self._cut_notified: set[tuple[str, int]] = set()
        self._pending: dict[str, int] = {}
        """Channel -> messages being answered or waiting their turn."""

    # -- messages ----------------------------------------------------------------------

    async def handle_message(
        self,
        channel: str,
        author: Author,
        content: str,
        message_id: str,
        on_text: TextCallback | None = None,
        reply_to: str | None = None,
    ) -> Answer:
        """Answer a channel message in the voice of the scene's characters.

        Who answers follows the scene's mode (every character, the ones addressed, or one
        picked); the first answer is returned, the others in its `more`, in scene order.
        `reply_to` is the platform id of the message this one replies to: a reply to a
        character's line addresses that character. `on_text` streams a lone reply.
        """
        content = content.strip()
        limit = self.settings.max_message_chars
        if not content:
            return refusal("Say something first.")
        if len(content) > limit:
            return refusal(f"Your message has {len(content)} characters; the limit is {limit}.")
        now = time.monotonic()
        last = self._last_message.get(author.id)
        if last is not None and now - last < self.settings.cooldown_s:
            wait = self.settings.cooldown_s - (now - last)
            return Answer(False, f"Slow down: wait {wait:.1f} s.", private=True, kind="busy")
        pending = self._pending.get(channel, 0)
        if pending >= self.settings.max_pending:
            return Answer(
                False,
                f"{pending} messages here are waiting for an answer; try again in a moment.",
                private=True,
                kind="busy",
            )
        self._last_message[author.id] = now
        self._pending[channel] = pending + 1
        try:
            async with self._lock(channel):
                return await self._answer(channel, author, content, message_id, on_text, reply_to)
        finally:
            self._pending[channel] -= 1

    async def _answer(
        self,
        channel: str,
        author: Author,
        content: str,
        message_id: str,
        on_text: TextCallback | None,
        reply_to: str | None,
    ) -> Answer:
        async with self.sessions() as s:
            state = await self._state(s, channel, author.scope)
            voices = self._voices(state, author.scope)
            ids = {_reply_id(message_id, v.member): v for v in voices}
            known = list(
                await s.scalars(
                    select(db.MessageRow)
                    .where(db.MessageRow.platform_message_id.in_(list(ids)))
                    .order_by(db.MessageRow.id)
                )
            )
            if known:  # a redelivered platform message: answered already
                return _joined(
                    [
                        Answer(
                            True,
                            r.content,
                            ids[r.platform_message_id or ""].speaker,
                            kind="reply",
                            ref=r.id,
                        )
                        for r in known
                    ]
                )
            history = await self._history(s, channel, state.session)
            replied = None
            if reply_to:
                replied = await s.scalar(
                    select(db.MessageRow).where(
                        db.MessageRow.channel_id == channel, db.MessageRow.posted_id == reply_to
                    )
                )
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
            session, mode = state.session, state.scene_mode
        responders = await self._responders(voices, mode, content, replied, history)
        notices, turns, recalled = [], [], []
        for voice in responders:
            messages, cut, used = await self._prompt(voice, voices, history)
            recalled.append(used)
            if cut and (channel, session) not in self._cut_notified:
                self._cut_notified.add((channel, session))
                notices.append(
                    f"This conversation is longer than {voice.speaker.name} can keep in mind; "
                    "the oldest messages are left out from now on."
                )
            turn_id = _turn_id(message_id, voice.member)
            turns.append(self._turn(turn_id, channel, voice, voices, messages))
        try:
            streams = await self.turns.submit_group(turns, self.settings.turn_timeout_s)
        except QueueError as exc:
            speaker = responders[0].speaker
            return Answer(False, f"No reply: {exc}", speaker, notices, kind="error")
        lone = on_text if len(turns) == 1 else None
        results = await asyncio.gather(
            *(
                self._generate(st, v.speaker, lone)
                for st, v in zip(streams, responders, strict=True)
            ),
            return_exceptions=True,
        )
        answers = []
        async with self.sessions() as s:
            for voice, result in zip(responders, results, strict=True):
                if isinstance(result, QueueError):
                    answers.append(
                        Answer(False, f"No reply: {result}", voice.speaker, kind="error")
                    )
                    continue
                if isinstance(result, BaseException):
                    raise result
                text = _own_text(result.text, voice.speaker.name)
                row = db.MessageRow(
                    channel_id=channel,
                    session=session,
                    role="character",
                    author_id=voice.member.id,
                    author_name=voice.speaker.name,
                    content=text,
                    platform_message_id=_reply_id(message_id, voice.member),
                )
                s.add(row)
                await s.flush()
                answers.append(Answer(True, text, voice.speaker, kind="reply", ref=row.id))
            if (state := await s.get(db.ChannelState, channel)) is not None:
                state.recalled = recalled
            await s.commit()
        answers[0].notices = notices
        return _joined(answers)

    def _turn(
        self,
        turn_id: str,
        channel: str,
        voice: _Voice,
        voices: list[_Voice],
        messages: list[Message],
        seed: int | None = None,
    ) -> Turn:
        """`voice`'s turn; its reply stops where another of `voices` would start a line."""
        others = [v.speaker.name for v in voices if v is not voice]
        return Turn(
            id=turn_id,
            channel=channel,
            character=voice.character,
            mix=voice.mix,
            messages=tuple(messages),
            sampling=Sampling(
                max_new_tokens=self.settings.reply_tokens,
                temperature=self.settings.temperature,
                top_p=self.settings.top_p,
                seed=seed,
                stop=tuple(f"\n{name}:" for name in others),
            ),
        )

    async def _generate(
        self, stream: AsyncIterator[Chunk | Reply], speaker: Speaker, on_text: TextCallback | None
    ) -> Reply:
        text = ""
        async for item in stream:
            if isinstance(item, Chunk):
                text = item.text if item.reset else text + item.text
                if on_text is not None:
                    await on_text(speaker, neutralise_mentions(text.lstrip()))  # as the final
            else:
                return item
        raise QueueError("the reply stream ended early")  # pragma: no cover

    # -- swipes ------------------------------------------------------------------------

    async def regenerate(
        self,
        channel: str,
        author: Author,
        ref: int | None = None,
        on_text: TextCallback | None = None,
    ) -> Answer:
        """Sample a new version of one of the channel's latest replies, and show it.

        `ref` is the reply (`Answer.ref`); None: the newest one. Its prompt is the one it
        was answered with. Only people who wrote in the conversation may; the answer's
        `alternative` says which version of how many is shown.
        """
        async with self._lock(channel):
            async with self.sessions() as s:
                state = await self._state(s, channel, author.scope)
                row = await self._swipeable(s, state, author, ref)
                if isinstance(row, Answer):
                    return row
                if len(row.alternatives or [row.content]) >= MAX_ALTERNATIVES:
                    return refusal(f"A reply keeps at most {MAX_ALTERNATIVES} versions.")
                voices = self._voices(state, author.scope)
                voice = next((v for v in voices if v.member.id == row.author_id), None)
                if voice is None:
                    return refusal(f"{row.author_name} has left this scene.")
                history = await self._history(s, channel, state.session)
            prior = _before_round(history, row.id)
            messages, _, _ = await self._prompt(voice, voices, prior)
            n = len(row.alternatives or [row.content])
            turn_id = f"swipe-{row.id}-{n}-{uuid.uuid4().hex[:8]}"
            seed = secrets.randbelow(2**31)
            turn = self._turn(turn_id, channel, voice, voices, messages, seed)
            try:
                (stream,) = await self.turns.submit_group([turn], self.settings.turn_timeout_s)
                reply = await self._generate(stream, voice.speaker, on_text)
            except QueueError as exc:
                return Answer(False, f"No new version: {exc}", voice.speaker, kind="error")
            text = _own_text(reply.text, voice.speaker.name)
            async with self.sessions() as s:
                stored = await s.get(db.MessageRow, row.id)
                if stored is None:  # the channel was deleted meanwhile
                    return refusal("That reply is gone.")
                versions = [*(stored.alternatives or [stored.content]), text]
                stored.alternatives, stored.alternative, stored.content = versions, n, text
                await s.commit()
        return Answer(
            True, text, voice.speaker, kind="reply", ref=row.id, alternative=(n + 1, n + 1)
        )

    async def choose(self, channel: str, author: Author, ref: int | None, index: int) -> Answer:
        """Show version `index` (from 0) of one of the latest replies; it stays in history."""
        return await self._pick_version(channel, author, ref, lambda _: index)

    async def swipe(self, channel: str, author: Author, ref: int | None, step: int) -> Answer:
        """Show the version `step` away from the one shown (-1: previous, 1: next)."""
        return await self._pick_version(channel, author, ref, lambda shown: shown + step)

    async def _pick_version(
        self, channel: str, author: Author, ref: int | None, pick: Callable[[int], int]
    ) -> Answer:
        async with self._lock(channel), self.sessions() as s:
            state = await self._state(s, channel, author.scope)
            row = await self._swipeable(s, state, author, ref)
            if isinstance(row, Answer):
                return row
            versions = row.alternatives or [row.content]
            index = pick(row.alternative)
            if not 0 <= index < len(versions):
                return refusal(f"That reply has versions 1 to {len(versions)}.")
            row.alternative, row.content = index, versions[index]
            await s.commit()
        speaker = Speaker(row.author_name)
        for voice in self._voices(state, author.scope):
            if voice.member.id == row.author_id:
                speaker = voice.speaker
        return Answer(
            True,
            row.content,
            speaker,
            kind="reply",
            ref=row.id,
            alternative=(index + 1, len(versions)),
        )

    async def _swipeable(
        self, s: AsyncSession, state: db.ChannelState, author: Author, ref: int | None
    ) -> db.MessageRow | Answer:
        """The reply `ref` (None: the newest), if `author` may re-roll or browse it."""
        channel, session = state.channel_id, state.session
        history = await self._history(s, channel, session)
        if ref is None:
            row = next((r for r in reversed(history) if r.role == "character"), None)
        else:
            row = next((r for r in history if r.id == ref and r.role == "character"), None)
        if row is None:
            return refusal("Only the latest replies of this conversation can be re-rolled.")
        if any(r.role == "user" and r.id > row.id for r in history):
            return refusal("Only the latest replies can be re-rolled; this one has been answered.")
        if not any(r.role == "user" and r.author_id == author.id for r in history):
            return refusal("Only people who wrote in this conversation can re-roll its replies.")
        return row

    async def mark_posted(self, channel: str, ref: int, posted_id: str) -> None:
        """Record where a character's line (`Answer.ref`) was posted on the platform."""
        async with self.sessions() as s:
            row = await s.get(db.MessageRow, ref)
            if row is not None and row.channel_id == channel and row.role == "character":
                row.posted_id = posted_id[:64]
                await s.commit()

    async def _responders(
        self,
        voices: list[_Voice],
        mode: str,
        content: str,
        replied: db.MessageRow | None,
        history: list[db.MessageRow],
    ) -> list[_Voice]:
        """Who answers a message, in the order they answer (see `SceneMode`)."""
        if len(voices) == 1 or mode == "all":
            return voices
        named = addressed(voices, content)
        by_id = {v.member.id: v for v in voices}
        target = by_id.get(replied.author_id) if replied is not None else None
        if mode == "addressed":
            if named:
                return named
            if target is not None:
                return [target]
            last = next((r for r in reversed(history) if r.author_id in by_id), None)
            return [by_id[last.author_id]] if last is not None else voices[:1]
        if named:  # auto: one character
            return named[:1]
        if target is not None:
            return [target]
        spoken = [r for r in history if r.role == "character"]
        streak = _streak(spoken)
        candidates = voices
        if streak is not None and streak[1] >= self.settings.scene_max_streak:
            candidates = [v for v in voices if v.member.id != streak[0]] or voices
        texts = [content]
        for v in candidates:
            lines = [r.content for r in spoken if r.author_id == v.member.id][-RECENT_LINES:]
            texts.append("\n".join([v.profile, *lines]))
        emb = await asyncio.to_thread(self.catalog.encoder.encode, texts)
        scores = emb[1:] @ emb[0]
        return [candidates[int(scores.argmax())]]

    def _window(
        self, voice: _Voice, voices: list[_Voice], history: list[db.MessageRow], notes: str = ""
    ) -> tuple[list[Message], int]:
        """System prompt plus the newest history that fits the token budget.

        `notes` (lore, recalled lines) join the system prompt. Also returns the index in
        `history` of the first line the window holds.

        The budget is `history_tokens`, less what the system prompt and the reply leave of
        the model's context. Turns alternate user / assistant, as strict chat templates
        demand: `voice`'s own lines are its turns; everyone else's (people and the scene's
        other characters) are named lines of user turns, consecutive ones merged; an
        opening line of the character (its greeting) goes into the system prompt.
        """
        system = f"{voice.system}\n{MULTI_USER}"
        others = [v.speaker.name for v in voices if v is not voice]
        if others:
            system += f"\nAlso here: {', '.join(others)}."
        system += notes
        system_cost = self.count_tokens(system) + 32  # with the template
        room = self.context_tokens - system_cost - self.settings.reply_tokens
        budget = min(self.settings.history_tokens, room)
        picked: list[db.MessageRow] = []
        for row in reversed(history):
            cost = self.count_tokens(row.content) + 8
            if cost > budget:
                break
            budget -= cost
            picked.append(row)
        start = len(history) - len(picked)
        turns: list[tuple[str, str]] = []
        for row in reversed(picked):
            role = "assistant" if _is_own(row, voice) else "user"
            text = f"{row.author_name}: {row.content}" if role == "user" else row.content
            if turns and turns[-1][0] == role:
                turns[-1] = (role, f"{turns[-1][1]}\n{text}")
            else:
                turns.append((role, text))
        if turns and turns[0][0] == "assistant":
            system += f"\nYou opened the conversation with: {turns.pop(0)[1]}"
        return [Message(role="system", content=system)] + [
            Message(role=r, content=t) for r, t in turns
        ], start

    async def _prompt(
        self, voice: _Voice, voices: list[_Voice], history: list[db.MessageRow]
    ) -> tuple[list[Message], bool, dict[str, Any]]:
        """`voice`'s prompt, whether its window cut the history, and what else went in.

        The prompt holds the card's lore entries that fire, the window of the history, and
        the lines before the window that best match the newest ones (recall); what else
        went in is kept for /memory.
        """
        lore = self._lore(voice, history)
        notes = "".join(f"\n{entry.content}" for entry in lore)
        messages, start = self._window(voice, voices, history, notes)
        memory = await self._recall(history[:start], history[-2:])
        if memory:
            notes += "\nEarlier in this conversation:\n" + "\n".join(memory)
            messages, start = self._window(voice, voices, history, notes)
        used = {"speaker": voice.speaker.name, "memory": memory, "lore": [e.label() for e in lore]}
        return messages, start > 0, used

    def _lore(self, voice: _Voice, history: list[db.MessageRow]) -> list[LoreEntry]:
        """The entries of `voice`'s card's lorebook that the recent messages fire."""
        char = self.catalog.get(voice.member.key or "")
        if char is None or not self.settings.lore_tokens:
            return []
        book = Lorebook.from_card_data(char.card.extra.get("data", {}).get("character_book"))
        if book is None:
            return []
        recent = [r.content for r in history]
        return book.fire(recent, self.count_tokens, self.settings.lore_tokens)

    async def _recall(self, old: list[db.MessageRow], newest: list[db.MessageRow]) -> list[str]:
        """Lines of `old` (out of the window) most like the `newest`, in order.

        At most the memory budget. Each line is embedded once, and the vector stored.
        """
        budget = self.settings.memory_tokens
        if not budget or not old or not newest:
            return []
        old = old[-MAX_RECALL_ROWS:]
        missing = [r for r in old if r.embedding is None][-MAX_EMBED_PER_TURN:]
        query = "\n".join(_line(r) for r in newest)
        emb = await asyncio.to_thread(
            self.catalog.encoder.encode, [*(_line(r) for r in missing), query]
        )
        if missing:
            async with self.sessions() as s:
                for row, vector in zip(missing, emb[:-1], strict=True):
                    row.embedding = vector.numpy().astype("float32").tobytes()
                    await s.execute(
                        update(db.MessageRow)
                        .where(db.MessageRow.id == row.id)
                        .values(embedding=row.embedding)
                    )
                await s.commit()
        width = emb.shape[1] * 4
        rows = [r for r in old if r.embedding is not None and len(r.embedding) == width]
        if not rows:
            return []
        vectors = torch.stack(
            [torch.frombuffer(bytearray(r.embedding or b""), dtype=torch.float32) for r in rows]
        )
        scores = vectors @ emb[-1]
        chosen, used = [], 0
        for i in scores.argsort(descending=True).tolist():
            if scores[i] < MIN_SIMILARITY:
                break
            cost = self.count_tokens(_line(rows[i])) + 4
            if used + cost <= budget:
                chosen.append(i)
                used += cost
        return [_line(rows[i]) for i in sorted(chosen)]

    async def memory(self, channel: str, scope: str) -> Answer:
        """What the last reply's prompt held besides the history: recalled lines and lore."""
        async with self.sessions() as s:
            state = await self._state(s, channel, scope)
            used = list(state.recalled or [])
        parts = []
        for one in used:
            if not isinstance(one, dict):
                continue
            name, memory, lore = (
                one.get("speaker", "?"),
                one.get("memory") or [],
                one.get("lore") or [],
            )
            if memory:
                parts.append(f"{name} recalled:\n" + "\n".join(f"  {line}" for line in memory))
            if lore:
                parts.append(f"{name}'s lorebook: {', '.join(lore)}")
        return Answer(True, "\n".join(parts) or "Nothing was recalled for the last reply.")

    # -- commands ----------------------------------------------------------------------

    async def become(self, channel: str, author: Author, text: str) -> Answer:
        """Make one character the channel's scene, starting a new conversation.

        `text` is a name or alias, else a free-text persona, fused. The greeting opens it.
        """
        member = await self._member(text, author.scope)
        if isinstance(member, Answer):
            return member
        async with self._lock(channel), self.sessions() as s:
            state = await self._state(s, channel, author.scope)
            state.session += 1
            state.scene = [member.to_json()]
            voice = self._voices(state, author.scope)[0]
            if member.key is not None:
                message = f"**{voice.speaker.name}** now speaks in this channel."
            else:
                message = (
                    f"A fused persona now speaks: **{voice.speaker.name}** ({self._mix(member)})."
                )
            if voice.greeting:  # the opening line of the new conversation
                s.add(
                    db.MessageRow(
                        channel_id=channel,
                        session=state.session,
                        role="character",
                        author_id=member.id,
                        author_name=voice.speaker.name,
                        content=voice.greeting,
                    )
                )
            await s.commit()
        return Answer(True, message, voice.speaker, greeting=voice.greeting)

    async def scene_add(self, channel: str, author: Author, text: str) -> Answer:
        """Add a character (or a fused persona) to the channel's scene; history is kept."""
        member = await self._member(text, author.scope)
        if isinstance(member, Answer):
            return member
        async with self._lock(channel), self.sessions() as s:
            state = await self._state(s, channel, author.scope)
            chosen = [v.member for v in self._voices(state, author.scope, default=False)]
            if any(m.id == member.id for m in chosen):
                return refusal("That character is in this scene already.")
            if len(chosen) >= self.settings.max_scene:
                return refusal(
                    f"A scene holds at most {self.settings.max_scene} characters; "
                    "/scene remove one first."
                )
            state.scene = [m.to_json() for m in (*chosen, member)]
            voices = self._voices(state, author.scope)
            await s.commit()
        voice = voices[-1]
        extra = f" ({self._mix(member)})" if member.key is None else ""
        names = ", ".join(v.speaker.name for v in voices)
        return Answer(
            True, f"**{voice.speaker.name}**{extra} joins the scene: {names}.", voice.speaker
        )

    async def scene_remove(self, channel: str, author: Author, text: str) -> Answer:
        """Take a character out of the channel's scene (by name or alias)."""
        want = fold(" ".join(text.split()))
        async with self._lock(channel), self.sessions() as s:
            state = await self._state(s, channel, author.scope)
            voices = self._voices(state, author.scope, default=False)
            gone = next((v for v in voices if want and want in v.names), None)
            if gone is None:
                names = ", ".join(v.speaker.name for v in voices) or "nobody was chosen"
                return refusal(f"No {text.strip()!r} in this scene ({names}).")
            if len(voices) == 1:
                return refusal("A scene keeps one character: /become someone else instead.")
            state.scene = [v.member.to_json() for v in voices if v is not gone]
            await s.commit()
        left = ", ".join(v.speaker.name for v in voices if v is not gone)
        return Answer(True, f"**{gone.speaker.name}** leaves the scene: {left}.", gone.speaker)

    async def scene_mode(self, channel: str, author: Author, mode: str) -> Answer:
        """Set who answers in the channel's scene: all | addressed | auto."""
        mode = mode.strip().casefold()
        if mode not in SCENE_MODES:
            return refusal(f"The mode is one of {', '.join(SCENE_MODES)}, not {mode!r}.")
        async with self._lock(channel), self.sessions() as s:
            state = await self._state(s, channel, author.scope)
            state.scene_mode = mode
            await s.commit()
        return Answer(True, f"Scene mode: {mode} ({MODE_HELP[mode]}).")

    async def scene(self, channel: str, scope: str) -> Answer:
        """Who is in the channel's scene, and its mode."""
        async with self.sessions() as s:
            state = await self._state(s, channel, scope)
            voices = self._voices(state, scope)
            chosen = bool(self._voices(state, scope, default=False))
        names = ", ".join(v.speaker.name for v in voices)
        if not chosen:
            return Answer(True, f"{names} speaks here (nobody was chosen; /scene add someone).")
        mode = state.scene_mode
        return Answer(True, f"In this scene: {names}. Mode: {mode} ({MODE_HELP[mode]}).")

    async def scene_names(self, channel: str, scope: str) -> list[str]:
        """The names of the characters chosen for the channel's scene."""
        async with self.sessions() as s:
            state = await self._state(s, channel, scope)
            return [v.speaker.name for v in self._voices(state, scope, default=False)]

    async def _member(self, text: str, scope: str) -> Member | Answer:
        """The scene member `text` names: a character `scope` sees, else a fused persona."""
        text = " ".join(text.split())
        if not text:
            return refusal("Name a character, or describe one.")
        if len(text) > MAX_PERSONA_CHARS:
            return refusal(f"A persona description is at most {MAX_PERSONA_CHARS} characters.")
        found = self.catalog.resolve(text, scope)
        if found.kind == "suggestions":
            names = ", ".join(found.suggestions)
            return refusal(
                f"No character is called {text!r}. Did you mean: {names}?",
                suggestions=list(found.suggestions),
            )
        if found.kind == "character" and found.character is not None:
            return Member(key=found.character.key)
        if not self.catalog.trained(scope):
            return Answer(False, "No trained character to fuse from.", kind="error")
        query = await asyncio.to_thread(self.catalog.encoder.encode, [text])
        return Member(persona=text, mix=self.catalog.fusion_weights(query[0], scope=scope))

    def _mix(self, member: Member) -> str:
        return ", ".join(f"{self.catalog.require(k).name} {w:.0%}" for k, w in member.mix.items())

    async def characters(self, scope: str) -> list[CharacterInfo]:
        """The characters `scope` sees: its own and the shared cast."""
        return [_info(c) for c in self.catalog.visible(scope)]

    def autocomplete(self, prefix: str, scope: str, limit: int = 25) -> list[str]:
        """Names `scope` sees that match `prefix` (by name or alias start, then anywhere)."""
        want = prefix.casefold().strip()
        starts, inside = [], []
        for c in self.catalog.visible(scope):
            names = [n.casefold() for n in (c.name, *c.card.aliases)]
            if any(n.startswith(want) for n in names):
                starts.append(c.name)
            elif any(want in n for n in names):
                inside.append(c.name)
        return (sorted(starts) + sorted(inside))[:limit]

    async def reset(self, channel: str, author: Author) -> Answer:
        """Start a new conversation in the channel (earlier history leaves the prompt)."""
        async with self._lock(channel), self.sessions() as s:
            state = await self._state(s, channel, author.scope)
            state.session += 1
            await s.commit()
            voices = self._voices(state, author.scope)
        names = " and ".join(v.speaker.name for v in voices)
        start = "starts" if len(voices) == 1 else "start"
        return Answer(True, f"Conversation reset: {names} {start} afresh.", voices[0].speaker)

    async def speaker(self, channel: str, scope: str) -> Speaker:
        """Who speaks first in `channel` (of `scope`) now."""
        async with self.sessions() as s:
            return self._voices(await self._state(s, channel, scope), scope)[0].speaker

    # -- state -------------------------------------------------------------------------

    def _lock(self, channel: str) -> asyncio.Lock:
        return self._locks.setdefault(channel, asyncio.Lock())

    async def _state(self, s: AsyncSession, channel: str, scope: str) -> db.ChannelState:
        state = await s.get(db.ChannelState, channel)
        if state is None:
            state = db.ChannelState(channel_id=channel, scene=[], scene_mode="all", session=0)
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

    def _voices(self, state: db.ChannelState, scope: str, default: bool = True) -> list[_Voice]:
        """The scene's characters that `scope` sees, in order.

        With `default` never empty: the scope's first trained character (else a plain
        assistant) speaks when the scene has nobody left.
        """
        voices: list[_Voice] = []
        for data in state.scene or []:
            member = Member.from_json(data)
            voice = None if member is None else self._voice(member, scope)
            if voice is not None and all(v.member.id != voice.member.id for v in voices):
                voices.append(voice)
        if voices or not default:
            return voices
        first = next(iter(self.catalog.trained(scope)), None)
        member = Member(key=first.key) if first else Member(persona="a helpful assistant")
        return [self._voice(member, scope) or self._persona(member)]

    def _voice(self, member: Member, scope: str) -> _Voice | None:
        """How `member` speaks; None for a character `scope` does not see (or that is gone)."""
        if member.key is None:
            return self._persona(member)
        char = self.catalog.get(member.key)
        if char is None or not char.visible_in(scope):
            return None
        trained = char.status == "trained"
        return _Voice(
            Speaker(char.name, char.card.avatar_url),
            system_prompt(char.card),
            char.key if trained else None,
            {} if trained else dict(char.mix),
            char.card.greeting,
            member,
            char.names(),
            char.card.persona_text(),
        )

    @staticmethod
    def _persona(member: Member) -> _Voice:
        persona = member.persona or "a helpful assistant"
        name = neutralise_mentions(persona)[:80]
        system = f"You are {persona}. Stay in character."
        return _Voice(
            Speaker(name), system, None, dict(member.mix), "", member, (fold(name),), persona
        )


MODE_HELP: dict[str, str] = {
    "all": "every character answers each message",
    "addressed": "the character named, or replied to, answers; else the last one who spoke",
    "auto": "one character answers: the one named, else the best match to the message",
}


def addressed(voices: list[_Voice], content: str) -> list[_Voice]:
    """The voices a message names (name or alias as whole words), in order of mention."""
    text = f" {fold(content)} "
    found = []
    for voice in voices:
        at = [text.find(f" {n} ") for n in voice.names if n]
        at = [i for i in at if i >= 0]
        if at:
            found.append((min(at), voice))
    return [v for _, v in sorted(found, key=lambda pair: pair[0])]


def _streak(spoken: list[db.MessageRow]) -> tuple[str, int] | None:
    """The author of the newest character line, and how many lines in a row are theirs."""
    if not spoken:
        return None
    last = spoken[-1].author_id
    count = 0
    for row in reversed(spoken):
        if row.author_id != last:
            break
        count += 1
    return last, count


def _is_own(row: db.MessageRow, voice: _Voice) -> bool:
    """Whether a history row is `voice`'s own line (a persona's, before scenes: by name)."""
    if row.role != "character":
        return False
    if row.author_id == voice.member.id:
        return True
    return row.author_id == "character:persona" and row.author_name == voice.speaker.name


def _own_text(text: str, name: str) -> str:
    """A reply as posted: mentions broken, and the speaker's own name prefix dropped."""
    text = text.strip()
    prefix = f"{name}:"
    if text.casefold().startswith(prefix.casefold()):
        text = text[len(prefix) :].lstrip()
    return neutralise_mentions(text) or "…"


def _line(row: db.MessageRow) -> str:
    return f"{row.author_name}: {row.content}"


def _before_round(history: list[db.MessageRow], ref: int) -> list[db.MessageRow]:
    """The history a reply was answered from.

    Every row before it, less the replies to the same message stored before it: a scene's
    characters answer side by side, none seeing the others' answers.
    """
    prior = [r for r in history if r.id < ref]
    while prior and prior[-1].role == "character":
        prior.pop()
    return prior


def _joined(answers: list[Answer]) -> Answer:
    first, *rest = answers
    first.more = rest
    return first


def _digest(member: Member) -> str:
    return hashlib.sha256(member.id.encode()).hexdigest()[:10]


def _reply_id(message_id: str, member: Member) -> str:
    """The platform id stored with `member`'s answer to a message (unique per pair)."""
    return f"{message_id[:50]}:{_digest(member)}"


def _turn_id(message_id: str, member: Member) -> str:
    clean = re.sub(r"[^A-Za-z0-9_.:-]", "_", message_id)[:100]
    return f"msg-{clean}-{_digest(member)}"


def _info(c: Character) -> CharacterInfo:
    first = _SENTENCE_END.split(c.card.profile.strip(), maxsplit=1)[0]
    return CharacterInfo(
        c.key, c.name, tuple(c.card.aliases), c.status, first[:200], c.card.avatar_url
    )
