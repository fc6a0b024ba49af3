"""Character cards: SillyTavern V1/V2/V3 cards (JSON or PNG) and plain fields, checked.

A V1 card is a flat JSON object; V2 and V3 put the fields in `data` under a `spec`; a PNG
card holds the JSON base64-encoded in a `ccv3` (preferred) or `chara` text chunk.
`CharacterCard` checks and normalises its fields on construction, whatever the source.
Names are strict (they become webhook usernames); other text is kept verbatim but for NUL
characters (replies go out with no mentions allowed). Unknown fields are kept verbatim.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import unicodedata
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from neeko.errors import CardError

MAX_CARD_BYTES = 1_000_000  # a card file, JSON or PNG
MAX_TEXT_BYTES = 32_768  # each text field (profile, greeting, ...), in UTF-8 bytes
MAX_NAME_CHARS = 64  # a name or alias, after cleaning
MAX_LIST_ITEMS = 64  # aliases, tags, alternate greetings
MAX_TAG_CHARS = 64
MAX_URL_CHARS = 2_048
MAX_JSON_DEPTH = 32
"""How deep a card's JSON may nest, counted as its V2 export: the card object is level 1,
`data` level 2, so `extensions` may nest 30 levels and the keys kept in `extra` likewise."""

Spec = Literal["chara_card_v1", "chara_card_v2", "chara_card_v3", "fields"]
SPECS: tuple[str, ...] = get_args(Spec)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CARD_KEYWORDS = ("ccv3", "chara")
"""PNG text-chunk keywords that hold a card, preferred first."""

_TEXT_KEYS = {
    "name": "name",
    "description": "profile",
    "personality": "personality",
    "scenario": "scenario",
    "first_mes": "greeting",
    "mes_example": "example_dialogues",
    "system_prompt": "system_prompt",
    "post_history_instructions": "post_history_instructions",
    "creator_notes": "creator_notes",
    "creator": "creator",
    "character_version": "version",
}
"""Card key -> CharacterCard attribute, for the text fields."""
_LIST_KEYS = {"alternate_greetings": "alternate_greetings", "tags": "tags"}
_DATA_KEYS = frozenset({*_TEXT_KEYS, *_LIST_KEYS, "nickname", "extensions"})
"""Keys of `data` that map to attributes; every other key goes to `extra`."""
_ENVELOPE_KEYS = frozenset({"spec", "spec_version", "data"})
_LABELS = {attr: f"{attr} ({key})" for key, attr in _TEXT_KEYS.items() if key != attr}

_INVISIBLE = frozenset("\u034f\u115f\u1160\u2800\u3164\uffa0")
"""Blank-looking characters that are not format characters (fillers, braille blank)."""
_MENTION = re.compile(r"@(?:everyone|here)|<(?:@[!&]?|#)\d+>|</[^<>]+:\d+>", re.IGNORECASE)
_URL = re.compile(r"https?://[^\s<>\"\x00-\x1f\x7f]+", re.IGNORECASE)
_CHAR_MACRO = re.compile(r"\{\{char\}\}|<BOT>", re.IGNORECASE)
_OTHER_IMAGES = {b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"RIFF": "WebP"}
_KINDS = {str: "a string", bool: "a boolean", int: "a number", float: "a number"}
_KINDS |= {list: "a list", tuple: "a list", dict: "an object", type(None): "null"}
_EXTENSIONS_DEPTH = MAX_JSON_DEPTH - 2
"""`extensions` sits in `data` in the card object: two levels of the card's depth."""
_CONTAINERS = (dict, list, tuple)
_END = object()


