"""`neeko eval`: held-out negative log-likelihood per character, under each way of playing it.

For every character, the mean NLL per token of its own turns in held-out dialogues under:
its own block (`nll_own`), a fusion of the other trained characters as if it were unseen
(`nll_fused`), the bare base model with the same prompt (`nll_base`), and, when given, one
shared LoRA of the same total rank trained on every character's data (`nll_shared`, the
paper's LoRA-Mix baseline). Also the role-selection accuracy of free-text descriptions, by
the cosine gate and, when the store has one, by the learned gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from neeko.catalog import Catalog
from neeko.characters import Character
from neeko.dialogues import Dialogue, Example
from neeko.gating import GateConfig
from neeko.lora import Gate, LoRABank
from neeko.model import LoadedModel
from neeko.train import character_examples, token_nll

if TYPE_CHECKING:
    from neeko.runtime import Runtime


@dataclass
class Shared:
    """The shared-LoRA baseline: its own model copy and a one-block bank of rank N*p."""

    loaded: LoadedModel
    bank: LoRABank


def evaluate(
    rt: Runtime,
    heldout: dict[str, list[Dialogue]],
    shared: Shared | None = None,
    roles: list[tuple[str, str]] | None = None,
) -> dict:
    """The eval table: {"characters": {NAME: {...}}, "mean": {...}, "role_accuracy": ...}."""
    catalog, loaded, bank = rt.catalog, rt.loaded, rt.bank
    table: dict[str, dict[str, float]] = {}
    for key, dialogues in heldout.items():
        char = catalog.require(key)
        examples = character_examples(loaded, char.card, dialogues, block=-1)
        row = {
            "nll_own": _nll(loaded, bank, examples, rt.gate(key)),
            "nll_fused": _nll(loaded, bank, examples, _as_unseen(rt, char)),
            "nll_base": _nll(loaded, None, examples, {}),
        }
        if shared is not None:
            row["nll_shared"] = _nll(shared.loaded, shared.bank, examples, {0: 1.0})
        row["ppl_own"] = math.exp(row["nll_own"])
        row["tokens"] = sum(sum(1 for t in e.labels[1:] if t != -100) for e in examples)
        table[char.name] = row
    keys = [k for k in next(iter(table.values())) if k.startswith(("nll", "ppl"))]
    result: dict = {
        "characters": table,
        "mean": {k: sum(r[k] for r in table.values()) / len(table) for k in keys},
    }
    if roles:
        result["role_accuracy"] = role_accuracy(catalog, roles)
        if catalog.gate_rows:
            result["role_accuracy_learned"] = role_accuracy(
                catalog, roles, GateConfig(policy="learned")
            )
    return result


def _nll(loaded: LoadedModel, bank: LoRABank | None, examples: list[Example], gate: Gate) -> float:
    """Mean NLL per labelled token over `examples` under `gate`."""
    total, count = 0.0, 0
    for ex in examples:
        nll, n = token_nll(loaded, bank, ex, gate)
        total, count = total + nll, count + n
    return total / count


def _as_unseen(rt: Runtime, char: Character) -> Gate:
    """The fusion gate `char` would get if its own block did not exist."""
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
