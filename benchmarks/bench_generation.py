"""Greedy HF generation and next-token log-probabilities with and without the shared prefix.

Run: ``python benchmarks/bench_generation.py``. On SmolLM2-135M-Instruct, with the main job's
evaluation prompts (50 HarmBench test + 50 harmless eval prompts and the 180 capability
questions, 16 new tokens, batches of 192), prints the seconds of:
- ``generate(use="hf")``: :class:`~safety_circuits.evaluate.HFDecoder` with the chat template's
  shared system turn run once per batch (``share_prefix=True``, the default) against the plain
  left-padded prefill (``share_prefix=False``); both with the LM head at the last position only;
- :func:`~safety_circuits.ablation.next_token_logprobs` (the KL measurement) through the HF path
  (shared prefix) against the TransformerLens forward.
Runs interleaved, best of ``--repeats``; it also checks that both ways generate the same tokens.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from safety_circuits import data, load_model
from safety_circuits.ablation import next_token_logprobs
from safety_circuits.activations import batches
from safety_circuits.evaluate import HFDecoder, greedy_decode, stop_ids


def best(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=192)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    subject = load_model(args.model)
    prompts = (
        data.sample(data.harmbench("test"), 50)
        + data.sample(data.harmless("eval"), 50)
        + data.capability_questions()["question"].tolist()
    )
    stop, pad = stop_ids(subject), subject.tokenizer.pad_token_id
    batch_list = list(batches(subject, prompts, batch_size=args.batch))

    def run(share: bool) -> list[torch.Tensor]:
        decoder = HFDecoder(subject.hf, share_prefix=share)
        return [
            greedy_decode(decoder, b.input_ids, b.attention_mask, args.new_tokens, stop, pad)
            for b in batch_list
        ]

    run(True)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    tokens = {}
    for _ in range(args.repeats):
        for share in (True, False):
            seconds, tokens[share] = best(lambda s=share: run(s), 1)
            times[share].append(seconds)
    same = all(torch.equal(a, b) for a, b in zip(tokens[True], tokens[False], strict=True))
    t_shared, t_plain = min(times[True]), min(times[False])
    harmless = prompts[50:100]
    t_hf, _ = best(
        lambda: next_token_logprobs(subject, harmless, batch_size=args.batch, use="hf"), args.repeats
    )
    t_tl, _ = best(
        lambda: next_token_logprobs(subject, harmless, batch_size=args.batch, use="tl"), args.repeats
    )
    print(
        f"{args.model}: {len(prompts)} prompts, batch {args.batch}, {args.new_tokens} new tokens "
        f"(best of {args.repeats})"
    )
    print(f"  generate, shared prefix  {t_shared:6.1f} s")
    print(f"  generate, plain prefill  {t_plain:6.1f} s   ratio {t_shared / t_plain:.2f}x")
    print(f"  same tokens generated: {same}")
    print(f"  next-token log-probs of 50 prompts: HF (shared prefix) {t_hf:.1f} s, TL {t_tl:.1f} s")


if __name__ == "__main__":
    main()
