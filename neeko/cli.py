"""The `neeko` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neeko.errors import NeekoError

TRAIN_DEFAULTS = {
    "epochs": 2,
    "lr": 2e-3,
    "batch_size": 4,
    "seed": 0,
    "shared_rank": 0,
    "schedule": "joint",
    "shared_prompt": "card",
    "stage_data": "all",
}
"""`neeko.train.TrainConfig`'s defaults, without importing torch for `--help` (a test checks
that they agree)."""
DEMO_QUESTION = "What do you think is hidden in the old lighthouse?"
DEMO_PERSONA = "a grumpy old lighthouse keeper who hates visitors"


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


class _Parser(argparse.ArgumentParser):
    """Every command's `--help` shows its defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="neeko", description=__doc__)
    sub = parser.add_subparsers(title="commands")

    demo = sub.add_parser("demo", help="two characters answer in one mixed batch")
    demo.add_argument("--model", default="default", help="default | tiny | PATH | hub id")
    demo.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: auto)")
    demo.add_argument("--max-new-tokens", type=int, default=60)
    demo.add_argument("--store", default=None, help="character store (default: the cast's)")
    demo.add_argument(
        "--decode",
        choices=("eager", "compiled", "auto"),
        default=os.environ.get("NEEKO_DECODE") or "auto",
        help="decode step (see `neeko worker --decode`)",
    )
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
    queue = bench_sub.add_parser("queue", help="Redis queue overhead and batching speedup")
    queue.add_argument("--model", default="default", help="default | tiny | PATH | hub id")
    queue.add_argument("--device", default=None)
    queue.add_argument("--redis-url", default=None, help="default: a private redis-server")
    queue.add_argument("--quick", action="store_true", help="fewer turns and tokens")
    queue.add_argument("--json", action="store_true", help="print one JSON object")
    queue.set_defaults(func=_bench_queue)
    _character_commands(sub)
    chat = sub.add_parser("chat", help="chat with the characters in the terminal")
    chat.add_argument("--model", default="default", help="default | tiny | PATH | hub id")
    chat.add_argument("--device", default=None)
    chat.add_argument("--store", default=None, help="character store (default: the cast's)")
    chat.add_argument("--db", default=None, help="SQLite file (default: ~/.local/share/neeko)")
    chat.add_argument("--channel", default="terminal", help="conversation to continue")
    chat.add_argument("--user", default="you", help="your name in the conversation")
    chat.add_argument("--max-new-tokens", type=int, default=None)
    chat.set_defaults(func=_chat)
    from neeko.cli_serving import add_commands
    from neeko.dbcli import add_commands as add_db_commands

    add_commands(sub)
    add_db_commands(sub)
    _data_commands(sub)
    return parser


def _data_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="import training data")
    data_sub = data.add_subparsers(title="importers")
    tr = data_sub.add_parser(
        "transcript",
        help="a speaker-labelled transcript (e.g. a play) as cards and train/test dialogues",
        description="Speeches are blank-line separated, each opening with a 'SPEAKER:' line. "
        "Each chosen speaker's speeches become character turns, the speeches before them the "
        "user turns; the split is contiguous (the last dialogues of each speaker are held out).",
    )
    tr.add_argument("file", help="the transcript (UTF-8 text)")
    tr.add_argument("--out", required=True, help="folder for cards/, train.jsonl, test.jsonl")
    tr.add_argument("--characters", type=int, default=9, help="speakers with the most words")
    tr.add_argument("--names", nargs="+", default=[], help="speakers by name instead")
    tr.add_argument("--exchanges", type=int, default=3, help="character turns per dialogue")
    tr.add_argument("--context-speeches", type=int, default=2, help="speeches in a user turn")
    tr.add_argument("--context-chars", type=int, default=600, help="user turn length cap")
    tr.add_argument("--test-fraction", type=float, default=0.2, help="held-out share")
    tr.add_argument("--max-train-dialogues", type=int, default=None, help="per speaker, last")
    tr.add_argument("--max-test-dialogues", type=int, default=None, help="per speaker, first")
    tr.add_argument("--source", default="the transcript", help="named in the cards' profiles")
    tr.add_argument("--json", action="store_true")
    tr.set_defaults(func=_data_transcript)


