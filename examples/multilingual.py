"""Multilingual safety neurons of SmolLM2-135M-Instruct and cross-lingual SN-Tune (SN-Tune paper,
Sec. 2.3.2 and Fig. 5), written to an HTML report.

1. Safety neurons per language, one rule for all: the searched recipe's rule
   (``recipes/smollm2-135m-instruct.json``, chosen on English validation splits) on the translated
   HarmBench val behaviours against the translated harmless train prompts, and the paper's own
   rule (important for every harmful prompt) for Fig. 5; their overlap (IoU, overlap coefficient,
   the paper's ``|A ∩ B| / |B|``) overall, per kind and per band of layers, and the set every
   language shares.
2. With ``--tune``: SN-Tune with the recipe's *English* documents only, on the English set and
   on the set shared by all languages, of each rule (an empty set is not tuned); then ASR (80
   translated HarmBench test behaviours) and over-refusal (the harmless eval half's test split)
   in every language, each rate with its Wilson 95% interval, and each tuned model against the
   original on the same prompts (paired bootstrap, McNemar). The test splits are read once, for
   this one recipe.

Responses are judged by the phrase judge with the project's refusal phrases of every language
(``evaluate.REFUSAL_PATTERNS``); the report lists responses to spot-check it.

Run: ``.venv/bin/python examples/multilingual.py`` (detection, about 5 minutes on 2 CPU cores)
or ``--tune`` (about 35 minutes); ``--quick`` for three languages and fewer prompts. Writes
``runs/multilingual/`` (report.html, neuron sets, overlap tables, rates, responses).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd

from safety_circuits import data, multilingual
from safety_circuits.evaluate import SuiteEval, evaluate_suites
from safety_circuits.judge import translated_judge_table
from safety_circuits.neurons import NeuronSet
from safety_circuits.pipeline import EVAL_BATCH, Run, RunConfig, documents
from safety_circuits.report import Block, write_report
from safety_circuits.search import Recipe
from safety_circuits.tuning import reference_states, tune

RECIPE = Path(__file__).parents[1] / "recipes" / "smollm2-135m-instruct.json"


def language_sets(run: Run, rule: str, quantile: float) -> dict[str, NeuronSet]:
    """``rule``'s neurons in every language of the run (saved; read back when present)."""
    folder = run.path("neurons", rule)
    languages = run.config.language_list
    if all((folder / f"{lang}.safetensors").exists() for lang in languages):
        return {lang: NeuronSet.load(folder / f"{lang}.safetensors", expect=run.base) for lang in languages}
    sets = multilingual.translated_neurons(
        run.base, languages, rule=rule, quantile=quantile, seed=run.config.seed, batch_size=8
    )
    for lang, neurons in sets.items():
        neurons.save(folder / f"{lang}.safetensors")
    return sets


def overlap_blocks(run: Run, sets: dict[str, NeuronSet], rule: str) -> list[Block]:
    """The overlap of ``sets`` (saved as ``results/overlap_<rule>.json``/``.csv``) as tables and
    heatmaps."""
    overlap = multilingual.language_overlap(sets)
    overlap.save(run.path("results", f"overlap_{rule}.json"))
    overlap.to_frame().to_csv(run.path("results", f"overlap_{rule}.csv"), index=False)
    shared = multilingual.shared_neurons(sets)
    sizes = pd.DataFrame({lang: ns.counts().sum() for lang, ns in {**sets, "shared": shared}.items()}).T
    sizes["total"] = sizes.sum(axis=1)
    pairs = overlap.frame[overlap.frame["a"] != overlap.frame["b"]]
    by_band = pairs.pivot_table(index="kind", columns="band", values="iou", aggfunc="mean", sort=False)
    return [
        f"Rule {rule!r}: neurons per language and kind, and the {len(shared)} shared by all languages.",
        sizes,
        overlap.plot("iou"),
        overlap.plot("share_of_b"),
        "Mean IoU over the pairs of different languages, per kind (rows) and band of layers (columns):",
        by_band,
    ]


def tuned_models(run: Run, neuron_sets: dict[str, NeuronSet]) -> dict[str, object]:
    """SN-Tune of the original with the recipe's English documents on each non-empty set (saved
    under ``models/``; read back when present)."""
    cfg = run.config
    docs = documents(run)
    config = cfg.tune_config()
    reference = None
    models = {"original": run.base}
    for name, neurons in neuron_sets.items():
        if not len(neurons):
            logging.warning("%s: the set is empty, nothing to tune", name)
            continue
        if run.path("models", name).exists():
            models[name] = run.model(name)
            continue
        if reference is None and cfg.retain_kl:
            reference = reference_states(run.base, docs, max_length=config.max_length)
        result = tune(run.base, docs, neurons, config=config, reference=reference)
        result.save(run.path("models", name), overwrite=True)
        models[name] = result.subject
    return models


