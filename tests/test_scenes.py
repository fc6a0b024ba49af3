"""Scenes: several characters in one channel, on a real SQLite file, the in-process queue
and worker, and the tiny model."""

import asyncio
import logging

import pytest
from conftest import NAMES
from queue_helpers import serving_worker
from sqlalchemy import select

from neeko import db
from neeko.characters import LOCAL
from neeko.chat import addressed
from neeko.chat_types import Author
from neeko.engine import GenerationRequest
from neeko.redis_server import RedisServer
from neeko.runtime import open_runtime
from neeko.transport import open_transport
from neeko.wiring import open_services

ANN = Author("u1", "Ann", scope=LOCAL)
MOD = Author("m1", "Mo", moderator=True, scope=LOCAL)
GUILD_A = Author("a1", "Ari", moderator=True, scope="guild:1")
GUILD_B = Author("b1", "Bea", moderator=True, scope="guild:2")


@pytest.fixture
def settings(chat_settings):
    return chat_settings


async def _rows(service, channel="c"):
    async with service.sessions() as s:
        rows = await s.scalars(
            select(db.MessageRow).where(db.MessageRow.channel_id == channel).order_by("id")
        )
        return list(rows)


async def test_all_mode_answers_from_one_batch_each_as_if_alone(settings, queued_turns, caplog):
    caplog.set_level(logging.DEBUG, logger="neeko.worker")
    async with open_services(settings) as (service, _):
        for name in ("Ash", "Birch", "Cedar"):
            assert (await service.scene_add("c", ANN, name)).ok
        answer = await service.handle_message("c", ANN, "Who are you all?", "m1")
        rows = await _rows(service)
    answers = answer.all()
    assert [a.speaker.name for a in answers] == ["Ash", "Birch", "Cedar"]
    assert all(a.ok and a.kind == "reply" for a in answers)
    batches = [r.getMessage() for r in caplog.records if "together" in r.getMessage()]
    assert len(batches) == 1
    assert "prefilled 3 turn(s) together" in batches[0]
    assert all(t.id in batches[0] for t in queued_turns)
    rt = open_runtime(settings.store, "tiny")
    for turn, one in zip(queued_turns, answers, strict=True):
        alone = GenerationRequest(
            [m.model_dump() for m in turn.messages], rt.gate(turn.character), turn.sampling.params()
        )
        assert one.text == (rt.engine.generate([alone])[0].text.strip() or "…")
    assert [r.author_name for r in rows] == ["Ann", "Ash", "Birch", "Cedar"]
    assert [r.id for r in rows[1:]] == [a.ref for a in answers]
    # each character sees the others' lines as named lines and its own as its turns
    async with open_services(settings) as (service, _):
        await service.handle_message("c", ANN, "And now?", "m2")
    birch = next(t for t in queued_turns[3:] if t.character == "birch")
    assert [m.role for m in birch.messages] == ["system", "user", "assistant", "user"]
    assert "\nAlso here: Ash, Cedar." in birch.messages[0].content
    assert birch.messages[1].content == f"Ann: Who are you all?\nAsh: {answers[0].text}"
    assert birch.messages[2].content == answers[1].text
    assert birch.messages[3].content == f"Cedar: {answers[2].text}\nAnn: And now?"
    assert "\nAsh:" in birch.sampling.stop
    assert "\nBirch:" not in birch.sampling.stop


@pytest.mark.redis
async def test_all_mode_over_redis_is_one_batch_too(settings, caplog):
    """The bot and a worker apart, through a real redis-server: still one batch."""
    caplog.set_level(logging.DEBUG, logger="neeko.worker")
    with RedisServer() as server:
        settings = settings.model_copy(update={"redis_url": server.url})
        transport = open_transport(server.url)
        worker = serving_worker(
            transport.turns, transport.events, open_runtime(settings.store, "tiny")
        )
        serving = asyncio.create_task(worker.run())
        try:
            async with open_services(settings) as (service, _):
                for name in ("Dune", "Ember", "Fjord"):
                    await service.scene_add("c", ANN, name)
                answer = await service.handle_message("c", ANN, "Who are you all?", "m1")
        finally:
            worker.stop()
            await serving
            await transport.close()
    assert [a.speaker.name for a in answer.all()] == ["Dune", "Ember", "Fjord"]
    assert all(a.ok for a in answer.all())
    batches = [r.getMessage() for r in caplog.records if "together" in r.getMessage()]
    assert len(batches) == 1
    assert "prefilled 3 turn(s) together" in batches[0]


async def test_addressed_mode_follows_names_replies_and_the_last_speaker(settings, queued_turns):
    async with open_services(settings) as (service, _):
        for name in ("Ash", "Birch", "Cedar"):
            await service.scene_add("c", ANN, name)
        assert (await service.scene_mode("c", ANN, "addressed")).ok
        first = await service.handle_message("c", ANN, "Hello, anyone?", "m1")
        assert [a.speaker.name for a in first.all()] == ["Ash"]  # nobody spoke yet: the first
        named = await service.handle_message("c", ANN, "cedar and BI, what say you?", "m2")
        assert [a.speaker.name for a in named.all()] == ["Cedar", "Birch"]  # alias Bi
        last = await service.handle_message("c", ANN, "Go on.", "m3")
        assert [a.speaker.name for a in last.all()] == ["Birch"]  # the last who spoke
        await service.mark_posted("c", named.ref, "discord-9")  # Cedar's line was posted
        replied = await service.handle_message("c", ANN, "Really?", "m4", reply_to="discord-9")
        assert [a.speaker.name for a in replied.all()] == ["Cedar"]
        unknown = await service.handle_message("c", ANN, "Hm.", "m5", reply_to="nowhere")
        assert [a.speaker.name for a in unknown.all()] == ["Cedar"]
        bad = await service.scene_mode("c", ANN, "everyone")
        assert not bad.ok
        assert "all, addressed, auto" in bad.text


