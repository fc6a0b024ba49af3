"""The Discord front end: cogs called directly with spec'd mocks over a fake chat service."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
import random
import re
import signal
from pathlib import Path
from unittest.mock import AsyncMock, create_autospec

import discord
import pytest
from discord_mocks import (
    NO_MENTIONS,
    SETTINGS,
    answered_once,
    followup_text,
    forbidden,
    make_channel,
    make_interaction,
    make_member,
    make_message,
    make_role,
    make_webhook,
)
from pydantic import ValidationError

from bot.app import NeekoBot, run
from bot.checks import author_of, chats_in, is_moderator
from bot.cogs.characters import MAX_CARD_BYTES, CharactersCog, characters_embed
from bot.cogs.chat import ChatCog
from bot.sender import WebhookCache, split_message
from neeko.chat_types import Answer, Author, CharacterInfo, Speaker
from neeko.settings import ChatSettings, DiscordSettings

MARA = Speaker("Captain Mara Vell", "https://example.com/mara.png")
NAMES = [f"Character {i:02d}" for i in range(40)]
ENV_EXAMPLE = Path(__file__).resolve().parent.parent / ".env.example"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeChatService:
    """Exactly the `ChatService` API the bot uses; records every call."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.clock = clock or FakeClock()
        self.stream: list[tuple[float, str]] = []
        """(seconds later, text so far) pairs that `handle_message` streams through on_text."""
        self.answer: Answer | None = None
        self.on_progress = None
        self.announce = None

    def _record(self, method: str, /, **kwargs) -> None:
        self.calls.append((method, kwargs))

    def called(self, name: str) -> list[dict]:
        return [kwargs for call, kwargs in self.calls if call == name]

    async def handle_message(self, channel, author, content, message_id, on_text=None):
        self._record(
            "handle_message", channel=channel, author=author, content=content, message_id=message_id
        )
        for delay, text in self.stream:
            self.clock.now += delay
            if on_text is not None:
                await on_text(text)
        return self.answer or Answer(True, "Ahoy!", speaker=MARA, kind="reply")

    async def become(self, channel, author, text):
        self._record("become", channel=channel, author=author, text=text)
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

    async def characters(self):
        self._record("characters")
        return [CharacterInfo("mara", "Captain Mara Vell", ("Mara",), "trained", "A pirate.")]

    def autocomplete(self, prefix, limit=25):
        self._record("autocomplete", prefix=prefix, limit=limit)
        return list(NAMES)  # more than asked: the cog must still cap at 25

    async def reset(self, channel, author):
        self._record("reset", channel=channel, author=author)
        return Answer(True, "History cleared.")

    async def submit_character(
        self, author, *, card=None, filename="", name=None, profile=None, greeting=""
    ):
        self._record(
            "submit_character",
            author=author,
            card=card,
            filename=filename,
            name=name,
            profile=profile,
            greeting=greeting,
        )
        return Answer(True, "Added.", private=True)

    async def train_character(self, author, name, channel, dialogues=None, on_progress=None):
        self._record(
            "train_character", author=author, name=name, channel=channel, dialogues=dialogues
        )
        self.on_progress = on_progress
        return Answer(True, "Queued.", private=True)

    async def character_status(self, name):
        self._record("character_status", name=name)
        return Answer(True, f"{name}: trained.")

    async def speaker(self, channel):
        self._record("speaker", channel=channel)
        return MARA


@pytest.fixture
def service():
    return FakeChatService()


@pytest.fixture
def cog(service):
    return CharactersCog(service, SETTINGS)


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
    user = create_autospec(discord.User, instance=True, spec_set=True)
    assert not is_moderator(user, SETTINGS)  # outside a guild


def test_author_of_member():
    member = make_member(user_id=42, name="Bea", roles=[make_role("Keeper", 1)])
    assert author_of(member, SETTINGS) == Author(id="42", name="Bea", moderator=True)