def cross_lingual(run: Run, models: dict, n: int | None) -> list[Block]:
    """Every model on every language's test suites: rates with intervals, paired comparisons with
    the original, and responses to spot-check the judge."""
    cfg = run.config
    suites = multilingual.language_suites(cfg.language_list)
    evals = [
        evaluate_suites(
            subject,
            suites,
            split="test",
            n=n,
            seed=cfg.seed,
            judge=cfg.judge,
            model=name,
            max_new_tokens=cfg.max_new_tokens,
            use="hf",
            batch_size=EVAL_BATCH,
            progress=False,
        )
        for name, subject in models.items()
    ]
    result = SuiteEval.concat(evals)
    result.save(run.path("results", "cross_lingual.json"))
    rates = multilingual.rates_by_language(result)
    rates.to_csv(run.path("results", "cross_lingual_rates.csv"), index=False)
    cells = rates.assign(
        cell=[
            f"{r:.2f} [{lo:.2f}, {hi:.2f}]" for r, lo, hi in zip(rates.rate, rates.lo, rates.hi, strict=True)
        ]
    )
    table = cells.pivot_table(
        index="language", columns=["metric", "model"], values="cell", aggfunc="first", sort=False
    )
    pairs = [(name, "original") for name in models if name != "original"]
    pairs += [(name, name.replace("_shared", "_en")) for name in models if name.endswith("_shared")]
    comparisons = pd.concat([result.compare(a, b) for a, b in pairs if b in models])
    comparisons.to_csv(run.path("results", "cross_lingual_comparisons.csv"), index=False)
    frame = result.to_frame()
    spot = frame[frame["model"] != "original"].groupby(["model", "suite"]).head(2)
    refusals = frame[frame["refused"] & ~frame["suite"].str.endswith("_en")].groupby("model")["response"]
    in_english = refusals.apply(lambda r: r.str.match(r"^[\x00-\x7f]*$").mean()).rename("ascii_share")
    return [
        f"Rates on the test splits (ASR: {n or 80} translated HarmBench test behaviours a language; "
        "over-refusal: the harmless eval half's test split), Wilson 95% intervals, judge "
        f"{cfg.judge!r} with every language's refusal phrases; greedy, {cfg.max_new_tokens} new tokens.",
        table,
        "Each tuned model minus the original, and each shared-set model minus its English-set model, "
        "on the same prompts (paired bootstrap 95% interval, McNemar):",
        comparisons,
        "Share of each model's refusals to non-English prompts written in ASCII (English):",
        in_english.to_frame(),
        "The phrase judge on 180 labelled responses to the translated prompts "
        "(judge.translated_judge_table):",
        translated_judge_table(),
        "Responses of the tuned models (two per suite), to spot-check the judge:",
        spot[["model", "suite", "prompt", "response", "refused"]],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--out", default="runs/multilingual")
    parser.add_argument("--languages", default=",".join(data.LANGUAGES), help="default: all")
    parser.add_argument("--tune", action="store_true", help="cross-lingual SN-Tune and evaluation")
    parser.add_argument("--quick", action="store_true", help="en, fr, zh and 10 prompts a suite")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    languages = "en,fr,zh" if args.quick else args.languages
    recipe = Recipe.from_dict(json.loads(RECIPE.read_text()))
    run = Run(args.out, RunConfig(model=args.model, languages=languages).with_recipe(recipe))
    cfg = run.config
    start = time.perf_counter()
    found = {rule: language_sets(run, rule, q) for rule, q in [(cfg.rule, cfg.quantile), ("safety", 0.99)]}
    sections: list[tuple[str, list[Block]]] = [
        (
            "Setup",
            [
                f"{args.model}; languages {cfg.language_list} (the project's translations, "
                "safety_circuits/_data/translations); recipe recipes/smollm2-135m-instruct.json "
                f"(rule {cfg.rule!r}, quantile {cfg.quantile:.4f}, chosen on English validation "
                "splits); the paper's rule 'safety' at quantile 0.99.",
            ],
        ),
        *[
            (f"Safety neurons per language: {rule}", overlap_blocks(run, sets, rule))
            for rule, sets in found.items()
        ],
    ]
    if args.tune:
        plans = {}
        for rule, sets in found.items():
            prefix = "sn_tune" if rule == cfg.rule else f"sn_tune_{rule}"
            plans[f"{prefix}_en"] = sets["en"]
            plans[f"{prefix}_shared"] = multilingual.shared_neurons(sets)
        models = tuned_models(run, plans)
        sections.append(
            (
                "Cross-lingual SN-Tune (English documents only)",
                [
                    "Every model is tuned with the recipe's settings and English documents on one set: "
                    f"{cfg.rule!r} or 'safety' neurons of English (_en) or shared by every language "
                    f"(_shared; an empty set is not tuned). Sizes: "
                    + ", ".join(f"{name} {len(ns)}" for name, ns in plans.items()),
                    *cross_lingual(run, models, 10 if args.quick else None),
                ],
            )
        )
    report = write_report(run.path("report.html"), "Multilingual safety neurons", sections)
    print(f"{report} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
