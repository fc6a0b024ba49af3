"""A loaded model with a store's blocks in its bank, and which slot holds whose block.

The catalog (`neeko.catalog`) says who is trained; a `Runtime` maps those characters to the
slots of its own bank (a trainer and a worker in one process share the catalog, not the
bank) and turns a character or a gate mix into the bank's per-row gate.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from neeko import model as model_lib
from neeko.catalog import Catalog
from neeko.characters import CAST_DIR, SHARED, CatalogError, Mix, read_cast
from neeko.compiled import WeightDtype
from neeko.engine import DecodeMode, Engine
from neeko.gating import GateConfig
from neeko.lora import BankConfig, Gate, LoRABank
from neeko.model import LoadedModel

CAST_STORE = CAST_DIR / "store"


@dataclass
class Runtime:
    """A loaded model with blocks in its bank; `slots` says which slot holds whose block.

    The catalog says who is trained; the slots are this bank's own (a trainer and a worker
    in one process share the catalog but not the bank). `shared` holds the slots of the
    store's shared block (split into rank-p parts), which every character's gate adds at
    weight 1; an empty gate is still the bare base model.
    """

    catalog: Catalog
    loaded: LoadedModel
    bank: LoRABank
    engine: Engine
    slots: dict[str, int] = field(default_factory=dict)
    shared: tuple[int, ...] = ()

    def gate(self, key: str) -> Gate:
        """The gate of a character: shared + its own block, or shared + its fused mix."""
        char = self.catalog.get(key)
        if char is None:
            raise CatalogError(f"unknown character {key!r}")
        if char.status != "trained":
            return self.mix_gate(char.mix)
        return {**self.shared_gate(), **self.own_gate(key)}

    def own_gate(self, key: str) -> Gate:
        """A trained character's own block alone, without the shared block."""
        if key not in self.slots:
            char = self.catalog.get(key)
            raise CatalogError(f"{char.name if char else key}'s block is not loaded here")
        return {self.slots[key]: 1.0}

    def shared_gate(self) -> Gate:
        """The shared block alone (empty when the store has none)."""
        return dict.fromkeys(self.shared, 1.0)

    def mix_gate(self, mix: Mix) -> Gate:
        """The gate of a mix over trained characters' keys, plus the shared block."""
        missing = [k for k in mix if k not in self.slots]
        if missing:
            raise CatalogError(f"the gate mix names {missing}, whose blocks are not loaded here")
        return {**self.shared_gate(), **{self.slots[k]: float(w) for k, w in mix.items()}}

    def load_shared(self) -> None:
        """Load the store's shared block, if it has one and it is not loaded yet."""
        if self.catalog.shared_rank and not self.shared:
            self.shared = tuple(self.bank.load_blocks(self.catalog.shared_path()))
            if len(self.shared) * self.bank.config.rank != self.catalog.shared_rank:
                raise CatalogError(
                    f"{self.catalog.shared_path()}: rank {len(self.shared) * self.bank.config.rank}"
                    f", the manifest says {self.catalog.shared_rank}"
                )

    def persona_gate(self, text: str, config: GateConfig | None = None) -> Gate:
        """A fused gate for free text such as "a grumpy sea captain"."""
        query = self.catalog.encoder.encode([text])[0]
        return self.mix_gate(self.catalog.fusion_weights(query, config))

    def load_block(self, key: str, data: bytes | None = None) -> int:
        """Load `key`'s block (from the store, or `data`) into the bank, once; its slot."""
        if key in self.slots:
            return self.slots[key]
        if data is None:
            slot = self.bank.load_block(self.catalog.block_path(key))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "block.safetensors"
                path.write_bytes(data)
                slot = self.bank.load_block(path)
        self.slots[key] = slot
        return slot


def open_runtime(
    store: str | Path = CAST_STORE,
    model: str = "default",
    device: str | None = None,
    catalog: Catalog | None = None,
    decode: DecodeMode = "eager",
    weights: WeightDtype = "fp32",
) -> Runtime:
    """Load `model`, wrap it in a bank and load every trained block of `store`.

    Pass the process's `catalog` of `store` to share it (one catalog per process and store).
    `decode` and `weights` choose the engine's decode path (see `neeko.engine.Engine`).
    """
    catalog = catalog or Catalog.open(store)
    if catalog.model and catalog.model != model:
        raise CatalogError(
            f"{store}: blocks were trained on model {catalog.model!r}, not {model!r}"
        )
    loaded = model_lib.load(model, device=device)
    bank = LoRABank(loaded.model, BankConfig.for_rank(catalog.rank))
    rt = Runtime(catalog, loaded, bank, Engine(loaded, bank, decode=decode, weights=weights))
    rt.load_shared()
    for char in catalog.trained():
        rt.load_block(char.key)
    return rt


def empty_runtime(
    catalog: Catalog,
    model: str = "default",
    device: str | None = None,
    decode: DecodeMode = "eager",
) -> Runtime:
    """`model` with an empty bank of `catalog.rank` blocks, for `catalog` (a store to train)."""
    loaded = model_lib.load(model, device=device)
    bank = LoRABank(loaded.model, BankConfig.for_rank(catalog.rank))
    return Runtime(catalog, loaded, bank, Engine(loaded, bank, decode=decode))


def untrained_cast_runtime(
    model: str = "default", device: str | None = None, decode: DecodeMode = "eager"
) -> Runtime:
    """The starter cast with fresh blocks (the base model until `neeko train --cast`)."""
    rt = empty_runtime(Catalog(), model, device, decode)
    members = read_cast()
    for member, block in zip(members, rt.bank.add_blocks(len(members)), strict=True):
        rt.slots[rt.catalog.add(member.card, SHARED, "trained").key] = block
    return rt


def untrained_cast_store(folder: str | Path, model: str, device: str | None = None) -> Catalog:
    """A store of the starter cast for `model` with empty blocks (the base model's voice).

    For models the committed blocks were not trained on; `neeko train --cast --model M
    --store DIR` trains them.
    """
    rt = untrained_cast_runtime(model, device)
    catalog = Catalog(folder)
    catalog.model = model
    for char in rt.catalog.trained():
        catalog.add(char.card, SHARED, "trained", key=char.key)
        path = catalog.block_path(char.key)
        rt.bank.save_block(rt.slots[char.key], path, meta={"character": char.name})
    catalog.save()
    return catalog


def writable_store(path: str | Path, model: str = "default") -> Path:
    """A store one may train into, created if missing as the starter cast for `model`.

    That is a copy of the committed store when its blocks were trained on `model`, else
    the cast with empty blocks (the base model's voice) until it is trained.
    """
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # several processes may start at once
        if (path / "manifest.json").exists():
            return path
        if Catalog.open(CAST_STORE).model == model:
            shutil.copytree(CAST_STORE, path, dirs_exist_ok=True)
        else:
            logging.getLogger("neeko").warning(
                "no trained cast blocks for model %r: the cast starts with empty blocks in %s",
                model,
                path,
            )
            untrained_cast_store(path, model)
    return path
