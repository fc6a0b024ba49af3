"""Import a speaker-labelled transcript (a play) as character cards and chat dialogues.

The transcript is speeches separated by blank lines, each starting with a line `SPEAKER:`
(the layout of `tinyshakespeare`). For every chosen speaker, each of their speeches
becomes a character turn; the speeches just before it, by whoever spoke them, become the
user turn, as `Name: text` lines. A speaker's exchanges are cut into dialogues of a few
consecutive exchanges, in transcript order, and the split is contiguous: the first
dialogues train, the last ones are held out, so no test line sits next to a training line.
Everything is deterministic: the same file and options give the same output, byte for byte.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from neeko.cards import card_from_fields
from neeko.dialogues import MAX_MESSAGE_CHARS, DataError, Dialogue

SPEAKER = re.compile(r"^([A-Za-z][A-Za-z' .-]{0,62}):$")
_SMALL = {"of", "the", "and", "de", "la", "to", "in"}
_ROMAN = re.compile(r"^[IVX]+$")


@dataclass(frozen=True)
class Speech:
    """One speech of the transcript: who spoke, what, and where (0-based order)."""

    index: int
    speaker: str
    text: str


@dataclass(frozen=True)
class ImportOptions:
    """How a transcript becomes dialogues."""

    characters: int = 9
    """How many speakers to import: the ones with the most words (ties by name)."""
    names: tuple[str, ...] = ()
    """Speakers to import by name (as written in the transcript); overrides `characters`."""
    exchanges: int = 3
    """Character turns per dialogue."""
    context_speeches: int = 2
    """At most this many speeches before a character's turn form the user turn."""
    context_chars: int = 600
    """The user turn keeps at most this many characters (its end, cut at a line)."""
    test_fraction: float = 0.2
    """The last share of each speaker's dialogues held out (at least one)."""
    max_train_dialogues: int | None = None
    """Keep only the last this many training dialogues of a speaker (those next to the test
    stretch); None keeps all."""
    max_test_dialogues: int | None = None
    """Keep only the first this many held-out dialogues of a speaker; None keeps all."""
    source: str = "the transcript"
    """What the characters come from, for their cards ("Shakespeare's plays")."""

    def __post_init__(self) -> None:
        if self.characters < 1 or self.exchanges < 1 or self.context_speeches < 1:
            raise ValueError("characters, exchanges and context_speeches must be >= 1")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if not 40 <= self.context_chars <= MAX_MESSAGE_CHARS:
            raise ValueError(f"context_chars must be in [40, {MAX_MESSAGE_CHARS}]")
        for limit in (self.max_train_dialogues, self.max_test_dialogues):
            if limit is not None and limit < 1:
                raise ValueError("max_train_dialogues and max_test_dialogues must be >= 1")


@dataclass(frozen=True)
class Imported:
    """What an import produced, per character in the order chosen."""

    names: list[str]
    """Display names, in the order of the speakers chosen."""
    train: dict[str, list[Dialogue]]
    test: dict[str, list[Dialogue]]
    profiles: dict[str, str]
    words: dict[str, int]
    """Words each speaker speaks in the whole transcript."""


def parse_transcript(text: str, source: str = "transcript") -> list[Speech]:
    """The speeches of a transcript, in order; text before the first speaker is refused."""
    speeches: list[Speech] = []
    speaker: str | None = None
    lines: list[str] = []

    def flush() -> None:
        body = "\n".join(lines).strip()
        if speaker is not None and body:
            speeches.append(Speech(len(speeches), speaker, body))

    after_blank = True  # a speaker line opens the file or follows a blank line
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        match = SPEAKER.match(line) if after_blank else None
        after_blank = not line.strip()
        if match:
            flush()
            speaker, lines = match.group(1).strip(), []
        elif speaker is None:
            if line.strip():
                raise DataError(f"{source}:{n}: text before the first 'SPEAKER:' line")
        else:
            lines.append(line)
    flush()
    if not speeches:
        raise DataError(f"{source}: no speeches (expected 'SPEAKER:' lines followed by text)")
    return speeches


def display_name(speaker: str) -> str:
    """`KING RICHARD III` -> `King Richard III`, `DUCHESS OF YORK` -> `Duchess of York`."""
    words = speaker.split()
    out = []
    for i, w in enumerate(words):
        if _ROMAN.match(w):
            out.append(w)
        elif i and w.lower() in _SMALL:
            out.append(w.lower())
        else:
            out.append(w[:1].upper() + w[1:].lower())
    return " ".join(out)


