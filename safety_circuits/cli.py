"""The ``safety-circuits`` command line: the stages of :mod:`safety_circuits.pipeline`.

``safety-circuits run`` does everything in order (``make demo``); ``detect``, ``tune``,
``evaluate``, ``ablate`` and ``report`` run one stage on a run folder (``--run runs/<name>``);
``search`` looks for an SN-Tune recipe on validation splits (``run --recipe`` applies it).
Options given to ``detect`` or ``run`` are saved in the folder's ``config.json``; later stages
read them from there. ``evaluate`` and ``ablate`` also take the evaluation options, which replace
the saved ones (``safety-circuits evaluate --eval-per-suite 0``: every test prompt).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, NoReturn

import pandas as pd

from safety_circuits import pipeline
from safety_circuits.pipeline import Run, RunConfig
from safety_circuits.search import RULES, Recipe, SearchSpace

STAGES: dict[str, tuple[Callable[[Run], Any], str]] = {
    "detect": (pipeline.detect, "find safety, foundation and robust safety neurons"),
    "tune": (pipeline.tune_models, "SN-Tune the safety neurons (and the controls)"),
    "evaluate": (pipeline.evaluate_models, "ASR, over-refusal, capability and KL of every model"),
    "ablate": (pipeline.deactivate, "Deact-SN vs Deact-R on the SN-Tuned model"),
    "detector": (pipeline.detector, "the unsafe-output detector across suites (features x training data)"),
    "report": (pipeline.report, "write report.html from the run folder"),
    "search": (pipeline.search, "search SN-Tune recipes on validation splits (Optuna; resumes)"),
    "run": (pipeline.run_all, "all of the above, in order"),
}
_NEW_RUN = ("detect", "run")  # the stages that start a run folder and take the config options
_EVALUATING = ("evaluate", "ablate")  # the stages that may change the evaluation options
EVAL_OPTIONS = ("eval_per_suite", "judge", "capability", "max_new_tokens", "random_seeds")


def _add_config_options(parser: argparse.ArgumentParser, names: Sequence[str], keep: bool = False) -> None:
    """One option per RunConfig field in ``names``; with ``keep`` they default to the run's
    saved value (None here)."""
    defaults = RunConfig()
    for name in names:
        default = getattr(defaults, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif keep:
            parser.add_argument(flag, type=type(default), default=None, help="default: the run's")
        else:
            parser.add_argument(flag, type=type(default), default=default, help=f"default: {default}")


class _Parser(argparse.ArgumentParser):
    """Bad options end in one ``error:`` line (and exit 2), like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="safety-circuits", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level; tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in STAGES.items():
        stage = sub.add_parser(name, help=help_text, description=help_text)
        stage.add_argument("--run", default="runs/demo", help="run folder (default: runs/demo)")
        stage.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
        if name in _NEW_RUN:
            _add_config_options(stage, [f.name for f in fields(RunConfig)])
            stage.add_argument(
                "--recipe", help="a recipe JSON (`safety-circuits search` writes one) over the options"
            )
        elif name in _EVALUATING:
            _add_config_options(stage, EVAL_OPTIONS, keep=True)
        elif name == "search":
            stage.add_argument("--trials", type=int, default=10, help="trials to add (default: 10)")
            stage.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
            stage.add_argument(
                "--rules", default=",".join(RULES), help=f"neuron rules to try (default: {','.join(RULES)})"
            )
            stage.add_argument(
                "--enqueue",
                action="append",
                default=[],
                metavar="RECIPE_JSON",
                help="a recipe JSON to try first, as it is (repeatable)",
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Any failure ends in one ``error:`` line on stderr and exit code 2
    (1 for an interrupt); ``-v`` prints the traceback before it."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:  # the hub client's retry messages; its final error still reaches the user
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command in _NEW_RUN:
            config = RunConfig(**{f.name: getattr(args, f.name) for f in fields(RunConfig)})
            if args.recipe:
                config = config.with_recipe(Recipe.from_dict(json.loads(Path(args.recipe).read_text())))
            run = Run(args.run, config)
        else:
            run = Run(args.run)
            changed = {k: getattr(args, k) for k in EVAL_OPTIONS if getattr(args, k, None) is not None}
            if changed:
                run = Run(args.run, replace(run.config, **changed))
        start = time.perf_counter()
        if args.command == "search":
            space = SearchSpace(rules=tuple(r.strip() for r in args.rules.split(",")))
            enqueue = [Recipe.from_dict(json.loads(Path(f).read_text())) for f in args.enqueue]
            result = pipeline.search(
                run, trials=args.trials, timeout=args.timeout, space=space, enqueue=enqueue
            )
        else:
            result = STAGES[args.command][0](run)
    except (Exception, KeyboardInterrupt) as e:
        if args.verbose:
            traceback.print_exc()
        message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the library wrote
        hint = "" if args.verbose else " (-v shows the traceback)"
        print(f"safety-circuits {args.command}: error: {message}{hint}", file=sys.stderr)
        return 1 if isinstance(e, KeyboardInterrupt) else 2
    _summarise(args.command, result, time.perf_counter() - start)
    return 0


def _summarise(command: str, result: Any, seconds: float) -> None:
    with pd.option_context("display.width", 140, "display.max_columns", 20, "display.precision", 3):
        if isinstance(result, dict):
            for name, neurons in result.items():
                print(f"{name:>10}: {len(neurons):6d} neurons ({100 * neurons.fraction_of():.2f}% of all)")
        elif isinstance(result, pd.DataFrame):
            print(result.to_string(index=False))
        else:
            print(f"report: {result}")
    print(f"safety-circuits {command}: done in {seconds:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
