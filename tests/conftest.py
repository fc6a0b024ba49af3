"""Shared fixtures: a fresh random `tiny` model per test, a bank of random blocks on it."""

import copy
import os

# Tests never touch the network; the model cache defaults to ~/.cache/neeko unless set.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from neeko import model as neeko_model
from neeko.engine import Engine
from neeko.lora import LoRABank
from neeko.model import LoadedModel

N_BLOCKS = 6
NAMES = ["Ash", "Birch", "Cedar", "Dune", "Ember", "Fjord", "Gale", "Heath"]
"""The characters of `tiny_store`."""


@pytest.fixture(scope="session")
def _tiny_once() -> LoadedModel:
    return neeko_model.load("tiny", device="cpu")


@pytest.fixture
def tiny(_tiny_once: LoadedModel) -> LoadedModel:
    """A fresh tiny model per test (a bank wraps its model in place, so never share one).

    The model is a deep copy of one session-wide load (5 ms instead of 0.3 s); the tokenizer,
    which no test changes, is shared.
    """
    return LoadedModel(copy.deepcopy(_tiny_once.model), _tiny_once.tokenizer, _tiny_once.name)


@pytest.fixture
def bank(tiny: LoadedModel, request: pytest.FixtureRequest) -> LoRABank:
    """A bank on `tiny` with 6 random blocks.

    Default config (q_proj and v_proj, rank 4), unless a test parametrizes it indirectly:
    `@pytest.mark.parametrize("bank", [BankConfig(path="dense")], indirect=True)`.
    """
    b = LoRABank(tiny.model, getattr(request, "param", None))
    b.add_blocks(N_BLOCKS, init="random", generator=torch.Generator().manual_seed(0))
    return b


@pytest.fixture
def engine(tiny: LoadedModel, bank: LoRABank) -> Engine:
    """An engine serving `tiny` with `bank`."""
    return Engine(tiny, bank)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory, _tiny_once: LoadedModel):
    """A read-only store of 8 trained characters (`NAMES`) with random blocks, for `tiny`."""
    from neeko.cards import card_from_fields
    from neeko.catalog import Catalog

    folder = tmp_path_factory.mktemp("store8")
    catalog = Catalog(folder)
    bank = LoRABank(copy.deepcopy(_tiny_once.model))
    blocks = bank.add_blocks(8, init="random", generator=torch.Generator().manual_seed(1))
    for name, block in zip(NAMES, blocks, strict=True):
        card = card_from_fields(
            name, f"{name} is a character of the test cast.", aliases=[name[:2]]
        )
        char = catalog.add(card, status="trained")
        bank.save_block(block, catalog.block_path(char.key))
    catalog.model = "tiny"
    catalog.save()
    return folder


POSTGRES = os.environ.get("NEEKO_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
"""A PostgreSQL server the tests may create databases on (skipped where none answers)."""


@pytest.fixture
async def postgres_url():
    """The URL of a new, empty PostgreSQL database, dropped after the test."""
    import uuid

    asyncpg = pytest.importorskip("asyncpg")
    try:
        conn = await asyncpg.connect(POSTGRES, timeout=3)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"no PostgreSQL at {POSTGRES}: {exc}")
    name = f"neeko_test_{uuid.uuid4().hex[:12]}"
    await conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield POSTGRES.rsplit("/", 1)[0] + "/" + name
    finally:
        await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await conn.close()


@pytest.fixture
def queued_turns(monkeypatch):
    """Every turn queued on an in-process queue during the test, in order."""
    from neeko.queue import LocalTurnQueue

    turns = []
    original = LocalTurnQueue._enqueue

    async def enqueue(self, group):
        turns.extend(group)
        await original(self, group)

    monkeypatch.setattr(LocalTurnQueue, "_enqueue", enqueue)
    return turns


@pytest.fixture
def chat_settings(tmp_path, tiny_store):
    """Chat settings for the tiny model: a writable copy of `tiny_store`, a SQLite file,
    greedy short replies, no cooldown."""
    import shutil

    from neeko.settings import ChatSettings

    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    return ChatSettings(
        model="tiny",
        store=str(store),
        db_path=str(tmp_path / "chat.db"),
        cooldown_s=0,
        temperature=0,
        reply_tokens=12,
    )
