"""Device check: the whole pipeline on SmolLM2-135M-Instruct on one GPU, each stage timed.

Load (bf16 on a GPU), neuron importance on HarmBench val prompts, safety neurons (the per-prompt
quantile rule), ASR with and without them deactivated on held-out HarmBench test prompts, a few
SN-Tune steps, ASR of the tuned model, and a save of the tuned model. Runs on the first CUDA
device; without one it says so and exits 2, unless ``--device cpu`` asks for the CPU. Exits 1 if a
stage fails or the whole run takes longer than ``--budget`` seconds (600: the goal is under ten
minutes on a GPU).

Run::

    python examples/device_check.py                     # first CUDA device, about 1 to 2 minutes
    python examples/device_check.py --device cpu --quick   # the same stages, smaller, on the CPU

Writes ``runs/device_check/`` (neurons, the tuned model, ``timings.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import safety_circuits as sc
from safety_circuits.detect import select_neurons
from safety_circuits.tuning import refusal_documents


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cuda", help="'cuda' (the first CUDA device), 'cuda:N' or 'cpu'")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="default: bf16 on GPU")
    parser.add_argument("--quick", action="store_true", help="fewer prompts, tokens and steps")
    parser.add_argument("--out", default="runs/device_check")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds the whole run may take")
    args = parser.parse_args()

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "device check: no CUDA device is available here; nothing was run. "
            "Use --device cpu (with --quick) to run the same stages on the CPU.",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda", torch.device(args.device).index or 0) if args.device != "cpu" else "cpu"
    gpu = device != "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    n_detect, n_eval, new_tokens, n_docs = (8, 4, 16, 8) if args.quick else (32, 24, 48, 64)
    where = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"device check: {args.model} on {device} ({where}), {dtype}, {'quick' if args.quick else 'full'}")

    timings: dict[str, float] = {}
    state: dict = {}
    start = time.perf_counter()

    def stage(name: str, fn) -> None:
        t0 = time.perf_counter()
        state[name] = fn()
        if gpu:
            torch.cuda.synchronize(device)
        timings[name] = time.perf_counter() - t0
        print(f"  {name:34s} {timings[name]:7.1f} s", flush=True)

    harmful_eval = sc.data.sample(sc.harmbench("test"), n_eval)
    try:
        stage("load", lambda: sc.load_model(args.model, device=device, dtype=dtype))
        subject = state["load"]
        stage("build TransformerLens model", lambda: subject.tl)
        stage(
            "neuron importance",
            lambda: sc.neuron_importance(
                subject, sc.harmbench("val")[:n_detect], batch_size=8, progress=False
            ),
        )
        stage(
            "safety neurons", lambda: select_neurons(state["neuron importance"]).with_metadata(name="safety")
        )
        neurons = state["safety neurons"]
        print(f"    {len(neurons)} safety neurons ({100 * neurons.fraction_of():.2f}% of all)")
        kwargs = {"max_new_tokens": new_tokens, "batch_size": 8, "progress": False}
        stage("ASR, original", lambda: sc.attack_success_rate(subject, harmful_eval, **kwargs))

        def ablated():
            with sc.ablate(subject, neurons):
                return sc.attack_success_rate(subject, harmful_eval, **kwargs)

        stage("ASR, safety neurons deactivated", ablated)
        docs = refusal_documents(sc.harmbench("val")[:n_docs])
        stage("SN-Tune", lambda: sc.sn_tune(subject, docs, neurons, lr=2e-4, progress=False))
        tuned = state["SN-Tune"]
        stage(
            "ASR, SN-Tuned", lambda: sc.attack_success_rate(tuned.subject, harmful_eval, use="hf", **kwargs)
        )
        stage("save", lambda: tuned.save(Path(args.out) / "tuned", overwrite=True))
        neurons.save(Path(args.out) / "safety.safetensors")
    except Exception:
        traceback.print_exc()
        print(f"device check FAILED after {time.perf_counter() - start:.1f} s", file=sys.stderr)
        return 1
    total = time.perf_counter() - start
    rates = {k: state[k].rate for k in ("ASR, original", "ASR, safety neurons deactivated", "ASR, SN-Tuned")}
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if gpu else None
    report = {
        "model": args.model,
        "device": str(device),
        "device_name": where,
        "dtype": str(dtype),
        "quick": args.quick,
        "seconds": timings,
        "total_seconds": total,
        "asr": rates,
        "neurons": len(neurons),
        "tuning_steps": tuned.record["steps"],
        "peak_gpu_memory_gib": peak,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "timings.json").write_text(json.dumps(report, indent=2))
    print("  " + ", ".join(f"{k}: {v:.2f}" for k, v in rates.items()))
    if peak is not None:
        print(f"  peak GPU memory allocated: {peak:.2f} GiB")
    ok = total <= args.budget
    print(f"device check {'passed' if ok else 'FAILED (over budget)'}: {total:.1f} s of {args.budget:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
