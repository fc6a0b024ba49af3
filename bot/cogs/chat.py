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
    with_notices,
)
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
        async with message.channel.typing():
            answer = await self.service.handle_message(
                channel,
                author_of(message.author, self.settings, guild),
                message.clean_content,
                str(message.id),
                on_text=on_text,
            )
        text = with_notices(answer.text, answer.notices)
        if answer.ok and answer.kind == "reply":
            poster.speaker = answer.speaker
            await stream.finish(text)
        elif text.strip():
            await message.reply(
                text[:MESSAGE_LIMIT], mention_author=False, allowed_mentions=NO_MENTIONS
            )
