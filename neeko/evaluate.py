"""`neeko eval`: held-out negative log-likelihood per character, under each way of playing it.

For every character, the mean NLL per token of its own turns in held-out dialogues under:
its gate (`nll_own`: shared + own block for a trained character, shared + its mix for a
fused one), its own block alone and the shared block alone (`nll_own_block`,
`nll_shared_block`, when the store has a shared block), a fusion of the other trained
characters as if it were unseen (`nll_fused`), the bare base model with the same prompt
(`nll_base`), and, when given, one shared LoRA of the same total rank trained on every
character's data with the same budget (`nll_shared`, the paper's LoRA-Mix baseline).

Speaker identification: for each held-out character turn of a trained character, which
trained character's gate gives that turn the lowest NLL (accuracy, chance = 1/N). No judge:
it shows whether the blocks carry each voice. Also the role-selection accuracy of free-text
descriptions, by the cosine gate and, when the store has one, by the learned gate.

Every row of one dialogue is scored in one batched forward, each under its own gate.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from neeko.catalog import Catalog
from neeko.characters import Character
from neeko.dialogues import IGNORE, DataError, Dialogue, Example
from neeko.gating import GateConfig
from neeko.lora import Gate, LoRABank
from neeko.model import LoadedModel
from neeko.train import character_examples

if TYPE_CHECKING:
    from neeko.runtime import Runtime


@dataclass
class Shared:
    """The shared-LoRA baseline: its own model copy and a one-block bank, cached at `path`."""

    loaded: LoadedModel
    bank: LoRABank
    path: Path | None = None
    trained: bool = False
    """Whether this run trained it (False: read from the cache)."""


def evaluate(
    rt: Runtime,
    heldout: dict[str, list[Dialogue]],
    shared: Shared | None = None,
    roles: list[tuple[str, str]] | None = None,
    max_tokens: int = 2048,
    speaker_id: bool = True,
) -> dict:
    """The eval table: {"characters": {NAME: {...}}, "mean": {...}, "speaker_id": ...}.

    `heldout` maps catalog keys (trained or fused characters) to their held-out dialogues;
    each is cut at `max_tokens` and what the cut leaves out is reported under "cut".
    Speaker identification gives each trained character's turn to the voice whose gate
    scores it lowest; `by_character` counts each one's hits, turns and `guesses` (turns won
    per voice, by name: where the misses went).
    """
    catalog = rt.catalog
    trained = [k for k in heldout if catalog.require(k).status == "trained"]
    voices = trained if speaker_id and len(trained) > 1 else []
    voice_names = [catalog.require(k).name for k in voices]
    table: dict[str, dict] = {}
    hits: dict[str, dict] = {}
    cut = {"max_tokens": max_tokens, "dialogues_cut": 0, "tokens_dropped": 0}
    for key, dialogues in heldout.items():
        char = catalog.require(key)
        examples, lost = _examples(rt.loaded, char, dialogues, max_tokens)
        gates = _gates(rt, char)
        voice_gates = [rt.gate(k) for k in voices]
        sums = dict.fromkeys(gates, 0.0)
        for ex in examples:
            turns = turn_nlls(rt.loaded, rt.bank, ex, [*gates.values(), *voice_gates])
            for i, name in enumerate(gates):
                sums[name] += float(turns[i].sum())
            if char.key in voices:
                best = turns[len(gates) :].argmin(dim=0)  # (turns,) index into voices
                mine = hits.setdefault(char.name, {"hits": 0, "turns": 0, "guesses": Counter()})
                mine["hits"] += int((best == voices.index(char.key)).sum())
                mine["turns"] += best.numel()
                mine["guesses"].update(voice_names[i] for i in best.tolist())
        tokens = sum(_labelled(ex) for ex in examples)
        row: dict = {"status": char.status}
        row.update({name: total / tokens for name, total in sums.items()})
        if shared is not None:
            total = sum(
                float(turn_nlls(shared.loaded, shared.bank, ex, [{0: 1.0}]).sum())
                for ex in examples
            )
            row["nll_shared"] = total / tokens
        row["ppl_own"] = math.exp(row["nll_own"])
        row["tokens"] = tokens
        row["tokens_dropped"] = sum(ex.dropped for ex in examples) + lost[1]
        cut["dialogues_cut"] += sum(1 for ex in examples if ex.dropped) + lost[0]
        cut["tokens_dropped"] += row["tokens_dropped"]
        table[char.name] = row
    result: dict = {"characters": table, "mean": _means(table), "cut": cut}
    result["compare"] = _compare(table)
    if voices:
        right, turns = (sum(h[k] for h in hits.values()) for k in ("hits", "turns"))
        result["speaker_id"] = {
            "accuracy": right / turns,
            "ci95": wilson_interval(right, turns),
            "chance": 1 / len(voices),
            "characters": len(voices),
            "turns": turns,
            "by_character": hits,
        }
    if roles:
        result["role_accuracy"] = role_accuracy(catalog, roles)
        if catalog.gate_rows:
            result["role_accuracy_learned"] = role_accuracy(
                catalog, roles, GateConfig(policy="learned")
            )
    return result


def _examples(
    loaded: LoadedModel, char: Character, dialogues: list[Dialogue], max_tokens: int
) -> tuple[list[Example], tuple[int, int]]:
    """The dialogues' examples, and (dialogues, character tokens) lost whole to the cut."""
    examples, lost, tokens = [], 0, 0
    for d in dialogues:
        try:
            examples += character_examples(loaded, char.card, [d], -1, max_tokens)
        except DataError:  # no character token within max_tokens
            lost += 1
            tokens += sum(
                len(loaded.tokenizer.encode(text, add_special_tokens=False))
                for role, text in d.messages
                if role == "character"
            )
    if not examples:
        raise DataError(f"none of {char.name}'s held-out dialogues fits in {max_tokens} tokens")
    return examples, (lost, tokens)


