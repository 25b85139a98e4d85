"""Safety neurons with the importance computed data-parallel over ``torch.distributed`` ranks.

Every rank loads the model, scores its share of the HarmBench *val* batches and receives every
prompt's scores (:mod:`safety_circuits.distributed`); rank 0 writes the Importance and the safety
NeuronSet (``select_neurons(importance, quantile=0.98)``), equal to a one-process run's.

Run (CPU, gloo; ``nccl`` and one GPU per rank when CUDA is there)::

    torchrun --nproc_per_node 2 examples/detect_distributed.py --model smollm2-135m-instruct --limit 8

or without ``torchrun`` as one process (``python examples/detect_distributed.py``). Writes
``runs/detect_distributed/`` (``importance.safetensors``, ``safety.safetensors``).
"""

from __future__ import annotations

import argparse
import logging
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist

import safety_circuits as sc
from safety_circuits.detect import select_neurons
from safety_circuits.distributed import (
    init_from_env,
    is_main_process,
    neuron_importance_distributed,
    rank_and_world,
)


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=None, help="the first N HarmBench val behaviours only")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quantile", type=float, default=0.98)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--out", default="runs/detect_distributed")
    args = parser.parse_args()
    device = init_from_env()
    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING, format="%(message)s")
    world_size = rank_and_world()[1]
    subject = sc.load_model(args.model, device=device, dtype=getattr(torch, args.dtype))
    prompts = sc.harmbench("val")[: args.limit]
    start = time.perf_counter()
    importance = neuron_importance_distributed(
        subject, prompts, batch_size=args.batch_size, progress=is_main_process()
    )
    seconds = time.perf_counter() - start
    if is_main_process():
        safety = select_neurons(importance, quantile=args.quantile).with_metadata(name="safety")
        importance.save(f"{args.out}/importance.safetensors")
        safety.save(f"{args.out}/safety.safetensors")
        logging.info(
            "%d prompts on %d rank(s) in %.1f s: %d safety neurons (%.2f%% of all) -> %s",
            len(importance),
            world_size,
            seconds,
            len(safety),
            100 * safety.fraction_of(),
            args.out,
        )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
