"""Boundaries validate before anything changes: card nesting, dialogue limits, block files."""

import base64
import json
import struct
import time
import zlib

import pytest
import torch
from pydantic import TypeAdapter
from safetensors.torch import save_file

from neeko.cards import (
    MAX_JSON_DEPTH,
    CharacterCard,
    card_from_fields,
    card_from_json,
    json_depth,
    parse_card,
)
from neeko.dialogues import (
    IGNORE,
    MAX_DIALOGUE_MESSAGES,
    MAX_JOB_DIALOGUES,
    MAX_MESSAGE_CHARS,
    DataError,
    Dialogue,
    encode,
    job_dialogues,
    parse_jsonl,
)
from neeko.errors import BlockFormatError, CardError
from neeko.lora import LoRABank

# --- cards ------------------------------------------------------------------------------

V1 = {"name": "Alice", "description": "A curious girl."}


def _nest(levels: int) -> dict:
    """An object nesting exactly `levels` levels: {"k": {"k": ... {}}}."""
    obj: dict = {}
    for _ in range(levels - 1):
        obj = {"k": obj}
    return obj


def _deep_card_text(levels: int) -> bytes:
    """A V1 card whose extensions are lists nested `levels` deep (never built in Python)."""
    return b'{"name": "Alice", "description": "d", "extensions": {"x": %s%s}}' % (
        b"[" * levels,
        b"]" * levels,
    )


def _png_card(raw_json: bytes) -> bytes:
    def chunk(ctype: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(ctype + body))
        return struct.pack(">I", len(body)) + ctype + body + crc

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"tEXt", b"chara\0" + base64.b64encode(raw_json))
        + chunk(b"IDAT", zlib.compress(b"\x00\x00"))
        + chunk(b"IEND", b"")
    )


def test_json_depth_is_measured_without_recursion():
    assert [json_depth(v) for v in (1, "s", [], {}, [1], {"a": [{}]}, _nest(5))] == [
        0,
        0,
        1,
        1,
        1,
        3,
        5,
    ]
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert json_depth(deep) == 100_001
    shared = [[1]]
    assert json_depth([shared, shared, [shared]]) == 4
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="holds itself"):
        json_depth(loop)


@pytest.mark.parametrize("levels", [40, 200, 600, 100_000])
@pytest.mark.parametrize("form", ["json", "png"])
def test_deeply_nested_card_file_is_refused(levels, form):
    raw = _deep_card_text(levels)
    data = raw if form == "json" else _png_card(raw)
    with pytest.raises(CardError, match=r"nested .*the limit is 32") as exc:
        parse_card(data, f"deep.{form}")
    assert str(exc.value).startswith(f"deep.{form}: card JSON")


@pytest.mark.parametrize("levels", [200, 600, 100_000])
def test_deeply_nested_decoded_card_is_refused(levels):
    card = V1 | {"extensions": _nest(levels)}
    with pytest.raises(CardError, match=f"card JSON is nested {levels + 1} levels deep"):
        card_from_json(card)


@pytest.mark.parametrize("where", ["extensions", "top", "data"])
@pytest.mark.parametrize("levels", [200, 600, 100_000])
def test_deeply_nested_stored_card_is_refused(where, levels):
    stored = card_from_fields("Alice", "A curious girl.").to_dict()
    if where == "extensions":
        stored["extensions"] = _nest(levels)
    else:
        stored["extra"] = {"top": {}, "data": {}} | {where: {"deep": _nest(levels)}}
    label = "extensions" if where == "extensions" else f"extra.{where}"
    with pytest.raises(CardError, match=rf"^{label} is nested {levels + (where != 'extensions')}"):
        CharacterCard.from_dict(stored)
    with pytest.raises(CardError, match=f"{label} is nested"):
        CharacterCard(**stored)


def test_card_holding_itself_is_refused():
    loop: dict = {}
    loop["again"] = loop
    with pytest.raises(CardError, match="extensions holds itself"):
        card_from_fields("Alice", "A curious girl.", extensions=loop)


