"""Table 1 on a model aligned without its neurons: SmolLM2 aligned by *full* fine-tuning.

The demo's Table 1 analog zeroes, on the SN-Tuned model, the very neurons SN-Tune wrote refusal
into: refusal must vanish by construction. Here the aligned model is the demo's full fine-tuning
control (``runs/demo/models/full``: every weight trained on the same refusal and retain
documents), so its refusal is not placed in any neuron set. On it: safety neurons by every rule
(Eq. 3 safety; contrastive and scored against matched harmless prompts; *gained*: the neurons
whose importance grew most from the original model's, :func:`detect.scored_neurons` of the two
models' importances), then Deact-SN against 3 Deact-R seeds of the same counts per layer and kind:
HarmBench test ASR and harmless over-refusal with Wilson 95% intervals, harmless KL, capability.

Run: ``.venv/bin/python examples/aligned_table1.py`` after ``make demo`` (about 10 minutes on 2
CPU cores). Writes ``runs/aligned_table1/`` (table.csv, the neuron sets, report.html).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd

import safety_circuits as sc
from safety_circuits import ablation, data, detect
from safety_circuits.report import write_report
from safety_circuits.search import matched_harmless
from safety_circuits.stats import wilson_interval


def with_intervals(table: pd.DataFrame, n_harmful: int, n_harmless: int) -> pd.DataFrame:
    """ASR and over-refusal with their Wilson 95% intervals (the rates are k / n)."""
    out = table.copy()
    for column, n in (("asr", n_harmful), ("over_refusal", n_harmless)):
        bounds = [wilson_interval(round(rate * n), n) for rate in out[column]]
        out[f"{column}_lo"], out[f"{column}_hi"] = zip(*bounds, strict=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--aligned", default="runs/demo/models/full", help="an HF folder")
    parser.add_argument("--out", default="runs/aligned_table1")
    parser.add_argument("--eval", type=int, default=40, help="test prompts per side")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    original = sc.load_model(args.model)
    aligned = sc.load_model(args.aligned)
    detection = data.harmbench("val")
    start = time.perf_counter()
    importance = sc.neuron_importance(aligned, detection, batch_size=8, progress=False)
    harmless = sc.neuron_importance(
        aligned, matched_harmless(len(detection), args.seed), batch_size=8, progress=False
    )
    before = sc.neuron_importance(original, detection, batch_size=8, progress=False)
    sets = {
        "safety": detect.select_neurons(importance),
        "contrastive": detect.contrastive_neurons(importance, harmless),
        "scored": detect.scored_neurons(importance, harmless),
        "gained": detect.scored_neurons(importance, before),
    }
    detect_seconds = time.perf_counter() - start
    for name, neurons in sets.items():
        neurons.with_metadata(name=name).save(f"{args.out}/{name}.safetensors")

    harmful_eval = data.suite("harmbench").prompts("test", n=args.eval, seed=args.seed)
    harmless_eval = data.suite("harmless").prompts("test", n=args.eval, seed=args.seed)
    capability = data.capability_questions().sample(90, random_state=args.seed)
    tables, origin = [], None
    for name, neurons in sets.items():
        table = ablation.deactivation_experiment(
            aligned,
            harmful_eval,
            harmless_eval,
            neurons,
            capability=capability,
            random_seeds=3,
            max_new_tokens=32,
            use="hf",
            batch_size=64,
            origin=origin,
        )
        first = table.iloc[0]
        origin = {k: first[k] for k in ("asr", "over_refusal", "capability")}
        tables.append(table.assign(rule=name))
    table = with_intervals(pd.concat(tables, ignore_index=True), len(harmful_eval), len(harmless_eval))
    table.to_csv(f"{args.out}/table.csv", index=False)
    sizes = pd.DataFrame(
        {name: [len(s), 100 * s.fraction_of()] for name, s in sets.items()}, index=["neurons", "%"]
    )
    path = write_report(
        f"{args.out}/report.html",
        f"Table 1 on {args.aligned} (aligned by full fine-tuning)",
        [
            ("Neuron sets", [f"importance on the aligned model: {detect_seconds:.0f} s", sizes]),
            ("Deactivation (HarmBench test, harmless test; Wilson 95%)", [table]),
        ],
    )
    print(sizes.to_string())
    print(table.to_string(index=False))
    print(f"report: {path}")


if __name__ == "__main__":
    main()
