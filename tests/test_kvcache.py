"""Per-channel KV reuse: a follow-up turn prefills only its new tokens, under its own gate."""

import pytest
import torch

from neeko.engine import DecodeBatch, GenerationRequest, SamplingParams, _Row
from neeko.kvcache import PrefixCache, gate_key

GREEDY = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
HISTORY = [
    {"role": "system", "content": "You are a lighthouse keeper on a stormy coast. " * 4},
    {"role": "user", "content": "Ann: Tell me about the storm last night, and the ship."},
]


def _follow_up(reply: str, text: str = "Ann: And what happened to the crew?"):
    return [*HISTORY, {"role": "assistant", "content": reply}, {"role": "user", "content": text}]


def _generate(engine, messages, gate, cache):
    engine.prefix_cache = cache
    return engine.generate([GenerationRequest(messages, gate, GREEDY)])[0]


def test_a_follow_up_prefills_only_its_new_tokens_and_equals_a_full_prefill(engine):
    cache = PrefixCache(64 * 2**20)
    first = _generate(engine, HISTORY, {0: 1.0}, cache)
    assert first.cached_tokens == 0
    assert len(cache) == 1
    messages = _follow_up(first.text)
    reused = _generate(engine, messages, {0: 1.0}, cache)
    full = _generate(engine, messages, {0: 1.0}, None)
    assert reused.cached_tokens >= first.prompt_tokens  # the whole first prompt, at least
    assert reused.cached_tokens < reused.prompt_tokens
    assert reused.token_ids == full.token_ids
    assert cache.hits == 1
    assert len(cache) == 1  # the longer conversation replaced the entry it extends


def test_one_prefix_under_two_gates_is_never_shared(engine):
    cache = PrefixCache(64 * 2**20)
    first = _generate(engine, HISTORY, {0: 1.0}, cache)
    other = _generate(engine, _follow_up(first.text), {1: 1.0}, cache)
    assert other.cached_tokens == 0  # same tokens, another character: a miss
    alone = _generate(engine, _follow_up(first.text), {1: 1.0}, None)
    assert other.token_ids == alone.token_ids
    mix = _generate(engine, _follow_up(first.text), {0: 0.5, 1: 0.5}, cache)
    assert mix.cached_tokens == 0
    assert gate_key({0: 1.0, 1: 0.0}) == gate_key({0: 1.0})  # a zero weight adds nothing
    assert gate_key({1: 0.5, 0: 0.5}) == gate_key({0: 0.5, 1: 0.5})


def test_hits_and_misses_in_one_batch_equal_each_row_alone(engine):
    cache = PrefixCache(64 * 2**20)
    first = _generate(engine, HISTORY, {2: 1.0}, cache)
    requests = [
        GenerationRequest(_follow_up(first.text), {2: 1.0}, GREEDY),  # a hit
        GenerationRequest(HISTORY, {3: 1.0}, GREEDY),  # a miss
        GenerationRequest(_follow_up(first.text, "Ann: Was anyone hurt?"), {2: 1.0}, GREEDY),
        GenerationRequest(HISTORY, None, GREEDY),  # the base model
    ]
    engine.prefix_cache = cache
    batch = DecodeBatch(engine)
    indices = batch.add(requests)
    while batch.step():
        pass
    together = [batch.results[i] for i in indices]
    assert [r.cached_tokens > 0 for r in together] == [True, False, True, False]
    for request, result in zip(requests, together, strict=True):
        engine.prefix_cache = None
        alone = engine.generate([request])[0]
        assert result.token_ids == alone.token_ids


def test_entries_are_evicted_by_bytes_least_recently_used_first():
    def layers(n, value=0.0):
        return [(torch.full((1, 2, n, 4), value), torch.full((1, 2, n, 4), value))] * 3

    per_token = 3 * 2 * 2 * 4 * 4  # layers, keys and values, heads, dims, float32 bytes
    cache = PrefixCache(max_bytes=per_token * 60, min_tokens=4)
    cache.store({0: 1.0}, range(20), layers(20))
    cache.store({1: 1.0}, range(20), layers(20))
    cache.store({2: 1.0}, range(20), layers(20))
    assert cache.nbytes == per_token * 60
    assert cache.lookup({0: 1.0}, range(30)) is not None  # 0 is now the most recent
    cache.store({3: 1.0}, range(20), layers(20))  # over the budget: 1 goes, the oldest
    assert cache.nbytes <= cache.max_bytes
    assert cache.lookup({1: 1.0}, range(30)) is None
    assert cache.lookup({2: 1.0}, range(30)) is not None
    assert cache.lookup({0: 1.0}, range(30)) is not None
    cache.store({4: 1.0}, range(100), layers(100))  # larger than the whole budget: not kept
    assert cache.lookup({4: 1.0}, range(100)) is None
    assert cache.nbytes <= cache.max_bytes


def test_lookups_use_the_longest_common_prefix_and_leave_a_token_to_prefill():
    cache = PrefixCache(2**20, min_tokens=4)
    kv = [(torch.arange(10.0).view(1, 1, 10, 1), torch.arange(10.0).view(1, 1, 10, 1))]
    cache.store({0: 1.0}, range(10), kv)
    hit = cache.lookup({0: 1.0}, [0, 1, 2, 3, 4, 5, 99, 7])
    assert hit.length == 6
    assert hit.layers[0][0].flatten().tolist() == [0, 1, 2, 3, 4, 5]
    assert cache.lookup({0: 1.0}, range(10)).length == 9  # the same prompt: one to prefill
    assert cache.lookup({0: 1.0}, [0, 1, 2, 99]) is None  # shorter than min_tokens
    with pytest.raises(ValueError, match="one key and value per token"):
        cache.store({0: 1.0}, range(5), kv)


def test_incremental_detokenization_equals_decoding_everything(engine):
    """Random tokens, emoji and accents: the text after each token is the full decode's."""
    tok = engine.tokenizer
    rng = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, len(tok), (60,), generator=rng).tolist() for _ in range(20)]
    sequences += [
        tok.encode(t) for t in ("Ahoy 🏴‍☠️ matey — café, naïve… 海賊!", "  two  spaces\n\n")
    ]
    batch = DecodeBatch(engine)
    for ids in sequences:
        row = _Row(0, GenerationRequest([{"role": "user", "content": "x"}]), [1], 0.0)
        for t in ids:
            row.tokens.append(t)
            text = batch._detokenize(row)
            full = tok.decode(row.tokens, skip_special_tokens=True)
            if not full.endswith("\ufffd"):
                assert text == full
