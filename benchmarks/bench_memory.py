"""The memory model of docs/scale.md against measured peaks, on SmolLM2-135M-Instruct and tiny models.

Run: ``make bench-memory`` (``python benchmarks/bench_memory.py``). Each job runs in a fresh process
with ``MALLOC_MMAP_THRESHOLD_=131072`` (every large tensor mapped and unmapped on its own, so
resident memory follows the tensors alive; see benchmarks/bench_patching.py) and prints the
peak resident memory it measured (``PeakMemory``, sampled every 5 ms), the peak the formulas of
``safety_circuits._memory`` predict, and their ratio:

- ``load``: ``load_model`` then building the hooked TransformerLens model, above the process
  after imports (predicted: three copies of the weights at the peak);
- ``importance``: ``neuron_importance`` (all kinds) of 8 HarmBench prompts, batch 4, above the
  loaded Subject;
- ``tune delta|mask|full``: one epoch of SN-Tune on 32 refusal documents, batch 8, for a random
  0.66% of neurons: the record's ``peak_memory_mb`` (above the Subject and the copy trained);
- ``patching``: two Subjects loaded and built, then dynamic patching of 8 prompts, 32 new tokens,
  above the process after imports;
- ``fsdp delta|mask|full``: the same tuning sharded with FSDP (``fsdp=True``) over ``--shards``
  (2) processes of ``torchrun`` (gloo), each measuring its own peak over the whole ``tune`` call
  above its resident Subject, and its peak until the end's whole copy is made (training), against
  ``tune_extra`` / ``tune_phases`` with ``shards``; one row per rank;
- ``saved (tiny ...)``: the bytes autograd saves for the backward pass of one tuning step, counted
  exactly with saved-tensor hooks, on the tiny Llama, Qwen2 and Mistral models and SmolLM2,
  against ``Shape.saved_per_token``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from safety_circuits import data, load_model
from safety_circuits._memory import (
    LLAMA3_8B,
    LLAMA3_70B,
    PeakMemory,
    Shape,
    gpus_needed,
    importance_extra,
    load_peak,
    patching_extra,
    predicted_saved,
    saved_bytes,
    sharded_gpus,
    subject_bytes,
    tune_extra,
    tune_phases,
    weight_bytes,
)
from safety_circuits.activations import batches, shared_prefix_length
from safety_circuits.neurons import NeuronSet, hf_slices
from safety_circuits.tuning import _length_buckets, _merged_slices, encode_documents, refusal_documents

MiB = 2**20
JOBS = ("load", "importance", "tune delta", "tune mask", "tune full", "patching")
SHARDED = ("fsdp delta", "fsdp mask", "fsdp full")


def random_neurons(arch, fraction: float) -> NeuronSet:
    g = torch.Generator().manual_seed(0)
    masks = {k: torch.rand(m.shape, generator=g) < fraction for k, m in NeuronSet.full(arch).masks().items()}
    return NeuronSet.from_masks(arch, masks)


def largest_step(
    subject, docs, mechanism: str, shape: Shape, batch_size: int = 8, shards: int = 1
) -> tuple[int, int]:
    """Tokens and response tokens of the tuning batch whose saved activations are the largest; with
    ``shards`` processes (FSDP), of the largest share of a batch, whole rows (no shared prefix)."""
    from safety_circuits.distributed import shard

    encoded = encode_documents(subject, docs)
    best = (0, 0, 0)
    lengths = [len(ids) for ids, _ in encoded]
    for batch in _length_buckets(lengths, batch_size, random.Random(0)):
        for rank in range(shards):
            mine = batch if shards == 1 else [batch[i] for i in shard(batch, rank=rank, world_size=shards)]
            rows = [encoded[i] for i in mine]
            width = max(len(ids) for ids, _ in rows)
            ids = torch.full((len(rows), width), -1)
            mask = torch.zeros_like(ids)
            for r, (row, _) in enumerate(rows):
                ids[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
            n = shared_prefix_length(ids, mask) if shards == 1 else 0
            tokens = n + len(rows) * (width - n)
            response = sum(sum(label != -100 for label in labels[1:]) for _, labels in rows)
            size = tokens * shape.saved_per_token(mechanism) * 4 + response * shape.d_vocab * 12
            best = max(best, (size, tokens, response))
    return best[1], best[2]


def trained_elements(subject, neurons: NeuronSet, mechanism: str) -> int:
    """Elements with gradients and AdamW state: the deltas, the parameters owning a neuron, or all."""
    if mechanism == "delta":
        slices = _merged_slices(hf_slices(neurons))
        params = {p: subject.hf.get_parameter(p) for p in slices}
        return sum(len(i) * (params[p].numel() // params[p].shape[a]) for p, (a, i) in slices.items())
    if mechanism == "mask":
        return sum(subject.hf.get_parameter(p).numel() for p in _merged_slices(hf_slices(neurons)))
    return sum(p.numel() for p in subject.hf.parameters())


def sharded_job(mechanism: str, model: str) -> dict | None:
    """One process of ``torchrun --nproc_per_node N``: SN-Tune sharded with FSDP (``fsdp=True``).
    Its own peak over the whole ``tune`` call, above the loaded Subject (the copy, its sharding,
    training and the gather at the end), and its peak until the end's whole copy is made
    (training); rank 0 returns every rank's rows."""
    import copy
    import types

    import torch.distributed as dist
    from accelerate import Accelerator

    import safety_circuits.tuning as tuning
    from safety_circuits.distributed import init_from_env

    init_from_env()
    accelerator = Accelerator(cpu=True)
    rank, shards = dist.get_rank(), dist.get_world_size()
    subject = load_model(model, device="cpu")
    shape = Shape.from_arch(subject.arch)
    neurons = random_neurons(subject.arch, 0.0066)
    docs = refusal_documents(data.harmbench("val")[:32])
    # the Subject's weights are mapped from the safetensors file, resident once read: read them now
    # (tune's agreement check would), so the baseline is the whole Subject the formula stands on
    for p in subject.hf.parameters():
        p.detach().sum()
    training, copies = PeakMemory(), []

    def deepcopy(x, *args):  # tune's second copy is the end's whole copy: training stops there
        copies.append(x)
        if len(copies) == 2:
            training.__exit__()
        return copy.deepcopy(x, *args)

    tuning.copy = types.SimpleNamespace(deepcopy=deepcopy)
    try:
        with PeakMemory() as memory, training:
            options = {"mechanism": mechanism, "progress": False, "accelerator": accelerator}
            result = tuning.tune(subject, docs, neurons, fsdp=True, **options)
    finally:
        tuning.copy = copy
    trained = trained_elements(subject, neurons, mechanism)
    tokens, response = largest_step(subject, docs, mechanism, shape, shards=shards)
    step = {"tokens": tokens, "response_tokens": response, "trained": trained}
    phases = tune_phases(shape, 4, mechanism, shards=shards, **step)
    detail = f"{trained:,} trained, largest share {tokens} tokens ({response} with a loss)"
    rows = [
        {
            "suffix": f"(rank {rank})",
            "measured": memory.peak - memory.start,
            "predicted": weight_bytes(shape, 4) + max(phases.values()),  # tune_extra
            "detail": f"whole tune call, {shards} processes; {detail}; "
            f"record {result.record['peak_memory_mb']:.0f} MiB",
        },
        {
            "suffix": f"training (rank {rank})",
            "measured": training.peak - training.start,
            "predicted": weight_bytes(shape, 4) + phases["training"],
            "detail": "until the end's whole copy",
        },
    ]
    everyone = [None] * shards
    dist.all_gather_object(everyone, rows)
    dist.destroy_process_group()
    return {"rows": [r for ranks in everyone for r in ranks]} if rank == 0 else None


