"""Character cards: V1/V2/V3 JSON and PNG parse right, round-trip losslessly, bad ones fail."""

import base64
import copy
import dataclasses
import json
import struct
import zlib

import pytest

from neeko.cards import (
    MAX_CARD_BYTES,
    MAX_TEXT_BYTES,
    CharacterCard,
    card_from_fields,
    clean_name,
    parse_card,
)
from neeko.errors import CardError, NeekoError

V1 = {
    "name": "Alice",
    "description": "{{char}} is a curious girl who fell down a rabbit hole.",
    "personality": "curious, polite",
    "scenario": "Wonderland, a tea party.",
    "first_mes": "Oh! Who are you?",
    "mes_example": "<START>\n{{user}}: Hi\n{{char}}: Hello!",
    "talkativeness": "0.5",
    "avatar": "none",
}

V2 = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Bob",
        "description": "A gruff blacksmith.",
        "personality": "gruff",
        "scenario": "A forge.",
        "first_mes": "What do you want?",
        "mes_example": "",
        "creator_notes": "for testing",
        "system_prompt": "Stay in character.",
        "post_history_instructions": "Be terse.",
        "alternate_greetings": ["Hm.", "Back again?"],
        "character_book": {"entries": [{"keys": ["forge"], "content": "hot"}]},
        "tags": ["fantasy", "smith"],
        "creator": "someone",
        "character_version": "1.2",
        "extensions": {"depth_prompt": {"depth": 4, "prompt": "x"}, "fav": False},
        "mystery_field": [1, {"a": None}],
    },
    "top_level_unknown": {"keep": "me"},
}

