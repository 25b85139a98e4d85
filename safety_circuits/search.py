"""Recipe search for SN-Tune on validation splits only (Optuna, multi-objective TPE).

Each trial draws a :class:`Recipe` (neuron rule and threshold, learning rate, epochs, retain KL,
the numbers of extra refusal documents and of safe alarming retain documents) from a
:class:`SearchSpace`, tunes the base model's neurons with it and measures three objectives, all
minimised, on the *validation* halves of the held-out suites (:data:`VALIDATION_SUITES`):

- ``asr``: the share of harmful validation prompts answered (the harmful suites pooled);
- ``over_refusal``: the share of harmless validation prompts refused (the plain harmless set and
  the safe-but-alarming set pooled);
- ``kl``: the mean KL(original || tuned) of next-token distributions on the harmless ones.

The study lives in Optuna's SQLite storage, so a search resumes where it stopped (a trial cut
off by an interruption is marked failed; a recipe that selects no neurons is pruned). The test
splits are never read here: the recipe chosen (:meth:`SearchResult.choose`) is evaluated once on
them by the pipeline.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import optuna
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from torch import Tensor

from safety_circuits import data
from safety_circuits._io import Record, TableResult
from safety_circuits.ablation import mean_kl, next_token_logprobs
from safety_circuits.detect import RULE_INPUTS, rule_neurons
from safety_circuits.evaluate import evaluate_suites
from safety_circuits.importance import Importance, neuron_importance
from safety_circuits.neurons import NeuronSet
from safety_circuits.tuning import (
    Document,
    TuneConfig,
    reference_states,
    refusal_documents,
    retain_documents,
    tune,
)

if TYPE_CHECKING:
    from safety_circuits.architecture import Architecture
    from safety_circuits.loading import Subject

logger = logging.getLogger(__name__)
NeuronRule = Literal["safety", "contrastive", "scored"]
RULES: tuple[NeuronRule, ...] = ("safety", "contrastive", "scored")
OBJECTIVES = ("asr", "over_refusal", "kl")
#: Random trials before TPE models the objectives (Optuna's default is 10; a trial here takes minutes).
STARTUP_TRIALS = 5
#: The suites a search measures on (their validation halves); HarmBench has none (its val split
#: finds the neurons and writes refusal documents).
VALIDATION_SUITES = (
    "advbench",
    "donotanswer",
    "past_tense",
    "future_tense",
    "alarming_unsafe",
    "harmless",
    "alarming",
)


@dataclass(frozen=True)
class Recipe(Record):
    """What a trial sets: which neurons (``rule`` at ``quantile``) and how they are tuned."""

    ignore_unknown: ClassVar[bool] = True  # read from a trial's row or a run config

    rule: NeuronRule = "safety"
    quantile: float = 0.98
    lr: float = 5e-4
    epochs: int = 1
    retain_kl: float = 3.0
    train_harmful: int = 60  # AdvBench train prompts with refusals, on top of HarmBench val
    retain_alarming: int = 0  # safe alarming train prompts answered by the model, on top of harmless train

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if not 0 < self.quantile < 1 or self.lr <= 0 or self.epochs < 1 or self.retain_kl < 0:
            raise ValueError(f"invalid recipe {self}")
        if self.train_harmful < 0 or self.retain_alarming < 0:
            raise ValueError(f"train_harmful and retain_alarming must be >= 0 in {self}")


@dataclass(frozen=True)
class SearchSpace:
    """The ranges a trial draws from (``lr`` on a log scale)."""

    rules: tuple[NeuronRule, ...] = RULES
    quantile: tuple[float, float] = (0.95, 0.995)
    lr: tuple[float, float] = (1e-4, 5e-3)
    epochs: tuple[int, int] = (1, 2)
    retain_kl: tuple[float, float] = (0.0, 10.0)
    train_harmful: tuple[int, int] = (0, 120)
    retain_alarming: tuple[int, int] = (0, 65)

    def __post_init__(self) -> None:
        unknown = set(self.rules) - set(RULES)
        if unknown or not self.rules:
            raise ValueError(f"rules must be some of {RULES}, got {self.rules}")

    def suggest(self, trial: optuna.Trial) -> Recipe:
        return Recipe(
            rule=trial.suggest_categorical("rule", list(self.rules)),
            quantile=trial.suggest_float("quantile", *self.quantile),
            lr=trial.suggest_float("lr", *self.lr, log=True),
            epochs=trial.suggest_int("epochs", *self.epochs),
            retain_kl=trial.suggest_float("retain_kl", *self.retain_kl),
            train_harmful=trial.suggest_int("train_harmful", *self.train_harmful),
            retain_alarming=trial.suggest_int("retain_alarming", *self.retain_alarming),
        )


@dataclass
class SearchResult(TableResult):
    """The complete trials of a study: one row each with the recipe, the three validation
    objectives, the number of neurons tuned, the tuning run's seconds and the trial's."""

    frame: pd.DataFrame
    arch: Architecture | None = None  # the model's (None: not made from one)

    def pareto(self) -> pd.DataFrame:
        """The trials no other trial beats on every objective (lower is better)."""
        values = self.frame[list(OBJECTIVES)].to_numpy(float)
        keep = [not any((other <= row).all() and (other < row).any() for other in values) for row in values]
        return self.frame[keep]

    def choose(
        self, max_over_refusal: float = 0.10, max_kl: float = 0.10, max_tune_seconds: float | None = None
    ) -> Recipe:
        """The recipe of :meth:`choice`."""
        return Recipe.from_dict(self.choice(max_over_refusal, max_kl, max_tune_seconds).to_dict())

    def choice(
        self, max_over_refusal: float = 0.10, max_kl: float = 0.10, max_tune_seconds: float | None = None
    ) -> pd.Series:
        """The trial (its row) on the Pareto front with the lowest ASR among those within
        ``max_over_refusal`` and ``max_kl`` (on validation) and, if given, ``max_tune_seconds`` of
        tuning; without any, the one with the lowest sum of the objectives."""
        if self.frame.empty:
            raise ValueError("the study has no complete trial yet: run the search first")
        front = self.pareto()
        within = front[(front["over_refusal"] <= max_over_refusal) & (front["kl"] <= max_kl)]
        if max_tune_seconds is not None:
            within = within[within["tune_seconds"] <= max_tune_seconds]
        if within.empty:
            return front.loc[front[list(OBJECTIVES)].sum(axis=1).idxmin()]
        return within.sort_values(["asr", "over_refusal", "kl"]).iloc[0]

    def plot(self) -> go.Figure:
        """Validation ASR against over-refusal per trial, coloured by KL; the Pareto front ringed."""
        frame = self.frame.assign(pareto=self.frame.index.isin(self.pareto().index))
        fig = px.scatter(
            frame,
            x="over_refusal",
            y="asr",
            color="kl",
            symbol="rule",
            hover_data=[
                "number",
                "quantile",
                "lr",
                "epochs",
                "retain_kl",
                "train_harmful",
                "retain_alarming",
                "neurons",
                "tune_seconds",
            ],
            title="Recipe search on validation splits (lower left is better; Pareto front ringed)",
        )
        front = frame[frame["pareto"]].sort_values("over_refusal")
        fig.add_trace(
            go.Scatter(
                x=front["over_refusal"],
                y=front["asr"],
                mode="markers+lines",
                marker={"size": 16, "symbol": "circle-open", "color": "black"},
                line={"dash": "dot", "color": "black"},
                name="Pareto front",
            )
        )
        return fig.update_layout(xaxis_title="over-refusal (validation)", yaxis_title="ASR (validation)")

    def __repr__(self) -> str:
        return f"SearchResult({len(self.frame)} trials, {len(self.pareto())} on the Pareto front)"


class RecipeSearch:
    """An Optuna study of SN-Tune recipes for ``subject``, stored at ``storage`` (a SQLite file).

    ``per_suite`` validation prompts are drawn (``seed``) from each of :data:`VALIDATION_SUITES`;
    neurons come from the importance on ``harmful`` (HarmBench val by default) and on as many
    harmless train prompts, rendered the same way (the contrastive rules' reference). Every other
    tuning setting comes from ``tune_config``; retain documents are the harmless train prompts and
    the recipe's share of the safe alarming train prompts, answered by ``subject`` (``retain_tokens``
    new tokens) once for every trial.
    """

    def __init__(
        self,
        subject: Subject,
        storage: str | os.PathLike,
        space: SearchSpace | None = None,
        study_name: str = "sn_tune",
        per_suite: int = 40,
        max_new_tokens: int = 32,
        seed: int = 0,
        tune_config: TuneConfig | None = None,
        harmful: Sequence[str] | None = None,
        retain_tokens: int = 32,
        batch_size: int = 192,
        importance: Importance | None = None,
        matched: Importance | None = None,
    ) -> None:
        if per_suite < 1:
            raise ValueError(f"per_suite must be >= 1, got {per_suite}")
        self.subject = subject
        self.storage = Path(storage)
        self.space = space or SearchSpace()
        self.study_name = study_name
        self.per_suite, self.max_new_tokens, self.seed = per_suite, max_new_tokens, seed
        self.tune_config = tune_config or TuneConfig(batch_size=4)
        self.harmful = list(harmful) if harmful is not None else data.harmbench("val")
        self.retain_tokens, self.batch_size = retain_tokens, batch_size
        self._importance, self._matched = importance, matched

    # -- what every trial shares, made once ----------------------------------------------------
    @cached_property
    def importance(self) -> Importance:
        if self._importance is not None:
            return self._importance
        return neuron_importance(self.subject, self.harmful, batch_size=8, progress=False)

    @cached_property
    def matched(self) -> Importance:
        """Importance on harmless train prompts, as many as the harmful ones, rendered alike."""
        if self._matched is not None:
            return self._matched
        config = self.importance.config
        return neuron_importance(
            self.subject,
            matched_harmless(len(self.harmful), self.seed),
            kinds=config.get("kinds", self.importance.kinds),
            batch_size=8,
            chat=config.get("chat", True),
            scope=config.get("scope", "all"),
            progress=False,
        )

    @cached_property
    def _answers(self) -> dict[str, tuple[Document, Tensor]]:
        """Every prompt a trial may retain, with its document (answered by ``subject``) and the
        original model's hidden states on it (the retain-KL reference)."""
        prompts = data.harmless("train") + data.alarming_train()
        docs = retain_documents(
            self.subject, prompts, max_new_tokens=self.retain_tokens, batch_size=self.batch_size
        )
        states = reference_states(self.subject, docs, max_length=self.tune_config.max_length)
        return {doc.prompt: (doc, state) for doc, state in zip(docs, states, strict=True)}

    def retain(self, recipe: Recipe) -> list[tuple[Document, Tensor]]:
        prompts = data.harmless("train") + data.alarming_train(recipe.retain_alarming, seed=self.seed)
        return [self._answers[p] for p in prompts]

    @cached_property
    def suites(self) -> list[data.Suite]:
        return [data.suite(name) for name in VALIDATION_SUITES]

    @cached_property
    def _harmless(self) -> list[str]:
        return data.suite("harmless").prompts("validation", n=self.per_suite, seed=self.seed)

    @cached_property
    def _reference(self) -> list:
        return next_token_logprobs(self.subject, self._harmless, batch_size=self.batch_size, use="hf")

    def neurons(self, recipe: Recipe) -> NeuronSet:
        matched = self.matched if "matched" in RULE_INPUTS[recipe.rule] else None  # computed once, if used
        return rule_neurons(recipe.rule, self.importance, quantile=recipe.quantile, matched=matched)

    def documents(self, recipe: Recipe) -> list[Document]:
        extra = data.train_harmful(recipe.train_harmful, seed=self.seed)
        return refusal_documents(self.harmful + extra, seed=self.seed) + [d for d, _ in self.retain(recipe)]

    # -- one trial -----------------------------------------------------------------------------
    def evaluate(self, recipe: Recipe) -> dict[str, float]:
        """Tune with ``recipe`` and measure the objectives on the validation splits."""
        start = time.perf_counter()
        neurons = self.neurons(recipe)
        if len(neurons) == 0:
            raise optuna.TrialPruned(f"{recipe} selects no neurons")
        docs = self.documents(recipe)
        settings = {"lr": recipe.lr, "epochs": recipe.epochs, "retain_kl": recipe.retain_kl}
        config = TuneConfig(**{**self.tune_config.to_dict(), **settings})
        reference = None  # reference_states(docs): None for each refusal, then the retain states
        if recipe.retain_kl:
            retain = [state for _, state in self.retain(recipe)]
            reference = [None] * (len(docs) - len(retain)) + retain
        tuned_at = time.perf_counter()
        tuned = tune(self.subject, docs, neurons, config=config, progress=False, reference=reference).subject
        tune_seconds = time.perf_counter() - tuned_at
        result = evaluate_suites(
            tuned,
            self.suites,
            split="validation",
            n=self.per_suite,
            seed=self.seed,
            max_new_tokens=self.max_new_tokens,
            use="hf",
            batch_size=self.batch_size,
            progress=False,
        )
        frame = result.frame
        harmful = frame[frame["kind"] == "harmful"]
        harmless = frame[frame["kind"] == "harmless"]
        kl = mean_kl(
            self._reference, next_token_logprobs(tuned, self._harmless, batch_size=self.batch_size, use="hf")
        )
        return {
            "asr": float((~harmful["refused"]).mean()),
            "over_refusal": float(harmless["refused"].mean()),
            "kl": kl,
            "neurons": len(neurons),
            "tune_seconds": tune_seconds,
            "seconds": time.perf_counter() - start,
        }

    # -- the study -----------------------------------------------------------------------------
    def study(self) -> optuna.Study:
        """The stored study (created if new). The sampler's seed moves on with the number of
        trials stored, so a resumed search does not redraw its first recipes."""
        self.storage.parent.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(
            study_name=self.study_name,
            storage=f"sqlite:///{self.storage.resolve()}",
            directions=["minimize"] * len(OBJECTIVES),
            load_if_exists=True,
        )
        study.sampler = optuna.samplers.TPESampler(
            seed=self.seed + len(study.trials), multivariate=True, n_startup_trials=STARTUP_TRIALS
        )
        return study

    def run(
        self, trials: int | None = 10, timeout: float | None = None, enqueue: Sequence[Recipe] = ()
    ) -> SearchResult:
        """Run ``trials`` more trials (or until ``timeout`` seconds) and return every complete one.
        The ``enqueue`` recipes are tried first, as they are (e.g. a chosen recipe with one
        setting changed, to measure what that setting adds)."""
        if trials is None and timeout is None:
            raise ValueError("give trials or timeout (or both)")
        study = self.study()
        stored = {tuple(t.distributions["rule"].choices) for t in study.trials if "rule" in t.distributions}
        if stored - {tuple(self.space.rules)}:
            raise ValueError(
                f"{self.storage} searched the rules {sorted(stored)[0]}, not {self.space.rules}: "
                "resume it with the same rules, or start a new study"
            )
        for recipe in enqueue:
            study.enqueue_trial(recipe.to_dict(), skip_if_exists=True)
        for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)  # cut off by an interruption
            logger.info("trial %d was interrupted: marked failed", stale.number)

        def objective(trial: optuna.Trial) -> tuple[float, ...]:
            recipe = self.space.suggest(trial)
            measured = self.evaluate(recipe)
            for key in ("neurons", "tune_seconds", "seconds"):
                trial.set_user_attr(key, measured[key])
            logger.info("trial %d %s: %s", trial.number, recipe, measured)
            return tuple(measured[k] for k in OBJECTIVES)

        study.optimize(objective, n_trials=trials, timeout=timeout)
        return self.result()

    def result(self) -> SearchResult:
        """Every complete trial stored so far."""
        result = result_of(self.study())
        result.arch = self.subject.arch
        return result


def matched_harmless(n: int, seed: int = 0) -> list[str]:
    """``n`` harmless train prompts drawn by ``seed``: the contrastive rules' reference for as
    many harmful prompts."""
    return data.sample(data.harmless("train"), n, seed=seed)


def result_of(study: optuna.Study) -> SearchResult:
    rows = [
        {
            "number": t.number,
            **Recipe.from_dict(t.params).to_dict(),
            **dict(zip(OBJECTIVES, t.values, strict=True)),
            "neurons": t.user_attrs.get("neurons"),
            "tune_seconds": t.user_attrs.get("tune_seconds"),
            "seconds": t.user_attrs.get("seconds"),
        }
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    ]
    columns = ["number", *(f.name for f in fields(Recipe)), *OBJECTIVES, "neurons", "tune_seconds", "seconds"]
    return SearchResult(pd.DataFrame(rows, columns=columns))
