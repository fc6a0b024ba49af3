"""The compiled static-shape decode step against the eager reference path."""

import copy
import logging

import pytest
import torch

from neeko import model as model_lib
from neeko.compiled import StaticDecoder, _Linear, bucket, length_bucket
from neeko.engine import Engine, GenerationRequest, SamplingParams, StaticDecodeBatch
from neeko.errors import GenerationError
from neeko.kvcache import PrefixCache
from neeko.lora import BankConfig, LoRABank
from neeko.model import LoadedModel

N_BLOCKS = 16


def _pair(base: LoadedModel, config: BankConfig | None = None, weights: str = "fp32"):
    """An eager and a compiled engine on two copies of one model with the same 16 blocks."""
    engines = []
    for decode in ("eager", "compiled"):
        loaded = LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.name)
        bank = LoRABank(loaded.model, config)
        gen = torch.Generator().manual_seed(7)
        bank.add_blocks(N_BLOCKS, init="random", generator=gen, b_scale=0.5)
        low = weights if decode == "compiled" else "fp32"
        engines.append(Engine(loaded, bank, decode=decode, weights=low))
    return engines


@pytest.fixture(scope="module", params=["native", "graph"])
def pair(_tiny_once, request):
    """Eager and compiled engines; the compiled one's steps run natively (fp32 on the CPU,
    up to `BATCH_ROWS` rows) or all through the compiled graph (as on CUDA)."""
    eager, compiled = _pair(_tiny_once)
    assert compiled.decoder is not None
    assert compiled.decoder.native is not None
    assert compiled.decoder.native_rows == (2, 64)
    if request.param == "graph":
        compiled.decoder = StaticDecoder(compiled.loaded, native=False)
    return eager, compiled


def _requests(n_rows: int, n_characters: int, seed: int = 0) -> list[GenerationRequest]:
    """Rows of different lengths and budgets over `n_characters` one-hot gates (and mixes)."""
    out = []
    for i in range(n_rows):
        k = i % n_characters
        gate = {k: 1.0} if i % 5 != 4 else {k: 0.5, (k + 1) % N_BLOCKS: 0.5}
        text = " ".join(["story", "sea", "storm", "ship"][: 1 + (i + seed) % 4]) * (1 + i % 3)
        sampling = SamplingParams(max_new_tokens=6 + (i * 3) % 11, temperature=0, ignore_eos=True)
        out.append(GenerationRequest([{"role": "user", "content": text}], gate, sampling))
    return out


@pytest.mark.parametrize(("n_rows", "n_characters"), [(1, 1), (3, 3), (9, 8), (16, 16), (5, 1)])
def test_compiled_equals_eager_across_buckets_and_character_counts(pair, n_rows, n_characters):
    """Every row's greedy tokens match; batch sizes cross buckets as rows finish."""
    eager, compiled = pair
    requests = _requests(n_rows, n_characters)
    want = eager.generate(requests)
    got = compiled.generate(requests)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in want]


def test_one_step_gives_the_eager_logits_for_every_row(pair):
    """A step over 16 characters (and the base model) equals the eager forward, per row."""
    eager, compiled = pair
    requests = _requests(12, 12)
    greedy = SamplingParams(max_new_tokens=4, temperature=0)
    requests.append(GenerationRequest([{"role": "user", "content": "storm"}], None, greedy))
    logits = {}
    for name, engine in (("eager", eager), ("compiled", compiled)):
        batch = engine.new_batch()
        batch.add(requests)
        seen = []
        original = batch._sample

        def keep(lg, rows, seen=seen, original=original):
            seen.append(lg.clone())
            return original(lg, rows)

        batch._sample = keep
        batch.step()
        logits[name] = seen[-1]
    assert isinstance(compiled.new_batch(), StaticDecodeBatch)
    torch.testing.assert_close(logits["compiled"], logits["eager"], atol=1e-4, rtol=1e-4)


def test_a_batch_of_base_model_rows_runs_without_blocks(pair):
    """Rows with no gate alone in a batch (no block inputs at all) decode as eager."""
    eager, compiled = pair
    greedy = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    requests = [
        GenerationRequest([{"role": "user", "content": text}], None, greedy)
        for text in ("sea", "storm ship")
    ]
    want = [r.token_ids for r in eager.generate(requests)]
    assert [r.token_ids for r in compiled.generate(requests)] == want


