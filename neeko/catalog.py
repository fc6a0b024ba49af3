"""The character catalog: the one owner of character state, optionally kept in a store folder.

Every change to a character (add, fuse, mark training / trained / failed, remove, apply an
event from another process) is a method of `Catalog`; nothing else builds or edits a
`Character`. Writes check everything first and change nothing when they refuse.

A store folder holds `manifest.json` (every character: card, scope, status and, for a fused
one, its gate mix; keys once used), `roles.safetensors` (role embeddings),
`gate.safetensors` (the learned gate's rows, when fitted), `blocks/KEY.safetensors` and,
when the store was pre-tuned with one, `shared.safetensors`: the shared block every
character's gate adds to its own (see `neeko.train.pretune`).
Files are written to a temporary name and renamed into place, the manifest last.
"""

from __future__ import annotations

import difflib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file
from torch import Tensor

from neeko.cards import CharacterCard
from neeko.characters import (
    KEY_PATTERN,
    SHARED,
    STATUSES,
    CatalogError,
    Character,
    Mix,
    Status,
    check_key,
    check_scope,
    fold,
    scope_key,
)
from neeko.errors import CardError
from neeko.gating import GateConfig, RoleEncoder, fit_gate, fusion_gate, top_k_softmax
from neeko.lora import DEFAULT_RANK, MAX_RANK
from neeko.protocol import CatalogEvent

MANIFEST = "manifest.json"
ROLES = "roles.safetensors"
GATE = "gate.safetensors"
SHARED_BLOCK = "shared.safetensors"
STORE_VERSION = 2
"""Version 2 added scopes and retired keys, and names a fused gate `mix` (1 is read too)."""


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(pattern=KEY_PATTERN)
    status: Status
    card: dict[str, Any]
    scope: str = SHARED
    mix: dict[str, float] = Field(
        default_factory=dict, validation_alias=AliasChoices("mix", "fused_from")
    )
    submitted_by: str = Field("", max_length=128)


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1, 2]
    encoder: str = "default"
    model: str = ""
    characters: list[_Entry]
    retired: list[str] = Field(default_factory=list)
    shared_rank: int = Field(0, ge=0, le=4096)
    rank: int = Field(DEFAULT_RANK, ge=1, le=MAX_RANK)


@dataclass(frozen=True)
class Resolution:
    """What a user's text names: a character, near misses, or a free-text persona."""

    kind: Literal["character", "suggestions", "persona"]
    character: Character | None = None
    suggestions: tuple[str, ...] = ()
    text: str = ""


@dataclass(frozen=True)
class Pending:
    """A checked character not yet in the catalog (`Catalog.prepare` -> `Catalog.commit`)."""

    character: Character
    embedding: Tensor | None