def job(name: str, model: str) -> dict:
    """One measurement; runs in its own process. Bytes, float32 weights."""
    if name == "load":
        with PeakMemory() as memory:
            subject = load_model(model, device="cpu")
            subject.tl  # noqa: B018 (built on first use)
        shape = Shape.from_arch(subject.arch)
        return {"measured": memory.peak - memory.start, "predicted": load_peak(shape, 4)}
    subject = load_model(model, device="cpu")
    shape = Shape.from_arch(subject.arch)
    prompts = data.harmbench("val")
    if name == "importance":
        from safety_circuits.importance import neuron_importance

        subject.tl  # noqa: B018
        chosen = prompts[:8]
        width = max(b.input_ids.shape[1] for b in batches(subject, chosen, batch_size=4))
        neuron_importance(subject, chosen, batch_size=4, progress=False)  # compiles its q/k kernel
        with PeakMemory() as memory:
            neuron_importance(subject, chosen, batch_size=4, progress=False)
        return {
            "measured": memory.peak - memory.start,
            "predicted": importance_extra(shape, 4, batch=4, length=width, prompts=len(chosen)),
            "detail": f"batch 4 x {width} tokens",
        }
    if name.startswith("tune"):
        from safety_circuits.tuning import tune

        mechanism = name.split()[1]
        neurons = random_neurons(subject.arch, 0.0066)
        docs = refusal_documents(prompts[:32])
        result = tune(subject, docs, neurons, mechanism=mechanism, progress=False)
        trained = trained_elements(subject, neurons, mechanism)
        tokens, response = largest_step(subject, docs, mechanism, shape)
        predicted = tune_extra(shape, 4, mechanism, tokens=tokens, response_tokens=response, trained=trained)
        return {
            "measured": result.record["peak_memory_mb"] * MiB,
            "predicted": predicted,
            "detail": f"{trained:,} trained, largest step {tokens} tokens ({response} with a loss)",
        }
    if name == "patching":
        from safety_circuits.patching import dynamic_patching

        del subject
        neurons = None
        with PeakMemory() as memory:
            target, source = load_model(model, device="cpu"), load_model(model, device="cpu")
            target.tl, source.tl  # noqa: B018
            neurons = random_neurons(target.arch, 0.05)
            chosen = prompts[:8]
            width = max(b.input_ids.shape[1] for b in batches(target, chosen, batch_size=8))
            dynamic_patching(target, source, chosen, neurons, max_new_tokens=32, batch_size=8, progress=False)
        weights = subject_bytes(shape, 4)
        extra = patching_extra(shape, 4, batch=8, length=width + 32)
        return {
            "measured": memory.peak - memory.start,
            "predicted": max(weights + load_peak(shape, 4), 2 * weights + extra),
            "detail": f"max(second TL build, 2 Subjects + KV caches and logits of 8 x {width + 32} tokens)",
        }
    raise ValueError(name)


