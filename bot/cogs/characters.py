"""Slash commands: choose, list and reset the channel's character; moderators add and train.

Every command defers at once (an interaction must be answered within 3 s) and then sends
exactly one follow-up, visible only to its user. A change that affects the whole channel
(`/become`, `/reset`) is also announced there. Moderator rights are checked here, in code:
Discord applies `default_permissions` only to top-level commands, so on the `/character`
group it would hide `/character status` from everyone and hide `submit`/`train` from role
moderators without Manage Server.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.checks import author_of, chats_in, where_characters_speak
from bot.sender import (
    MESSAGE_LIMIT,
    NO_MENTIONS,
    ChannelPoster,
    WebhookCache,
    split_message,
    with_notices,
)
from neeko.characters import guild_scope
from neeko.chat_types import Answer, Author, CharacterInfo
from neeko.settings import DiscordSettings

if TYPE_CHECKING:
    from neeko.chat import ChatService
    from neeko.moderation import Moderation

log = logging.getLogger(__name__)

MAX_CARD_BYTES = 1024 * 1024
MAX_DIALOGUES_BYTES = 8 * 1024 * 1024
CARD_SUFFIXES = (".json", ".png")
MAX_CHOICES = 25
"""Discord shows at most 25 autocomplete choices, of at most 100 characters each."""


class CharactersCog(commands.Cog):
    """`/become`, `/characters`, `/reset` and the `/character` group."""

    character = app_commands.Group(
        name="character", description="Add, train and inspect characters.", guild_only=True
    )
    scene = app_commands.Group(
        name="scene", description="Several characters in this channel.", guild_only=True
    )

    def __init__(
        self,
        service: ChatService,
        moderation: Moderation,
        settings: DiscordSettings,
        webhooks: WebhookCache | None = None,
    ) -> None:
        self.service = service
        self.moderation = moderation
        self.settings = settings
        self.webhooks = webhooks or WebhookCache()
        """Shared with the chat cog: one webhook per channel."""

    @app_commands.command(name="become", description="Choose who speaks in this channel.")
    @app_commands.describe(
        character="A character's name, or anyone in free text: 'a grumpy lighthouse keeper'"
    )
    @app_commands.guild_only()
    async def become(self, interaction: discord.Interaction, character: str) -> None:
        """Make a character (or a persona fused from free text) the channel's speaker."""
        await interaction.response.defer(ephemeral=True)
        if not chats_in(interaction.channel, self.settings):
            await _reply(interaction, where_characters_speak(self.settings))
            return
        channel = _channel_key(interaction)
        answer = await self.service.become(channel, self._author(interaction), character)
        text = with_notices(answer.text, answer.notices)  # e.g. the character's greeting
        if not all(name in text for name in answer.suggestions):
            names = ", ".join(f"**{discord.utils.escape_markdown(s)}**" for s in answer.suggestions)
            text = f"{text}\nDid you mean: {names}?"
        await _reply(interaction, text)
        if answer.ok:
            speaker = answer.speaker or await self.service.speaker(channel, _scope(interaction))
            await _announce(
                interaction,
                f"{_who(interaction)} chose **{discord.utils.escape_markdown(speaker.name)}** "
                "to speak here.",
            )
            if answer.greeting and isinstance(interaction.channel, discord.abc.Messageable):
                poster = ChannelPoster(interaction.channel, self.webhooks, speaker)
                with contextlib.suppress(discord.HTTPException):
                    for chunk in split_message(answer.greeting):
                        await poster.send(chunk)

    @app_commands.command(name="memory", description="What the last reply recalled.")
    @app_commands.guild_only()
    async def memory(self, interaction: discord.Interaction) -> None:
        """Show the earlier lines and lorebook entries the last reply's prompt held."""
        await interaction.response.defer(ephemeral=True)
        answer = await self.service.memory(_channel_key(interaction), _scope(interaction))
        await _reply(interaction, answer.text)

    @app_commands.command(name="characters", description="List the characters to talk to.")
    @app_commands.guild_only()
    async def characters(self, interaction: discord.Interaction) -> None:
        """List the characters and their status."""
        await interaction.response.defer(ephemeral=True)
        infos = await self.service.characters(_scope(interaction))
        await interaction.followup.send(
            embed=characters_embed(infos), ephemeral=True, allowed_mentions=NO_MENTIONS
        )

    @app_commands.command(name="reset", description="Start a new conversation in this channel.")
    @app_commands.guild_only()
    async def reset(self, interaction: discord.Interaction) -> None:
        """Forget the channel's history."""
        await interaction.response.defer(ephemeral=True)
        if not chats_in(interaction.channel, self.settings):
            await _reply(interaction, where_characters_speak(self.settings))
            return
        answer = await self.service.reset(_channel_key(interaction), self._author(interaction))
        await _reply(interaction, answer.text)
        if answer.ok:
            await _announce(interaction, f"{_who(interaction)} started a new conversation here.")

    @scene.command(name="add", description="Bring a character into this channel's scene.")
    @app_commands.describe(
        character="A character's name, or anyone in free text: 'a grumpy lighthouse keeper'"
    )
    async def scene_add(self, interaction: discord.Interaction, character: str) -> None:
        """Add a character (or a fused persona) to the scene."""
        await self._scene_change(
            interaction, lambda c, a: self.service.scene_add(c, a, character), "joins"
        )

    @scene.command(name="remove", description="Take a character out of this channel's scene.")
    @app_commands.describe(character="A character of the scene")
    async def scene_remove(self, interaction: discord.Interaction, character: str) -> None:
        """Take a character out of the scene."""
        await self._scene_change(
            interaction, lambda c, a: self.service.scene_remove(c, a, character), "leaves"
        )

    @scene.command(name="mode", description="Choose who answers in this channel's scene.")
    @app_commands.describe(mode="all: everyone; addressed: the one named; auto: the best match")
    @app_commands.choices(
        mode=[app_commands.Choice(name=m, value=m) for m in ("all", "addressed", "auto")]
    )
    async def scene_mode(self, interaction: discord.Interaction, mode: str) -> None:
        """Set the scene's mode."""
        await self._scene_change(
            interaction, lambda c, a: self.service.scene_mode(c, a, mode), "mode"
        )

    @scene.command(name="show", description="Who is in this channel's scene.")
    async def scene_show(self, interaction: discord.Interaction) -> None:
        """Show the scene and its mode."""
        await interaction.response.defer(ephemeral=True)
        answer = await self.service.scene(_channel_key(interaction), _scope(interaction))
        await _reply(interaction, answer.text)

    async def _scene_change(
        self,
        interaction: discord.Interaction,
        change: Callable[[str, Author], Awaitable[Answer]],
        what: str,
    ) -> None:
        await interaction.response.defer(ephemeral=True)
        if not chats_in(interaction.channel, self.settings):
            await _reply(interaction, where_characters_speak(self.settings))
            return
        answer = await change(_channel_key(interaction), self._author(interaction))
        await _reply(interaction, answer.text)
        if answer.ok:
            if what == "mode":
                line = f"{_who(interaction)} changed this scene. {answer.text}"
            else:
                name = discord.utils.escape_markdown(answer.speaker.name if answer.speaker else "?")
                line = f"{_who(interaction)}: **{name}** {what} the scene."
            await _announce(interaction, line)

    @scene_remove.autocomplete("character")
    async def member_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        """The scene's characters whose names match what was typed so far."""
        names = await self.service.scene_names(_channel_key(interaction), _scope(interaction))
        want = current.casefold().strip()
        names = [n for n in names if want in n.casefold()][:MAX_CHOICES]
        return [app_commands.Choice(name=n[:100], value=n[:100]) for n in names if n]

    @character.command(name="submit", description="Add a character (moderators).")
    @app_commands.describe(
        card="A character card, .json or .png, at most 1 MB",
        name="The character's name (without a card)",
        profile="Who the character is (without a card)",
        greeting="The character's first message (optional)",
        shared="Add it to the shared cast, seen in every server (the bot's owners only)",
    )
    async def submit(
        self,
        interaction: discord.Interaction,
        card: discord.Attachment | None = None,
        name: str | None = None,
        profile: str | None = None,
        greeting: str | None = None,
        shared: bool = False,
    ) -> None:
        """Add a character from a card or from a name and profile; it is fused at once."""
        await interaction.response.defer(ephemeral=True)
        author = self._author(interaction)
        if not author.moderator:
            await _reply(interaction, self._refusal())
            return
        data, filename = None, ""
        if card is not None:
            if error := _attachment_error(card, MAX_CARD_BYTES, CARD_SUFFIXES):
                await _reply(interaction, error)
                return
            data, filename = await card.read(), card.filename
        answer = await self.moderation.submit(
            author,
            card=data,
            filename=filename,
            name=name,
            profile=profile,
            greeting=greeting or "",
            shared=shared,
        )
        await _reply(interaction, answer.text)

    @character.command(name="train", description="Train a character's own block (moderators).")
    @app_commands.describe(
        name="The character to train",
        dialogues="Training dialogues, chat JSONL (optional: else the card's own lines)",
    )
    async def train(
        self,
        interaction: discord.Interaction,
        name: str,
        dialogues: discord.Attachment | None = None,
    ) -> None:
        """Queue a training job; its progress is posted in this channel."""
        await interaction.response.defer(ephemeral=True)
        author = self._author(interaction)
        if not author.moderator:
            await _reply(interaction, self._refusal())
            return
        data = None
        if dialogues is not None:
            if error := _attachment_error(dialogues, MAX_DIALOGUES_BYTES):
                await _reply(interaction, error)
                return
            data = await dialogues.read()
        answer = await self.moderation.train(
            author,
            name,
            _channel_key(interaction),
            dialogues=data,
            on_progress=_channel_poster(interaction.channel),
        )
        await _reply(interaction, answer.text)

    @character.command(name="status", description="Show a character's status and training.")
    @app_commands.describe(name="The character")
    async def status(self, interaction: discord.Interaction, name: str) -> None:
        """Show whether a character is fused, training or trained."""
        await interaction.response.defer(ephemeral=True)
        answer = await self.moderation.status(self._author(interaction), name)
        await _reply(interaction, answer.text)

    @status.autocomplete("name")
    @train.autocomplete("name")
    @become.autocomplete("character")
    @scene_add.autocomplete("character")
    async def character_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        """Character names that match what was typed so far (only suggestions)."""
        names = self.service.autocomplete(current, _scope(interaction), limit=MAX_CHOICES)
        names = names[:MAX_CHOICES]
        return [app_commands.Choice(name=n[:100], value=n[:100]) for n in names if n]

    async def cog_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        """Log a failed command and tell its user."""
        command = interaction.command.qualified_name if interaction.command else "?"
        log.error("/%s failed", command, exc_info=error)
        text = "Sorry, something went wrong; please try again later."
        with contextlib.suppress(discord.HTTPException):
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)

    def _author(self, interaction: discord.Interaction) -> Author:
        return author_of(interaction.user, self.settings, interaction.guild_id)

    def _refusal(self) -> str:
        role = self.settings.moderator_role.strip()
        need = f"Manage Server or the `{role}` role" if role else "Manage Server"
        return f"Only moderators can do this: it needs {need}."


