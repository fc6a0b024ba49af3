"""ChatService and Moderation on a real SQLite file, the in-process queues and worker, and
the tiny model."""

import asyncio
import io
import json
import subprocess
import sys
from collections import Counter

import pytest
from conftest import NAMES
from sqlalchemy import func, select

from neeko import db
from neeko.catalog import Catalog
from neeko.characters import LOCAL
from neeko.chat import ChatService
from neeko.chat_types import Author
from neeko.engine import GenerationRequest
from neeko.events import LocalEventBus
from neeko.follower import CatalogFollower
from neeko.jobs import LocalJobQueue
from neeko.moderation import Moderation
from neeko.protocol import Reply, Turn
from neeko.queue import LocalTurnQueue
from neeko.runtime import open_runtime
from neeko.terminal import Terminal
from neeko.transport import Transport, open_transport
from neeko.wiring import open_services
from neeko.worker import Trainer

ANN = Author("u1", "Ann", scope=LOCAL)
BOB = Author("u2", "Bob", scope=LOCAL)
MOD = Author("m1", "Mo", moderator=True, scope=LOCAL)


NOVA_DIALOGUES = "\n".join(
    json.dumps(
        {
            "character": "Nova",
            "messages": [
                {"role": "user", "content": f"Question {i}?"},
                {"role": "character", "content": f"WHOOSH! Answer {i}!"},
            ],
        }
    )
    for i in range(4)
).encode()


def _hand_reply(turn_id: str, text: str) -> Reply:
    """A final reply as a hand-run worker would send it."""
    return Reply(
        turn=turn_id,
        text=text,
        finish_reason="eos",
        prompt_tokens=1,
        completion_tokens=1,
        worker="hand",
    )


class RecordingQueue(LocalTurnQueue):
    """The in-process queue, keeping every turn it was given."""

    def __init__(self, config=None, counters=None):
        super().__init__(config, counters)
        self.turns: list[Turn] = []

    async def _enqueue(self, turns):
        self.turns.extend(turns)
        await super()._enqueue(turns)


@pytest.fixture
def settings(chat_settings):
    return chat_settings


@pytest.fixture
def recorded(monkeypatch):
    """The RecordingQueue of every transport `open_services` opens (in-process, as
    `open_transport` builds one: the turn and job queues share their counters)."""
    made: list[RecordingQueue] = []

    def make(url=None, config=None):
        counters: Counter[str] = Counter()
        made.append(RecordingQueue(config, counters))
        return Transport(made[-1], LocalJobQueue(config, counters), LocalEventBus())

    monkeypatch.setattr("neeko.wiring.open_transport", make)
    return made


async def _count(service, model):
    async with service.sessions() as s:
        return await s.scalar(select(func.count()).select_from(model))


async def test_reply_streams_and_equals_the_engine(settings, recorded):
    async with open_services(settings) as (service, _):
        assert (await service.become("c", ANN, "Birch")).ok
        streamed = []

        async def on_text(speaker, text):
            streamed.append((speaker, text))

        answer = await service.handle_message("c", ANN, "Hello there!", "101", on_text)
        turn = recorded[0].turns[-1]
    assert answer.ok
    assert answer.kind == "reply"
    assert answer.speaker.name == "Birch"
    assert all(speaker == answer.speaker for speaker, _ in streamed)
    assert (streamed and streamed[-1][1] == answer.text.strip()) or answer.text == "…"
    assert turn.character == "birch"
    assert turn.messages[-1].content == "Ann: Hello there!"
    assert turn.messages[0].role == "system"
    assert "You are Birch." in turn.messages[0].content
    rt = open_runtime(settings.store, "tiny")
    req = GenerationRequest(
        [m.model_dump() for m in turn.messages],
        rt.gate("birch"),
        turn.sampling.params(),
    )
    assert answer.text == rt.engine.generate([req])[0].text.strip()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database(request, settings):
    """`settings` on a SQLite file, and on PostgreSQL where a server answers."""
    if request.param == "sqlite":
        return settings
    return settings.model_copy(update={"database_url": request.getfixturevalue("postgres_url")})


async def test_history_survives_a_restart(any_database, recorded):
    settings = any_database
    async with open_services(settings) as (service, _):
        await service.become("c", ANN, "Cedar")
        first = await service.handle_message("c", ANN, "My name is Ann.", "1")
        await service.handle_message("c", BOB, "And I am Bob.", "2")
    async with open_services(settings) as (service, _):
        assert (await service.speaker("c", LOCAL)).name == "Cedar"
        await service.handle_message("c", ANN, "Who am I?", "3")
    contents = [m.content for m in recorded[-1].turns[-1].messages[1:]]
    assert contents[:2] == ["Ann: My name is Ann.", first.text]
    assert contents[2] == "Bob: And I am Bob."
    assert contents[-1] == "Ann: Who am I?"


