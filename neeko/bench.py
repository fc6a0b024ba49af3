"""`neeko bench engine`: block-bank generation against the base model and PEFT, side by side.

Every figure comes from one run. Each configuration is loaded once; then, per round, all are
prefilled and decoded in lockstep, one decode step of each in turn, so a slow moment of the
machine hits all of them alike. A round of warm-up comes first; figures are medians over the
decode steps (`tok_s_*` = rows / median step time) and over the rounds' prefills. Decoding is
greedy with a fixed ~64-token prompt, and EOS is ignored so every row produces exactly the
requested number of tokens.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import Tensor

from neeko import model as model_lib
from neeko import native
from neeko.compiled import length_bucket
from neeko.engine import (
    DecodeBatch,
    Engine,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    _Row,
)
from neeko.kvcache import PrefixCache
from neeko.lora import BankConfig, LoRABank
from neeko.peft_io import export_adapter

PROMPT = [
    {
        "role": "system",
        "content": "You are Captain Mara Vell, a weathered pirate captain who speaks in salty "
        "sea slang and never trusts the navy.",
    },
    {
        "role": "user",
        "content": "Captain, the storm is closing in. What should we do with the cargo "
        "we took from the merchant ship last night?",
    },
]
BATCH = 16
READ_BYTES = 1 << 30
"""Size of the buffer whose read measures memory bandwidth (far larger than any cache)."""
Config = tuple[Engine, list[dict | None], list[str]]
"""An engine, one gate per row, and (for PEFT) one adapter name per row."""


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

    rows: int
    tpot_s: float
    """Median time per output token after the first (one decode step of the batch)."""
    ttft_s: float
    """Median time to the first token (prefill of the batch)."""

    @property
    def tok_s(self) -> float:
        """Decode throughput: tokens per second over all rows of the batch."""
        return self.rows / self.tpot_s


def _requests(
    gates: Sequence[dict | None], new_tokens: int, adapters: Sequence[str | None] = ()
) -> list[GenerationRequest]:
    sp = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    names = list(adapters) or [None] * len(gates)
    return [GenerationRequest(PROMPT, g, sp, adapter=a) for g, a in zip(gates, names, strict=True)]


def _time(engine: Engine, requests: list[GenerationRequest]) -> Timing:
    results = engine.generate(requests)
    return Timing(
        rows=len(results),
        tpot_s=statistics.median(_tpot(r) for r in results),
        ttft_s=statistics.median(r.ttft_s for r in results),
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
    dense = Engine(ours.loaded, bank, path="dense")
    ours10, _ = _banked(spec, 10, seed=1, device=device)
    ours1000, bank1000 = _banked(spec, 1000, seed=2, device=device)
    # The lower-precision options to race: int kernels are CPU-only.
    lowps = ("int8", "int4") if base.device.type == "cpu" else ("bf16",)
    _log(f"compiled decode steps (fp32, {', '.join(lowps)} weights) on the bank of 16")
    compiled = Engine(ours.loaded, bank, decode="compiled")
    compiled_lowp = {w: Engine(ours.loaded, bank, decode="compiled", weights=w) for w in lowps}
    with tempfile.TemporaryDirectory(prefix="neeko-bench-") as tmp:
        peft, load_set_ms = _peft_engine(spec, bank, Path(tmp), device)

    k = {n: [{i % n: 1.0} for i in range(BATCH)] for n in (1, 8, 16)}
    names = {n: [f"c{i % n}" for i in range(BATCH)] for n in (1, 8)}
    spread = [{(i % 8) * 125: 1.0} for i in range(BATCH)]  # 8 blocks far apart in the bank
    configs: dict[str, Config] = {
        "base_b1": (base, [None], []),
        "gated_b1": (ours, k[1][:1], []),
        "base_b16": (base, [None] * BATCH, []),
        "k1_b16": (ours, k[1], []),
        "k8_b16": (ours, k[8], []),
        "k16_b16": (ours, k[16], []),
        "dense_k1_b16": (dense, k[1], []),
        "dense_k8_b16": (dense, k[8], []),
        "peft_k1_b16": (peft, [None] * BATCH, names[1]),
        "peft_k8_b16": (peft, [None] * BATCH, names[8]),
        "10_chars_b16": (ours10, k[8], []),
        "1000_chars_b16": (ours1000, spread, []),
        "compiled_b1": (compiled, k[1][:1], []),
        "compiled_k8_b16": (compiled, k[8], []),
        **{f"{w}_b1": (engine, k[1][:1], []) for w, engine in compiled_lowp.items()},
        **{f"{w}_k8_b16": (engine, k[8], []) for w, engine in compiled_lowp.items()},
    }
    probes = {"buffer": partial(_read, torch.ones(READ_BYTES // 4, device=base.device))}
    weights_read, weights_read_bytes = _weights_reader(compiled)
    if weights_read is not None:
        probes["weights"] = weights_read
    med, probed = _lockstep(configs, new_tokens, rounds, probes)
    del probes  # the buffer
    read_gb_s = READ_BYTES / probed["buffer"] / 1e9
    _log("compiled vs eager tokens, and the low-precision NLL change")
    weight_gb = _weight_bytes(base.loaded.model) / 1e9
    tokens_identical = _compiled_vs_eager(compiled, ours, new_tokens)
    lowp = max(lowps, key=lambda w: med[f"{w}_b1"].tok_s)  # the fastest for one user
    nll = _lowp_nll(compiled, compiled_lowp[lowp], bank, spec) if spec == "default" else {}
    _log("switch cost and mixed-batch equivalence")
    switch_ms, prepare_ms = _switch_ms(ours1000, bank1000)
    same_tokens, max_diff, base_diff = _mixed_vs_alone(ours, bank, new_tokens, base)
    _log("a follow-up turn after a 1,500-token history: reused KV cache vs full prefill")
    followup = _followup(ours, rounds, new_tokens)
    _log("batch-1 decode after the 1,500-token history vs after the prompt alone")
    long_context = _long_context(compiled, rounds, new_tokens)

    base16 = med["base_b16"].tpot_s
    out: dict[str, Any] = {f"tok_s_{name}": round(t.tok_s, 2) for name, t in med.items()}
    out |= {
        "overhead_vs_base_b1": round(med["gated_b1"].tpot_s / med["base_b1"].tpot_s, 4),
        "mixed_vs_single_k8": round(med["k8_b16"].tok_s / med["k1_b16"].tok_s, 4),
        "mixed_vs_single_k16": round(med["k16_b16"].tok_s / med["k1_b16"].tok_s, 4),
        "mixed_vs_single_k8_dense": round(med["dense_k8_b16"].tok_s / med["dense_k1_b16"].tok_s, 4),
        "speedup_vs_peft_k8": round(med["k8_b16"].tok_s / med["peft_k8_b16"].tok_s, 4),
        "lora_time_vs_peft_k8": round(
            (med["k8_b16"].tpot_s - base16) / (med["peft_k8_b16"].tpot_s - base16), 4
        ),
        "switch_ms": round(switch_ms, 3),
        "switch_prepare_ms": round(prepare_ms, 3),
        "peft_load_set_ms": round(load_set_ms, 3),
        "scale_1000_vs_10": round(med["1000_chars_b16"].tok_s / med["10_chars_b16"].tok_s, 4),
        "mixed_matches_alone": same_tokens and max_diff <= 1e-4,
        "mixed_tokens_identical": same_tokens,
        "mixed_max_logit_diff": max_diff,
        "base_batch_max_logit_diff": base_diff,
        "decode_b1_vs_floor": round(med["compiled_b1"].tok_s / (read_gb_s / weight_gb), 4),
        "eager_b1_vs_floor": round(med["gated_b1"].tok_s / (read_gb_s / weight_gb), 4),
        "compiled_vs_eager_b1": round(med["compiled_b1"].tok_s / med["gated_b1"].tok_s, 4),
        "compiled_vs_eager_k8_b16": round(med["compiled_k8_b16"].tok_s / med["k8_b16"].tok_s, 4),
        "compiled_tokens_identical": all(tokens_identical.values()),
        "compiled_tokens_identical_by_k": tokens_identical,
        "b1_step": "native" if compiled.decoder and compiled.decoder.native else "graph",
        "b16_step": _step_kind(compiled, BATCH),
        "lowp": lowp,
        "lowp_vs_fp32_b1": round(med[f"{lowp}_b1"].tok_s / med["compiled_b1"].tok_s, 4),
        "lowp_vs_fp32_k8_b16": round(med[f"{lowp}_k8_b16"].tok_s / med["compiled_k8_b16"].tok_s, 4),
        "lowp_vs_fp32_b1_by_weights": {
            w: round(med[f"{w}_b1"].tok_s / med["compiled_b1"].tok_s, 4) for w in lowps
        },
        "lowp_b1_step": "native" if compiled_lowp[lowp].decoder.native else "graph",
        "lowp_b16_step": _step_kind(compiled_lowp[lowp], BATCH),
        "read_gb_s": round(read_gb_s, 2),
        "weight_gb": round(weight_gb, 4),
    }
    if "weights" in probed:  # the floor read from the decoder's own weights' memory
        weights_gb_s = weights_read_bytes / probed["weights"] / 1e9
        out["weights_read_gb_s"] = round(weights_gb_s, 2)
        out["decode_b1_vs_weights_read"] = round(
            med["compiled_b1"].tok_s / (weights_gb_s / weight_gb), 4
        )
    out |= nll
    out |= followup
    out |= long_context
    out |= {f"tpot_ms_{name}": round(t.tpot_s * 1e3, 3) for name, t in med.items()}
    out |= {f"ttft_ms_{name}": round(t.ttft_s * 1e3, 3) for name, t in med.items()}
    out |= {
        "model": spec,
        "device": str(base.device),
        "dtype": str(base.loaded.dtype).removeprefix("torch."),
        "path": bank.config.path,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": BATCH,
        "prompt_tokens": len(base.render(PROMPT)),
        "new_tokens": new_tokens,
        "rounds": rounds,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    return out


def _read(buffer: torch.Tensor) -> None:
    """Read every byte of `buffer` once (a sum), waiting for the device."""
    _sync(buffer.device)
    buffer.sum()
    _sync(buffer.device)


def _step_kind(engine: Engine, rows: int) -> str:
    """Which decode step a compiled engine runs for `rows` rows: `native` or `graph`."""
    dec = engine.decoder
    return "native" if dec is not None and dec.runs_native(rows) else "graph"


def _weights_reader(compiled: Engine) -> tuple[Callable[[], object] | None, int]:
    """A read of every weight the compiled batch-1 step streams, from their own memory.

    A 1 GiB buffer's read speed varies with where it lands (on the 2-core VM we measure on,
    31-53 GB/s from one process to the next while the decode step's speed held), so the
    floor is also measured on the weights themselves, in the native step's pattern.
    Returns the read and its bytes; (None, 0) without the native library.
    """
    dec = compiled.decoder
    lib = native.library() if dec is not None and dec.native is not None else None
    if lib is None:
        return None, 0
    seen, tensors = set(), []
    for t in dec.buffers():
        if t.dtype == torch.float32 and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            tensors.append(t)
    return native.reader(tensors, lib), sum(t.numel() * t.element_size() for t in tensors)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step streams: every parameter once (a tied head counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def _compiled_vs_eager(compiled: Engine, eager: Engine, new_tokens: int) -> dict[str, bool]:
    """Greedy tokens of the compiled step vs the eager path.

    16 rows over K characters, and one row alone (`b1`: the native step where it runs).
    """
    out = {}
    for k in (1, 3, 8, 16, 0):
        gates = [{i % k: 1.0} for i in range(BATCH)] if k else [{1: 1.0}]
        requests = _requests(gates, new_tokens)
        want = [r.token_ids for r in eager.generate(requests)]
        out[str(k) if k else "b1"] = [r.token_ids for r in compiled.generate(requests)] == want
    return out


@torch.inference_mode()
def _lowp_nll(
    fp32: Engine, lowp: Engine, bank: LoRABank, spec: str, per_member: int = 2
) -> dict[str, Any]:
    """Held-out NLL of the starter cast under its own blocks, fp32 vs low-precision weights.

    Teacher-forced through the compiled decode step itself, one token at a time, on each
    member's first `per_member` held-out dialogues; the cast's blocks join `bank`.
    """
    from neeko.catalog import Catalog
    from neeko.characters import read_cast
    from neeko.dialogues import IGNORE, read_dialogues
    from neeko.runtime import CAST_STORE
    from neeko.train import character_examples

    catalog = Catalog.open(CAST_STORE)
    if catalog.model != spec or catalog.shared_rank or catalog.rank != bank.config.rank:
        return {}
    totals = {"fp32": [0.0, 0], "lowp": [0.0, 0]}
    for member in read_cast():
        char = catalog.find(member.card.name)
        slot = bank.load_block(catalog.block_path(char.key))
        dialogues = read_dialogues(member.heldout)[:per_member]
        for example in character_examples(fp32.loaded, member.card, dialogues, slot):
            for name, engine in (("fp32", fp32), ("lowp", lowp)):
                nll, n = _stepwise_nll(engine, {slot: 1.0}, example.ids, example.labels, IGNORE)
                totals[name][0] += nll
                totals[name][1] += n
    fp, low = (totals[k][0] / totals[k][1] for k in ("fp32", "lowp"))
    return {
        "cast_nll_fp32": round(fp, 4),
        "cast_nll_lowp": round(low, 4),
        "lowp_nll_change": round(low - fp, 4),
        "cast_nll_tokens": totals["fp32"][1],
    }


def _stepwise_nll(
    engine: Engine, gate: dict, ids: list[int], labels: list[int], ignore: int
) -> tuple[float, int]:
    """Summed NLL of the labelled tokens, feeding `ids` one decode step at a time."""
    decoder = engine.decoder
    assert decoder is not None
    lora = decoder.lora_inputs(engine.bank.routing([gate], path="gathered"), 1)
    size = length_bucket(len(ids), 1 << 30)  # the column buckets serving uses
    shape = (decoder.n_layers, 1, decoder.n_kv, size, decoder.head_dim)
    keys = torch.zeros(shape, dtype=decoder.dtype, device=decoder.device)
    values = torch.zeros_like(keys)
    total, count = 0.0, 0
    for p in range(len(ids) - 1):
        columns = length_bucket(p + 1, size)
        token = torch.tensor([ids[p]], device=decoder.device)
        position = torch.tensor([p], device=decoder.device)
        logits, k, v = decoder.step(
            token, position, keys[..., :columns, :], values[..., :columns, :], lora
        )
        keys[:, 0, :, p], values[:, 0, :, p] = k[:, 0], v[:, 0]
        if labels[p + 1] != ignore:
            total -= float(torch.log_softmax(logits[0].float(), -1)[labels[p + 1]])
            count += 1
    return total, count


def _lockstep(
    configs: dict[str, Config],
    new_tokens: int,
    rounds: int,
    probes: dict[str, Callable[[], object]],
) -> tuple[dict[str, Timing], dict[str, float]]:
    """Decode all configurations in lockstep, one step of each in turn; medians per config.

    Interleaving single decode steps means a slow moment of the machine hits every
    configuration alike; each of `probes` (memory-bandwidth reads) runs once per turn too,
    and their median times come back with the timings. Round 0 is the warm-up and is not
    counted.
    """
    probe_s: dict[str, list[float]] = {name: [] for name in probes}
    steps: dict[str, list[float]] = {name: [] for name in configs}
    prefill: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(rounds + 1):
        _log("warm-up" if r == 0 else f"round {r}/{rounds}")
        live: dict[str, DecodeBatch] = {}
        for name, (engine, gates, names) in configs.items():
            live[name] = engine.new_batch()
            t0 = time.perf_counter()
            live[name].add(_requests(gates, new_tokens, names))
            if r:
                prefill[name].append(time.perf_counter() - t0)
        while live:
            for name in list(live):
                t0 = time.perf_counter()
                running = live[name].step()
                if r:
                    steps[name].append(time.perf_counter() - t0)
                if not running:
                    del live[name]
            for name, probe in probes.items() if r else ():
                t0 = time.perf_counter()
                probe()
                probe_s[name].append(time.perf_counter() - t0)
    timings = {
        name: Timing(
            len(configs[name][1]), statistics.median(steps[name]), statistics.median(prefill[name])
        )
        for name in configs
    }
    return timings, {name: statistics.median(ts) for name, ts in probe_s.items()}


def _median(ts: list[Timing]) -> Timing:
    return Timing(
        rows=ts[0].rows,
        tpot_s=statistics.median(t.tpot_s for t in ts),
        ttft_s=statistics.median(t.ttft_s for t in ts),
    )


def _peft_engine(
    spec: str, bank: LoRABank, folder: Path, device: str | None
) -> tuple[PeftEngine, float]:
    """PEFT model holding the bank's blocks as adapters c0..c15, plus load+set time (ms)."""
    loaded = model_lib.load(spec, device=device)
    for i in range(bank.n_blocks):
        export_adapter(bank, {i: 1.0}, folder / f"c{i}")
    model = PeftModel.from_pretrained(loaded.model, str(folder / "c0"), adapter_name="c0")
    for i in range(1, 8):
        model.load_adapter(str(folder / f"c{i}"), adapter_name=f"c{i}")
    times = []
    for i in range(8, bank.n_blocks):
        t0 = time.perf_counter()
        model.load_adapter(str(folder / f"c{i}"), adapter_name=f"c{i}")
        model.set_adapter(f"c{i}")
        times.append((time.perf_counter() - t0) * 1e3)
    model.eval()
    loaded.model = model
    return PeftEngine(loaded), statistics.median(times)


