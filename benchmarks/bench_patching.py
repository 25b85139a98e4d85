"""Dynamic activation patching and activation contrasting on SmolLM2-135M-Instruct.

Run: ``python benchmarks/bench_patching.py``. Prints:
- generated tokens per second of dynamic patching (``PatchedDecoder``: the source model runs in
  lockstep with the target, both with KV caches, a share of the FFN and ``o`` neurons patched at
  every step) against plain greedy generation of the target alone, on the same batches, runs
  interleaved, best of ``--repeats``. Two models run, so about 0.5 (the source skips its
  unembedding, so a little more); the goal is >= 0.45.
  The original model serves as both target and source (the same tokens come out, so both runs
  generate exactly as many tokens);
- peak extra memory (RSS) of ``contrast_activations`` (generation-time contrast, all FFN and ``o``
  neurons) for 8, 32 and 64 prompts, each in a fresh process. The prompts cycle through the same 8
  HarmBench behaviours, so every run has the same batches and only their number grows. The
  statistics are streamed (running sums, one batch of activations alive at a time), so the peak
  should not grow with the number of prompts (goal: flat). The processes run with a fixed glibc
  mmap threshold (``MALLOC_MMAP_THRESHOLD_=131072``), so that every large tensor is mapped and
  unmapped on its own and RSS follows the memory actually alive; with glibc's default (a
  threshold that grows after each large free) freed tensors stay in the heap, fragmented by the
  ever-changing KV-cache and batch sizes, and the RSS peak varies by 2x from run to run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from contextlib import nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from safety_circuits import NeuronSet, data, load_model
from safety_circuits._memory import PeakMemory
from safety_circuits.activations import batches
from safety_circuits.contrast import contrast_activations, generation_steps
from safety_circuits.evaluate import decoder_for, greedy_decode, stop_ids
from safety_circuits.neurons import kind_size
from safety_circuits.patching import PatchedDecoder


def random_neurons(arch, fraction: float, kinds=("ffn", "o"), seed: int = 0) -> NeuronSet:
    rng = np.random.default_rng(seed)
    return NeuronSet(
        arch,
        {
            (layer, kind): rng.choice(
                kind_size(arch, kind), round(fraction * kind_size(arch, kind)), replace=False
            )
            for layer in range(arch.n_layers)
            for kind in kinds
        },
        name=f"random {fraction:g}",
    )


def speed(args: argparse.Namespace) -> None:
    subject = load_model(args.model)
    prompts = data.harmbench("val")[: args.prompts]
    neurons = random_neurons(subject.arch, args.fraction)
    stop, pad = stop_ids(subject), subject.tokenizer.pad_token_id
    batch_list = list(batches(subject, prompts, batch_size=args.batch))

    def run(make_decoder) -> tuple[float, int]:
        tokens, start = 0, time.perf_counter()
        with torch.no_grad():
            for b in batch_list:
                decoder = make_decoder()
                with decoder if isinstance(decoder, PatchedDecoder) else nullcontext():
                    new = greedy_decode(decoder, b.input_ids, b.attention_mask, args.new_tokens, stop, pad)
                tokens += int(generation_steps(new, stop).sum())
        return time.perf_counter() - start, tokens

    def plain():
        return decoder_for(subject)

    def patched():
        return PatchedDecoder(subject, subject, neurons)

    run(plain)  # warm-up
    times: dict[str, list[float]] = {"plain": [], "patched": []}
    counts = {}
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("patched", patched)):
            seconds, tokens = run(fn)
            times[name].append(seconds)
            counts[name] = tokens
    assert counts["plain"] == counts["patched"], counts
    rate = {name: counts[name] / min(t) for name, t in times.items()}
    print(
        f"{args.model}: {len(prompts)} HarmBench val prompts, batch {args.batch}, up to {args.new_tokens} "
        f"new tokens ({counts['plain']} generated), {len(neurons)} neurons patched "
        f"({100 * neurons.fraction_of(kinds=['ffn', 'o']):.1f}% of FFN + o)"
    )
    print(f"  plain generation   {rate['plain']:7.1f} tokens/s (best of {args.repeats})")
    print(f"  dynamic patching   {rate['patched']:7.1f} tokens/s")
    print(
        f"  ratio patched / plain {rate['patched'] / rate['plain']:.3f} "
        "(two models run: about 0.5, a little more as the source skips its unembedding; goal >= 0.45)"
    )


def memory_one(n_prompts: int, args: argparse.Namespace) -> None:
    """In a fresh process: peak RSS growth of contrast_activations on ``n_prompts`` prompts."""
    subject = load_model(args.model)
    base = data.harmbench("val")[: args.batch]
    prompts = [base[i % len(base)] for i in range(n_prompts)]
    with PeakMemory(interval=0.002) as memory:
        start = time.perf_counter()
        scores = contrast_activations(
            subject,
            subject,
            prompts,
            kinds=("ffn", "o"),
            max_new_tokens=args.contrast_tokens,
            batch_size=args.batch,
        )
        seconds = time.perf_counter() - start
    print(f"{memory.extra_mb} {scores.n_tokens} {seconds} {scores.n_neurons}")


def memory(args: argparse.Namespace) -> None:
    print(
        f"  contrast_activations peak extra memory (all FFN and o neurons, batch {args.batch}, "
        f"{args.contrast_tokens} new tokens):"
    )
    results = {}
    for n in args.memory_prompts:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-one", str(n), *sys.argv[1:]],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
        )
        mib, tokens, seconds, neurons = out.stdout.strip().splitlines()[-1].split()
        results[n] = float(mib)
        kept = 2 * int(tokens) * int(neurons) * 4 / 2**20  # both models' float32 activations
        print(
            f"    {n:4d} prompts: {float(mib):7.1f} MiB "
            f"({tokens} tokens contrasted in {float(seconds):.1f} s; keeping every activation of both "
            f"models would take {kept:.0f} MiB)"
        )
    small, large = results[min(results)], results[max(results)]
    print(f"  peak at {max(results)} / peak at {min(results)} prompts: {large / small:.2f} (goal: flat, ~1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--fraction", type=float, default=0.05, help="share of FFN and o neurons patched")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--contrast-tokens", type=int, default=16)
    parser.add_argument("--memory-prompts", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_one:
        memory_one(args.memory_one, args)
        return
    if not args.skip_speed:
        speed(args)
    if not args.skip_memory:
        memory(args)


if __name__ == "__main__":
    main()