def test_card_at_the_depth_limit_round_trips_everywhere():
    # `extensions` sits two levels down in a V2 card, so it may nest 30 levels.
    card = card_from_fields(
        "Alice",
        "A curious girl.",
        extensions=_nest(MAX_JSON_DEPTH - 2),
        extra={"top": {"t": _nest(MAX_JSON_DEPTH - 1)}, "data": {"d": _nest(MAX_JSON_DEPTH - 2)}},
    )
    v2 = card.to_v2()
    assert json_depth(v2) == MAX_JSON_DEPTH
    assert CharacterCard.from_dict(card.to_dict()) == card
    assert CharacterCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card
    back = parse_card(json.dumps(v2).encode())
    assert (back.extensions, back.extra) == (card.extensions, card.extra)
    assert parse_card(_png_card(json.dumps(v2).encode())) == back
    adapter = TypeAdapter(dict)  # how pydantic models (TrainJob.card) carry a card
    wire = adapter.dump_json(adapter.validate_python(card.to_dict()))
    assert CharacterCard.from_dict(adapter.validate_json(wire)) == card


def test_card_one_level_past_the_limit_is_refused_everywhere():
    with pytest.raises(CardError, match="extensions is nested 31 levels deep; the limit is 30"):
        card_from_fields("Alice", "d", extensions=_nest(MAX_JSON_DEPTH - 1))
    v2 = card_from_fields("Alice", "d").to_v2()
    v2["data"]["extensions"] = _nest(MAX_JSON_DEPTH - 1)
    for data in (json.dumps(v2).encode(), _png_card(json.dumps(v2).encode())):
        with pytest.raises(CardError, match="card JSON is nested 33 levels deep; the limit is 32"):
            parse_card(data)


# --- dialogues --------------------------------------------------------------------------


def _chat(n_messages: int = 2, text: str = "hi") -> dict:
    roles = ["user", "character"] * n_messages
    return {
        "character": "Mara",
        "messages": [{"role": r, "content": text} for r in roles[:n_messages]],
    }


def _jsonl(*objs: object) -> str:
    return "\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs)


@pytest.mark.parametrize("levels", [100_000, 40])
def test_deeply_nested_jsonl_line_names_the_line(levels):
    deep = '{"character": "Mara", "messages": [], "x": ' + "[" * levels + "]" * levels + "}"
    with pytest.raises(DataError, match=r"^mem:2: JSON nested .*the limit is 32"):
        parse_jsonl(_jsonl(_chat(), deep), "mem")


def test_nesting_at_the_limit_is_read():
    line = _chat() | {"meta": _nest(MAX_JSON_DEPTH - 1)}
    assert json_depth(line) == MAX_JSON_DEPTH
    (d,) = parse_jsonl(_jsonl(line), "mem")
    assert d.messages == [("user", "hi"), ("character", "hi")]


def _prompted(n_turns: int, text: str = "hi") -> dict:
    """Character-LLM format: `n_turns` (even) alternating turns, Mara's last in `output`."""
    said = [f"{'Man' if i % 2 == 0 else 'Mara'} (speaking): {text}<|eot|>" for i in range(n_turns)]
    return {"prompt": "\n".join(said[:-1]), "output": said[-1]}


@pytest.mark.parametrize("make", [_chat, _prompted], ids=["chat", "prompted"])
def test_dialogue_message_limits(make):
    n = MAX_DIALOGUE_MESSAGES
    assert len(parse_jsonl(_jsonl(make(n)), "mem")[0].messages) == n
    with pytest.raises(DataError, match=f"^mem:1: the dialogue has {n + 2} messages; the limit"):
        parse_jsonl(_jsonl(make(n + 2)), "mem")
    longest = "x" * MAX_MESSAGE_CHARS
    assert parse_jsonl(_jsonl(make(2, longest)), "mem")[0].messages[1][1] == longest
    with pytest.raises(DataError, match=r"^mem:1: .* is 8,001 characters long; the limit is 8,000"):
        parse_jsonl(_jsonl(make(2, longest + "x")), "mem")


