"""`neeko bench engine`: block-bank generation against the base model and PEFT, side by side.

Every figure comes from one run: each configuration is loaded once, all are warmed up, then
they are run round-robin (so drift in machine speed hits all of them alike) and the median
of the rounds is taken. Decoding is greedy with a fixed ~64-token prompt, and EOS is ignored
so every row produces exactly the requested number of tokens.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import Tensor

from neeko import model as model_lib
from neeko.engine import Engine, GenerationRequest, GenerationResult, SamplingParams, _Row
from neeko.lora import BankConfig, LoRABank
from neeko.peft_io import export_adapter

PROMPT = [
    {
        "role": "system",
        "content": "You are Captain Mara Vell, a weathered pirate captain who speaks in salty "
        "sea slang, loves old maps, and never trusts the navy.",
    },
    {
        "role": "user",
        "content": "Captain, the storm is closing in and the crew is restless. Tell me, what "
        "should we do with the cargo we took from the merchant ship last night?",
    },
]
BATCH = 16


class PeftEngine(Engine):
    """Engine that routes rows through PEFT's mixed-batch `adapter_names`."""

    def make_routing(self, rows: Sequence[_Row]) -> list[str]:
        """One adapter name per row."""
        return [r.request.adapter or "__base__" for r in rows]

    def select_routing(self, routing: Any, keep: Tensor, rows: Sequence[_Row]) -> list[str]:
        """Names of the kept rows."""
        return [routing[i] for i in keep.tolist()]

    def merge_routing(self, old: Any, new: Any, rows: Sequence[_Row]) -> list[str]:
        """Names of both batches' rows."""
        return [*old, *new]

    def forward(self, routing: Any, **inputs: Any) -> Tensor:
        """Last-position logits with PEFT's per-row adapters."""
        out = self.model(**inputs, adapter_names=routing, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]


@dataclass
class Timing:
    """One run of one configuration."""

    wall_s: float
    tpot_s: float
    ttft_s: float
    tokens: int

    @property
    def tok_s(self) -> float:
        """Generated tokens per second of wall time (prefill included)."""
        return self.tokens / self.wall_s


def _requests(
    gates: Sequence[dict | None], new_tokens: int, adapters: Sequence[str | None] = ()
) -> list[GenerationRequest]:
    sp = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    names = list(adapters) or [None] * len(gates)
    return [GenerationRequest(PROMPT, g, sp, adapter=a) for g, a in zip(gates, names, strict=True)]


def _time(engine: Engine, requests: list[GenerationRequest]) -> Timing:
    t0 = time.perf_counter()
    results = engine.generate(requests)
    wall = time.perf_counter() - t0
    return Timing(
        wall,
        statistics.median(_tpot(r) for r in results),
        statistics.median(r.ttft_s for r in results),
        sum(r.completion_tokens for r in results),
    )


def _tpot(r: GenerationResult) -> float:
    return (r.total_s - r.ttft_s) / max(1, r.completion_tokens - 1)


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _banked(spec: str, n_blocks: int, seed: int, device: str | None) -> tuple[Engine, LoRABank]:
    loaded = model_lib.load(spec, device=device)
    bank = LoRABank(loaded.model, BankConfig())
    gen = torch.Generator().manual_seed(seed)
    # Realistic LoRA magnitudes: trained blocks move logits, not swamp them.
    bank.add_blocks(n_blocks, init="random", generator=gen, b_scale=0.05)
    return Engine(loaded, bank), bank