def _gates(rt: Runtime, char: Character) -> dict[str, Gate]:
    """The named gates a character is scored under (see the module docstring)."""
    gates = {"nll_own": rt.gate(char.key)}
    if char.status == "trained":
        if rt.shared:
            gates["nll_own_block"] = rt.own_gate(char.key)
            gates["nll_shared_block"] = rt.shared_gate()
        gates["nll_fused"] = as_unseen(rt, char)
    gates["nll_base"] = {}
    return gates


def wilson_interval(hits: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% at the default `z`)."""
    if trials <= 0:
        raise ValueError("no trials")
    p, zz = hits / trials, z * z / trials
    centre = (p + zz / 2) / (1 + zz)
    half = z * math.sqrt(p * (1 - p) / trials + zz / (4 * trials)) / (1 + zz)
    low = 0.0 if hits == 0 else max(0.0, centre - half)  # the edges are exact, not rounded
    high = 1.0 if hits == trials else min(1.0, centre + half)
    return low, high


def turn_nlls(
    loaded: LoadedModel, bank: LoRABank | None, example: Example, gates: list[Gate]
) -> Tensor:
    """(len(gates), turns) summed NLL of each labelled turn of `example` under each gate.

    One batched forward: row i runs `example` under `gates[i]`; logits are computed only
    at the labelled positions. A turn is a contiguous run of labelled tokens.
    """
    labels = torch.tensor(example.labels[1:])
    keep = (labels != IGNORE).nonzero().flatten()  # positions whose next token is labelled
    if keep.numel() == 0:
        return torch.zeros(len(gates), 0)
    ids = torch.tensor(example.ids, device=loaded.device)[None].expand(len(gates), -1)
    with torch.inference_mode():
        if bank is None:
            logits = loaded.model(input_ids=ids, logits_to_keep=keep.to(loaded.device)).logits
        else:
            with bank.route(gates):
                logits = loaded.model(input_ids=ids, logits_to_keep=keep.to(loaded.device)).logits
    target = labels[keep].to(logits.device)
    nll = nn.functional.cross_entropy(
        logits.float().transpose(1, 2), target[None].expand(len(gates), -1), reduction="none"
    ).cpu()  # (gates, labelled)
    starts = torch.ones_like(keep, dtype=torch.bool)
    starts[1:] = keep[1:] != keep[:-1] + 1
    turn = starts.cumsum(0) - 1
    out = torch.zeros(len(gates), int(turn[-1]) + 1, dtype=torch.float64)
    return out.index_add_(1, turn, nll.double())


def _labelled(example: Example) -> int:
    return sum(1 for t in example.labels[1:] if t != IGNORE)


def _means(table: dict[str, dict]) -> dict[str, float]:
    """Per-column means over the trained characters (all characters if none is trained)."""
    rows = [r for r in table.values() if r["status"] == "trained"] or list(table.values())
    cols = [k for k in rows[0] if k.startswith(("nll", "ppl"))]
    return {k: sum(r[k] for r in rows) / len(rows) for k in cols if all(k in r for r in rows)}


def _compare(table: dict[str, dict]) -> dict[str, dict]:
    """For each other column, how many trained characters `nll_own` beats, and by how much."""
    rows = [r for r in table.values() if r["status"] == "trained"]
    out = {}
    for other in ("nll_shared", "nll_base", "nll_fused", "nll_own_block", "nll_shared_block"):
        pairs = [(r["nll_own"], r[other]) for r in rows if other in r]
        if pairs:
            out[f"own_vs_{other.removeprefix('nll_')}"] = {
                "own_lower": sum(1 for own, x in pairs if own < x),
                "of": len(pairs),
                "mean_gain": sum(x - own for own, x in pairs) / len(pairs),
            }
    return out


def as_unseen(rt: Runtime, char: Character) -> Gate:
    """The fusion gate `char` would get if its own block did not exist (shared + mix)."""
    query = rt.catalog.embedding(char.key)
    return rt.mix_gate(rt.catalog.fusion_weights(query, exclude=(char.key,)))


def role_accuracy(
    catalog: Catalog, roles: list[tuple[str, str]], config: GateConfig | None = None
) -> float:
    """Share of descriptions whose strongest gate weight falls on the right character."""
    hits = 0
    for description, name in roles:
        weights = catalog.fusion_weights(catalog.encoder.encode([description])[0], config)
        best = max(weights, key=weights.get) if weights else None
        hits += best is not None and catalog.require(best).name == name
    return hits / len(roles)
