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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from neeko.cards import CharacterCard
from neeko.errors import NeekoError

IGNORE = -100
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
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: each line must be a JSON object")
        out.append(parse_dialogue(obj, where))
    return out


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
    turns = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role not in ("user", "character") or not isinstance(content, str):
            raise DataError(
                f"{where}: message {i} needs role 'user' or 'character' and string content"
            )
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
    return Dialogue(name, turns, where)


@dataclass
class Example:
    """One tokenised dialogue: ids, labels (IGNORE off the character's turns), and its block."""

    ids: list[int]
    labels: list[int]
    character: str
    block: int | None = None


def encode(
    tokenizer: PreTrainedTokenizerBase, system: str, dialogue: Dialogue, max_length: int = 1024
) -> Example:
    """Tokenise `dialogue` as the engine would prompt it, labelling the character's turns."""
    messages = [{"role": "system", "content": system}]
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for role, text in dialogue.messages:
        if role == "user":
            messages.append({"role": "user", "content": text})
            continue
        prompt = _render(tokenizer, messages, generation_prompt=True)
        messages.append({"role": "assistant", "content": text})
        full = _render(tokenizer, messages, generation_prompt=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise DataError(f"{dialogue.source}: the chat template is not prefix-stable")
        context = tokenizer.encode(prompt[len(rendered) :], add_special_tokens=False)
        target = tokenizer.encode(full[len(prompt) :], add_special_tokens=False)
        ids += context + target
        labels += [IGNORE] * len(context) + _until_eos(target, tokenizer.eos_token_id)
        rendered = full
    if len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels):
        raise DataError(f"{dialogue.source}: no character tokens within {max_length} tokens")
    return Example(ids, labels, dialogue.character)


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


def job_dialogues(card: CharacterCard, data: bytes | None) -> list[dict]:
    """Chat-format dialogues for an expansion job: the uploaded JSONL, else the card's examples."""
    dialogues: list[Dialogue] = []
    if data:
        if len(data) > 5_000_000:
            raise DataError("the dialogue file is over 5 MB")
        dialogues = parse_jsonl(data.decode("utf-8", errors="replace"), "dialogues")
        for d in dialogues:
            if d.character != card.name:
                raise DataError(f"{d.source}: a dialogue of {d.character!r}, not {card.name!r}")
    else:
        dialogues = card_examples(card)
    if not dialogues:
        raise DataError(
            f"{card.name} has no example dialogues in its card; attach a JSONL file of dialogues"
        )
    return [
        {"character": card.name, "messages": [{"role": r, "content": t} for r, t in d.messages]}
        for d in dialogues
    ]


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