V3 = {
    "spec": "chara_card_v3",
    "spec_version": "3.0",
    "data": {
        "name": "Carol",
        "nickname": "Caz",
        "description": "A starship pilot.",
        "personality": "bold",
        "scenario": "",
        "first_mes": "Strap in.",
        "mes_example": "",
        "creator_notes": "",
        "system_prompt": "",
        "post_history_instructions": "",
        "alternate_greetings": [],
        "group_only_greetings": ["Crew, listen up."],
        "tags": ["sci-fi"],
        "creator": "",
        "character_version": "",
        "extensions": {"world": "space"},
        "assets": [
            {"type": "icon", "uri": "embeded://x.png", "name": "main", "ext": "png"},
            {"type": "icon", "uri": "https://example.com/carol.png", "name": "alt", "ext": "png"},
        ],
        "creator_notes_multilingual": {"fr": "pilote"},
        "source": ["https://example.com"],
        "creation_date": 1700000000,
        "modification_date": 1700000001,
    },
}


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def _chunk(ctype: bytes, body: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(ctype + body) if crc is None else crc
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", crc)


def _png(*text_chunks: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + b"".join(text_chunks)
        + _chunk(b"IDAT", zlib.compress(b"\x00\x00"))
        + _chunk(b"IEND", b"")
    )


def _text_chunk(keyword: str, card: dict, kind: bytes = b"tEXt") -> bytes:
    text = base64.b64encode(_json(card))
    key = keyword.encode() + b"\0"
    if kind == b"tEXt":
        return _chunk(b"tEXt", key + text)
    if kind == b"zTXt":
        return _chunk(b"zTXt", key + b"\0" + zlib.compress(text))
    return _chunk(b"iTXt", key + b"\0\0" + b"en\0" + b"\0" + text)


# --- good cards --------------------------------------------------------------------------


def test_v1_card_fields():
    card = parse_card(_json(V1), "alice.json")
    assert card.spec == "chara_card_v1"
    assert (card.name, card.profile) == ("Alice", V1["description"])
    assert card.personality == "curious, polite"
    assert card.greeting == "Oh! Who are you?"
    assert card.example_dialogues == V1["mes_example"]
    assert card.extra == {"top": {"talkativeness": "0.5", "avatar": "none"}, "data": {}}
    assert card.persona_text().startswith("Alice is a curious girl")
    assert "Wonderland" in card.persona_text()


def test_v2_card_fields_and_unknowns():
    card = parse_card(_json(V2))
    assert card.spec == "chara_card_v2"
    assert card.name == "Bob"
    assert card.alternate_greetings == ("Hm.", "Back again?")
    assert card.tags == ("fantasy", "smith")
    assert card.system_prompt == "Stay in character."
    assert (card.creator, card.version) == ("someone", "1.2")
    assert card.extensions == V2["data"]["extensions"]
    assert card.extra["top"] == {"top_level_unknown": {"keep": "me"}}
    assert card.post_history_instructions == "Be terse."
    assert card.extra["data"] == {
        "character_book": V2["data"]["character_book"],
        "mystery_field": [1, {"a": None}],
    }


def test_v3_card_nickname_and_icon_asset():
    card = parse_card(_json(V3))
    assert card.spec == "chara_card_v3"
    assert card.aliases == ("Caz",)
    # the main icon is embedded, not a URL, so the http(s) one is taken
    assert card.avatar_url == "https://example.com/carol.png"
    assert card.extra["data"]["group_only_greetings"] == ["Crew, listen up."]
    assert card.extra["data"]["creation_date"] == 1700000000


def test_utf8_bom_and_null_optional_fields():
    card = parse_card(b"\xef\xbb\xbf" + _json({**V1, "personality": None, "tags": None}))
    assert (card.name, card.personality, card.tags) == ("Alice", "", ())


def test_nul_characters_are_stripped_from_text():
    card = parse_card(_json({**V1, "description": "a\0b", "name": "Al\0ice"}))
    assert (card.name, card.profile) == ("Alice", "ab")


def test_profile_text_kept_verbatim_mentions_included():
    card = card_from_fields("Eve", "Pings @everyone and <@123>.")
    assert card.profile == "Pings @everyone and <@123>."


@pytest.mark.parametrize("card", [V1, V2, V3], ids=["v1", "v2", "v3"])
def test_to_dict_from_dict_round_trip_is_lossless(card):
    parsed = parse_card(_json(card))
    stored = json.loads(json.dumps(parsed.to_dict()))
    assert CharacterCard.from_dict(stored) == parsed


def test_to_v2_of_a_v2_card_is_the_same_card():
    assert parse_card(_json(V2)).to_v2() == V2


@pytest.mark.parametrize("card", [V1, V3], ids=["v1", "v3"])
def test_to_v2_reparses_to_the_same_fields(card):
    parsed = parse_card(_json(card))
    again = parse_card(_json(parsed.to_v2()))
    assert again == dataclasses.replace(parsed, spec="chara_card_v2")
    assert again.extra == parsed.extra
    assert again.extensions == parsed.extensions


def test_to_v2_keeps_what_v2_has_no_field_for():
    card = card_from_fields(
        "Dan",
        "A detective.",
        aliases=["Danny", "D"],
        avatar_url="https://example.com/d.png",
        extensions={"x": 1},
    )
    v2 = card.to_v2()
    assert v2["spec"] == "chara_card_v2"
    assert v2["spec_version"] == "2.0"
    assert v2["data"]["nickname"] == "Danny"
    assert v2["data"]["extensions"]["x"] == 1
    again = parse_card(_json(v2))
    assert (again.aliases, again.avatar_url) == (card.aliases, card.avatar_url)
    assert again.to_v2() == v2


def test_to_dict_returns_copies():
    card = parse_card(_json(V2))
    stored = card.to_dict()
    stored["extensions"]["fav"] = True
    stored["extra"]["data"]["mystery_field"].append(2)
    assert card.extensions["fav"] is False
    assert card.extra["data"]["mystery_field"] == [1, {"a": None}]


# --- PNG ---------------------------------------------------------------------------------


def test_png_v2_chara_chunk():
    card = parse_card(_png(_text_chunk("chara", V2)), "bob.png")
    assert card.name == "Bob"
    assert card.spec == "chara_card_v2"


def test_png_v3_ccv3_chunk():
    card = parse_card(_png(_text_chunk("ccv3", V3)))
    assert card.name == "Carol"
    assert card.spec == "chara_card_v3"


@pytest.mark.parametrize("order", ["chara_first", "ccv3_first"])
def test_png_prefers_ccv3_over_chara(order):
    chunks = [_text_chunk("chara", V2), _text_chunk("ccv3", V3)]
    if order == "ccv3_first":
        chunks.reverse()
    assert parse_card(_png(*chunks)).name == "Carol"


@pytest.mark.parametrize("kind", [b"zTXt", b"iTXt"])
def test_png_compressed_and_international_text_chunks(kind):
    other = _chunk(b"tEXt", b"Software\0paint")
    assert parse_card(_png(other, _text_chunk("chara", V2, kind))).name == "Bob"


def test_png_compressed_itxt_chunk():
    text = zlib.compress(base64.b64encode(_json(V1)))
    chunk = _chunk(b"iTXt", b"chara\0\x01\x00\0\0" + text)
    assert parse_card(_png(chunk)).name == "Alice"


# --- bad cards ---------------------------------------------------------------------------


def _fails(data: bytes, *needles: str, filename: str = "") -> str:
    with pytest.raises(CardError) as info:
        parse_card(data, filename)
    message = str(info.value)
    for needle in needles:
        assert needle in message
    return message


def test_card_error_is_a_value_error():
    assert issubclass(CardError, NeekoError)
    assert issubclass(CardError, ValueError)


def test_malformed_json_reports_line_and_column():
    _fails(b'{\n  "name": "A",\n  "description" "x"\n}', "malformed at line 3 column 17")


def test_filename_prefixes_the_message():
    _fails(b"[1]", "card.json: card JSON must be an object", filename="card.json")


def test_not_utf8():
    _fails(b'{"name": "\xff"}', "not UTF-8", "0xff")


def test_nan_is_refused():
    _fails(b'{"name": "A", "description": "b", "x": NaN}', "NaN")


def test_unknown_spec():
    _fails(_json({"spec": "chara_card_v9", "data": {}}), "unknown card spec 'chara_card_v9'")


def test_v2_without_data():
    _fails(_json({"spec": "chara_card_v2", "data": "oops"}), "needs a 'data' object")


def test_missing_name():
    _fails(_json({**V2, "data": {"description": "x"}}), "no 'name'")


def test_truncated_png():
    png = _png(_text_chunk("chara", V2))
    _fails(png[:-20], "PNG is truncated: chunk IDAT needs 14 bytes, 6 left")
    _fails(png[:-12], "PNG is truncated", "no IEND")
    _fails(png[:20], "PNG is truncated: chunk IHDR needs 17 bytes, 4 left")
    _fails(png[:12], "PNG is truncated: chunk header at byte 8 needs 8, 4 left")


def test_png_bad_crc():
    chunk = _text_chunk("chara", V2)
    bad = chunk[:-4] + struct.pack(">I", (zlib.crc32(chunk[4:-4]) + 1) & 0xFFFFFFFF)
    _fails(_png(bad), "PNG is corrupt: chunk tEXt at byte 33 fails its CRC check")


def test_png_first_chunk_must_be_ihdr():
    png = _png(_text_chunk("chara", V2))
    _fails(png[:8] + png[33:], "first chunk is tEXt, not IHDR")


def test_png_without_card_chunk():
    _fails(_png(_chunk(b"tEXt", b"Comment\0hello")), "no 'chara' or 'ccv3' text chunk")


def test_png_chunk_not_base64():
    _fails(_png(_chunk(b"tEXt", b"chara\0not base64 !!!")), "'chara' chunk is not valid base64")


def test_png_chunk_with_bad_json():
    bad = _chunk(b"tEXt", b"chara\0" + base64.b64encode(b'{"name": '))
    _fails(_png(bad), "card JSON in the PNG 'chara' chunk is malformed at line 1")


def test_png_bad_compressed_chunk():
    _fails(_png(_chunk(b"zTXt", b"chara\0\0garbage")), "zTXt chunk 'chara' does not decompress")


def test_png_named_file_that_is_not_png():
    _fails(_json(V1), "does not start with the PNG signature", filename="a.png")


def test_webp_is_refused_clearly():
    _fails(b"RIFF\0\0\0\0WEBPVP8 ", "WebP cards are not supported")


def test_oversized_file():
    data = _json({**V1, "pad": "x" * MAX_CARD_BYTES})
    _fails(data, f"card file is {len(data):,} bytes", "limit is 1,000,000")


def test_oversized_profile():
    profile = "é" * (MAX_TEXT_BYTES // 2 + 1)  # 2 bytes each in UTF-8
    _fails(_json({**V1, "description": profile}), "profile (description) is 32,770 bytes", "32,768")


def test_oversized_other_text_field():
    _fails(_json({**V1, "first_mes": "x" * (MAX_TEXT_BYTES + 1)}), "greeting (first_mes)")


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("", "1-64 visible characters, got 0"),
        ("   ", "1-64 visible characters, got 0"),
        ("A" * 65, "1-64 visible characters, got 65"),
        ("Al\u200bice", "U+200B at position 2"),
        ("\ufeffAlice", "U+FEFF"),
        ("Ali\u00adce", "U+00AD"),
        ("Ali\u202ece", "U+202E"),
        ("Ali\u2066ce", "U+2066"),
        ("\u3164", "U+3164"),
        ("Al\x07ice", "U+0007"),
        ("Al\nice", "U+000A"),
        ("@everyone", "mention syntax '@everyone'"),
        ("hi @HERE", "mention syntax '@HERE'"),
        ("<@123456>", "mention syntax '<@123456>'"),
        ("x<@!1>", "'<@!1>'"),
        ("<@&1>", "'<@&1>'"),
        ("<#42>", "'<#42>'"),
        ("</ban:99>", "'</ban:99>'"),
    ],
)
def test_bad_names(name, needle):
    _fails(_json({**V1, "name": name}), needle)
    with pytest.raises(CardError, match="name"):
        card_from_fields(name, "profile")


