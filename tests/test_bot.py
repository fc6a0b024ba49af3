"""The Discord front end: cogs called directly with spec'd mocks over fake chat services."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import itertools
import os
import random
import re
import signal
import sys
import types
from pathlib import Path
from unittest.mock import AsyncMock, create_autospec

import discord
import pytest
from discord_mocks import (
    HOME_GUILD,
    NO_MENTIONS,
    OTHER_GUILD,
    SETTINGS,
    answered_once,
    followup_text,
    forbidden,
    make_channel,
    make_interaction,
    make_member,
    make_message,
    make_role,
    make_user,
    make_webhook,
)
from pydantic import ValidationError

from bot.app import NeekoBot, run
from bot.checks import author_of, chats_in, is_moderator
from bot.cogs.characters import MAX_CARD_BYTES, CharactersCog, characters_embed
from bot.cogs.chat import ChatCog
from bot.sender import WebhookCache, split_message
from bot.swipes import SwipeButton, press
from neeko.chat_types import Answer, Author, CharacterInfo, Speaker
from neeko.settings import ChatSettings, DiscordSettings

MARA = Speaker("Captain Mara Vell", "https://example.com/mara.png")
NAMES = [f"Character {i:02d}" for i in range(40)]
HOME = f"guild:{HOME_GUILD}"
"""The scope of the server the default interactions and messages come from."""
ENV_EXAMPLE = Path(__file__).resolve().parent.parent / ".env.example"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Recorder:
    """Records every call as (method, arguments)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def _record(self, method: str, /, **kwargs) -> None:
        self.calls.append((method, kwargs))

    def called(self, name: str) -> list[dict]:
        return [kwargs for call, kwargs in self.calls if call == name]


