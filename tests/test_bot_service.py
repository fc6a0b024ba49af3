"""The cogs over the real chat service and moderation: a SQLite file, the in-process worker,
the tiny model.

Only Discord is mocked (`spec_set` autospecs); every answer comes from `ChatService` or
`Moderation`.
"""

import asyncio
import json
from unittest.mock import create_autospec

import discord
import pytest
from conftest import NAMES
from discord_mocks import (
    HOME_GUILD,
    NO_MENTIONS,
    SETTINGS,
    answered_once,
    followup_text,
    make_channel,
    make_interaction,
    make_member,
    make_message,
)
from sqlalchemy import select

from bot.cogs.characters import CharactersCog
from bot.cogs.chat import ChatCog
from bot.sender import WebhookCache
from neeko import db
from neeko.characters import guild_scope
from neeko.wiring import open_services

HOME = guild_scope(HOME_GUILD)
"""The scope of the server the default interactions and messages come from."""

MODERATOR = {"manage_guild": True}
CARD = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Nell Harrow",
        "description": "Nell Harrow keeps the lighthouse on Gull Rock and dislikes visitors.",
        "first_mes": "Who rowed you out here?",
    },
}


@pytest.fixture
async def services(chat_settings):
    """(chat service, moderation) as the bot opens them."""
    settings = chat_settings.model_copy(update={"reply_tokens": 8, "max_message_chars": 100})
    async with open_services(settings) as services:
        yield services


@pytest.fixture
def service(services):
    return services[0]


@pytest.fixture
def cogs(services):
    service, moderation = services
    webhooks = WebhookCache()
    return (
        CharactersCog(service, moderation, SETTINGS, webhooks),
        ChatCog(service, SETTINGS, webhooks=webhooks),
    )


def _attachment(data: bytes, filename: str):
    file = create_autospec(discord.Attachment, instance=True, spec_set=True)
    file.size, file.filename = len(data), filename
    file.read.return_value = data
    return file


async def _rows(service, channel="100"):
    async with service.sessions() as s:
        rows = await s.scalars(
            select(db.MessageRow).where(db.MessageRow.channel_id == channel).order_by("id")
        )
        return [(r.role, r.author_name, r.content) for r in rows]


def _posts(channel) -> list[list[str]]:
    """[username, text] of every post through the channel's webhook, kept up to date by edits
    (an edit that only changes the buttons leaves the text)."""
    posts: list[list[str]] = []

    def send(text, **kwargs):
        assert kwargs["allowed_mentions"] == NO_MENTIONS
        post = [kwargs["username"], text]
        posts.append(post)
        message = create_autospec(discord.WebhookMessage, instance=True, spec_set=True)
        message.edit.side_effect = lambda **k: post.__setitem__(1, k.get("content", post[1]))
        return message

    channel.create_webhook.return_value.send.side_effect = send
    return posts


async def test_message_is_answered_by_the_character_through_the_webhook(service, cogs):
    characters, chat = cogs
    channel = make_channel()
    posts = _posts(channel)
    interaction, events = make_interaction(channel=channel)
    await characters.become.callback(characters, interaction, "birch")
    answered_once(interaction, events)
    assert "Birch" in followup_text(interaction)
    message = make_message("Hello there!", channel=channel, author=make_member(name="Ann"))
    await chat.on_message(message)
    message.reply.assert_not_awaited()  # no error
    rows = await _rows(service)
    assert rows[0] == ("user", "Ann", "Hello there!")
    assert rows[1][:2] == ("character", "Birch")
    assert posts == [["Birch", rows[1][2]]]  # streamed, then edited to the stored reply


async def test_unknown_character_gets_suggestions_and_changes_nothing(service, cogs):
    characters, _ = cogs
    interaction, events = make_interaction()
    await characters.become.callback(characters, interaction, "Birhc")
    answered_once(interaction, events)
    assert "Birch" in followup_text(interaction)
    interaction.channel.send.assert_not_awaited()  # nothing announced
    assert (await service.speaker("100", HOME)).name == NAMES[0]


async def test_non_moderator_card_is_refused_and_nothing_is_added(service, cogs):
    characters, _ = cogs
    card = _attachment(json.dumps(CARD).encode(), "nell.json")
    interaction, events = make_interaction(make_member())
    await characters.submit.callback(characters, interaction, card=card)
    answered_once(interaction, events)
    assert "moderators" in followup_text(interaction)
    card.read.assert_not_awaited()
    assert service.catalog.find("Nell Harrow") is None  # in no scope at all
    async with service.sessions() as s:
        assert (await s.scalars(select(db.CharacterRow))).all() == []


@pytest.mark.parametrize(
    ("data", "filename", "why"),
    [
        (b"{not json", "nell.json", "not added"),
        (json.dumps({"spec": "chara_card_v2", "data": {"name": ""}}).encode(), "x.json", "name"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "nell.png", "not added"),
    ],
)
async def test_malformed_card_is_refused_with_its_reason(service, cogs, data, filename, why):
    characters, _ = cogs
    interaction, events = make_interaction(make_member(**MODERATOR))
    await characters.submit.callback(characters, interaction, card=_attachment(data, filename))
    answered_once(interaction, events)
    assert why in followup_text(interaction)
    assert len(service.catalog.characters) == len(NAMES)


async def test_moderator_card_is_playable_at_once_and_greets(service, cogs):
    characters, chat = cogs
    channel = make_channel()
    posts = _posts(channel)
    interaction, events = make_interaction(make_member(**MODERATOR), channel)
    card = _attachment(json.dumps(CARD).encode(), "nell.json")
    await characters.submit.callback(characters, interaction, card=card)
    answered_once(interaction, events)
    assert "playable now" in followup_text(interaction)
    nell = service.catalog.find("Nell Harrow", HOME)
    assert (nell.scope, nell.key) == (HOME, f"g{HOME_GUILD}.nell_harrow")  # this server's own
    interaction, _ = make_interaction(make_member(), channel)
    await characters.become.callback(characters, interaction, "nell harrow")
    assert posts == [["Nell Harrow", "Who rowed you out here?"]]
    await chat.on_message(make_message("Just me.", channel=channel))
    rows = await _rows(service)
    assert [r[:2] for r in rows] == [
        ("character", "Nell Harrow"),
        ("user", "Alice"),
        ("character", "Nell Harrow"),
    ]
    assert posts[1] == ["Nell Harrow", rows[2][2]]


async def test_two_messages_at_once_are_answered_in_order(service, cogs):
    _, chat = cogs
    channel = make_channel()
    posts = _posts(channel)
    first = make_message("first", channel=channel, author=make_member(name="Ann"), message_id=1)
    second = make_message("second", channel=channel, author=make_member(name="Bob"), message_id=2)
    await asyncio.gather(chat.on_message(first), chat.on_message(second))
    rows = await _rows(service)
    assert [r[:2] for r in rows] == [
        ("user", "Ann"),
        ("character", NAMES[0]),
        ("user", "Bob"),
        ("character", NAMES[0]),
    ]
    assert posts == [[NAMES[0], rows[1][2]], [NAMES[0], rows[3][2]]]


async def test_message_over_the_limit_is_refused_and_not_stored(service, cogs):
    _, chat = cogs
    message = make_message("x" * 101)
    await chat.on_message(message)
    message.reply.assert_awaited_once()
    assert "limit is 100" in message.reply.await_args.args[0]
    message.channel.create_webhook.assert_not_awaited()
    assert await _rows(service) == []
