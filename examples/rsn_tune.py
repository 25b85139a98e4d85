"""RSN-Tune vs SN-Tune under benign downstream fine-tuning (paper Sec. 4, Table 4 analog).

SN-Tune trains every safety neuron; RSN-Tune only those that are not also foundation neurons
(important on general text), so that later fine-tuning on an ordinary task, which moves the
foundation neurons, leaves the tuned safety neurons alone. Both starting points are then fully
fine-tuned on the same benign task (arithmetic, unit conversion, sorting, counting; written by
the project), and their ASR on held-out HarmBench test prompts is measured before and after.

Run after ``make demo`` (it reuses that run's neurons, documents and SN-Tuned model):
``.venv/bin/python examples/rsn_tune.py --run runs/demo``. Writes ``<run>/results/rsn_tune.csv``
and ``<run>/rsn_tune.html``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd

from safety_circuits import ablation
from safety_circuits.pipeline import EVAL_BATCH, TUNED, Run, documents
from safety_circuits.report import write_report
from safety_circuits.tuning import benign_task_documents, rsn_tune, tune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--task-documents", type=int, default=200)
    parser.add_argument("--task-lr", type=float, default=2e-5)
    parser.add_argument("--task-epochs", type=int, default=1)
    args = parser.parse_args()

    run = Run(args.run)
    cfg = run.config
    safety, foundation = run.neurons("safety"), run.neurons("foundation")
    docs = documents(run)
    task = benign_task_documents(n=args.task_documents, seed=cfg.seed)
    harmful, harmless = run.eval_prompts("harmbench"), run.eval_prompts("harmless")
    robust = rsn_tune(run.base, docs, safety, foundation, config=cfg.tune_config())
    tuned = {  # the run's SN-Tuned model, and RSN-Tune with the same documents and settings
        "SN-Tune": (run.model(TUNED), safety),
        "RSN-Tune": (robust.subject, robust.neurons),
    }
    rows = []
    for name, (start, neurons) in tuned.items():
        after_task = tune(start, task, mechanism="full", lr=args.task_lr, epochs=args.task_epochs)
        for stage, subject in (("after safety tuning", start), ("after the benign task", after_task.subject)):
            measured = ablation.measure(
                subject, harmful, harmless, max_new_tokens=cfg.max_new_tokens, use="hf", batch_size=EVAL_BATCH
            )
            rows.append({"method": name, "neurons": len(neurons), "stage": stage, **measured})
    table = pd.DataFrame(rows)
    table.to_csv(run.path("results", "rsn_tune.csv"), index=False)
    note = (
        f"{len(safety)} safety neurons, {len(safety - foundation)} of them not foundation neurons; "
        f"benign task: {len(task)} documents, full fine-tuning, lr {args.task_lr}, "
        f"{args.task_epochs} epoch(s). "
        f"ASR on {len(harmful)} HarmBench test prompts, over-refusal on {len(harmless)} harmless prompts."
    )
    path = write_report(
        run.path("rsn_tune.html"), "RSN-Tune vs SN-Tune (Table 4 analog)", [("Result", [note, table])]
    )
    print(note)
    print(table.to_string(index=False))
    print(f"report: {path}")


if __name__ == "__main__":
    main()
