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
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from neeko import db
from neeko.catalog import Catalog
from neeko.characters import Character, system_prompt
from neeko.chat_types import Answer, Author, CharacterInfo, Speaker, TextCallback, refusal
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
    ) -> Answer:
        """Answer a channel message in the voice of the channel's character."""
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
                return await self._answer(channel, author, content, message_id, on_text)
        finally:
            self._pending[channel] -= 1

    async def _answer(
        self,
        channel: str,
        author: Author,
        content: str,
        message_id: str,
        on_text: TextCallback | None,
    ) -> Answer:
        async with self.sessions() as s:
            state = await self._state(s, channel, author.scope)
            voice = self._voice(state, author.scope)
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
            reply = await self._generate(turn, voice.speaker, on_text)
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

    async def _generate(self, turn: Turn, speaker: Speaker, on_text: TextCallback | None) -> Reply:
        text = ""
        async for item in self.turns.submit(turn, self.settings.turn_timeout_s):
            if isinstance(item, Chunk):
                text = item.text if item.reset else text + item.text
                if on_text is not None:
                    await on_text(speaker, neutralise_mentions(text.lstrip()))  # as the final
            else:
                return item
        raise QueueError("the reply stream ended early")  # pragma: no cover

    def _window(self, voice: _Voice, history: list[db.MessageRow]) -> tuple[list[Message], bool]:
        """System prompt plus the newest history that fits the token budget.

        The budget is `history_tokens`, less what the system prompt and the reply leave of
        the model's context. Turns alternate user / assistant, as strict chat templates
        demand: consecutive user messages (several people talking) are merged, and an
        opening line of the character (its greeting) goes into the system prompt.
        """
        system_cost = self.count_tokens(voice.system) + 32  # with MULTI_USER and the template
        room = self.context_tokens - system_cost - self.settings.reply_tokens
        budget = min(self.settings.history_tokens, room)
        picked: list[db.MessageRow] = []
        for row in reversed(history):
            cost = self.count_tokens(row.content) + 8
            if cost > budget:
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
            return refusal("Name a character, or describe one.")
        if len(text) > MAX_PERSONA_CHARS:
            return refusal(f"A persona description is at most {MAX_PERSONA_CHARS} characters.")
        found = self.catalog.resolve(text, author.scope)
        if found.kind == "suggestions":
            names = ", ".join(found.suggestions)
            return refusal(
                f"No character is called {text!r}. Did you mean: {names}?",
                suggestions=list(found.suggestions),
            )
        async with self._lock(channel), self.sessions() as s:
            state = await self._state(s, channel, author.scope)
            state.session += 1
            if found.kind == "character" and found.character is not None:
                state.character_key, state.persona, state.mix = found.character.key, None, {}
                voice = self._voice(state, author.scope)
                message = f"**{voice.speaker.name}** now speaks in this channel."
            else:
                if not self.catalog.trained(author.scope):
                    return Answer(False, "No trained character to fuse from.", kind="error")
                query = await asyncio.to_thread(self.catalog.encoder.encode, [text])
                state.character_key, state.persona = None, text
                state.mix = self.catalog.fusion_weights(query[0], scope=author.scope)
                voice = self._voice(state, author.scope)
                mix = ", ".join(
                    f"{self.catalog.require(k).name} {w:.0%}" for k, w in state.mix.items()
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
            voice = self._voice(state, author.scope)
        return Answer(
            True, f"Conversation reset: {voice.speaker.name} starts afresh.", voice.speaker
        )

    async def speaker(self, channel: str, scope: str) -> Speaker:
        """Who speaks in `channel` (of `scope`) now."""
        async with self.sessions() as s:
            return self._voice(await self._state(s, channel, scope), scope).speaker

    # -- state -------------------------------------------------------------------------

    def _lock(self, channel: str) -> asyncio.Lock:
        return self._locks.setdefault(channel, asyncio.Lock())

    async def _state(self, s: AsyncSession, channel: str, scope: str) -> db.ChannelState:
        state = await s.get(db.ChannelState, channel)
        if state is None:
            first = next(iter(self.catalog.trained(scope)), None)
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

    def _voice(self, state: db.ChannelState, scope: str) -> _Voice:
        """Who speaks: the channel's character if `scope` sees it, else its persona."""
        char = self.catalog.get(state.character_key or "")
        if char is not None and char.visible_in(scope):
            trained = char.status == "trained"
            return _Voice(
                Speaker(char.name, char.card.avatar_url),
                system_prompt(char.card),
                char.key if trained else None,
                {} if trained else dict(char.mix),
                char.card.greeting,
            )
        persona = state.persona or "a helpful assistant"
        name = neutralise_mentions(persona)[:80]
        return _Voice(
            Speaker(name), f"You are {persona}. Stay in character.", None, dict(state.mix)
        )


def _turn_id(message_id: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_.:-]", "_", message_id)[:100]
    return f"msg-{clean}"


def _info(c: Character) -> CharacterInfo:
    first = _SENTENCE_END.split(c.card.profile.strip(), maxsplit=1)[0]
    return CharacterInfo(
        c.key, c.name, tuple(c.card.aliases), c.status, first[:200], c.card.avatar_url
    )
