"""The shared block: every character's gate is shared + own; expansion freezes both.

The block rank is a store setting too: chosen when a store is first trained, kept after.
"""

import copy
import dataclasses
import json
import shutil

import pytest
import torch
from peft import PeftModel

from neeko import model as model_lib
from neeko.cards import card_from_fields
from neeko.catalog import SHARED_BLOCK, Catalog
from neeko.characters import CatalogError
from neeko.cli import main
from neeko.dialogues import Dialogue
from neeko.errors import BlockFormatError
from neeko.lora import BankConfig, LoRABank
from neeko.peft_io import export_adapter
from neeko.runtime import empty_runtime, open_runtime
from neeko.store_ops import eval_store, shared_baseline, train_store
from neeko.train import (
    ANONYMOUS_PROMPT,
    TrainConfig,
    TrainingError,
    character_examples,
    expand,
    pretune,
    train_blocks,
)

IDS = torch.tensor([[5, 87, 1200, 33, 4021, 9, 77, 310, 2, 1000]])
STEPS = TrainConfig(epochs=1, max_steps=2, lr=5e-2, batch_size=2, shared_rank=8)


def _member(name: str, words: str) -> tuple:
    card = card_from_fields(name, f"{name} is a test character who talks about {words}.")
    lines = [
        Dialogue(name, [("user", f"Tell me about {w}."), ("character", f"{w}! {words}.")])
        for w in words.split()
    ]
    return card, lines


MEMBERS = [_member("Ash", "ember coal smoke"), _member("Birch", "bark leaf sap")]


def _logits(rt, gate, ids=IDS):
    with torch.inference_mode(), rt.bank.route([gate] * ids.shape[0]):
        return rt.loaded.model(ids).logits


def _merged(base, bank: LoRABank, gate: dict[int, float]):
    """A plain copy of the base model with `gate`'s blocks folded into its weights."""
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, layer in bank.layers.items():
            delta = sum(w * layer.B[k] @ layer.A[k] for k, w in gate.items())
            modules[name].weight += bank.config.scale * delta
    return model


@pytest.mark.parametrize("path", ["dense", "gathered", "reference"])
def test_shared_plus_own_gates_equal_merged_weights_on_every_path(tiny, path):
    """Rows of two characters, a fused persona and the base model, each on shared + its own."""
    base = copy.deepcopy(tiny.model)
    bank = LoRABank(tiny.model, BankConfig(path=path))
    gen = torch.Generator().manual_seed(5)
    shared = bank.add_blocks(3, init="random", generator=gen, b_scale=0.5)
    own = bank.add_blocks(3, init="random", generator=gen, b_scale=0.5)
    every = dict.fromkeys(shared, 1.0)
    gates = [
        {**every, own[0]: 1.0},
        {**every, own[2]: 1.0},
        {**every, own[0]: 0.25, own[1]: 0.75},
        {},
    ]
    ids = IDS.repeat(len(gates), 1)
    with torch.inference_mode():
        with bank.route(bank.routing(gates, path=path)):
            ours = tiny.model(ids).logits
        for i, gate in enumerate(gates):
            want = _merged(base, bank, gate)(IDS).logits[0]
            assert torch.allclose(ours[i], want, atol=1e-4), (path, i)
            assert not gate or not torch.allclose(want, base(IDS).logits[0])


def test_save_blocks_is_one_lora_and_splits_back_exactly(tmp_path, tiny):
    bank = LoRABank(tiny.model)
    blocks = bank.add_blocks(3, init="random", generator=torch.Generator().manual_seed(2))
    path = bank.save_blocks(blocks[:2], tmp_path / "shared.safetensors")
    parts = bank.read_blocks(path)
    assert len(parts) == 2
    for k, part in zip(blocks[:2], parts, strict=True):
        want = bank.get_block(k)
        assert all(torch.equal(part[n][i], want[n][i]) for n in want for i in (0, 1))
    with pytest.raises(BlockFormatError, match="holds 2 blocks"):
        bank.read_block(path)  # a character's block is one block
    assert len(bank.read_blocks(bank.save_block(blocks[2], tmp_path / "one.safetensors"))) == 1


