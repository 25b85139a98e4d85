"""Detect and SN-Tune the safety neurons data-parallel, and compare with a one-process run.

Every rank loads the model, scores its share of the HarmBench *val* batches
(:func:`~safety_circuits.distributed.neuron_importance_distributed`), selects the safety neurons
(the same NeuronSet on every rank), then SN-Tunes them on refusal documents with its share of each
batch and the gradients summed over the ranks (``tune(..., accelerator=)``). Rank 0 writes the
NeuronSet and the tuned HF folder to ``<out>/<N>proc/``; when the other run's folder is there
(``1proc`` after ``2proc``, or the reverse), it logs whether the NeuronSets are equal and the
largest weight and loss differences.

Run (CPU, gloo; ``nccl`` and one GPU per rank when CUDA is there), then as one process::

    torchrun --nproc_per_node 2 examples/tune_distributed.py
    python examples/tune_distributed.py

Options: ``--limit`` detection prompts (8), ``--documents`` refusal documents (16), both batched by
``--batch-size`` (4); ``--max-length`` (128), ``--epochs`` (1), ``--lr`` (2e-4); ``--fsdp``: with
several ranks, tune a copy sharded over them (FSDP2, ``tune(..., fsdp=True)``), written to
``<out>/<N>proc-fsdp/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch.distributed as dist
from accelerate import Accelerator
from safetensors.torch import load_file

import safety_circuits as sc
from safety_circuits.detect import select_neurons
from safety_circuits.distributed import init_from_env, is_main_process, neuron_importance_distributed
from safety_circuits.neurons import NeuronSet
from safety_circuits.tuning import refusal_documents, sn_tune


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=8, help="HarmBench val behaviours to detect on")
    parser.add_argument("--documents", type=int, default=16, help="refusal documents to tune on")
    parser.add_argument("--quantile", type=float, default=0.98)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--out", default="runs/tune_distributed")
    parser.add_argument("--fsdp", action="store_true", help="shard the tuned copy over the ranks (FSDP2)")
    args = parser.parse_args()
    device = init_from_env()
    accelerator = Accelerator(cpu=device.type == "cpu")
    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING, format="%(message)s")
    subject = sc.load_model(args.model, device=device)
    prompts = sc.harmbench("val")

    start = time.perf_counter()
    importance = neuron_importance_distributed(
        subject, prompts[: args.limit], batch_size=args.batch_size, progress=is_main_process()
    )
    safety = select_neurons(importance, quantile=args.quantile).with_metadata(name="safety")
    detected = time.perf_counter()
    documents = refusal_documents(prompts[: args.documents])
    options = {"batch_size": args.batch_size, "max_length": args.max_length, "epochs": args.epochs}
    fsdp = args.fsdp and accelerator.num_processes > 1
    result = sn_tune(subject, documents, safety, accelerator=accelerator, lr=args.lr, fsdp=fsdp, **options)
    tuned = time.perf_counter()

    out = Path(args.out) / f"{accelerator.num_processes}proc{'-fsdp' if fsdp else ''}"
    if is_main_process():
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out, ignore_errors=True)
    accelerator.wait_for_everyone()
    result.save(out / "tuned")  # the main process writes, the others wait for it
    if is_main_process():
        safety.save(out / "safety.safetensors")
        times = {"detect_s": detected - start, "tune_s": tuned - detected, "loop_s": result.record["seconds"]}
        (out / "times.json").write_text(json.dumps(times))
        logging.info(
            "%d rank(s): %d safety neurons from %d prompts in %.1f s; SN-Tune on %d documents, %d steps "
            "in %.1f s, losses %s",
            accelerator.num_processes,
            len(safety),
            len(importance),
            times["detect_s"],
            len(documents),
            len(result.losses),
            times["tune_s"],
            [round(loss, 6) for loss in result.losses],
        )
        for other in sorted(out.parent.glob("*proc*")):
            if other != out and (other / "tuned" / "tuning.json").exists():
                compare(out, other, subject)
    if dist.is_initialized():
        dist.destroy_process_group()


def compare(run: Path, other: Path, subject: sc.Subject) -> None:
    """Log whether the two runs selected the same neurons, and how far their tuned weights and losses are."""
    same = NeuronSet.load(run / "safety.safetensors") == NeuronSet.load(other / "safety.safetensors")
    mine, theirs = (load_file(folder / "tuned" / "model.safetensors") for folder in (run, other))
    original = subject.hf.state_dict()
    weight = max((mine[name] - theirs[name]).abs().max().item() for name in mine)
    moved = max((mine[name] - original[name]).abs().max().item() for name in mine)
    losses = [json.loads((folder / "tuned" / "tuning.json").read_text())["losses"] for folder in (run, other)]
    relative = max(abs(a - b) / abs(b) for a, b in zip(*losses, strict=True))
    logging.info(
        "%s vs %s: same NeuronSet: %s; max |weight difference| %.3g (the largest change by tuning: %.3g); "
        "max relative loss difference %.3g",
        run.name,
        other.name,
        same,
        weight,
        moved,
        relative,
    )


if __name__ == "__main__":
    main()
