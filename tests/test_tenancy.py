"""Scopes and boundaries through the chat service and moderation, as a hostile moderator.

Real SQLite file, in-process queue and worker (Redis where the case is about it), the tiny
model and a writable copy of the test cast (`conftest.NAMES`, the shared cast here).
"""

import asyncio
import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
from conftest import NAMES
from sqlalchemy import func, select

from neeko import db
from neeko.catalog import Catalog
from neeko.characters import LOCAL, SHARED, guild_scope
from neeko.chat_types import Author
from neeko.follower import CatalogFollower
from neeko.redis_server import RedisServer
from neeko.runtime import open_runtime
from neeko.transport import open_transport
from neeko.wiring import open_services
from neeko.worker import Trainer

A, B = guild_scope(111), guild_scope(222)
MOD_A = Author("ma", "Mia", moderator=True, scope=A)
MOD_B = Author("mb", "Ben", moderator=True, scope=B)
USER_B = Author("ub", "Uma", scope=B)
TERMINAL = Author("t", "Tess", moderator=True, owner=True, scope=LOCAL)
COLLIDING = ["ASH", "Ásh", "Ash!", "ＡＳＨ", "  ash ", "Bi"]  # Ash, and Birch's alias


def dialogues(name: str, n: int = 3, messages: int = 2) -> bytes:
    rows = []
    for i in range(n):
        turns = [
            {"role": "user" if j % 2 == 0 else "character", "content": f"Line {i}.{j}!"}
            for j in range(messages)
        ]
        rows.append(json.dumps({"character": name, "messages": turns}))
    return "\n".join(rows).encode()


def block_digests(store) -> dict[str, str]:
    return {
        p.stem: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (store / "blocks").glob("*.safetensors")
    }


async def rows(moderation) -> int:
    async with moderation.sessions() as s:
        return await s.scalar(select(func.count()).select_from(db.CharacterRow))


async def wait_trained(moderation, name: str, scope: str, timeout: float = 120) -> None:
    async with asyncio.timeout(timeout):
        while (c := moderation.catalog.find(name, scope)) is None or c.status != "trained":
            await asyncio.sleep(0.05)


@pytest.fixture
def settings(chat_settings):
    return chat_settings.model_copy(update={"reply_tokens": 8})


@pytest.mark.parametrize("name", COLLIDING)
async def test_a_name_folding_to_the_cast_cannot_overwrite_or_shadow_it(settings, name):
    store = Path(settings.store)
    before = block_digests(store)
    async with open_services(settings) as (chat, moderation):
        answer = await moderation.submit(MOD_A, name=name, profile="An impostor.")
        assert not answer.ok
        assert "already taken" in answer.text
        trained = await moderation.train(MOD_A, name, "c", dialogues(name))
        assert not trained.ok  # the shared cast is the owners' to train
        assert "owners" in trained.text
        became = await chat.become("c", USER_B, name)
        assert became.speaker.name in NAMES
        assert await rows(moderation) == 0
    assert block_digests(store) == before


async def test_servers_see_only_their_own_characters_and_the_cast(settings):
    async with open_services(settings) as (chat, moderation):
        assert (await moderation.submit(MOD_A, name="Nami", profile="A navigator.")).ok
        assert [c.name for c in await chat.characters(B)] == NAMES
        assert "Nami" in [c.name for c in await chat.characters(A)]
        assert chat.autocomplete("na", B) == []
        assert chat.autocomplete("na", A) == ["Nami"]
        assert not (await moderation.train(MOD_B, "Nami", "c", dialogues("Nami"))).ok
        assert "No character is called" in (await moderation.status(MOD_B, "Nami")).text
        assert (await moderation.submit(MOD_B, name="NAMI", profile="A baker.")).ok
        nami_a, nami_b = chat.catalog.find("nami", A), chat.catalog.find("nami", B)
        assert nami_a.key != nami_b.key
        assert (nami_a.scope, nami_b.scope) == (A, B)
        # B's channel speaks as B's Nami; a persona fused in B mixes only blocks B sees
        await chat.become("cb", USER_B, "Nami")
        assert (await chat.speaker("cb", B)).name == "NAMI"
        persona = await chat.become("cb", USER_B, "a navigator who loves maps")
        assert persona.ok
        # the same channel read from A's side never speaks as B's character
        assert (await chat.speaker("cb", A)).name != "NAMI"
        # a user is no moderator; a moderator of A cannot add to the shared cast
        assert not (await moderation.submit(USER_B, name="Zed", profile="A zebra.")).ok
        shared = await moderation.submit(MOD_A, name="Zed", profile="A zebra.", shared=True)
        assert not shared.ok
        assert "owners" in shared.text
        owner = Author("o", "Oz", moderator=True, owner=True, scope=A)
        assert (await moderation.submit(owner, name="Zed", profile="A zebra.", shared=True)).ok
        assert chat.catalog.find("zed", B).scope == SHARED


