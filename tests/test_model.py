"""Model loading: tiny, local Llama-family folders, the packaged SmolLM2, clear errors."""

import time

import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from neeko import model as model_lib
from neeko.engine import Engine, GenerationRequest, SamplingParams
from neeko.errors import ModelLoadError
from neeko.lora import BankConfig, LoRABank

SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "initializer_range": 0.2,
}


def test_tiny_is_deterministic_and_frozen():
    a, b = model_lib.load("tiny"), model_lib.load("tiny")
    assert a.device.type == "cpu"
    assert a.dtype == torch.float32
    assert all(
        torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True)
    )
    assert not any(p.requires_grad for p in a.model.parameters())
    assert not a.model.training


@pytest.mark.parametrize(
    ("config_cls", "model_cls"),
    [(LlamaConfig, None), (Qwen2Config, Qwen2ForCausalLM), (MistralConfig, MistralForCausalLM)],
)
def test_local_llama_family_folders_load_and_serve_mixed_batches(tmp_path, config_cls, model_cls):
    tokenizer = AutoTokenizer.from_pretrained(model_lib.default_model_dir())
    config = config_cls(vocab_size=len(tokenizer), **SMALL)
    if model_cls is None:
        model = model_lib.tiny_model(len(tokenizer), model_lib.TinyConfig())
    else:
        torch.manual_seed(0)
        model = model_cls(config)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    loaded = model_lib.load(str(tmp_path))
    bank = LoRABank(loaded.model, BankConfig())
    bank.add_blocks(3, init="random", generator=torch.Generator().manual_seed(0))
    engine = Engine(loaded, bank)
    sp = SamplingParams(max_new_tokens=6, temperature=0)
    reqs = [
        GenerationRequest([{"role": "user", "content": "Hello " * n}], gate, sp)
        for n, gate in [(1, {0: 1.0}), (4, {2: 1.0}), (2, {0: 0.5, 1: 0.5})]
    ]
    batch = engine.generate(reqs)
    alone = [engine.generate([r])[0] for r in reqs]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    assert len(bank.module_names) == 2 * SMALL["num_hidden_layers"]


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        model_lib.load(str(tmp_path / "nope"))


def test_folder_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="local folder"):
        model_lib.load(str(tmp_path))


def test_bad_dtype_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        model_lib.load("tiny", dtype="float42")


@pytest.mark.real_model
def test_default_model_loads_fast_from_cache_and_answers():
    model_lib.default_model_dir()  # converts once if needed
    t0 = time.perf_counter()
    loaded = model_lib.load("default")
    assert time.perf_counter() - t0 < 5
    cfg = loaded.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (30, 576)
    assert "quantization_config" not in cfg.to_dict()
    engine = Engine(loaded)
    (res,) = engine.generate(
        [
            GenerationRequest(
                [{"role": "user", "content": "What is the capital of France? One word."}],
                None,
                SamplingParams(max_new_tokens=12, temperature=0),
            )
        ]
    )
    assert "Paris" in res.text
    assert res.finish_reason in ("eos", "length")
