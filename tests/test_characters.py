"""Catalog, gating, starter cast, expansion: the paper's method on the tiny model."""

import json
import time

import pytest
import torch

from neeko import catalog as catalog_mod
from neeko import characters as chars_mod
from neeko.cards import card_from_fields
from neeko.catalog import Catalog
from neeko.characters import CatalogError, read_cast, scope_key, system_prompt
from neeko.dialogues import Dialogue, read_dialogues
from neeko.errors import GateError
from neeko.gating import GateConfig, RoleEncoder, fit_gate, fusion_gate
from neeko.lora import LoRABank
from neeko.runtime import Runtime
from neeko.store_ops import read_roles
from neeko.train import TrainConfig, character_examples, expand, pretune, token_nll

PIRATE = card_from_fields(
    "Captain Mara Vell",
    "A weathered pirate captain who speaks in salty sea slang.",
    aliases=["Mara", "Captain Vell"],
)
DETECTIVE = card_from_fields(
    "Inspector Edmund Gray", "A precise Victorian detective in foggy London.", aliases=["Gray"]
)
ROBOT = card_from_fields("BOLT-7", "A cheerful helper robot who beeps and counts odds.")


def test_keys_and_system_prompt():
    assert scope_key("shared", "Captain Mara Vell") == "captain_mara_vell"
    assert scope_key("shared", "BOLT-7") == "bolt_7"
    prompt = system_prompt(PIRATE)
    assert prompt.startswith("You are Captain Mara Vell. A weathered pirate captain")
    assert prompt.endswith("reply as Captain Mara Vell.")


def test_encoder_size_follows_the_model():
    enc = RoleEncoder()
    emb = enc.encode(["a grumpy sea captain", "a detective"])
    assert emb.shape == (2, enc.dim)
    assert enc.dim == 384  # all-MiniLM-L6-v2; read from the model, not hard-coded
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_fusion_gate_is_a_sharp_softmax_over_the_nearest():
    embs = torch.eye(4)
    query = torch.tensor([0.9, 0.4, 0.1, 0.0])
    gate = fusion_gate(query, embs, [10, 11, 12, 13], GateConfig(tau=0.1, top_k=2))
    assert list(gate) == [10, 11]
    assert sum(gate.values()) == pytest.approx(1.0)
    assert gate[10] > 0.9
    flat = fusion_gate(query, embs, [10, 11, 12, 13], GateConfig(tau=10.0, top_k=2))
    assert flat[10] < gate[10]


def test_fit_gate_learns_and_keeps_frozen_rows_exact():
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    targets = torch.arange(3).repeat_interleave(10)
    emb = torch.nn.functional.normalize(centres[targets] + 0.1 * torch.randn(30, 16), dim=-1)
    start = torch.randn(3, 16)
    fitted = fit_gate(emb, targets, start)
    assert ((emb @ fitted.T).argmax(-1) == targets).all()
    only_last = fit_gate(emb, targets, start, trainable=[2])
    assert torch.equal(only_last[:2], start[:2])
    assert not torch.equal(only_last[2], start[2])
    with pytest.raises(GateError, match="does not fit"):
        fit_gate(emb, targets[:5], start)


@pytest.fixture
def catalog(tmp_path):
    cat = Catalog(tmp_path / "store")
    for card in (PIRATE, DETECTIVE, ROBOT):
        cat.add(card, status="trained")
    return cat


@pytest.fixture
def rt(catalog, tiny, bank):
    """`catalog`'s three characters on blocks 0, 1, 2 of `bank`."""
    slots = {c.key: i for i, c in enumerate(catalog.trained())}
    return Runtime(catalog, tiny, bank, None, slots)


def test_resolve_exact_alias_misspelling_and_free_text(catalog, rt):
    assert catalog.resolve("captain vell").character.name == "Captain Mara Vell"
    assert catalog.resolve("  INSPECTOR   edmund gray ").character.name == "Inspector Edmund Gray"
    near = catalog.resolve("Captian Mara Vel")
    assert near.kind == "suggestions"
    assert near.suggestions == ("Captain Mara Vell",)
    persona = catalog.resolve("a grumpy old sea dog")
    assert persona.kind == "persona"
    gate = rt.persona_gate(persona.text)
    assert max(gate, key=gate.get) == rt.slots[catalog.find("Mara").key]


def test_names_and_aliases_are_unique(catalog):
    with pytest.raises(CatalogError, match="already taken"):
        catalog.add(card_from_fields("Mara", "Another Mara."))


def test_fuse_is_fast_and_mixes_trained_characters(catalog, rt):
    catalog.encoder
    t0 = time.perf_counter()
    char = catalog.add(card_from_fields("Old Salt", "A gruff old sailor of the high seas."))
    # one embedding and a softmax (~0.1 s); training a block would take minutes. The bound
    # leaves room for a busy CPU (1.0 s failed once with training beside the suite).
    assert time.perf_counter() - t0 < 5.0
    assert char.status == "fused"
    assert sum(char.mix.values()) == pytest.approx(1.0)
    assert max(char.mix, key=char.mix.get) == "captain_mara_vell"
    assert set(rt.gate(char.key)) <= {0, 1, 2}


