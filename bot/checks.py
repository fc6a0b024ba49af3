"""Who may do what: the moderator check and the `Author` a Discord user maps to."""

from __future__ import annotations

import discord

from neeko.characters import guild_scope
from neeko.chat_types import Author
from neeko.settings import DiscordSettings


def is_moderator(user: discord.abc.User, settings: DiscordSettings) -> bool:
    """Whether `user` may submit and train the characters of the server it acts in.

    A moderator is a guild member with Manage Server, or with the role `moderator_role`:
    by its id anywhere (ids are unique), by its name only in the server `guild_id` (any
    server can make a role of any name). Outside a guild nobody is; owners always are.
    """
    if is_owner(user, settings):
        return True
    if not isinstance(user, discord.Member):
        return False
    if user.guild_permissions.manage_guild:
        return True
    wanted = settings.moderator_role.strip()
    home = settings.guild_id is not None and user.guild.id == settings.guild_id
    return bool(wanted) and any(
        wanted == str(role.id) or (home and wanted == role.name) for role in user.roles
    )


def is_owner(user: discord.abc.User, settings: DiscordSettings) -> bool:
    """Whether `user` is one of the bot's owners (`DISCORD_OWNER_IDS`)."""
    return user.id in settings.owner_ids


def chats_in(channel: object, settings: DiscordSettings) -> bool:
    """Whether characters speak in `channel`: any, unless `settings.channels` lists some.

    A thread counts as its parent channel.
    """
    if not settings.channels:
        return True
    ids = {getattr(channel, "id", None)}
    if isinstance(channel, discord.Thread):
        ids.add(channel.parent_id)
    return not ids.isdisjoint(settings.channels)


def where_characters_speak(settings: DiscordSettings) -> str:
    """The refusal for a channel outside `settings.channels`, naming the channels."""
    names = ", ".join(f"<#{i}>" for i in sorted(settings.channels))
    return f"Characters don't speak in this channel; try {names}."


def author_of(
    user: discord.abc.User, settings: DiscordSettings, guild_id: int | None = None
) -> Author:
    """The chat service's view of a Discord user acting in the server `guild_id`."""
    guild = guild_id if guild_id is not None else getattr(getattr(user, "guild", None), "id", 0)
    return Author(
        id=str(user.id),
        name=user.display_name,
        moderator=is_moderator(user, settings),
        owner=is_owner(user, settings),
        scope=guild_scope(guild or 0),
    )
