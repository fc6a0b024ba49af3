"""End-to-end operations on a character store, for the command line.

Each opens what it needs (model, bank, catalog), does one job and leaves the store
consistent: train the starter cast, expand a store by one character, fuse a card, evaluate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch

from neeko import model as model_lib
from neeko.cards import CharacterCard
from neeko.catalog import Catalog
from neeko.characters import CAST_DIR, SHARED, CatalogError, read_cast
from neeko.dialogues import Dialogue, read_dialogues
from neeko.evaluate import Shared, evaluate
from neeko.gating import GateConfig
from neeko.lora import DEFAULT_RANK, BankConfig, LoRABank
from neeko.model import cache_dir
from neeko.runtime import CAST_STORE, Runtime, empty_runtime, open_runtime
from neeko.train import TrainConfig, TrainReport, character_examples, expand, pretune, train_blocks
from neeko.word_classifier import word_speaker_id


def train_cast(
    store: str | Path = CAST_STORE,
    model: str = "default",
    config: TrainConfig | None = None,
    device: str | None = None,
    checkpoint_dir: str | Path | None = None,
) -> tuple[Catalog, TrainReport]:
    """Pre-tune the starter cast from scratch into `store` (one block per member)."""
    members = [(m.card, read_dialogues(m.train)) for m in read_cast()]
    rt = empty_runtime(_new_catalog(store, config), model, device)
    report = pretune(rt, members, config, checkpoint_dir)
    return rt.catalog, report


def expand_store(
    store: str | Path,
    card: CharacterCard,
    dialogues: list[Dialogue],
    model: str = "default",
    config: TrainConfig | None = None,
    device: str | None = None,
) -> tuple[Runtime, TrainReport]:
    """Give `card` its own block in `store`, trained on `dialogues`; the others stay as they are."""
    rt = open_runtime(store, model, device)
    existing = rt.catalog.find(card.name)
    if existing is not None and existing.status == "trained":
        raise CatalogError(f"{card.name!r} already has a trained block")
    key = existing.key if existing is not None else None
    scope = existing.scope if existing is not None else SHARED
    report = expand(rt, card, dialogues, config, key=key, scope=scope)
    return rt, report


def fuse_card(
    store: str | Path, card: CharacterCard, config: GateConfig | None = None
) -> tuple[Catalog, float]:
    """Register `card` as fused (gate weights only); returns the catalog and seconds taken."""
    catalog = Catalog.open(store)
    catalog.encoder  # noqa: B018 (load the encoder before timing the fusion itself)
    t0 = time.perf_counter()
    catalog.add(card, SHARED, "fused", config=config)
    catalog.save()
    return catalog, time.perf_counter() - t0


def shared_baseline(
    members: list[tuple[CharacterCard, list[Dialogue]]],
    model: str,
    config: TrainConfig,
    device: str | None = None,
    rank: int | None = None,
    progress: bool = True,
) -> Shared:
    """One LoRA trained on every member's data with `config` (the LoRA-Mix baseline).

    Its rank defaults to the total rank of a store pre-tuned with `config`: the shared
    block plus one block per member, so the comparison is at equal parameters (at the
    same alpha / rank as the blocks). Cached by content hash of data, model, config and
    rank; `Shared.path` says where.
    """
    loaded = model_lib.load(model, device=device)
    rank = rank or config.shared_rank + (config.rank or DEFAULT_RANK) * len(members)
    bank = LoRABank(loaded.model, BankConfig.for_rank(rank))
    digest = _digest(members, model, config, rank)
    cached = cache_dir() / "baselines" / f"shared-r{rank}-{digest}.safetensors"
    if cached.exists():
        bank.load_block(cached)
        return Shared(loaded, bank, cached, trained=False)
    (block,) = bank.add_blocks(1, init="lora", generator=torch.Generator().manual_seed(config.seed))
    examples = []
    for card, dialogues in members:
        examples += character_examples(loaded, card, dialogues, block)
    train_blocks(loaded, bank, examples, config, progress=progress)
    bank.save_block(block, cached)
    return Shared(loaded, bank, cached, trained=True)


def group_by_character(
    cards: list[CharacterCard], dialogues: list[Dialogue]
) -> list[tuple[CharacterCard, list[Dialogue]]]:
    """Pair every card with its dialogues; every dialogue needs a card and vice versa."""
    by_name: dict[str, tuple[CharacterCard, list[Dialogue]]] = {c.name: (c, []) for c in cards}
    for d in dialogues:
        if d.character not in by_name:
            raise CatalogError(f"{d.source}: no card for character {d.character!r}")
        by_name[d.character][1].append(d)
    empty = [name for name, (_, ds) in by_name.items() if not ds]
    if empty:
        raise CatalogError(f"no dialogues for {empty}")
    return list(by_name.values())


def train_store(
    store: str | Path,
    cards: list[CharacterCard],
    dialogues: list[Dialogue],
    model: str = "default",
    config: TrainConfig | None = None,
    device: str | None = None,
    checkpoint_dir: str | Path | None = None,
) -> tuple[Catalog, TrainReport]:
    """Pre-tune `cards` on `dialogues` into `store`, after the blocks it already holds."""
    members = group_by_character(cards, dialogues)
    if (Path(store) / "manifest.json").exists():
        rt = open_runtime(store, model, device)
    else:
        rt = empty_runtime(_new_catalog(store, config), model, device)
    return rt.catalog, pretune(rt, members, config, checkpoint_dir)


def _new_catalog(store: str | Path, config: TrainConfig | None) -> Catalog:
    catalog = Catalog(store)
    if config is not None and config.rank is not None:
        catalog.set_rank(config.rank)
    return catalog


def eval_store(
    store: str | Path,
    heldout: list[Dialogue],
    model: str = "default",
    train: list[Dialogue] | None = None,
    roles: list[tuple[str, str]] | None = None,
    config: TrainConfig | None = None,
    device: str | None = None,
    max_tokens: int | None = None,
    speaker_id: bool = True,
) -> dict:
    """The eval table of `store`'s characters (trained or fused) on `heldout`.

    With `train`, the shared-LoRA baseline is trained on the data of the trained characters
    it names, with `config` (the budget the store was trained with; its block rank, when not
    given, is the store's), and cached. `max_tokens` defaults to the model's context.
    """
    rt = open_runtime(store, model, device)
    by_key: dict[str, list[Dialogue]] = {}
    for d in heldout:
        char = rt.catalog.find(d.character)
        if char is None or char.status not in ("trained", "fused"):
            raise CatalogError(
                f"{d.source}: {d.character!r} is not a trained or fused character of {store}"
            )
        by_key.setdefault(char.key, []).append(d)
    shared = None
    if train:
        named = {d.character for d in train}
        cards = [c.card for c in rt.catalog.trained() if c.name in named]
        if not cards:
            raise CatalogError("the baseline's training data names no trained character")
        names = {c.name for c in cards}
        members = group_by_character(cards, [d for d in train if d.character in names])
        cfg = config or TrainConfig()
        if cfg.rank is None:  # the store's own blocks set the baseline's rank per character
            cfg = dataclasses.replace(cfg, rank=rt.catalog.rank)
        shared = shared_baseline(members, model, cfg, device)
    limit = max_tokens or model_lib.context_tokens(model)
    result = evaluate(rt, by_key, shared, roles, limit, speaker_id)
    result["model"] = model
    if shared is not None:
        result["baseline"] = _baseline_info(shared)
        _add_word_speaker_id(result, rt.catalog, train, heldout)
    return result


def eval_cast(
    model: str = "default",
    config: TrainConfig | None = None,
    device: str | None = None,
    max_tokens: int | None = None,
) -> dict:
    """The eval table of the starter cast on its held-out split, with the shared baseline."""
    cast = read_cast()
    rt = open_runtime(CAST_STORE, model, device)
    heldout = {rt.catalog.find(m.card.name).key: read_dialogues(m.heldout) for m in cast}
    members = [(m.card, read_dialogues(m.train)) for m in cast]
    shared = shared_baseline(members, model, config or TrainConfig(), device)
    roles = read_roles(CAST_DIR / "roles.jsonl")
    limit = max_tokens or model_lib.context_tokens(model)
    result = evaluate(rt, heldout, shared, roles, limit)
    result["model"] = model
    result["baseline"] = _baseline_info(shared)
    train = [d for _, dialogues in members for d in dialogues]
    _add_word_speaker_id(result, rt.catalog, train, [d for ds in heldout.values() for d in ds])
    return result


def _add_word_speaker_id(
    result: dict, catalog: Catalog, train: list[Dialogue], heldout: list[Dialogue]
) -> None:
    """Put the words-only classifier's accuracy on the same voices under speaker_id.words.

    Skipped when there is no speaker identification or the training data lacks a voice.
    """
    sid = result.get("speaker_id")
    if sid is None:
        return
    voices = set(sid["by_character"])

    def of_voices(dialogues: list[Dialogue]) -> list[Dialogue]:
        named = ((d, catalog.find(d.character)) for d in dialogues)
        return [
            dataclasses.replace(d, character=c.name)
            for d, c in named
            if c is not None and c.name in voices
        ]

    train_v = of_voices(train)
    if {d.character for d in train_v} == voices:
        sid["words"] = word_speaker_id(train_v, of_voices(heldout))


def _baseline_info(shared: Shared) -> dict:
    return {
        "rank": shared.bank.config.rank,
        "path": str(shared.path),
        "trained_now": shared.trained,
    }


def read_roles(path: Path) -> list[tuple[str, str]]:
    """(description, character name) pairs for role-selection accuracy."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["description"], r["character"]) for r in rows]


def _digest(
    members: list[tuple[CharacterCard, list[Dialogue]]], model: str, config: TrainConfig, rank: int
) -> str:
    budget = (config.lr, config.epochs, config.max_steps, config.batch_size, config.seed)
    h = hashlib.sha256(f"{model}|{budget}|{config.weight_decay}|{config.grad_clip}|{rank}".encode())
    for card, dialogues in members:
        h.update(card.name.encode())
        for d in dialogues:
            h.update(repr(d.messages).encode())
    return h.hexdigest()[:16]