class FakeChatService(_Recorder):
    """Exactly the `ChatService` API the bot uses; records every call."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        super().__init__()
        self.clock = clock or FakeClock()
        self.stream: list[tuple[float, str]] = []
        """(seconds later, text so far) pairs that `handle_message` streams through on_text."""
        self.streaming = MARA
        """Who speaks in the streamed text (given to on_text with it)."""
        self.answer: Answer | None = None
        self.become_answer: Answer | None = None

    async def handle_message(
        self, channel, author, content, message_id, on_text=None, reply_to=None
    ):
        self._record(
            "handle_message",
            channel=channel,
            author=author,
            content=content,
            message_id=message_id,
            reply_to=reply_to,
        )
        for delay, text in self.stream:
            self.clock.now += delay
            if on_text is not None:
                await on_text(self.streaming, text)
        return self.answer or Answer(True, "Ahoy!", speaker=MARA, kind="reply")

    async def become(self, channel, author, text):
        self._record("become", channel=channel, author=author, text=text)
        if self.become_answer is not None:
            return self.become_answer
        if text in ("Marra", "Mara Vel"):
            return Answer(
                False,
                "No character named Marra."
                if text == "Marra"
                else "Did you mean: Captain Mara Vell?",
                suggestions=["Captain Mara Vell"],
                private=True,
                kind="error",
            )
        greeting = "Ahoy, matey!" if text == "Mara" else ""
        return Answer(True, f"{text} now speaks here.", speaker=Speaker(text), greeting=greeting)

    async def characters(self, scope):
        self._record("characters", scope=scope)
        return [CharacterInfo("mara", "Captain Mara Vell", ("Mara",), "trained", "A pirate.")]

    def autocomplete(self, prefix, scope, limit=25):
        self._record("autocomplete", prefix=prefix, scope=scope, limit=limit)
        return list(NAMES)  # more than asked: the cog must still cap at 25

    async def reset(self, channel, author):
        self._record("reset", channel=channel, author=author)
        return Answer(True, "History cleared.")

    async def speaker(self, channel, scope):
        self._record("speaker", channel=channel, scope=scope)
        return MARA

    async def regenerate(self, channel, author, ref=None, on_text=None):
        self._record("regenerate", channel=channel, author=author, ref=ref)
        if author.id == "9":
            return Answer(False, "Only people who wrote here can.", private=True, kind="error")
        return Answer(True, "Yarr, again!", speaker=MARA, kind="reply", ref=ref, alternative=(2, 2))

    async def swipe(self, channel, author, ref, step):
        self._record("swipe", channel=channel, author=author, ref=ref, step=step)
        return Answer(True, "Ahoy!", speaker=MARA, kind="reply", ref=ref, alternative=(1, 2))

    async def memory(self, channel, scope):
        self._record("memory", channel=channel, scope=scope)
        return Answer(True, "Mara recalled:\n  Ann: my cat is Pickles")

    async def mark_posted(self, channel, ref, posted_id):
        self._record("mark_posted", channel=channel, ref=ref, posted_id=posted_id)

    async def scene_add(self, channel, author, text):
        self._record("scene_add", channel=channel, author=author, text=text)
        return Answer(True, f"{text} joins the scene.", speaker=Speaker(text))

    async def scene_remove(self, channel, author, text):
        self._record("scene_remove", channel=channel, author=author, text=text)
        return Answer(False, f"No {text!r} in this scene.", private=True, kind="error")

    async def scene_mode(self, channel, author, mode):
        self._record("scene_mode", channel=channel, author=author, mode=mode)
        return Answer(True, f"Scene mode: {mode}.")

    async def scene(self, channel, scope):
        self._record("scene", channel=channel, scope=scope)
        return Answer(True, "In this scene: Captain Mara Vell, Gray. Mode: all.")

    async def scene_names(self, channel, scope):
        self._record("scene_names", channel=channel, scope=scope)
        return ["Captain Mara Vell", "Inspector Edmund Gray"]


class FakeModeration(_Recorder):
    """Exactly the `Moderation` API the bot uses; records every call."""

    def __init__(self) -> None:
        super().__init__()
        self.on_progress = None
        self.announce = None
        """Set by the bot (as `Moderation.announce` is)."""

    async def submit(
        self,
        author,
        *,
        card=None,
        filename="",
        name=None,
        profile=None,
        greeting="",
        shared=False,
    ):
        self._record(
            "submit",
            author=author,
            card=card,
            filename=filename,
            name=name,
            profile=profile,
            greeting=greeting,
            shared=shared,
        )
        return Answer(True, "Added.", private=True)

    async def train(self, author, name, channel, dialogues=None, on_progress=None):
        self._record("train", author=author, name=name, channel=channel, dialogues=dialogues)
        self.on_progress = on_progress
        return Answer(True, "Queued.", private=True)

    async def status(self, author, name):
        self._record("status", author=author, name=name)
        return Answer(True, f"{name}: trained.")


@pytest.fixture
def service():
    return FakeChatService()


@pytest.fixture
def moderation():
    return FakeModeration()


@pytest.fixture
def cog(service, moderation):
    return CharactersCog(service, moderation, SETTINGS)


@pytest.fixture
def chat(service):
    return ChatCog(service, SETTINGS, clock=service.clock)


# --- split_message ---------------------------------------------------------------------------


def _normalized(text: str) -> str:
    return re.sub(r"\s", "", re.sub(r"```[\w+#.-]*", "", text))


def assert_good_split(text: str, chunks: list[str], limit: int) -> None:
    assert all(0 < len(chunk) <= limit for chunk in chunks)
    assert all(chunk.count("```") % 2 == 0 for chunk in chunks)
    assert _normalized("\n".join(chunks)) == _normalized(text)


def test_split_short_text_is_one_chunk():
    assert split_message("Ahoy!") == ["Ahoy!"]
    assert split_message("x" * 2000) == ["x" * 2000]
    assert split_message("   ") == []


def test_split_prefers_newlines_then_spaces():
    lines = [f"line {i} " + "word " * 10 for i in range(100)]
    chunks = split_message("\n".join(lines))
    assert len(chunks) > 1
    assert all(line in lines for chunk in chunks for line in chunk.split("\n"))
    words = " ".join(f"w{i}" for i in range(1500))
    chunks = split_message(words)
    assert len(chunks) > 1
    assert " ".join(chunks) == words


def test_split_long_code_block_reopens_fence_with_language():
    code = "\n".join(f"x_{i} = compute({i}) + offset  # step {i}" for i in range(130))
    assert len(code) > 5000
    text = f"Here you go:\n```python\n{code}\n```\nFair winds!"
    chunks = split_message(text)
    assert len(chunks) >= 3
    assert_good_split(text, chunks, 2000)
    assert all(chunk.startswith("```python\n") for chunk in chunks[1:])
    assert all(chunk.endswith("\n```") for chunk in chunks[:-1])
    assert chunks[-1].endswith("Fair winds!")


def test_split_unbroken_line_in_fence():
    text = "```\n" + "a" * 5000 + "\n```"
    chunks = split_message(text)
    assert_good_split(text, chunks, 2000)


@pytest.mark.parametrize("seed", range(40))
def test_split_random_texts(seed):
    rng = random.Random(seed)
    parts = []
    for _ in range(rng.randint(1, 60)):
        roll = rng.random()
        if roll < 0.15:
            body = "\n".join(
                " ".join("tok" * rng.randint(1, 4) for _ in range(rng.randint(1, 9)))
                for _ in range(rng.randint(1, 30))
            )
            parts.append(f"```{rng.choice(['', 'py', 'c++'])}\n{body}\n```")
        elif roll < 0.2:
            parts.append("z" * rng.randint(50, 300))
        else:
            parts.append(" ".join("word" for _ in range(rng.randint(1, 40))))
    text = "\n".join(parts)
    limit = rng.choice([64, 100, 300, 2000])
    assert_good_split(text, split_message(text, limit), limit)


def test_split_rejects_tiny_limit():
    with pytest.raises(ValueError, match="limit"):
        split_message("x", 10)


# --- checks ----------------------------------------------------------------------------------


def test_moderator_by_manage_guild_or_role_name_or_id():
    assert is_moderator(make_member(manage_guild=True), SETTINGS)
    assert is_moderator(make_member(roles=[make_role("Keeper", 7)]), SETTINGS)
    by_id = DiscordSettings(token="x", moderator_role="7")
    assert is_moderator(make_member(roles=[make_role("Other", 7)]), by_id)
    assert not is_moderator(make_member(roles=[make_role("Crew", 8)]), SETTINGS)
    no_role = DiscordSettings(token="x", moderator_role="")
    assert not is_moderator(make_member(roles=[make_role("", 9)]), no_role)
    assert not is_moderator(make_user(), SETTINGS)  # outside a guild


def test_a_role_counts_by_name_only_in_the_home_guild_but_by_id_in_any():
    keeper = make_role("Keeper", 7)
    assert is_moderator(make_member(guild_id=HOME_GUILD, roles=[keeper]), SETTINGS)
    # any server can make a role called "Keeper": elsewhere its name gives no rights
    assert not is_moderator(make_member(guild_id=OTHER_GUILD, roles=[keeper]), SETTINGS)
    no_home = SETTINGS.model_copy(update={"guild_id": None})
    assert not is_moderator(make_member(guild_id=HOME_GUILD, roles=[keeper]), no_home)
    by_id = SETTINGS.model_copy(update={"moderator_role": "7"})
    for guild in (HOME_GUILD, OTHER_GUILD):
        assert is_moderator(make_member(guild_id=guild, roles=[make_role("Other", 7)]), by_id)
    # ...and a role whose *name* is the id is just a name: it counts only at home
    named_like_id = make_role("7", 8)
    assert not is_moderator(make_member(guild_id=OTHER_GUILD, roles=[named_like_id]), by_id)
    assert is_moderator(make_member(guild_id=HOME_GUILD, roles=[named_like_id]), by_id)
    # Manage Server counts in any server
    assert is_moderator(make_member(guild_id=OTHER_GUILD, manage_guild=True), SETTINGS)


def test_author_of_member():
    member = make_member(user_id=42, name="Bea", roles=[make_role("Keeper", 1)])
    assert author_of(member, SETTINGS) == Author(
        id="42", name="Bea", moderator=True, owner=False, scope=f"guild:{HOME_GUILD}"
    )


def test_author_of_gives_the_guild_scope_and_owners():
    owners = SETTINGS.model_copy(update={"owner_ids": frozenset({42, 43})})
    plain = author_of(make_member(user_id=1, guild_id=5), owners)
    assert (plain.scope, plain.owner, plain.moderator) == ("guild:5", False, False)
    assert author_of(make_member(guild_id=OTHER_GUILD), owners).scope == f"guild:{OTHER_GUILD}"
    # the interaction's guild, where given, is the scope
    assert author_of(make_member(guild_id=5), owners, 9).scope == "guild:9"
    # an owner is a moderator in every server, even one without the moderator role
    for guild in (HOME_GUILD, OTHER_GUILD):
        owner = author_of(make_member(user_id=42, name="Olga", guild_id=guild), owners)
        assert owner == Author("42", "Olga", moderator=True, owner=True, scope=f"guild:{guild}")
    assert is_moderator(make_user(user_id=43), owners)  # and even outside a guild
    assert not is_moderator(make_user(user_id=44), owners)
    assert not author_of(make_member(user_id=42, guild_id=5), SETTINGS).owner


def test_id_settings_read_ids_split_by_commas(monkeypatch):
    monkeypatch.setenv("DISCORD_TOKEN", "x")
    monkeypatch.setenv("DISCORD_CHANNELS", "12, 34 56")
    monkeypatch.setenv("DISCORD_OWNER_IDS", "7,8")
    settings = DiscordSettings()
    assert settings.channels == {12, 34, 56}
    assert settings.owner_ids == {7, 8}
    monkeypatch.setenv("DISCORD_CHANNELS", "12,general")
    with pytest.raises(ValidationError, match="channels"):
        DiscordSettings()
    monkeypatch.setenv("DISCORD_OWNER_IDS", "7,me")
    monkeypatch.delenv("DISCORD_CHANNELS")
    with pytest.raises(ValidationError, match="owner_ids"):
        DiscordSettings()
    monkeypatch.delenv("DISCORD_OWNER_IDS")
    assert DiscordSettings().channels == frozenset()
    assert DiscordSettings().owner_ids == frozenset()


@pytest.mark.parametrize("section", [ChatSettings, DiscordSettings])
def test_every_setting_is_documented_in_env_example(section):
    documented = set(re.findall(r"^([A-Z_]+)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    prefix = section.model_config["env_prefix"]
    for name, field in section.model_fields.items():
        variable = field.validation_alias or f"{prefix}{name}".upper()
        assert variable in documented, f"{variable} is missing from .env.example"


def test_chats_in_listed_channels_and_their_threads():
    only = SETTINGS.model_copy(update={"channels": frozenset({200})})
    thread = create_autospec(discord.Thread, instance=True, spec_set=True)
    thread.id, thread.parent_id = 300, 200
    assert chats_in(make_channel(channel_id=100), SETTINGS)  # no list: everywhere
    assert not chats_in(make_channel(channel_id=100), only)
    assert chats_in(make_channel(channel_id=200), only)
    assert chats_in(thread, only)


# --- characters cog --------------------------------------------------------------------------


async def test_become_defers_then_follows_up_once(cog, service):
    interaction, events = make_interaction()
    await cog.become.callback(cog, interaction, "Mara")
    answered_once(interaction, events)
    (call,) = service.called("become")
    assert call == {"channel": "100", "author": Author("1", "Alice", scope=HOME), "text": "Mara"}
    interaction.channel.send.assert_awaited_once()
    announce = interaction.channel.send.await_args
    assert "Mara" in announce.args[0]
    assert announce.kwargs["allowed_mentions"] == NO_MENTIONS
    # the greeting is posted in the channel as the character, through the webhook
    hook = interaction.channel.create_webhook.return_value
    greeting = hook.send.await_args
    assert greeting.args[0] == "Ahoy, matey!"
    assert greeting.kwargs["username"] == "Mara"
    assert greeting.kwargs["allowed_mentions"] == NO_MENTIONS
    assert service.called("speaker") == []  # the answer said who speaks


async def test_become_and_reset_outside_the_listed_channels_change_nothing(service, moderation):
    settings = SETTINGS.model_copy(update={"channels": frozenset({200, 7})})
    cog = CharactersCog(service, moderation, settings)
    for command, args in ((cog.become, ("Mara",)), (cog.reset, ())):
        interaction, events = make_interaction()  # in channel 100
        await command.callback(cog, interaction, *args)
        answered_once(interaction, events)
        assert followup_text(interaction).endswith("try <#7>, <#200>.")
        interaction.channel.send.assert_not_awaited()
    assert service.calls == []
    assert moderation.calls == []


@pytest.mark.parametrize("name", ["Marra", "Mara Vel"])
async def test_become_unknown_name_lists_suggestions_privately(cog, name):
    interaction, events = make_interaction()
    await cog.become.callback(cog, interaction, name)
    answered_once(interaction, events)
    assert followup_text(interaction).count("Captain Mara Vell") == 1
    interaction.channel.send.assert_not_awaited()


async def test_autocomplete_returns_at_most_25_choices(cog, service):
    interaction, _ = make_interaction()
    choices = await cog.character_autocomplete(interaction, "Char")
    assert len(choices) == 25
    assert all(isinstance(c, discord.app_commands.Choice) for c in choices)
    assert choices[0].value == NAMES[0]
    assert service.called("autocomplete") == [{"prefix": "Char", "scope": HOME, "limit": 25}]


async def test_characters_lists_in_an_embed(cog, service):
    interaction, events = make_interaction()
    await cog.characters.callback(cog, interaction)
    kwargs = answered_once(interaction, events)
    assert "Captain Mara Vell" in kwargs["embed"].description
    assert service.called("characters") == [{"scope": HOME}]


def _from(guild: int, **member):
    """An interaction in a channel of the server `guild`, by one of its members."""
    channel = make_channel(guild_id=guild)
    return make_interaction(make_member(guild=channel.guild, **member), channel)[0]


async def test_chat_commands_pass_the_interactions_guild_scope(cog, service):
    service.become_answer = Answer(True, "Done.")  # no speaker: the cog asks who speaks
    for guild in (HOME_GUILD, OTHER_GUILD):
        await cog.characters.callback(cog, _from(guild))
        await cog.character_autocomplete(_from(guild), "Ma")
        await cog.become.callback(cog, _from(guild), "Mara")
        await cog.reset.callback(cog, _from(guild))
    scopes = [HOME, f"guild:{OTHER_GUILD}"]
    assert [c["scope"] for c in service.called("characters")] == scopes
    assert [c["scope"] for c in service.called("autocomplete")] == scopes
    assert service.called("speaker") == [{"channel": "100", "scope": s} for s in scopes]
    assert [c["author"].scope for c in service.called("become")] == scopes
    assert [c["author"].scope for c in service.called("reset")] == scopes


async def test_moderation_commands_pass_the_authors_guild_scope(cog, moderation):
    for guild in (HOME_GUILD, OTHER_GUILD):
        await cog.submit.callback(cog, _from(guild, manage_guild=True), name="Nell", profile="P.")
        await cog.train.callback(cog, _from(guild, manage_guild=True), "Nell", None)
        await cog.status.callback(cog, _from(guild), "Nell")
    scopes = [HOME, f"guild:{OTHER_GUILD}"]
    for method in ("submit", "train", "status"):
        assert [c["author"].scope for c in moderation.called(method)] == scopes, method
    assert [c["author"].moderator for c in moderation.called("status")] == [False, False]


def test_characters_embed_fits_discord_limits():
    infos = [CharacterInfo(f"c{i}", f"Name {i}", (), "fused", "d" * 300) for i in range(1000)]
    embed = characters_embed(infos)
    assert len(embed.description) <= 4096
    assert embed.description.endswith("more.")
    assert len(embed) <= 6000


async def test_reset_calls_service_and_announces(cog, service):
    interaction, events = make_interaction()
    await cog.reset.callback(cog, interaction)
    answered_once(interaction, events)
    assert service.called("reset") == [
        {"channel": "100", "author": Author("1", "Alice", scope=HOME)}
    ]
    interaction.channel.send.assert_awaited_once()


async def test_submit_refuses_non_moderator_without_calling_moderation(cog, service, moderation):
    card = create_autospec(discord.Attachment, instance=True, spec_set=True)
    card.size, card.filename = 100, "card.json"
    interaction, events = make_interaction(make_member(roles=[make_role("Crew", 3)]))
    await cog.submit.callback(cog, interaction, card=card)
    answered_once(interaction, events)
    assert "moderators" in followup_text(interaction)
    assert service.calls == []
    assert moderation.calls == []
    card.read.assert_not_awaited()


async def test_submit_refuses_a_role_named_like_the_moderator_role_elsewhere(cog, moderation):
    interaction = _from(OTHER_GUILD, roles=[make_role("Keeper", 3)])
    await cog.submit.callback(cog, interaction, name="Nell", profile="A lighthouse keeper.")
    assert "moderators" in followup_text(interaction)
    assert moderation.calls == []


async def test_submit_by_role_moderator_reads_the_card(cog, moderation):
    card = create_autospec(discord.Attachment, instance=True, spec_set=True)
    card.size, card.filename = 100, "mara.png"
    card.read.return_value = b"\x89PNG"
    interaction, events = make_interaction(make_member(roles=[make_role("Keeper", 3)]))
    await cog.submit.callback(cog, interaction, card=card, greeting=None)
    answered_once(interaction, events)
    (call,) = moderation.called("submit")
    assert call["author"].moderator
    assert call["author"].scope == HOME
    assert (call["card"], call["filename"], call["greeting"]) == (b"\x89PNG", "mara.png", "")
    assert call["shared"] is False


async def test_submit_fields_without_card(cog, moderation):
    interaction, events = make_interaction(make_member(manage_guild=True))
    await cog.submit.callback(cog, interaction, name="Nell", profile="A lighthouse keeper.")
    answered_once(interaction, events)
    (call,) = moderation.called("submit")
    assert (call["card"], call["name"], call["profile"]) == (None, "Nell", "A lighthouse keeper.")
    assert followup_text(interaction) == "Added."


async def test_submit_shared_is_passed_through(cog, moderation):
    owners = SETTINGS.model_copy(update={"owner_ids": frozenset({42})})
    cog = CharactersCog(cog.service, moderation, owners)
    interaction, events = make_interaction(make_member(user_id=42, guild_id=HOME_GUILD))
    await cog.submit.callback(cog, interaction, name="Nell", profile="P.", shared=True)
    answered_once(interaction, events)
    (call,) = moderation.called("submit")
    assert call["shared"] is True
    assert (call["author"].owner, call["author"].moderator) == (True, True)


async def test_submit_shared_by_a_moderator_is_left_to_moderation(cog, moderation):
    interaction = _from(HOME_GUILD, manage_guild=True)
    await cog.submit.callback(cog, interaction, name="Nell", profile="P.", shared=True)
    (call,) = moderation.called("submit")  # Moderation refuses a non-owner; the cog passes it on
    assert (call["shared"], call["author"].owner) == (True, False)


@pytest.mark.parametrize(("size", "filename"), [(MAX_CARD_BYTES + 1, "big.png"), (10, "x.exe")])
async def test_submit_refuses_bad_attachment_without_reading_it(cog, moderation, size, filename):
    card = create_autospec(discord.Attachment, instance=True, spec_set=True)
    card.size, card.filename = size, filename
    interaction, events = make_interaction(make_member(manage_guild=True))
    await cog.submit.callback(cog, interaction, card=card)
    answered_once(interaction, events)
    assert filename in followup_text(interaction)
    card.read.assert_not_awaited()
    assert moderation.calls == []


async def test_train_queues_and_posts_progress_in_channel(cog, moderation):
    data = create_autospec(discord.Attachment, instance=True, spec_set=True)
    data.size, data.filename = 100, "nell.jsonl"
    data.read.return_value = b'{"messages": []}\n'
    interaction, events = make_interaction(make_member(manage_guild=True))
    await cog.train.callback(cog, interaction, "Nell", data)
    answered_once(interaction, events)
    (call,) = moderation.called("train")
    assert (call["name"], call["channel"], call["dialogues"]) == (
        "Nell",
        "100",
        data.read.return_value,
    )
    assert (call["author"].moderator, call["author"].scope) == (True, HOME)
    await moderation.on_progress("step 10/58, loss 1.23 @everyone")
    interaction.channel.send.assert_awaited_once_with(
        "step 10/58, loss 1.23 @everyone", allowed_mentions=NO_MENTIONS
    )
    assert interaction.followup.send.await_count == 1  # progress never uses the interaction


async def test_train_refuses_non_moderator(cog, service, moderation):
    interaction, events = make_interaction()
    await cog.train.callback(cog, interaction, "Nell", None)
    answered_once(interaction, events)
    assert service.calls == []
    assert moderation.calls == []


async def test_status(cog, moderation):
    interaction, events = make_interaction()
    await cog.status.callback(cog, interaction, "Mara")
    answered_once(interaction, events)
    assert followup_text(interaction) == "Mara: trained."
    assert moderation.called("status") == [
        {"author": Author("1", "Alice", scope=HOME), "name": "Mara"}
    ]


# --- chat cog --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(lambda: make_message(author=make_member(bot=True)), id="bot"),
        pytest.param(lambda: make_message(webhook_id=123), id="webhook"),
        pytest.param(lambda: make_message(dm=True), id="dm"),
        pytest.param(lambda: make_message("  "), id="empty"),
        pytest.param(lambda: make_message(kind=discord.MessageType.pins_add), id="system"),
    ],
)
async def test_on_message_ignores(chat, service, message):
    message = message()
    await chat.on_message(message)
    assert service.calls == []
    message.channel.send.assert_not_awaited()
    message.channel.create_webhook.assert_not_awaited()


async def test_messages_outside_the_listed_channels_are_ignored(service):
    chat = ChatCog(service, SETTINGS.model_copy(update={"channels": frozenset({200})}))
    outside = make_message(channel=make_channel(channel_id=100))
    await chat.on_message(outside)
    assert service.calls == []
    outside.reply.assert_not_awaited()
    await chat.on_message(make_message(channel=make_channel(channel_id=200)))
    assert [c["channel"] for c in service.called("handle_message")] == ["200"]


async def test_reply_goes_through_cached_webhook_as_speaker(chat, service):
    channel = make_channel()
    await chat.on_message(make_message(channel=channel))
    (call,) = service.called("handle_message")
    assert (call["channel"], call["content"], call["message_id"]) == (
        "100",
        "Ahoy, captain!",
        "555",
    )
    assert call["author"] == Author("1", "Alice", scope=HOME)
    channel.create_webhook.assert_awaited_once()
    assert channel.create_webhook.await_args.kwargs["name"] == "Neeko"
    hook = channel.create_webhook.return_value
    hook.send.assert_awaited_once()
    args, kwargs = hook.send.await_args
    assert args == ("Ahoy!",)
    assert kwargs["username"] == MARA.name
    assert kwargs["avatar_url"] == MARA.avatar_url
    assert kwargs["allowed_mentions"] == NO_MENTIONS
    assert kwargs["wait"] is True
    channel.send.assert_not_awaited()
    await chat.on_message(make_message(channel=channel))
    channel.create_webhook.assert_awaited_once()  # cached per channel
    assert hook.send.await_count == 2
    assert service.called("speaker") == []


async def test_a_scenes_answers_are_posted_in_order_each_as_its_speaker(chat, service):
    gray = Speaker("Inspector Edmund Gray", "https://example.com/gray.png")
    bolt = Speaker("BOLT-7")
    channel = make_channel()
    hook = channel.create_webhook.return_value
    service.answer = Answer(True, "Ahoy!", speaker=MARA, kind="reply", ref=11)
    service.answer.more = [
        Answer(True, "Elementary.", speaker=gray, kind="reply", ref=12),
        Answer(False, "No reply: the turn timed out", speaker=bolt, kind="error"),
    ]
    message = make_message(channel=channel, reply_to=777)
    await chat.on_message(message)
    assert service.called("handle_message")[0]["reply_to"] == "777"
    sends = [(c.args[0], c.kwargs["username"]) for c in hook.send.await_args_list]
    assert sends == [("Ahoy!", MARA.name), ("Elementary.", gray.name)]
    posted = service.called("mark_posted")
    assert [(p["channel"], p["ref"]) for p in posted] == [("100", 11), ("100", 12)]
    assert all(p["posted_id"] for p in posted)
    message.reply.assert_awaited_once()  # the failed one says so, as the bot
    assert "timed out" in message.reply.await_args.args[0]


def _view_state(view):
    buttons = [getattr(c, "item", c) for c in view.children]  # a DynamicItem wraps its button
    return [(b.label, b.disabled) for b in buttons]


async def test_swipe_buttons_go_under_the_newest_replies_only(chat, service):
    channel = make_channel()
    hook = channel.create_webhook.return_value
    first = create_autospec(discord.WebhookMessage, instance=True, spec_set=True)
    second = create_autospec(discord.WebhookMessage, instance=True, spec_set=True)
    hook.send.side_effect = [first, second]
    service.answer = Answer(True, "Ahoy!", speaker=MARA, kind="reply", ref=11)
    await chat.on_message(make_message(channel=channel))
    (call,) = first.edit.await_args_list
    assert _view_state(call.kwargs["view"]) == [
        ("◀", True),
        ("1/1", True),
        ("▶", True),
        ("↻", False),
    ]
    service.answer = Answer(True, "Arr.", speaker=MARA, kind="reply", ref=12)
    await chat.on_message(make_message(channel=channel, message_id=556))
    assert first.edit.await_args_list[-1].kwargs == {"view": None}  # off the older reply
    regen = second.edit.await_args.kwargs["view"].children[3].item
    assert regen.custom_id == "neeko:swipe:regen:12"


async def test_pressing_regenerate_edits_the_reply_in_place(service):
    interaction, events = make_interaction()
    answer = await press(service, SETTINGS, interaction, "regen", 42)
    assert answer.ok
    assert service.called("regenerate")[0]["ref"] == 42
    kwargs = interaction.edit_original_response.await_args.kwargs
    assert kwargs["content"] == "Yarr, again!"
    assert _view_state(kwargs["view"]) == [("◀", False), ("2/2", True), ("▶", True), ("↻", False)]
    interaction, _ = make_interaction()
    await press(service, SETTINGS, interaction, "prev", 42)
    assert service.called("swipe")[0]["step"] == -1
    outsider = make_member(user_id=9, name="Eve")
    interaction, events = make_interaction(user=outsider)
    refused = await press(service, SETTINGS, interaction, "next", 42)
    assert refused.ok  # the fake lets browsing through; re-rolling is refused below
    interaction, events = make_interaction(user=outsider)
    refused = await press(service, SETTINGS, interaction, "regen", 42)
    assert not refused.ok
    interaction.edit_original_response.assert_not_awaited()
    assert interaction.followup.send.await_args.kwargs["ephemeral"] is True
    assert events == ["defer", "followup"]


async def test_swipe_buttons_are_rebuilt_from_their_custom_ids():
    button = SwipeButton("next", 7)
    match = SwipeButton.__discord_ui_compiled_template__.fullmatch(button.custom_id)
    rebuilt = await SwipeButton.from_custom_id(None, button.item, match)
    assert (rebuilt.action, rebuilt.ref) == ("next", 7)
    assert SwipeButton.__discord_ui_compiled_template__.fullmatch("neeko:swipe:drop:7") is None


async def test_scene_commands_call_the_service_and_announce_changes(cog, service):
    interaction, events = make_interaction()
    await cog.scene_add.callback(cog, interaction, "Gray")
    assert service.called("scene_add")[0]["text"] == "Gray"
    assert events == ["defer", "followup"]
    assert "joins the scene" in interaction.channel.send.await_args.args[0]
    interaction, _ = make_interaction()
    await cog.scene_remove.callback(cog, interaction, "Nobody")
    interaction.channel.send.assert_not_awaited()  # refused: nothing to announce
    assert "No 'Nobody'" in followup_text(interaction)
    interaction, _ = make_interaction()
    await cog.scene_mode.callback(cog, interaction, "auto")
    assert service.called("scene_mode")[0]["mode"] == "auto"
    interaction, _ = make_interaction()
    await cog.scene_show.callback(cog, interaction)
    assert "In this scene" in followup_text(interaction)
    interaction, _ = make_interaction()
    await cog.memory.callback(cog, interaction)
    assert service.called("memory")[0]["channel"] == "100"
    assert "Pickles" in followup_text(interaction)
    interaction, _ = make_interaction()
    choices = await cog.member_autocomplete(interaction, "gr")
    assert [c.value for c in choices] == ["Inspector Edmund Gray"]


async def test_chat_turns_carry_the_messages_guild_scope(chat, service):
    for guild in (HOME_GUILD, OTHER_GUILD):
        await chat.on_message(make_message(channel=make_channel(guild_id=guild)))
    authors = [c["author"] for c in service.called("handle_message")]
    assert [a.scope for a in authors] == [HOME, f"guild:{OTHER_GUILD}"]


async def test_streamed_reply_is_posted_as_the_speaker_given_with_the_text(chat, service):
    nova = Speaker("Nova", "https://example.com/nova.png")
    channel = make_channel()
    hook = channel.create_webhook.return_value
    sent = create_autospec(discord.WebhookMessage, instance=True, spec_set=True)
    hook.send.side_effect = lambda *a, **k: sent
    service.streaming = nova
    service.stream = [(0.0, "Greetings"), (2.0, "Greetings, traveller")]
    service.answer = Answer(True, "Greetings, traveller.", speaker=nova, kind="reply")
    await chat.on_message(make_message(channel=channel))
    # the first text is posted mid-stream, before the answer says who speaks
    hook.send.assert_awaited_once()
    args, kwargs = hook.send.await_args
    assert args == ("Greetings",)
    assert (kwargs["username"], kwargs["avatar_url"]) == (nova.name, nova.avatar_url)
    assert [c.kwargs["content"] for c in sent.edit.await_args_list] == [
        "Greetings, traveller",
        "Greetings, traveller.",
    ]
    channel.send.assert_not_awaited()
    assert service.called("speaker") == []


async def test_existing_own_webhook_is_reused():
    channel = make_channel(existing=[make_webhook(owner_id=5), make_webhook()])
    hook = await WebhookCache().get(channel)
    assert hook is channel.webhooks.return_value[1]
    channel.create_webhook.assert_not_awaited()


async def test_falls_back_to_channel_send_on_forbidden(chat):
    channel = make_channel()
    channel.create_webhook.side_effect = forbidden()
    await chat.on_message(make_message(channel=channel))
    channel.send.assert_awaited_once_with("Ahoy!", allowed_mentions=NO_MENTIONS)


async def test_no_manage_webhooks_posts_as_bot_without_trying(chat):
    channel = make_channel(manage_webhooks=False)
    await chat.on_message(make_message(channel=channel))
    channel.webhooks.assert_not_awaited()
    channel.create_webhook.assert_not_awaited()
    channel.send.assert_awaited_once()


async def test_streaming_edits_at_most_once_per_second(chat, service):
    channel = make_channel()
    sent = create_autospec(discord.WebhookMessage, instance=True, spec_set=True)
    shown: list[tuple[float, str]] = []  # (time, text) of the first send and of every edit

    def send(text, **kwargs):
        shown.append((service.clock.now, text))
        return sent

    channel.create_webhook.return_value.send.side_effect = send
    sent.edit.side_effect = lambda **k: shown.append((service.clock.now, k["content"]))
    words = [f"w{i}" for i in range(30)]
    service.stream = [(0.25, " ".join(words[: i + 1])) for i in range(len(words))]
    service.answer = Answer(
        True, " ".join(words), speaker=MARA, kind="reply", notices=["Older turns left out."]
    )
    await chat.on_message(make_message(channel=channel))
    assert shown[0][1] == "w0"
    streamed = [t for t, _ in shown[:-1]]  # the final edit may follow at once
    assert len(streamed) >= 6
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(streamed))
    assert shown[-1][1] == " ".join(words) + "\n\n-# *Older turns left out.*"
    assert all(c.kwargs["allowed_mentions"] == NO_MENTIONS for c in sent.edit.await_args_list)


async def test_long_reply_is_split_over_messages(chat, service):
    channel = make_channel()
    service.answer = Answer(True, "word " * 1000, speaker=MARA, kind="reply")
    await chat.on_message(make_message(channel=channel))
    hook = channel.create_webhook.return_value
    assert hook.send.await_count == 3
    assert all(len(c.args[0]) <= 2000 for c in hook.send.await_args_list)


async def test_error_answer_is_a_reply_to_the_author(chat, service):
    service.answer = Answer(False, "Slow down a little.", kind="busy", private=True)
    message = make_message()
    await chat.on_message(message)
    message.reply.assert_awaited_once_with(
        "Slow down a little.", mention_author=False, allowed_mentions=NO_MENTIONS
    )
    message.channel.create_webhook.assert_not_awaited()


# --- the bot ---------------------------------------------------------------------------------


async def test_bot_setup_adds_cogs_and_syncs_to_guild(monkeypatch):
    settings = SETTINGS.model_copy(update={"guild_id": 7})
    bot = NeekoBot(FakeChatService(), FakeModeration(), settings)
    sync = AsyncMock(return_value=[])
    monkeypatch.setattr(bot.tree, "sync", sync)
    await bot.setup_hook()
    sync.assert_awaited_once_with(guild=discord.Object(id=7))
    assert bot.intents.message_content
    guild = discord.Object(id=7)
    names = {c.qualified_name for c in bot.tree.walk_commands(guild=guild)}
    assert names == {
        "become",
        "characters",
        "memory",
        "reset",
        "character",
        "character submit",
        "character train",
        "character status",
        "scene",
        "scene add",
        "scene remove",
        "scene mode",
        "scene show",
    }
    payloads = {c.name: c.to_dict(bot.tree) for c in bot.tree.get_commands(guild=guild)}
    (character,) = payloads["become"]["options"]
    assert character["autocomplete"] is True
    submit = next(o for o in payloads["character"]["options"] if o["name"] == "submit")
    assert [o["name"] for o in submit["options"]] == [
        "card",
        "name",
        "profile",
        "greeting",
        "shared",
    ]
    assert [o["required"] for o in submit["options"]] == [False] * 5
    shared = submit["options"][-1]
    assert shared["type"] == discord.AppCommandOptionType.boolean.value
    cogs = bot.get_cog("CharactersCog"), bot.get_cog("ChatCog")
    assert all(c.service is bot.service for c in cogs)
    assert cogs[0].moderation is bot.moderation
    assert cogs[0].webhooks is cogs[1].webhooks  # one webhook per channel, shared
    await bot.close()


async def test_bot_posts_training_news_of_earlier_runs_by_channel_id(monkeypatch):
    moderation = FakeModeration()
    bot = NeekoBot(FakeChatService(), moderation, SETTINGS)
    assert moderation.announce == bot.announce
    channel = make_channel(channel_id=100)
    monkeypatch.setattr(bot, "get_channel", {100: channel}.get)
    await moderation.announce("100", "Nova has a block of its own now. @everyone")
    channel.send.assert_awaited_once_with(
        "Nova has a block of its own now. @everyone", allowed_mentions=NO_MENTIONS
    )
    await moderation.announce("404", "nowhere")  # an unknown channel: nothing, no error
    assert channel.send.await_count == 1
    await bot.close()


async def test_run_closes_bot_and_services_on_sigterm(monkeypatch):
    events = []
    service, moderation = FakeChatService(), FakeModeration()

    @contextlib.asynccontextmanager
    async def open_services(settings):
        events.append("open")
        yield service, moderation
        events.append("closed")

    async def start(self, token):
        assert (self.service, self.moderation) == (service, moderation)
        events.append(token)
        os.kill(os.getpid(), signal.SIGTERM)
        while not self.is_closed():
            await asyncio.sleep(0.01)

    # a stand-in module: `run` imports `neeko.wiring` (which loads the model) only when called
    fake = types.ModuleType("neeko.wiring")
    fake.open_services = open_services  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "neeko.wiring", fake)
    monkeypatch.setattr(NeekoBot, "start", start)
    await asyncio.wait_for(run(SETTINGS, ChatSettings()), timeout=10)
    assert events == ["open", "x", "closed"]
    assert moderation.announce is not None  # the bot hears from jobs of earlier runs


def test_neeko_service_opens_what_the_bot_runs():
    """`run` takes a (ChatService, Moderation) pair from `neeko.wiring.open_services`."""
    service = pytest.importorskip("neeko.wiring", exc_type=ImportError)
    assert inspect.isfunction(getattr(service, "open_services", None))
    assert list(inspect.signature(service.open_services).parameters)[:1] == ["settings"]


# --- the fakes match the real service and moderation -----------------------------------------


@pytest.mark.parametrize(
    ("fake_class", "module", "real_name"),
    [
        (FakeChatService, "neeko.chat", "ChatService"),
        (FakeModeration, "neeko.moderation", "Moderation"),
    ],
)
def test_fakes_match_the_real_api(fake_class, module, real_name):
    """Each fake method has the real one's parameters: names, kinds and defaults, in order.

    The real method may add parameters after them, if they have defaults.
    """
    real_class = getattr(importlib.import_module(module), real_name)
    methods = [
        (name, fake)
        for name, fake in inspect.getmembers(fake_class, inspect.isfunction)
        if not name.startswith("_") and name != "called"
    ]
    assert methods
    for name, fake in methods:
        real = getattr(real_class, name, None)
        assert inspect.isfunction(real), f"{real_name}.{name} is not a method"
        assert inspect.iscoroutinefunction(real) == inspect.iscoroutinefunction(fake), name
        fake_params = [
            (p.name, p.kind, p.default) for p in inspect.signature(fake).parameters.values()
        ]
        real_params = list(inspect.signature(real).parameters.values())
        head = [(p.name, p.kind, p.default) for p in real_params[: len(fake_params)]]
        assert head == fake_params, name
        extra = real_params[len(fake_params) :]
        assert all(p.default is not p.empty for p in extra), name