async def test_two_messages_at_once_are_answered_in_order(settings, recorded):
    async with open_services(settings) as (service, _):
        first, second = await asyncio.gather(
            service.handle_message("c", ANN, "first", "a1"),
            service.handle_message("c", BOB, "second", "a2"),
        )
    assert first.ok
    assert second.ok
    turns = recorded[0].turns
    assert [t.messages[-1].content for t in turns] == ["Ann: first", "Bob: second"]
    # the second prompt was built after the first reply was stored: one at a time, in order
    assert [m.content for m in turns[1].messages[1:3]] == ["Ann: first", first.text]


async def test_bad_input_is_refused_and_changes_nothing(settings, recorded):
    settings = settings.model_copy(update={"cooldown_s": 60, "max_message_chars": 50})
    async with open_services(settings) as (service, moderation):
        too_long = await service.handle_message("c", ANN, "x" * 51, "1")
        assert not too_long.ok
        assert "limit is 50" in too_long.text
        assert (await service.handle_message("c", ANN, "hi", "2")).ok
        busy = await service.handle_message("c", ANN, "again", "3")
        assert (busy.ok, busy.kind) == (False, "busy")
        unknown = await service.become("c", ANN, "Birhc")
        assert not unknown.ok
        assert unknown.suggestions == ["Birch"]
        assert (await service.speaker("c", LOCAL)).name == NAMES[0]
        assert await _count(service, db.MessageRow) == 2
        refused = await moderation.submit(ANN, name="Zed", profile="A zebra.")
        assert not refused.ok
        assert "moderators" in refused.text
        bad = await moderation.submit(MOD, card=b"{not json", filename="x.json")
        assert not bad.ok
        assert "not added" in bad.text
        huge = await moderation.submit(MOD, card=b" " * 2_000_000, filename="x.json")
        assert not huge.ok
        assert await _count(service, db.CharacterRow) == 0
        assert service.catalog.find("Zed") is None  # in no scope at all


async def test_mentions_in_model_output_cannot_ping(settings):
    """A hand-run worker answers with mentions; the service breaks every one of them."""
    url = db.database_url(None, settings.db_path)
    await db.upgrade(url)
    engine = db.make_engine(url)
    queue = LocalTurnQueue()
    service = ChatService(
        settings, db.sessionmaker(engine), queue, Catalog.open(settings.store), len
    )
    await queue.heartbeat("hand")

    async def hand_worker():
        (delivery,) = await queue.fetch("hand", 1, 5000)
        text = "@everyone look <@123> <@&456> <#789> @here"
        reply = _hand_reply(delivery.turn.id, text)
        await queue.complete(delivery, reply)

    task = asyncio.create_task(hand_worker())
    answer = await service.handle_message("c", ANN, "hi", "1")
    await task
    await engine.dispose()
    assert answer.ok
    for ping in ("@everyone", "@here", "<@123>", "<@&456>", "<#789>"):
        assert ping not in answer.text
    assert answer.text.replace("\u200b", "") == "@everyone look <@123> <@&456> <#789> @here"


async def test_persona_and_reset(settings, recorded):
    async with open_services(settings) as (service, _):
        persona = await service.become("c", ANN, "a grumpy old lighthouse keeper")
        assert persona.ok
        assert persona.speaker.name == "a grumpy old lighthouse keeper"
        await service.handle_message("c", ANN, "hello", "1")
        turn = recorded[0].turns[-1]
        assert turn.character is None
        assert set(turn.mix) <= {n.lower() for n in NAMES}
        assert len(turn.mix) == 3
        assert sum(turn.mix.values()) == pytest.approx(1.0)
        assert (await service.reset("c", ANN)).ok
        await service.handle_message("c", ANN, "again", "2")
        assert [m.role for m in recorded[0].turns[-1].messages] == ["system", "user"]


async def test_history_cut_is_announced_once(settings, recorded):
    settings = settings.model_copy(update={"history_tokens": 64})
    async with open_services(settings) as (service, _):
        notices = []
        for i in range(6):
            answer = await service.handle_message("c", ANN, f"message {i} " * 5, str(i))
            notices += answer.notices
    assert len(notices) == 1
    assert "oldest messages" in notices[0]
    assert len(recorded[0].turns[-1].messages) < 12