def test_clean_name_normalises():
    assert clean_name("  Ame\u0301lie \t ") == "Amélie"
    assert clean_name("Mary\u3000  Jane") == "Mary Jane"
    assert clean_name("A" * 64) == "A" * 64
    assert clean_name("Snow ❄ 雪") == "Snow ❄ 雪"


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"name": 42}, "name must be a string, got a number"),
        ({"description": ["x"]}, "profile (description) must be a string, got a list"),
        ({"tags": "a,b"}, "tags must be a list of strings, got a string"),
        ({"tags": ["a", 3]}, "tags[1] must be a string, got a number"),
        ({"tags": ["t" * 65]}, "tags[0] is 65 characters"),
        ({"tags": [str(i) for i in range(65)]}, "tags has 65 entries; the limit is 64"),
        ({"alternate_greetings": [None]}, "alternate_greetings[0] must be a string, got null"),
        ({"extensions": []}, "extensions must be an object, got a list"),
        ({"nickname": 7}, "nickname must be a string"),
        ({"nickname": "@here"}, "aliases[0] contains Discord mention syntax"),
        ({"creator": True}, "creator must be a string, got a boolean"),
    ],
)
def test_wrong_types_and_limits_in_v2_data(patch, needle):
    card = copy.deepcopy(V2)
    card["data"].update(patch)
    _fails(_json(card), needle)


