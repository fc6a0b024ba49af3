"""The Discord client and its entry point, `python -m bot`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from typing import TYPE_CHECKING

import discord
from discord.ext import commands
from pydantic import ValidationError

from bot.cogs.characters import CharactersCog
from bot.cogs.chat import ChatCog
from bot.sender import MESSAGE_LIMIT, NO_MENTIONS, WebhookCache
from bot.swipes import SwipeButton
from neeko.settings import ChatSettings, DiscordSettings

if TYPE_CHECKING:
    from neeko.chat import ChatService
    from neeko.moderation import Moderation

log = logging.getLogger(__name__)
_background: set[asyncio.Task[None]] = set()


class NeekoBot(commands.Bot):
    """The bot: the chat and character cogs over one `ChatService` and `Moderation`."""

    def __init__(
        self, service: ChatService, moderation: Moderation, settings: DiscordSettings
    ) -> None:
        intents = discord.Intents.default()
        intents.message_content = True
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            help_command=None,
            allowed_mentions=discord.AllowedMentions.none(),
        )
        self.service = service
        self.moderation = moderation
        self.settings = settings
        moderation.announce = self.announce

    async def setup_hook(self) -> None:
        """Add the cogs and sync the slash commands (to `guild_id` only, if set)."""
        self.add_dynamic_items(SwipeButton)  # swipe buttons work after a restart
        webhooks = WebhookCache()
        await self.add_cog(ChatCog(self.service, self.settings, webhooks=webhooks))
        await self.add_cog(CharactersCog(self.service, self.moderation, self.settings, webhooks))
        if self.settings.guild_id is not None:
            guild = discord.Object(id=self.settings.guild_id)
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
        else:
            synced = await self.tree.sync()
        log.info("synced %d slash commands", len(synced))

    async def announce(self, channel_id: str, line: str) -> None:
        """Post `line` as the bot in a channel, by id (best effort; none if it is unknown)."""
        channel = self.get_channel(int(channel_id))
        if isinstance(channel, discord.abc.Messageable):
            with contextlib.suppress(discord.HTTPException):
                await channel.send(line[:MESSAGE_LIMIT], allowed_mentions=NO_MENTIONS)

    async def on_ready(self) -> None:
        """Log who the bot is logged in as."""
        log.info("logged in as %s", self.user)

    async def on_message(self, message: discord.Message, /) -> None:
        """Do nothing: there are no text commands, and the chat cog answers messages."""


async def run(discord_settings: DiscordSettings, chat_settings: ChatSettings) -> None:
    """Open the chat service, run the bot until it is closed, then close the service."""
    from neeko.wiring import open_services  # loads the model: only when the bot runs

    async with open_services(chat_settings) as (service, moderation):
        bot = NeekoBot(service, moderation, discord_settings)
        _close_on_signals(bot)
        async with bot:
            await bot.start(discord_settings.token.get_secret_value())
    log.info("stopped")


def _close_on_signals(bot: commands.Bot) -> None:
    """Close `bot` (which ends `bot.start`) on SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()

    def close(name: str) -> None:
        log.info("%s received, closing", name)
        task = loop.create_task(bot.close())
        _background.add(task)
        task.add_done_callback(_background.discard)

    if sys.platform == "win32":  # no loop signal handlers there; Ctrl-C still stops asyncio.run
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, close, sig.name)


def main() -> None:
    """Read the settings from the environment and run the bot."""
    discord.utils.setup_logging(level=logging.INFO, root=True)
    try:
        discord_settings, chat_settings = DiscordSettings(), ChatSettings()
    except ValidationError as exc:
        raise SystemExit(f"invalid settings (is DISCORD_TOKEN set?):\n{exc}") from None
    try:
        asyncio.run(run(discord_settings, chat_settings))
    except discord.LoginFailure as exc:
        raise SystemExit(f"Discord refused the token: {exc}") from None
