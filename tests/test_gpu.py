"""The CUDA path: bf16 by default, mixed batches equal rows alone. Skipped without a GPU."""

import pytest
import torch

from neeko import model as model_lib
from neeko.engine import Engine, GenerationRequest, SamplingParams
from neeko.lora import BankConfig, LoRABank

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("path", ["gathered", "dense"])
def test_cuda_bf16_mixed_batch_equals_rows_alone(path):
    loaded = model_lib.load("tiny")
    assert loaded.device.type == "cuda"
    assert loaded.dtype == torch.bfloat16
    bank = LoRABank(loaded.model, BankConfig(path=path))
    bank.add_blocks(4, init="random", generator=torch.Generator().manual_seed(0), b_scale=0.05)
    assert bank.layers[bank.module_names[0]].A.device.type == "cuda"
    engine = Engine(loaded, bank)
    sp = SamplingParams(max_new_tokens=8, temperature=0)
    reqs = [
        GenerationRequest([{"role": "user", "content": "hi " * n}], gate, sp)
        for n, gate in [(1, {0: 1.0}), (3, {1: 1.0}), (2, None), (5, {2: 0.5, 3: 0.5})]
    ]
    batch = engine.generate(reqs)
    alone = [engine.generate([r])[0] for r in reqs]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