def import_transcript(speeches: list[Speech], options: ImportOptions | None = None) -> Imported:
    """Cards' profiles and train / test dialogues of the chosen speakers."""
    opts = options or ImportOptions()
    words = Counter()
    for s in speeches:
        words[s.speaker] += len(s.text.split())
    if opts.names:
        unknown = [n for n in opts.names if n not in words]
        if unknown:
            raise DataError(f"no speeches by {', '.join(map(repr, unknown))} in the transcript")
        chosen = list(dict.fromkeys(opts.names))
    else:
        ranked = sorted(words, key=lambda s: (-words[s], s))
        chosen = [s for s in ranked if s.lower() not in ("all", "both")][: opts.characters]
    names = [display_name(s) for s in chosen]
    if len(set(names)) < len(names):
        raise DataError("two chosen speakers have the same display name")
    result = Imported(names, {}, {}, {}, {})
    for speaker, name in zip(chosen, names, strict=True):
        dialogues = _dialogues(speeches, speaker, name, opts)
        if len(dialogues) < 2:
            raise DataError(f"{speaker} has too few speeches to split ({len(dialogues)} dialogues)")
        n_test = max(1, round(len(dialogues) * opts.test_fraction))
        train, test = dialogues[:-n_test], dialogues[-n_test:]
        if opts.max_train_dialogues is not None:
            train = train[-opts.max_train_dialogues :]
        if opts.max_test_dialogues is not None:
            test = test[: opts.max_test_dialogues]
        result.train[name], result.test[name] = train, test
        result.words[name] = words[speaker]
        result.profiles[name] = _profile(name, opts.source, train)
    return result


def _dialogues(
    speeches: list[Speech], speaker: str, name: str, opts: ImportOptions
) -> list[Dialogue]:
    """The speaker's exchanges, in order, `opts.exchanges` to a dialogue."""
    exchanges: list[tuple[str, str]] = []
    last = -1  # the speaker's previous speech: the user turn is what others said since
    for s in speeches:
        if s.speaker != speaker:
            continue
        since = speeches[max(last + 1, s.index - opts.context_speeches) : s.index]
        last = s.index
        if len(s.text) > MAX_MESSAGE_CHARS:
            continue
        context = "\n".join(f"{display_name(p.speaker)}: {p.text}" for p in since)
        exchanges.append((_tail(context, opts.context_chars) or "(continues)", s.text))
    out = []
    for start in range(0, len(exchanges), opts.exchanges):
        chunk = exchanges[start : start + opts.exchanges]
        messages = [m for user, reply in chunk for m in (("user", user), ("character", reply))]
        out.append(Dialogue(name, messages, f"{speaker}#{start // opts.exchanges}"))
    return out


def _tail(text: str, limit: int) -> str:
    """The end of `text` in at most `limit` characters, starting at a line if it can."""
    if len(text) <= limit:
        return text
    cut = text[-limit:]
    newline = cut.find("\n")
    return cut[newline + 1 :] if 0 <= newline < len(cut) - 1 else cut


def _profile(name: str, source: str, train: list[Dialogue]) -> str:
    """A card profile: who the character is and the start of their first training line."""
    first = next(text for d in train for role, text in d.messages if role == "character")
    sample = " ".join(first.split())
    if len(sample) > 160:
        sample = sample[:160].rsplit(" ", 1)[0] + " ..."
    return f"{name}, a character of {source}. In {name}'s own words: {sample}"


def write_import(result: Imported, out: str | Path) -> dict:
    """Write `cards/*.json`, `train.jsonl` and `test.jsonl` under `out`; returns a summary."""
    folder = Path(out)
    (folder / "cards").mkdir(parents=True, exist_ok=True)
    summary: dict = {"characters": {}}
    for name in result.names:
        card = card_from_fields(name, result.profiles[name])
        slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        (folder / "cards" / f"{slug}.json").write_text(
            json.dumps(
                {"name": card.name, "description": card.profile}, ensure_ascii=False, indent=2
            )
            + "\n",
            encoding="utf-8",
        )
        summary["characters"][name] = {
            "card": f"cards/{slug}.json",
            "words": result.words[name],
            "train_dialogues": len(result.train[name]),
            "test_dialogues": len(result.test[name]),
            "first_test": result.test[name][0].source,
        }
    for split, data in (("train", result.train), ("test", result.test)):
        with (folder / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for name in result.names:
                for d in data[name]:
                    messages = [{"role": r, "content": t} for r, t in d.messages]
                    f.write(
                        json.dumps({"character": name, "messages": messages}, ensure_ascii=False)
                        + "\n"
                    )
    return summary
