"""Channel chat: every guild message is a turn for the channel's current speaker."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import discord
from discord.ext import commands

from bot.checks import author_of, chats_in
from bot.sender import (
    MESSAGE_LIMIT,
    NO_MENTIONS,
    ChannelPoster,
    ReplyStream,
    WebhookCache,
    split_message,
    with_notices,
)
from bot.swipes import swipe_view
from neeko.chat_types import Speaker
from neeko.settings import DiscordSettings

if TYPE_CHECKING:
    from neeko.chat import ChatService

log = logging.getLogger(__name__)

_CHAT_TYPES = (discord.MessageType.default, discord.MessageType.reply)


def wants_answer(message: discord.Message) -> bool:
    """Whether a message is a chat turn: a person's text in a guild channel.

    Bots and webhooks (the bot's own replies among them), DMs, system messages and
    messages without text are not.
    """
    return (
        message.guild is not None
        and not message.author.bot
        and message.webhook_id is None
        and message.type in _CHAT_TYPES
        and bool(message.content.strip())
    )


class ChatCog(commands.Cog):
    """Answers channel messages as the channel's speaker, streaming through its webhook."""

    def __init__(
        self,
        service: ChatService,
        settings: DiscordSettings,
        *,
        webhooks: WebhookCache | None = None,
        edit_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.settings = settings
        self.webhooks = webhooks or WebhookCache()
        self.edit_interval = edit_interval
        """Least seconds between two edits of a streaming reply."""
        self.clock = clock
        self._buttons: dict[int, list[discord.Message]] = {}
        """Per channel, the messages that show swipe buttons."""

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        """Answer a chat turn; errors go back to its author as a reply."""
        if not wants_answer(message) or not chats_in(message.channel, self.settings):
            return
        try:
            await self._answer(message)
        except Exception:
            log.exception("answering message %s failed", message.id)
            with contextlib.suppress(discord.HTTPException):
                await message.reply(
                    "Sorry, something went wrong with that message.",
                    mention_author=False,
                    allowed_mentions=NO_MENTIONS,
                )

    async def _answer(self, message: discord.Message) -> None:
        channel = str(message.channel.id)
        poster = ChannelPoster(message.channel, self.webhooks)
        stream = ReplyStream(poster.send, interval=self.edit_interval, clock=self.clock)

        async def on_text(speaker: Speaker, text: str) -> None:
            poster.speaker = speaker  # the reply says who speaks: nothing to ask the service
            await stream.update(text)

        guild = message.guild.id if message.guild is not None else None
        reference = message.reference.message_id if message.reference is not None else None
        async with message.channel.typing():
            answer = await self.service.handle_message(
                channel,
                author_of(message.author, self.settings, guild),
                message.clean_content,
                str(message.id),
                on_text=on_text,
                reply_to=str(reference) if reference is not None else None,
            )
        buttons: list[tuple[discord.Message, int]] = []
        for i, one in enumerate(answer.all()):  # a scene's answers, in its order
            text = with_notices(one.text, one.notices)
            if one.ok and one.kind == "reply":
                if i == 0:  # the first answer streamed (if it was the only one)
                    poster.speaker = one.speaker
                    await stream.finish(text)
                    posted = stream.messages
                else:
                    posted = [
                        await ChannelPoster(message.channel, self.webhooks, one.speaker).send(chunk)
                        for chunk in split_message(text)
                    ]
                if posted and one.ref is not None:
                    await self.service.mark_posted(channel, one.ref, str(posted[0].id))
                    buttons.append((posted[-1], one.ref))
            elif text.strip():
                await message.reply(
                    text[:MESSAGE_LIMIT], mention_author=False, allowed_mentions=NO_MENTIONS
                )
        if buttons:
            await self._move_buttons(message.channel.id, buttons)

    async def _move_buttons(self, channel_id: int, new: list[tuple[discord.Message, int]]) -> None:
        """Put swipe buttons under the newest replies, and take them off the ones before.

        Best effort: the service refuses a swipe of an older reply anyway.
        """
        for old in self._buttons.pop(channel_id, []):
            with contextlib.suppress(discord.HTTPException):
                await old.edit(view=None)
        for posted, ref in new:
            try:
                await posted.edit(view=swipe_view(ref))
            except discord.HTTPException as exc:
                log.warning("no swipe buttons on reply %d: %s", ref, exc)
        self._buttons[channel_id] = [posted for posted, _ in new]