def _switch_ms(engine: Engine, bank: LoRABank, samples: int = 9) -> tuple[float, float]:
    """Cost of moving to a character not used before.

    Returns the extra first-token time of a never-used character over the same request
    repeated (median over `samples` characters), and the time to prepare its routing and
    gather its block in every layer, the only per-character work there is.
    """
    extra, prepare = [], []
    for j in range(samples):
        gate = {bank.n_blocks - 1 - j: 1.0}  # blocks no other run uses
        t0 = time.perf_counter()
        routing = bank.routing([gate], path=engine.path)
        for layer in bank.layers.values():
            routing.weights(layer)
        prepare.append((time.perf_counter() - t0) * 1e3)
        first = _time(engine, _requests([{bank.n_blocks - 1 - samples - j: 1.0}], 1)).ttft_s
        again = _time(engine, _requests([{bank.n_blocks - 1 - samples - j: 1.0}], 1)).ttft_s
        extra.append((first - again) * 1e3)
    return statistics.median(extra), statistics.median(prepare)


FILLER = (
    "The harbour bell rang twice before dawn, and the fishing boats came back early with "
    "torn nets, wet rope and stories about lights on the water past the northern reef."
)


def _history(engine: Engine) -> list[dict]:
    """The bench's prompt with ~1,500 tokens of a channel's earlier turns before its question."""
    history = [PROMPT[0]]
    while len(engine.render(history)) < 1500:
        history.append({"role": "user", "content": f"Ann: {FILLER}"})
        history.append({"role": "assistant", "content": FILLER})
    return [*history, PROMPT[1]]