def saved(family: str, mechanism: str) -> dict:
    """Bytes autograd saves in one tuning step of 8 documents, counted exactly, against the formula."""
    from safety_circuits.testing import tiny_subject

    subject = (
        tiny_subject(family) if family != "smollm2" else load_model("smollm2-135m-instruct", device="cpu")
    )
    docs = refusal_documents(data.harmbench("val")[:8])
    measured, tokens, response = saved_bytes(subject, docs, random_neurons(subject.arch, 0.05), mechanism)
    shape = Shape.from_arch(subject.arch)
    predicted = predicted_saved(shape, 4, mechanism, tokens=tokens, response_tokens=response)
    return {
        "measured": measured,
        "predicted": predicted,
        "detail": f"{tokens} tokens, {response} with a loss",
    }


def llama3_table() -> None:
    """docs/scale.md's Llama-3-8B / 70B rows from the formulas (bf16; GB = 1e9 bytes): importance at
    batch 8 x 512 tokens, SN-Tune on 8 documents x 256 tokens with 64 response tokens each (``delta``:
    1% of the neurons), dynamic patching of 8 x (512 + 256) tokens; SN-Tune sharded with FSDP over
    N processes of one GPU each: the per-process peak (and training's, before the end's gather), and
    the fewest processes that fit (:func:`sharded_gpus`)."""
    b, gb = 2, 1e9
    for shape in (LLAMA3_8B, LLAMA3_70B):
        per_layer = {  # neurons of each kind in a layer, and the weights one of them owns
            "q": (shape.n_heads * shape.d_head, shape.d_model),
            "k": (shape.d_kv, shape.d_model),
            "v": (shape.d_kv, shape.d_model),
            "o": (shape.n_heads * shape.d_head, shape.d_model),
            "ffn": (shape.d_mlp, 3 * shape.d_model),
        }
        trained = {
            "delta": int(0.01 * shape.n_layers * sum(n * size for n, size in per_layer.values())),
            "mask": shape.n_layers * (shape.layer_params - 2 * shape.d_model),
            "full": shape.params,
        }
        importance = subject_bytes(shape, b) + importance_extra(shape, b, batch=8, length=512, prompts=0)
        rows = {
            "load (HF + tl; peak while tl builds)": load_peak(shape, b),
            "importance (Subject with tl; scores in host memory)": importance,
            "dynamic patching (2 Subjects with tl)": 2 * subject_bytes(shape, b)
            + patching_extra(shape, b, batch=8, length=768),
        }
        for mechanism, n in trained.items():
            extra = tune_extra(shape, b, mechanism, tokens=8 * 256, response_tokens=8 * 64, trained=n)
            rows[f"SN-Tune {mechanism} (HF + the copy trained)"] = 2 * weight_bytes(shape, b) + extra
        copy = weight_bytes(shape, b) / gb
        print(f"{shape.name}: {shape.params / 1e9:.2f} B parameters, one bf16 copy {copy:.1f} GB")
        for what, total in rows.items():
            print(f"  {what:52s} {total / gb:7.1f} GB  {gpus_needed(total)} x 80 GB")
        # FSDP: N processes, one GPU each, each with its share (whole rows) of the batch
        for mechanism, n in trained.items():
            fewest = sharded_gpus(shape, b, mechanism, tokens=8 * 256, response_tokens=8 * 64, trained=n)
            cells = []
            for shards in sorted({2, 8, fewest or 8}):
                share = {"tokens": -(-8 * 256 // shards), "response_tokens": -(-8 * 64 // shards)}
                phases = tune_phases(shape, b, mechanism, shards=shards, trained=n, **share)
                whole = 2 * weight_bytes(shape, b)
                cells.append(
                    f"N={shards}: {(whole + max(phases.values())) / gb:.1f} GB "
                    f"(training {(whole + phases['training']) / gb:.1f})"
                )
            need = f"{fewest} x 80 GB" if fewest else "none: two whole copies per process"
            print(f"  SN-Tune {mechanism}, FSDP, per process: {'; '.join(cells)}  {need}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--jobs", nargs="*", default=list(JOBS + SHARDED), choices=JOBS + SHARDED)
    parser.add_argument("--shards", type=int, default=2, help="processes of the fsdp jobs (torchrun)")
    parser.add_argument("--saved", nargs="*", default=["llama", "qwen2", "mistral", "smollm2"])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--table", action="store_true", help="print the Llama-3-8B/70B table only")
    args = parser.parse_args()
    if args.table:
        llama3_table()
        return
    if args.one:
        kind, _, rest = args.one.partition(":")
        if kind == "fsdp":
            out = sharded_job(rest, args.model)
            if out is not None:
                print(json.dumps(out))
            return
        out = job(rest, args.model) if kind == "job" else saved(*rest.split(","))
        print(json.dumps(out))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    runs = [(f"{args.model}: {name}", f"job:{name}") for name in args.jobs if name in JOBS]
    runs += [(f"{args.model}: {name}", f"fsdp:{name.split()[1]}") for name in args.jobs if name in SHARDED]
    for family in args.saved:
        for mechanism in ("delta", "mask", "full"):
            runs.append((f"saved ({family}, {mechanism})", f"saved:{family},{mechanism}"))
    rows = []
    print(f"{'job':52s} {'measured MiB':>13s} {'predicted MiB':>14s} {'pred/meas':>9s}  detail")
    for label, one in runs:
        cmd = [sys.executable, __file__, "--one", one, "--model", args.model]
        if one.startswith("fsdp:"):  # N processes, each measuring its own peak
            cmd[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(args.shards)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            print(f"{label:52s} failed:\n{out.stderr[-2000:]}")
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        for r in result.get("rows", [result]):
            name = f"{label} {r.pop('suffix')}" if "suffix" in r else label
            ratio = r["predicted"] / r["measured"]
            rows.append({"job": name, **r, "ratio": ratio})
            flag = "" if 0.8 <= ratio <= 1.2 else "  (outside 20%)"
            print(
                f"{name:52s} {r['measured'] / MiB:13.1f} {r['predicted'] / MiB:14.1f} {ratio:9.2f}  "
                f"{r.get('detail', '')}{flag}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
