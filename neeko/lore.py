"""Lorebooks: a card's `character_book` entries, inserted when their keys come up.

Follows the V2/V3 card spec (and SillyTavern's reading of it): an entry fires when one of
its `keys` appears in the recent messages (as whole words; case-insensitive unless
`case_sensitive`); a `selective` entry also needs one of its `secondary_keys`; a `constant`
entry always fires; disabled entries never do. Fired entries fill the book's token budget
by `priority` (highest first), then go into the prompt by `insertion_order` (lowest first).
A card's book is untrusted input: malformed entries are skipped, sizes are capped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from neeko.characters import fold

MAX_ENTRIES = 500
MAX_KEYS = 50
MAX_KEY_CHARS = 100
MAX_CONTENT_CHARS = 8000
DEFAULT_SCAN_DEPTH = 4
"""Messages scanned for keys when the book does not say."""


@dataclass(frozen=True)
class LoreEntry:
    """One entry of a lorebook."""

    keys: tuple[str, ...]
    content: str
    secondary_keys: tuple[str, ...] = ()
    selective: bool = False
    constant: bool = False
    case_sensitive: bool = False
    insertion_order: int = 0
    priority: int = 0
    name: str = ""

    def label(self) -> str:
        """How `/memory` names it: its name, else its first key."""
        return self.name or (self.keys[0] if self.keys else self.content[:40])


@dataclass(frozen=True)
class Lorebook:
    """A card's lorebook, checked."""

    entries: tuple[LoreEntry, ...]
    scan_depth: int = DEFAULT_SCAN_DEPTH
    token_budget: int | None = None

    @classmethod
    def from_card_data(cls, book: Any) -> Lorebook | None:
        """The `character_book` object of a card, or None where there is none to use."""
        if not isinstance(book, dict) or not isinstance(book.get("entries"), list):
            return None
        entries = [e for e in map(_entry, book["entries"][:MAX_ENTRIES]) if e is not None]
        if not entries:
            return None
        depth = _int(book.get("scan_depth"), DEFAULT_SCAN_DEPTH)
        budget = book.get("token_budget")
        return cls(
            tuple(entries),
            max(1, min(depth, 100)),
            _int(budget, 0) or None if budget is not None else None,
        )

    def fire(
        self, recent: Sequence[str], count_tokens: Callable[[str], int], budget: int
    ) -> list[LoreEntry]:
        """The entries to insert for the `recent` messages (oldest first), in order.

        At most `budget` tokens, or the book's own budget if smaller.
        """
        window = list(recent)[-self.scan_depth :]
        raw = "\n".join(window)
        folded = f" {fold(raw)} "
        fired = [e for e in self.entries if e.constant or _matches(e, raw, folded)]
        limit = min(budget, self.token_budget or budget)
        chosen, used = [], 0
        for entry in sorted(fired, key=lambda e: -e.priority):  # stable: file order on ties
            cost = count_tokens(entry.content)
            if used + cost <= limit:
                chosen.append(entry)
                used += cost
        return sorted(chosen, key=lambda e: e.insertion_order)


def _matches(entry: LoreEntry, raw: str, folded: str) -> bool:
    if not _any_key(entry.keys, entry.case_sensitive, raw, folded):
        return False
    if entry.selective and entry.secondary_keys:
        return _any_key(entry.secondary_keys, entry.case_sensitive, raw, folded)
    return True


def _any_key(keys: tuple[str, ...], case_sensitive: bool, raw: str, folded: str) -> bool:
    for key in keys:
        if case_sensitive:
            if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", raw):
                return True
        elif (want := fold(key)) and f" {want} " in folded:
            return True
    return False


def _entry(data: Any) -> LoreEntry | None:
    """A checked entry, or None for one that is malformed, disabled or empty."""
    if not isinstance(data, dict) or data.get("enabled", True) is False:
        return None
    content = data.get("content")
    if not isinstance(content, str) or not content.strip():
        return None
    keys = _keys(data.get("keys"))
    constant = data.get("constant") is True
    if not keys and not constant:
        return None
    name = data.get("name") or data.get("comment") or ""
    return LoreEntry(
        keys=keys,
        content=content.strip()[:MAX_CONTENT_CHARS],
        secondary_keys=_keys(data.get("secondary_keys")),
        selective=data.get("selective") is True,
        constant=constant,
        case_sensitive=data.get("case_sensitive") is True,
        insertion_order=_int(data.get("insertion_order"), 0),
        priority=_int(data.get("priority"), 0),
        name=name[:80] if isinstance(name, str) else "",
    )


def _keys(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    keys = [k.strip()[:MAX_KEY_CHARS] for k in value[:MAX_KEYS] if isinstance(k, str)]
    return tuple(k for k in keys if k)


def _int(value: Any, default: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return int(max(-(10**9), min(value, 10**9)))