async def test_per_server_limits(settings):
    settings = settings.model_copy(update={"max_characters_per_scope": 2, "max_jobs_per_scope": 1})
    async with open_services(settings) as (_, moderation):
        for name in ("One", "Two"):
            assert (await moderation.submit(MOD_A, name=name, profile=f"{name} is here.")).ok
        third = await moderation.submit(MOD_A, name="Three", profile="Three is here.")
        assert not third.ok
        assert "the most it may have (2)" in third.text
        assert (await moderation.submit(MOD_B, name="Three", profile="Three is here.")).ok
        assert (await moderation.train(MOD_A, "One", "c", dialogues("One"))).ok
        second = await moderation.train(MOD_A, "Two", "c", dialogues("Two"))
        assert not second.ok
        assert "wait for one to finish" in second.text
        assert (await moderation.train(MOD_B, "Three", "c", dialogues("Three"))).ok
        await wait_trained(moderation, "One", A)
        await wait_trained(moderation, "Three", B)


async def test_a_long_profile_is_refused_and_the_system_prompt_counts_in_the_budget(settings):
    async with open_services(settings) as (chat, moderation):
        huge = await moderation.submit(MOD_A, name="Verbose", profile="word " * 6500)
        assert not huge.ok
        assert "shorten the profile" in huge.text
        assert await rows(moderation) == 0
        big = "He talks a lot. " * 330  # ~1,650 tokens of the tiny model's 2,048
        assert (await moderation.submit(MOD_A, name="Talker", profile=big)).ok
        await chat.become("c", MOD_A, "Talker")
        for i in range(6):
            answer = await chat.handle_message("c", MOD_A, f"message {i} " * 40, str(i))
            assert answer.ok, answer.text  # the history shrinks to fit beside the profile


@pytest.mark.parametrize("depth", [200, 600])
async def test_a_deeply_nested_card_is_refused_before_anything_changes(settings, depth):
    nested: dict = {}
    for _ in range(depth):
        nested = {"x": nested}
    card = json.dumps({"name": "Deep", "description": "Deep.", "extensions": nested}).encode()
    async with open_services(settings) as (chat, moderation):
        answer = await moderation.submit(MOD_A, card=card, filename="deep.json")
        assert not answer.ok
        assert "nested" in answer.text
        assert chat.catalog.find("Deep", A) is None
        assert await rows(moderation) == 0
        assert (await moderation.submit(MOD_A, name="Deep", profile="Deep.")).ok  # not taken


async def test_a_huge_training_dialogue_is_refused_at_once(settings):
    async with open_services(settings) as (_, moderation):
        assert (await moderation.submit(MOD_A, name="Nova", profile="A comet.")).ok
        answer = await moderation.train(MOD_A, "Nova", "c", dialogues("Nova", 1, 20_000))
        assert not answer.ok
        assert "200" in answer.text
        assert moderation.catalog.find("Nova", A).status == "fused"


@pytest.mark.redis
async def test_a_non_latin_name_is_one_character_across_processes(settings, tmp_path):
    """The bot and a trainer (each with its own catalog) agree on the key of "七海"."""
    trainer_store = tmp_path / "trainer-store"
    shutil.copytree(settings.store, trainer_store)
    with RedisServer() as server:
        cfg = settings.model_copy(update={"redis_url": server.url})
        async with open_services(cfg) as (chat, moderation):
            assert (await moderation.submit(MOD_A, name="七海", profile="A quiet sailor.")).ok
            transport = open_transport(server.url)
            rt = open_runtime(trainer_store, "tiny")
            follower = CatalogFollower(rt.catalog, transport.events)
            await follower.poll()
            trainer = Trainer(transport.jobs, transport.events, rt, name="t")
            task = asyncio.create_task(trainer.run())
            assert (await moderation.train(MOD_A, "七海", "c", dialogues("七海"))).ok
            await wait_trained(moderation, "七海", A)
            trainer.stop()
            await task
            await transport.close()
            matches = [c for c in chat.catalog.visible(A) if c.name == "七海"]
            assert len(matches) == 1
            (nanami,) = matches
            assert nanami.key == rt.catalog.find("七海", A).key
            assert nanami.key.startswith("g111.u")
            assert nanami.key.isascii()
    assert Catalog.open(trainer_store).get(nanami.key).status == "trained"


