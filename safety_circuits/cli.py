"""The ``safety-circuits`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

from safety_circuits import data
from safety_circuits._io import atomic_folder
from safety_circuits.evaluate import attack_success_rate, over_refusal_rate
from safety_circuits.loading import SMOLLM2, load_model


def cmd_evaluate(args: argparse.Namespace) -> int:
    """ASR on held-out HarmBench test behaviours and over-refusal on the harmless eval split."""
    start = time.perf_counter()
    subject = load_model(args.model, backend=args.backend)
    harmful = data.sample(data.harmbench("test"), args.harmful, seed=args.seed)
    harmless = data.sample(data.harmless("eval"), args.harmless, seed=args.seed)
    gen = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}
    asr = attack_success_rate(subject, harmful, **gen)
    over = over_refusal_rate(subject, harmless, **gen)
    seconds = time.perf_counter() - start
    summary = {
        "model": args.model,
        "backend": args.backend,
        "harmful_prompts": len(harmful),
        "harmless_prompts": len(harmless),
        "asr": asr.rate,
        "over_refusal": over.rate,
        "seconds": round(seconds, 1),
        **gen,
        "seed": args.seed,
    }
    frames = {"harmbench_test.csv": asr.to_frame(), "harmless_eval.csv": over.to_frame()}
    files = {name: frame.to_csv(index=False) for name, frame in frames.items()}
    with atomic_folder(args.out, overwrite=True) as tmp:
        for name, text in {"summary.json": json.dumps(summary, indent=2), **files}.items():
            (tmp / name).write_text(text)
    print(f"model {args.model} ({args.backend} backend), greedy, {args.max_new_tokens} new tokens")
    print(f"ASR on {len(harmful)} HarmBench test behaviours:   {asr.rate:.2f}")
    print(f"over-refusal on {len(harmless)} harmless prompts: {over.rate:.2f}")
    print(f"{seconds:.0f} s; responses in {args.out}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safety-circuits", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help=cmd_evaluate.__doc__)
    ev.add_argument("--model", default=SMOLLM2, help="hub id, local HF folder or built-in name")
    ev.add_argument("--backend", choices=("hooked", "bridge"), default="hooked")
    ev.add_argument("--harmful", type=int, default=50, help="HarmBench test behaviours to sample")
    ev.add_argument("--harmless", type=int, default=50, help="harmless eval prompts to sample")
    ev.add_argument("--max-new-tokens", type=int, default=48)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", default="runs/evaluate", help="run folder (replaced atomically)")
    ev.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
