"""Refusal circuit of SmolLM2-135M-Instruct (and of an SN-Tuned copy, if given), as an HTML report.

For each model:

1. per-layer probes: harmful (HarmBench val) vs harmless (harmless train) prompts, residual
   stream after each block at the last prompt token, 5-fold logistic regression;
2. the refusal circuit: activation-difference FFN neurons in the layers where the probe reaches
   0.8, and activation patching (harmless -> harmful, on the chat template's post-instruction
   tokens) of every attention and MLP output, every head and every neuron group, measured by the
   refusal-vs-compliance log-probability of the first response token;
3. the refusal direction (difference in means at the post-instruction tokens, chosen by the
   effect of ablating it on harmful prompts and adding it on harmless ones), and a comparison on
   held-out prompts (HarmBench test, harmless eval): ASR with the direction ablated vs with the
   SN-Tune safety neurons deactivated (and random neurons of the same counts).

Run: ``.venv/bin/python examples/refusal_circuit.py --quick`` (about 4 CPU minutes); without
``--quick``: all 41 detection prompts, 16 tracing pairs, the full refusal-direction search (every
layer and post-instruction position, KL filter) and longer responses: much longer (tens of minutes).
``--tuned PATH``: an HF folder with an SN-Tuned model, analysed the same way and compared.
Writes ``runs/refusal_circuit/report.html`` and prints a summary.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd

import safety_circuits as sc
from safety_circuits import detect
from safety_circuits.circuit import map_refusal_circuit
from safety_circuits.direction import compare_with_neurons, find_refusal_direction
from safety_circuits.neurons import NeuronSet
from safety_circuits.report import write_report
from safety_circuits.tracing import RefusalMetric


def analyse(subject, label, data, neurons, sizes, timings):
    """Probes + circuit, refusal direction, direction vs neurons for one model."""
    start = time.perf_counter()
    circuit = map_refusal_circuit(
        subject,
        data["harmful"],
        data["harmless"],
        n_pairs=sizes["pairs"],
        top_k=sizes["top_k"],
        progress=False,
    )
    circuit.probes.config["label"] = label
    timings[f"{label}: probes + circuit"] = time.perf_counter() - start
    start = time.perf_counter()
    direction = find_refusal_direction(
        subject,
        data["harmful"],
        data["harmless"],
        harmful_val=data["harmful"][: sizes["val"]],
        harmless_val=data["harmless"][: sizes["val"]],
        offsets=sizes["offsets"],
        layers=sizes["layers"](subject.arch.n_layers),
        max_kl=sizes["max_kl"],
        progress=False,
    )
    timings[f"{label}: refusal direction"] = time.perf_counter() - start
    start = time.perf_counter()
    table = compare_with_neurons(
        subject,
        data["harmful_eval"],
        data["harmless_eval"],
        direction,
        neurons,
        max_new_tokens=sizes["tokens"],
    )
    timings[f"{label}: direction vs neurons"] = time.perf_counter() - start
    return {"circuit": circuit, "direction": direction, "table": table.assign(model=label)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tuned", default=None, help="folder of an SN-Tuned HF model to compare with")
    parser.add_argument("--neurons", default=None, help="safety NeuronSet file (default: found here)")
    parser.add_argument("--out", default="runs/refusal_circuit")
    parser.add_argument("--quick", action="store_true", help="fewer prompts and candidates")
    args = parser.parse_args()
    if args.quick:
        sizes = {
            "detect": 24,
            "pairs": 6,
            "top_k": 10,
            "val": 8,
            "eval": 8,
            "tokens": 24,
            "offsets": [-1],
            "layers": lambda n: range(1, max(2, int(0.8 * n)), 2),
            "max_kl": None,
        }
    else:
        sizes = {
            "detect": None,
            "pairs": 16,
            "top_k": 20,
            "val": 16,
            "eval": 24,
            "tokens": 48,
            "offsets": None,
            "layers": lambda n: range(n),
            "max_kl": 0.1,
        }
    sample = sc.data.sample
    data = {
        "harmful": sample(sc.harmbench("val"), sizes["detect"]),
        "harmless": sample(sc.harmless("train"), sizes["detect"] or len(sc.harmbench("val"))),
        "harmful_eval": sample(sc.harmbench("test"), sizes["eval"]),
        "harmless_eval": sample(sc.harmless("eval"), sizes["eval"]),
    }
    timings: dict[str, float] = {}
    start = time.perf_counter()
    subject = sc.load_model(args.model)
    if args.neurons:
        neurons = NeuronSet.load(args.neurons, expect=subject)
    else:
        importance = sc.neuron_importance(subject, data["harmful"], progress=False)
        neurons = detect.select_neurons(importance).with_metadata(name="safety")
    timings["load + safety neurons"] = time.perf_counter() - start
    models = {"original": subject}
    if args.tuned:
        models["SN-Tuned"] = sc.load_model(args.tuned)
    results = {label: analyse(s, label, data, neurons, sizes, timings) for label, s in models.items()}

    metric = RefusalMetric.from_tokenizer(subject.tokenizer)
    first = results["original"]
    others = {label: r["circuit"].probes for label, r in results.items() if label != "original"}
    table = pd.concat([r["table"] for r in results.values()], ignore_index=True)
    probe_rows = pd.concat(
        [r["circuit"].probes.per_layer.assign(model=label) for label, r in results.items()], ignore_index=True
    )
    sections = [
        (
            "Setup",
            [
                f"Models: {', '.join(f'{k} ({v.name})' for k, v in models.items())}. Detection: "
                f"{len(data['harmful'])} HarmBench val and {len(data['harmless'])} harmless train prompts; "
                f"evaluation: {len(data['harmful_eval'])} HarmBench test and {len(data['harmless_eval'])} "
                f"harmless eval prompts, greedy, {sizes['tokens']} new tokens. Safety neurons: {neurons!r}.",
                "Refusal score = logsumexp(logp[refusal-start tokens]) - logsumexp(logp[compliance-start "
                "tokens]) of the first response token:",
                metric.tokens(subject.tokenizer),
                pd.Series(timings, name="seconds").to_frame(),
            ],
        ),
        (
            "Probes: where is harmful vs harmless linearly readable?",
            [first["circuit"].probes.plot(others=others), probe_rows],
        ),
    ]
    for label, r in results.items():
        circuit, tracing = r["circuit"], r["circuit"].tracing
        sections.append(
            (
                f"Causal tracing ({label})",
                [
                    f"Activation patching, {tracing.config['mode']} (harmless activations into the harmful "
                    f"run) on the last {tracing.config['n_positions']} tokens, {len(tracing.clean)} pairs. "
                    f"Mean refusal score: harmful {tracing.clean.mean():.3f}, harmless "
                    f"{tracing.corrupted.mean():.3f}.",
                    tracing.plot("components"),
                    tracing.plot("heads"),
                    tracing.top(15),
                ],
            )
        )
        overlap = len(circuit.neurons & neurons)
        sections.append(
            (
                f"Refusal circuit ({label})",
                [
                    f"{circuit!r}; {overlap} of its neurons are SN-Tune safety neurons.",
                    circuit.plot(),
                    circuit.summary(),
                    circuit.components(),
                ],
            )
        )
        direction = r["direction"]
        sections.append(
            (
                f"Refusal direction ({label})",
                [
                    f"{direction!r}; filters relaxed: {direction.config['relaxed_filters'] or 'none'}.",
                    direction.plot("bypass"),
                    direction.plot("induce"),
                ],
            )
        )
    sections.append(("Direction vs safety neurons (held-out prompts)", [table]))
    path = write_report(f"{args.out}/report.html", f"Refusal circuit of {args.model}", sections)

    for label, r in results.items():
        circuit = r["circuit"]
        probes = circuit.probes.per_layer
        best = probes.loc[probes["accuracy"].idxmax()]
        print(f"== {label}")
        print(
            f"probe peak: layer {int(best['layer'])}, accuracy {best['accuracy']:.3f} ± {best['std']:.3f}; "
            f"readable layers (>= 0.8): {circuit.readable_layers}"
        )
        print("probe accuracy per layer:", " ".join(f"{a:.2f}" for a in probes["accuracy"]))
        top = circuit.tracing.top(8)
        top["site"] = [
            f"L{l} {c}" + (f" H{h}" if pd.notna(h) else "")
            for l, c, h in zip(top["layer"], top["component"], top["head"], strict=True)
        ]
        print("top traced sites:")
        print(top[["site", "effect", "normalized"]].to_string(index=False))
        print(f"circuit: {circuit!r}")
        print(circuit.summary().to_string(index=False))
        direction = r["direction"]
        chosen = direction.candidates[direction.candidates["selected"]].iloc[0]
        print(
            f"direction: {direction!r}; refusal score on the validation prompts: harmful "
            f"{direction.config['baseline_harmful']:.3f} -> {chosen['bypass']:.3f} ablated, harmless "
            f"{direction.config['baseline_harmless']:.3f} -> {chosen['induce']:.3f} added; "
            f"filters relaxed: {direction.config['relaxed_filters'] or 'none'}"
        )
    print(table.to_string(index=False))
    print(pd.Series(timings, name="seconds").round(1).to_string())
    print(f"report: {path}")


if __name__ == "__main__":
    main()