def characters_embed(infos: list[CharacterInfo], limit: int = 4000) -> discord.Embed:
    """An embed listing characters, one line each, cut at `limit` characters."""
    lines: list[str] = []
    for i, info in enumerate(infos):
        line = f"**{discord.utils.escape_markdown(info.name)}** · {info.status}"
        if info.description:
            line += f" — {discord.utils.escape_markdown(_clip(info.description, 120))}"
        if sum(len(x) + 1 for x in lines) + len(line) > limit - 40:
            lines.append(f"…and {len(infos) - i} more.")
            break
        lines.append(line)
    embed = discord.Embed(
        title=f"Characters ({len(infos)})", description="\n".join(lines) or "No characters yet."
    )
    embed.set_footer(text="/become <name>, or describe anyone: /become a grumpy lighthouse keeper")
    return embed


def _attachment_error(
    attachment: discord.Attachment, max_bytes: int, suffixes: tuple[str, ...] = ()
) -> str | None:
    """Why an attachment is refused before it is downloaded, or None."""
    if attachment.size > max_bytes:
        return f"`{attachment.filename}` is too large: at most {max_bytes // 1024 // 1024} MB."
    if suffixes and not attachment.filename.lower().endswith(suffixes):
        return f"`{attachment.filename}` must be one of: {', '.join(suffixes)}."
    return None


