"""Batched generation: rows are independent of their batch, stop on their own, stream exactly."""

import pytest
import torch

from neeko import model as neeko_model
from neeko.engine import DecodeBatch, Engine, GenerationRequest, SamplingParams
from neeko.errors import GateError, GenerationError
from neeko.lora import BankConfig

SHORT = "Hi"
MEDIUM = "Who are you, and where do you come from?"
LONG = "Tell me a long story about a dragon and a knight who slowly become friends over many years."


# Rows must not depend on their batch mates whichever way the bank computes the block sum.
both_paths = pytest.mark.parametrize(
    "bank",
    [BankConfig(path="gathered"), BankConfig(path="dense")],
    ids=["gathered", "dense"],
    indirect=True,
)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def greedy(n: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def alone(engine: Engine, request: GenerationRequest) -> list[int]:
    (result,) = engine.generate([request])
    return result.token_ids


def run(batch: DecodeBatch) -> None:
    while batch.step():
        pass


@both_paths
def test_mixed_batch_rows_equal_rows_alone(bank, engine):
    requests = [
        GenerationRequest(user(SHORT), gate={0: 1.0}, sampling=greedy()),
        GenerationRequest(user(LONG), gate={1: 0.5, 3: 0.3, 5: 0.2}, sampling=greedy()),
        GenerationRequest(user(MEDIUM), gate=None, sampling=greedy()),
        GenerationRequest(user(SHORT), gate={2: 1.0}, sampling=greedy()),
    ]
    assert len({len(engine.render(r.messages)) for r in requests}) == 3  # left padding happens
    results = engine.generate(requests)
    for i, (req, res) in enumerate(zip(requests, results, strict=True)):
        assert res.token_ids == alone(engine, req), f"row {i}"
        assert len(res.token_ids) == 12
    assert results[0].token_ids != results[3].token_ids  # the gate matters
    base = Engine(neeko_model.load("tiny", device="cpu"))  # the zero gate is the base model
    assert results[2].token_ids == alone(base, requests[2])


@both_paths
def test_rows_stop_independently_and_come_back_in_order(bank, engine):
    lengths = [9, 1, 5, 3]
    texts = [MEDIUM, SHORT, LONG, SHORT]
    requests = [
        GenerationRequest(user(t), gate={i: 1.0}, sampling=greedy(n))
        for i, (t, n) in enumerate(zip(texts, lengths, strict=True))
    ]
    results = engine.generate(requests)
    assert [r.completion_tokens for r in results] == lengths
    assert [len(r.token_ids) for r in results] == lengths
    assert [r.finish_reason for r in results] == ["length"] * 4
    assert [r.prompt_tokens for r in results] == [len(engine.render(user(t))) for t in texts]
    for req, res in zip(requests, results, strict=True):
        assert res.token_ids == alone(engine, req)
        assert 0 < res.ttft_s <= res.total_s
        assert res.text == engine.tokenizer.decode(res.token_ids, skip_special_tokens=True)


@both_paths
@pytest.mark.parametrize(
    "gates",
    [
        [{2: 1.0}, {2: 0.5}, None],  # the one left has the batch's only gate left
        [{1: 0.5, 3: 0.5}, {1: 0.5, 3: 0.5}, {4: 1.0}],
        [None, {0: 1.0}, {0: 1.0}],
    ],
)
def test_rows_leaving_do_not_change_the_rows_left(bank, engine, gates):
    lengths = [12, 3, 6]
    requests = [
        GenerationRequest(user(t), gate=g, sampling=greedy(n))
        for t, g, n in zip([MEDIUM, SHORT, LONG], gates, lengths, strict=True)
    ]
    results = engine.generate(requests)
    for i, (req, res) in enumerate(zip(requests, results, strict=True)):
        assert res.token_ids == alone(engine, req), f"row {i}"


def test_eos_ends_a_row_and_is_not_returned(engine):
    request = GenerationRequest(user(MEDIUM), gate={1: 1.0}, sampling=greedy(12))
    tokens = alone(engine, request)
    cut = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    engine.eos_ids = {tokens[cut]}  # pretend the model's cut-th token is end-of-turn
    stopping = SamplingParams(max_new_tokens=12, temperature=0.0)
    (result,) = engine.generate([GenerationRequest(user(MEDIUM), gate={1: 1.0}, sampling=stopping)])
    assert result.token_ids == tokens[:cut]
    assert result.finish_reason == "eos"
    assert alone(engine, request) == tokens  # ignore_eos keeps going


def _generate_streamed(engine: Engine, stop: tuple[str, ...]):
    pieces: list[str] = []
    request = GenerationRequest(
        user(MEDIUM), gate={0: 0.6, 4: 0.4}, sampling=greedy(20, stop=stop), on_text=pieces.append
    )
    (result,) = engine.generate([request])
    return result, pieces


def test_streaming_without_stop_concatenates_to_text(engine):
    result, pieces = _generate_streamed(engine, ())
    assert len(pieces) > 1
    assert "".join(pieces) == result.text
    assert result.finish_reason == "length"


@pytest.mark.parametrize("start", [3, 10, 25])
def test_stop_string_truncates_text_and_stream(engine, start):
    full, _ = _generate_streamed(engine, ())
    stop = full.text[start : start + 4]
    cut = full.text.find(stop)
    assert cut > 0  # the stop string occurs after the start of the reply
    result, pieces = _generate_streamed(engine, (stop,))
    assert result.text == full.text[:cut]
    assert result.finish_reason == "stop"
    assert result.token_ids == full.token_ids[: len(result.token_ids)]
    assert len(result.token_ids) < len(full.token_ids)
    assert "".join(pieces) == result.text


def test_stop_string_prefix_that_never_completes_is_streamed(engine):
    """A held-back partial match of a stop string is released when the match fails."""
    full, _ = _generate_streamed(engine, ())
    result, pieces = _generate_streamed(engine, (full.text[5:9] + "\x00",))
    assert result.text == full.text
    assert result.finish_reason == "length"
    assert "".join(pieces) == full.text


class ScriptedEngine(Engine):
    """An engine whose forward always favours the next token of a fixed reply."""

    def __init__(self, loaded, reply: str) -> None:
        super().__init__(loaded)
        self.script = self.tokenizer.encode(reply, add_special_tokens=False)
        self.calls = 0

    def forward(self, routing, **inputs) -> torch.Tensor:
        logits = torch.zeros(inputs["input_ids"].shape[0], self.model.config.vocab_size)
        logits[:, self.script[self.calls]] = 1.0
        self.calls += 1
        return logits


def _scripted(tiny, reply: str, stop: tuple[str, ...] = ()):
    engine = ScriptedEngine(tiny, reply)
    pieces: list[str] = []
    sampling = greedy(len(engine.script), stop=stop)
    (result,) = engine.generate(
        [GenerationRequest(user(SHORT), sampling=sampling, on_text=pieces.append)]
    )
    return engine, result, pieces


def test_streaming_never_emits_half_a_character(tiny):
    reply = "Hello world! 😀 é, 🐉 and more"
    engine, result, pieces = _scripted(tiny, reply)
    assert any(engine.tokenizer.decode([t]).endswith("\ufffd") for t in engine.script)
    assert result.text == reply
    assert "".join(pieces) == reply
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize(
    ("stop", "text"),
    [
        ((" world!",), "Hello"),  # spans two tokens
        (("orld", "llo"), "He"),  # the earliest match wins, whatever the list order
        (("Bye", "!"), "Hello world"),
    ],
)
def test_stop_string_across_tokens_is_never_streamed(tiny, stop, text):
    engine, result, pieces = _scripted(tiny, "Hello world! Bye now", stop)
    assert result.text == text
    assert result.finish_reason == "stop"
    assert "".join(pieces) == text
    assert engine.tokenizer.decode(result.token_ids).startswith(text)


@both_paths
@pytest.mark.parametrize("joiner", [SHORT, LONG])
def test_continuous_batching_add_between_steps(bank, engine, joiner):
    first = GenerationRequest(user(MEDIUM), gate={0: 1.0}, sampling=greedy(10))
    second = GenerationRequest(user(joiner), gate={2: 0.7, 3: 0.3}, sampling=greedy(8))
    batch = DecodeBatch(engine)
    assert batch.add([first]) == [0]
    for _ in range(3):
        assert batch.step()
    assert batch.add([second]) == [1]
    assert len(batch) == 2
    run(batch)
    assert len(batch) == 0
    assert batch.results[0].token_ids == alone(engine, first)
    assert batch.results[1].token_ids == alone(engine, second)


@both_paths
def test_continuous_batching_add_after_rows_finished(bank, engine):
    quick = GenerationRequest(user(SHORT), gate={1: 1.0}, sampling=greedy(2))
    slow = GenerationRequest(user(LONG), gate=None, sampling=greedy(14))
    late = GenerationRequest(user(MEDIUM), gate={4: 1.0}, sampling=greedy(6))
    last = GenerationRequest(user(SHORT), gate={5: 1.0}, sampling=greedy(3))
    batch = DecodeBatch(engine)
    assert batch.add([quick, slow]) == [0, 1]
    while 0 not in batch.results:
        assert batch.step()
    assert len(batch) == 1
    assert batch.add([late]) == [2]
    run(batch)
    assert batch.add([last]) == [3]  # into an empty batch
    run(batch)
    for i, req in enumerate([quick, slow, late, last]):
        assert batch.results[i].token_ids == alone(engine, req), f"row {i}"


def test_same_seed_same_sample(engine):
    def sample(seed: int) -> list[int]:
        params = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=seed)
        return alone(engine, GenerationRequest(user(MEDIUM), gate={0: 1.0}, sampling=params))

    assert sample(123) == sample(123)
    assert sample(123) != sample(124)


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "bot", "content": "hi"}],
        [{"role": "user"}],
        [{"role": "user", "content": 5}],
    ],
    ids=["empty", "bad role", "no content", "content not str"],
)
def test_bad_messages_raise(engine, messages):
    with pytest.raises(GenerationError, match="message"):
        engine.generate([GenerationRequest(messages)])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_bad_sampling_params_raise(kwargs, message):
    with pytest.raises(GenerationError, match=message):
        SamplingParams(**kwargs)


