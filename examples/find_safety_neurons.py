"""Safety neurons of SmolLM2-135M-Instruct, written to an HTML report.

Importance on the HarmBench *val* split (detection), safety neurons by the default per-prompt
quantile rule, foundation neurons on the harmless *train* split as plain text, robust safety
neurons, their layer distribution and attention-vs-FFN share, the corpus-size table, a
deactivation experiment (Deact-SN vs Deact-R) on held-out prompts, ASR against the number of
neurons deactivated and against the layers they sit in. ``--scope user`` measures importance
on the prompt's own tokens only.

Run: ``.venv/bin/python examples/find_safety_neurons.py`` (about 5 minutes on 2 CPU cores);
``--quick`` for a smaller run. Writes ``runs/find_safety_neurons/`` (report.html, importance
scores, neuron masks).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import safety_circuits as sc
from safety_circuits import ablation, detect, plots
from safety_circuits.report import write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--out", default="runs/find_safety_neurons")
    parser.add_argument("--quick", action="store_true", help="fewer evaluation prompts")
    parser.add_argument(
        "--scope", choices=("all", "user"), default="all", help="tokens importance is measured on"
    )
    args = parser.parse_args()
    n_eval, n_capability = (8, 30) if args.quick else (24, 90)

    subject = sc.load_model(args.model)
    detection = sc.harmbench("val")
    start = time.perf_counter()
    importance = sc.neuron_importance(subject, detection, batch_size=8, scope=args.scope)
    seconds = time.perf_counter() - start
    safety = detect.select_neurons(importance).with_metadata(name="safety")
    foundation = sc.find_foundation_neurons(subject, sc.harmless("train"), batch_size=8)
    robust = sc.robust_safety_neurons(safety, foundation)
    importance.save(f"{args.out}/importance.safetensors")
    safety.save(f"{args.out}/safety.safetensors")
    robust.save(f"{args.out}/robust_safety.safetensors")

    counts = safety.counts()
    summary = (
        counts.sum()
        .to_frame("neurons")
        .T.assign(total=len(safety), percent_of_all=100 * safety.fraction_of(), importance_seconds=seconds)
    )
    stability = detect.corpus_size_stability(importance)
    harmful_eval = sc.data.sample(sc.harmbench("test"), n_eval)
    harmless_eval = sc.data.sample(sc.harmless("eval"), n_eval)
    capability = sc.data.capability_questions().sample(n_capability, random_state=0)
    table = ablation.deactivation_experiment(
        subject, harmful_eval, harmless_eval, safety, capability=capability, random_seeds=1, max_new_tokens=32
    )
    fractions = ablation.asr_vs_fraction(subject, harmful_eval[:8], importance, max_new_tokens=24)
    sweep = ablation.layer_sweep(subject, harmful_eval[:8], safety, max_new_tokens=24)
    sets = {"safety": safety, "foundation": foundation, "robust": robust}
    path = write_report(
        f"{args.out}/report.html",
        f"Safety neurons of {args.model}",
        [
            (
                "Safety neurons",
                [
                    f"{len(detection)} HarmBench val behaviours; rule: {safety.metadata['method']} "
                    f"{safety.metadata.get('quantile')} per prompt and kind, kept if important for all.",
                    summary,
                    plots.neurons_per_layer(safety),
                    counts.T,
                ],
            ),
            (
                "Attention vs FFN",
                [plots.attention_vs_ffn(sets), plots.attention_vs_ffn(sets, normalise=True)],
            ),
            ("Overlap", [plots.overlap_heatmap(sets)]),
            ("Corpus size (paper Table 5)", [stability, plots.table(stability)]),
            (
                "Deactivation (paper Table 1)",
                [
                    f"{n_eval} HarmBench test and {n_eval} harmless eval prompts, {n_capability} questions.",
                    table,
                ],
            ),
            (
                "ASR vs neurons deactivated (paper Fig. 2)",
                [
                    "Looser quantile rules select more neurons; 8 held-out HarmBench prompts.",
                    plots.asr_curve(fractions),
                    fractions,
                ],
            ),
            (
                "First vs last layers (paper Fig. 4)",
                [plots.layer_curve(sweep), sweep],
            ),
        ],
    )
    print(summary.to_string())
    print(stability.to_string(index=False))
    print(table.to_string(index=False))
    print(fractions.to_string(index=False))
    print(sweep.to_string(index=False))
    print(f"report: {path}")


if __name__ == "__main__":
    main()
