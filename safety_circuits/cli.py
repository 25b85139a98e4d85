"""The ``safety-circuits`` command line: the stages of :mod:`safety_circuits.pipeline`.

``safety-circuits run`` does everything in order (``make demo``); ``detect``, ``tune``,
``evaluate``, ``ablate`` and ``report`` run one stage on a run folder (``--run runs/<name>``).
Options given to ``detect`` or ``run`` are saved in the folder's ``config.json``; later stages
read them from there.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, NoReturn

import pandas as pd

from safety_circuits import pipeline
from safety_circuits.pipeline import Run, RunConfig

STAGES: dict[str, tuple[Callable[[Run], Any], str]] = {
    "detect": (pipeline.detect, "find safety, foundation and robust safety neurons"),
    "tune": (pipeline.tune_models, "SN-Tune the safety neurons (and the controls)"),
    "evaluate": (pipeline.evaluate_models, "ASR, over-refusal, capability and KL of every model"),
    "ablate": (pipeline.deactivate, "Deact-SN vs Deact-R on the SN-Tuned model"),
    "report": (pipeline.report, "write report.html from the run folder"),
    "run": (pipeline.run_all, "all of the above, in order"),
}
_NEW_RUN = ("detect", "run")  # the stages that start a run folder and take the config options


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    defaults = RunConfig()
    for f in fields(RunConfig):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
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
            _add_config_options(stage)
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
            run = Run(args.run, config)
        else:
            run = Run(args.run)
        start = time.perf_counter()
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