def test_prompt_plus_new_tokens_over_context_raises(engine):
    n = engine.max_positions - len(engine.render(user(MEDIUM))) + 1
    with pytest.raises(GenerationError, match="exceeds"):
        engine.generate([GenerationRequest(user(MEDIUM), sampling=greedy(n))])
    (ok,) = engine.generate([GenerationRequest(user(MEDIUM), sampling=greedy(1))])
    assert ok.completion_tokens == 1


def test_gate_without_bank_raises(tiny):
    engine = Engine(tiny)
    with pytest.raises(GenerationError, match="no block bank"):
        engine.generate([GenerationRequest(user(SHORT), gate={0: 1.0}, sampling=greedy(2))])
    (ok,) = engine.generate([GenerationRequest(user(SHORT), gate=None, sampling=greedy(2))])
    assert ok.completion_tokens == 2


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (GenerationRequest([], sampling=greedy(2)), GenerationError),
        (GenerationRequest(user(SHORT), gate={9: 1.0}, sampling=greedy(2)), GateError),
        (GenerationRequest(user(SHORT), sampling=greedy(5000)), GenerationError),
    ],
    ids=["empty messages", "missing block", "too long"],
)
def test_failed_add_leaves_running_batch_intact(engine, bad, error):
    running = GenerationRequest(user(MEDIUM), gate={3: 1.0}, sampling=greedy(8))
    batch = DecodeBatch(engine)
    batch.add([running])
    batch.step()
    with pytest.raises(error):
        batch.add([running, bad])
    assert len(batch) == 1
    run(batch)
    assert batch.results[0].token_ids == alone(engine, running)
    assert list(batch.results) == [0]
    assert batch.add([GenerationRequest(user(SHORT), sampling=greedy(1))]) == [1]


def test_no_requests_is_no_work(engine):
    assert engine.generate([]) == []


def test_greedy_pick_matches_torch_on_ties_and_nan():
    """The CPU greedy pick is torch's argmax: first of equal maxima, NaN as the maximum."""
    from neeko.engine import _argmax

    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    logits[1, 40] = logits[1, 8] = 1e9  # a tie: the first wins
    logits[2, 250] = float("nan")
    logits[3] = float("-inf")
    picked = _argmax(logits[:, ::2])  # a strided view is read as it is
    assert picked.dtype == torch.int64
    assert picked.tolist() == logits[:, ::2].argmax(dim=-1).tolist()
    assert picked[1] == 4
    assert picked[2] == 125