async def test_submit_then_train_a_character(settings, recorded):
    progress = []

    async def on_progress(line):
        progress.append(line)

    dialogues = NOVA_DIALOGUES
    async with open_services(settings) as (service, moderation):
        added = await moderation.submit(MOD, name="Nova", profile="A loud comet.")
        assert added.ok
        assert (await service.become("c", ANN, "nova")).ok
        await service.handle_message("c", ANN, "hi", "1")
        assert recorded[0].turns[-1].mix  # fused: a mix over trained characters
        bad = await moderation.train(MOD, "Nova", "c", b'{"character": "Other"}')
        assert not bad.ok
        started = await moderation.train(MOD, "Nova", "c", dialogues, on_progress)
        assert started.ok, started.text
        while not any("block of its own" in p or "failed" in p for p in progress):
            await asyncio.sleep(0.1)
        assert "block of its own" in progress[-1]
        assert (await moderation.status(MOD, "Nova")).text.startswith("**Nova**: trained")
        answer = await service.handle_message("c", ANN, "hi again", "2")
        assert answer.ok
        assert recorded[0].turns[-1].character == "local.nova"  # the terminal scope's key
    async with open_services(settings) as (service, _):  # still trained after a restart
        assert service.catalog.find("Nova", LOCAL).status == "trained"


def test_terminal_chat_with_piped_stdin(settings):
    script = "/become Birch\nHello there!\n/characters\n/quit\n"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "neeko.cli",
            "chat",
            "--model",
            "tiny",
            "--store",
            settings.store,
            "--db",
            settings.db_path,
            "--max-new-tokens",
            "8",
        ],
        input=script,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "[**Birch** now speaks in this channel.]" in lines
    reply = next(line for line in lines if line.startswith("Birch: "))
    assert len(reply) > len("Birch: ")
    assert any("Heath (also He) [trained]" in line for line in lines)


async def test_greeting_opens_the_conversation(settings, recorded):
    async with open_services(settings) as (service, moderation):
        await moderation.submit(MOD, name="Zed", profile="A zebra.", greeting="Hi! Zed.")
        became = await service.become("c", ANN, "Zed")
        assert became.greeting == "Hi! Zed."
        await service.handle_message("c", ANN, "hello", "1")
        await service.handle_message("c", BOB, "hi", "2")
    system, *rest = recorded[0].turns[-1].messages
    assert system.content.endswith("You opened the conversation with: Hi! Zed.")
    assert [m.role for m in rest] == ["user", "assistant", "user"]


async def test_character_list_describes_with_the_first_sentence(settings, recorded):
    profile = "Zed is a zebra raised by Dr. Ada Lyle. He loves tea. He hates rain."
    async with open_services(settings) as (service, moderation):
        assert (await moderation.submit(MOD, name="Zed", profile=profile)).ok
        infos = {c.name: c for c in await service.characters(LOCAL)}
    assert infos["Zed"].description == "Zed is a zebra raised by Dr. Ada Lyle."
    assert infos["Zed"].status == "fused"
    assert infos["Birch"].status == "trained"
    assert set(infos) == {*NAMES, "Zed"}


@pytest.fixture
async def database(settings):
    """The sessions of an upgraded SQLite file, for services built by hand."""
    url = db.database_url(None, settings.db_path)
    await db.upgrade(url)
    engine = db.make_engine(url)
    yield db.sessionmaker(engine)
    await engine.dispose()


def _services(settings, sessions, transport):
    """A chat service and moderation as `open_services` wires them: over one catalog (and
    its follower of the transport's events); tokens counted as characters."""
    catalog = Catalog.open(settings.store)
    chat = ChatService(settings, sessions, transport.turns, catalog, len)
    follower = CatalogFollower(catalog, transport.events)
    moderation = Moderation(
        settings, sessions, transport.jobs, transport.events, follower, len, chat.context_tokens
    )
    return chat, moderation


async def test_training_outlives_a_restart_of_the_front_end(settings, database):
    transport = open_transport("")  # stands for Redis: it outlives the front end
    _, first = _services(settings, database, transport)
    assert (await first.submit(MOD, name="Nova", profile="A loud comet.")).ok
    assert (await first.train(MOD, "Nova", "c", NOVA_DIALOGUES)).ok  # no trainer yet
    await first.aclose()
    chat, second = _services(settings, database, transport)
    lines = []

    async def announce(channel, line):
        lines.append((channel, line))

    second.announce = announce
    await second.load_submitted()
    assert chat.catalog.find("Nova", LOCAL).status == "training"
    trainer = Trainer(
        transport.jobs, transport.events, open_runtime(settings.store, "tiny"), name="t"
    )
    task = asyncio.create_task(trainer.run())
    async with asyncio.timeout(120):
        while not any("block of its own" in line for _, line in lines):
            await asyncio.sleep(0.1)
    trainer.stop()
    await task
    assert (await second.status(MOD, "Nova")).text.startswith("**Nova**: trained")
    assert chat.catalog.find("Nova", LOCAL).status == "trained"  # one catalog, both see it
    assert {channel for channel, _ in lines} == {"c"}
    await second.aclose()
    await transport.close()


