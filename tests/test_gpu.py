"""The CUDA path: bf16 by default, exact paths agree, mixed batches run. Skipped without a GPU."""

import pytest
import torch

from neeko import model as model_lib
from neeko.engine import Engine, GenerationRequest, SamplingParams
from neeko.lora import BankConfig, LoRABank

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def bank():
    loaded = model_lib.load("tiny")
    bank = LoRABank(loaded.model, BankConfig())
    bank.add_blocks(4, init="random", generator=torch.Generator().manual_seed(0), b_scale=0.05)
    bank.loaded = loaded
    return bank


def test_cuda_defaults_to_bf16_and_keeps_blocks_on_the_device(bank):
    assert bank.loaded.device.type == "cuda"
    assert bank.loaded.dtype == torch.bfloat16
    layer = bank.layers[bank.module_names[0]]
    assert layer.A.device.type == "cuda"
    assert layer.A.dtype == torch.bfloat16


@pytest.mark.parametrize("path", ["gathered", "dense"])
def test_cuda_paths_match_reference(bank, path):
    gates = [{0: 1.0}, {1: 0.7, 2: 0.3}, None, {3: 1.0}]
    layer = bank.layers[bank.module_names[0]]
    x = torch.randn(4, 5, layer.in_features, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        with bank.route(bank.routing(gates, path="reference")):
            want = layer(x).float()
        with bank.route(bank.routing(gates, path=path)):
            got = layer(x).float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_cuda_mixed_batch_generates(bank):
    engine = Engine(bank.loaded, bank)
    sp = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    reqs = [
        GenerationRequest([{"role": "user", "content": "hi " * n}], gate, sp)
        for n, gate in [(1, {0: 1.0}), (3, {1: 1.0}), (2, None)]
    ]
    results = engine.generate(reqs)
    assert [r.completion_tokens for r in results] == [6, 6, 6]


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_cuda_graph_decode_step_equals_eager(weights):
    """The compiled step under CUDA graphs (one per batch bucket) vs eager, fp32 on the GPU."""
    engines = []
    for decode in ("eager", "compiled"):
        loaded = model_lib.load("tiny", device="cuda", dtype="float32")
        bank = LoRABank(loaded.model, BankConfig())
        bank.add_blocks(16, init="random", generator=torch.Generator().manual_seed(1))
        low = weights if decode == "compiled" else "fp32"
        engines.append(Engine(loaded, bank, decode=decode, weights=low))
    eager, compiled = engines
    assert compiled.decoder is not None
    sp = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    for n_rows, k in [(1, 1), (3, 3), (9, 8), (16, 16), (2, 1)]:
        reqs = [
            GenerationRequest([{"role": "user", "content": "sea " * (1 + i % 4)}], {i % k: 1.0}, sp)
            for i in range(n_rows)
        ]
        want = [r.token_ids for r in eager.generate(reqs)]
        got = [r.token_ids for r in compiled.generate(reqs)]
        if weights == "fp32":
            assert got == want, (n_rows, k)
        else:
            assert [len(t) for t in got] == [len(t) for t in want]
