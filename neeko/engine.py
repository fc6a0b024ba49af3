"""Batched generation over one base model and its block bank.

One batch may mix rows of different characters (and of the zero gate, the base model).
Rows are left-padded, share one KV cache, carry their own positions, sampling settings and
random generator, and stop independently: a finished row leaves the batch at once and its
KV rows are dropped. `DecodeBatch.add` may be called between decode steps: the new rows are
prefilled on their own and their KV cache is merged (left-padded) into the running one, so a
worker can do continuous batching.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import DynamicCache

from neeko import native as native_lib
from neeko.compiled import (
    LoRAInputs,
    StaticDecoder,
    UnsupportedModel,
    WeightDtype,
    bucket,
    length_bucket,
)
from neeko.errors import GenerationError
from neeko.kvcache import Hit, PrefixCache
from neeko.lora import Gate, LoRABank, LoRAPath, Routing
from neeko.model import LoadedModel

FinishReason = Literal["eos", "stop", "length"]
DecodeMode = Literal["eager", "compiled", "auto"]
"""`auto`: with fp32 weights, compiled where the native step runs (the CPU, a C compiler,
a model it reproduces), else eager; lower-precision weights always compile (they need it)."""
ROLES = ("system", "user", "assistant")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """How one row picks its tokens."""

    max_new_tokens: int = 256
    """Upper bound on generated tokens."""
    temperature: float = 0.7
    """Softmax temperature; 0 means greedy."""
    top_p: float = 0.9
    """Nucleus sampling mass, in (0, 1]."""
    seed: int | None = None
    """Seed of this row's generator; None draws a fresh one."""
    stop: tuple[str, ...] = ()
    """Strings that end the reply (not included in it)."""
    ignore_eos: bool = False
    """Keep going past end-of-turn tokens (benchmarks)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationError("stop strings must be non-empty strings")


@dataclass
class GenerationRequest:
    """One row: chat messages, the block gate to apply, and sampling settings."""

    messages: Sequence[Mapping[str, str]]
    gate: Gate | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    on_text: Callable[[str], None] | None = None
    """Called with each new piece of reply text as it becomes final (streaming)."""
    adapter: str | None = None
    """Name of an external adapter, for engines that route by name (benchmarks)."""


@dataclass
class GenerationResult:
    """The reply of one row, with its token counts and timings."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    """Seconds from admission to the first token."""
    total_s: float
    """Seconds from admission to the last token."""
    cached_tokens: int = 0
    """Prompt tokens not prefilled: their keys and values came from the prefix cache."""


class _Row:
    """Mutable state of one request inside a DecodeBatch."""

    def __init__(
        self, index: int, request: GenerationRequest, prompt: list[int], t0: float
    ) -> None:
        self.index, self.request, self.prompt = index, request, prompt
        self.sampling = request.sampling
        self.tokens: list[int] = []
        self.sent = ""
        self.text = ""
        self.stable = ""  # the text of tokens[:read_at], final
        self.prefix_at = self.read_at = 0
        self.finish: FinishReason | None = None
        self.t0 = t0  # when the request was handed to the batch (before tokenizing)
        self.cached = 0
        """Prompt tokens whose keys and values came from the prefix cache."""
        self.t_first = self.t_last = 0.0
        seed = self.sampling.seed
        self.generator = torch.Generator().manual_seed(
            seed if seed is not None else int(torch.randint(0, 2**62, ()).item())
        )

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.text,
            token_ids=list(self.tokens),
            finish_reason=self.finish or "length",
            prompt_tokens=len(self.prompt),
            completion_tokens=len(self.tokens),
            cached_tokens=self.cached,
            ttft_s=self.t_first - self.t0,
            total_s=self.t_last - self.t0,
        )


class Engine:
    """Runs generation requests on a base model with an optional block bank."""

    def __init__(
        self,
        loaded: LoadedModel,
        bank: LoRABank | None = None,
        path: LoRAPath | None = None,
        decode: DecodeMode = "eager",
        weights: WeightDtype = "fp32",
    ) -> None:
        """Serve `loaded` (model + tokenizer) with `bank`, the block bank wrapped into it.

        `path` overrides the bank's way of computing the gated sum (see BankConfig.path).
        `decode="compiled"` decodes with `neeko.compiled.StaticDecoder` (its weights stored
        as `weights`); a model it cannot reproduce falls back to eager, with a warning.
        `decode="auto"` does so only where the native step runs (see `DecodeMode`), so that
        no step waits for a graph to compile and CUDA keeps the eager path.
        """
        self.loaded = loaded
        self.path = path
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.bank = bank
        self.device = loaded.device
        config_eos = self.model.generation_config.eos_token_id
        eos = config_eos if isinstance(config_eos, list) else [config_eos]
        self.eos_ids = {i for i in [*eos, self.tokenizer.eos_token_id] if i is not None}
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = next(iter(self.eos_ids), 0)
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.prefix_cache: PrefixCache | None = None
        """Set to reuse conversations' KV caches across turns (`neeko.kvcache`)."""
        self.decoder: StaticDecoder | None = None
        """The compiled decode step, when `decode="compiled"`."""
        if decode not in ("eager", "compiled", "auto"):
            raise GenerationError(f"decode must be eager, compiled or auto, got {decode!r}")
        if decode == "auto" and weights == "fp32":
            if loaded.device.type == "cpu" and native_lib.library() is not None:
                try:
                    decoder = StaticDecoder(loaded, weights)
                except UnsupportedModel:
                    decoder = None
                if decoder is not None and decoder.native is not None:
                    self.decoder = decoder
        elif decode in ("compiled", "auto"):
            try:
                self.decoder = StaticDecoder(loaded, weights)
            except UnsupportedModel as exc:
                log.warning("%s; decoding eagerly", exc)
        elif weights != "fp32":
            raise GenerationError("lower-precision weights need decode='compiled'")

    def new_batch(self) -> DecodeBatch:
        """An empty batch for this engine's decode path."""
        return StaticDecodeBatch(self) if self.decoder is not None else DecodeBatch(self)

    def render(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of `messages` in the model's chat template, ready for the reply."""
        if not messages:
            raise GenerationError("a request needs at least one message")
        for i, m in enumerate(messages):
            if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise GenerationError(
                    f"message {i} must have role in {ROLES} and string content, got {dict(m)!r}"
                )
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                msgs, add_generation_prompt=True, tokenize=False
            )
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"
        return self.tokenizer.encode(text, add_special_tokens=False)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run all requests as one batch; results come back in request order."""
        if not requests:
            return []
        batch = self.new_batch()
        batch.add(requests)
        while batch.step():
            pass
        return [batch.results[i] for i in range(len(requests))]

    # Hooks a subclass may override to route rows another way (e.g. PEFT adapter names).

    def make_routing(self, rows: Sequence[_Row]) -> Routing | None:
        """Routing for `rows` (None when the batch uses no block)."""
        if self.bank is None:
            if any(r.request.gate for r in rows):
                raise GenerationError("this engine has no block bank, so gates must be empty")
            return None
        return self.bank.routing([r.request.gate for r in rows], path=self.path)

    def select_routing(self, routing: Any, keep: Tensor, rows: Sequence[_Row]) -> Any:
        """Routing for the rows kept by `keep` (indices into the current batch)."""
        return None if routing is None else routing.select_rows(keep)

    def merge_routing(self, old: Any, new: Any, rows: Sequence[_Row]) -> Any:
        """Routing for the concatenation of two batches' rows."""
        return self.make_routing(rows)

    def forward(self, routing: Any, **inputs: Any) -> Tensor:
        """Last-position logits (batch, vocab) for `inputs` under `routing`."""
        if routing is None or self.bank is None:
            return self.model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1]
        with self.bank.route(routing):
            return self.model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1]