async def test_a_training_job_lost_in_a_restart_can_be_run_again(settings, database):
    _, first = _services(settings, database, open_transport(""))
    assert (await first.submit(MOD, name="Nova", profile="A loud comet.")).ok
    assert (await first.train(MOD, "Nova", "c", NOVA_DIALOGUES)).ok
    await first.aclose()
    # the in-process queues died too
    _, second = _services(settings, database, open_transport(""))
    await second.load_submitted()
    status = (await second.status(MOD, "Nova")).text
    assert status.startswith("**Nova**: fused")
    assert "failed" in status
    assert "interrupted by a restart" in status
    assert (await second.train(MOD, "Nova", "c", NOVA_DIALOGUES)).ok
    await second.aclose()


async def test_terminal_moderator_commands(settings, tmp_path):
    card = tmp_path / "nell.json"
    card.write_text(json.dumps({"name": "Nell Harrow", "description": "A lighthouse keeper."}))
    data = tmp_path / "nova.jsonl"
    data.write_bytes(NOVA_DIALOGUES)
    script = iter(
        [
            f"/submit {card}",
            "/submit Nova: A loud comet.",
            "/submit Nobody",
            "/become Nell Harrow",
            "Hello?",
            f"/train Nova {data}",
            "/train Nova missing.jsonl",
            "/status Nova",
        ]
    )  # then end of input: the chat waits for the training job, then exits

    async def read_line():
        return next(script, None)

    out = io.StringIO()
    async with open_services(settings) as (service, moderation):
        await Terminal(service, moderation, "t", "Ann", out).run(read_line)
    lines = out.getvalue().splitlines()
    assert any(line.startswith("[**Nell Harrow** is playable now") for line in lines)
    assert any(line.startswith("[**Nova** is playable now") for line in lines)
    assert any(line.startswith("[No card file 'Nobody'") for line in lines)
    assert any(line.startswith("Nell Harrow: ") for line in lines)
    assert any(line.startswith("[Training Nova on 4 dialogues") for line in lines)
    assert "[No such file: missing.jsonl]" in lines
    assert any(line.startswith("[**Nova**: training") for line in lines)
    assert lines[-1] == "[Nova has a block of its own now.]"
    async with open_services(settings) as (service, _):
        assert service.catalog.find("Nova", LOCAL).status == "trained"


async def test_terminal_shows_a_streamed_reply_once(settings, database):
    """Chunks with leading and trailing whitespace, a final text stripped: printed once."""
    transport = open_transport("")
    queue = transport.turns
    service, moderation = _services(settings, database, transport)
    await queue.heartbeat("hand")

    async def hand_worker():
        (delivery,) = await queue.fetch("hand", 1, 5000)
        for chunk in ("  Hi", " there", "!\n"):
            await queue.publish([(delivery, chunk)])
        reply = _hand_reply(delivery.turn.id, "  Hi there!\n")
        await queue.complete(delivery, reply)

    task = asyncio.create_task(hand_worker())
    out = io.StringIO()
    await Terminal(service, moderation, "c", "Ann", out).message("hello")
    await task
    assert out.getvalue().splitlines() == [f"{NAMES[0]}: Hi there!"]


async def test_a_channel_with_too_many_waiting_messages_turns_more_away(settings, database):
    transport = open_transport("")
    queue = transport.turns
    service, _ = _services(settings.model_copy(update={"max_pending": 2}), database, transport)
    await queue.heartbeat("hand")
    answering = asyncio.Event()

    async def hand_worker():
        await answering.wait()
        while True:
            for d in await queue.fetch("hand", 8, 100):
                reply = _hand_reply(d.turn.id, "ok")
                await queue.complete(d, reply)

    worker = asyncio.create_task(hand_worker())
    first = asyncio.create_task(service.handle_message("c", ANN, "one", "1"))
    second = asyncio.create_task(service.handle_message("c", BOB, "two", "2"))
    await asyncio.sleep(0.1)  # "one" waits for its answer, "two" for its turn
    busy = await service.handle_message("c", MOD, "three", "3")
    assert (busy.ok, busy.kind) == (False, "busy")
    assert "2 messages here are waiting" in busy.text
    answering.set()
    assert (await first).ok
    assert (await second).ok
    assert (await service.handle_message("c", MOD, "three again", "4")).ok
    worker.cancel()
    async with service.sessions() as s:
        rows = await s.scalars(select(db.MessageRow.content).where(db.MessageRow.role == "user"))
        assert list(rows) == ["one", "two", "three again"]
