"""Do the detectors find where refusal lives? Planted ground truth on SmolLM2-135M-Instruct.

1. **Planted neurons.** SN-Tune refusal (AdvBench train prompts, the harmless train split
   retained) written into ``R``: ``--planted`` random neurons of every kind and layer. Then a
   distractor ``D`` (as many other random neurons) learns to answer cooking requests in capitals.
   Every other weight stays bit-identical (checked). The planting is checked on validation prompts:
   ASR on AdvBench validation, over-refusal on the harmless validation half, capitals on held-out
   cooking requests, original vs planted, with Wilson 95% intervals.
2. **Recovery.** Every detector of :data:`safety_circuits.groundtruth.DETECTORS` ranks all
   92,160 neurons of the planted model (or the planted/original pair). Each gets precision at
   ``|R|`` and AUROC against ``R`` and against ``D``, beside their chance levels, with its run time.
   Detection prompts: HarmBench val (never used to plant) and as many harmless train prompts.
   Then each detector's top ``|R|`` neurons are patched from the planted model into the original
   while it answers the AdvBench validation prompts (dynamic patching): the share of the planted
   refusal they bring, against ``R`` itself and random neurons of its counts.
3. **Planted direction.** Rank-one write/read edits along a random unit ``r`` (layer 15), and the
   cosine to ``r`` of :func:`find_refusal_direction`'s choice and of the difference in means
   right after the write.

Run: ``.venv/bin/python examples/ground_truth.py`` (about 40 minutes on 2 CPU cores: planting
7, the neuron detectors 4, patching 10, the direction search 17); ``--reuse`` loads the planted model of a
former run; ``--seed 1 --out runs/ground_truth_s1 --no-direction`` plants another R. Writes
``runs/ground_truth/`` (report.html, recovery.json, planting.csv, the planted models).
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
from safety_circuits import data
from safety_circuits.groundtruth import (
    PlantedModel,
    RecoveryBenchmark,
    changed_neurons,
    plant_direction,
    plant_neurons,
)
from safety_circuits.report import write_report
from safety_circuits.stats import Rate
from safety_circuits.tuning import TuneConfig


def capitals(answers: list[str]) -> list[bool]:
    """Whether each answer is written in capitals (its letters at least 90% upper case)."""
    flags = []
    for answer in answers:
        letters = [c for c in answer if c.isalpha()]
        flags.append(bool(letters) and sum(c.isupper() for c in letters) >= 0.9 * len(letters))
    return flags


def behaviour(subject: sc.Subject, harmful: list[str], harmless: list[str], topic: list[str]) -> dict:
    """ASR, over-refusal and the share of topic answers in capitals, each a Rate."""
    kwargs = {"max_new_tokens": 32, "batch_size": 16}
    answers = sc.generate(subject, topic, use="hf", **kwargs)
    return {
        "asr": Rate.of(~sc.attack_success_rate(subject, harmful, **kwargs).to_frame()["refused"]),
        "over_refusal": Rate.of(sc.over_refusal_rate(subject, harmless, **kwargs).to_frame()["refused"]),
        "capitals": Rate.of(capitals(answers)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--out", default="runs/ground_truth")
    parser.add_argument("--planted", type=int, default=300, help="neurons in R (and in D)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="load the planted model saved by a former run")
    parser.add_argument("--no-direction", action="store_true", help="skip the planted direction (part 3)")
    args = parser.parse_args()

    base = sc.load_model(args.model)
    arch = base.arch
    planted = sc.NeuronSet.random(arch, args.planted, seed=args.seed).with_metadata(name="planted")
    distractor = (sc.NeuronSet.random(arch, args.planted, seed=args.seed + 1) - planted).with_metadata(
        name="distractor"
    )
    topic = data.harmless_generated(24, seed=args.seed, topics=["cooking"])
    config = TuneConfig(lr=4e-3, epochs=2, batch_size=4, seed=args.seed)
    folder = Path(args.out, "planted_neurons")
    start = time.perf_counter()
    if args.reuse and folder.exists():
        model = PlantedModel.load(folder, base)
    else:
        model = plant_neurons(
            base,
            data.train_harmful(80, seed=args.seed),
            data.harmless("train"),
            planted,
            distractor=distractor,
            topic=topic[:16],
            config=config,
        )
        model.save(folder, overwrite=True)
    plant_seconds = time.perf_counter() - start
    if changed_neurons(base, model.subject) != planted | distractor:
        raise RuntimeError("the planted model changed other neurons than R and D")

    harmful_val = data.suite("advbench").prompts("validation")
    harmless_val = data.suite("harmless").prompts("validation")
    checks = {
        name: behaviour(subject, harmful_val, harmless_val, topic[16:])
        for name, subject in (("original", base), ("planted", model.subject))
    }
    check_frame = pd.DataFrame(
        [
            {"model": name, "metric": metric, "rate": r.rate, "lo": r.lo, "hi": r.hi, "n": r.n}
            for name, rates in checks.items()
            for metric, r in rates.items()
        ]
    )
    check_frame.to_csv(f"{args.out}/planting.csv", index=False)
    print(check_frame.to_string(index=False))

    detection, harmless = data.harmbench("val"), data.harmless("train")[: len(data.harmbench("val"))]
    result = RecoveryBenchmark(model, detection, harmless, batch_size=8, patch_prompts=harmful_val).run()
    result.config["plant_seconds"] = plant_seconds
    result.save(f"{args.out}/recovery.json")
    print(result.to_frame().to_string(index=False))

    if not args.no_direction:
        start = time.perf_counter()
        plant_prompts = data.train_harmful(40, seed=args.seed)
        direction = plant_direction(base, plant_prompts, harmless, layer=15, seed=args.seed)
        direction_seconds = time.perf_counter() - start
        direction.save(f"{args.out}/planted_direction", overwrite=True)
        found = RecoveryBenchmark(direction, detection, harmless, batch_size=8).run()
        result.directions = [{**row, "plant_seconds": direction_seconds} for row in found.directions]
        result.save(f"{args.out}/recovery.json")

    frame = result.to_frame()
    path = write_report(
        f"{args.out}/report.html",
        f"Planted ground truth on {args.model}",
        [
            (
                "The planted model",
                [
                    f"R: {len(planted)} random neurons (seed {args.seed}) tuned to refuse; D: "
                    f"{len(distractor)} others tuned to answer cooking requests in capitals; "
                    f"{plant_seconds:.0f} s. Checked on validation prompts:",
                    check_frame,
                ],
            ),
            ("Recovery of R and D by each detector", [result.plot(), frame]),
            (
                "Patching each detector's top |R| neurons into the original (AdvBench validation ASR)",
                [pd.DataFrame([result.config["patching"]])],
            ),
            ("Planted direction", [pd.DataFrame(result.directions)]),
        ],
    )
    print(json.dumps(result.directions, indent=1))
    print(f"report: {path}")


if __name__ == "__main__":
    main()