async def test_random_actions_of_two_servers_and_the_terminal_keep_every_invariant(settings):
    """Hundreds of random submissions, fusions, trainings and /become with colliding names
    from two servers and the terminal: after each step, no character changed or vanished
    through another's action, each scope sees exactly its own plus the cast, and every
    trained character's block file is its own and never rewritten."""
    rng = random.Random(11)
    names = [
        "Nami",
        "NAMI",
        "Námi",
        "Na-mi",
        "ＮＡＭＩ",
        "七海",
        "Zoë",
        "Zoe",
        "ash",
        "Birch",
        "Cedar!",
    ]
    actors = {A: MOD_A, B: MOD_B, LOCAL: TERMINAL}
    store = Path(settings.store)
    trainings = 0
    async with open_services(settings) as (chat, moderation):
        catalog = moderation.catalog
        shared = {c.key: c.card for c in catalog.visible(SHARED)}
        owned: dict[str, dict[str, object]] = {s: {} for s in actors}  # scope -> key -> card
        digests: dict[str, str] = {}
        for step in range(240):
            scope = rng.choice(list(actors))
            author = actors[scope]
            roll = rng.random()
            before = {k: (c.card, c.scope) for k, c in catalog.characters.items()}
            if roll < 0.55:
                name = rng.choice(names) + rng.choice(["", "", " II"])
                answer = await moderation.submit(author, name=name, profile=f"{name}, step {step}.")
                if answer.ok:
                    new = catalog.find(name, scope)
                    assert new.scope == scope
                    owned[scope][new.key] = new.card
            elif roll < 0.6 and trainings < 4:
                mine = [k for k, c in owned[scope].items() if catalog.get(k).status == "fused"]
                if mine:
                    target = catalog.get(rng.choice(mine))
                    answer = await moderation.train(
                        author, target.name, "c", dialogues(target.name)
                    )
                    trainings += answer.ok
            else:
                await chat.become(f"ch-{scope}", author, rng.choice(names))
            after = {k: (c.card, c.scope) for k, c in catalog.characters.items()}
            assert {k: v for k, v in after.items() if k in before} == before, step
            for s in actors:
                seen = {c.key for c in catalog.visible(s)}
                assert seen == set(shared) | set(owned[s]), (step, s)
                folded = [n for c in catalog.visible(s) for n in c.names()]
                assert len(folded) == len(set(folded)), (step, s)
            for key, digest in block_digests(store).items():
                assert digests.setdefault(key, digest) == digest, (step, key)
                assert catalog.get(key) is not None
        async with asyncio.timeout(240):
            while any(c.status == "training" for c in catalog.visible()):
                await asyncio.sleep(0.1)
    trained = [k for s in (A, B, LOCAL) for k in owned[s] if catalog.get(k).status == "trained"]
    assert trained
    assert set(trained) <= set(block_digests(store))
    for key, digest in block_digests(store).items():
        assert digests.get(key, digest) == digest


async def test_characters_submitted_before_scopes_migrate_and_keep_working(settings):
    """A database at revision 0001 with a submitted character: after the upgrade it is in
    the shared cast under its old key, with its mix, and plays in every server."""
    from sqlalchemy import text

    url = db.database_url(None, settings.db_path)
    await db.upgrade(url, "0001")
    card = {"name": "Old Salt", "profile": "A gruff old sailor.", "spec": "fields"}
    engine = db.make_engine(url)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO characters (key, name, card, status, fused_from, submitted_by, "
                "created_at, updated_at) VALUES ('old_salt', 'Old Salt', :card, 'fused', "
                ":mix, 'u1', '2026-11-30 00:00:00', '2026-11-30 00:00:00')"
            ),
            {"card": json.dumps(card), "mix": json.dumps({"ash": 0.75, "birch": 0.25})},
        )
    await engine.dispose()
    async with open_services(settings) as (chat, moderation):
        old = chat.catalog.get("old_salt")
        assert (old.scope, old.status, dict(old.mix)) == (
            SHARED,
            "fused",
            {"ash": 0.75, "birch": 0.25},
        )
        for author in (MOD_A, USER_B, TERMINAL):
            assert (
                await chat.become(f"c-{author.id}", author, "old salt")
            ).speaker.name == "Old Salt"
        assert (await chat.handle_message("c-ub", USER_B, "Ahoy?", "m1")).ok
        taken = await moderation.submit(MOD_A, name="OLD SALT", profile="Another.")
        assert "already taken" in taken.text