@pytest.mark.parametrize("schedule", ["joint", "staged", "own-first"])
def test_pretune_trains_a_shared_block_every_gate_adds(tmp_path, schedule):
    rt = empty_runtime(Catalog(tmp_path / "store"), "tiny")
    cfg = TrainConfig(**{**STEPS.__dict__, "schedule": schedule})
    report = pretune(rt, MEMBERS, cfg, progress=False)
    assert report.steps == (2 if schedule == "joint" else 4)
    assert rt.catalog.shared_rank == 8
    assert len(rt.shared) == 2
    ash = rt.catalog.find("Ash").key
    assert rt.gate(ash) == {**dict.fromkeys(rt.shared, 1.0), rt.slots[ash]: 1.0}
    shared_part = rt.bank.get_block(rt.shared[0])
    assert any(b.abs().sum() > 0 for _, b in shared_part.values())  # B left zero-init
    own_part = rt.bank.get_block(rt.slots[ash])
    assert any(b.abs().sum() > 0 for _, b in own_part.values())
    again = open_runtime(tmp_path / "store", "tiny")
    assert again.shared
    assert again.gate(ash).keys() == rt.gate(ash).keys()
    assert torch.equal(_logits(again, again.gate(ash)), _logits(rt, rt.gate(ash)))
    assert torch.equal(_logits(again, {}), _logits(rt, {}))  # the base model stays reachable
    birch = again.catalog.find("Birch").key
    assert not torch.equal(_logits(again, again.gate(ash)), _logits(again, again.gate(birch)))


def _same(one: dict, other: dict) -> bool:
    return all(torch.equal(one[n][i], other[n][i]) for n in one for i in (0, 1))


@pytest.mark.parametrize("schedule", ["staged", "own-first"])
def test_an_anonymous_shared_stage_trains_under_a_prompt_that_names_no_one(tmp_path, schedule):
    cfg = TrainConfig(**{**STEPS.__dict__, "schedule": schedule})
    trained = {}
    for prompt in ("card", "anonymous"):
        rt = empty_runtime(Catalog(tmp_path / prompt), "tiny")
        pretune(rt, MEMBERS, dataclasses.replace(cfg, shared_prompt=prompt), progress=False)
        trained[prompt] = rt
    # The reference: the same stages by hand, the shared one on lines under ANONYMOUS_PROMPT.
    rt = empty_runtime(Catalog(tmp_path / "ref"), "tiny")
    gen = torch.Generator().manual_seed(cfg.seed)
    shared = rt.bank.add_blocks(2, "lora", gen)
    own = rt.bank.add_blocks(2, init="lora", generator=gen)
    lines = {}
    for system in (None, ANONYMOUS_PROMPT):
        lines[system] = [
            ex
            for (card, dialogues), k in zip(MEMBERS, own, strict=True)
            for ex in character_examples(rt.loaded, card, dialogues, k, system=system)
        ]
    kwargs = {"progress": False, "shared": shared}
    stage = {"train_own": False, "train_shared": True}
    if schedule == "staged":
        train_blocks(rt.loaded, rt.bank, lines[ANONYMOUS_PROMPT], cfg, **kwargs, **stage)
        train_blocks(rt.loaded, rt.bank, lines[None], cfg, **kwargs)
    else:
        train_blocks(rt.loaded, rt.bank, lines[None], cfg, progress=False)
        stage["own_in_gate"] = True
        train_blocks(rt.loaded, rt.bank, lines[ANONYMOUS_PROMPT], cfg, **kwargs, **stage)
    for want, mine in [(shared[0], "shared"), (own[0], "own")]:
        got = {
            p: trained[p].shared[0]
            if mine == "shared"
            else trained[p].slots[trained[p].catalog.find("Ash").key]
            for p in trained
        }
        reference = rt.bank.get_block(want)
        assert _same(trained["anonymous"].bank.get_block(got["anonymous"]), reference), mine
        # Own-first trains the own blocks under the cards before the shared stage.
        differs = mine == "shared" or schedule == "staged"
        assert differs != _same(trained["card"].bank.get_block(got["card"]), reference), mine
    with pytest.raises(ValueError, match="staged or own-first"):
        TrainConfig(shared_rank=8, shared_prompt="anonymous")


