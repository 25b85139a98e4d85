"""Forward time of the TransformerLens backends vs the plain HF model on SmolLM2-135M-Instruct.

Run: ``make bench-forward`` (or ``python benchmarks/bench_forward.py --batch 8 --tokens 64``).
Prints the median time of each and the ratio TL / HF (goal: close to 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safety_circuits import load_model


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed in turn (round-robin) so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    ids = torch.randint(0, 1000, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    subjects = {backend: load_model(args.model, backend=backend) for backend in ("hooked", "bridge")}
    hf = subjects["hooked"].hf

    def sites(name: str) -> bool:
        return name.endswith(("hook_post", "hook_z"))

    fns: dict[str, Callable[[], object]] = {"HF forward": lambda: hf(ids)}
    for backend, s in subjects.items():
        fns[f"TL {backend} forward"] = lambda s=s: s.tl(ids)
        fns[f"TL {backend} run_with_cache"] = lambda s=s: s.tl.run_with_cache(ids, names_filter=sites)
    medians = interleaved_medians(fns, args.repeats)
    print(
        f"{args.model}, batch {args.batch} x {args.tokens} tokens, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    for name, seconds in medians.items():
        print(f"  {name:<26} {seconds * 1e3:8.1f} ms   ratio to HF {seconds / medians['HF forward']:.2f}")


if __name__ == "__main__":
    main()
