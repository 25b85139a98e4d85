"""Finding safety neurons by contrast and dynamic patching (Chen et al.), written to an HTML report.

An aligned/unaligned pair of the same architecture: by default the SN-Tuned SmolLM2 (``--aligned``,
a folder written by the SN-Tune example) and the original SmolLM2-135M-Instruct (``--unaligned``).

1. Generation-time activation contrast (FFN and ``o`` neurons) on the HarmBench *val* behaviours:
   the aligned model answers, both models read its answers.
2. Dynamic activation patching on held-out HarmBench *test* behaviours: the unaligned model
   generates with the top-scoring neurons patched from the aligned model, at several fractions of
   neurons, against random neurons (same count per layer and kind), the mean, and zeroing; safety
   restored = (ASR_unaligned - ASR_patched) / (ASR_unaligned - ASR_aligned), and the fraction of
   neurons that restores 90% (the paper: about 5%).
3. Alignment tax: the same contrast on harmless prompts (helpfulness neurons), overlap with the
   safety neurons, and how the shared neurons behave on harmful vs harmless prompts.
4. A pre-generation unsafe-output detector (logistic regression on the safety neurons at the
   prompt's last token) trained on AdvBench *train* + harmless *train* prompts, labelled by the
   model's own greedy answers, evaluated (AUROC) on AdvBench *eval* + harmless *eval*; then the
   runtime monitor redirecting flagged prompts.

Run after ``make demo``: ``.venv/bin/python examples/patching.py --aligned runs/demo/models/sn_tune``
(about 20 minutes on 2 CPU cores; ``--quick``: about 5). Writes ``runs/patching/`` (report.html, summary.json,
patching_curve.json, the contrast scores, the safety neuron set and the detector).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd

import safety_circuits as sc
from safety_circuits import plots
from safety_circuits.contrast import alignment_tax, contrast_activations
from safety_circuits.monitor import UnsafeOutputDetector, monitor, unsafe_labels
from safety_circuits.patching import PAPER_REFERENCE, patching_curve
from safety_circuits.report import write_report


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--aligned", help="folder of the aligned (e.g. SN-Tuned) HF model")
    parser.add_argument("--unaligned", default="smollm2-135m-instruct", help="the original model")
    parser.add_argument("--out", default="runs/patching")
    parser.add_argument("--quick", action="store_true", help="fewer prompts, fractions and tokens")
    parser.add_argument(
        "--backend",
        default=None,
        choices=["hooked", "bridge"],
        help="default: hooked on TL 3, bridge on TL 4",
    )
    parser.add_argument(
        "--detector-on",
        default="unaligned",
        choices=["aligned", "unaligned"],
        help="the model whose answers the detector predicts",
    )
    args = parser.parse_args()
    if not args.aligned:
        parser.error(
            "--aligned PATH is required: a folder with the aligned model, e.g. the SN-Tuned SmolLM2 "
            "written by the SN-Tune example. Without it there is no aligned/unaligned pair to contrast. "
            "To try the pipeline out, point it at any HF folder of the same architecture, e.g. "
            "--aligned ~/.cache/safety_circuits/smollm2-135m-instruct (then nothing is restored)."
        )
    if not (Path(args.aligned).expanduser() / "config.json").exists():
        parser.error(f"--aligned {args.aligned}: not a Hugging Face model folder (no config.json)")
    return args


def main() -> None:
    args = parse()
    quick = args.quick
    n_detect, n_eval, n_harmless, n_train = (12, 12, 12, 24) if quick else (41, 24, 41, 80)
    new_tokens = 24 if quick else 32
    fractions = (0.01, 0.05, 0.2) if quick else (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    aligned = sc.load_model(Path(args.aligned).expanduser(), backend=args.backend)
    unaligned = sc.load_model(args.unaligned, backend=args.backend)
    harmful_detect = sc.data.sample(sc.harmbench("val"), n_detect)
    harmful_eval = sc.data.sample(sc.harmbench("test"), n_eval)
    harmless_detect = sc.data.sample(sc.harmless("train"), n_harmless)

    # 1. generation-time contrast on harmful prompts (safety) and on harmless prompts (helpfulness)
    t = time.perf_counter()
    safety_scores = contrast_activations(aligned, unaligned, harmful_detect, max_new_tokens=new_tokens)
    helpful_scores = contrast_activations(aligned, unaligned, harmless_detect, max_new_tokens=new_tokens)
    timings["contrast_s"] = time.perf_counter() - t
    safety = safety_scores.top(fraction=PAPER_REFERENCE["fraction"], name="safety (contrast, top 5%)")
    out = Path(args.out)
    safety.save(out / "safety_contrast.safetensors")
    safety_scores.save(out / "contrast_harmful.safetensors")

    # 2. dynamic patching: unaligned target, aligned source
    t = time.perf_counter()
    curve = patching_curve(
        unaligned, aligned, harmful_eval, safety_scores, fractions=fractions, max_new_tokens=new_tokens
    )
    timings["patching_s"] = time.perf_counter() - t
    needed = pd.DataFrame(
        [
            {"method": m, "fraction for 90% restored": curve.fraction_for(0.9, method=m)}
            for m in curve.frame["method"].unique()
        ]
    )

    # 3. alignment tax
    tax = alignment_tax(safety_scores, helpful_scores, fraction=PAPER_REFERENCE["fraction"])

    # 4. detector and monitor
    t = time.perf_counter()
    subject = aligned if args.detector_on == "aligned" else unaligned
    train = sc.data.sample(sc.advbench("train"), n_train // 2) + sc.data.sample(
        sc.harmless("train"), n_train // 2
    )
    test = sc.data.sample(sc.advbench("eval"), n_train // 2) + sc.data.sample(
        sc.harmless("eval"), n_train // 2
    )
    flags = [True] * (n_train // 2) + [False] * (n_train // 2)
    y_train = unsafe_labels(subject, train, harmful=flags, max_new_tokens=new_tokens)
    y_test = unsafe_labels(subject, test, harmful=flags, max_new_tokens=new_tokens)
    detector = UnsafeOutputDetector(C=0.1).fit(subject, train, y_train, safety)
    evaluation = detector.evaluate(subject, test, y_test)  # raises if the held-out labels are of one class
    detector.save(out / "detector.safetensors")
    demo = sc.data.sample(sc.advbench("eval"), 4, seed=1) + sc.data.sample(sc.harmless("eval"), 4, seed=1)
    with monitor(subject, detector, action="redirect") as guard:
        guarded = sc.generate(subject, demo, max_new_tokens=new_tokens, progress=False)
    events = guard.to_frame()
    monitored = pd.DataFrame({"prompt": demo, "response": guarded})
    timings["detector_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start

    summary = {
        "aligned": aligned.name,
        "unaligned": unaligned.name,
        "asr_unaligned": curve.asr_target,
        "asr_aligned": curve.asr_source,
        "fraction_for_90pct": {
            row["method"]: row["fraction for 90% restored"] for _, row in needed.iterrows()
        },
        "safety_neurons": len(safety),
        "alignment_tax": tax.summary,
        "detector": {
            **evaluation.summary(),
            "on": args.detector_on,
            "train_unsafe_share": float(y_train.mean()),
        },
        "timings": timings,
        "settings": {"quick": quick, "new_tokens": new_tokens, "fractions": list(fractions)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    curve.save(out / "patching_curve.json")

    setup = (
        f"aligned {aligned.name}, unaligned {unaligned.name} ({aligned.backend}); contrast on {n_detect} "
        f"HarmBench val and {n_harmless} harmless train prompts, {new_tokens} new tokens; patching on "
        f"{n_eval} HarmBench test prompts; detector on {args.detector_on}, {n_train} train / {n_train} "
        "held-out prompts."
    )
    path = write_report(
        out / "report.html",
        "Safety neurons by contrast and dynamic patching",
        [
            ("Setup", [setup, pd.DataFrame([timings])]),
            (
                "Activation contrast",
                [
                    safety_scores.plot(),
                    plots.neurons_per_layer(safety),
                    safety.counts().sum().to_frame("neurons").T,
                ],
            ),
            (
                "Dynamic patching",
                [
                    f"ASR: unaligned {curve.asr_target:.3f}, aligned {curve.asr_source:.3f}.",
                    curve.plot(),
                    curve.to_frame(),
                    needed,
                ],
            ),
            ("Alignment tax", [tax.summary_frame(), tax.plot()]),
            (
                "Unsafe-output detector",
                [
                    pd.DataFrame([summary["detector"]]),
                    evaluation.plot(),
                    "Runtime monitor (action='redirect'):",
                    events,
                    monitored,
                ],
            ),
        ],
    )
    print(curve.to_frame().to_string(index=False))
    print(needed.to_string(index=False))
    print(
        json.dumps(
            {k: summary[k] for k in ("asr_unaligned", "asr_aligned", "alignment_tax", "detector")}, indent=1
        )
    )
    print(f"report: {path}")


if __name__ == "__main__":
    main()