def run_engine_bench(
    spec: str = "default", quick: bool = False, device: str | None = None, rounds: int | None = None
) -> dict[str, Any]:
    """Measure the engine figures of `neeko bench engine` and return them as a dict."""
    started = time.perf_counter()
    new_tokens = 32 if quick else 64
    rounds = rounds or (3 if quick else 5)
    _log(f"loading {spec} five times (base, bank of 16, of 10, of 1000, PEFT)")
    base = Engine(model_lib.load(spec, device=device))
    ours, bank = _banked(spec, 16, seed=0, device=device)
    ours10, _ = _banked(spec, 10, seed=1, device=device)
    ours1000, _bank1000 = _banked(spec, 1000, seed=2, device=device)
    peft, load_set_ms = _peft_engine(spec, bank, device)

    one = [{0: 1.0}]
    k = {n: [{i % n: 1.0} for i in range(BATCH)] for n in (1, 8, 16)}
    names = {n: [f"c{i % n}" for i in range(BATCH)] for n in (1, 8)}
    configs: dict[str, Callable[[], Timing]] = {
        "base_b1": lambda: _time(base, _requests([None], new_tokens)),
        "gated_b1": lambda: _time(ours, _requests(one, new_tokens)),
        "base_b16": lambda: _time(base, _requests([None] * BATCH, new_tokens)),
        "k1_b16": lambda: _time(ours, _requests(k[1], new_tokens)),
        "k8_b16": lambda: _time(ours, _requests(k[8], new_tokens)),
        "k16_b16": lambda: _time(ours, _requests(k[16], new_tokens)),
        "peft_k1_b16": lambda: _time(peft, _requests([None] * BATCH, new_tokens, names[1])),
        "peft_k8_b16": lambda: _time(peft, _requests([None] * BATCH, new_tokens, names[8])),
        "10_chars_b16": lambda: _time(ours10, _requests(k[8], new_tokens)),
        "1000_chars_b16": lambda: _time(
            ours1000, _requests([{(i % 8) * 125: 1.0} for i in range(BATCH)], new_tokens)
        ),
    }
    _log("warm-up")
    for fn in configs.values():
        fn()
    runs: dict[str, list[Timing]] = {name: [] for name in configs}
    for r in range(rounds):
        _log(f"round {r + 1}/{rounds}")
        for name, fn in configs.items():
            runs[name].append(fn())
    med = {name: _median(ts) for name, ts in runs.items()}

    _log("switch cost and mixed-batch equivalence")
    switch_ms = _switch_ms(ours1000, rounds)
    matches, max_diff = _mixed_matches_alone(ours, bank, new_tokens)

    base16 = med["base_b16"].tpot_s
    out: dict[str, Any] = {f"tok_s_{name}": round(t.tok_s, 2) for name, t in med.items()}
    out |= {f"tpot_ms_{name}": round(t.tpot_s * 1e3, 3) for name, t in med.items()}
    out |= {
        "overhead_vs_base_b1": round(med["gated_b1"].tpot_s / med["base_b1"].tpot_s, 4),
        "mixed_vs_single_k8": round(med["k8_b16"].tok_s / med["k1_b16"].tok_s, 4),
        "mixed_vs_single_k16": round(med["k16_b16"].tok_s / med["k1_b16"].tok_s, 4),
        "speedup_vs_peft_k8": round(med["k8_b16"].tok_s / med["peft_k8_b16"].tok_s, 4),
        "lora_time_vs_peft_k8": round(
            (med["k8_b16"].tpot_s - base16) / (med["peft_k8_b16"].tpot_s - base16), 4
        ),
        "switch_ms": round(switch_ms, 3),
        "peft_load_set_ms": round(load_set_ms, 3),
        "scale_1000_vs_10": round(med["1000_chars_b16"].tok_s / med["10_chars_b16"].tok_s, 4),
        "mixed_matches_alone": matches,
        "mixed_max_logit_diff": max_diff,
        "model": spec,
        "device": str(base.device),
        "dtype": str(base.loaded.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": BATCH,
        "prompt_tokens": len(base.render(PROMPT)),
        "new_tokens": new_tokens,
        "rounds": rounds,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    return out


def _median(ts: list[Timing]) -> Timing:
    return Timing(
        wall_s=statistics.median(t.wall_s for t in ts),
        tpot_s=statistics.median(t.tpot_s for t in ts),
        ttft_s=statistics.median(t.ttft_s for t in ts),
        tokens=ts[0].tokens,
    )


def _peft_engine(spec: str, bank: LoRABank, device: str | None) -> tuple[PeftEngine, float]:
    """PEFT model holding the bank's first 8 blocks as adapters c0..c7, plus load+set time."""
    loaded = model_lib.load(spec, device=device)
    tmp = Path(tempfile.mkdtemp(prefix="neeko-bench-"))
    for i in range(bank.n_blocks):
        export_adapter(bank, {i: 1.0}, tmp / f"c{i}")
    model = PeftModel.from_pretrained(loaded.model, str(tmp / "c0"), adapter_name="c0")
    for i in range(1, 8):
        model.load_adapter(str(tmp / f"c{i}"), adapter_name=f"c{i}")
    times = []
    for i in range(8, bank.n_blocks):
        t0 = time.perf_counter()
        model.load_adapter(str(tmp / f"c{i}"), adapter_name=f"c{i}")
        model.set_adapter(f"c{i}")
        times.append((time.perf_counter() - t0) * 1e3)
    model.eval()
    loaded.model = model
    return PeftEngine(loaded), statistics.median(times)


def _switch_ms(engine: Engine, rounds: int) -> float:
    """Extra first-token time for a character not used before vs the same one again."""
    diffs = []
    for j in range(max(5, rounds)):
        gate = [{900 + j: 1.0}]  # never used by the other runs
        first = _time(engine, _requests(gate, 1)).ttft_s
        again = _time(engine, _requests(gate, 1)).ttft_s
        diffs.append((first - again) * 1e3)
    return statistics.median(diffs)


def _mixed_matches_alone(engine: Engine, bank: LoRABank, new_tokens: int) -> tuple[bool, float]:
    """Is every row of a K=16 mixed batch equal to that row run alone (tokens and logits)?"""
    gates = [{i: 1.0} for i in range(BATCH)]
    batch = engine.generate(_requests(gates, new_tokens))
    alone = [engine.generate(_requests([g], new_tokens))[0] for g in gates]
    same_tokens = all(a.token_ids == b.token_ids for a, b in zip(batch, alone, strict=True))
    prompt = engine.render(PROMPT)
    ids = torch.tensor([prompt + r.token_ids for r in batch], device=engine.device)
    with torch.inference_mode():
        with bank.route(gates):
            mixed = engine.model(input_ids=ids).logits.float()
        max_diff = 0.0
        for i, g in enumerate(gates):
            with bank.route([g]):
                row = engine.model(input_ids=ids[i : i + 1]).logits.float()
            max_diff = max(max_diff, float((mixed[i] - row[0]).abs().max()))
    return same_tokens and max_diff <= 1e-4, max_diff
