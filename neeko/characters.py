"""Characters: who they are, where they belong (scopes), and the keys they are stored under.

A character belongs to one scope: the shared cast (`SHARED`, seen everywhere), one Discord
server (`guild_scope(id)`), or the terminal chat (`LOCAL`). Names are compared by `fold`,
which ignores case, accents, punctuation, spacing and full-width forms ("BOLT 7", "Bolt-7"
and "ＢＯＬＴ－７" are one name); storage keys are made from the same folded form, so two
names that compare different never share a key. Keys are stable (no `hash()`), unique in a
store, and never reused. `Character` is frozen: only the catalog (`neeko.catalog`) makes
new versions of one.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from neeko.cards import CharacterCard, parse_card
from neeko.errors import NeekoError

Status = Literal["fused", "training", "trained"]
STATUSES: tuple[Status, ...] = ("fused", "training", "trained")
Mix = Mapping[str, float]
"""A gate mix: weights over trained characters' keys (a fused character or persona)."""

SHARED = "shared"
"""The shared cast: seen in every scope, managed by the bot's owners only."""
LOCAL = "local"
"""The terminal chat's own scope."""
_GUILD = re.compile(r"guild:(\d{1,20})")
KEY_PATTERN = r"^(?:(?:local|g\d{1,20})\.)?(?:[a-z0-9_]{1,100})(?:-\d{1,6})?$"
"""Storage keys: `[scope tag.]base[-n]` (the shared cast has no tag; `-n` follows a key
already used)."""
_KEY = re.compile(KEY_PATTERN)
CAST_DIR = Path(__file__).parent / "data" / "cast"


class CatalogError(NeekoError, ValueError):
    """A character is unknown, taken or out of scope, or the store is unreadable."""


def guild_scope(guild_id: int | str) -> str:
    """The scope of one Discord server."""
    return f"guild:{int(guild_id)}"


def check_scope(scope: str) -> str:
    """`scope` if it is `SHARED`, `LOCAL` or `guild:<id>`; else CatalogError."""
    if scope in (SHARED, LOCAL) or (isinstance(scope, str) and _GUILD.fullmatch(scope)):
        return scope
    raise CatalogError(f"unknown scope {scope!r}: expected shared, local or guild:<id>")


def check_key(key: str) -> str:
    """`key` if it has the form of a storage key (safe as a file name); else CatalogError."""
    if isinstance(key, str) and _KEY.fullmatch(key):
        return key
    raise CatalogError(f"{key!r} is not a valid character key")


def fold(name: str) -> str:
    """The form in which names are compared: "Captain Mára Vell!" -> "captain mara vell".

    NFKC (full-width and compatibility forms), case folding, accents of Latin, Greek and
    Cyrillic letters dropped (other scripts keep their marks: in kana they change the
    word), and every run of characters that are neither letters nor digits becomes one
    space.
    """
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", name).casefold())
    kept, base = [], "\0"
    for char in text:
        if unicodedata.combining(char) and (ord(base) < 0x0530 or 0x1E00 <= ord(base) < 0x2000):
            continue
        kept.append(char)
        if not unicodedata.combining(char):
            base = char
    text = unicodedata.normalize("NFC", "".join(kept))
    word = (c if c.isalnum() or unicodedata.category(c)[0] == "M" else " " for c in text)
    return " ".join("".join(word).split())


def key_base(name: str) -> str:
    """The scope-free part of a key: the folded name, file-safe.

    ASCII names keep their words ("bolt_7"); others get their ASCII letters and a digest of
    the folded name ("u3a5c0e1f9b2d"), the same in every process.
    """
    folded = fold(name)
    if not folded:
        raise CatalogError(f"{name!r} has no letter or digit; a name needs one")
    if folded.isascii():
        return folded.replace(" ", "_")[:100]
    latin = re.sub(r"[^a-z0-9]+", "_", folded.encode("ascii", "ignore").decode()).strip("_")
    digest = hashlib.sha256(folded.encode()).hexdigest()[:12]
    return f"{latin[:80]}_{digest}" if latin else f"u{digest}"


def scope_key(scope: str, name: str, n: int = 1) -> str:
    """The `n`-th candidate key of `name` in `scope` (`n` > 1 when earlier ones were used)."""
    check_scope(scope)
    tag = "" if scope == SHARED else "local." if scope == LOCAL else f"g{scope[6:]}."
    return f"{tag}{key_base(name)}" + (f"-{n}" if n > 1 else "")


def system_prompt(card: CharacterCard) -> str:
    """The system prompt of a character, used alike in training, evaluation and chat."""
    parts = [f"You are {card.name}. {card.profile.strip()}"]
    if card.personality.strip():
        parts.append(f"Personality: {card.personality.strip()}")
    if card.scenario.strip():
        parts.append(f"Scenario: {card.scenario.strip()}")
    parts.append(f"Stay in character and reply as {card.name}.")
    return "\n".join(parts)


@dataclass(frozen=True)
class Character:
    """One catalog entry; frozen (the catalog replaces it to change it)."""

    key: str
    card: CharacterCard
    scope: str = SHARED
    status: Status = "fused"
    mix: Mix = field(default_factory=dict)
    """For a fused character: its gate mix over trained characters' keys."""
    submitted_by: str = ""
    """Who added it (a user id), where known."""

    @property
    def name(self) -> str:
        """Display name."""
        return self.card.name

    def names(self) -> tuple[str, ...]:
        """Name and aliases, folded: what other names must not equal."""
        return tuple(dict.fromkeys(fold(n) for n in (self.card.name, *self.card.aliases)))

    def visible_in(self, scope: str | None) -> bool:
        """Whether `scope` sees it (None sees every scope: a store's own tools)."""
        return scope is None or self.scope in (SHARED, scope)


@dataclass
class CastMember:
    """A starter-cast character: its card and its train / held-out dialogue files."""

    card: CharacterCard
    train: Path
    heldout: Path


def read_cast(folder: Path = CAST_DIR) -> list[CastMember]:
    """The starter cast shipped with Neeko (one sub-folder per character)."""
    members = []
    for sub in sorted(p for p in folder.iterdir() if (p / "card.json").exists()):
        card = parse_card((sub / "card.json").read_bytes(), str(sub / "card.json"))
        members.append(CastMember(card, sub / "train.jsonl", sub / "heldout.jsonl"))
    if not members:
        raise CatalogError(f"{folder}: no starter cast found")
    return members