@pytest.mark.parametrize("schedule", ["staged", "own-first"])
def test_split_stage_data_deals_each_characters_dialogues_between_the_stages(tmp_path, schedule):
    cfg = TrainConfig(**{**STEPS.__dict__, "schedule": schedule, "stage_data": "split"})
    rt = empty_runtime(Catalog(tmp_path / "split"), "tiny")
    pretune(rt, MEMBERS, cfg, progress=False)
    # The reference: the first stage on each character's 1st and 3rd dialogue, the second
    # stage on its 2nd.
    ref = empty_runtime(Catalog(tmp_path / "ref"), "tiny")
    gen = torch.Generator().manual_seed(cfg.seed)
    shared = ref.bank.add_blocks(2, "lora", gen)
    own = ref.bank.add_blocks(2, init="lora", generator=gen)
    first, second = [
        [
            ex
            for (card, dialogues), k in zip(MEMBERS, own, strict=True)
            for ex in character_examples(ref.loaded, card, dialogues[part], k)
        ]
        for part in (slice(0, None, 2), slice(1, None, 2))
    ]
    shared_stage = {"progress": False, "shared": shared, "train_own": False, "train_shared": True}
    if schedule == "staged":
        train_blocks(ref.loaded, ref.bank, first, cfg, **shared_stage)
        train_blocks(ref.loaded, ref.bank, second, cfg, progress=False, shared=shared)
    else:
        train_blocks(ref.loaded, ref.bank, first, cfg, progress=False)
        train_blocks(ref.loaded, ref.bank, second, cfg, own_in_gate=True, **shared_stage)
    everyone = empty_runtime(Catalog(tmp_path / "all"), "tiny")
    pretune(everyone, MEMBERS, dataclasses.replace(cfg, stage_data="all"), progress=False)
    for (card, _), k in zip(MEMBERS, own, strict=True):
        want = ref.bank.get_block(k)
        split_block, all_block = (r.slots[r.catalog.find(card.name).key] for r in (rt, everyone))
        assert _same(rt.bank.get_block(split_block), want), card.name
        assert not _same(everyone.bank.get_block(all_block), want), card.name
    assert _same(rt.bank.get_block(rt.shared[0]), ref.bank.get_block(shared[0]))
    with pytest.raises(ValueError, match="staged or own-first"):
        TrainConfig(shared_rank=8, stage_data="split")
    with pytest.raises(ValueError, match="stage_data"):
        TrainConfig(shared_rank=8, schedule="staged", stage_data="halves")
    lonely = [(MEMBERS[0][0], MEMBERS[0][1][:1]), MEMBERS[1]]
    with pytest.raises(TrainingError, match="Ash: split stage data needs at least 2"):
        pretune(empty_runtime(Catalog(tmp_path / "one"), "tiny"), lonely, cfg, progress=False)


def test_a_stage_trains_only_its_blocks_under_the_full_gate(tiny):
    """Own-first's second stage: the shared block learns on top of frozen own blocks."""
    bank = LoRABank(tiny.model)
    gen = torch.Generator().manual_seed(3)
    shared = bank.add_blocks(2, init="lora", generator=gen)
    own = bank.add_blocks(2, init="random", generator=gen, b_scale=0.5)
    examples = [
        *character_examples(tiny, MEMBERS[0][0], MEMBERS[0][1], own[0]),
        *character_examples(tiny, MEMBERS[1][0], MEMBERS[1][1], own[1]),
    ]
    before = {k: bank.get_block(k) for k in own}
    cfg = TrainConfig(epochs=1, max_steps=2, lr=5e-2, batch_size=2)
    kwargs = {"progress": False, "shared": shared, "train_own": False, "train_shared": True}
    train_blocks(tiny, bank, examples, cfg, own_in_gate=True, **kwargs)
    for k, part in before.items():
        now = bank.get_block(k)
        assert all(torch.equal(now[n][i], part[n][i]) for n in part for i in (0, 1))
    assert any(b.abs().sum() > 0 for _, b in bank.get_block(shared[0]).values())
    with pytest.raises(TrainingError, match="outside"):
        train_blocks(tiny, bank, examples, cfg, progress=False, own_in_gate=False)


def test_expansion_with_a_shared_block_leaves_everyone_else_bit_identical(tmp_path):
    store = tmp_path / "store"
    pretune(empty_runtime(Catalog(store), "tiny"), MEMBERS, STEPS, progress=False)
    files = {p: p.read_bytes() for p in [store / SHARED_BLOCK, *(store / "blocks").iterdir()]}
    rt = open_runtime(store, "tiny")
    old = {c.key: _logits(rt, rt.gate(c.key)) for c in rt.catalog.trained()}
    shared_only = _logits(rt, rt.shared_gate())
    card, dialogues = _member("Cedar", "pine resin cone")
    expand(rt, card, dialogues, STEPS, progress=False)
    cedar = rt.catalog.find("Cedar").key
    assert rt.gate(cedar) == {**rt.shared_gate(), rt.slots[cedar]: 1.0}
    assert all(p.read_bytes() == data for p, data in files.items())
    for reopened in (rt, open_runtime(store, "tiny")):
        for key, logits in old.items():
            assert torch.equal(_logits(reopened, reopened.gate(key)), logits)
        assert torch.equal(_logits(reopened, reopened.shared_gate()), shared_only)
    assert not torch.equal(_logits(rt, rt.gate(cedar)), shared_only)


