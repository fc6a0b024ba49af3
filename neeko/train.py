"""Training blocks: pre-tuning, expansion, and the shared-LoRA baseline.

Every example trains only its own character's block, so own blocks never overlap: the
other characters' blocks are not parameters of the optimiser and receive no gradient.
Pre-tuning may also train a shared block that every character's gate adds to its own
(what all characters share is learned once, from everyone's data; each own block learns
the rest). Expansion appends a block and trains it alone, the shared block and every old
block frozen, so every old character's output is unchanged.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from neeko.cards import CharacterCard
from neeko.catalog import Catalog
from neeko.characters import SHARED, fold, system_prompt
from neeko.dialogues import IGNORE, Dialogue, Example, batches, encode
from neeko.errors import NeekoError
from neeko.lora import MAX_RANK, LoRABank
from neeko.model import LoadedModel

if TYPE_CHECKING:
    from neeko.runtime import Runtime


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyper-parameters of block training."""

    lr: float = 2e-3
    """AdamW learning rate."""
    epochs: int = 2
    """Passes over the examples. On the starter cast (~35 exchanges per character) 2 epochs
    keep held-out NLL well below the base model; 4 epochs memorise the train split."""
    max_steps: int | None = None
    """Stop after this many optimiser steps (None: run all epochs)."""
    batch_size: int = 4
    """Dialogues per step (rows of different characters may share a batch)."""
    weight_decay: float = 0.0
    """AdamW weight decay on the trained blocks."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    seed: int = 0
    """Seeds data order and nothing else (blocks start from the bank's init)."""
    checkpoint_every: int = 25
    """Steps between checkpoints when a checkpoint folder is given."""
    rank: int | None = None
    """Rank of every block of a new store (None: `DEFAULT_RANK`, 4); a store keeps the rank
    it was first trained with."""
    shared_rank: int = 0
    """Rank of a shared block pre-tuning trains next to the own blocks (0: none). A multiple
    of the blocks' rank, fixed for the store once trained. Off by default: on the starter
    cast own blocks alone score best and tell the voices apart best; a staged shared 16 +
    own 4 has the lowest held-out NLL on the Shakespeare corpus, where every recipe tells
    the voices apart about equally (README, "Measured on a real corpus")."""
    schedule: Schedule = "joint"
    """`joint`: shared and own blocks train together; `staged`: the shared block first
    (all data, its own epochs), then the own blocks on top of it, frozen; `own-first`: the
    own blocks alone first, then the shared block on top of them, frozen."""
    shared_prompt: SharedPrompt = "card"
    """What system prompt the shared block's own stage (staged, own-first) trains under:
    `card`, each character's; `anonymous`, one prompt that names no one
    (`ANONYMOUS_PROMPT`), so the shared block cannot tie a voice to a card. On the
    Shakespeare corpus (staged) it matches `card` (3.963 nats) and tells the voices apart
    barely better (0.225 vs 0.20; README, "Measured on a real corpus")."""
    stage_data: StageData = "all"
    """What the two stages of a staged or own-first schedule train on: `all`, every
    dialogue in both; `split`, each character's dialogues dealt alternately between them
    (the first stage the 1st, 3rd, ...; the second the 2nd, 4th, ...), so the second stage
    learns on lines its predecessor has not fitted. On the Shakespeare corpus (staged,
    anonymous, one epoch) it scores 3.973 nats over three seeds in half the steps of `all`
    (3.963, one seed), and tells the voices apart better (0.31 pooled vs 0.225; README,
    "Measured on a real corpus")."""

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("lr must be > 0, epochs and batch_size >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.shared_rank < 0:
            raise ValueError(f"shared_rank must be >= 0, got {self.shared_rank}")
        if self.rank is not None and not 1 <= self.rank <= MAX_RANK:
            raise ValueError(f"rank must be 1..{MAX_RANK}, got {self.rank}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.shared_prompt not in SHARED_PROMPTS:
            raise ValueError(
                f"shared_prompt must be one of {SHARED_PROMPTS}, got {self.shared_prompt!r}"
            )
        if self.shared_prompt != "card" and self.schedule == "joint":
            raise ValueError("an anonymous shared prompt needs a staged or own-first schedule")
        if self.stage_data not in STAGE_DATA:
            raise ValueError(f"stage_data must be one of {STAGE_DATA}, got {self.stage_data!r}")
        if self.stage_data != "all" and self.schedule == "joint":
            raise ValueError("split stage data needs a staged or own-first schedule")


@dataclass
class TrainReport:
    """What a training run did."""

    steps: int
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0

    @property
    def final_loss(self) -> float:
        """Mean loss of the last few steps."""
        tail = self.losses[-5:]
        return sum(tail) / len(tail) if tail else math.nan


Schedule = Literal["joint", "staged", "own-first"]
SCHEDULES = ("joint", "staged", "own-first")
SharedPrompt = Literal["card", "anonymous"]
SHARED_PROMPTS = ("card", "anonymous")
StageData = Literal["all", "split"]
STAGE_DATA = ("all", "split")
ANONYMOUS_PROMPT = "You are a character in a story. Stay in character and reply in your own voice."
"""The system prompt the shared block trains under with `shared_prompt="anonymous"`."""
SHARED_GROUP = -1
"""The parameter group (and loss group) of the shared block."""

StepCallback = Callable[[int, int, float], None]
"""Called with (steps done, total steps, loss) after every optimiser step."""


class TrainingError(NeekoError):
    """Training cannot start: no examples, an unknown block, a checkpoint that does not fit."""


def train_blocks(
    loaded: LoadedModel,
    bank: LoRABank,
    examples: list[Example],
    config: TrainConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    on_step: StepCallback | None = None,
    *,
    shared: Sequence[int] = (),
    train_own: bool = True,
    train_shared: bool = False,
    own_in_gate: bool | None = None,
) -> TrainReport:
    """Train the blocks named by `examples` (each example's `block`), each row on its own.

    Every row's gate is the `shared` blocks at weight 1 plus, with `own_in_gate` (default:
    `train_own`), its own block. What trains: the examples' own blocks (`train_own`) and
    the shared blocks (`train_shared`); everything else is frozen. On return the trained
    blocks are written back into the bank. With `checkpoint_dir`, progress is saved every
    `checkpoint_every` steps and a later call with the same arguments resumes from the last
    checkpoint.
    `on_step(step, total, loss)` is called after every step.
    """
    cfg = config or TrainConfig()
    if not train_own and not (train_shared and shared):
        raise TrainingError("nothing to train: no own blocks and no shared block")
    use_own = train_own if own_in_gate is None else own_in_gate
    if train_own and not use_own:
        raise TrainingError("own blocks cannot train outside their rows' gates")
    order = _schedule(examples, cfg)
    total = min(len(order), cfg.max_steps or len(order))
    groups: dict[int, list[nn.Parameter]] = {}
    owned = sorted({_block_of(e, bank) for e in examples}) if use_own else []
    if train_own:
        groups = {k: bank.train_blocks([k]) for k in owned}
    if train_shared and shared:
        groups[SHARED_GROUP] = bank.train_blocks(list(shared))
    params = [p for group in groups.values() for p in group]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    start = _resume(ckpt, params, optimizer) if ckpt else 0
    report = TrainReport(steps=start, resumed_from=start)
    bar = tqdm(total=total, initial=start, desc="training", unit="step", disable=not progress)
    try:
        for step in range(start, total):
            loss = train_step(
                loaded, bank, order[step], groups, optimizer, cfg.grad_clip, shared, use_own
            )
            report.losses.append(loss)
            report.steps = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if on_step is not None:
                on_step(report.steps, total, loss)
            if ckpt and (report.steps % cfg.checkpoint_every == 0 or report.steps == total):
                _save_checkpoint(ckpt, params, optimizer, report.steps)
    finally:
        bar.close()
        bank.freeze()
    return report


def train_step(
    loaded: LoadedModel,
    bank: LoRABank,
    batch: list[Example],
    groups: dict[int, list[nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    grad_clip: float,
    shared: Sequence[int] = (),
    use_own: bool = True,
) -> float:
    """One optimiser step on `batch`, whose rows may belong to different blocks.

    The loss is normalised per block (the sum over blocks of the mean over that block's
    tokens) and gradients are clipped per group (each own block, the shared block), so
    with the shared block frozen a mixed batch updates every own block exactly as its rows
    alone would. Without own blocks in the gates the batch is one group. Returns the mean
    over the loss groups of their losses.
    """
    optimizer.zero_grad(set_to_none=True)
    base = dict.fromkeys(shared, 1.0)
    gates = [{**base, e.block: 1.0} if use_own else base for e in batch]
    losses = block_losses(loaded, bank, batch, gates, by_block=use_own)
    sum(losses.values()).backward()
    for group in groups.values():
        nn.utils.clip_grad_norm_(group, grad_clip)
    optimizer.step()
    return float(sum(v.detach() for v in losses.values())) / len(losses)


def batch_loss(
    loaded: LoadedModel, bank: LoRABank | None, batch: list[Example], gates: list[dict]
) -> Tensor:
    """Mean next-token loss over the labelled tokens of `batch`, each row under its gate."""
    logits, labels = _forward(loaded, bank, batch, gates)
    return nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE
    )


def block_losses(
    loaded: LoadedModel,
    bank: LoRABank,
    batch: list[Example],
    gates: list[dict],
    by_block: bool = True,
) -> dict[int, Tensor]:
    """One mean next-token loss per block, over the labelled tokens of that block's rows.

    Without `by_block`, one mean over the whole batch.
    """
    logits, labels = _forward(loaded, bank, batch, gates)
    token_loss = nn.functional.cross_entropy(
        logits.transpose(1, 2).float(), labels, ignore_index=IGNORE, reduction="none"
    )  # (batch, seq - 1), zero where ignored
    counted = (labels != IGNORE).float()
    if not by_block:
        return {SHARED_GROUP: token_loss.sum() / counted.sum().clamp(min=1)}
    out: dict[int, Tensor] = {}
    for k in dict.fromkeys(e.block for e in batch):
        rows = torch.tensor([e.block == k for e in batch], device=token_loss.device)
        out[k] = token_loss[rows].sum() / counted[rows].sum().clamp(min=1)
    return out


def _forward(
    loaded: LoadedModel, bank: LoRABank | None, batch: list[Example], gates: list[dict]
) -> tuple[Tensor, Tensor]:
    """Logits at every position but the last, and the labels they predict."""
    ids, labels, mask = _collate(batch, loaded)
    if bank is None:
        logits = loaded.model(input_ids=ids, attention_mask=mask).logits
    else:
        with bank.route(gates):
            logits = loaded.model(input_ids=ids, attention_mask=mask).logits
    return logits[:, :-1], labels[:, 1:]


def token_nll(
    loaded: LoadedModel, bank: LoRABank | None, example: Example, gate: dict
) -> tuple[float, int]:
    """Summed negative log-likelihood of the labelled tokens of one example, and their count."""
    with torch.inference_mode():
        loss = batch_loss(loaded, bank, [example], [gate])
    n = sum(1 for t in example.labels[1:] if t != IGNORE)
    return float(loss) * n, n


def _collate(batch: list[Example], loaded: LoadedModel) -> tuple[Tensor, Tensor, Tensor]:
    width = max(len(e.ids) for e in batch)
    pad = loaded.tokenizer.pad_token_id or 0
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.ids)] = 1
    dev = loaded.device
    return ids.to(dev), labels.to(dev), mask.to(dev)


def _block_of(example: Example, bank: LoRABank) -> int:
    if example.block is None or not 0 <= example.block < bank.n_blocks:
        raise TrainingError(
            f"example of {example.character!r} has no valid block ({example.block})"
        )
    return example.block


def _schedule(examples: list[Example], cfg: TrainConfig) -> list[list[Example]]:
    """Every epoch's batches, in a seeded order; the same for the same seed (for resume)."""
    if not examples:
        raise TrainingError("no training examples")
    rng = random.Random(cfg.seed)
    order: list[list[Example]] = []
    for _ in range(cfg.epochs):
        shuffled = examples[:]
        rng.shuffle(shuffled)
        order += list(batches(shuffled, cfg.batch_size))
    return order


def _save_checkpoint(
    folder: Path, params: list[nn.Parameter], opt: torch.optim.Optimizer, step: int
) -> None:
    """Block weights and AdamW moments as safetensors, then the step, written atomically."""
    tensors = {}
    for i, p in enumerate(params):
        tensors[f"param.{i}"] = p.detach().cpu().contiguous()
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in state:
                tensors[f"{key}.{i}"] = torch.as_tensor(state[key]).detach().cpu().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    save_file(tensors, tmp)
    os.replace(tmp, folder / "state.safetensors")
    meta = {"step": step, "params": len(params)}
    (folder / "progress.json.tmp").write_text(json.dumps(meta))
    os.replace(folder / "progress.json.tmp", folder / "progress.json")


def _resume(folder: Path, params: list[nn.Parameter], opt: torch.optim.Optimizer) -> int:
    """Load the last checkpoint in `folder` if there is one; returns the step to start at."""
    if not (folder / "progress.json").exists():
        return 0
    meta = json.loads((folder / "progress.json").read_text())
    tensors = load_file(str(folder / "state.safetensors"))
    if meta.get("params") != len(params):
        raise TrainingError(f"{folder}: checkpoint is for another set of blocks; remove it")
    with torch.no_grad():
        for i, p in enumerate(params):
            if tensors[f"param.{i}"].shape != p.shape:
                raise TrainingError(f"{folder}: checkpoint shapes do not fit; remove it")
            p.copy_(tensors[f"param.{i}"])
            if f"exp_avg.{i}" in tensors:
                opt.state[p] = {
                    "exp_avg": tensors[f"exp_avg.{i}"].to(p),
                    "exp_avg_sq": tensors[f"exp_avg_sq.{i}"].to(p),
                    "step": tensors[f"step.{i}"],  # AdamW keeps its step count on the CPU
                }
    return int(meta["step"])


def character_examples(
    loaded: LoadedModel,
    card: CharacterCard,
    dialogues: list[Dialogue],
    block: int,
    max_tokens: int = 1024,
    system: str | None = None,
) -> list[Example]:
    """Tokenised dialogues of one character, rendered with its system prompt, for `block`.

    `system` replaces the card's system prompt. Each is cut at `max_tokens`
    (`Example.dropped` counts what the cut left out).
    """
    system = system_prompt(card) if system is None else system
    out = []
    for d in dialogues:
        if d.character != card.name:
            raise TrainingError(f"{d.source}: dialogue of {d.character!r}, expected {card.name!r}")
        ex = encode(loaded.tokenizer, system, d, max_tokens)
        ex.block = block
        out.append(ex)
    return out


def pretune(
    rt: Runtime,
    members: list[tuple[CharacterCard, list[Dialogue]]],
    config: TrainConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> TrainReport:
    """Give each character a fresh block and train them together, each on its own data.

    With `config.shared_rank` and a store that has no trained character yet, a shared
    block is trained too (jointly or first, per `config.schedule`) and every character's
    gate becomes shared + own. A store that has a shared block keeps it frozen. The
    characters join the shared cast of `rt`'s catalog as trained, and their blocks are
    saved in its store. Names already in the catalog are refused before training.
    """
    cfg = config or TrainConfig()
    catalog = rt.catalog
    pending = [catalog.prepare(card, SHARED, "trained") for card, _ in members]
    keys = [p.character.key for p in pending]
    names = [n for p in pending for n in p.character.names()]
    if len(set(names)) < len(names):
        raise TrainingError("two of the characters to train share a name or alias")
    new_shared = cfg.shared_rank > 0 and not rt.shared and not catalog.trained()
    rank = rt.bank.config.rank
    _check_rank(cfg, rank)
    if new_shared and cfg.shared_rank % rank:
        raise TrainingError(f"shared_rank {cfg.shared_rank} is not a multiple of the rank {rank}")
    gen = torch.Generator().manual_seed(cfg.seed)
    shared = rt.bank.add_blocks(cfg.shared_rank // rank, "lora", gen) if new_shared else rt.shared
    blocks = rt.bank.add_blocks(len(members), init="lora", generator=gen)
    staged = new_shared and cfg.schedule != "joint"
    system = ANONYMOUS_PROMPT if cfg.shared_prompt == "anonymous" else None
    examples, shared_examples = [], []
    for (card, dialogues), block in zip(members, blocks, strict=True):
        own_lines, shared_lines = _stage_lines(card, dialogues, cfg) if staged else (dialogues, [])
        examples += character_examples(rt.loaded, card, own_lines, block)
        shared_examples += character_examples(rt.loaded, card, shared_lines, block, system=system)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    run = partial(train_blocks, rt.loaded, rt.bank, examples, cfg, progress=progress, shared=shared)
    shared_stage = partial(
        train_blocks,
        rt.loaded,
        rt.bank,
        shared_examples,
        cfg,
        ckpt and ckpt / "shared",
        progress,
        shared=shared,
        train_own=False,
        train_shared=True,
    )
    if new_shared and cfg.schedule == "staged":
        first = shared_stage()
        then = run(ckpt and ckpt / "own")
        report = TrainReport(first.steps + then.steps, first.losses + then.losses)
    elif new_shared and cfg.schedule == "own-first":
        first = run(ckpt and ckpt / "own", shared=())
        then = shared_stage(own_in_gate=True)
        report = TrainReport(first.steps + then.steps, first.losses + then.losses)
    else:
        report = run(ckpt, train_shared=new_shared)
    rt.shared = tuple(shared)
    catalog.model = rt.loaded.name
    catalog.set_rank(rank)
    if new_shared:
        catalog.set_shared(cfg.shared_rank)
        if catalog.folder is not None:
            rt.bank.save_blocks(rt.shared, catalog.shared_path(), meta={"character": "(shared)"})
    for one, block in zip(pending, blocks, strict=True):
        _save_trained(rt, one.character.key, block, one.character.name)
        catalog.commit(one)
    _fit_learned_gate(catalog, list(zip(keys, members, strict=True)))
    catalog.save()
    return report


def _stage_lines(
    card: CharacterCard, dialogues: list[Dialogue], cfg: TrainConfig
) -> tuple[list[Dialogue], list[Dialogue]]:
    """(own stage's, shared stage's) dialogues of one character, per `cfg.stage_data`."""
    if cfg.stage_data == "all":
        return dialogues, dialogues
    if len(dialogues) < 2:
        raise TrainingError(f"{card.name}: split stage data needs at least 2 dialogues")
    first, second = dialogues[0::2], dialogues[1::2]
    return (second, first) if cfg.schedule == "staged" else (first, second)


def expand(
    rt: Runtime,
    card: CharacterCard,
    dialogues: list[Dialogue],
    config: TrainConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    on_step: StepCallback | None = None,
    *,
    key: str | None = None,
    scope: str = SHARED,
) -> TrainReport:
    """Append a block for a character and train only it; old blocks are untouched.

    Its gate, in training as in play, is the store's shared block (frozen) plus the new one.

    The character is `key` of the catalog (a submitted, fused one) or, without `key`, a
    new one of `scope`. Nothing in the catalog or store changes before training succeeds,
    and no other character's block file is ever written.
    """
    cfg = config or TrainConfig()
    catalog = rt.catalog
    _check_rank(cfg, rt.bank.config.rank)
    existing = catalog.get(key) if key is not None else None
    if existing is not None and existing.status == "trained":
        raise TrainingError(f"{existing.name} already has a block")
    if existing is not None and (existing.scope, existing.names()[0]) != (scope, fold(card.name)):
        raise TrainingError(f"the key {key!r} belongs to {existing.name} of {existing.scope}")
    pending = None if existing is not None else catalog.prepare(card, scope, "trained", key=key)
    key = existing.key if existing is not None else pending.character.key
    (block,) = rt.bank.add_blocks(1, init="lora", generator=torch.Generator().manual_seed(cfg.seed))
    examples = character_examples(rt.loaded, card, dialogues, block)
    report = train_blocks(
        rt.loaded, rt.bank, examples, cfg, checkpoint_dir, progress, on_step, shared=rt.shared
    )
    _save_trained(rt, key, block, card.name)
    catalog.set_rank(rt.bank.config.rank)
    if pending is not None:
        catalog.commit(pending)
    catalog.mark_trained(key)
    _fit_learned_gate(catalog, [(key, (card, dialogues))], expanding=True)
    catalog.save()
    return report


def _check_rank(cfg: TrainConfig, rank: int) -> None:
    """Refuse a config that names a block rank other than the store's `rank`."""
    if cfg.rank is not None and cfg.rank != rank:
        raise TrainingError(f"the store's blocks have rank {rank}, not {cfg.rank}")


def _fit_learned_gate(
    catalog: Catalog,
    members: list[tuple[str, tuple[CharacterCard, list[Dialogue]]]],
    expanding: bool = False,
) -> None:
    """Fit the learned gate on the members' own lines and every character's card texts.

    When expanding a store whose gate is fitted, only the new characters' rows move.
    """
    new = [key for key, _ in members]
    texts = {c.key: catalog.gate_texts(c.key) for c in catalog.trained()}
    for key, (_, dialogues) in members:
        lines = [text for d in dialogues for role, text in d.messages if role == "character"]
        texts[key] = catalog.gate_texts(key, lines)
    old_fitted = all(k in catalog.gate_rows for k in texts if k not in new)
    catalog.fit_gate(texts, only=new if expanding and old_fitted else None)


def _save_trained(rt: Runtime, key: str, block: int, name: str) -> None:
    """Write a freshly trained block to `key`'s file and record its slot."""
    if rt.catalog.folder is not None:
        rt.bank.save_block(block, rt.catalog.block_path(key), meta={"character": name})
    rt.slots[key] = block
