"""The character catalog: cards, role embeddings, status and blocks, kept in a store folder.

A store folder holds `manifest.json` (one entry per character: its card, status and, for a
fused character, its gate over trained characters), `roles.safetensors` (role embeddings)
, `gate.safetensors` (the learned gate's row per trained character, when fitted) and
`blocks/KEY.safetensors` (one block per trained character). Every file is written to
a temporary name and renamed into place, the manifest last, so a crash mid-save leaves the
previous store intact.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tempfile
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from neeko.cards import CharacterCard, parse_card
from neeko.errors import NeekoError
from neeko.gating import GateConfig, RoleEncoder, fit_gate, fusion_gate, top_k_softmax
from neeko.lora import Gate, LoRABank

Status = Literal["fused", "training", "trained"]
MANIFEST = "manifest.json"
ROLES = "roles.safetensors"
GATE = "gate.safetensors"
STORE_VERSION = 1
CAST_DIR = Path(__file__).parent / "data" / "cast"


class CatalogError(NeekoError, ValueError):
    """A character is unknown, already exists, or the store is unreadable."""


def slug(name: str) -> str:
    """A file-safe key for a character name ("Captain Mara Vell" -> "captain_mara_vell")."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    key = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return key or f"char_{abs(hash(name)) % 10**8}"


def system_prompt(card: CharacterCard) -> str:
    """The system prompt of a character, used alike in training, evaluation and chat."""
    parts = [f"You are {card.name}. {card.profile.strip()}"]
    if card.personality.strip():
        parts.append(f"Personality: {card.personality.strip()}")
    if card.scenario.strip():
        parts.append(f"Scenario: {card.scenario.strip()}")
    parts.append(f"Stay in character and reply as {card.name}.")
    return "\n".join(parts)


@dataclass
class Character:
    """One catalog entry."""

    key: str
    card: CharacterCard
    status: Status = "fused"
    fused_from: dict[str, float] = field(default_factory=dict)
    """For a fused character: weights over trained characters' keys."""
    block: int | None = None
    """Index of its block in the bank it was loaded into (trained characters)."""

    @property
    def name(self) -> str:
        """Display name."""
        return self.card.name

    def to_json(self) -> dict:
        """Manifest entry."""
        return {
            "key": self.key,
            "status": self.status,
            "fused_from": self.fused_from,
            "card": self.card.to_dict(),
        }


@dataclass
class Resolution:
    """What a user's text names: a character, near misses, or a free-text persona."""

    kind: Literal["character", "suggestions", "persona"]
    character: Character | None = None
    suggestions: list[str] = field(default_factory=list)
    text: str = ""