def _long_context(engine: Engine, rounds: int, new_tokens: int) -> dict[str, Any]:
    """One character's batch-1 decode after the ~1,500-token history vs after the prompt alone.

    Alternating, one reply of each per round (the first round warms up); time per output
    token as `Timing.tpot_s`.
    """
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    prompts = {"short": PROMPT, "long": _history(engine)}
    tpot: dict[str, list[float]] = {name: [] for name in prompts}
    for r in range(rounds + 1):
        for name, messages in prompts.items():
            result = engine.generate([GenerationRequest(messages, {0: 1.0}, sampling)])[0]
            if r:
                tpot[name].append(_tpot(result))
    short, long = (statistics.median(tpot[name]) for name in prompts)
    return {
        "decode_b1_long_vs_short": round(short / long, 4),
        "tpot_ms_compiled_b1_long": round(long * 1e3, 3),
        "long_prompt_tokens": len(engine.render(prompts["long"])),
    }


def _followup(engine: Engine, rounds: int, new_tokens: int) -> dict[str, Any]:
    """Time to first token of a channel's next turn after a ~1,500-token history.

    With its previous turn's KV cache reused vs prefilled in full, alternating; and whether
    both give the same greedy tokens.
    """
    history = _history(engine)
    gate = {0: 1.0}
    first = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    one = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
    saved, cache = engine.prefix_cache, PrefixCache(2**30)

    def run(messages: list[dict], sampling: SamplingParams, reuse: bool) -> GenerationResult:
        engine.prefix_cache = cache if reuse else None
        return engine.generate([GenerationRequest(messages, gate, sampling)])[0]

    try:
        reply = run(history, first, reuse=True)
        follow = [*history, {"role": "assistant", "content": reply.text}]
        follow.append({"role": "user", "content": "Ann: And what did the lights look like?"})
        reused, full, cached = [], [], 0
        for _ in range(rounds + 1):  # the first round warms up
            cache.clear()
            run(history, first, reuse=True)  # the previous turn leaves its KV cache
            hit = run(follow, one, reuse=True)
            reused.append(hit.ttft_s)
            full.append(run(follow, one, reuse=False).ttft_s)
            cached = hit.cached_tokens
        cache.clear()
        run(history, first, reuse=True)
        with_cache, without = run(follow, first, reuse=True), run(follow, first, reuse=False)
    finally:
        engine.prefix_cache = saved
    return {
        "ttft_followup_vs_full": round(
            statistics.median(reused[1:]) / statistics.median(full[1:]), 4
        ),
        "ttft_ms_followup_reused": round(statistics.median(reused[1:]) * 1e3, 2),
        "ttft_ms_followup_full": round(statistics.median(full[1:]) * 1e3, 2),
        "followup_prompt_tokens": with_cache.prompt_tokens,
        "followup_cached_tokens": cached,
        "followup_tokens_identical": with_cache.token_ids == without.token_ids,
    }


