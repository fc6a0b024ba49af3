"""`neeko eval`: fused characters, batched scoring, speaker identification, cuts, budgets."""

import argparse
import json
import re
from pathlib import Path

import pytest

from neeko.cards import card_from_fields
from neeko.catalog import Catalog
from neeko.cli import TRAIN_DEFAULTS, main
from neeko.dialogues import Dialogue, encode
from neeko.evaluate import evaluate, turn_nlls, wilson_interval
from neeko.runtime import empty_runtime, open_runtime
from neeko.train import TrainConfig, character_examples, pretune, token_nll


def _member(name: str, topic: str, n: int = 3) -> tuple:
    card = card_from_fields(name, f"{name} always talks about {topic}.")
    lines = [
        Dialogue(name, [("user", f"Question {i}?"), ("character", f"{topic} {i}, of course.")])
        for i in range(n)
    ]
    return card, lines


@pytest.fixture
def store(tmp_path) -> Path:
    """Three characters pre-tuned for a few steps with a shared block, and one fused."""
    folder = tmp_path / "store"
    rt = empty_runtime(Catalog(folder), "tiny")
    members = [_member("Ash", "fire"), _member("Birch", "trees"), _member("Cedar", "resin")]
    pretune(rt, members, TrainConfig(max_steps=3, lr=5e-2, shared_rank=4), progress=False)
    rt.catalog.add(card_from_fields("Dune", "Dune always talks about sand."), "shared", "fused")
    rt.catalog.save()
    return folder


def test_turn_nlls_equal_single_row_token_nll(store):
    rt = open_runtime(store, "tiny")
    ash = rt.catalog.find("Ash")
    two_turns = Dialogue(
        "Ash", [("user", "Hi?"), ("character", "Fire."), ("user", "And?"), ("character", "Ash!")]
    )
    (ex,) = character_examples(rt.loaded, ash.card, [two_turns], -1)
    gates = [rt.gate(ash.key), rt.own_gate(ash.key), {}]
    turns = turn_nlls(rt.loaded, rt.bank, ex, gates)
    assert turns.shape == (3, 2)
    for row, gate in zip(turns, gates, strict=True):
        total, _ = token_nll(rt.loaded, rt.bank, ex, gate)
        assert float(row.sum()) == pytest.approx(total, rel=1e-4)


def test_eval_scores_a_fused_character_and_identifies_speakers(store):
    rt = open_runtime(store, "tiny")
    heldout = {
        rt.catalog.find(name).key: _member(name, topic, 2)[1]
        for name, topic in (("Ash", "fire"), ("Birch", "trees"), ("Cedar", "resin"))
    }
    heldout[rt.catalog.find("Dune").key] = _member("Dune", "sand", 2)[1]
    result = evaluate(rt, heldout)
    dune = result["characters"]["Dune"]
    assert dune["status"] == "fused"
    assert dune["nll_own"] > 0
    assert "nll_own_block" not in dune
    ash = result["characters"]["Ash"]
    assert {"nll_own", "nll_own_block", "nll_shared_block", "nll_fused", "nll_base"} <= set(ash)
    assert ash["nll_own"] < ash["nll_base"]  # a few steps on these very lines
    sid = result["speaker_id"]
    assert (sid["characters"], sid["turns"], sid["chance"]) == (3, 6, pytest.approx(1 / 3))
    assert 0 <= sid["accuracy"] <= 1
    low, high = sid["ci95"]
    assert 0 <= low <= sid["accuracy"] <= high <= 1
    assert sid["by_character"].keys() == {"Ash", "Birch", "Cedar"}  # not the fused Dune
    assert all(v["turns"] == 2 for v in sid["by_character"].values())
    right = sum(v["hits"] for v in sid["by_character"].values())
    assert sid["accuracy"] == right / 6
    for name, v in sid["by_character"].items():  # every turn went to one trained voice
        assert set(v["guesses"]) <= {"Ash", "Birch", "Cedar"}
        assert sum(v["guesses"].values()) == v["turns"]
        assert v["guesses"].get(name, 0) == v["hits"]
    assert result["compare"]["own_vs_base"]["of"] == 3  # trained characters only
    assert set(result["mean"]) >= {"nll_own", "nll_base"}


def test_wilson_interval_matches_the_textbook_values():
    # 24 of 80: p = 0.3, z^2/n = 0.048; centre 0.324 / 1.048, half-width 0.0985.
    low, high = wilson_interval(24, 80)
    assert (low, high) == (pytest.approx(0.21064, abs=1e-5), pytest.approx(0.40769, abs=1e-5))
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(6, 6)[1] == 1.0
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    with pytest.raises(ValueError, match="no trials"):
        wilson_interval(0, 0)


def test_speaker_id_finds_the_voice_that_was_trained(tmp_path):
    """Blocks trained hard on distinct words pick their own character's held-out turns."""
    rt = empty_runtime(Catalog(tmp_path / "s"), "tiny")
    members = [_member("Ash", "fire fire fire", 4), _member("Birch", "trees trees trees", 4)]
    pretune(rt, members, TrainConfig(epochs=6, lr=5e-2, shared_rank=0), progress=False)
    heldout = {rt.catalog.find(c.name).key: d[:2] for c, d in members}
    sid = evaluate(rt, heldout)["speaker_id"]
    assert sid["accuracy"] == 1.0
    assert {n: v["guesses"] for n, v in sid["by_character"].items()} == {
        "Ash": {"Ash": 2},
        "Birch": {"Birch": 2},
    }


