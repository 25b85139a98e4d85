"""Quick start on SmolLM2-135M-Instruct: load, score refusals, deactivate neurons, save the mask.

Run: ``.venv/bin/python examples/quickstart.py`` (after ``make install``; about a minute on 2 cores).
"""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import safety_circuits as sc


def main() -> None:
    subject = sc.load_model("smollm2-135m-instruct")
    print(subject.arch)
    harmful = sc.data.sample(sc.harmbench("test"), 16)
    baseline = sc.attack_success_rate(subject, harmful, max_new_tokens=32)
    print(f"ASR, original model:                    {baseline.rate:.2f}")

    # Deactivate 5% of the FFN neurons of each of the last ten layers, chosen at random.
    rng = np.random.default_rng(0)
    arch = subject.arch
    chosen = {
        (l, "ffn"): rng.choice(arch.d_mlp, arch.d_mlp // 20, replace=False)
        for l in range(arch.n_layers - 10, arch.n_layers)
    }
    neurons = sc.NeuronSet(arch, chosen, name="random 5% of late FFN neurons")
    with sc.ablate(subject, neurons):
        ablated = sc.attack_success_rate(subject, harmful, max_new_tokens=32)
    print(f"ASR, {len(neurons)} random FFN neurons off: {ablated.rate:.2f}")

    path = neurons.save("runs/quickstart/random_ffn.safetensors")
    print(f"mask saved to {path}; HF parameters touched: {len(sc.hf_masks(subject, neurons))}")


if __name__ == "__main__":
    main()