def _mixed_vs_alone(
    engine: Engine, bank: LoRABank, new_tokens: int, base: Engine
) -> tuple[bool, float, float]:
    """Every row of a K=16 mixed batch vs that row alone: same greedy tokens? max logit diff?

    Tokens come from generation (KV cache, decode steps); logits from one teacher-forced
    forward over prompt + reply, batch vs each row alone. The third figure is the same
    logit difference for the base model without a bank (its own GEMMs may round differently
    at batch 16 than at batch 1 on some machines): what the bank adds is the difference.
    """
    gates = [{i: 1.0} for i in range(BATCH)]
    batch = engine.generate(_requests(gates, new_tokens))
    alone = [engine.generate(_requests([g], new_tokens))[0] for g in gates]
    same_tokens = all(a.token_ids == b.token_ids for a, b in zip(batch, alone, strict=True))
    prompt = engine.render(PROMPT)
    ids = torch.tensor([prompt + r.token_ids for r in batch], device=engine.device)

    def banked(rows: slice) -> Tensor:
        with bank.route(bank.routing(gates[rows], path=engine.path)):
            return engine.model(input_ids=ids[rows]).logits

    def plain(rows: slice) -> Tensor:
        return base.model(input_ids=ids[rows].to(base.device)).logits

    return same_tokens, _batch_vs_alone(banked, len(gates)), _batch_vs_alone(plain, len(gates))


@torch.inference_mode()
def _batch_vs_alone(logits: Callable[[slice], Tensor], rows: int) -> float:
    """Max |logit difference| of each row in the whole batch vs the row run alone."""
    together = logits(slice(0, rows)).float()
    return max(
        float((together[i] - logits(slice(i, i + 1))[0].float()).abs().max()) for i in range(rows)
    )
