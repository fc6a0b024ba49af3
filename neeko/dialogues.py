"""Dialogue data: reading training files and rendering them exactly as the engine prompts.

Two JSONL formats are read, one dialogue per line:

- chat: `{"character": NAME, "messages": [{"role": "user" | "character", "content": TEXT}]}`
- Character-LLM "prompted": `{"prompt": ..., "output": ...}` whose turns read
  `Name (speaking): text<|eot|>`; the speaker of `output` is the character.

Rendering uses the tokenizer's chat template with the character's system prompt, the same
text the engine builds at inference; the loss covers only the character's own turns (up to
and including the end-of-turn token).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from neeko.cards import MAX_JSON_DEPTH, CharacterCard, json_depth
from neeko.errors import NeekoError

IGNORE = -100
MAX_DIALOGUE_MESSAGES = 200
"""Messages (turns) in one dialogue."""
MAX_MESSAGE_CHARS = 8_000
"""Characters in one message's content."""
MAX_JOB_DIALOGUES = 2_000
"""Dialogues in one training job."""
MAX_JOB_TOKENS = 200_000
"""Tokens of message content in one training job (the default of `job_dialogues`)."""
MAX_JOB_BYTES = 5_000_000
"""Size of a dialogue file uploaded for a training job."""
TURN = re.compile(
    r"(?P<name>[^\n<>]+?) \((?P<mode>speaking|thinking|actions?)\):\s*(?P<text>.*?)<\|eot\|>", re.S
)


class DataError(NeekoError, ValueError):
    """A training file is malformed; the message names the file and line."""


@dataclass
class Dialogue:
    """One dialogue of a character: alternating user / character turns."""

    character: str
    messages: list[tuple[str, str]]
    """(role, text) pairs; role is "user" or "character"."""
    source: str = ""
    """Where it came from, as `file:line`."""


def read_dialogues(path: str | Path) -> list[Dialogue]:
    """All dialogues of a JSONL file in either format; errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    out = parse_jsonl(text, str(path))
    if not out:
        raise DataError(f"{path}: no dialogues")
    return out


def parse_jsonl(text: str, source: str) -> list[Dialogue]:
    """Dialogues of JSONL text (blank lines skipped); errors name `source:line`."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{n}"
        out.append(parse_dialogue(_load_line(line, where), where))
    return out