def test_channels_setting_reads_ids_split_by_commas(monkeypatch):
    monkeypatch.setenv("DISCORD_TOKEN", "x")
    monkeypatch.setenv("DISCORD_CHANNELS", "12, 34 56")
    assert DiscordSettings().channels == {12, 34, 56}
    monkeypatch.setenv("DISCORD_CHANNELS", "12,general")
    with pytest.raises(ValidationError, match="channels"):
        DiscordSettings()
    monkeypatch.delenv("DISCORD_CHANNELS")
    assert DiscordSettings().channels == frozenset()


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
    assert call == {"channel": "100", "author": Author("1", "Alice"), "text": "Mara"}
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


async def test_become_and_reset_outside_the_listed_channels_change_nothing(service):
    cog = CharactersCog(service, SETTINGS.model_copy(update={"channels": frozenset({200, 7})}))
    for command, args in ((cog.become, ("Mara",)), (cog.reset, ())):
        interaction, events = make_interaction()  # in channel 100
        await command.callback(cog, interaction, *args)
        answered_once(interaction, events)
        assert followup_text(interaction).endswith("try <#7>, <#200>.")
        interaction.channel.send.assert_not_awaited()
    assert service.calls == []


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
    assert service.called("autocomplete") == [{"prefix": "Char", "limit": 25}]


async def test_characters_lists_in_an_embed(cog):
    interaction, events = make_interaction()
    await cog.characters.callback(cog, interaction)
    kwargs = answered_once(interaction, events)
    assert "Captain Mara Vell" in kwargs["embed"].description


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
    assert service.called("reset") == [{"channel": "100", "author": Author("1", "Alice")}]
    interaction.channel.send.assert_awaited_once()


async def test_submit_refuses_non_moderator_without_calling_service(cog, service):
    card = create_autospec(discord.Attachment, instance=True, spec_set=True)
    card.size, card.filename = 100, "card.json"
    interaction, events = make_interaction(make_member(roles=[make_role("Crew", 3)]))
    await cog.submit.callback(cog, interaction, card=card)
    answered_once(interaction, events)
    assert "moderators" in followup_text(interaction)
    assert service.calls == []
    card.read.assert_not_awaited()


async def test_submit_by_role_moderator_reads_the_card(cog, service):
    card = create_autospec(discord.Attachment, instance=True, spec_set=True)
    card.size, card.filename = 100, "mara.png"
    card.read.return_value = b"\x89PNG"
    interaction, events = make_interaction(make_member(roles=[make_role("Keeper", 3)]))
    await cog.submit.callback(cog, interaction, card=card, greeting=None)
    answered_once(interaction, events)
    (call,) = service.called("submit_character")
    assert call["author"].moderator
    assert (call["card"], call["filename"], call["greeting"]) == (b"\x89PNG", "mara.png", "")


async def test_submit_fields_without_card(cog, service):
    interaction, events = make_interaction(make_member(manage_guild=True))
    await cog.submit.callback(cog, interaction, name="Nell", profile="A lighthouse keeper.")
    answered_once(interaction, events)
    (call,) = service.called("submit_character")
    assert (call["card"], call["name"], call["profile"]) == (None, "Nell", "A lighthouse keeper.")


@pytest.mark.parametrize(("size", "filename"), [(MAX_CARD_BYTES + 1, "big.png"), (10, "x.exe")])
async def test_submit_refuses_bad_attachment_without_reading_it(cog, service, size, filename):
    card = create_autospec(discord.Attachment, instance=True, spec_set=True)
    card.size, card.filename = size, filename
    interaction, events = make_interaction(make_member(manage_guild=True))
    await cog.submit.callback(cog, interaction, card=card)
    answered_once(interaction, events)
    assert filename in followup_text(interaction)
    card.read.assert_not_awaited()
    assert service.calls == []


