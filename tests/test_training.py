"""Dialogue data and block training: formats, loss masks, one-hot isolation, resume."""

import json

import pytest
import torch

from neeko.dialogues import IGNORE, DataError, Dialogue, encode, read_dialogues
from neeko.train import TrainConfig, TrainingError, train_blocks

MARA = Dialogue(
    "Mara",
    [
        ("user", "Who are you?"),
        ("character", "Captain Mara of the Salt Widow, matey!"),
        ("user", "Nice ship."),
        ("character", "Aye, finest on the seas."),
    ],
    "mem:1",
)
GRAY = Dialogue("Gray", [("user", "Any clues?"), ("character", "Most singular ash.")], "mem:2")


def _write(tmp_path, lines):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines))
    return path


def test_chat_and_prompted_formats(tmp_path):
    chat = {
        "character": "Mara",
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "character", "content": "Ahoy!"},
        ],
    }
    prompted = {
        "prompt": "I want you to act like Beethoven.\n\nMan (speaking): Good day, maestro.<|eot|>\n"
        "Beethoven (thinking): Who is this?<|eot|>\n",
        "output": "Beethoven (speaking): Speak up, I cannot hear you!<|eot|>",
    }
    a, b = read_dialogues(_write(tmp_path, [chat, "", prompted]))
    assert (a.character, a.messages) == ("Mara", [("user", "Hi"), ("character", "Ahoy!")])
    assert b.character == "Beethoven"
    assert b.messages == [
        ("user", "Good day, maestro."),
        ("character", "Speak up, I cannot hear you!"),
    ]
    assert b.source.endswith("d.jsonl:3")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "d.jsonl:2: not valid JSON"),
        ('["a list"]', "d.jsonl:2: each line must be a JSON object"),
        ('{"character": "", "messages": []}', "d.jsonl:2: 'character' must be"),
        (
            '{"character": "M", "messages": [{"role": "bot", "content": "x"}]}',
            "d.jsonl:2: message 0",
        ),
        (
            '{"character": "M", "messages": [{"role": "user", "content": "x"}]}',
            "no 'character' turn",
        ),
        ('{"prompt": "a", "output": "no turns"}', "d.jsonl:2: 'output' has no"),
        ('{"text": "x"}', "d.jsonl:2: expected"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    good = json.dumps(
        {
            "character": "M",
            "messages": [{"role": "user", "content": "a"}, {"role": "character", "content": "b"}],
        }
    )
    with pytest.raises(DataError, match=message):
        read_dialogues(_write(tmp_path, [good, line]))


def test_loss_covers_only_the_characters_turns(tiny):
    ex = encode(tiny.tokenizer, "You are Mara.", MARA)
    learned = [t for t, label in zip(ex.ids, ex.labels, strict=True) if label != IGNORE]
    eos = tiny.tokenizer.eos_token
    assert (
        tiny.tokenizer.decode(learned)
        == f"Captain Mara of the Salt Widow, matey!{eos}Aye, finest on the seas.{eos}"
    )
    # The rendered ids are exactly the chat-template text the engine prompts with.
    messages = [{"role": "system", "content": "You are Mara."}] + [
        {"role": "user" if r == "user" else "assistant", "content": t} for r, t in MARA.messages
    ]
    text = tiny.tokenizer.apply_chat_template(messages, tokenize=False)
    assert tiny.tokenizer.decode(ex.ids) == text


def _examples(tokenizer, block_of):
    out = []
    for d in (MARA, GRAY):
        ex = encode(tokenizer, f"You are {d.character}.", d)
        ex.block = block_of[d.character]
        out.append(ex)
    return out * 2


def _blocks(bank):
    return {k: bank.get_block(k) for k in range(bank.n_blocks)}


def _same(a, b):
    return all(torch.equal(a[n][i], b[n][i]) for n in a for i in (0, 1))


def test_each_example_trains_only_its_block(tiny, bank):
    before = _blocks(bank)
    examples = _examples(tiny.tokenizer, {"Mara": 1, "Gray": 4})
    report = train_blocks(tiny, bank, examples, TrainConfig(epochs=2, lr=1e-2), progress=False)
    after = _blocks(bank)
    assert report.steps == 2
    assert [k for k in before if not _same(before[k], after[k])] == [1, 4]
    assert not any(layer.trainable for layer in bank.layers.values())


def test_mixed_batch_updates_each_block_as_its_rows_alone(tiny, bank):
    """Per-block loss normalisation: joint pre-tuning equals training each block alone."""
    mara, gray = _examples(tiny.tokenizer, {"Mara": 1, "Gray": 4})[:2]
    longer = encode(tiny.tokenizer, "You are Mara.", MARA.__class__("Mara", MARA.messages[:2], ""))
    longer.block = 1
    start = _blocks(bank)
    cfg = TrainConfig(epochs=3, lr=1e-2, batch_size=3, grad_clip=0.05)
    train_blocks(tiny, bank, [mara, longer, gray], cfg, progress=False)
    joint = _blocks(bank)
    for rows in ([mara, longer], [gray]):
        for k, weights in start.items():
            bank.set_block(k, weights)
        train_blocks(tiny, bank, rows, cfg, progress=False)
        alone = _blocks(bank)
        k = rows[0].block
        for name in alone[k]:
            for i in (0, 1):
                torch.testing.assert_close(joint[k][name][i], alone[k][name][i])


def test_training_lowers_the_loss(tiny, bank):
    examples = _examples(tiny.tokenizer, {"Mara": 0, "Gray": 2})
    report = train_blocks(
        tiny, bank, examples, TrainConfig(epochs=8, lr=1e-2, batch_size=2), progress=False
    )
    assert report.losses[-1] < report.losses[0] * 0.8


def test_resume_continues_exactly_where_it_stopped(tiny, bank, tmp_path):
    examples = _examples(tiny.tokenizer, {"Mara": 0, "Gray": 1})
    cfg = TrainConfig(epochs=3, batch_size=2, lr=1e-2, checkpoint_every=2)
    start = _blocks(bank)
    full = train_blocks(tiny, bank, examples, cfg, progress=False)
    want = _blocks(bank)
    for k, block in start.items():
        bank.set_block(k, block)
    train_blocks(
        tiny,
        bank,
        examples,
        TrainConfig(**{**cfg.__dict__, "max_steps": 4}),
        checkpoint_dir=tmp_path,
        progress=False,
    )
    for k, block in start.items():  # a crash loses the in-memory weights
        bank.set_block(k, block)
    resumed = train_blocks(tiny, bank, examples, cfg, checkpoint_dir=tmp_path, progress=False)
    assert resumed.resumed_from == 4
    assert resumed.steps == full.steps
    got = _blocks(bank)
    assert all(
        torch.allclose(want[k][n][i], got[k][n][i], atol=1e-6)
        for k in want
        for n in want[k]
        for i in (0, 1)
    )


def test_training_refuses_examples_without_a_block(tiny, bank):
    ex = encode(tiny.tokenizer, "You are Mara.", MARA)
    with pytest.raises(TrainingError, match="no valid block"):
        train_blocks(tiny, bank, [ex], progress=False)
    with pytest.raises(TrainingError, match="no training examples"):
        train_blocks(tiny, bank, [], progress=False)