def test_peft_export_of_shared_plus_own_is_exact(tmp_path):
    rt = empty_runtime(Catalog(tmp_path / "store"), "tiny")
    pretune(rt, MEMBERS, STEPS, progress=False)
    ash = rt.catalog.find("Ash").key
    folder = export_adapter(rt.bank, rt.gate(ash), tmp_path / "ash")
    peft = PeftModel.from_pretrained(model_lib.load("tiny").model, str(folder))
    with torch.inference_mode():
        theirs = peft(IDS).logits
    assert torch.allclose(theirs, _logits(rt, rt.gate(ash)), atol=1e-4)
    assert not torch.allclose(theirs, _logits(rt, rt.own_gate(ash)), atol=1e-4)


def test_a_store_without_a_shared_block_keeps_working(tiny_store, tmp_path):
    rt = open_runtime(tiny_store, "tiny")
    assert rt.shared == ()
    assert rt.catalog.shared_rank == 0
    key = rt.catalog.trained()[0].key
    assert rt.gate(key) == {rt.slots[key]: 1.0}
    # Pre-tuning more characters into it cannot add a shared block under the old ones.
    store = tmp_path / "copy"
    shutil.copytree(tiny_store, store)
    rt = open_runtime(store, "tiny")
    pretune(
        rt, [_member("Ivy", "vine leaf"), _member("Juniper", "berry gin")], STEPS, progress=False
    )
    assert rt.shared == ()
    assert Catalog.open(store).shared_rank == 0
    with pytest.raises(CatalogError, match="without a shared block"):
        rt.catalog.set_shared(8)


def test_shared_rank_must_be_a_multiple_of_the_block_rank(tmp_path):
    rt = empty_runtime(Catalog(tmp_path / "store"), "tiny")
    with pytest.raises(TrainingError, match="multiple"):
        pretune(rt, MEMBERS, TrainConfig(shared_rank=6, max_steps=1), progress=False)
    assert not (tmp_path / "store" / "manifest.json").exists()


def test_cli_exports_a_character_as_one_adapter(tmp_path, capsys):
    rt = empty_runtime(Catalog(tmp_path / "store"), "tiny")
    pretune(rt, MEMBERS, STEPS, progress=False)
    args = ["export", "--model", "tiny", "--store", str(tmp_path / "store"), "--out"]
    assert main([*args, str(tmp_path / "ash"), "--character", "ash"]) == 0
    assert "Ash: PEFT LoRA adapter of rank 12" in capsys.readouterr().out  # shared 8 + own 4
    peft = PeftModel.from_pretrained(model_lib.load("tiny").model, str(tmp_path / "ash"))
    with torch.inference_mode():
        assert torch.allclose(peft(IDS).logits, _logits(rt, rt.gate("ash")), atol=1e-4)
    assert main([*args, str(tmp_path / "x"), "--character", "Nobody"]) == 1
    assert "no character is called 'Nobody'" in capsys.readouterr().err


RANK8 = dataclasses.replace(STEPS, rank=8, shared_rank=16)


def _train(store, config=RANK8, members=MEMBERS):
    cards = [card for card, _ in members]
    return train_store(store, cards, [d for _, ds in members for d in ds], "tiny", config)


def test_a_store_keeps_the_rank_it_was_first_trained_with(tmp_path):
    store = tmp_path / "store"
    _train(store)
    manifest = json.loads((store / "manifest.json").read_text())
    assert (manifest["rank"], manifest["shared_rank"]) == (8, 16)
    rt = open_runtime(store, "tiny")
    assert rt.bank.config.rank == 8
    assert rt.bank.config.scale == BankConfig().scale  # alpha grows with the rank
    assert len(rt.shared) == 2
    ash = rt.catalog.find("Ash").key
    for a, b in rt.bank.get_block(rt.slots[ash]).values():
        assert (a.shape[0], b.shape[1]) == (8, 8)
    # Training more into it, or expanding it, at another rank is refused; nothing changes.
    files = {p: p.read_bytes() for p in [store / SHARED_BLOCK, *(store / "blocks").iterdir()]}
    with pytest.raises(TrainingError, match="rank 8, not 4"):
        _train(store, dataclasses.replace(RANK8, rank=4), [_member("Ivy", "vine leaf")])
    card, dialogues = _member("Cedar", "pine resin cone")
    with pytest.raises(TrainingError, match="rank 8, not 4"):
        expand(rt, card, dialogues, dataclasses.replace(STEPS, rank=4), progress=False)
    assert rt.catalog.find("Cedar") is None
    assert {p: p.read_bytes() for p in files} == files
    assert sorted((store / "blocks").iterdir()) == sorted(
        p for p in files if p.parent.name == "blocks"
    )
    # At the store's rank (or none given) expansion works and the others stay bit-identical.
    old = _logits(rt, rt.gate(ash))
    expand(rt, card, dialogues, STEPS, progress=False)
    again = open_runtime(store, "tiny")
    assert torch.equal(_logits(again, again.gate(ash)), old)
    cedar = again.catalog.find("Cedar").key
    assert again.bank.get_block(again.slots[cedar])[next(iter(again.bank.layers))][0].shape[0] == 8


