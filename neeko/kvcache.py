"""Per-worker reuse of a conversation's KV cache across its turns.

A channel's next turn repeats the previous prompt and reply, then adds a message: its
prefill needs to compute only the new tokens. Blocks sit on q and v, so one token prefix
gives different keys and values under different gates: an entry is keyed by the row's gate
*and* its exact tokens, and a lookup only ever matches an entry of the same gate. Entries
live in a least-recently-used store bounded by bytes; a miss (another worker, an evicted
entry, a redelivered turn) simply prefills in full.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

GateKey = tuple[tuple[int, float], ...]
LayerKV = tuple[Tensor, Tensor]
"""One layer's keys and values of one row: (1, kv_heads, tokens, head_dim) each."""


def gate_key(gate: Mapping[int, float] | None) -> GateKey:
    """A gate as a hashable key: its nonzero (block, weight) pairs, sorted."""
    return tuple(sorted((int(k), float(w)) for k, w in (gate or {}).items() if w))


@dataclass
class _Entry:
    gate: GateKey
    tokens: tuple[int, ...]
    layers: list[LayerKV]
    nbytes: int


@dataclass(frozen=True)
class Hit:
    """A usable cached prefix: the first `length` tokens' keys and values, per layer."""

    length: int
    layers: list[LayerKV]


class PrefixCache:
    """KV caches of finished rows, by (gate, tokens), least recently used first out."""

    def __init__(self, max_bytes: int, min_tokens: int = 16) -> None:
        """Keep at most `max_bytes` of tensors; reuse prefixes of at least `min_tokens`."""
        if max_bytes < 0 or min_tokens < 1:
            raise ValueError("max_bytes must be >= 0 and min_tokens >= 1")
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = self.misses = self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, gate: Mapping[int, float] | None, tokens: Sequence[int]) -> Hit | None:
        """The longest cached prefix of `tokens` under exactly `gate`, or None.

        At least one token is always left to prefill (its logits start the reply).
        """
        key, want = gate_key(gate), tuple(tokens)
        with self._lock:
            best, best_len = None, 0
            for entry_id, entry in self._entries.items():
                if entry.gate != key:
                    continue
                n = _common(entry.tokens, want)
                if n > best_len:
                    best, best_len = entry_id, n
            length = min(best_len, len(want) - 1)
            if best is None or length < self.min_tokens:
                self.misses += 1
                return None
            self._entries.move_to_end(best)
            entry = self._entries[best]
            self.hits += 1
            self.reused_tokens += length
        layers = [(k[:, :, :length], v[:, :, :length]) for k, v in entry.layers]
        return Hit(length, layers)

    def store(
        self, gate: Mapping[int, float] | None, tokens: Sequence[int], layers: list[LayerKV]
    ) -> None:
        """Keep a row's keys and values for `tokens` (one per token), evicting old entries.

        An entry whose tokens are a prefix of these is dropped: this one serves it too.
        """
        tokens = tuple(tokens)
        if any(k.shape[2] != len(tokens) or v.shape[2] != len(tokens) for k, v in layers):
            raise ValueError("one key and value per token, in every layer")
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if nbytes > self.max_bytes or len(tokens) < self.min_tokens:
            return
        key = gate_key(gate)
        with self._lock:
            served = [i for i, e in self._entries.items() if e.gate == key and _within(e, tokens)]
            for entry_id in served:
                self.nbytes -= self._entries.pop(entry_id).nbytes
            self._entries[self._next] = _Entry(key, tokens, layers, nbytes)
            self._next += 1
            self.nbytes += nbytes
            while self.nbytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.nbytes -= old.nbytes

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self._entries.clear()
            self.nbytes = 0


def _within(entry: _Entry, tokens: tuple[int, ...]) -> bool:
    """Whether `entry`'s tokens are a prefix of `tokens`."""
    return len(entry.tokens) <= len(tokens) and tokens[: len(entry.tokens)] == entry.tokens


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the common prefix of two token tuples."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