class Catalog:
    """Characters with their role embeddings; optionally backed by a store folder."""

    def __init__(self, folder: str | Path | None = None, encoder: str = "default") -> None:
        """An empty catalog; `open` reads an existing store."""
        self.folder = Path(folder) if folder else None
        self.encoder_name = encoder
        self.model = ""
        """Base model the blocks were trained on (a block only fits that model)."""
        self.characters: dict[str, Character] = {}
        self.embeddings: dict[str, Tensor] = {}
        self.gate_rows: dict[str, Tensor] = {}
        """The learned gate: W_g's row for each trained character (empty until fitted)."""
        self._encoder: RoleEncoder | None = None

    # -- persistence -------------------------------------------------------------------

    @classmethod
    def open(cls, folder: str | Path) -> Catalog:
        """Read the store in `folder` (which must exist)."""
        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CatalogError(f"{folder}: no {MANIFEST}; not a character store") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CatalogError(f"{folder / MANIFEST}: unreadable ({exc})") from None
        if manifest.get("version") != STORE_VERSION:
            raise CatalogError(f"{folder}: store version {manifest.get('version')!r} unsupported")
        catalog = cls(folder, manifest.get("encoder", "default"))
        catalog.model = manifest.get("model", "")
        for entry in manifest["characters"]:
            card = CharacterCard.from_dict(entry["card"])
            catalog.characters[entry["key"]] = Character(
                entry["key"], card, entry["status"], dict(entry.get("fused_from", {}))
            )
        if (folder / ROLES).exists():
            catalog.embeddings = load_file(str(folder / ROLES))
        if (folder / GATE).exists():
            catalog.gate_rows = load_file(str(folder / GATE))
        return catalog

    def save(self) -> None:
        """Write the store atomically (blocks are written by `save_block`)."""
        if self.folder is None:
            raise CatalogError("this catalog has no store folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.embeddings:
            _atomic(
                self.folder / ROLES,
                lambda p: save_file({k: v.contiguous() for k, v in self.embeddings.items()}, p),
            )
        if self.gate_rows:
            _atomic(
                self.folder / GATE,
                lambda p: save_file({k: v.contiguous() for k, v in self.gate_rows.items()}, p),
            )
        manifest = {
            "version": STORE_VERSION,
            "encoder": self.encoder_name,
            "model": self.model,
            "characters": [c.to_json() for c in self.characters.values()],
        }
        text = json.dumps(manifest, indent=2, ensure_ascii=False)
        _atomic(self.folder / MANIFEST, lambda p: Path(p).write_text(text, encoding="utf-8"))

    def block_path(self, key: str) -> Path:
        """Where a trained character's block lives."""
        if self.folder is None:
            raise CatalogError("this catalog has no store folder")
        return self.folder / "blocks" / f"{key}.safetensors"

    def load_blocks(self, bank: LoRABank) -> None:
        """Append every trained character's block to `bank` and record its index."""
        for char in self.trained():
            char.block = bank.load_block(self.block_path(char.key))

    # -- characters --------------------------------------------------------------------

    @property
    def encoder(self) -> RoleEncoder:
        """The role encoder (loaded on first use)."""
        if self._encoder is None:
            self._encoder = RoleEncoder(self.encoder_name)
        return self._encoder

    def trained(self) -> list[Character]:
        """Trained characters, in catalog order (the order their blocks are loaded)."""
        return [c for c in self.characters.values() if c.status == "trained"]

    def add(self, card: CharacterCard, status: Status = "fused") -> Character:
        """Register a character and embed its profile; refuses a name or alias in use."""
        key = slug(card.name)
        for name in (card.name, *card.aliases):
            found = self.find(name)
            if found is not None:
                raise CatalogError(f"{name!r} is already taken by {found.name!r}")
        char = Character(key, card, status)
        self.embeddings[key] = self.encoder.encode([card.persona_text()])[0]
        self.characters[key] = char
        return char

    def fuse(self, card: CharacterCard, config: GateConfig | None = None) -> Character:
        """Register `card` as a fused character: gate weights over trained characters only."""
        char = self.add(card, "fused")
        char.fused_from = self.fusion_weights(self.embeddings[char.key], config)
        return char

    def fusion_weights(
        self, query: Tensor, config: GateConfig | None = None, exclude: tuple[str, ...] = ()
    ) -> dict[str, float]:
        """Gate weights over the top-k trained characters (by key), bar `exclude`.

        softmax(cos / tau) against role embeddings, or with `policy="learned"` the learned
        gate softmax(W_g e) restricted to the top-k.
        """
        cfg = config or GateConfig()
        trained = [c.key for c in self.trained() if c.key not in exclude]
        if not trained:
            return {}
        if cfg.policy == "learned":
            missing = [k for k in trained if k not in self.gate_rows]
            if missing:
                raise CatalogError(f"no learned gate for {missing}; train the store to fit it")
            scores = torch.stack([self.gate_rows[k] for k in trained]) @ query.float()
            return {trained[i]: w for i, w in top_k_softmax(scores, cfg.top_k).items()}
        embs = torch.stack([self.embeddings[k] for k in trained])
        gate = fusion_gate(query, embs, list(range(len(trained))), cfg)
        return {trained[i]: w for i, w in gate.items()}

    def gate_texts(self, key: str, lines: Sequence[str] = ()) -> list[str]:
        """Texts the learned gate maps to `key`: profile, names, and lines in its voice."""
        card = self.characters[key].card
        return [card.persona_text(), card.name, *card.aliases, *lines]

    def fit_gate(self, texts: dict[str, list[str]], only: list[str] | None = None) -> None:
        """Fit the learned gate over every trained character on `texts` (by key).

        With `only`, just those characters' rows move (expansion); the others keep theirs
        and serve as the negatives through their `texts`.
        """
        keys = [c.key for c in self.trained()]
        if set(texts) != set(keys) or (only and not set(only) <= set(keys)):
            raise CatalogError("the learned gate needs texts for exactly the trained characters")
        flat = [(t, i) for i, k in enumerate(keys) for t in texts[k]]
        emb = self.encoder.encode([t for t, _ in flat])
        dim = emb.shape[1]
        weight = torch.stack([self.gate_rows.get(k, torch.zeros(dim)) for k in keys])
        rows = None if only is None else [keys.index(k) for k in only]
        fitted = fit_gate(emb, torch.tensor([i for _, i in flat]), weight, rows)
        self.gate_rows = {k: fitted[i].clone() for i, k in enumerate(keys)}

    def gate(self, key: str) -> Gate:
        """The block gate of a character (its blocks must be loaded into a bank)."""
        char = self.characters[key]
        if char.status == "trained":
            if char.block is None:
                raise CatalogError(f"{char.name}'s block is not loaded")
            return {char.block: 1.0}
        return self.gate_from_weights(char.fused_from)

    def persona_gate(self, text: str, config: GateConfig | None = None) -> Gate:
        """A fused gate for free text such as "a grumpy sea captain"."""
        return self.gate_from_weights(self.fusion_weights(self.encoder.encode([text])[0], config))

    def gate_from_weights(self, weights: dict[str, float]) -> Gate:
        """Block gate from weights over trained characters' keys."""
        out = {}
        for key, w in weights.items():
            block = self.characters[key].block if key in self.characters else None
            if block is None:
                raise CatalogError(f"fused gate names {key!r}, whose block is not loaded")
            out[block] = w
        return out

    # -- lookup ------------------------------------------------------------------------

    def find(self, text: str) -> Character | None:
        """The character whose name or alias is `text` (case- and space-insensitive)."""
        want = _norm(text)
        for char in self.characters.values():
            if want in {_norm(n) for n in (char.name, *char.card.aliases)}:
                return char
        return None

    def resolve(self, text: str, cutoff: float = 0.75) -> Resolution:
        """Exact name or alias -> that character; a near miss -> suggestions; else a persona."""
        if (char := self.find(text)) is not None:
            return Resolution("character", character=char, text=text)
        names = {
            _norm(n): c.name for c in self.characters.values() for n in (c.name, *c.card.aliases)
        }
        close = difflib.get_close_matches(_norm(text), list(names), n=3, cutoff=cutoff)
        if close:
            return Resolution(
                "suggestions", suggestions=list(dict.fromkeys(names[c] for c in close)), text=text
            )
        return Resolution("persona", text=text)


def _norm(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _atomic(path: Path, write: Callable[[str], object]) -> None:
    """Call `write(tmp_path)`, then rename the temporary file onto `path`."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
