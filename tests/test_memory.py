"""Memory and lorebooks: recall of lines that left the history window, and a card's
`character_book` entries firing on their keys. Real SQLite file, in-process queue and
worker, the tiny model and the packaged role encoder."""

import json

import pytest
from sqlalchemy import select

from neeko import db
from neeko.characters import LOCAL
from neeko.chat_types import Author
from neeko.lore import Lorebook
from neeko.wiring import open_services

ANN = Author("u1", "Ann", scope=LOCAL)
MOD = Author("m1", "Mo", moderator=True, scope=LOCAL)
FILLER = [
    "The weather report says rain tomorrow afternoon.",
    "Trains to the coast leave every hour from platform two.",
    "Accounting software needs an update before the audit.",
    "Bicycle tyres should be pumped to the right pressure.",
    "The museum opens at nine on weekdays and ten on Sundays.",
    "Quarterly reports are due at the end of the month.",
]


@pytest.fixture
def settings(chat_settings):
    return chat_settings.model_copy(update={"history_tokens": 64, "memory_tokens": 40})


async def _talk(service, channel, lines, start=0):
    for i, line in enumerate(lines, start):
        assert (await service.handle_message(channel, ANN, line, f"{channel}-{i}")).ok


async def test_lines_out_of_the_window_are_recalled_by_relevance(settings, queued_turns):
    fact = "My cat is called Pickles and she loves sardines."
    async with open_services(settings) as (service, _):
        await service.become("c", ANN, "Ash")
        await _talk(service, "c", [fact, *FILLER])
        await _talk(service, "c", ["What is my cat called, and what does she eat?"], 10)
        system = queued_turns[-1].messages[0].content
        window = [m.content for m in queued_turns[-1].messages[1:]]
        assert not any(fact in line for line in window)  # out of the window ...
        assert "Earlier in this conversation:" in system
        recalled = system.split("Earlier in this conversation:\n", 1)[1].splitlines()
        assert f"Ann: {fact}" in recalled  # ... and recalled
        assert sum(service.count_tokens(line) + 4 for line in recalled) <= 40
        shown = await service.memory("c", LOCAL)
        assert f"Ash recalled:\n  Ann: {fact}" in shown.text
        async with service.sessions() as s:
            rows = list(await s.scalars(select(db.MessageRow).order_by(db.MessageRow.id)))
        embedded = [r for r in rows if r.embedding is not None]
        assert embedded
        assert all(len(r.embedding) == 384 * 4 for r in embedded)
        assert rows[-1].embedding is None  # the newest lines are in the window, not embedded
        # another channel with the same question recalls nothing of channel c
        await service.become("d", ANN, "Ash")
        await _talk(service, "d", [*FILLER, "What is my cat called, and what does she eat?"])
        assert "Pickles" not in queued_turns[-1].messages[0].content
        await service.reset("c", ANN)  # a new conversation recalls nothing of the old one
        await _talk(service, "c", [*FILLER, "What is my cat called, and what does she eat?"], 20)
        assert "Pickles" not in queued_turns[-1].messages[0].content


async def test_no_recall_when_off_or_nothing_is_alike(settings, queued_turns):
    async with open_services(settings.model_copy(update={"memory_tokens": 0})) as (service, _):
        await _talk(service, "c", ["My cat is called Pickles.", *FILLER, "My cat's name?"])
        assert "Earlier in this conversation" not in queued_turns[-1].messages[0].content
        shown = await service.memory("c", LOCAL)
        assert shown.text == "Nothing was recalled for the last reply."


BOOK = {
    "name": "Harbour lore",
    "scan_depth": 2,
    "token_budget": 500,
    "entries": [
        {"keys": ["Salt Widow"], "content": "The Salt Widow is a black-sailed frigate.",
         "insertion_order": 2, "name": "ship"},
        {"keys": ["kraken"], "secondary_keys": ["tentacle", "ink"], "selective": True,
         "content": "The kraken sleeps under Gull Rock.", "insertion_order": 1},
        {"keys": ["Port Royal"], "content": "Port Royal is the harbour town.",
         "enabled": False},
        {"keys": [], "constant": True, "content": "Storm season has begun.",
         "insertion_order": 0, "name": "season"},
        {"keys": ["RUM"], "case_sensitive": True, "content": "RUM is the smugglers' code."},
        {"keys": "not a list", "content": "malformed keys"},
        "not an entry",
        {"keys": ["empty"], "content": "   "},
    ],
}  # fmt: skip


