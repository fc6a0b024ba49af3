"""Who may do what: the moderator check and the `Author` a Discord user maps to."""

from __future__ import annotations

import discord

from neeko.chat_types import Author
from neeko.settings import DiscordSettings


def is_moderator(user: discord.abc.User, settings: DiscordSettings) -> bool:
    """Whether `user` may submit and train characters.

    A moderator is a guild member with Manage Server, or with the role named by
    `settings.moderator_role` (its exact name or its id). Outside a guild nobody is.
    """
    if not isinstance(user, discord.Member):
        return False
    if user.guild_permissions.manage_guild:
        return True
    wanted = settings.moderator_role.strip()
    return bool(wanted) and any(wanted in (role.name, str(role.id)) for role in user.roles)


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


def author_of(user: discord.abc.User, settings: DiscordSettings) -> Author:
    """The chat service's view of a Discord user."""
    return Author(id=str(user.id), name=user.display_name, moderator=is_moderator(user, settings))
