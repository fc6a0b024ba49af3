"""Swipes: re-rolling and browsing the latest replies, on a real SQLite file, the in-process
queue and worker, and the tiny model; the Discord buttons over a fake service."""

import io

import pytest
from sqlalchemy import select

from neeko import db
from neeko.characters import LOCAL
from neeko.chat import MAX_ALTERNATIVES
from neeko.chat_types import Author
from neeko.terminal import Terminal
from neeko.wiring import open_services

ANN = Author("u1", "Ann", scope=LOCAL)
BOB = Author("u2", "Bob", scope=LOCAL)


@pytest.fixture
def settings(chat_settings):
    return chat_settings.model_copy(update={"temperature": 1.0})


async def _row(service, ref):
    async with service.sessions() as s:
        return await s.get(db.MessageRow, ref)


async def test_a_rerolled_reply_is_kept_as_shown_in_history(settings, queued_turns):
    async with open_services(settings) as (service, _):
        await service.become("c", ANN, "Ash")
        first = await service.handle_message("c", ANN, "Tell me a story.", "m1")
        again = await service.regenerate("c", ANN, first.ref)
        assert again.ok
        assert (again.ref, again.alternative) == (first.ref, (2, 2))
        original, retry = queued_turns[-2], queued_turns[-1]
        assert retry.messages == original.messages  # the same prompt, a new sample
        assert retry.sampling.seed is not None
        row = await _row(service, first.ref)
        assert row.alternatives == [first.text, again.text]
        assert (row.alternative, row.content) == (1, again.text)
        back = await service.swipe("c", ANN, first.ref, -1)
        assert (back.text, back.alternative) == (first.text, (1, 2))
        edge = await service.swipe("c", ANN, first.ref, -1)
        assert (edge.ok, edge.text) == (False, "That reply has versions 1 to 2.")
        forward = await service.choose("c", ANN, None, 1)  # None: the newest reply
        assert forward.text == again.text
        await service.swipe("c", ANN, first.ref, -1)  # the first version is shown ...
        await service.handle_message("c", ANN, "Go on.", "m2")
    prompt = [m.content for m in queued_turns[-1].messages[1:]]
    assert prompt == ["Ann: Tell me a story.", first.text, "Ann: Go on."]  # ... so it is kept


async def test_only_participants_and_only_the_latest_replies(settings):
    async with open_services(settings) as (service, _):
        await service.become("c", ANN, "Ash")
        old = await service.handle_message("c", ANN, "One.", "m1")
        stranger = await service.regenerate("c", BOB, old.ref)
        assert (stranger.ok, stranger.private) == (False, True)
        assert "people who wrote in this conversation" in stranger.text
        new = await service.handle_message("c", BOB, "Two.", "m2")
        stale = await service.regenerate("c", ANN, old.ref)
        assert not stale.ok
        assert "latest" in stale.text
        assert not (await service.swipe("c", ANN, old.ref, 1)).ok
        elsewhere = await service.regenerate("other", ANN, new.ref)  # another channel's id
        assert not elsewhere.ok
        assert (await service.regenerate("c", BOB, new.ref)).ok  # Bob wrote here now
        assert (await _row(service, old.ref)).alternatives is None  # untouched
        await service.reset("c", ANN)
        assert not (await service.regenerate("c", ANN, new.ref)).ok  # an earlier conversation


async def test_each_scene_reply_is_rerolled_from_its_own_prompt(settings, queued_turns):
    async with open_services(settings) as (service, _):
        for name in ("Ash", "Birch", "Cedar"):
            await service.scene_add("c", ANN, name)
        answer = await service.handle_message("c", ANN, "Hello all.", "m1")
        originals = list(queued_turns)
        for one, turn in zip(answer.all(), originals, strict=True):
            again = await service.regenerate("c", ANN, one.ref)
            assert again.speaker == one.speaker
            assert queued_turns[-1].messages == turn.messages  # not the side-by-side replies
            assert queued_turns[-1].character == turn.character


async def test_a_reply_keeps_at_most_so_many_versions(settings):
    async with open_services(settings) as (service, _):
        await service.become("c", ANN, "Ash")
        first = await service.handle_message("c", ANN, "Hi.", "m1")
        for _ in range(MAX_ALTERNATIVES - 1):
            assert (await service.regenerate("c", ANN, first.ref)).ok
        full = await service.regenerate("c", ANN, first.ref)
        assert not full.ok
        assert f"at most {MAX_ALTERNATIVES}" in full.text
        async with service.sessions() as s:
            rows = list(
                await s.scalars(select(db.MessageRow).where(db.MessageRow.role == "character"))
            )
        assert [len(r.alternatives) for r in rows] == [MAX_ALTERNATIVES]


async def test_terminal_retry_and_alt(settings):
    out = io.StringIO()
    lines = iter(["/become Ash", "Hello!", "/retry", "/alt 1", "/alt 7", "/alt x", "/quit"])

    async def read_line():
        return next(lines, None)

    async with open_services(settings) as (service, moderation):
        await Terminal(service, moderation, "t", "Ann", out).run(read_line)
        async with service.sessions() as s:
            row = await s.scalar(select(db.MessageRow).where(db.MessageRow.role == "character"))
    text = out.getvalue()
    assert "  [2/2]\n" in text
    assert f"Ash: {row.alternatives[0]}  [1/2]\n" in text
    assert "[That reply has versions 1 to 2.]" in text
    assert "[usage: /alt N, a version number from 1]" in text
    assert row.content == row.alternatives[0]