def test_rows_joining_a_running_batch_keep_the_same_tokens(pair):
    """Continuous batching: rows added between steps, in another slot bucket."""
    eager, compiled = pair
    first, later = _requests(3, 3), _requests(6, 6, seed=1)
    results = {}
    for name, engine in (("eager", eager), ("compiled", compiled)):
        batch = engine.new_batch()
        ids = batch.add(first)
        batch.step()
        batch.step()
        ids += batch.add(later)
        while batch.step():
            pass
        results[name] = [batch.results[i].token_ids for i in ids]
    assert results["compiled"] == results["eager"]


def test_sampling_streaming_and_stop_strings_work_compiled(pair):
    eager, compiled = pair
    chunks: list[str] = []
    sampling = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.8, seed=3)
    request = GenerationRequest(
        [{"role": "user", "content": "storm"}], {2: 1.0}, sampling, on_text=chunks.append
    )
    got = compiled.generate([request])[0]
    assert "".join(chunks) == got.text
    assert (
        got.token_ids
        == eager.generate([GenerationRequest(request.messages, {2: 1.0}, sampling)])[0].token_ids
    )
    greedy = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    full = compiled.generate([GenerationRequest(request.messages, {2: 1.0}, greedy)])[0]
    stop = full.text[3:6]
    if stop.strip():
        sampling = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, stop=(stop,))
        cut = compiled.generate([GenerationRequest(request.messages, {2: 1.0}, sampling)])[0]
        assert cut.finish_reason == "stop"
        assert cut.text == full.text[: full.text.find(stop)]


def test_a_follow_up_reuses_the_cached_prefix_compiled(pair):
    eager, compiled = pair
    system = {"role": "system", "content": "You keep a lighthouse on a stormy coast. " * 3}
    history = [system, {"role": "user", "content": "Tell me about the storm."}]
    greedy = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    compiled.prefix_cache = PrefixCache(64 * 2**20)
    try:
        first = compiled.generate([GenerationRequest(history, {4: 1.0}, greedy)])[0]
        follow = [*history, {"role": "assistant", "content": first.text}]
        follow.append({"role": "user", "content": "And the ship?"})
        reused = compiled.generate([GenerationRequest(follow, {4: 1.0}, greedy)])[0]
    finally:
        compiled.prefix_cache = None
    assert reused.cached_tokens >= first.prompt_tokens
    want = eager.generate([GenerationRequest(follow, {4: 1.0}, greedy)])[0]
    assert reused.token_ids == want.token_ids


@pytest.mark.parametrize("config", [BankConfig(targets=("all-linear",)), BankConfig(rank=8)])
def test_other_bank_layouts_match_eager_uncompiled(tiny, config):
    """Blocks on every projection, or of another rank, apply exactly (the step, eagerly)."""
    eager, compiled = _pair(tiny, config)
    assert compiled.decoder is not None
    assert set(compiled.decoder.targets) == (
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        if config.targets == ("all-linear",)
        else {"q_proj", "v_proj"}
    )
    compiled.decoder = StaticDecoder(compiled.loaded, compile=False)
    requests = _requests(4, 4)
    assert [r.token_ids for r in compiled.generate(requests)] == [
        r.token_ids for r in eager.generate(requests)
    ]


@pytest.mark.parametrize(("weights", "tolerance"), [("bf16", 0.02), ("int8", 0.03), ("int4", 0.35)])
def test_lower_precision_weights_stay_close_to_fp32(tiny, weights, tolerance):
    """Weight-only storage: next-token logits within a relative error of the fp32 step."""
    _, fp32 = _pair(tiny)
    _, low = _pair(tiny, weights=weights)
    for engine in (fp32, low):
        engine.decoder = StaticDecoder(engine.loaded, weights=engine.decoder.weights, compile=False)
    tokens, positions = torch.tensor([5, 9]), torch.tensor([0, 0])
    keys = torch.zeros(2, 2, 2, 0, 16)
    outs = []
    for engine in (fp32, low):
        routing = engine.bank.routing([{1: 1.0}, {3: 1.0}], path="gathered")
        lora = engine.decoder.lora_inputs(routing, 2)
        with torch.inference_mode():
            outs.append(engine.decoder.step(tokens, positions, keys, keys, lora)[0])
    error = (outs[1] - outs[0]).norm() / outs[0].norm()
    assert 0 < error < tolerance