def test_store_round_trip_and_atomic_save(catalog, monkeypatch):
    catalog.save()
    again = Catalog.open(catalog.folder)
    assert [c.name for c in again.characters.values()] == [
        c.name for c in catalog.characters.values()
    ]
    assert all(
        torch.equal(again.embedding(c.key), catalog.embedding(c.key)) for c in again.visible()
    )
    manifest = (catalog.folder / "manifest.json").read_text()

    catalog.add(card_from_fields("Newcomer", "Someone new."))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(catalog_mod.json, "dumps", crash)
    with pytest.raises(OSError, match="disk full"):
        catalog.save()
    assert (catalog.folder / "manifest.json").read_text() == manifest
    assert not list(catalog.folder.glob("*.tmp"))


def test_unreadable_store_is_a_clear_error(tmp_path):
    with pytest.raises(CatalogError, match="not a character store"):
        Catalog.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(CatalogError, match="version 99"):
        Catalog.open(tmp_path)


def test_starter_cast_is_complete():
    cast = read_cast()
    assert len(cast) >= 4
    assert len({m.card.name for m in cast}) == len(cast)
    for m in cast:
        exchanges = [
            sum(1 for role, _ in d.messages if role == "character")
            for path in (m.train, m.heldout)
            for d in read_dialogues(path)
        ]
        assert sum(exchanges) >= 40, m.card.name
        assert all(d.character == m.card.name for d in read_dialogues(m.train))
    roles = read_roles(chars_mod.CAST_DIR / "roles.jsonl")
    assert {name for _, name in roles} == {m.card.name for m in cast}


def _dialogues(name, lines):
    return [
        Dialogue(name, [("user", q), ("character", a)], f"t:{i}") for i, (q, a) in enumerate(lines)
    ]


PIRATE_LINES = [
    ("Who are you?", "Arr, Captain Mara Vell of the Salt Widow!"),
    ("Any advice?", "Never trust the navy, matey."),
]
DETECTIVE_LINES = [("Any clues?", "Most singular: the ash is from a Trichinopoly cigar.")]
ROBOT_LINES = [
    ("Hello!", "*beep-boop!* Greetings, friend! Odds of a fine day: 97 percent!"),
    ("Can you help?", "*beep!* Helping is my favourite function!"),
]


def test_expansion_leaves_old_characters_bit_identical(tiny, tmp_path):
    bank = LoRABank(tiny.model)
    catalog = Catalog(tmp_path / "store")
    rt = Runtime(catalog, tiny, bank, None)
    cfg = TrainConfig(epochs=3, lr=1e-2, batch_size=2)
    pretune(
        rt,
        [
            (PIRATE, _dialogues(PIRATE.name, PIRATE_LINES)),
            (DETECTIVE, _dialogues(DETECTIVE.name, DETECTIVE_LINES)),
        ],
        cfg,
        progress=False,
    )
    ids = torch.tensor([[1, 200, 3000, 45, 9, 800]])
    gates = [rt.gate(c.key) for c in catalog.trained()]

    def outputs():
        with torch.inference_mode(), bank.route(gates):
            return tiny.model(ids.repeat(len(gates), 1)).logits

    before = outputs()
    robot = _dialogues(ROBOT.name, ROBOT_LINES)
    fused = rt.mix_gate(catalog.fusion_weights(catalog.encoder.encode([ROBOT.persona_text()])[0]))
    rows_before = dict(catalog.gate_rows)
    assert set(rows_before) == {c.key for c in catalog.trained()}
    expand(rt, ROBOT, robot, TrainConfig(epochs=10, lr=1e-2), progress=False)
    assert torch.equal(outputs(), before)
    new = catalog.find("BOLT-7")
    # The learned gate gains a row for the new character; the old rows do not move.
    assert all(torch.equal(catalog.gate_rows[k], v) for k, v in rows_before.items())
    learned = GateConfig(policy="learned", top_k=1)
    for card in (PIRATE, DETECTIVE, ROBOT):
        query = catalog.encoder.encode([card.persona_text()])[0]
        assert list(catalog.fusion_weights(query, learned)) == [scope_key("shared", card.name)]
    assert new.status == "trained"
    assert rt.slots[new.key] == len(rt.shared) + 2  # after the shared block and the two others
    examples = character_examples(tiny, ROBOT, robot, rt.slots[new.key])
    own = sum(token_nll(tiny, bank, e, rt.gate(new.key))[0] for e in examples)
    mix = sum(token_nll(tiny, bank, e, fused)[0] for e in examples)
    assert own < mix
    reopened = Catalog.open(catalog.folder)
    assert [c.name for c in reopened.trained()] == [PIRATE.name, DETECTIVE.name, ROBOT.name]
    assert all(torch.equal(reopened.gate_rows[k], v) for k, v in catalog.gate_rows.items())