class DecodeBatch:
    """Rows decoding together: one shared KV cache, rows join and leave between steps."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.rows: list[_Row] = []
        self.results: dict[int, GenerationResult] = {}
        self.cache: DynamicCache | None = None
        self.mask: Tensor | None = None  # (batch, kv_len) 1 = real token
        self.positions: Tensor | None = None  # (batch,) position of the pending token
        self.pending: Tensor | None = None  # (batch,) sampled token not yet in the cache
        self.routing: Any = None
        self._next_index = 0

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def add(self, requests: Sequence[GenerationRequest]) -> list[int]:
        """Prefill `requests` and merge them into the batch; returns their result indices."""
        eng = self.engine
        if not requests:
            return []
        t0 = time.perf_counter()
        prompts = [eng.render(r.messages) for r in requests]
        for r, p in zip(requests, prompts, strict=True):
            if len(p) + r.sampling.max_new_tokens > eng.max_positions:
                raise GenerationError(
                    f"prompt of {len(p)} tokens + {r.sampling.max_new_tokens} new tokens exceeds "
                    f"the model's {eng.max_positions} positions"
                )
        rows = [
            _Row(self._next_index + i, r, p, t0)
            for i, (r, p) in enumerate(zip(requests, prompts, strict=True))
        ]
        routing = eng.make_routing(rows)  # checks gates before any state changes
        self._next_index += len(rows)
        cache = eng.prefix_cache
        hits = [
            cache.lookup(r.gate, p) if cache else None
            for r, p in zip(requests, prompts, strict=True)
        ]
        fresh = [i for i, hit in enumerate(hits) if hit is None]
        groups: list[tuple[list[int], Hit | None]] = [(fresh, None)] if fresh else []
        groups += [([i], hit) for i, hit in enumerate(hits) if hit is not None]
        for members, hit in groups:
            part = [rows[i] for i in members]
            sub = routing if len(members) == len(rows) else _select(eng, routing, members, part)
            self._prefill(part, sub, hit)
        return [r.index for r in rows]

    def _prefill(self, rows: list[_Row], routing: Any, hit: Hit | None) -> None:
        """Prefill `rows` together (or one row after its cached prefix) and merge them in."""
        eng = self.engine
        start = hit.length if hit is not None else 0
        width = max(len(r.prompt) for r in rows) - start
        ids = torch.full((len(rows), width), eng.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width + start), dtype=torch.long)
        for i, r in enumerate(rows):
            new = r.prompt[start:]
            ids[i, width - len(new) :] = torch.tensor(new)
            mask[i, width + start - len(r.prompt) :] = 1
        ids, mask = ids.to(eng.device), mask.to(eng.device)
        cache = DynamicCache()
        if hit is not None:
            for layer, (k, v) in enumerate(hit.layers):
                cache.update(k.to(eng.device), v.to(eng.device), layer)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, start:]
        logits = eng.forward(
            routing,
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
        )
        for r in rows:
            r.cached = start
        pending = self._sample(logits, rows)
        keep = self._record(rows, pending.tolist())
        if len(keep) < len(rows):
            idx = torch.tensor(keep, dtype=torch.long, device=eng.device)
            cache.batch_select_indices(idx)
            rows = [rows[i] for i in keep]
            mask, positions, pending = mask[idx], positions[idx], pending[idx]
            routing = eng.select_routing(routing, idx, rows) if rows else None
        if rows:
            self._merge(rows, cache, mask, positions[:, -1] + 1, pending, routing)

    @torch.inference_mode()
    def step(self) -> bool:
        """Decode one token for every row; returns whether any row is still running."""
        if not self.rows:
            return False
        assert self.mask is not None
        assert self.positions is not None
        assert self.pending is not None
        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        logits = self.engine.forward(
            self.routing,
            input_ids=self.pending[:, None],
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            cache=self.cache,
        )
        return self._advance(logits)

    def _advance(self, logits: Tensor) -> bool:
        """Sample each row's next token from `logits`, then let finished rows go."""
        assert self.positions is not None
        n = len(self.rows)
        self.positions = self.positions + 1
        self.pending = self._sample(logits[:n], self.rows)
        keep = self._record(self.rows, self.pending.tolist())
        if len(keep) < n:
            self._remember([i for i in range(n) if i not in set(keep)])
            self._keep(keep)
        return bool(self.rows)

    def _remember(self, done: list[int]) -> None:
        """Keep the KV cache of finished rows for their conversation's next turn."""
        cache = self.engine.prefix_cache
        if cache is None:
            return
        for i in done:
            row = self.rows[i]
            layers = self._row_kv(i)
            fed = (row.prompt + row.tokens)[: layers[0][0].shape[2]]
            cache.store(row.request.gate, fed, layers)

    def _row_kv(self, i: int) -> list[tuple[Tensor, Tensor]]:
        """Row i's keys and values, (1, kv_heads, tokens, head_dim) per layer, padding out."""
        assert self.cache is not None
        assert self.mask is not None
        real = self.mask[i].nonzero().squeeze(-1)
        return [
            (layer.keys[i : i + 1, :, real], layer.values[i : i + 1, :, real])
            for layer in self.cache.layers
        ]

    # -- internals ---------------------------------------------------------------------

    def _sample(self, logits: Tensor, rows: Sequence[_Row]) -> Tensor:
        logits = logits.float()
        out = _argmax(logits)
        for i, row in enumerate(rows):
            s = row.sampling
            if s.temperature == 0:
                continue
            probs = torch.softmax(logits[i] / s.temperature, dim=-1).cpu()
            if s.top_p < 1:
                sorted_p, order = probs.sort(descending=True)
                drop = sorted_p.cumsum(0) - sorted_p > s.top_p
                probs[order[drop]] = 0
            out[i] = torch.multinomial(probs, 1, generator=row.generator).item()
        return out

    def _record(self, rows: Sequence[_Row], tokens: list[int]) -> list[int]:
        """Record each row's new token and stream its text; returns the rows still running."""
        eos = self.engine.eos_ids
        now = time.perf_counter()
        keep = []
        for i, (row, tok) in enumerate(zip(rows, tokens, strict=True)):
            if not row.tokens and row.t_first == 0.0:
                row.t_first = now
            row.t_last = now
            if tok in eos and not row.sampling.ignore_eos:
                row.finish = "eos"
            else:
                row.tokens.append(tok)
                self._update_text(row)
                if row.finish is None and len(row.tokens) >= row.sampling.max_new_tokens:
                    row.finish = "length"
            if row.finish is None:
                keep.append(i)
            else:
                self._flush(row, final=True)
                self.results[row.index] = row.result()
        return keep

    def _update_text(self, row: _Row) -> None:
        text = self._detokenize(row)
        for stop in row.sampling.stop:
            at = text.find(stop, max(0, len(row.sent) - len(stop)))
            if at >= 0:
                text, row.finish = text[:at], "stop"
        row.text = text
        if row.finish is None:
            self._flush(row, final=False)

    def _detokenize(self, row: _Row) -> str:
        """The reply text so far, decoding only the newest tokens (not the whole reply).

        The text of tokens[read:] is what decoding tokens[prefix:] adds to decoding
        tokens[prefix:read]: the chunk before gives the tokenizer its context (a leading
        space, the rest of a multi-byte character). Text that ends in an incomplete
        character is not final: the same tokens are decoded again with the next one.
        """
        decode = self.engine.tokenizer.decode
        prefix = decode(row.tokens[row.prefix_at : row.read_at], skip_special_tokens=True)
        full = decode(row.tokens[row.prefix_at :], skip_special_tokens=True)
        if not full.startswith(prefix):  # a tokenizer that rewrites context: decode it all
            return decode(row.tokens, skip_special_tokens=True)
        text = row.stable + full[len(prefix) :]
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            row.stable, row.prefix_at, row.read_at = text, row.read_at, len(row.tokens)
        return text

    def _flush(self, row: _Row, final: bool) -> None:
        """Stream the part of the text that can no longer change."""
        end = len(row.text)
        if not final:
            if row.text.endswith("\ufffd"):  # an incomplete multi-byte character
                end -= 1
            for stop in row.sampling.stop:  # hold back a possible start of a stop string
                for n in range(min(len(stop) - 1, end), 0, -1):
                    if row.text[:end].endswith(stop[:n]):
                        end -= n
                        break
        if end > len(row.sent) and row.request.on_text is not None:
            row.request.on_text(row.text[len(row.sent) : end])
        row.sent = row.text[:end]

    def _keep(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.positions = self.pending = self.routing = None
            return
        idx = torch.tensor(keep, device=self.engine.device)
        assert self.cache is not None
        assert self.mask is not None
        assert self.pending is not None
        self.cache.batch_select_indices(idx)
        self.mask, self.pending = self.mask[idx], self.pending[idx]
        self.positions = self.positions[idx] if self.positions is not None else None
        self.routing = self.engine.select_routing(self.routing, idx, self.rows)
        self._trim_left()

    def _trim_left(self) -> None:
        """Drop KV columns that are padding for every remaining row."""
        assert self.mask is not None
        assert self.cache is not None
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        if start == 0:
            return
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    def _merge(
        self,
        rows: list[_Row],
        cache: DynamicCache,
        mask: Tensor,
        positions: Tensor,
        pending: Tensor,
        routing: Any,
    ) -> None:
        if not self.rows:
            self.cache, self.mask = cache, mask
        else:
            assert self.cache is not None
            assert self.mask is not None
            width = max(self.mask.shape[1], mask.shape[1])
            for old, new in zip(self.cache.layers, cache.layers, strict=True):
                old.keys = torch.cat([_pad_left(old.keys, width, 2), _pad_left(new.keys, width, 2)])
                old.values = torch.cat(
                    [_pad_left(old.values, width, 2), _pad_left(new.values, width, 2)]
                )
            self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self._join(rows, positions, pending, routing)

    def _join(self, rows: list[_Row], positions: Tensor, pending: Tensor, routing: Any) -> None:
        """Append new rows' positions, pending tokens and routing to the running ones."""
        if not self.rows:
            self.rows, self.routing = rows, routing
            self.positions, self.pending = positions, pending
            return
        assert self.positions is not None
        assert self.pending is not None
        self.positions = torch.cat([self.positions, positions])
        self.pending = torch.cat([self.pending, pending])
        self.rows = self.rows + rows
        self.routing = self.engine.merge_routing(self.routing, routing, self.rows)


class StaticDecodeBatch(DecodeBatch):
    """A DecodeBatch whose decode steps run the engine's compiled static-shape step.

    Prefill is the eager one; each prefilled row's keys and values are then copied into a
    slot of a preallocated cache (layers, slots, kv_heads, columns, head_dim), its position
    p at column p. A step runs `bucket(rows)` slots over `length_bucket(longest)` columns;
    finished rows are compacted away, so running rows always hold the first slots.
    """

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        assert engine.decoder is not None
        self.decoder: StaticDecoder = engine.decoder
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self._lora: LoRAInputs | None = None
        self._lora_rows = 0

    def _reserve(self, rows: int, columns: int) -> tuple[Tensor, Tensor]:
        """The cache, grown (slots to a batch bucket, columns to a length bucket) to fit."""
        dec = self.decoder
        have_rows, have_cols = (0, 0) if self.keys is None else self.keys.shape[1:4:2]
        if self.keys is not None and rows <= have_rows and columns <= have_cols:
            assert self.values is not None
            return self.keys, self.values
        limit = self.engine.max_positions
        shape = (
            dec.n_layers,
            max(bucket(rows), have_rows),
            dec.n_kv,
            max(length_bucket(columns, limit), have_cols),
            dec.head_dim,
        )
        keys = torch.zeros(shape, dtype=dec.dtype, device=dec.device)
        values = torch.zeros_like(keys)
        if self.keys is not None and self.values is not None:
            keys[:, :have_rows, :, :have_cols] = self.keys
            values[:, :have_rows, :, :have_cols] = self.values
        if dec.device.type == "cuda":  # CUDA graphs read the cache in place, never copy it
            torch._dynamo.mark_static_address(keys)
            torch._dynamo.mark_static_address(values)
        self.keys, self.values = keys, values
        return keys, values

    def _merge(
        self,
        rows: list[_Row],
        cache: DynamicCache,
        mask: Tensor,
        positions: Tensor,
        pending: Tensor,
        routing: Any,
    ) -> None:
        first = len(self.rows)
        keys, values = self._reserve(first + len(rows), int(positions.max()) + 1)
        new_k = torch.stack([layer.keys for layer in cache.layers])  # (L, n, kv, width, d)
        new_v = torch.stack([layer.values for layer in cache.layers])
        width = mask.shape[1]
        for j, n in enumerate(positions.tolist()):  # a row's real columns end the prefill
            keys[:, first + j, :, :n] = new_k[:, j, :, width - n :]
            values[:, first + j, :, :n] = new_v[:, j, :, width - n :]
        self._join(rows, positions, pending, routing)
        self._lora = None

    @torch.inference_mode()
    def step(self) -> bool:
        """Decode one token for every row with the compiled step."""
        if not self.rows:
            return False
        assert self.positions is not None
        assert self.pending is not None
        n = len(self.rows)
        slots = bucket(n)
        columns = int(self.positions.max()) + 1  # a column for the position being decoded
        keys, values = self._reserve(slots, columns)
        used = length_bucket(columns, keys.shape[3])
        if self._lora is None or self._lora_rows != slots:
            self._lora = self.decoder.lora_inputs(self.routing, slots)
            self._lora_rows = slots
        tokens = _pad(self.pending, slots, self.engine.pad_id)
        positions = _pad(self.positions, slots, 0)
        # the padding rows' keys land in free slots, which a joining row overwrites
        logits, _, _ = self.decoder.step(
            tokens,
            positions,
            keys[:, :slots, :, :used],
            values[:, :slots, :, :used],
            self._lora,
            write=True,
            live=n,
        )
        return self._advance(logits)

    def _row_kv(self, i: int) -> list[tuple[Tensor, Tensor]]:
        assert self.keys is not None
        assert self.values is not None
        assert self.positions is not None
        n = int(self.positions[i])  # the pending token is not in the cache yet
        keys, values = self.keys[:, i : i + 1, :, :n], self.values[:, i : i + 1, :, :n]
        return [(k.clone(), v.clone()) for k, v in zip(keys, values, strict=True)]

    def _keep(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        self._lora = None
        if not keep:
            self.positions = self.pending = self.routing = None
            return
        assert self.keys is not None
        assert self.values is not None
        assert self.positions is not None
        assert self.pending is not None
        idx = torch.tensor(keep, device=self.engine.device)
        n = len(keep)
        self.keys[:, :n] = self.keys.index_select(1, idx)
        self.values[:, :n] = self.values.index_select(1, idx)
        self.positions, self.pending = self.positions[idx], self.pending[idx]
        self.routing = self.engine.select_routing(self.routing, idx, self.rows)


def _argmax(logits: Tensor) -> Tensor:
    """Each row's greedy token: torch's argmax, on the CPU through NumPy.

    NumPy's vectorised argmax is ~10x faster than torch's over a vocabulary (4.6 vs 46 us
    for one row of 49,152); both take the first of equal maxima and NaN as the maximum.
    """
    if logits.device.type == "cpu":
        return torch.from_numpy(logits.contiguous().numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


def _pad(t: Tensor, rows: int, value: int) -> Tensor:
    """`t` (n,) padded with `value` to `rows`."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_full((rows - t.shape[0],), value)])


def _select(eng: Engine, routing: Any, members: list[int], rows: list[_Row]) -> Any:
    """The routing of some of a new batch's rows (by their indices in it)."""
    idx = torch.tensor(members, dtype=torch.long, device=eng.device)
    return eng.select_routing(routing, idx, rows)


def _pad_left(t: Tensor, width: int, dim: int) -> Tensor:
    """Zero-pad `t` on the left of `dim` up to `width`."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
