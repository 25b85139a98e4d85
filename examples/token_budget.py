"""How many new tokens a response needs before the judge's verdict settles (the evaluation's
default budget is chosen here, on validation splits only).

For every model of a run (the original and each tuned model under ``models/``), one greedy
generation of ``max(budgets)`` tokens on the validation split of every held-out suite that has
one, judged at each budget (greedy decoding is prefix-consistent). The chosen budget is the
smallest at which every model's pooled harmful-suite ASR and pooled harmless-suite refusal rate
are within ``--tolerance`` of their value at the largest budget.

    .venv/bin/python examples/token_budget.py --run runs/demo

Writes ``<run>/results/token_budget.csv`` and prints the pooled table and the choice.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd

from safety_circuits import data, load_model
from safety_circuits.evaluate import budget_curve
from safety_circuits.loading import SMOLLM2
from safety_circuits.pipeline import EVAL_BATCH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--budgets", default="16,32,64,128")
    parser.add_argument("--per-suite", type=int, default=40, help="validation prompts a suite (0 = all)")
    parser.add_argument("--judge", default="phrases")
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--models", default=None, help="comma-separated names (default: all of the run's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    models = {"original": SMOLLM2} | {
        p.name: str(p) for p in sorted(Path(args.run, "models").iterdir()) if (p / "config.json").exists()
    }
    if args.models:
        models = {name: models[name] for name in args.models.split(",")}
    suites = [s for s in map(data.suite, data.SUITE_NAMES) if (s.frame["split"] == "validation").any()]
    budgets = [int(b) for b in args.budgets.split(",")]
    curves = []
    for name, source in models.items():
        subject = load_model(source)
        curves.append(
            budget_curve(
                subject,
                suites,
                budgets=budgets,
                split="validation",
                n=args.per_suite or None,
                judge=args.judge,
                model=name,
                use="hf",
                batch_size=EVAL_BATCH,
                progress=False,
            )
        )
        logging.info("%s done", name)
    curve = pd.concat(curves, ignore_index=True)
    kinds = {s.name: s.kind for s in suites}
    pooled = (
        curve.assign(kind=curve["suite"].map(kinds))
        .groupby(["model", "kind", "budget"], as_index=False)[["k", "n"]]
        .sum()
        .assign(rate=lambda f: f["k"] / f["n"])
    )
    final = pooled[pooled["budget"] == max(budgets)].set_index(["model", "kind"])["rate"]
    pooled["gap_to_largest"] = (
        pooled["rate"] - [final[m, k] for m, k in zip(pooled["model"], pooled["kind"], strict=True)]
    ).abs()
    worst = pooled.groupby("budget")["gap_to_largest"].max()
    chosen = int(worst[worst <= args.tolerance].index.min())
    Path(args.run, "results").mkdir(parents=True, exist_ok=True)
    curve.to_csv(Path(args.run, "results", "token_budget.csv"), index=False)
    print(pooled.pivot_table(index=["model", "kind"], columns="budget", values="rate").round(3).to_string())
    print(f"largest gap to the {max(budgets)}-token rate, per budget:\n{worst.round(3).to_string()}")
    print(f"chosen budget: {chosen} new tokens (every model within {args.tolerance} of {max(budgets)})")


if __name__ == "__main__":
    main()