async def test_train_queues_and_posts_progress_in_channel(cog, service):
    data = create_autospec(discord.Attachment, instance=True, spec_set=True)
    data.size, data.filename = 100, "nell.jsonl"
    data.read.return_value = b'{"messages": []}\n'
    interaction, events = make_interaction(make_member(manage_guild=True))
    await cog.train.callback(cog, interaction, "Nell", data)
    answered_once(interaction, events)
    (call,) = service.called("train_character")
    assert (call["name"], call["channel"], call["dialogues"]) == (
        "Nell",
        "100",
        data.read.return_value,
    )
    await service.on_progress("step 10/58, loss 1.23 @everyone")
    interaction.channel.send.assert_awaited_once_with(
        "step 10/58, loss 1.23 @everyone", allowed_mentions=NO_MENTIONS
    )
    assert interaction.followup.send.await_count == 1  # progress never uses the interaction


async def test_train_refuses_non_moderator(cog, service):
    interaction, events = make_interaction()
    await cog.train.callback(cog, interaction, "Nell", None)
    answered_once(interaction, events)
    assert service.calls == []


async def test_status(cog, service):
    interaction, events = make_interaction()
    await cog.status.callback(cog, interaction, "Mara")
    answered_once(interaction, events)
    assert followup_text(interaction) == "Mara: trained."


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
    bot = NeekoBot(FakeChatService(), SETTINGS.model_copy(update={"guild_id": 7}))
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
        "reset",
        "character",
        "character submit",
        "character train",
        "character status",
    }
    payloads = {c.name: c.to_dict(bot.tree) for c in bot.tree.get_commands(guild=guild)}
    (character,) = payloads["become"]["options"]
    assert character["autocomplete"] is True
    submit = next(o for o in payloads["character"]["options"] if o["name"] == "submit")
    assert [o["required"] for o in submit["options"]] == [False] * 4
    await bot.close()


async def test_bot_posts_training_news_of_earlier_runs_by_channel_id(monkeypatch):
    service = FakeChatService()
    bot = NeekoBot(service, SETTINGS)
    channel = make_channel(channel_id=100)
    monkeypatch.setattr(bot, "get_channel", {100: channel}.get)
    await service.announce("100", "Nova has a block of its own now. @everyone")
    channel.send.assert_awaited_once_with(
        "Nova has a block of its own now. @everyone", allowed_mentions=NO_MENTIONS
    )
    await service.announce("404", "nowhere")  # an unknown channel: nothing, no error
    assert channel.send.await_count == 1
    await bot.close()


async def test_run_closes_bot_and_service_on_sigterm(monkeypatch):
    events = []

    @contextlib.asynccontextmanager
    async def open_service(settings):
        events.append("open")
        yield FakeChatService()
        events.append("closed")

    async def start(self, token):
        events.append(token)
        os.kill(os.getpid(), signal.SIGTERM)
        while not self.is_closed():
            await asyncio.sleep(0.01)

    monkeypatch.setattr("neeko.service.open_service", open_service)
    monkeypatch.setattr(NeekoBot, "start", start)
    await asyncio.wait_for(run(SETTINGS, ChatSettings()), timeout=10)
    assert events == ["open", "x", "closed"]


# --- the fake matches the real service -------------------------------------------------------


def test_fake_service_matches_chat_service_api():
    chat = pytest.importorskip("neeko.chat")
    for name, fake in inspect.getmembers(FakeChatService, inspect.isfunction):
        if name.startswith("_") or name == "called":
            continue
        real = getattr(chat.ChatService, name)
        assert inspect.iscoroutinefunction(real) == inspect.iscoroutinefunction(fake), name
        fake_params = list(inspect.signature(fake).parameters)
        real_params = inspect.signature(real).parameters
        assert list(real_params)[: len(fake_params)] == fake_params, name
        extra = list(real_params.values())[len(fake_params) :]
        assert all(p.default is not p.empty for p in extra), name
