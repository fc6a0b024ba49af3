"""The transcript importer: speeches, contiguous deterministic splits, files that train."""

import json
from pathlib import Path

import pytest

from neeko.cards import read_card_file
from neeko.cli import main
from neeko.dialogues import DataError, read_dialogues
from neeko.transcript import (
    ImportOptions,
    display_name,
    import_transcript,
    parse_transcript,
    write_import,
)

SHAKESPEARE = Path(__file__).parents[2] / "shared" / "data" / "shakespeare-dev.txt"


def _play(n: int = 40) -> str:
    """A transcript where ALPHA, BETA and GAMMA take turns; speech i says `line i`."""
    speakers = ["ALPHA", "BETA", "GAMMA", "BETA"]
    return "\n\n".join(f"{speakers[i % 4]}:\nline {i}\nmore of {i}" for i in range(n)) + "\n"


def _numbers(dialogues) -> list[int]:
    """The speech numbers of the character turns, in order."""
    return [
        int(text.split()[1]) for d in dialogues for role, text in d.messages if role == "character"
    ]


def test_speeches_are_parsed_in_order():
    speeches = parse_transcript("A:\nhello there\n\nB C:\nyes:\nno\n\nA:\nbye\n")
    assert [(s.speaker, s.text) for s in speeches] == [
        ("A", "hello there"),
        ("B C", "yes:\nno"),
        ("A", "bye"),
    ]
    with pytest.raises(DataError, match="before the first"):
        parse_transcript("stray text\n\nA:\nhi\n")
    with pytest.raises(DataError, match="no speeches"):
        parse_transcript("\n\n")


def test_display_names():
    assert display_name("KING RICHARD III") == "King Richard III"
    assert display_name("DUCHESS OF YORK") == "Duchess of York"
    assert display_name("First Citizen") == "First Citizen"


def test_split_is_contiguous_per_speaker_and_never_overlaps():
    result = import_transcript(
        parse_transcript(_play()), ImportOptions(characters=2, exchanges=2, test_fraction=0.25)
    )
    assert result.names == ["Beta", "Alpha"]  # most words first
    for name in result.names:
        train, test = _numbers(result.train[name]), _numbers(result.test[name])
        assert train == sorted(train)
        assert test == sorted(test)
        assert max(train) < min(test)  # every test line comes after every training line
        assert len(result.test[name]) >= 1
    beta = result.train["Beta"][0]
    assert beta.messages[0] == ("user", "Alpha: line 0\nmore of 0")  # what was said before
    assert beta.messages[1] == ("character", "line 1\nmore of 1")


def test_import_is_deterministic_byte_for_byte(tmp_path):
    speeches = parse_transcript(_play())
    for out in ("a", "b"):
        write_import(import_transcript(speeches, ImportOptions(characters=3)), tmp_path / out)
    for name in ("train.jsonl", "test.jsonl", "cards/alpha.json", "cards/gamma.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_cli_writes_cards_and_dialogues_the_trainer_reads(tmp_path, capsys):
    play = tmp_path / "play.txt"
    play.write_text(_play())
    out = tmp_path / "out"
    args = ["data", "transcript", str(play), "--out", str(out), "--names", "GAMMA", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert list(summary["characters"]) == ["Gamma"]
    card = read_card_file(out / summary["characters"]["Gamma"]["card"])
    assert card.name == "Gamma"
    assert "line 2" in card.profile
    train, test = read_dialogues(out / "train.jsonl"), read_dialogues(out / "test.jsonl")
    assert {d.character for d in train + test} == {"Gamma"}
    assert main(["data", "transcript", str(play), "--out", str(out), "--names", "NOBODY"]) == 1
    assert "no speeches by 'NOBODY'" in capsys.readouterr().err


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="the development corpus is not beside")
def test_shakespeare_corpus_imports_its_largest_speakers():
    result = import_transcript(
        parse_transcript(SHAKESPEARE.read_text(encoding="utf-8")), ImportOptions(characters=9)
    )
    assert len(result.names) == 9
    assert "King Richard III" in result.names
    assert all(len(result.test[n]) >= 2 and len(result.train[n]) >= 8 for n in result.names)
