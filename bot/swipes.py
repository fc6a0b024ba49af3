"""Swipe buttons under a channel's latest replies: re-roll, and browse the versions.

The buttons carry the reply's stored id in their custom ids, and are `DynamicItem`s: they
work after a restart, with no view kept in memory. The chat service decides who may press
them (people who wrote in the conversation) and which replies may change (the latest).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import discord

from bot.checks import author_of
from bot.sender import MESSAGE_LIMIT, NO_MENTIONS

if TYPE_CHECKING:
    from neeko.chat import ChatService
    from neeko.chat_types import Answer
    from neeko.settings import DiscordSettings

log = logging.getLogger(__name__)

ACTIONS = {"prev": ("◀", -1), "next": ("▶", 1), "regen": ("↻", 0)}


class SwipeButton(
    discord.ui.DynamicItem[discord.ui.Button],
    template=re.compile(r"neeko:swipe:(?P<action>prev|next|regen):(?P<ref>\d{1,18})"),
):
    """One button of a reply's swipe row."""

    def __init__(self, action: str, ref: int, disabled: bool = False) -> None:
        label, _ = ACTIONS[action]
        super().__init__(
            discord.ui.Button(
                label=label,
                style=discord.ButtonStyle.secondary,
                custom_id=f"neeko:swipe:{action}:{ref}",
                disabled=disabled,
            )
        )
        self.action, self.ref = action, ref

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /
    ) -> SwipeButton:
        """Rebuild the button from its custom id (also after a restart)."""
        return cls(match["action"], int(match["ref"]))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        """Re-roll or browse through the bot's chat service."""
        bot = interaction.client
        await press(bot.service, bot.settings, interaction, self.action, self.ref)


def swipe_view(ref: int, shown: int = 1, total: int = 1) -> discord.ui.View:
    """The row under a reply: previous, "shown/total", next, re-roll."""
    view = discord.ui.View(timeout=None)
    view.add_item(SwipeButton("prev", ref, disabled=shown <= 1))
    view.add_item(
        discord.ui.Button(label=f"{shown}/{total}", custom_id=f"neeko:shown:{ref}", disabled=True)
    )
    view.add_item(SwipeButton("next", ref, disabled=shown >= total))
    view.add_item(SwipeButton("regen", ref))
    return view


async def press(
    service: ChatService,
    settings: DiscordSettings,
    interaction: discord.Interaction,
    action: str,
    ref: int,
) -> Answer:
    """Handle a swipe button press.

    The reply's message is edited in place, or the presser is told privately why not.
    """
    await interaction.response.defer()  # a component's deferral: the message is edited later
    channel = str(interaction.channel_id)
    author = author_of(interaction.user, settings, interaction.guild_id)
    if action == "regen":
        answer = await service.regenerate(channel, author, ref)
    else:
        answer = await service.swipe(channel, author, ref, ACTIONS[action][1])
    if not answer.ok:
        await interaction.followup.send(
            answer.text[:MESSAGE_LIMIT], ephemeral=True, allowed_mentions=NO_MENTIONS
        )
        return answer
    shown, total = answer.alternative or (1, 1)
    text = answer.text if len(answer.text) <= MESSAGE_LIMIT else answer.text[:1999] + "…"
    try:
        await interaction.edit_original_response(
            content=text, view=swipe_view(ref, shown, total), allowed_mentions=NO_MENTIONS
        )
    except discord.HTTPException as exc:
        log.warning("could not show version %d of reply %d: %s", shown, ref, exc)
    return answer