def _data_transcript(args: argparse.Namespace) -> int:
    from neeko.dialogues import DataError
    from neeko.transcript import ImportOptions, import_transcript, parse_transcript, write_import

    try:
        text = Path(args.file).read_text(encoding="utf-8")
        options = ImportOptions(
            characters=args.characters,
            names=tuple(args.names),
            exchanges=args.exchanges,
            context_speeches=args.context_speeches,
            context_chars=args.context_chars,
            test_fraction=args.test_fraction,
            max_train_dialogues=args.max_train_dialogues,
            max_test_dialogues=args.max_test_dialogues,
            source=args.source,
        )
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{args.file}: {exc}") from None
    summary = write_import(import_transcript(parse_transcript(text, args.file), options), args.out)
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
        return 0
    for name, row in summary["characters"].items():
        print(
            f"{name:<24} {row['words']:>6} words  {row['train_dialogues']:>3} train / "
            f"{row['test_dialogues']:>2} test dialogues  {row['card']}"
        )
    print(f"wrote {args.out}/train.jsonl, test.jsonl and cards/")
    return 0


def _character_commands(sub: argparse._SubParsersAction) -> None:
    chars = sub.add_parser("characters", help="list the catalog (default: the starter cast)")
    chars.add_argument("--store", default=None, help="character store folder")
    chars.add_argument("--json", action="store_true")
    chars.set_defaults(func=_characters)

    train = sub.add_parser("train", help="pre-tune blocks (the starter cast with --cast)")
    train.add_argument("--cast", action="store_true", help="rebuild the starter cast's blocks")
    train.add_argument("--store", default=None, help="store to write (default: the cast's)")
    train.add_argument("--cards", nargs="+", default=[], help="character cards (JSON or PNG)")
    train.add_argument("--data", nargs="+", default=[], help="dialogues (JSONL), any format")
    train.add_argument(
        "--baseline",
        choices=["shared-lora"],
        default=None,
        help="train the LoRA-Mix baseline (one shared LoRA) instead",
    )
    _train_args(train)
    train.set_defaults(func=_train)

    expand = sub.add_parser("expand", help="give one new character its own block")
    expand.add_argument("--store", required=True)
    expand.add_argument("--card", required=True, help="character card (JSON or PNG)")
    expand.add_argument("--data", required=True, help="the character's dialogues (JSONL)")
    _train_args(expand)
    expand.set_defaults(func=_expand)

    fuse = sub.add_parser("fuse", help="register a character by fusion (no training)")
    fuse.add_argument("--store", required=True)
    fuse.add_argument("--card", required=True, help="character card (JSON or PNG)")
    fuse.add_argument(
        "--gate",
        choices=("cosine", "learned"),
        default="cosine",
        help="fuse by similarity to role embeddings, or by the store's learned gate",
    )
    fuse.set_defaults(func=_fuse)

    ex = sub.add_parser(
        "export",
        help="a character as one PEFT LoRA adapter (shared + own, or shared + its mix; exact)",
    )
    ex.add_argument("--store", required=True)
    ex.add_argument("--character", required=True, help="name or alias")
    ex.add_argument("--out", required=True, help="adapter folder to write")
    ex.add_argument("--model", default="default", help="the model the store was trained on")
    ex.set_defaults(func=_export)

    ev = sub.add_parser(
        "eval",
        help="held-out NLL per character (own / fused / base / shared LoRA), speaker id",
        description="The shared-LoRA baseline is trained with the same budget options as "
        "`neeko train` (pass the ones the store was trained with) and cached; the output "
        "says where.",
    )
    ev.add_argument("--cast", action="store_true", help="the starter cast's held-out split")
    ev.add_argument("--store", default=None, help="character store to evaluate")
    ev.add_argument("--data", nargs="+", default=[], help="held-out dialogues (JSONL)")
    ev.add_argument(
        "--train-data", nargs="+", default=[], help="train the shared baseline on these"
    )
    ev.add_argument("--roles", default=None, help="JSONL of {description, character}")
    ev.add_argument(
        "--max-tokens", type=int, default=None, help="cut dialogues here (default: the model's)"
    )
    ev.add_argument("--no-speaker-id", action="store_true", help="skip speaker identification")
    ev.add_argument("--json", action="store_true")
    _train_args(ev, checkpoint=False)
    ev.set_defaults(func=_eval)