def test_names_match_whole_words_only():
    class V:
        def __init__(self, *names):
            self.names = names

    ash, ember = V("ash", "as"), V("ember", "em")
    assert addressed([ash, ember], "Ashes and embers") == []
    assert addressed([ash, ember], "EMBER, then Ash!") == [ember, ash]
    assert addressed([ash, ember], "as I said") == [ash]


async def test_auto_mode_picks_by_profile_and_limits_streaks(settings, queued_turns):
    settings = settings.model_copy(update={"scene_max_streak": 2})
    async with open_services(settings) as (service, moderation):
        sea = "A pirate captain who sails stormy seas on her ship, hunting treasure."
        books = "A quiet librarian who loves old books, ink and reading rooms."
        assert (await moderation.submit(MOD, name="Nova", profile=sea)).ok
        assert (await moderation.submit(MOD, name="Quill", profile=books)).ok
        await service.scene_add("c", ANN, "Nova")
        await service.scene_add("c", ANN, "Quill")
        await service.scene_mode("c", ANN, "auto")
        one = await service.handle_message("c", ANN, "Which library book should I read?", "m1")
        assert [a.speaker.name for a in one.all()] == ["Quill"]
        two = await service.handle_message("c", ANN, "A novel about reading and ink?", "m2")
        assert [a.speaker.name for a in two.all()] == ["Quill"]
        three = await service.handle_message("c", ANN, "And a book of old poems?", "m3")
        assert [a.speaker.name for a in three.all()] == ["Nova"]  # Quill spoke twice in a row
        named = await service.handle_message("c", ANN, "Quill, Nova: the best book?", "m4")
        assert [a.speaker.name for a in named.all()] == ["Quill"]  # named first, and only one
        waves = await service.handle_message("c", ANN, "How are the storms at sea?", "m5")
        assert [a.speaker.name for a in waves.all()] == ["Nova"]


async def test_scene_survives_a_restart_and_reset_keeps_it(settings):
    async with open_services(settings) as (service, _):
        await service.scene_add("c", ANN, "Dune")
        await service.scene_add("c", ANN, "Ember")
        await service.scene_mode("c", ANN, "addressed")
        await service.handle_message("c", ANN, "Hello Ember", "m1")
    async with open_services(settings) as (service, _):
        shown = await service.scene("c", LOCAL)
        assert shown.text.startswith("In this scene: Dune, Ember. Mode: addressed")
        reset = await service.reset("c", ANN)
        assert reset.text == "Conversation reset: Dune and Ember start afresh."
        assert await service.scene_names("c", LOCAL) == ["Dune", "Ember"]
        answer = await service.handle_message("c", ANN, "Hi again", "m2")
        assert [a.speaker.name for a in answer.all()] == ["Dune"]  # a new conversation
        become = await service.become("c", ANN, "Fjord")
        assert become.ok
        assert await service.scene_names("c", LOCAL) == ["Fjord"]


async def test_scene_changes_are_checked(settings):
    settings = settings.model_copy(update={"max_scene": 2})
    async with open_services(settings) as (service, _):
        assert (await service.scene("c", LOCAL)).text.startswith(f"{NAMES[0]} speaks here")
        assert (await service.scene_add("c", ANN, "Gale")).ok
        assert await service.scene_names("c", LOCAL) == ["Gale"]  # the default was replaced
        again = await service.scene_add("c", ANN, "ga")  # an alias of Gale
        assert (again.ok, again.text) == (False, "That character is in this scene already.")
        assert (await service.scene_add("c", ANN, "Heath")).ok
        full = await service.scene_add("c", ANN, "Ash")
        assert not full.ok
        assert "at most 2" in full.text
        typo = await service.scene_add("c", ANN, "Heathh")
        assert typo.suggestions == ["Heath"]
        missing = await service.scene_remove("c", ANN, "Ash")
        assert (missing.ok, missing.text) == (False, "No 'Ash' in this scene (Gale, Heath).")
        assert (await service.scene_remove("c", ANN, "HE")).ok  # by alias
        last = await service.scene_remove("c", ANN, "Gale")
        assert not last.ok
        assert "keeps one character" in last.text
        assert await service.scene_names("c", LOCAL) == ["Gale"]
        persona = await service.scene_add("c", ANN, "a grumpy lighthouse keeper")
        assert persona.ok
        assert "%" in persona.text  # its fusion mix


async def test_scenes_respect_scopes(settings, queued_turns):
    """A server's character speaks only in its server; elsewhere its name is free text."""
    async with open_services(settings) as (service, moderation):
        assert (await moderation.submit(GUILD_A, name="Nova", profile="A sky pirate.")).ok
        assert (await service.scene_add("a-chan", GUILD_A, "Nova")).ok
        other = await service.scene_add("b-chan", GUILD_B, "Nova")
        assert other.ok
        assert "%" in other.text  # B fused a persona called Nova: not A's character
        await service.handle_message("b-chan", GUILD_B, "Hello", "m1")
        assert queued_turns[-1].character is None
        assert queued_turns[-1].mix
        # a channel of server A seen from server B: A's character is not shown there
        names_b = await service.scene_names("a-chan", GUILD_B.scope)
        assert names_b == []
        answer = await service.handle_message("a-chan", GUILD_A, "Hi", "m2")
        assert answer.speaker.name == "Nova"
        nova = service.catalog.find("Nova", GUILD_A.scope)
        assert nova.scope == GUILD_A.scope
        assert queued_turns[-1].mix == dict(nova.mix)  # A's fused Nova, by its own mix