def _load_line(line: str, where: str) -> dict:
    """One JSONL line as an object nested at most MAX_JSON_DEPTH levels; errors name `where`."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise DataError(
            f"{where}: JSON nested too deeply; the limit is {MAX_JSON_DEPTH} levels"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: each line must be a JSON object")
    depth = json_depth(obj)
    if depth > MAX_JSON_DEPTH:
        raise DataError(f"{where}: JSON nested {depth} levels deep; the limit is {MAX_JSON_DEPTH}")
    return obj


def parse_dialogue(obj: dict, where: str) -> Dialogue:
    """One dialogue from a decoded JSONL line (chat or prompted); errors name `where`."""
    if "messages" in obj:
        return _parse_chat(obj, where)
    if "prompt" in obj and "output" in obj:
        return _parse_prompted(obj, where)
    raise DataError(f"{where}: expected 'character' + 'messages', or 'prompt' + 'output'")


def _parse_chat(obj: dict, where: str) -> Dialogue:
    name, messages = obj.get("character"), obj.get("messages")
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{where}: 'character' must be a non-empty string")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    _check_count(len(messages), where)
    turns = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role not in ("user", "character") or not isinstance(content, str):
            raise DataError(
                f"{where}: message {i} needs role 'user' or 'character' and string content"
            )
        _check_chars(content, f"{where}: message {i}")
        turns.append((role, content))
    if not any(role == "character" for role, _ in turns):
        raise DataError(f"{where}: no 'character' turn to learn from")
    return Dialogue(name.strip(), turns, where)


def _parse_prompted(obj: dict, where: str) -> Dialogue:
    prompt, output = obj["prompt"], obj["output"]
    if not isinstance(prompt, str) or not isinstance(output, str):
        raise DataError(f"{where}: 'prompt' and 'output' must be strings")
    said = [m for m in TURN.finditer(output) if m["mode"] == "speaking"]
    if not said:
        raise DataError(f"{where}: 'output' has no 'Name (speaking): ...<|eot|>' turn")
    name = said[0]["name"].strip()
    turns: list[tuple[str, str]] = []
    for m in [*TURN.finditer(prompt), *said]:
        if m["mode"] != "speaking":
            continue
        role = "character" if m["name"].strip() == name else "user"
        text = m["text"].strip()
        if turns and turns[-1][0] == role:  # merge consecutive turns of one side
            turns[-1] = (role, f"{turns[-1][1]}\n{text}")
        else:
            turns.append((role, text))
    if turns[0][0] == "character":
        turns.insert(0, ("user", "..."))
    _check_count(len(turns), where)
    for i, (_, text) in enumerate(turns):
        _check_chars(text, f"{where}: turn {i}")
    return Dialogue(name, turns, where)


def _check_count(n: int, where: str) -> None:
    if n > MAX_DIALOGUE_MESSAGES:
        raise DataError(
            f"{where}: the dialogue has {n} messages; the limit is {MAX_DIALOGUE_MESSAGES}"
        )


def _check_chars(text: str, label: str) -> None:
    if len(text) > MAX_MESSAGE_CHARS:
        raise DataError(
            f"{label} is {len(text):,} characters long; the limit is {MAX_MESSAGE_CHARS:,}"
        )


def _check_dialogue(dialogue: Dialogue) -> None:
    """Raise DataError, naming the source, if `dialogue` has too many or too long messages."""
    _check_count(len(dialogue.messages), dialogue.source)
    for i, (_, text) in enumerate(dialogue.messages):
        _check_chars(text, f"{dialogue.source}: message {i}")


@dataclass
class Example:
    """One tokenised dialogue: ids, labels (IGNORE off the character's turns), and its block."""

    ids: list[int]
    labels: list[int]
    character: str
    block: int | None = None
    dropped: int = 0
    """Tokens of the character's turns left out by the cut at `max_length` (their text's
    tokens, without the chat template's)."""


def encode(
    tokenizer: PreTrainedTokenizerBase, system: str, dialogue: Dialogue, max_length: int = 1024
) -> Example:
    """Tokenise `dialogue` as the engine would prompt it, labelling the character's turns.

    The result is cut at `max_length` tokens, and rendering stops there: the cost is bounded
    by `max_length`, whatever the length of the dialogue.
    """
    enc = _Encoder(tokenizer, system, dialogue.source)
    done = 0
    for role, text in dialogue.messages:
        room = max_length - len(enc.ids)
        if room <= 0:
            break
        done += 1
        if role == "user":
            enc.add_user(text, room)
        elif enc.pending > room:  # the user turns before this reply fill the rest
            enc.add_context()
            done -= 1
            break
        else:
            enc.add_reply(text)
    ids, labels = enc.ids[:max_length], enc.labels[:max_length]
    if all(label == IGNORE for label in labels):
        raise DataError(f"{dialogue.source}: no character tokens within {max_length} tokens")
    dropped = sum(1 for t in enc.labels[max_length:] if t != IGNORE)
    for role, text in dialogue.messages[done:]:
        if role == "character":
            dropped += len(enc.tokens(text))
    return Example(ids, labels, dialogue.character, dropped=dropped)


@dataclass
class _Encoder:
    """The ids and labels of a dialogue so far, rendered one character turn at a time."""

    tokenizer: PreTrainedTokenizerBase
    system: str
    source: str
    messages: list[dict] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    rendered: str = ""
    """The chat-template text of the turns already in `ids`."""
    pending: int = 0
    """User turns added since the last reply."""

    def __post_init__(self) -> None:
        self.messages.append({"role": "system", "content": self.system})

    def add_user(self, text: str, room: int) -> None:
        """Queue a user turn; past `room` + 1 of them, more cannot reach the cut."""
        if self.pending <= room:  # each turn renders as one token at least
            self.messages.append({"role": "user", "content": text})
            self.pending += 1

    def add_reply(self, text: str) -> None:
        """Add the queued user turns as context, then the character's reply as target."""
        prompt = _render(self.tokenizer, self.messages, generation_prompt=True)
        self.messages.append({"role": "assistant", "content": text})
        full = _render(self.tokenizer, self.messages, generation_prompt=False)
        self._check_prefix(prompt)
        self._check_prefix(full, prompt)
        context = self.tokens(prompt[len(self.rendered) :])
        target = self.tokens(full[len(prompt) :])
        self.ids += context + target
        self.labels += [IGNORE] * len(context) + _until_eos(target, self.tokenizer.eos_token_id)
        self.rendered, self.pending = full, 0

    def add_context(self) -> None:
        """Add the queued user turns as context only (they run past the cut)."""
        text = _render(self.tokenizer, self.messages, generation_prompt=False)
        self._check_prefix(text)
        context = self.tokens(text[len(self.rendered) :])
        self.ids += context
        self.labels += [IGNORE] * len(context)
        self.rendered, self.pending = text, 0

    def _check_prefix(self, text: str, prefix: str | None = None) -> None:
        if not text.startswith(self.rendered if prefix is None else prefix):
            raise DataError(f"{self.source}: the chat template is not prefix-stable")

    def tokens(self, text: str) -> list[int]:
        """`text`'s token ids, without special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False)


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool
) -> str:
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=False
    )


def _until_eos(target: list[int], eos: int | None) -> list[int]:
    """Labels for a reply: its tokens through the end-of-turn token, nothing after it."""
    if eos in target:
        end = target.index(eos) + 1
        return target[:end] + [IGNORE] * (len(target) - end)
    return list(target)


def batches(examples: list[Example], size: int) -> Iterator[list[Example]]:
    """Consecutive batches of `size` examples (the last may be smaller)."""
    for i in range(0, len(examples), size):
        yield examples[i : i + size]


def job_dialogues(
    card: CharacterCard,
    data: bytes | None,
    *,
    max_tokens: int = MAX_JOB_TOKENS,
    count_tokens: Callable[[str], int] | None = None,
) -> list[dict]:
    """Chat-format dialogues for an expansion job: the uploaded JSONL, else the card's examples.

    Args:
        card: The character the job trains.
        data: An uploaded JSONL file of the character's dialogues, or None.
        max_tokens: The most tokens of message content a job takes.
        count_tokens: Counts the tokens of a text; without it a message counts
            len(text) // 4 + 1.

    Raises:
        DataError: The dialogues are malformed, another character's, or past a limit.
    """
    dialogues = _uploaded(card, data) if data else card_examples(card)
    if not dialogues:
        raise DataError(
            f"{card.name} has no example dialogues in its card; attach a JSONL file of dialogues"
        )
    if len(dialogues) > MAX_JOB_DIALOGUES:
        raise DataError(
            f"there are {len(dialogues):,} dialogues; a training job takes at most "
            f"{MAX_JOB_DIALOGUES:,}"
        )
    for d in dialogues:
        _check_dialogue(d)
    _check_tokens(dialogues, max_tokens, count_tokens)
    return [
        {"character": card.name, "messages": [{"role": r, "content": t} for r, t in d.messages]}
        for d in dialogues
    ]


def _uploaded(card: CharacterCard, data: bytes) -> list[Dialogue]:
    """The dialogues of an uploaded JSONL file, all of them `card`'s."""
    if len(data) > MAX_JOB_BYTES:
        raise DataError(f"the dialogue file is over {MAX_JOB_BYTES // 1_000_000} MB")
    dialogues = parse_jsonl(data.decode("utf-8", errors="replace"), "dialogues")
    for d in dialogues:
        if d.character != card.name:
            raise DataError(f"{d.source}: a dialogue of {d.character!r}, not {card.name!r}")
    return dialogues


def _check_tokens(
    dialogues: list[Dialogue], max_tokens: int, count_tokens: Callable[[str], int] | None
) -> None:
    """Raise DataError if the messages hold more than `max_tokens` tokens (early exit)."""
    count = count_tokens or (lambda text: len(text) // 4 + 1)
    total = 0
    for d in dialogues:
        for _, text in d.messages:
            total += count(text)
            if total > max_tokens:
                raise DataError(
                    f"the dialogues hold at least {total:,} tokens; a training job takes at most "
                    f"{max_tokens:,}"
                )


def card_examples(card: CharacterCard) -> list[Dialogue]:
    """Dialogues from a card's `mes_example` (`<START>` blocks of `{{user}}:` / `{{char}}:`)."""
    out = []
    for block in re.split(r"<START>", card.example_dialogues, flags=re.IGNORECASE):
        messages: list[tuple[str, str]] = []
        for line in block.splitlines():
            m = re.match(r"\s*(\{\{user\}\}|<USER>|\{\{char\}\}|<BOT>)\s*:\s*(.*)", line, re.I)
            if m:
                role = "user" if m.group(1).lower() in ("{{user}}", "<user>") else "character"
                messages.append((role, m.group(2).strip()))
            elif messages and line.strip():
                role, text = messages[-1]
                messages[-1] = (role, f"{text}\n{line.strip()}")
        if any(r == "character" for r, _ in messages) and messages:
            out.append(Dialogue(card.name, messages, "card example"))
    return out