def test_job_dialogues_counts_tokens(tiny):
    card = card_from_fields("Mara", "A pirate captain.")
    data = _jsonl(_chat(4, "Ahoy there, matey!"), _chat(2, "Fair winds.")).encode()
    count = lambda text: len(tiny.tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    total = 4 * count("Ahoy there, matey!") + 2 * count("Fair winds.")
    assert len(job_dialogues(card, data, max_tokens=total, count_tokens=count)) == 2
    with pytest.raises(DataError, match=f"tokens; a training job takes at most {total - 1}$"):
        job_dialogues(card, data, max_tokens=total - 1, count_tokens=count)
    # Without a tokenizer a message counts len // 4 + 1: 4 * (18 // 4 + 1) + 2 * (11 // 4 + 1).
    assert len(job_dialogues(card, data, max_tokens=26)) == 2
    with pytest.raises(DataError, match="the dialogues hold at least 26 tokens"):
        job_dialogues(card, data, max_tokens=25)


def test_job_dialogues_limits_the_number_of_dialogues():
    card = card_from_fields("Mara", "A pirate captain.")
    lines = [_chat()] * MAX_JOB_DIALOGUES
    assert len(job_dialogues(card, _jsonl(*lines).encode())) == MAX_JOB_DIALOGUES
    with pytest.raises(DataError, match="2,001 dialogues; a training job takes at most 2,000"):
        job_dialogues(card, _jsonl(*lines, _chat()).encode())


def test_job_dialogues_limits_card_examples():
    lines = "\n".join(["<START>"] + ["{{user}}: hi", "{{char}}: ho"] * 101)
    card = card_from_fields("Mara", "A pirate captain.", example_dialogues=lines)
    with pytest.raises(DataError, match="card example: the dialogue has 202 messages"):
        job_dialogues(card, None)


def _exchanges(n: int) -> Dialogue:
    return Dialogue("Mara", [("user", "Hi there."), ("character", "Ahoy!")] * n, "mem:1")


def _timed_encode(tokenizer, dialogue: Dialogue) -> tuple[list[int], list[int], float]:
    start = time.perf_counter()
    ex = encode(tokenizer, "You are Mara.", dialogue)
    return ex.ids, ex.labels, time.perf_counter() - start


def test_encode_cost_is_bounded_by_max_length(tiny):
    prefix = _exchanges(200)  # well over 1024 tokens
    ids, labels, _ = _timed_encode(tiny.tokenizer, prefix)
    assert len(ids) == 1024
    for n in (2_000, 20_000):  # rendering every turn would take minutes, then hours
        long_ids, long_labels, seconds = _timed_encode(tiny.tokenizer, _exchanges(n))
        assert (long_ids, long_labels) == (ids, labels)
        assert seconds < 2


def test_encode_many_user_turns_before_a_reply(tiny):
    tok = tiny.tokenizer
    turns = [("user", "Hi there."), ("character", "Ahoy!")] * 3
    dialogue = Dialogue("Mara", [*turns, *[("user", "More?")] * 5_000, ("character", "No.")], "")
    ids, labels, seconds = _timed_encode(tok, dialogue)
    messages = [{"role": "system", "content": "You are Mara."}] + [
        {"role": "user" if r == "user" else "assistant", "content": t} for r, t in dialogue.messages
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert len(ids) == 1024
    assert text.startswith(tok.decode(ids))
    learned = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert tok.decode(learned) == f"Ahoy!{tok.eos_token}" * 3
    assert seconds < 2


# --- block files ------------------------------------------------------------------------


def _tensors(bank: LoRABank, k: int = 0) -> dict[str, torch.Tensor]:
    out = {}
    for name, (a, b) in bank.get_block(k).items():
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = a, b
    return out


def _write(path, tensors: dict[str, torch.Tensor]) -> None:
    meta = {"format": "neeko-block", "version": "1", "rank": "4", "alpha": "32.0"}
    save_file(tensors, str(path), metadata=meta)


def _snapshot(bank: LoRABank) -> list[torch.Tensor]:
    n = bank.n_blocks
    return [t[:n].clone() for layer in bank.layers.values() for t in (layer.A, layer.B)]


def _refused(bank: LoRABank, path, message: str) -> None:
    """Every way of reading `path` raises BlockFormatError with `message`; nothing changes."""
    before, n = _snapshot(bank), bank.n_blocks
    for call in (bank.read_block, bank.load_block, lambda p: bank.load_block(p, index=0)):
        with pytest.raises(BlockFormatError, match=message):
            call(path)
    assert bank.n_blocks == n
    assert all(torch.equal(x, y) for x, y in zip(before, _snapshot(bank), strict=True))


LAST_B = "model.layers.1.self_attn.v_proj.lora_B"


@pytest.mark.parametrize("name", ["int8", "uint8", "int32", "bool", "float64"])
def test_block_file_of_another_dtype_is_refused(bank, tmp_path, name):
    tensors = _tensors(bank)
    tensors[LAST_B] = tensors[LAST_B].to(getattr(torch, name))
    _write(tmp_path / "b.safetensors", tensors)
    _refused(bank, tmp_path / "b.safetensors", rf"b.safetensors: {LAST_B} is {name}; block")


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_half_precision_block_file_is_read(bank, tmp_path, name):
    tensors = {k: t.to(getattr(torch, name)) for k, t in _tensors(bank, 2).items()}
    _write(tmp_path / "h.safetensors", tensors)
    slot = bank.load_block(tmp_path / "h.safetensors")
    for name, (a, b) in bank.get_block(slot).items():
        assert torch.equal(a, tensors[f"{name}.lora_A"].float())
        assert torch.equal(b, tensors[f"{name}.lora_B"].float())


@pytest.mark.parametrize(("name", "big"), [("float16", 1e5), ("bfloat16", 3.4e38)])
def test_values_must_be_finite_in_the_banks_dtype(tiny, tmp_path, name, big):
    bank = LoRABank(tiny.model.to(getattr(torch, name)))
    bank.add_blocks(2, init="random", generator=torch.Generator().manual_seed(0))
    tensors = {k: t.float() for k, t in _tensors(bank).items()}
    tensors[LAST_B][0, 0] = big  # finite in float32, inf in the bank's dtype
    _write(tmp_path / "f.safetensors", tensors)
    _refused(bank, tmp_path / "f.safetensors", f"{LAST_B}: .*NaN or inf once converted .*{name}")
    tensors[LAST_B][0, 0] = 1.0
    _write(tmp_path / "f.safetensors", tensors)
    assert bank.load_block(tmp_path / "f.safetensors") == 2


def test_set_block_refuses_other_dtypes(bank):
    good, before = bank.get_block(1), _snapshot(bank)
    name = next(iter(good))
    for bad in (good[name][0].double(), good[name][0].to(torch.int8)):
        with pytest.raises(BlockFormatError, match=rf"{name}.lora_A is (float64|int8)"):
            bank.set_block(0, {**good, name: (bad, good[name][1])})
    assert all(torch.equal(x, y) for x, y in zip(before, _snapshot(bank), strict=True))


def test_block_path_must_be_a_regular_file(bank, tmp_path):
    real = bank.save_block(1, tmp_path / "real.safetensors")
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    _refused(bank, link, r"link.safetensors is a symbolic link")
    (tmp_path / "dir.safetensors").mkdir()
    _refused(bank, tmp_path / "dir.safetensors", r"dir.safetensors is not a regular file")
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "gone.safetensors")
    _refused(bank, dangling, "is a symbolic link")
    assert bank.load_block(real) == bank.n_blocks - 1  # the real file still loads