def _train_args(p: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    p.add_argument("--model", default="default", help="default | tiny | PATH | hub id")
    p.add_argument("--device", default=None)
    defaults = TRAIN_DEFAULTS
    p.add_argument("--epochs", type=int, default=defaults["epochs"], help="passes over the data")
    p.add_argument("--lr", type=float, default=defaults["lr"], help="AdamW learning rate")
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"], help="dialogues/step")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--seed", type=int, default=defaults["seed"], help="data order seed")
    p.add_argument(
        "--rank",
        type=int,
        default=None,
        help="rank of each character's block: a new store takes it (4 when not given), "
        "an existing store keeps its own",
    )
    p.add_argument(
        "--shared-rank",
        type=int,
        default=defaults["shared_rank"],
        help="rank of the shared block pre-tuning trains with the own blocks (0: none)",
    )
    stages = {
        "schedule": (
            ("joint", "staged", "own-first"),
            "train shared and own blocks together, the shared block first (staged), "
            "or the own blocks first",
        ),
        "shared_prompt": (
            ("card", "anonymous"),
            "the system prompt the shared block's own stage trains under: each "
            "character's card, or one that names no one (staged and own-first only)",
        ),
        "stage_data": (
            ("all", "split"),
            "what the two stages train on: every dialogue, or each character's dialogues "
            "dealt alternately between them (staged and own-first only)",
        ),
    }
    for key, (choices, text) in stages.items():
        flag = "--" + key.replace("_", "-")
        p.add_argument(flag, choices=choices, default=defaults[key], help=text)
    if checkpoint:
        p.add_argument("--checkpoint", default=None, help="folder to checkpoint to / resume from")


def _train_config(args: argparse.Namespace):  # noqa: ANN202 (lazy import of TrainConfig)
    from neeko.train import TrainConfig

    return TrainConfig(
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        seed=args.seed,
        rank=args.rank,
        shared_rank=args.shared_rank,
        schedule=args.schedule,
        shared_prompt=args.shared_prompt,
        stage_data=args.stage_data,
    )


def read_card_file(path: str):  # noqa: ANN201 (CharacterCard is imported lazily)
    """A card from a file (see `neeko.cards.read_card_file`)."""
    from neeko.cards import read_card_file as read

    return read(path)


def _characters(args: argparse.Namespace) -> int:
    from neeko.catalog import Catalog
    from neeko.runtime import CAST_STORE

    catalog = Catalog.open(args.store or CAST_STORE)
    rows = [
        {"name": c.name, "aliases": list(c.card.aliases), "status": c.status, "scope": c.scope}
        for c in catalog.visible()
    ]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
    for r in [] if args.json else rows:
        aliases = f" (also: {', '.join(r['aliases'])})" if r["aliases"] else ""
        print(f"{r['name']}{aliases} [{r['status']}]")
    return 0


def _train(args: argparse.Namespace) -> int:
    from neeko.runtime import CAST_STORE
    from neeko.store_ops import shared_baseline, train_cast, train_store

    cfg = _train_config(args)
    if args.baseline:
        members = _members(args)
        shared = shared_baseline(members, args.model, cfg, args.device)
        done = "trained" if shared.trained else "found (already trained)"
        print(
            f"shared LoRA of rank {shared.bank.config.rank} on {len(members)} characters "
            f"{done}: {shared.path}"
        )
        return 0
    if args.cast:
        catalog, report = train_cast(
            args.store or CAST_STORE, args.model, cfg, args.device, args.checkpoint
        )
    else:
        if not args.store or not args.cards or not args.data:
            raise _usage("train needs --cast, or --store with --cards and --data")
        catalog, report = train_store(
            args.store,
            [read_card_file(p) for p in args.cards],
            _dialogues(args.data),
            args.model,
            cfg,
            args.device,
            args.checkpoint,
        )
    print(
        f"trained {len(catalog.trained())} characters in {report.steps} steps "
        f"(final loss {report.final_loss:.3f}) into {catalog.folder}"
    )
    return 0