def _channel_poster(channel: object) -> Callable[[str], Awaitable[None]] | None:
    """A callback that posts lines in `channel` as the bot, or None if it cannot."""
    if not isinstance(channel, discord.abc.Messageable):
        return None

    async def post(line: str) -> None:
        try:
            await channel.send(_clip(line, MESSAGE_LIMIT), allowed_mentions=NO_MENTIONS)
        except discord.HTTPException as exc:
            log.warning("could not post training progress: %s", exc)

    return post


async def _reply(interaction: discord.Interaction, text: str) -> None:
    """The interaction's one (private) follow-up."""
    await interaction.followup.send(
        _clip(text, MESSAGE_LIMIT) or "Done.", ephemeral=True, allowed_mentions=NO_MENTIONS
    )


async def _announce(interaction: discord.Interaction, text: str) -> None:
    """Tell the whole channel about a change (best effort)."""
    channel = interaction.channel
    if isinstance(channel, discord.abc.Messageable):
        with contextlib.suppress(discord.HTTPException):
            await channel.send(text, allowed_mentions=NO_MENTIONS)


def _scope(interaction: discord.Interaction) -> str:
    """The scope of the server the interaction comes from."""
    return guild_scope(interaction.guild_id or 0)


def _channel_key(interaction: discord.Interaction) -> str:
    return str(interaction.channel_id)


def _who(interaction: discord.Interaction) -> str:
    return discord.utils.escape_markdown(interaction.user.display_name)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
