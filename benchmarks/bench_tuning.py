"""SN-Tune mechanisms on SmolLM2-135M-Instruct: time and peak memory of one tuning run.

Run: ``make bench-tuning`` (``python benchmarks/bench_tuning.py``). Tunes the same documents
(refusals for HarmBench val prompts, batch 8, one epoch) three ways, each in a fresh process:
``delta`` (trainable deltas on side paths, the default), ``mask`` (whole parameters with masked
gradients, the baseline) and ``full`` (full fine-tuning), for a random NeuronSet of the size of
SmolLM2's safety set (0.66% of neurons). Prints seconds, peak extra memory and the ratios
against gradient masking and full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from safety_circuits import data, load_model
from safety_circuits.neurons import NeuronSet
from safety_circuits.tuning import refusal_documents, tune


def one(args: argparse.Namespace) -> None:
    subject = load_model(args.model)
    full = NeuronSet.full(subject.arch)
    g = torch.Generator().manual_seed(0)
    masks = {k: torch.rand(m.shape, generator=g) < args.fraction for k, m in full.masks().items()}
    neurons = NeuronSet.from_masks(subject.arch, masks)
    docs = refusal_documents(data.harmbench("val")[: args.documents])
    tune(subject, docs[:8], neurons, mechanism=args.one, progress=False)  # warm-up
    result = tune(subject, docs, neurons, mechanism=args.one, progress=False)
    record = {k: result.record[k] for k in ("seconds", "peak_memory_mb", "trained_parameters", "tokens")}
    print(json.dumps({**record, "neurons": len(neurons)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--documents", type=int, default=32)
    parser.add_argument("--fraction", type=float, default=0.0066, help="share of neurons tuned")
    parser.add_argument("--one", choices=("delta", "mask", "full"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args)
        return
    results = {}
    for mechanism in ("delta", "mask", "full"):
        cmd = [sys.executable, __file__, "--one", mechanism, "--model", args.model]
        cmd += ["--documents", str(args.documents), "--fraction", str(args.fraction)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[mechanism] = json.loads(out.stdout.strip().splitlines()[-1])
    tokens, neurons = results["delta"]["tokens"], results["delta"]["neurons"]
    print(f"{args.model}: {args.documents} documents ({tokens} tokens), 1 epoch, {neurons} neurons tuned")
    for name, r in results.items():
        print(
            f"  {name:5s}  {r['seconds']:6.1f} s  peak extra memory {r['peak_memory_mb']:7.0f} MiB  "
            f"trained parameters {r['trained_parameters']:,}"
        )
    d, m, f = results["delta"], results["mask"], results["full"]
    t_mask, t_full = d["seconds"] / m["seconds"], d["seconds"] / f["seconds"]
    print(f"  time   delta / mask {t_mask:.2f}, delta / full {t_full:.2f}")
    print(
        f"  memory delta / mask {d['peak_memory_mb'] / m['peak_memory_mb']:.2f}, "
        f"delta / full {d['peak_memory_mb'] / f['peak_memory_mb']:.2f}"
    )


if __name__ == "__main__":
    main()
