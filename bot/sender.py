"""Posting replies: 2,000-character chunks, one webhook per channel, throttled streaming edits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable

import discord

from neeko.chat_types import Speaker

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000
"""Discord's limit on the characters of one message."""
WEBHOOK_NAME = "Neeko"
NO_MENTIONS = discord.AllowedMentions.none()

WebhookChannel = (
    discord.TextChannel | discord.VoiceChannel | discord.StageChannel | discord.ForumChannel
)
"""Channels that own webhooks (a thread posts through its parent's)."""

_FENCE = re.compile(r"```")
_LANG = re.compile(r"[\w+#.-]{1,32}(?=\n|$)")
_CLOSE = "\n```"


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Split `text` into chunks of at most `limit` characters.

    Each cut is at the last newline that fits, else the last space (the separator is
    dropped), else hard. A chunk that ends inside a ``` code block closes it, and the next
    chunk reopens it with the same language tag. Blank chunks are dropped.

    Raises:
        ValueError: if `limit` leaves no room for a reopened fence plus text.
    """
    if limit < 64:
        raise ValueError(f"limit must be at least 64 characters, got {limit}")
    chunks: list[str] = []
    rest, fence = text, None  # fence: the opening line of the code block open at `rest`
    while rest:
        head = f"{fence}\n" if fence else ""
        if len(head) + len(rest) <= limit:
            chunks.append(head + rest)
            break
        cut, skip = _cut(rest, limit - len(head) - len(_CLOSE))
        after = _fence_after(rest, cut, fence)
        chunks.append(head + rest[:cut] + (_CLOSE if after else ""))
        rest, fence = rest[cut + skip :], after
    return [chunk for chunk in chunks if chunk.strip()]


def _cut(text: str, width: int) -> tuple[int, int]:
    """Where to cut `text` (longer than `width`): the chunk's end and the separator's length."""
    for separator in ("\n", " "):
        i = text.rfind(separator, 1, width + 1)
        if i > 0:
            return i, 1
    i = width
    while i > 1 and text[i - 1] == "`" == text[i]:  # never cut a ``` in two
        i -= 1
    return i, 0


def _fence_after(text: str, end: int, fence: str | None) -> str | None:
    """The code block still open after `text[:end]`, given `fence` open at its start."""
    for match in _FENCE.finditer(text, 0, end):
        if fence:
            fence = None
        else:
            lang = _LANG.match(text, match.end())
            fence = "```" + (lang.group() if lang else "")
    return fence


def with_notices(text: str, notices: list[str]) -> str:
    """`text` followed by `notices` as Discord subtext lines."""
    if not notices:
        return text
    return "\n\n".join(part for part in (text, "\n".join(f"-# *{n}*" for n in notices)) if part)


class WebhookCache:
    """One webhook per channel, named "Neeko": reused if the bot made one, else created."""

    def __init__(self, name: str = WEBHOOK_NAME) -> None:
        self.name = name
        self._hooks: dict[int, discord.Webhook] = {}
        self._lock = asyncio.Lock()

    async def get(self, channel: WebhookChannel) -> discord.Webhook | None:
        """The channel's webhook, or None where the bot may not manage webhooks."""
        if (hook := self._hooks.get(channel.id)) is not None:
            return hook
        me = channel.guild.me
        if not channel.permissions_for(me).manage_webhooks:
            return None
        async with self._lock:
            if (hook := self._hooks.get(channel.id)) is not None:
                return hook
            try:
                hook = await self._find_or_create(channel, me.id)
            except discord.HTTPException as exc:  # Forbidden, or the channel's 15 are taken
                log.warning("no webhook in channel %s: %s", channel.id, exc)
                return None
            self._hooks[channel.id] = hook
            return hook

    def forget(self, channel_id: int) -> None:
        """Drop a channel's webhook (e.g. someone deleted it); the next use makes a new one."""
        self._hooks.pop(channel_id, None)

    async def _find_or_create(self, channel: WebhookChannel, bot_id: int) -> discord.Webhook:
        for hook in await channel.webhooks():
            if hook.name == self.name and hook.token and hook.user and hook.user.id == bot_id:
                return hook
        return await channel.create_webhook(name=self.name, reason="Neeko character replies")


class ChannelPoster:
    """Posts one speaker's messages in a channel: through its webhook, else as the bot."""

    def __init__(
        self,
        channel: discord.abc.Messageable,
        webhooks: WebhookCache,
        speaker: Speaker | None = None,
    ) -> None:
        self.channel = channel
        self.webhooks = webhooks
        self.speaker = speaker
        """Who speaks: the name and avatar of the webhook posts (the bot's own without)."""

    async def send(self, text: str) -> discord.Message:
        """Post `text` under the speaker's name and avatar (mentions never ping)."""
        thread = self.channel if isinstance(self.channel, discord.Thread) else None
        owner = thread.parent if thread is not None else self.channel
        hook = await self.webhooks.get(owner) if isinstance(owner, WebhookChannel) else None
        if hook is not None and self.speaker is not None:
            extra = {"thread": thread} if thread is not None else {}
            try:
                return await hook.send(
                    text,
                    username=self.speaker.name[:80] or WEBHOOK_NAME,
                    avatar_url=self.speaker.avatar_url or None,
                    allowed_mentions=NO_MENTIONS,
                    wait=True,
                    **extra,
                )
            except discord.NotFound:
                self.webhooks.forget(owner.id)
            except discord.HTTPException as exc:
                log.warning("webhook send failed, posting as the bot: %s", exc)
        return await self.channel.send(text, allowed_mentions=NO_MENTIONS)


class ReplyStream:
    """A reply that grows: posted at its first text, then edited at most once per `interval`.

    Text over 2,000 characters continues in further messages; `finish` shows the final text
    at once.
    """

    def __init__(
        self,
        send: Callable[[str], Awaitable[discord.Message]],
        *,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._send = send
        self._interval = interval
        self._clock = clock
        self._last = -math.inf
        self._messages: list[discord.Message] = []
        self._shown: list[str] = []

    async def update(self, text: str) -> None:
        """Show `text`, the whole reply so far, unless the last change is under `interval` old.

        A failed send or edit is logged, not raised: the final text is shown by `finish`.
        """
        if self._clock() - self._last < self._interval:
            return
        try:
            await self._show(text)
        except discord.HTTPException as exc:
            log.warning("streaming update failed: %s", exc)

    async def finish(self, text: str) -> None:
        """Show the final `text` now."""
        await self._show(text)

    @property
    def messages(self) -> list[discord.Message]:
        """The messages the reply is shown in, in order."""
        return list(self._messages)

    async def _show(self, text: str) -> None:
        chunks = split_message(text)
        if not chunks or chunks == self._shown:
            return
        self._last = self._clock()
        for i, chunk in enumerate(chunks):
            if i == len(self._messages):
                self._messages.append(await self._send(chunk))
                self._shown.append(chunk)
            elif chunk != self._shown[i]:
                await self._messages[i].edit(content=chunk, allowed_mentions=NO_MENTIONS)
                self._shown[i] = chunk
        for message in self._messages[len(chunks) :]:  # the text shrank (a restarted reply)
            with contextlib.suppress(discord.HTTPException):
                await message.delete()
        del self._messages[len(chunks) :]
        del self._shown[len(chunks) :]
