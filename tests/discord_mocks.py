"""Discord objects for the cog tests: `spec_set` autospecs, so a misspelt attribute fails."""

from __future__ import annotations

from unittest.mock import MagicMock, create_autospec

import discord

from bot.sender import WEBHOOK_NAME
from neeko.settings import DiscordSettings

HOME_GUILD = 5
"""The server `DISCORD_GUILD_ID` of `SETTINGS`: the only one where a role counts by name."""
OTHER_GUILD = 6


def make_role(name: str, role_id: int):
    role = create_autospec(discord.Role, instance=True, spec_set=True)
    role.name, role.id = name, role_id
    return role


def make_guild(guild_id: int = HOME_GUILD):
    guild = create_autospec(discord.Guild, instance=True, spec_set=True)
    guild.id = guild_id
    return guild


def make_member(
    *, user_id=1, name="Alice", manage_guild=False, roles=(), bot=False, guild=None, guild_id=None
):
    """A member of `guild` (else of a server `guild_id`, by default `HOME_GUILD`)."""
    member = create_autospec(discord.Member, instance=True, spec_set=True)
    member.id, member.display_name, member.bot = user_id, name, bot
    member.guild = guild or make_guild(HOME_GUILD if guild_id is None else guild_id)
    member.guild_permissions = discord.Permissions(manage_guild=manage_guild)
    member.roles = list(roles)
    return member


def make_user(*, user_id=1, name="Alice", bot=False):
    """A user outside any guild (a DM), or a webhook's owner."""
    user = create_autospec(discord.User, instance=True, spec_set=True)
    user.id, user.display_name, user.bot = user_id, name, bot
    return user


def make_webhook(name=WEBHOOK_NAME, owner_id=999):
    hook = create_autospec(discord.Webhook, instance=True, spec_set=True)
    hook.name, hook.token, hook.channel_id = name, "token", 100
    hook.user = make_user(user_id=owner_id, name="Neeko", bot=True)
    hook.send.side_effect = lambda *a, **k: create_autospec(
        discord.WebhookMessage, instance=True, spec_set=True
    )
    return hook


def make_channel(*, channel_id=100, manage_webhooks=True, existing=(), guild_id=HOME_GUILD):
    """A text channel of the server `guild_id`."""
    channel = create_autospec(discord.TextChannel, instance=True, spec_set=True)
    channel.id = channel_id
    guild = make_guild(guild_id)
    guild.me = make_member(user_id=999, name="Neeko", bot=True, guild=guild)
    channel.guild = guild
    channel.permissions_for.return_value = discord.Permissions(manage_webhooks=manage_webhooks)
    channel.webhooks.return_value = list(existing)
    channel.create_webhook.return_value = make_webhook()
    channel.send.side_effect = lambda *a, **k: create_autospec(
        discord.Message, instance=True, spec_set=True
    )
    return channel


def make_message(
    content="Ahoy, captain!",
    *,
    author=None,
    channel=None,
    webhook_id=None,
    dm=False,
    kind=discord.MessageType.default,
    message_id=555,
    reply_to=None,
):
    """A message; `reply_to` is the id of the message it replies to."""
    channel = channel or make_channel()
    message = create_autospec(discord.Message, instance=True, spec_set=True)
    message.id, message.content, message.clean_content = message_id, content, content
    message.reference = (
        None if reply_to is None else discord.MessageReference(message_id=reply_to, channel_id=1)
    )
    message.author = author or make_member(guild=channel.guild)
    message.channel, message.guild = channel, None if dm else channel.guild
    message.webhook_id, message.type = webhook_id, kind
    return message


def make_interaction(user=None, channel=None):
    """An interaction and the ordered list of its responses ("defer", "followup").

    It comes from the channel's server (`HOME_GUILD` by default), and so does its default user.
    """
    events: list[str] = []
    interaction = create_autospec(discord.Interaction, instance=True, spec_set=True)
    interaction.channel = channel or make_channel()
    interaction.channel_id = interaction.channel.id
    interaction.guild = interaction.channel.guild
    interaction.guild_id = interaction.guild.id
    interaction.user = user or make_member(guild=interaction.guild)
    interaction.response = create_autospec(
        discord.InteractionResponse, instance=True, spec_set=True
    )
    interaction.followup = create_autospec(discord.Webhook, instance=True, spec_set=True)
    interaction.response.defer.side_effect = lambda **k: events.append("defer")
    interaction.followup.send.side_effect = lambda *a, **k: events.append("followup")
    return interaction, events


def forbidden() -> discord.Forbidden:
    return discord.Forbidden(MagicMock(status=403, reason="Forbidden"), "Missing Permissions")


def answered_once(interaction, events) -> dict:
    """Assert defer, then exactly one follow-up, both private; return the follow-up's kwargs."""
    assert events == ["defer", "followup"]
    assert interaction.response.defer.await_args.kwargs["ephemeral"] is True
    kwargs = interaction.followup.send.await_args.kwargs
    assert kwargs["ephemeral"] is True
    return kwargs


def followup_text(interaction) -> str:
    return interaction.followup.send.await_args.args[0]


class NoMentions:
    """Equal to `AllowedMentions.none()` (AllowedMentions has no `__eq__`)."""

    def __eq__(self, other):
        none = discord.AllowedMentions.none().to_dict()
        return isinstance(other, discord.AllowedMentions) and other.to_dict() == none

    def __repr__(self):
        return "NoMentions()"


NO_MENTIONS = NoMentions()
SETTINGS = DiscordSettings(token="x", moderator_role="Keeper", guild_id=HOME_GUILD)
"""The role "Keeper" makes moderators by name in `HOME_GUILD` only."""