def test_peft_export_of_a_rank_8_character_is_exact(tmp_path, capsys):
    store = tmp_path / "store"
    _train(store)
    rt = open_runtime(store, "tiny")
    ash = rt.catalog.find("Ash").key
    folder = export_adapter(rt.bank, rt.gate(ash), tmp_path / "ash")
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 24  # 16 + 8
    peft = PeftModel.from_pretrained(model_lib.load("tiny").model, str(folder))
    with torch.inference_mode():
        assert torch.allclose(peft(IDS).logits, _logits(rt, rt.gate(ash)), atol=1e-4)


def test_the_rank_is_checked_when_a_store_is_read_or_set(tmp_path):
    store = tmp_path / "store"
    _train(store)
    manifest = json.loads((store / "manifest.json").read_text())
    catalog = Catalog.open(store)
    with pytest.raises(CatalogError, match="rank 8, not 4"):
        catalog.set_rank(4)
    catalog.set_rank(8)  # the same rank is fine
    for bad, match in ((12, "not a multiple"), (0, "rank"), (10_000, "rank")):
        broken = tmp_path / f"broken{bad}"
        broken.mkdir()
        key = "shared_rank" if bad == 12 else "rank"
        (broken / "manifest.json").write_text(json.dumps({**manifest, key: bad}))
        with pytest.raises(CatalogError, match=match):
            Catalog.open(broken)
    with pytest.raises(ValueError, match="rank must be"):
        TrainConfig(rank=0)


@pytest.fixture
def fresh_baselines(tmp_path, monkeypatch) -> None:
    """A cache with no baselines in it that shares the model conversion of the real one.

    A new empty cache would convert the packaged model again (~30 s) for the tokenizer.
    """
    model_dir = model_lib.default_model_dir()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / model_dir.name).symlink_to(model_dir, target_is_directory=True)
    monkeypatch.setenv("NEEKO_CACHE_DIR", str(cache))


@pytest.mark.usefixtures("fresh_baselines")
def test_the_baseline_has_the_stores_total_rank():
    cfg = dataclasses.replace(RANK8, max_steps=1)
    shared = shared_baseline(MEMBERS, "tiny", cfg)
    assert shared.trained  # not an earlier run's cached baseline
    assert shared.bank.config.rank == 16 + 8 * len(MEMBERS)
    assert shared.bank.config.scale == BankConfig().scale


@pytest.mark.usefixtures("fresh_baselines")
def test_eval_takes_the_baseline_rank_from_the_store(tmp_path):
    store = tmp_path / "store"
    _train(store)
    dialogues = [d for _, ds in MEMBERS for d in ds]
    cfg = dataclasses.replace(STEPS, max_steps=1, shared_rank=16)  # no rank given
    result = eval_store(store, dialogues[:2], "tiny", dialogues, config=cfg, speaker_id=False)
    assert result["baseline"]["rank"] == 16 + 8 * len(MEMBERS)


def test_cli_train_takes_a_rank(tmp_path, capsys):
    cards, data = [], tmp_path / "train.jsonl"
    rows = []
    for card, dialogues in MEMBERS:
        path = tmp_path / f"{card.name}.json"
        path.write_text(json.dumps(card.to_v2()))
        cards.append(str(path))
        rows += [
            {
                "character": d.character,
                "messages": [{"role": r, "content": t} for r, t in d.messages],
            }
            for d in dialogues
        ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    store = tmp_path / "store"
    args = ["train", "--model", "tiny", "--store", str(store), "--cards", *cards]
    assert main([*args, "--data", str(data), "--max-steps", "1", "--rank", "2"]) == 0
    assert Catalog.open(store).rank == 2
    assert open_runtime(store, "tiny").bank.config.rank == 2