def _fired(book, *recent, budget=1000):
    return [e.content for e in book.fire(list(recent), len, budget)]


def test_lorebook_entries_fire_on_their_keys_and_not_otherwise():
    book = Lorebook.from_card_data(BOOK)
    assert [e.label() for e in book.entries] == [
        "ship",
        "kraken",
        "season",
        "RUM",
    ]  # disabled, malformed and empty entries are dropped
    assert _fired(book, "hello") == ["Storm season has begun."]  # constant only
    assert _fired(book, "Have you seen the salt widow?") == [
        "Storm season has begun.",
        "The Salt Widow is a black-sailed frigate.",
    ]
    assert "The Salt Widow is a black-sailed frigate." not in _fired(book, "salt widows")
    assert "The kraken sleeps under Gull Rock." not in _fired(book, "a kraken!")  # selective
    assert _fired(book, "a kraken!", "its tentacle") == [
        "Storm season has begun.",
        "The kraken sleeps under Gull Rock.",
    ]
    assert "The kraken sleeps under Gull Rock." not in _fired(book, "a kraken!", "x", "ink")
    # scan depth 2: the kraken is three messages back
    assert "RUM is the smugglers' code." in _fired(book, "bring the RUM")
    assert "RUM is the smugglers' code." not in _fired(book, "bring the rum")
    # the budget keeps the highest priority (ties: file order), then insertion order
    small = _fired(book, "salt widow", budget=len("Storm season has begun."))
    assert small == ["Storm season has begun."]


def test_lorebooks_from_hostile_cards_are_capped_or_ignored():
    assert Lorebook.from_card_data(None) is None
    assert Lorebook.from_card_data({"entries": "x"}) is None
    assert Lorebook.from_card_data({"entries": [{"keys": ["a"]}]}) is None
    huge = {"entries": [{"keys": ["k"] * 500, "content": "x" * 100_000}] * 10_000}
    book = Lorebook.from_card_data(huge)
    assert len(book.entries) == 500
    assert len(book.entries[0].keys) == 50
    assert len(book.entries[0].content) == 8000
    weird = Lorebook.from_card_data(
        {"scan_depth": "deep", "token_budget": True, "entries": [{"keys": ["a"], "content": "b",
         "priority": 1e300, "insertion_order": None}]}
    )  # fmt: skip
    assert (weird.scan_depth, weird.token_budget) == (4, None)
    assert weird.entries[0].priority == 10**9


async def test_a_cards_lorebook_goes_into_its_own_prompt(settings, queued_turns):
    card = {
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {"name": "Marlow", "description": "A harbour pilot.", "character_book": BOOK},
    }
    async with open_services(settings) as (service, moderation):
        added = await moderation.submit(MOD, card=json.dumps(card).encode(), filename="m.json")
        assert added.ok, added.text
        await service.scene_add("c", ANN, "Marlow")
        await service.scene_add("c", ANN, "Ash")
        await service.handle_message("c", ANN, "Is that the Salt Widow?", "m1")
        marlow, ash = queued_turns[-2], queued_turns[-1]
        assert "The Salt Widow is a black-sailed frigate." in marlow.messages[0].content
        assert "Storm season has begun." in marlow.messages[0].content
        assert "Salt Widow is a" not in ash.messages[0].content  # Ash's card has no book
        shown = await service.memory("c", LOCAL)
        assert "Marlow's lorebook: season, ship" in shown.text
        await service.handle_message("c", ANN, "Nice weather.", "m2")
        await service.handle_message("c", ANN, "Indeed.", "m3")
        assert "black-sailed" not in queued_turns[-2].messages[0].content  # out of scan depth