def _members(args: argparse.Namespace) -> list:
    from neeko.characters import read_cast
    from neeko.dialogues import read_dialogues
    from neeko.store_ops import group_by_character

    if args.cast:
        return [(m.card, read_dialogues(m.train)) for m in read_cast()]
    return group_by_character([read_card_file(p) for p in args.cards], _dialogues(args.data))


def _dialogues(paths: list[str]) -> list:
    from neeko.dialogues import read_dialogues

    return [d for p in paths for d in read_dialogues(p)]


def _usage(message: str) -> Exception:
    from neeko.errors import NeekoError

    return NeekoError(message)


def _expand(args: argparse.Namespace) -> int:
    from neeko.dialogues import read_dialogues
    from neeko.store_ops import expand_store

    card = read_card_file(args.card)
    rt, report = expand_store(
        args.store, card, read_dialogues(args.data), args.model, _train_config(args), args.device
    )
    print(
        f"{card.name}: trained block {rt.slots[rt.catalog.find(card.name).key]} in {report.steps} "
        f"steps (final loss {report.final_loss:.3f}); other blocks unchanged"
    )
    return 0


def _fuse(args: argparse.Namespace) -> int:
    from neeko.gating import GateConfig
    from neeko.store_ops import fuse_card

    card = read_card_file(args.card)
    catalog, seconds = fuse_card(args.store, card, GateConfig(policy=args.gate))
    weights = catalog.find(card.name).mix
    mix = ", ".join(f"{catalog.require(k).name} {w:.2f}" for k, w in weights.items())
    print(
        f"{card.name}: fused from {mix or 'nothing (no trained characters)'} "
        f"in {seconds * 1e3:.0f} ms"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from neeko.characters import CatalogError
    from neeko.peft_io import export_adapter
    from neeko.runtime import open_runtime

    rt = open_runtime(args.store, args.model, "cpu")
    char = rt.catalog.find(args.character)
    if char is None:
        raise CatalogError(f"no character is called {args.character!r} in {args.store}")
    gate = rt.gate(char.key)
    folder = export_adapter(rt.bank, gate, args.out, base_model=rt.loaded.name)
    rank = len([w for w in gate.values() if w]) * rt.bank.config.rank
    print(f"{char.name}: PEFT LoRA adapter of rank {rank} in {folder}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from neeko.store_ops import eval_cast, eval_store, read_roles

    cfg = _train_config(args)
    if args.cast:
        result = eval_cast(args.model, cfg, args.device, args.max_tokens)
    elif args.store and args.data:
        roles = read_roles(Path(args.roles)) if args.roles else None
        result = eval_store(
            args.store,
            _dialogues(args.data),
            args.model,
            _dialogues(args.train_data) or None,
            roles,
            cfg,
            args.device,
            args.max_tokens,
            not args.no_speaker_id,
        )
    else:
        raise _usage("eval needs --cast, or --store with --data")
    if args.json:
        print(json.dumps(result))
        return 0
    for name, row in result["characters"].items():
        cells = "  ".join(f"{k}={v:.3f}" for k, v in row.items() if k.startswith("nll"))
        print(f"{name:<28} {cells}  [{row['status']}]")
    print(f"{'mean':<28} " + "  ".join(f"{k}={v:.3f}" for k, v in result["mean"].items()))
    for label, c in result["compare"].items():
        print(f"{label}: lower for {c['own_lower']} of {c['of']}, mean gain {c['mean_gain']:.3f}")
    if "speaker_id" in result:
        sid = result["speaker_id"]
        low, high = sid["ci95"]
        print(
            f"speaker identification: {sid['accuracy']:.3f} over {sid['turns']} turns "
            f"(95% interval {low:.3f}-{high:.3f}; chance {sid['chance']:.3f})"
        )
        for name, h in sid["by_character"].items():
            misses = sorted(((n, g) for g, n in h["guesses"].items() if g != name), reverse=True)
            went = ", ".join(f"{g} {n}" for n, g in misses)
            print(f"  {name:<26} {h['hits']}/{h['turns']}" + (f"  (else: {went})" if went else ""))
        if words := sid.get("words"):
            print(
                f"  words alone (naive Bayes on the training turns): {words['accuracy']:.3f} "
                f"({words['hits']}/{words['turns']})"
            )
    cut = result["cut"]
    print(
        f"cut at {cut['max_tokens']} tokens: {cut['dialogues_cut']} dialogues, "
        f"{cut['tokens_dropped']} character tokens dropped"
    )
    if "baseline" in result:
        b = result["baseline"]
        how = "trained now" if b["trained_now"] else "cached"
        print(f"shared LoRA baseline (rank {b['rank']}, {how}): {b['path']}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Every starter-cast member and a fused persona answer one question, in one batch."""
    from neeko.catalog import Catalog
    from neeko.characters import system_prompt
    from neeko.engine import GenerationRequest, SamplingParams
    from neeko.runtime import CAST_STORE, open_runtime, untrained_cast_runtime

    store = Path(args.store) if args.store else CAST_STORE
    trained_on = Catalog.open(store).model if (store / "manifest.json").exists() else ""
    if trained_on == args.model:
        rt = open_runtime(store, args.model, args.device, decode=args.decode)
    else:
        print(
            f"neeko: {store} holds no blocks for model {args.model!r}, so the cast plays from "
            f"their profiles with empty blocks; `neeko train --cast --model {args.model} "
            f"--store {store}` trains them",
            file=sys.stderr,
        )
        rt = untrained_cast_runtime(args.model, args.device, args.decode)
    print(
        f"model: {args.model} on {rt.loaded.device} ({rt.loaded.dtype}); bank: "
        f"{rt.bank.n_blocks} blocks of rank {rt.bank.config.rank} on "
        f"{len(rt.bank.module_names)} layers\n\nUser: {DEMO_QUESTION}\n"
    )
    sampling = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=0.7, top_p=0.9, seed=7
    )
    speakers = [(c.name, system_prompt(c.card), rt.gate(c.key)) for c in rt.catalog.trained()]
    speakers.append(
        (
            f"(fused) {DEMO_PERSONA}",
            f"You are {DEMO_PERSONA}.",
            rt.persona_gate(DEMO_PERSONA),
        )
    )
    requests = [
        GenerationRequest(
            [{"role": "system", "content": system}, {"role": "user", "content": DEMO_QUESTION}],
            gate,
            sampling,
        )
        for _, system, gate in speakers
    ]
    t0 = time.perf_counter()
    results = rt.engine.generate(requests)
    wall = time.perf_counter() - t0
    for (name, _, _), res in zip(speakers, results, strict=True):
        print(f"{name}: {res.text.strip()}\n")
    tokens = sum(r.completion_tokens for r in results)
    print(f"[{len(results)} characters in one batch: {tokens} tokens in {wall:.1f} s]")
    return 0


def _chat(args: argparse.Namespace) -> int:
    import asyncio

    from neeko.settings import ChatSettings
    from neeko.terminal import chat

    env = ChatSettings()
    default_db = Path.home() / ".local" / "share" / "neeko" / "terminal.db"
    overrides = {
        "model": args.model,
        "device": args.device,
        "store": args.store or env.store,
        "db_path": args.db or os.environ.get("NEEKO_DB_PATH") or str(default_db),
        "cooldown_s": 0.0,
        "reply_tokens": args.max_new_tokens or env.reply_tokens,
    }
    settings = env.model_copy(update=overrides)
    return asyncio.run(chat(settings, args.channel, args.user))


def _bench_engine(args: argparse.Namespace) -> int:
    from neeko.bench import run_engine_bench

    result = run_engine_bench(args.model, quick=args.quick, device=args.device, rounds=args.rounds)
    return _print_result(result, args.json)


def _bench_queue(args: argparse.Namespace) -> int:
    from neeko.bench_queue import run_queue_bench

    result = run_queue_bench(args.model, args.quick, args.device, args.redis_url)
    return _print_result(result, args.json)


def _print_result(result: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(result))
    else:
        width = max(len(k) for k in result)
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