@dataclass(frozen=True)
class CharacterCard:
    """One character, checked and normalised on construction (raises CardError)."""

    name: str
    """Display name: NFC, single spaces, 1-64 visible characters, no mention syntax."""
    profile: str
    """The description: the main text for the role embedding and system prompt."""
    aliases: tuple[str, ...] = ()
    """Other names (V3 `nickname`), cleaned like `name`."""
    personality: str = ""
    scenario: str = ""
    greeting: str = ""
    """The first message (`first_mes`)."""
    alternate_greetings: tuple[str, ...] = ()
    example_dialogues: str = ""
    """Example dialogue (`mes_example`)."""
    system_prompt: str = ""
    post_history_instructions: str = ""
    """Instructions placed after the chat history."""
    creator_notes: str = ""
    tags: tuple[str, ...] = ()
    avatar_url: str = ""
    """An http(s) URL, or empty."""
    creator: str = ""
    version: str = ""
    """The card's `character_version`."""
    spec: Spec = "fields"
    """Where the card came from: a card spec, or "fields" for plain fields."""
    extensions: dict[str, Any] = field(default_factory=dict)
    """The card's `extensions`, verbatim."""
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Unknown fields, verbatim: {"top": envelope keys, "data": keys inside `data`}."""

    def __post_init__(self) -> None:
        if self.spec not in SPECS:
            raise CardError(f"spec must be one of {', '.join(SPECS)}, got {self.spec!r}")
        for attr in (*_TEXT_KEYS.values(), "avatar_url"):
            _set(self, attr, _text(getattr(self, attr), _LABELS.get(attr, attr)))
        _set(self, "name", clean_name(self.name))
        _set(self, "aliases", _clean_aliases(self.aliases, self.name))
        _set(self, "tags", _clean_tags(self.tags))
        _set(self, "alternate_greetings", _clean_greetings(self.alternate_greetings))
        _set(self, "avatar_url", _clean_url(self.avatar_url))
        _set(self, "extensions", _json_object(self.extensions, "extensions", _EXTENSIONS_DEPTH))
        _set(self, "extra", _clean_extra(self.extra))
        if not self.persona_text():
            raise CardError(
                "profile (description), personality and scenario are all empty: "
                "nothing describes the character"
            )

    def persona_text(self) -> str:
        """Profile, personality and scenario as one text for the role encoder.

        `{{char}}` (and the old `<BOT>`) become the character's name.
        """
        parts = (self.profile.strip(), self.personality.strip(), self.scenario.strip())
        text = "\n\n".join(part for part in parts if part)
        return _CHAR_MACRO.sub(lambda _: self.name, text)

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON data; `from_dict` gives back an equal card."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CharacterCard:
        """Rebuild a card from `to_dict()` output, checking it again."""
        if not isinstance(data, Mapping):
            raise CardError(f"a stored card must be an object, got {_kind(data)}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise CardError(f"unknown stored card field(s): {', '.join(unknown)}")
        missing = [key for key in ("name", "profile") if key not in data]
        if missing:
            raise CardError(f"stored card lacks {' and '.join(missing)}")
        return cls(**data)

    def to_v2(self) -> dict[str, Any]:
        """A SillyTavern V2 card; unknown fields and extensions kept, nothing lost.

        What V2 has no field for (aliases past the first, an avatar URL not given by an
        icon asset) is written under `extensions.neeko`, which `parse_card` reads back.
        """
        data: dict[str, Any] = {key: getattr(self, attr) for key, attr in _TEXT_KEYS.items()}
        data |= {key: list(getattr(self, attr)) for key, attr in _LIST_KEYS.items()}
        data["extensions"] = self.extensions
        if self.aliases:
            data["nickname"] = self.aliases[0]
        data |= self.extra["data"]
        _note_in_neeko(self, data)
        card = {"spec": "chara_card_v2", "spec_version": "2.0", "data": data}
        return json.loads(json.dumps(card | self.extra["top"]))


def clean_name(name: str, label: str = "name") -> str:
    """Return `name` fit to show as a speaker, or raise CardError saying what is wrong.

    NUL characters go, then the name is NFC-normalised, control and invisible characters
    and Discord mention syntax are refused, and whitespace runs become one space.
    """
    if not isinstance(name, str):
        raise CardError(f"{label} must be a string, got {_kind(name)}")
    text = unicodedata.normalize("NFC", name.replace("\0", "")).strip()
    for i, char in enumerate(text):
        if char in _INVISIBLE or unicodedata.category(char) in ("Cc", "Cf", "Cs"):
            raise CardError(
                f"{label} has an invisible or control character U+{ord(char):04X} at "
                f"position {i}: names must be plain visible text"
            )
    text = " ".join(text.split())
    if mention := _MENTION.search(text):
        raise CardError(f"{label} contains Discord mention syntax {mention.group()!r}")
    if not 1 <= len(text) <= MAX_NAME_CHARS:
        raise CardError(f"{label} must be 1-{MAX_NAME_CHARS} visible characters, got {len(text)}")
    return text


def card_from_fields(name: str, profile: str, **optional: Any) -> CharacterCard:
    """Build a card from plain fields (a moderator's form); checked like any card.

    `optional` takes the other CharacterCard fields by name (aliases, greeting, ...).
    """
    allowed = {f.name for f in fields(CharacterCard)} - {"name", "profile", "spec"}
    unknown = sorted(set(optional) - allowed)
    if unknown:
        raise CardError(f"unknown card field(s): {', '.join(unknown)}")
    return CharacterCard(name=name, profile=profile, spec="fields", **optional)


def parse_card(data: bytes, filename: str = "") -> CharacterCard:
    """Read a card file: PNG (by its signature) or JSON (UTF-8, optional BOM).

    Raises CardError with what is wrong and where, prefixed with `filename` if given.
    """
    try:
        return _parse(bytes(data), filename)
    except CardError as err:
        if not filename:
            raise
        raise CardError(f"{filename}: {err}") from err


def read_card_file(path: str | Path) -> CharacterCard:
    """Read and parse a card file; CardError names the file and what is wrong."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CardError(f"{path}: cannot read the card ({exc.strerror})") from None
    return parse_card(data, str(path))


def card_from_json(obj: object) -> CharacterCard:
    """Build a card from decoded card JSON of any spec (V1 flat, V2 or V3).

    Raises CardError if `obj` nests more than MAX_JSON_DEPTH levels, before reading it.
    """
    if not isinstance(obj, dict):
        raise CardError(f"card JSON must be an object, got {_kind(obj)}")
    _check_depth(obj, "card JSON", MAX_JSON_DEPTH)
    spec = obj.get("spec")
    if spec is None:
        return _card_from_data(obj, {}, "chara_card_v1")
    if spec not in ("chara_card_v2", "chara_card_v3"):
        raise CardError(
            f"unknown card spec {spec!r}: expected chara_card_v2, chara_card_v3, "
            "or a V1 card without 'spec'"
        )
    data = obj.get("data")
    if not isinstance(data, dict):
        raise CardError(f"a {spec} card needs a 'data' object, got {_kind(data)}")
    top = {key: value for key, value in obj.items() if key not in _ENVELOPE_KEYS}
    return _card_from_data(data, top, spec)


# --- building from card JSON ---------------------------------------------------------


def _parse(data: bytes, filename: str) -> CharacterCard:
    if len(data) > MAX_CARD_BYTES:
        raise CardError(f"card file is {len(data):,} bytes; the limit is {MAX_CARD_BYTES:,}")
    if data.startswith(PNG_SIGNATURE):
        keyword, text = _png_card_text(data)
        where = f" in the PNG '{keyword}' chunk"
        return card_from_json(_load_json(_b64decode(text, keyword), where))
    for magic, kind in _OTHER_IMAGES.items():
        if data.startswith(magic):
            raise CardError(f"{kind} cards are not supported: export the card as PNG or JSON")
    if filename.lower().endswith(".png"):
        raise CardError("file is named .png but does not start with the PNG signature")
    return card_from_json(_load_json(data, ""))


def _load_json(raw: bytes, where: str) -> object:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CardError(
            f"card JSON{where} is not UTF-8: byte 0x{raw[err.start]:02x} at offset "
            f"{err.start} is invalid"
        ) from err
    if not text.strip():
        raise CardError(f"card JSON{where} is empty")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise CardError(
            f"card JSON{where} is malformed at line {err.lineno} column {err.colno}: {err.msg}"
        ) from err
    except RecursionError as err:
        raise CardError(
            f"card JSON{where} is nested too deeply; the limit is {MAX_JSON_DEPTH} levels"
        ) from err


def _reject_constant(name: str) -> None:
    raise CardError(f"card JSON has {name}, which is not a valid JSON value")


def _card_from_data(data: dict[str, Any], top: dict[str, Any], spec: Spec) -> CharacterCard:
    """Build a card from `data` (the whole object for V1) and the envelope's extra keys."""
    if data.get("name") is None:
        raise CardError("card has no 'name'" + ("" if spec == "chara_card_v1" else " in 'data'"))
    known = {k: v for k, v in data.items() if k in _DATA_KEYS and v is not None}
    unknown = {k: v for k, v in data.items() if k not in _DATA_KEYS}
    if spec == "chara_card_v1":  # flat: unknown keys sit at the top level
        top, unknown = unknown, {}
    args = {attr: known[key] for key, attr in (_TEXT_KEYS | _LIST_KEYS).items() if key in known}
    args.setdefault("profile", "")
    version = args.get("version")
    if isinstance(version, int | float) and not isinstance(version, bool):
        args["version"] = str(version)  # seen in the wild: "character_version": 1
    return CharacterCard(
        **args,
        aliases=tuple(_aliases_in(known)),
        avatar_url=_avatar_in(data),
        extensions=known.get("extensions", {}),
        spec=spec,
        extra={"top": top, "data": unknown},
    )


def _neeko(data: Mapping[str, Any]) -> dict[str, Any]:
    extensions = data.get("extensions")
    neeko = extensions.get("neeko") if isinstance(extensions, dict) else None
    return neeko if isinstance(neeko, dict) else {}


def _aliases_in(data: Mapping[str, Any]) -> list[Any]:
    """Raw aliases of card `data`: V3 `nickname`, then `extensions.neeko.aliases`."""
    nickname = data.get("nickname")
    if nickname is not None and not isinstance(nickname, str):
        raise CardError(f"nickname must be a string, got {_kind(nickname)}")
    more = _neeko(data).get("aliases", [])
    return ([nickname] if nickname else []) + _str_list(more, "extensions.neeko.aliases")


def _avatar_in(data: Mapping[str, Any]) -> str:
    """Avatar URL of card `data`: `extensions.neeko.avatar_url`, else an http(s) icon asset."""
    neeko = _neeko(data)
    if "avatar_url" in neeko:
        return neeko["avatar_url"]
    assets = data.get("assets")
    icons = [
        asset
        for asset in (assets if isinstance(assets, list) else [])
        if isinstance(asset, dict) and asset.get("type") == "icon" and _is_url(asset.get("uri"))
    ]
    icons.sort(key=lambda asset: asset.get("name") != "main")  # the main icon first
    return icons[0]["uri"] if icons else ""


def _note_in_neeko(card: CharacterCard, data: dict[str, Any]) -> None:
    """Add to `data.extensions.neeko` what `parse_card` could not otherwise read back."""
    notes: dict[str, Any] = {}
    if _clean_aliases(_aliases_in(data), card.name) != card.aliases:
        notes["aliases"] = list(card.aliases)
    if _clean_url(_avatar_in(data)) != card.avatar_url:
        notes["avatar_url"] = card.avatar_url
    if notes:
        data["extensions"] = data["extensions"] | {"neeko": _neeko(data) | notes}


# --- PNG ---------------------------------------------------------------------------------


def _png_chunks(png: bytes) -> Iterator[tuple[str, bytes]]:
    """Yield (type, data) of each chunk up to IEND, checking lengths and CRCs."""
    pos = len(PNG_SIGNATURE)
    while True:
        left = len(png) - pos
        if left == 0:
            raise CardError(f"PNG is truncated: the file ends at byte {pos} with no IEND chunk")
        if left < 8:
            raise CardError(f"PNG is truncated: chunk header at byte {pos} needs 8, {left} left")
        length, raw_type = struct.unpack_from(">I4s", png, pos)
        ctype = raw_type.decode("latin-1")
        if not raw_type.isalpha():
            raise CardError(f"PNG is corrupt: bad chunk type {raw_type!r} at byte {pos}")
        if left - 8 < length + 4:
            raise CardError(
                f"PNG is truncated: chunk {ctype} needs {length + 4:,} bytes, {left - 8:,} left"
            )
        body = png[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack_from(">I", png, pos + 8 + length)
        if zlib.crc32(raw_type + body) != crc:
            raise CardError(f"PNG is corrupt: chunk {ctype} at byte {pos} fails its CRC check")
        yield ctype, body
        if ctype == "IEND":
            return
        pos += 12 + length


def _png_card_text(png: bytes) -> tuple[str, bytes]:
    """Return (keyword, base64 text) of the card chunk, `ccv3` preferred over `chara`."""
    found: dict[str, bytes] = {}
    for i, (ctype, body) in enumerate(_png_chunks(png)):
        if i == 0 and ctype != "IHDR":
            raise CardError(f"PNG is corrupt: the first chunk is {ctype}, not IHDR")
        if ctype not in ("tEXt", "zTXt", "iTXt"):
            continue
        keyword, sep, rest = body.partition(b"\0")
        name = keyword.decode("latin-1").lower()
        if sep and name in CARD_KEYWORDS:
            found.setdefault(name, _chunk_text(ctype, rest, name))
    for keyword in CARD_KEYWORDS:
        if keyword in found:
            return keyword, found[keyword]
    raise CardError("PNG has no 'chara' or 'ccv3' text chunk: not a character card")


def _chunk_text(ctype: str, rest: bytes, keyword: str) -> bytes:
    """The text of a tEXt / zTXt / iTXt chunk after its keyword, inflated if compressed."""
    where = f"{ctype} chunk '{keyword}'"
    if ctype == "tEXt":
        return rest
    if ctype == "zTXt":
        return _inflate(rest[1:], where)
    compressed = rest[:1] == b"\x01"
    _lang, sep1, tail = rest[2:].partition(b"\0")  # after compression flag and method
    _translated, sep2, text = tail.partition(b"\0")
    if not (sep1 and sep2):
        raise CardError(f"PNG is corrupt: {where} is missing its iTXt header fields")
    return _inflate(text, where) if compressed else text


def _inflate(raw: bytes, where: str) -> bytes:
    limit = 2 * MAX_CARD_BYTES
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(raw, limit + 1)
    except zlib.error as err:
        raise CardError(f"PNG is corrupt: {where} does not decompress ({err})") from err
    if len(text) > limit:
        raise CardError(f"PNG {where} decompresses to more than {limit:,} bytes")
    if not inflater.eof:
        raise CardError(f"PNG is truncated: {where} has an incomplete compressed stream")
    return text


def _b64decode(text: bytes, keyword: str) -> bytes:
    compact = re.sub(rb"\s+", b"", text)
    compact += b"=" * (-len(compact) % 4)  # some writers drop the padding
    try:
        raw = base64.b64decode(compact, validate=True)
    except binascii.Error as err:
        raise CardError(f"PNG '{keyword}' chunk is not valid base64: {err}") from err
    if len(raw) > MAX_CARD_BYTES:
        raise CardError(f"PNG card JSON is {len(raw):,} bytes; the limit is {MAX_CARD_BYTES:,}")
    return raw


# --- field checks ------------------------------------------------------------------------


def _set(card: CharacterCard, attr: str, value: object) -> None:
    object.__setattr__(card, attr, value)  # normalising a frozen dataclass in __post_init__


def _kind(value: object) -> str:
    return _KINDS.get(type(value), type(value).__name__)


def _text(value: object, label: str) -> str:
    """`value` without NUL characters, checked to be a string of at most MAX_TEXT_BYTES."""
    if not isinstance(value, str):
        raise CardError(f"{label} must be a string, got {_kind(value)}")
    value = value.replace("\0", "")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as err:
        raise CardError(f"{label} has an unpaired surrogate at character {err.start}") from err
    if size > MAX_TEXT_BYTES:
        raise CardError(f"{label} is {size:,} bytes of UTF-8; the limit is {MAX_TEXT_BYTES:,}")
    return value


def _str_list(values: object, label: str) -> list[str]:
    if not isinstance(values, list | tuple):
        raise CardError(f"{label} must be a list of strings, got {_kind(values)}")
    if len(values) > MAX_LIST_ITEMS:
        raise CardError(f"{label} has {len(values)} entries; the limit is {MAX_LIST_ITEMS}")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise CardError(f"{label}[{i}] must be a string, got {_kind(value)}")
    return list(values)


def _clean_aliases(values: object, name: str) -> tuple[str, ...]:
    """Cleaned aliases, without duplicates or the name itself (compared case-blind)."""
    seen, out = {name.casefold()}, []
    for i, value in enumerate(_str_list(values, "aliases")):
        alias = clean_name(value, f"aliases[{i}]")
        if alias.casefold() not in seen:
            seen.add(alias.casefold())
            out.append(alias)
    return tuple(out)


def _clean_tags(values: object) -> tuple[str, ...]:
    """Stripped tags of at most MAX_TAG_CHARS characters, without empties or duplicates."""
    out: list[str] = []
    for i, value in enumerate(_str_list(values, "tags")):
        tag = _text(value, f"tags[{i}]").strip()
        if len(tag) > MAX_TAG_CHARS:
            raise CardError(f"tags[{i}] is {len(tag)} characters; the limit is {MAX_TAG_CHARS}")
        if tag and tag not in out:
            out.append(tag)
    return tuple(out)


def _clean_greetings(values: object) -> tuple[str, ...]:
    label = "alternate_greetings"
    return tuple(_text(v, f"{label}[{i}]") for i, v in enumerate(_str_list(values, label)))


def _is_url(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_URL_CHARS and bool(_URL.fullmatch(value))


def _clean_url(value: object) -> str:
    url = _text(value, "avatar_url").strip()
    if url and not _is_url(url):
        raise CardError(
            f"avatar_url must be an http(s) URL of at most {MAX_URL_CHARS:,} characters, "
            f"got {url[:80]!r}"
        )
    return url


def _json_object(value: object, label: str, limit: int) -> dict[str, Any]:
    """A deep copy of `value` through JSON: plain JSON data (no NaN), `limit` levels at most."""
    if not isinstance(value, dict):
        raise CardError(f"{label} must be an object, got {_kind(value)}")
    _check_depth(value, label, limit)
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise CardError(f"{label} must hold only JSON data: {err}") from err


def _clean_extra(value: object) -> dict[str, dict[str, Any]]:
    """`extra` as {"top": ..., "data": ...}, with no key that a card field owns."""
    if not isinstance(value, dict) or set(value) - {"top", "data"}:
        raise CardError('extra must be an object with only "top" and "data" keys')
    top = _json_object(value.get("top", {}), "extra.top", MAX_JSON_DEPTH)
    data = _json_object(value.get("data", {}), "extra.data", MAX_JSON_DEPTH - 1)
    clashes = sorted(set(top) & _ENVELOPE_KEYS) + sorted(set(data) & _DATA_KEYS)
    if clashes:
        raise CardError(f"extra repeats card field(s) {', '.join(clashes)}")
    return {"top": top, "data": data}


# --- JSON nesting ------------------------------------------------------------------------


@dataclass
class _Frame:
    """A container being measured by `json_depth`."""

    node: dict | list | tuple
    children: Iterator[object]
    deepest: int = 0
    """Depth of the deepest child measured so far."""


def json_depth(value: object) -> int:
    """How many levels of objects and lists `value` nests: 0 for a scalar, 1 for `[1]`.

    Measured with an explicit stack, so any depth is measured without RecursionError.
    A container shared by several parents is measured once.

    Raises:
        ValueError: A container holds itself (only possible for Python data, not decoded JSON).
    """
    if not isinstance(value, _CONTAINERS):
        return 0
    done: dict[int, int] = {}
    stack = [_Frame(value, _children(value))]
    on_path = {id(value)}
    while stack:
        top = stack[-1]
        child = next(top.children, _END)
        if child is _END:
            stack.pop()
            on_path.discard(id(top.node))
            depth = done[id(top.node)] = top.deepest + 1
            if stack:
                stack[-1].deepest = max(stack[-1].deepest, depth)
        elif isinstance(child, _CONTAINERS):
            if id(child) in done:
                top.deepest = max(top.deepest, done[id(child)])
            elif id(child) in on_path:
                raise ValueError("holds itself (a reference cycle)")
            else:
                on_path.add(id(child))
                stack.append(_Frame(child, _children(child)))
    return done[id(value)]


def _children(node: dict | list | tuple) -> Iterator[object]:
    return iter(node.values() if isinstance(node, dict) else node)


def _check_depth(value: object, label: str, limit: int) -> None:
    """Raise CardError if `value` nests more than `limit` levels (or holds itself)."""
    try:
        depth = json_depth(value)
    except ValueError as err:
        raise CardError(f"{label} {err}") from None
    if depth > limit:
        whole = "" if limit == MAX_JSON_DEPTH else f" ({MAX_JSON_DEPTH} for the whole card)"
        raise CardError(f"{label} is nested {depth} levels deep; the limit is {limit}{whole}")
