"""The `neeko` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

from neeko.errors import NeekoError

DEMO_CAST = [
    (
        "Captain Mara Vell",
        "You are Captain Mara Vell, a weathered pirate captain. You speak in salty sea slang, "
        "call people 'matey', and love old maps. Answer in two sentences.",
    ),
    (
        "Inspector Edmund Gray",
        "You are Inspector Edmund Gray, a precise Victorian detective in 1890s London. You "
        "speak formally and reason from small clues. Answer in two sentences.",
    ),
]
DEMO_QUESTION = "What do you think is hidden in the old lighthouse?"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `neeko` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except NeekoError as exc:
        print(f"neeko: error: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neeko", description=__doc__)
    sub = parser.add_subparsers(title="commands")

    demo = sub.add_parser("demo", help="two characters answer in one mixed batch")
    demo.add_argument("--model", default="default", help="default | tiny | PATH | hub id")
    demo.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: auto)")
    demo.add_argument("--max-new-tokens", type=int, default=60)
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="benchmarks (JSON with --json)")
    bench_sub = bench.add_subparsers(title="benchmarks")
    engine = bench_sub.add_parser("engine", help="block bank vs base model vs PEFT")
    engine.add_argument("--model", default="default", help="default | tiny | PATH | hub id")
    engine.add_argument("--device", default=None)
    engine.add_argument("--quick", action="store_true", help="32 new tokens, 3 rounds")
    engine.add_argument("--rounds", type=int, default=None, help="timed rounds (median)")
    engine.add_argument("--json", action="store_true", help="print one JSON object")
    engine.set_defaults(func=_bench_engine)
    return parser


def _demo(args: argparse.Namespace) -> int:
    """Two characters, each with its own block, answer one question in one batch."""
    from neeko import model as model_lib
    from neeko.engine import Engine, GenerationRequest, SamplingParams
    from neeko.lora import BankConfig, LoRABank

    loaded = model_lib.load(args.model, device=args.device)
    bank = LoRABank(loaded.model, BankConfig())
    blocks = bank.add_blocks(len(DEMO_CAST))  # fresh blocks (B = 0) until the cast is trained
    engine = Engine(loaded, bank)
    print(
        f"model: {args.model} on {loaded.device} ({loaded.dtype}); "
        f"bank: {bank.n_blocks} blocks of rank {bank.config.rank} on "
        f"{len(bank.module_names)} layers\n"
    )
    print(f"User: {DEMO_QUESTION}\n")
    sampling = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=0.7, top_p=0.9, seed=7, stop=("<|im_end|>",)
    )
    requests = [
        GenerationRequest(
            [{"role": "system", "content": persona}, {"role": "user", "content": DEMO_QUESTION}],
            gate={k: 1.0},
            sampling=sampling,
        )
        for (_, persona), k in zip(DEMO_CAST, blocks, strict=True)
    ]
    t0 = time.perf_counter()
    results = engine.generate(requests)
    wall = time.perf_counter() - t0
    for (name, _), res in zip(DEMO_CAST, results, strict=True):
        print(f"{name}: {res.text.strip()}\n")
    tokens = sum(r.completion_tokens for r in results)
    print(
        f"[{len(results)} characters in one batch: {tokens} tokens in {wall:.1f} s, "
        f"{tokens / wall:.1f} tok/s]"
    )
    return 0


def _bench_engine(args: argparse.Namespace) -> int:
    from neeko.bench import run_engine_bench

    result = run_engine_bench(args.model, quick=args.quick, device=args.device, rounds=args.rounds)
    if args.json:
        print(json.dumps(result))
    else:
        width = max(len(k) for k in result)
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
