"""The native batch-1 decode step against the reference step it stands in for."""

import copy
import logging

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from neeko import native
from neeko.compiled import StaticDecoder
from neeko.engine import Engine, GenerationRequest, SamplingParams
from neeko.lora import BankConfig, LoRABank
from neeko.model import LoadedModel

# Sizes that are not multiples of the vector width, so every tail loop runs.
ODD = {
    "hidden_size": 72,
    "intermediate_size": 100,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def _model(kind: str, tiny: LoadedModel) -> LoadedModel:
    """The tiny Llama, or a small Qwen2 (q/k/v biases) or Mistral (a sliding window of 8)."""
    if kind == "llama":
        return tiny
    vocab = tiny.model.config.vocab_size
    torch.manual_seed(0)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, **ODD))
        for layer in model.model.layers:  # biases start at zero: make them count
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    else:
        model = MistralForCausalLM(MistralConfig(vocab_size=vocab, sliding_window=8, **ODD))
    return LoadedModel(model.eval().requires_grad_(False), tiny.tokenizer, kind)


def _decoder(
    loaded: LoadedModel, targets: tuple[str, ...], rank: int = 4
) -> tuple[StaticDecoder, LoRABank]:
    bank = LoRABank(loaded.model, BankConfig(rank=rank, targets=targets))
    bank.add_blocks(3, init="random", generator=torch.Generator().manual_seed(3), b_scale=0.5)
    dec = StaticDecoder(loaded, compile=False, native=True)
    assert dec.native is not None
    return dec, bank


@pytest.mark.parametrize(
    ("kind", "rank"), [("llama", 4), ("qwen2", 4), ("mistral", 4), ("llama", 1), ("llama", 8)]
)
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("all-linear",)])
@pytest.mark.parametrize("gate", [None, {1: 1.0}, {0: 0.25, 2: 0.75}])
def test_native_step_equals_the_reference_step(tiny, kind, rank, targets, gate):
    """Logits and new keys/values of one row, at positions before and past a window."""
    dec, bank = _decoder(_model(kind, tiny), targets, rank)
    _check_steps(dec, dec, bank, gate)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("gate", [None, {0: 0.25, 2: 0.75}])
def test_int8_native_step_equals_the_reference_on_the_dequantized_weights(tiny, kind, gate):
    """int8 weights are widened exactly: the step equals fp32 on weight * row scale."""
    q8, dec, bank = _int8_and_dequantized(_model(kind, tiny), ("q_proj", "v_proj"))
    _check_steps(q8, dec, bank, gate)


def _int8_and_dequantized(
    loaded: LoadedModel, targets: tuple[str, ...]
) -> tuple[StaticDecoder, StaticDecoder, LoRABank]:
    """A native int8 step and an fp32 one whose weights are the int8 ones times their scales."""
    dec, bank = _decoder(loaded, targets)
    q8 = StaticDecoder(loaded, weights="int8", compile=False, native=True)
    assert q8.native is not None
    with torch.no_grad():
        for lin8, lin in (
            *(
                (getattr(a, n), getattr(b, n))
                for a, b in zip(q8.layers, dec.layers, strict=True)
                for n in ("qkv", "o", "gate_up", "down")
            ),
            (q8.head, dec.head),
        ):
            assert lin8.weight.dtype == torch.int8
            lin.weight = lin8.weight.float() * lin8.scale.float()[:, None]
    return q8, dec, bank