def test_numeric_character_version_is_accepted():
    card = copy.deepcopy(V2)
    card["data"]["character_version"] = 3
    assert parse_card(_json(card)).version == "3"


def test_card_with_no_description_at_all():
    _fails(_json({"name": "Nobody"}), "nothing describes the character")


# --- plain fields ------------------------------------------------------------------------


def test_card_from_fields():
    card = card_from_fields(
        " Zed ", "A robot.", aliases=["Z", "zed", "Zee"], tags=["robot", " robot "], greeting="Hi"
    )
    assert card.spec == "fields"
    assert (card.name, card.aliases, card.tags) == ("Zed", ("Z", "Zee"), ("robot",))
    assert CharacterCard.from_dict(card.to_dict()) == card


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"name": "A\u200d"}, "U+200D"),
        ({"profile": "x" * (MAX_TEXT_BYTES + 1)}, "profile (description) is"),
        ({"profile": ""}, "nothing describes the character"),
        ({"aliases": "B"}, "aliases must be a list"),
        ({"aliases": ["<@1>"]}, "aliases[0] contains"),
        ({"avatar_url": "javascript:x"}, "avatar_url must be an http(s) URL"),
        ({"colour": "red"}, "unknown card field(s): colour"),
        ({"extensions": {"x": float("nan")}}, "extensions must hold only JSON"),
        ({"extra": {"data": {"name": "B"}}}, "extra repeats card field(s) name"),
    ],
)
def test_card_from_fields_validates(kwargs, needle):
    with pytest.raises(CardError) as info:
        card_from_fields(**{"name": "A", "profile": "p", **kwargs})
    assert needle in str(info.value)


def test_from_dict_rejects_unknown_and_missing_fields():
    with pytest.raises(CardError, match="unknown stored card field"):
        CharacterCard.from_dict({"name": "A", "profile": "p", "bogus": 1})
    with pytest.raises(CardError, match="lacks profile"):
        CharacterCard.from_dict({"name": "A"})