class Catalog:
    """Characters, their role embeddings and the learned gate; the only writer of them.

    Thread-safe: writes may come from a trainer thread while the event loop reads.
    """

    def __init__(self, folder: str | Path | None = None, encoder: str = "default") -> None:
        """An empty catalog; `open` reads an existing store."""
        self.folder = Path(folder) if folder else None
        self.encoder_name = encoder
        self.model = ""
        """Base model the blocks were trained on (a block only fits that model)."""
        self._shared_rank = 0
        self._rank = DEFAULT_RANK
        self._chars: dict[str, Character] = {}
        self._retired: set[str] = set()
        self._embeddings: dict[str, Tensor] = {}
        self._gate_rows: dict[str, Tensor] = {}
        self._encoder: RoleEncoder | None = None
        self._lock = threading.RLock()

    # -- persistence -------------------------------------------------------------------

    @classmethod
    def open(cls, folder: str | Path) -> Catalog:
        """Read the store in `folder`; a malformed manifest raises CatalogError naming the field."""
        folder = Path(folder)
        path = folder / MANIFEST
        try:
            raw = json.loads(_read_regular(path).decode("utf-8"))
        except FileNotFoundError:
            raise CatalogError(f"{folder}: no {MANIFEST}; not a character store") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise CatalogError(f"{path}: unreadable ({exc})") from None
        if isinstance(raw, dict) and raw.get("version") not in (1, 2):
            raise CatalogError(f"{folder}: store version {raw.get('version')!r} unsupported")
        try:
            manifest = _Manifest.model_validate(raw)
        except ValidationError as exc:
            raise CatalogError(f"{path}: {_first_error(exc)}") from None
        catalog = cls(folder, manifest.encoder)
        catalog.model = manifest.model
        catalog._shared_rank = manifest.shared_rank
        catalog._rank = manifest.rank
        if manifest.shared_rank % manifest.rank:
            raise CatalogError(
                f"{path}: shared_rank {manifest.shared_rank} is not a multiple of the block "
                f"rank {manifest.rank}"
            )
        catalog._retired = {check_key(k) for k in manifest.retired}
        for i, entry in enumerate(manifest.characters):
            catalog._restore_entry(entry, f"{path}: characters[{i}]")
        for i, entry in enumerate(manifest.characters):
            catalog._check_mix(entry.mix, f"{path}: characters[{i}].mix")
        if (folder / ROLES).exists():
            catalog._embeddings = _tensors(folder / ROLES, set(catalog._chars))
        if (folder / GATE).exists():
            catalog._gate_rows = _tensors(folder / GATE, set(catalog._chars))
        return catalog

    def _restore_entry(self, entry: _Entry, where: str) -> None:
        try:
            card = CharacterCard.from_dict(entry.card)
            check_scope(entry.scope)
        except (CardError, CatalogError) as exc:
            raise CatalogError(f"{where}: {exc}") from None
        if entry.key in self._chars:
            raise CatalogError(f"{where}.key: {entry.key!r} appears twice")
        char = Character(
            entry.key, card, entry.scope, entry.status, dict(entry.mix), entry.submitted_by
        )
        try:
            self._check_new(char)
        except CatalogError as exc:
            raise CatalogError(f"{where}: {exc}") from None
        self._chars[entry.key] = char

    def _check_mix(self, mix: Mix, where: str) -> None:
        for key, weight in mix.items():
            char = self._chars.get(key)
            if char is None or char.status != "trained" or not 0 <= weight <= 1:
                raise CatalogError(f"{where}: {key!r} is not a trained character (or bad weight)")

    def save(self) -> None:
        """Write the store atomically (blocks are written by the bank's `save_block`)."""
        if self.folder is None:
            raise CatalogError("this catalog has no store folder")
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            for name, tensors in ((ROLES, self._embeddings), (GATE, self._gate_rows)):
                if tensors:
                    data = {k: v.contiguous() for k, v in tensors.items()}
                    _atomic(self.folder / name, lambda p, d=data: save_file(d, p))
            manifest = {
                "version": STORE_VERSION,
                "encoder": self.encoder_name,
                "model": self.model,
                "characters": [_entry(c) for c in self._chars.values()],
                "retired": sorted(self._retired),
                **({"shared_rank": self._shared_rank} if self._shared_rank else {}),
                **({"rank": self._rank} if self._rank != DEFAULT_RANK else {}),
            }
        text = json.dumps(manifest, indent=2, ensure_ascii=False)
        _atomic(self.folder / MANIFEST, lambda p: Path(p).write_text(text, encoding="utf-8"))

    @property
    def shared_rank(self) -> int:
        """Rank of the store's shared block (0: none; every gate is the character's own)."""
        return self._shared_rank

    @property
    def rank(self) -> int:
        """Rank of every block of the store (the shared block is a multiple of it)."""
        return self._rank

    def set_rank(self, rank: int) -> None:
        """Set the blocks' rank; only while the store has no block of another rank."""
        with self._lock:
            if rank == self._rank:
                return
            if not 1 <= rank <= MAX_RANK:
                raise CatalogError(f"block rank must be 1..{MAX_RANK}, got {rank}")
            if self.trained() or self._shared_rank:
                raise CatalogError(f"the store's blocks have rank {self._rank}, not {rank}")
            self._rank = rank

    def shared_path(self) -> Path:
        """Where the shared block lives: inside the store, never through a link."""
        if self.folder is None:
            raise CatalogError("this catalog has no store folder")
        path = self.folder / SHARED_BLOCK
        if path.is_symlink():
            raise CatalogError(f"{path} is a symbolic link; blocks must lie in the store")
        return path

    def set_shared(self, rank: int) -> None:
        """Record a shared block of `rank`; only while no character is trained yet."""
        with self._lock:
            if self._shared_rank and rank != self._shared_rank:
                raise CatalogError(
                    f"the store already has a shared block of rank {self._shared_rank}"
                )
            if not self._shared_rank and self.trained():
                raise CatalogError(
                    "the store has trained characters without a shared block; adding one "
                    "would change how they sound"
                )
            self._shared_rank = rank

    def block_path(self, key: str) -> Path:
        """Where a character's block lives: inside the store, never through a link."""
        if self.folder is None:
            raise CatalogError("this catalog has no store folder")
        blocks = self.folder / "blocks"
        path = blocks / f"{check_key(key)}.safetensors"
        for p in (blocks, path):
            if p.is_symlink():
                raise CatalogError(f"{p} is a symbolic link; blocks must lie in the store")
        return path

    # -- reading -----------------------------------------------------------------------

    @property
    def characters(self) -> Mapping[str, Character]:
        """Every character by key (a read-only view)."""
        return MappingProxyType(self._chars)

    def get(self, key: str) -> Character | None:
        """The character with `key`, if any."""
        return self._chars.get(key)

    def require(self, key: str) -> Character:
        """The character with `key`; CatalogError if there is none."""
        char = self._chars.get(key)
        if char is None:
            raise CatalogError(f"no character has the key {key!r}")
        return char

    def visible(self, scope: str | None = None) -> list[Character]:
        """The characters `scope` sees: its own and the shared cast (None: every one)."""
        with self._lock:  # a trainer thread may be adding one
            return [c for c in self._chars.values() if c.visible_in(scope)]

    def trained(self, scope: str | None = None) -> list[Character]:
        """Trained characters `scope` sees, in catalog order (the order blocks load in)."""
        return [c for c in self.visible(scope) if c.status == "trained"]

    def retired(self, key: str) -> bool:
        """Whether `key` was used by a character since removed (keys are never reused)."""
        return key in self._retired

    @property
    def encoder(self) -> RoleEncoder:
        """The role encoder (loaded on first use)."""
        with self._lock:
            if self._encoder is None:
                self._encoder = RoleEncoder(self.encoder_name)
            return self._encoder

    def embedding(self, key: str) -> Tensor:
        """A character's role embedding (computed from its profile on first use)."""
        found = self._embeddings.get(key)
        if found is None:
            found = self.encoder.encode([self.require(key).card.persona_text()])[0]
            with self._lock:
                found = self._embeddings.setdefault(key, found)
        return found

    @property
    def gate_rows(self) -> Mapping[str, Tensor]:
        """The learned gate: W_g's row per trained character (empty until fitted)."""
        return MappingProxyType(self._gate_rows)

    def find(self, text: str, scope: str | None = None) -> Character | None:
        """The character `scope` sees whose name or alias folds to the same as `text`."""
        want = fold(text)
        return next((c for c in self.visible(scope) if want and want in c.names()), None)

    def resolve(self, text: str, scope: str | None = None, cutoff: float = 0.75) -> Resolution:
        """Exact name or alias -> that character; a near miss -> suggestions; else a persona."""
        if (char := self.find(text, scope)) is not None:
            return Resolution("character", character=char, text=text)
        names = {n: c.name for c in self.visible(scope) for n in c.names()}
        close = difflib.get_close_matches(fold(text), list(names), n=3, cutoff=cutoff)
        if close:
            found = tuple(dict.fromkeys(names[c] for c in close))
            return Resolution("suggestions", suggestions=found, text=text)
        return Resolution("persona", text=text)

    def fusion_weights(
        self,
        query: Tensor,
        config: GateConfig | None = None,
        exclude: tuple[str, ...] = (),
        scope: str | None = None,
    ) -> dict[str, float]:
        """A gate mix over the top-k trained characters `scope` sees, bar `exclude`.

        softmax(cos / tau) against role embeddings, or with `policy="learned"` the learned
        gate softmax(W_g e) restricted to the top-k.
        """
        cfg = config or GateConfig()
        trained = [c.key for c in self.trained(scope) if c.key not in exclude]
        if not trained:
            return {}
        if cfg.policy == "learned":
            missing = [k for k in trained if k not in self._gate_rows]
            if missing:
                raise CatalogError(f"no learned gate for {missing}; train the store to fit it")
            scores = torch.stack([self._gate_rows[k] for k in trained]) @ query.float()
            return {trained[i]: w for i, w in top_k_softmax(scores, cfg.top_k).items()}
        embs = torch.stack([self.embedding(k) for k in trained])
        gate = fusion_gate(query, embs, list(range(len(trained))), cfg)
        return {trained[i]: w for i, w in gate.items()}

    def gate_texts(self, key: str, lines: Sequence[str] = ()) -> list[str]:
        """Texts the learned gate maps to `key`: profile, names, and lines in its voice."""
        card = self.require(key).card
        return [card.persona_text(), card.name, *card.aliases, *lines]

    # -- writing (the only writers of character state) ----------------------------------

    def prepare(
        self,
        card: CharacterCard,
        scope: str = SHARED,
        status: Status = "fused",
        *,
        key: str | None = None,
        mix: Mix | None = None,
        submitted_by: str = "",
        config: GateConfig | None = None,
    ) -> Pending:
        """Check a new character and compute its key, embedding and (fused) mix; no change.

        Raises:
            CatalogError: The scope is unknown, a name or alias is taken in what the scope
                sees (or, for the shared cast, anywhere), or `key` is malformed, taken,
                retired or of another scope.
        """
        check_scope(scope)
        if status not in STATUSES:
            raise CatalogError(f"unknown status {status!r}")
        with self._lock:
            key = self._check_key_for(key, scope, card.name)
            char = Character(key, card, scope, status, {}, submitted_by)
            self._check_new(char)
        embedding = None
        if status == "fused" and mix is None:
            embedding = self.encoder.encode([card.persona_text()])[0]
            mix = self.fusion_weights(embedding, config, scope=scope)
        return Pending(replace(char, mix=dict(mix or {})), embedding)

    def recheck(self, pending: Pending) -> None:
        """Raise CatalogError if `commit(pending)` would now refuse (a name or key taken since)."""
        char = pending.character
        with self._lock:
            if self._chars.get(char.key) == char:
                return
            if char.key in self._chars or char.key in self._retired:
                raise CatalogError(f"the key {char.key!r} is taken")
            self._check_new(char)

    def commit(self, pending: Pending) -> Character:
        """Add a prepared character (checked again: another may have taken its name)."""
        char = pending.character
        with self._lock:
            self.recheck(pending)
            self._chars[char.key] = char
            if pending.embedding is not None:
                self._embeddings[char.key] = pending.embedding
        return char

    def add(
        self,
        card: CharacterCard,
        scope: str = SHARED,
        status: Status = "fused",
        *,
        key: str | None = None,
        mix: Mix | None = None,
        submitted_by: str = "",
        config: GateConfig | None = None,
    ) -> Character:
        """Register a character (a fused one gets its mix by fusion); see `prepare`."""
        pending = self.prepare(
            card, scope, status, key=key, mix=mix, submitted_by=submitted_by, config=config
        )
        return self.commit(pending)

    def mark_training(self, key: str) -> Character:
        """A fused character's training job was queued."""
        return self._set_status(key, "training", {"fused", "training"})

    def mark_failed(self, key: str) -> Character:
        """Training ended without a block: the character is fused again (its mix kept)."""
        return self._set_status(key, "fused", {"fused", "training"})

    def mark_trained(self, key: str) -> Character:
        """The character's own block exists now: its gate is one-hot on it."""
        return self._set_status(key, "trained", set(STATUSES))

    def remove(self, key: str) -> Character:
        """Remove a character; its key is retired, never to be used again."""
        with self._lock:
            char = self.require(key)
            users = [c.name for c in self._chars.values() if key in c.mix]
            if users:
                raise CatalogError(
                    f"{char.name} is fused into {', '.join(users)}; remove them first"
                )
            del self._chars[key]
            self._retired.add(key)
            self._embeddings.pop(key, None)
            self._gate_rows.pop(key, None)
        return char

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
        weight = torch.stack([self._gate_rows.get(k, torch.zeros(dim)) for k in keys])
        rows = None if only is None else [keys.index(k) for k in only]
        fitted = fit_gate(emb, torch.tensor([i for _, i in flat]), weight, rows)
        with self._lock:
            self._gate_rows = {k: fitted[i].clone() for i, k in enumerate(keys)}

    def apply(self, event: CatalogEvent) -> bool:
        """Apply a change made by another process; True if anything changed.

        Raises:
            CatalogError: The event contradicts the catalog (its card is invalid, its name
                is taken by another character); nothing changed.
        """
        char = self._chars.get(event.key)
        if event.kind == "removed":
            return char is not None and bool(self.remove(event.key))
        if char is None:
            if event.kind not in ("added", "trained") or event.card is None:
                return False
            try:
                card = CharacterCard.from_dict(event.card)
            except CardError as exc:
                raise CatalogError(f"event for {event.key!r}: {exc}") from None
            status: Status = "trained" if event.kind == "trained" else "fused"
            self.add(card, event.scope, status, key=event.key, mix=event.mix)
            return True
        target = {"added": char.status, "training": "training", "trained": "trained"}
        status = target.get(event.kind, "fused")
        if status == char.status or (char.status == "trained" and event.kind != "trained"):
            return False
        self._set_status(event.key, status, set(STATUSES))
        return True

    # -- checks ------------------------------------------------------------------------

    def _set_status(self, key: str, status: Status, allowed: set[str]) -> Character:
        with self._lock:
            char = self.require(key)
            if char.status not in allowed:
                raise CatalogError(f"{char.name} is {char.status}")
            mix = {} if status == "trained" else char.mix
            self._chars[key] = new = replace(char, status=status, mix=mix)
        return new

    def _check_key_for(self, key: str | None, scope: str, name: str) -> str:
        """`key` checked for `scope`, or the first unused key of `name` in `scope`."""
        if key is None:
            n = 1
            while (key := scope_key(scope, name, n)) in self._chars or key in self._retired:
                n += 1
            return key
        check_key(key)
        tag, dot, _ = key.partition(".")
        own_tag = scope_key(scope, "x").partition(".")[0] if scope != SHARED else ""
        if (tag if dot else "") != own_tag:
            raise CatalogError(f"the key {key!r} does not belong to scope {scope!r}")
        if key in self._retired:
            raise CatalogError(f"the key {key!r} belonged to a removed character")
        if key in self._chars:
            raise CatalogError(f"the key {key!r} is taken by {self._chars[key].name!r}")
        return key

    def _check_new(self, char: Character) -> None:
        """Refuse a name or alias equal (folded) to one that `char`'s scope sees."""
        names = set(char.names())
        if "" in names:
            raise CatalogError(f"{char.name!r} has no letter or digit; a name needs one")
        for other in self._chars.values():
            if other.key == char.key:
                continue
            sees = char.scope == SHARED or other.scope in (SHARED, char.scope)
            if sees and names & set(other.names()):
                raise CatalogError(f"{char.name!r} is already taken by {other.name!r}")


def _entry(c: Character) -> dict[str, Any]:
    return {
        "key": c.key,
        "scope": c.scope,
        "status": c.status,
        "mix": dict(c.mix),
        "submitted_by": c.submitted_by,
        "card": c.card.to_dict(),
    }


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
    return f"{where or 'manifest'}: {err['msg']}"


def _read_regular(path: Path) -> bytes:
    """The bytes of `path`, which must be a regular file and not a symbolic link."""
    if path.is_symlink():
        raise CatalogError(f"{path} is a symbolic link; store files must lie in the store")
    return path.read_bytes()


def _tensors(path: Path, keys: set[str]) -> dict[str, Tensor]:
    """Per-character vectors of a store file: float, finite, one per known key."""
    _read_regular(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CatalogError(f"{path}: unreadable ({exc})") from None
    for key, t in tensors.items():
        if t.ndim != 1 or not t.is_floating_point() or not torch.isfinite(t).all():
            raise CatalogError(f"{path}: {key!r} is not a finite vector")
    return {k: v.float() for k, v in tensors.items() if k in keys}


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