@pytest.mark.parametrize("head_dim", [16, 18, 64, 128])
@pytest.mark.parametrize("spread", [1.0, 40.0])
def test_native_attention_over_long_contexts(tiny, head_dim, spread):
    """Hundreds of columns (split over the threads, exponentials a vector at a time, with
    tails), head sizes the step specialises (64, 128) and others; with `spread` 40 most
    attention weights underflow to zero."""
    config = LlamaConfig(
        vocab_size=tiny.model.config.vocab_size,
        hidden_size=4 * head_dim,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    dec, bank = _decoder(LoadedModel(model, tiny.tokenizer, "llama"), ("q_proj", "v_proj"))
    _check_steps(dec, dec, bank, {0: 0.5, 1: 0.5}, columns=300, spread=spread)


def _check_steps(
    dec: StaticDecoder,
    ref: StaticDecoder,
    bank: LoRABank,
    gate,
    columns: int = 32,
    spread: float = 1.0,
) -> None:
    """`dec.native` against `ref._forward` for one row in slot 0 of a 3-slot cache.

    Keys are drawn with standard deviation `spread`.
    """
    gen = torch.Generator().manual_seed(1)
    slots = 3  # the row is slot 0 of a wider cache, as in a running batch
    shape = (dec.n_layers, slots, dec.n_kv, columns, dec.head_dim)
    keys = torch.randn(shape, generator=gen) * spread
    values = torch.randn(shape, generator=gen)
    lora = None if gate is None else dec.lora_inputs(bank.routing([gate], path="gathered"), 1)
    positions_checked = (0, 1, 7, 20, 33, 130, 255, columns - 1) if columns > 32 else ()
    for position in positions_checked or (0, 1, 7, 20, columns - 1):
        tokens, positions = torch.tensor([17 + position]), torch.tensor([position])
        cos, sin = (t[: columns + 1] for t in dec.rope(columns + 1))
        args = (tokens, positions, keys[:, :1], values[:, :1], cos, sin)
        with torch.inference_mode():
            got = dec.native(*args, lora)
            a, b, w = (lora.a, lora.b, lora.w) if lora is not None else ((), (), None)
            want = ref._forward(*args, a, b, w)
        for g, x in zip(got, want, strict=True):
            assert g.shape == x.shape
            assert torch.allclose(g, x, atol=2e-5, rtol=1e-4), (position, (g - x).abs().max())


def test_engine_tokens_with_and_without_the_native_step(tiny):
    """Greedy replies of single rows (a character, a mix, the base model) are the same."""
    replies = []
    for use in (False, True):
        loaded = LoadedModel(copy.deepcopy(tiny.model), tiny.tokenizer, tiny.name)
        bank = LoRABank(loaded.model)
        bank.add_blocks(3, init="random", generator=torch.Generator().manual_seed(7), b_scale=0.5)
        engine = Engine(loaded, bank, decode="compiled")
        engine.decoder = StaticDecoder(loaded, compile=False, native=use)
        assert (engine.decoder.native is not None) == use
        greedy = SamplingParams(max_new_tokens=300, temperature=0, ignore_eos=True)
        replies.append(
            [
                engine.generate(
                    [GenerationRequest([{"role": "user", "content": "sea"}], g, greedy)]
                )
                for g in ({0: 1.0}, {1: 0.5, 2: 0.5}, None)
            ]
        )
    tokens = [[r[0].token_ids for r in run] for run in replies]
    assert tokens[0] == tokens[1]
    assert all(len(t) == 300 for t in tokens[1])  # past the first length bucket (256)


def test_without_a_compiler_the_graph_runs(tiny, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="neeko.native"):
            dec = StaticDecoder(tiny, compile=False, native=True)
        assert dec.native is None
        assert "native decode step unavailable" in caplog.text
    finally:
        native.library.cache_clear()


def test_auto_decode_is_the_native_step_where_it_runs_else_eager(tiny, monkeypatch):
    """`decode="auto"`: native on the CPU; eager without a compiler or for a model the native
    step does not reproduce (never a graph to compile); lower precision always compiles."""
    engine = Engine(tiny, None, decode="auto")
    assert engine.decoder is not None
    assert engine.decoder.native is not None
    assert Engine(tiny, None, decode="auto", weights="int4").decoder is not None
    gelu = copy.deepcopy(tiny.model)
    gelu.config.hidden_act = "gelu"
    assert Engine(LoadedModel(gelu, tiny.tokenizer, "tiny"), None, decode="auto").decoder is None
    monkeypatch.setenv("NEEKO_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert Engine(tiny, None, decode="auto").decoder is None
    finally:
        native.library.cache_clear()


@pytest.mark.parametrize("weights", ["bf16", "int4"])
def test_other_lower_precision_weights_keep_the_graph(tiny, weights):
    assert StaticDecoder(tiny, weights=weights, compile=False, native=True).native is None


def test_the_floor_reader_reads_every_float_once():
    lib = native.library()
    assert lib is not None
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.rand(n, generator=gen) for n in (1, 31, 4096, 4097, 10_000)]
    want = sum(float(t.double().sum()) for t in tensors)
    assert native.reader(tensors, lib)() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="contiguous fp32"):
        native.reader([torch.ones(4, 4).t()], lib)