@pytest.mark.parametrize(("storage", "tolerance"), [("fp32", 1e-6), ("bf16", 0.01)])
def test_one_row_product_sum_equals_the_matmul(storage, tolerance):
    """The single-row product-sum that inductor streams computes what the matmul does."""
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 64, generator=gen), torch.randn(1, 64, generator=gen)
    lin = _Linear(w, None, storage, gemv=True)
    assert lin.gemv
    want = x @ w.T
    error = (lin(x) - want).norm() / want.norm()
    assert error < tolerance
    if storage == "bf16":
        assert lin.weight.dtype == torch.bfloat16
        assert error > 1e-4  # the weights are stored rounded


def test_int4_holds_q4_1_weights_almost_exactly():
    """A weight already on a 4-bit grid per group of 32 (as the packaged model's) survives."""
    from neeko.compiled import _Linear

    gen = torch.Generator().manual_seed(0)
    scale = torch.rand(64, 2, 1, generator=gen) * 0.01
    low = torch.randn(64, 2, 1, generator=gen) * 0.05
    codes = torch.randint(0, 16, (64, 2, 32), generator=gen).float()
    codes[..., 0], codes[..., 1] = 0, 15  # every group spans its grid, as Q4_1 does
    weight = (codes * scale + low).view(64, 64)
    x = torch.randn(3, 64, generator=gen)
    want = x @ weight.T
    got = _Linear(weight, None, "int4")(x)
    assert ((got - want).norm() / want.norm()) < 0.01  # bf16 scales and inputs only


def test_unsupported_models_fall_back_to_eager(tiny, caplog):
    tiny.model.config.model_type = "gpt_neox"
    with caplog.at_level(logging.WARNING, logger="neeko.engine"):
        engine = Engine(tiny, None, decode="compiled")
    assert engine.decoder is None
    assert "decoding eagerly" in caplog.text
    assert type(engine.new_batch()).__name__ == "DecodeBatch"
    with pytest.raises(GenerationError, match="decode"):
        Engine(tiny, None, decode="fast")
    with pytest.raises(GenerationError, match="compiled"):
        Engine(tiny, None, weights="int8")


def test_every_bucket_compiles_a_static_graph(tiny):
    """One graph per (rows, columns) bucket, never one generalised over shapes (slower)."""
    from torch._dynamo.utils import counters

    dec = StaticDecoder(tiny, native=False)  # batch 1 would run the native step

    def step(rows: int, columns: int) -> None:
        keys = torch.zeros(dec.n_layers, rows, dec.n_kv, columns, dec.head_dim)
        tokens, positions = torch.ones(rows, dtype=torch.long), torch.full((rows,), 3)
        dec.step(tokens, positions, keys, torch.zeros_like(keys), None)

    before = counters["stats"]["unique_graphs"]
    shapes = [(1, 256), (2, 256), (1, 512), (2, 512), (4, 768), (1, 256), (4, 768)]
    for rows, columns in shapes:
        step(rows, columns)
    assert counters["stats"]["unique_graphs"] - before == len(set(shapes))


def test_buckets():
    assert [bucket(n) for n in (1, 2, 3, 5, 16, 17, 64, 65, 100)] == [
        1,
        2,
        4,
        8,
        16,
        32,
        64,
        128,
        128,
    ]
    assert [length_bucket(n, 2048) for n in (0, 1, 256, 257, 2047, 5000)] == [
        256,
        256,
        256,
        512,
        2048,
        2048,
    ]
    assert model_lib.context_tokens("tiny") == 2048


def test_a_store_opens_with_the_compiled_step(tiny_store):
    """`open_runtime(decode="compiled")`: the store's characters, compiled, as eager."""
    from neeko.runtime import open_runtime

    eager = open_runtime(tiny_store, "tiny")
    compiled = open_runtime(tiny_store, "tiny", decode="compiled", weights="fp32")
    assert eager.engine.decoder is None
    assert compiled.engine.decoder is not None
    compiled.engine.decoder = StaticDecoder(compiled.loaded, compile=False)
    greedy = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    requests = [
        GenerationRequest([{"role": "user", "content": "hello"}], rt.gate(key), greedy)
        for rt in (eager,)
        for key in [c.key for c in rt.catalog.trained()]
    ]
    want = eager.engine.generate(requests)
    got = compiled.engine.generate(requests)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