def test_cut_dialogues_are_reported_not_hidden(store):
    rt = open_runtime(store, "tiny")
    long_reply = " ".join(["fire"] * 300)
    dialogue = Dialogue("Ash", [("user", "Tell me."), ("character", long_reply)])
    ash = rt.catalog.find("Ash")
    full = encode(rt.loaded.tokenizer, "x", dialogue, 4096)
    assert full.dropped == 0
    result = evaluate(rt, {ash.key: [dialogue]}, max_tokens=120, speaker_id=False)
    cut = result["cut"]
    assert cut["max_tokens"] == 120
    assert cut["dialogues_cut"] == 1
    kept = result["characters"]["Ash"]["tokens"]
    assert cut["tokens_dropped"] > 0
    assert kept + cut["tokens_dropped"] >= 300


def test_cli_eval_of_fused_characters_and_a_budgeted_baseline(store, capsys, tmp_path):
    held = tmp_path / "held.jsonl"
    rows = [
        {
            "character": n,
            "messages": [
                {"role": "user", "content": "Hi?"},
                {"role": "character", "content": f"{t}!"},
            ],
        }
        for n, t in (("Ash", "fire"), ("Birch", "trees"), ("Dune", "sand"))
    ]
    held.write_text("\n".join(json.dumps(r) for r in rows))
    train = tmp_path / "train.jsonl"
    train.write_text(
        "\n".join(
            json.dumps({"character": n, "messages": [{"role": "character", "content": "Yes."}]})
            for n in ("Ash", "Birch", "Cedar", "Dune")
        )
    )
    args = ["eval", "--model", "tiny", "--store", str(store), "--data", str(held)]
    baseline = ["--train-data", str(train), "--max-steps", "1", "--shared-rank", "4"]
    assert main([*args, *baseline]) == 0
    out = capsys.readouterr().out
    assert "[fused]" in out
    assert "shared LoRA baseline (rank 16, " in out
    assert "speaker identification: " in out  # Ash and Birch, one turn each
    for name, other in (("Ash", "Birch"), ("Birch", "Ash")):  # a hit, or who won instead
        assert re.search(rf"^  {name} +(1/1$|0/1  \(else: {other} 1\)$)", out, re.M), out
    # "Yes." trains both voices alike and "fire!"/"trees!" are unseen: a tie, won by Ash.
    assert "  words alone (naive Bayes on the training turns): 0.500 (1/2)" in out
    assert main([*args, *baseline, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["speaker_id"]["words"] == {"accuracy": 0.5, "hits": 1, "turns": 2, "alpha": 1.0}
    assert result["baseline"]["rank"] == 16
    assert not result["baseline"]["trained_now"]
    assert Path(result["baseline"]["path"]).exists()
    assert "nll_shared" in result["characters"]["Ash"]


def test_cli_defaults_are_the_training_defaults():
    cfg = TrainConfig()
    assert {k: getattr(cfg, k) for k in TRAIN_DEFAULTS} == TRAIN_DEFAULTS


def test_cli_stage_choices_are_the_training_configs():
    from neeko.cli import _parser
    from neeko.train import SCHEDULES, SHARED_PROMPTS, STAGE_DATA

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train"]
    stages = ("schedule", "shared_prompt", "stage_data")
    choices = {a.dest: tuple(a.choices) for a in train._actions if a.dest in stages}
    assert choices == {
        "schedule": SCHEDULES,
        "shared_prompt": SHARED_PROMPTS,
        "stage_data": STAGE_DATA,
    }


@pytest.mark.parametrize("command", ["train", "expand --store s --card c --data d", "eval"])
def test_cli_stage_options_reach_the_training_config(command):
    from neeko.cli import _parser, _train_config

    stages = ["--schedule", "own-first", "--shared-prompt", "anonymous", "--stage-data", "split"]
    args = _parser().parse_args([*command.split(), *stages, "--shared-rank", "8"])
    cfg = _train_config(args)
    got = (cfg.schedule, cfg.shared_prompt, cfg.stage_data, cfg.shared_rank)
    assert got == ("own-first", "anonymous", "split", 8)


@pytest.mark.real_model
def test_committed_cast_plays_better_than_the_base_model():
    """Each cast member's gate beats the bare model on its held-out split."""
    from neeko.characters import read_cast
    from neeko.dialogues import read_dialogues
    from neeko.runtime import CAST_STORE

    rt = open_runtime(CAST_STORE, "default")
    for member in read_cast():
        char = rt.catalog.find(member.card.name)
        examples = character_examples(rt.loaded, char.card, read_dialogues(member.heldout), -1)
        gates = [rt.gate(char.key), {}]
        gate, base = sum(turn_nlls(rt.loaded, rt.bank, ex, gates).sum(1) for ex in examples)
        assert gate < base, char.name