@pytest.mark.parametrize(
    ("use_native", "rows"), [(True, 1), (True, 2), (True, 3), (False, 1), (False, 3)]
)
def test_step_stores_the_new_keys_and_values_only_when_asked(tiny, use_native, rows):
    """With `write` the cache gains exactly the returned keys/values at each row's position."""
    dec = StaticDecoder(tiny, compile=False, native=use_native)
    assert (dec.native is not None) == use_native
    gen = torch.Generator().manual_seed(2)
    shape = (dec.n_layers, rows, dec.n_kv, 16, dec.head_dim)
    keys, values = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    tokens, positions = torch.tensor([5, 6, 7][:rows]), torch.tensor([9, 0, 15][:rows])
    want_k, want_v = keys.clone(), values.clone()
    with torch.inference_mode():
        _, new_k, new_v = dec.step(tokens, positions, keys, values, None)
        assert torch.equal(keys, want_k)
        assert torch.equal(values, want_v)
        _, new_k, new_v = dec.step(tokens, positions, keys, values, None, write=True)
    assert not torch.equal(keys, want_k)
    for r, p in enumerate(positions.tolist()):
        want_k[:, r, :, p], want_v[:, r, :, p] = new_k[:, r], new_v[:, r]
    assert torch.equal(keys, want_k)
    assert torch.equal(values, want_v)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("all-linear",)])
@pytest.mark.parametrize(("rows", "live"), [(2, 2), (5, 4), (16, 9), (16, 16), (19, 19)])
def test_native_batch_step_equals_the_reference_step(tiny, kind, targets, rows, live):
    """Each live row of a batch of different characters at different positions, as the
    reference computes it (8- and 16-lane products, several chunks of rows, padding rows)."""
    dec, bank = _decoder(_model(kind, tiny), targets)
    _check_batch(dec, dec, bank, rows, live)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize(("rows", "live"), [(4, 3), (16, 16), (19, 19)])
def test_int8_native_batch_step_equals_the_reference_on_the_dequantized_weights(
    tiny, kind, rows, live
):
    q8, dec, bank = _int8_and_dequantized(_model(kind, tiny), ("q_proj", "v_proj"))
    _check_batch(q8, dec, bank, rows, live)


def _check_batch(
    dec: StaticDecoder, ref: StaticDecoder, bank: LoRABank, rows: int, live: int
) -> None:
    """`dec.native.batch` against `ref._forward`: outputs of the live rows, the cache after."""
    assert dec.native is not None
    gen = torch.Generator().manual_seed(4)
    columns = 40
    shape = (dec.n_layers, rows + 1, dec.n_kv, columns, dec.head_dim)  # one slot to spare
    keys, values = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    choices = [None, {1: 1.0}, {0: 0.25, 2: 0.75}, {2: 1.0}]
    gates = [choices[r % len(choices)] for r in range(live)] + [None] * (rows - live)
    lora = dec.lora_inputs(bank.routing(gates, path="gathered"), rows)
    tokens = torch.randint(0, dec.embed.shape[0], (rows,), generator=gen)
    positions = torch.randint(0, columns, (rows,), generator=gen)
    positions[0] = columns - 1
    cos, sin = (t[: columns + 1] for t in dec.rope(columns + 1))
    args = (tokens, positions, keys[:, :rows], values[:, :rows], cos, sin)
    before_k, before_v = keys.clone(), values.clone()
    with torch.inference_mode():
        got = dec.native.batch(*args, lora, write=True, live=live)
        want = ref._forward(*args, lora.a, lora.b, lora.w)
    for g, x in zip(got, want, strict=True):
        assert g.shape == x.shape
        g, x = (g[:live], x[:live]) if g.dim() == 2 else (g[:, :live], x[:, :live])
        assert torch.allclose(g, x, atol=2e-5, rtol=1e-4), (g - x).abs().max()
    assert not got[0][live:].any()  # padding rows are not computed ...
    for r in range(rows + 1):  # ... nor written: each live row writes its own column only
        want_k, want_v = before_k[:, r].clone(), before_v[:, r].clone()
        if r < live:
            p = int(positions[r])
            want_k[:, :, p], want_v[:, :, p] = got[1][:, r], got[2][:, r]
        assert torch.equal(keys[:, r], want_k), r
        assert torch.equal(values[:, r], want_v), r


@pytest.mark.parametrize("rows", [1, 3])
def test_out_of_range_tokens_and_positions_never_reach_the_c_step(tiny, rows):
    dec = StaticDecoder(tiny, compile=False, native=True)
    keys = torch.zeros(dec.n_layers, rows, dec.n_kv, 16, dec.head_dim)
    vocab = dec.embed.shape[0]
    for token, position in ((vocab, 3), (-1, 3), (5, 16), (5, -1)):
        tokens, positions = torch.full((rows,), 5), torch.full((rows,), 3)
        tokens[-1], positions[-1] = token, position
        with pytest.raises(ValueError, match="out of range"):
            dec.step(tokens, positions, keys, torch.zeros_like(keys), None)
