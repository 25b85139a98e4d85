"""Accelerated neuron importance on SmolLM2-135M-Instruct: speed against a forward pass and
against brute force, and peak memory of the q/k work against prompt length.

Run: ``make bench-importance`` (``python benchmarks/bench_importance.py``). Prints:
- importance time / plain forward time on the same batches (goal <= 1.5), the best of three runs
  after a first one that compiles the fused q/k kernel, and tokens per second;
- brute-force time / importance time, with brute force (one forward per deactivated neuron,
  Eq. 1) timed on a subset of neurons in layers 0, 15 and 29 and extrapolated to every neuron:
  once with full forwards (what ``ablation_importance`` does) and once as if each forward
  stopped right after the neuron's layer (the cheapest brute force) (goal >= 100);
- peak extra memory of ``qk_importance`` (the l x l x d_head work) for prompt lengths 64 -> 1024
  at a fixed ``chunk_bytes``, each length in a fresh process. Short prompts need less than the
  cap; the goal is that no length goes past 1.5x ``chunk_bytes`` (flat instead of l^2 d growth).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safety_circuits import data, load_model
from safety_circuits._memory import PeakMemory
from safety_circuits.activations import batches
from safety_circuits.families import AttnGeometry
from safety_circuits.importance import ablation_importance, neuron_importance, qk_importance
from safety_circuits.neurons import KINDS, kind_size, total_neurons


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speed(args: argparse.Namespace) -> None:
    subject = load_model(args.model)
    prompts = data.harmbench("val")[: args.prompts]
    tokens = sum(int(b.attention_mask.sum()) for b in batches(subject, prompts, batch_size=args.batch))

    def forward() -> None:
        with torch.no_grad():
            for b in batches(subject, prompts, batch_size=args.batch):
                subject.tl(b.input_ids, attention_mask=b.attention_mask, return_type=None)

    def importance() -> None:
        neuron_importance(subject, prompts, batch_size=args.batch, progress=False)

    forward()  # warm-up
    t_first = timed(importance)  # compiles the fused q/k kernel (once per process)
    t_forward = min(timed(forward) for _ in range(3))
    t_importance = min(timed(importance) for _ in range(3))
    print(f"{args.model}: {len(prompts)} HarmBench prompts, {tokens} tokens, batch {args.batch}")
    print(f"  plain forward      {t_forward:7.2f} s   (to the logits)")
    print(f"  first importance   {t_first:7.2f} s   (compiling the q/k kernel included)")
    print(f"  neuron importance  {t_importance:7.2f} s   ratio {t_importance / t_forward:.2f} (goal <= 1.5)")
    n_all = total_neurons(subject.arch)
    print(f"  importance speed   {tokens / t_importance:7.0f} tokens/s, all {n_all} neurons")

    prompt = prompts[0]
    per_prompt = t_importance / len(prompts)
    arch = subject.arch
    sampled, seconds, weighted = 0, 0.0, 0.0
    for layer in (0, arch.n_layers // 2, arch.n_layers - 1):
        for kind in KINDS:
            n = min(args.brute_neurons, kind_size(arch, kind))
            t = timed(
                lambda l=layer, k=kind, n=n: ablation_importance(subject, prompt, l, k, indices=range(n))
            )
            sampled, seconds = sampled + n, seconds + t
            weighted += t * (layer + 1) / arch.n_layers
    per_neuron, per_neuron_truncated = seconds / sampled, weighted / sampled
    everything = total_neurons(arch)
    print(f"  brute force        {per_neuron * 1e3:7.1f} ms per neuron ({sampled} neurons timed)")
    print(
        f"  brute / importance {per_neuron * everything / per_prompt:9.0f}x with full forwards, "
        f"{per_neuron_truncated * everything / per_prompt:.0f}x if each stopped at its layer (goal >= 100)"
    )


def memory_one(length: int, chunk_bytes: int) -> None:
    """In a fresh process: peak RSS growth of qk_importance at one prompt length (SmolLM2 shapes)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(length, 9, 64, generator=g), torch.randn(length, 3, 64, generator=g)
    angles = torch.arange(length)[:, None] * 100000.0 ** (-torch.arange(32) / 32)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    geo = AttnGeometry(scale=64**-0.5, softcap=None, window=None, rotary=True)
    with PeakMemory(interval=0.001) as memory:
        qk_importance(q[None], k[None], geo, (cos[None], sin[None]), chunk_bytes=chunk_bytes)
    print(memory.extra_mb)


def memory(args: argparse.Namespace) -> None:
    print(f"  qk_importance peak extra memory at chunk_bytes={args.chunk_bytes / 2**20:.0f} MiB:")
    results = {}
    for length in (64, 256, 512, 1024):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-one", str(length), "--chunk-bytes", str(args.chunk_bytes)],
            capture_output=True,
            text=True,
            check=True,
        )
        results[length] = float(out.stdout.strip().splitlines()[-1])
        print(f"    length {length:5d}: {results[length]:7.1f} MiB")
    cap = args.chunk_bytes / 2**20
    print(
        f"  largest peak / chunk_bytes: {max(results.values()) / cap:.2f} (goal <= 1.5, whatever the length)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--brute-neurons", type=int, default=16, help="neurons timed per layer and kind")
    parser.add_argument("--chunk-bytes", type=int, default=64 * 2**20)
    parser.add_argument("--memory-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_one:
        memory_one(args.memory_one, args.chunk_bytes)
        return
    speed(args)
    memory(args)


if __name__ == "__main__":
    main()
