"""Shared fixtures: a fresh random `tiny` model per test, a bank of random blocks on it."""

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


@pytest.fixture
def tiny() -> LoadedModel:
    """A freshly loaded tiny model (a bank wraps its model in place, so never share one)."""
    return neeko_model.load("tiny", device="cpu")


@pytest.fixture
def bank(tiny: LoadedModel) -> LoRABank:
    """A bank on `tiny` (default config: q_proj and v_proj, rank 4) with 6 random blocks."""
    b = LoRABank(tiny.model)
    b.add_blocks(N_BLOCKS, init="random", generator=torch.Generator().manual_seed(0))
    return b


@pytest.fixture
def engine(tiny: LoadedModel, bank: LoRABank) -> Engine:
    """An engine serving `tiny` with `bank`."""
    return Engine(tiny, bank)
