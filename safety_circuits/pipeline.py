"""The main job in a run folder: detect safety neurons -> SN-Tune -> evaluate -> deactivate -> report.

Each stage reads what the previous ones wrote under ``runs/<name>/``, so the CLI can run them one
at a time (``safety-circuits detect|tune|evaluate|ablate|report``) or all in order (``run``)::

    runs/<name>/config.json                     the RunConfig
    runs/<name>/documents.json                  the tuning documents (refusals and retain)
    runs/<name>/neurons/*.safetensors, *.csv    importance; safety, foundation, robust, contrastive and
                                                scored NeuronSets; specificity.csv
    runs/<name>/models/sn_tune/                 the SN-Tuned model (plain HF folder + mask + record)
    runs/<name>/models/{random,full}/           controls: random neurons of equal counts, full FT
    runs/<name>/results/*.csv                   evaluation, deactivation, responses
    runs/<name>/search.db, results/search.csv   the recipe search (``safety-circuits search``)
    runs/<name>/report.html                     tables and plotly figures, self-contained

Prompt splits never cross: neurons are found on HarmBench *val* (and, for the contrastive sets,
harmless *train* prompts); refusal documents use HarmBench val and the AdvBench *train* split;
retain documents the harmless *train* split; the recipe search reads the *validation* halves of
the held-out suites; the models are evaluated on their *test* halves and the capability questions.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from safety_circuits import ablation, data, multilingual, plots
from safety_circuits._io import Record, atomic_file
from safety_circuits.contrast import contrast_activations
from safety_circuits.crosssuite import (
    CrossSuiteResult,
    DirectionFeatures,
    FeatureFamily,
    NeuronFeatures,
    ResidualFeatures,
    TextFeatures,
    cross_suite,
)
from safety_circuits.detect import (
    RULE_INPUTS,
    contrastive_neurons,
    robust_safety_neurons,
    scored_neurons,
    select_neurons,
)
from safety_circuits.evaluate import SuiteEval, evaluate_suites
from safety_circuits.importance import Importance, neuron_importance
from safety_circuits.judge import JUDGES, agreement, judge_table, refused
from safety_circuits.loading import (
    DEFAULT_BACKEND,
    SMOLLM2,
    Backend,
    Subject,
    check_backend,
    check_source,
    load_model,
)
from safety_circuits.neurons import NeuronSet
from safety_circuits.report import Block, write_report
from safety_circuits.search import (
    OBJECTIVES,
    Recipe,
    RecipeSearch,
    SearchResult,
    SearchSpace,
    matched_harmless,
)
from safety_circuits.stats import Rate
from safety_circuits.tuning import (
    MECHANISMS,
    Document,
    Mechanism,
    TuneConfig,
    reference_states,
    refusal_documents,
    retain_documents,
    tune,
)
from safety_circuits.vocabulary import Scope, check_scope

logger = logging.getLogger(__name__)
TUNED = "sn_tune"
RANDOM = "random_s"  # random_s0, random_s1, ...: the random-neuron controls, one per seed
FULL = "full"
NEURON_SETS = ("safety", "foundation", "robust", "contrastive", "scored")
TUNABLE = tuple(RULE_INPUTS)  # safety, robust, contrastive, scored
SPECIFICITY_PROMPTS = 20  # harmless validation prompts the specificity KL is measured on
EVAL_BATCH = (
    192  # prompts decoded together (HF, KV cache): a decode step costs 4.3 ms a row at 64, 3.1 at 180
)


@dataclass
class RunConfig(Record):
    """Everything a run depends on (saved as ``config.json``)."""

    model: str = SMOLLM2
    backend: Backend = DEFAULT_BACKEND
    seed: int = 0
    # detection (HarmBench val)
    scope: Scope = "all"
    quantile: float = 0.98
    rule: str = "safety"  # the NeuronSet SN-Tune trains (and Table 1 deactivates): one of TUNABLE
    variant: str = (
        "safety"  # another rule tuned with the same recipe (models/sn_tune_<variant>); "" or rule: none
    )
    languages: str = ""  # e.g. "fr,de,zh": the rule's neurons in English and each (data.LANGUAGES)
    # documents
    train_harmful: int = 60  # AdvBench train prompts, on top of every HarmBench val prompt
    retain_tokens: int = 32
    retain_generated: int = 0  # templated everyday requests, on top of the harmless train split
    retain_alarming: int = 0  # safe alarming train prompts (data.alarming_train), answered likewise
    # tuning
    lr: float = 5e-4
    epochs: int = 1
    batch_size: int = 4
    mechanism: Mechanism = "delta"
    retain_kl: float = 3.0
    controls: bool = True
    control_seeds: int = 3  # random-neuron control models, one per seed
    full_lr: float = 5e-5  # the full fine-tuning control's rate (5e-4 on every weight breaks the model)
    # evaluation (test splits of every held-out suite, data.SUITE_NAMES)
    # the demo's sample; `safety-circuits evaluate --eval-per-suite 0 --capability 180` (`make evaluate`)
    # reads every test prompt
    eval_per_suite: int = 20  # prompts drawn from each suite's test split; 0 = all of them
    judge: str = "phrases"  # measures best on PyRIT's held-out human labels (judge.judge_table)
    capability: int = 90  # of the 180 questions
    max_new_tokens: int = 32  # examples/token_budget.py on validation splits: within 0.02 of 128 tokens
    random_seeds: int = 3  # random neuron sets of Deact-R (and of each set's specificity in detect)
    detector_per_suite: int = 0  # test prompts the detector reads from each suite; 0 = all of them

    def __post_init__(self) -> None:
        if isinstance(self.scope, str) and self.scope.isdigit():  # from the command line
            self.scope = int(self.scope)
        check_scope(self.scope)
        check_backend(self.backend)
        choices = {"mechanism": MECHANISMS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.rule not in TUNABLE:
            raise ValueError(f"rule must be one of {TUNABLE}, got {self.rule!r}")
        if self.variant not in ("", *TUNABLE):
            raise ValueError(f"variant must be one of {TUNABLE} or empty, got {self.variant!r}")
        if self.judge not in JUDGES:
            raise ValueError(f"judge must be one of {JUDGES}, got {self.judge!r}")
        unknown = set(self.language_list) - set(data.LANGUAGES)
        if unknown:
            raise ValueError(
                f"languages {sorted(unknown)} are not translated; choose from {list(data.LANGUAGES)}"
            )
        if not 0 < self.quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {self.quantile}")
        if self.control_seeds < 1 or self.eval_per_suite < 0 or self.detector_per_suite < 0:
            raise ValueError("control_seeds must be >= 1, eval_per_suite and detector_per_suite >= 0")

    @property
    def language_list(self) -> list[str]:
        """English and the ``languages`` given (none: an empty list)."""
        given = [lang.strip() for lang in self.languages.split(",") if lang.strip()]
        return list(dict.fromkeys(["en", *given])) if given else []

    def with_recipe(self, recipe: Recipe) -> RunConfig:
        """This config with a searched recipe's settings (:mod:`safety_circuits.search`)."""
        return RunConfig.from_dict({**self.to_dict(), **recipe.to_dict()})

    def tune_config(self) -> TuneConfig:
        return TuneConfig(
            lr=self.lr,
            epochs=self.epochs,
            batch_size=self.batch_size,
            seed=self.seed,
            mechanism=self.mechanism,
            retain_kl=self.retain_kl,
        )


class Run:
    """A run folder and its config; stages load the base model once and read each other's files."""

    def __init__(self, folder: str | os.PathLike, config: RunConfig | None = None) -> None:
        self.folder = Path(folder)
        saved = self.folder / "config.json"
        if config is None:
            if not saved.exists():
                raise FileNotFoundError(
                    f"{self.folder} has no config.json: run `safety-circuits detect` first"
                )
            config = RunConfig.from_dict(json.loads(saved.read_text()))
        else:
            check_source(config.model)  # a bad model name fails here, before the folder is written
        self.config = config
        self._models: dict[str, Subject] = {}
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_text(saved, json.dumps(config.to_dict(), indent=2))

    def path(self, *parts: str) -> Path:
        return self.folder.joinpath(*parts)

    @cached_property
    def base(self) -> Subject:
        return load_model(self.config.model, backend=self.config.backend)

    def model(self, name: str) -> Subject:
        """``"original"`` or a tuned model saved under ``models/`` (kept in memory once loaded
        or tuned in this process)."""
        if name == "original":
            return self.base
        if name not in self._models:
            folder = self.path("models", name)
            if not folder.exists():
                raise FileNotFoundError(f"{folder} does not exist: run `safety-circuits tune` first")
            self._models[name] = load_model(folder, backend=self.config.backend)
        return self._models[name]

    def neurons(self, name: str) -> NeuronSet:
        path = self.path("neurons", f"{name}.safetensors")
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run `safety-circuits detect` first")
        return NeuronSet.load(path, expect=self.base)

    def tuned_models(self) -> list[str]:
        """The tuned models saved in the run: SN-Tune, then the controls."""
        folder = self.path("models")
        saved = {p.name for p in folder.iterdir()} if folder.exists() else set()
        variants = sorted(n for n in saved if n.startswith(f"{TUNED}_"))
        order = [TUNED, *variants, *sorted(n for n in saved if n.startswith(RANDOM)), FULL]
        return [n for n in order if n in saved]

    # -- prompt sets (fixed by the config's seed) ---------------------------------------------
    def eval_prompts(self, suite: str) -> list[str]:
        """The prompts evaluated from one suite's test split."""
        n = self.config.eval_per_suite or None
        return data.suite(suite).prompts("test", n=n, seed=self.config.seed)

    def capability(self) -> pd.DataFrame:
        questions = data.capability_questions()
        return questions.sample(min(self.config.capability, len(questions)), random_state=self.config.seed)


def _write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    _write_text(path, frame.to_csv(index=False))


# -- stages ----------------------------------------------------------------------------------
def detect(run: Run) -> dict[str, NeuronSet]:
    """Safety neurons on HarmBench val; foundation neurons on the harmless train split (plain
    text); robust = safety − foundation; the contrastive and scored sets against as many harmless
    train prompts rendered like the harmful ones. Saved with the importance scores and readable
    tables, and each set's specificity: the KL of zeroing it on the original model against random
    sets of the same counts (``neurons/specificity.csv``, harmless *validation* prompts)."""
    cfg, subject = run.config, run.base
    start = time.perf_counter()
    harmful = data.harmbench("val")
    importance = neuron_importance(subject, harmful, batch_size=8, scope=cfg.scope)
    seconds = time.perf_counter() - start
    importance.save(run.path("neurons", "importance.safetensors"))
    matched = neuron_importance(
        subject, matched_harmless(len(harmful), cfg.seed), batch_size=8, scope=cfg.scope
    )
    matched.save(run.path("neurons", "importance_harmless.safetensors"))
    safety = select_neurons(importance, quantile=cfg.quantile).with_metadata(
        name="safety", source=subject.name, seconds=round(seconds, 1)
    )
    general = neuron_importance(subject, data.harmless("train"), batch_size=8, chat=False)
    foundation = select_neurons(general, quantile=cfg.quantile).with_metadata(name="foundation")
    sets = {
        "safety": safety,
        "foundation": foundation,
        "robust": robust_safety_neurons(safety, foundation),
        "contrastive": contrastive_neurons(importance, matched, quantile=cfg.quantile),
        "scored": scored_neurons(importance, matched, quantile=cfg.quantile),
    }
    for name, neurons in sets.items():
        neurons.save(run.path("neurons", f"{name}.safetensors"))
        _write_csv(run.path("neurons", f"{name}.csv"), neurons.to_frame())
    harmless = data.suite("harmless").prompts("validation", n=SPECIFICITY_PROMPTS, seed=cfg.seed)
    tunable = {name: sets[name] for name in TUNABLE if len(sets[name])}
    specificity = ablation.zeroing_kl(
        subject, harmless, tunable, random_seeds=cfg.random_seeds, batch_size=EVAL_BATCH, use="hf"
    )
    _write_csv(run.path("neurons", "specificity.csv"), specificity)
    logger.info("safety neurons: %d (%.2f%%) in %.0f s", len(safety), 100 * safety.fraction_of(), seconds)
    if cfg.language_list:
        sets.update(languages(run, english=sets[cfg.rule]))
    return sets


def languages(run: Run, *, english: NeuronSet) -> dict[str, NeuronSet]:
    """The ``rule``'s neurons in every language of ``languages`` (translated HarmBench val against
    the translated harmless train prompts; ``english``: the run's own set, found the same way),
    the set shared by all, and their overlap (``results/language_overlap.json``, ``.csv``)."""
    cfg = run.config
    others = [lang for lang in cfg.language_list if lang != "en"]
    found = multilingual.translated_neurons(
        run.base,
        others,
        rule=cfg.rule,
        quantile=cfg.quantile,
        seed=cfg.seed,
        batch_size=8,
        scope=cfg.scope,
    )
    sets = {"en": english.with_metadata(f"{cfg.rule} (en)", language="en"), **found}
    sets["shared"] = multilingual.shared_neurons(sets)
    for name, neurons in sets.items():
        neurons.save(run.path("neurons", "languages", f"{name}.safetensors"))
        _write_csv(run.path("neurons", "languages", f"{name}.csv"), neurons.to_frame())
    overlap = multilingual.language_overlap({lang: sets[lang] for lang in cfg.language_list})
    overlap.save(run.path("results", "language_overlap.json"))
    _write_csv(run.path("results", "language_overlap.csv"), overlap.to_frame())
    return {f"{cfg.rule}_{name}": neurons for name, neurons in sets.items()}


def documents(run: Run) -> list[Document]:
    """Refusals for HarmBench val + sampled AdvBench train prompts, and retain documents: the
    harmless train prompts, templated everyday requests and safe alarming train prompts, answered
    by the original model. Kept
    in ``documents.json`` and re-made when the settings they depend on change."""
    cfg = run.config
    made_with = {
        k: getattr(cfg, k)
        for k in ("model", "seed", "train_harmful", "retain_tokens", "retain_generated", "retain_alarming")
    }
    path = run.path("documents.json")
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["made_with"] == made_with:
            return [Document(**d) for d in saved["documents"]]
    harmful = data.harmbench("val") + data.train_harmful(cfg.train_harmful, seed=cfg.seed)
    harmless = (
        data.harmless("train")
        + data.harmless_generated(cfg.retain_generated, seed=cfg.seed)
        + data.alarming_train(cfg.retain_alarming, seed=cfg.seed)
    )
    retain = retain_documents(run.base, harmless, max_new_tokens=cfg.retain_tokens, batch_size=EVAL_BATCH)
    docs = refusal_documents(harmful, seed=cfg.seed) + retain
    saved = {"made_with": made_with, "documents": [asdict(d) for d in docs]}
    _write_text(path, json.dumps(saved, indent=1))
    return docs


def tune_models(run: Run) -> pd.DataFrame:
    """SN-Tune on the ``rule``'s neurons (and on the ``variant`` rule's, the same recipe) and, with
    ``controls``, on random neurons of the same counts per layer and kind, and full fine-tuning on
    the same documents. Saves each model."""
    cfg = run.config
    neurons = run.neurons(cfg.rule)
    docs = documents(run)
    plans: list[tuple[str, NeuronSet | None, Mechanism]] = [(TUNED, neurons, cfg.mechanism)]
    if cfg.variant and cfg.variant != cfg.rule:
        plans.append((f"{TUNED}_{cfg.variant}", run.neurons(cfg.variant), cfg.mechanism))
    if cfg.controls:
        seeds = range(cfg.seed, cfg.seed + cfg.control_seeds)
        plans += [(f"{RANDOM}{s - cfg.seed}", neurons.random_like(seed=s), cfg.mechanism) for s in seeds]
        plans.append((FULL, None, "full"))
    tune_config = cfg.tune_config()
    reference = reference_states(run.base, docs, max_length=tune_config.max_length) if cfg.retain_kl else None
    rows = []
    for name, chosen, mechanism in plans:
        lr = cfg.full_lr if mechanism == "full" else cfg.lr
        result = tune(
            run.base, docs, chosen, config=tune_config, mechanism=mechanism, lr=lr, reference=reference
        )
        result.save(run.path("models", name), overwrite=True)
        run._models[name] = result.subject
        rows.append({"model": name, "mechanism": mechanism, **_record_columns(result.record)})
    frame = pd.DataFrame(rows)
    _write_csv(run.path("results", "tuning.csv"), frame)
    return frame


def _record_columns(record: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "seconds",
        "peak_memory_mb",
        "neurons",
        "fraction_of_neurons",
        "trained_parameters",
        "steps",
        "tokens",
    )
    return {k: record.get(k) for k in keys}


def evaluate_models(run: Run) -> pd.DataFrame:
    """Every model of the run (the original, SN-Tune, the controls) on the test split of every
    held-out suite, judged, each rate with its Wilson 95% interval; SN-Tune against each control
    on the same prompts (paired bootstrap, McNemar); exact-match capability and KL against the
    original on harmless prompts. Returns the suites' rates, one row per model and suite."""
    cfg = run.config
    suites = [data.suite(name) for name in data.SUITE_NAMES]
    harmless, questions = run.eval_prompts("harmless"), run.capability()
    reference = ablation.next_token_logprobs(run.base, harmless, batch_size=EVAL_BATCH, use="hf")
    gen = {"use": "hf", "batch_size": EVAL_BATCH, "progress": False}
    evals, rows = [], []
    for name in ("original", *run.tuned_models()):
        subject = run.model(name)
        evals.append(
            evaluate_suites(
                subject,
                suites,
                split="test",
                n=cfg.eval_per_suite or None,
                seed=cfg.seed,
                judge=cfg.judge,
                model=name,
                max_new_tokens=cfg.max_new_tokens,
                **gen,
            )
        )
        correct = ablation.capability_accuracy(subject, questions, **gen).frame["correct"]
        kl = 0.0  # the original's KL to itself
        if name != "original":
            kl = ablation.mean_kl(
                reference, ablation.next_token_logprobs(subject, harmless, batch_size=EVAL_BATCH, use="hf")
            )
        capability = Rate.of(correct)
        rows.append(
            {
                "model": name,
                "kl": kl,
                "capability": capability.rate,
                "capability_lo": capability.lo,
                "capability_hi": capability.hi,
            }
        )
        logger.info("%s: %s", name, rows[-1])
    result = SuiteEval.concat(evals)
    rates = result.rates()
    frame = pd.DataFrame(rows)
    tuning_csv = run.path("results", "tuning.csv")
    if tuning_csv.exists():
        frame = frame.merge(pd.read_csv(tuning_csv), on="model", how="left")
    controls = [m for m in result.models if m not in ("original", TUNED)]
    if TUNED in result.models and controls:
        comparisons = pd.concat([result.compare(TUNED, other) for other in controls], ignore_index=True)
        _write_csv(run.path("results", "comparisons.csv"), comparisons)
    _write_csv(run.path("results", "evaluation.csv"), frame)
    _write_csv(run.path("results", "suites.csv"), rates)
    _write_csv(run.path("results", "judge_agreement.csv"), judge_agreement(result))
    _write_csv(run.path("results", "responses.csv"), result.to_frame())
    return rates


def judge_agreement(result: SuiteEval) -> pd.DataFrame:
    """How often the run's judge and every other judge agree on each model's responses (raw
    rate and Cohen's kappa), and on all of them."""
    frame, judge = result.frame, result.config["judge"]
    rows = []
    for other in (j for j in JUDGES if j != judge):
        theirs = pd.Series(refused(frame["response"].tolist(), other), index=frame.index)
        for model, part in [*frame.groupby("model", sort=False), ("all", frame)]:
            stats = agreement(part["refused"].to_numpy(bool), theirs[part.index].to_numpy(bool))
            rows.append({"model": model, "judge": judge, "other": other, **stats})
    return pd.DataFrame(rows)


def deactivate(run: Run) -> pd.DataFrame:
    """Table 1 on the SN-Tuned model: Origin, Deact-R and Deact-SN (the tuned safety neurons):
    ASR, over-refusal and KL against the tuned model (the paper's table is ASR only)."""
    cfg = run.config
    rates = _read(run, "suites.csv")
    origin = None  # reused from `evaluate` when it judged the same prompts the same way
    if rates is not None and cfg.judge == "phrases" and TUNED in set(rates["model"]):
        rate = rates.set_index(["model", "suite"])["rate"]
        origin = {"asr": float(rate[TUNED, "harmbench"]), "over_refusal": float(rate[TUNED, "harmless"])}
    table = ablation.deactivation_experiment(
        run.model(TUNED),
        run.eval_prompts("harmbench"),
        run.eval_prompts("harmless"),
        run.neurons(cfg.rule),
        random_seeds=cfg.random_seeds,
        max_new_tokens=cfg.max_new_tokens,
        use="hf",
        batch_size=EVAL_BATCH,
        origin=origin,
    )
    _write_csv(run.path("results", "deactivation.csv"), table)
    return table


def detector(run: Run) -> pd.DataFrame:
    """The unsafe-output detector across suites (:func:`safety_circuits.crosssuite.cross_suite`)
    on the base model: the safety neurons, the tuned rule's set, Chen's contrast neurons (SN-Tuned
    against base, as many as the safety neurons; when the tuned model exists), the residual stream
    at the best-probed layer, the refusal direction per layer and the bag-of-words baseline, each
    fitted on every default training, scored on every prompt of each test split
    (``detector_per_suite`` of them when set; forward passes only, no generation). Writes
    ``results/detector.json`` and ``detector.csv``; returns, per features and training, whether
    every out-of-suite target holds."""
    cfg = run.config
    sets = dict.fromkeys(("safety", cfg.rule))
    features: list[FeatureFamily] = [
        NeuronFeatures(run.neurons(name), name=f"{name} neurons") for name in sets
    ]
    if run.path("models", TUNED).exists():
        scores = contrast_activations(
            run.model(TUNED),
            run.base,
            data.harmbench("val"),
            max_new_tokens=cfg.max_new_tokens,
            batch_size=EVAL_BATCH,
        )
        features.append(NeuronFeatures(scores.top(k=len(run.neurons("safety"))), name="contrast neurons"))
    features += [ResidualFeatures(), DirectionFeatures(), TextFeatures()]
    per_suite = cfg.detector_per_suite or None
    result = cross_suite(run.base, features, test_per_suite=per_suite, seed=cfg.seed, batch_size=16)
    result.save(run.path("results", "detector.json"))
    _write_csv(run.path("results", "detector.csv"), result.to_frame())
    return result.meets()


def search(
    run: Run,
    trials: int | None = 10,
    timeout: float | None = None,
    space: SearchSpace | None = None,
    enqueue: Sequence[Recipe] = (),
) -> pd.DataFrame:
    """The recipe search (:class:`safety_circuits.search.RecipeSearch`) on the run's base model,
    stored in ``search.db`` (it resumes), on validation splits only; ``enqueue`` recipes are tried
    first. Writes every complete trial
    (``results/search.csv``) and the chosen recipe (``results/recipe.json``: apply it with
    ``safety-circuits run --recipe runs/<name>/results/recipe.json``); returns the Pareto front."""
    cfg = run.config

    def saved(file: str) -> Importance | None:  # detect's importances, if it ran
        path = run.path("neurons", f"{file}.safetensors")
        return Importance.load(path, expect=run.base) if path.exists() else None

    searcher = RecipeSearch(
        run.base,
        run.path("search.db"),
        space=space,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
        tune_config=cfg.tune_config(),
        retain_tokens=cfg.retain_tokens,
        batch_size=EVAL_BATCH,
        importance=saved("importance"),
        matched=saved("importance_harmless"),
    )
    result = searcher.run(trials=trials, timeout=timeout, enqueue=enqueue)
    _write_csv(run.path("results", "search.csv"), result.to_frame())
    if result.frame.empty:
        raise RuntimeError(f"no trial of {run.path('search.db')} completed (each selected no neurons?)")
    row = result.choice()
    chosen_from = {k: _plain(row[k]) for k in ("number", *OBJECTIVES, "neurons", "tune_seconds")}
    provenance = {
        "trial": chosen_from,
        "complete_trials": len(result.frame),
        "study": str(run.path("search.db")),
    }
    recipe = {**Recipe.from_dict(row.to_dict()).to_dict(), "search": provenance}
    _write_text(run.path("results", "recipe.json"), json.dumps(recipe, indent=2))
    return result.pareto()


def report(run: Run) -> Path:
    """``report.html`` from whatever the stages have written so far."""
    cfg = run.config
    sections: list[tuple[str, list[Block]]] = [
        ("Run", [pd.DataFrame([cfg.to_dict()]).T.rename(columns={0: ""})])
    ]
    if run.path("neurons", "safety.safetensors").exists():
        sets = {n: run.neurons(n) for n in NEURON_SETS if run.path("neurons", f"{n}.safetensors").exists()}
        counts = pd.DataFrame(
            [
                {"set": name, **neurons.counts().sum().to_dict(), "total": len(neurons)}
                | {"percent_of_all": round(100 * neurons.fraction_of(), 3)}
                for name, neurons in sets.items()
            ]
        )
        blocks: list[Block] = [
            f"Found on the HarmBench val behaviours, scope={cfg.scope}, quantile {cfg.quantile} "
            "per prompt and kind. safety: important for every prompt (Eq. 3); foundation: the same on "
            "plain harmless text; robust: safety − foundation; contrastive: safety minus the neurons "
            "important for every one of as many harmless prompts rendered the same way; scored: the "
            f"top share of each kind by harmful-minus-harmless importance rank. SN-Tune trains {cfg.rule}.",
            counts,
            plots.neurons_per_layer(sets[cfg.rule] if cfg.rule in sets else sets["safety"]),
            plots.attention_vs_ffn(sets),
            plots.overlap_heatmap(sets),
        ]
        specificity = _read(run, "specificity.csv", "neurons")
        if specificity is not None:
            blocks += [
                f"Specificity on the original model: mean KL of next-token distributions on "
                f"{SPECIFICITY_PROMPTS} harmless validation prompts with the set zeroed, against "
                f"{cfg.random_seeds} random sets of the same counts per layer and kind (small kl and "
                "kl_ratio: specific).",
                specificity,
            ]
        sections.append(("Neuron sets", blocks))
    if run.path("results", "language_overlap.json").exists():
        overlap = multilingual.LanguageOverlap.load(run.path("results", "language_overlap.json"))
        sizes = overlap.frame.query("a == b and kind == 'all' and band == 'all'")[["a", "size_a"]]
        blocks = [
            f"The {cfg.rule!r} rule in each language (the project's translations of HarmBench val, "
            "against the translated harmless train prompts); neurons per language:",
            sizes.rename(columns={"a": "language", "size_a": "neurons"}),
            overlap.plot("iou"),
            overlap.plot("share_of_b"),
        ]
        sections.append(("Safety neurons per language (SN-Tune Fig. 5)", blocks))
    search = _read(run, "search.csv")
    if search is not None and len(search):
        result = SearchResult(search)
        sections.append(
            (
                "Recipe search (validation splits only)",
                [
                    f"{len(search)} complete trials; objectives on the validation halves of "
                    "the held-out suites. The chosen recipe (results/recipe.json): "
                    f"{result.choose().to_dict()}",
                    result.plot(),
                    result.pareto(),
                ],
            )
        )
    sections += _evaluation_sections(run)
    deactivation = _read(run, "deactivation.csv")
    if deactivation is not None:
        sections.append(("Deactivation on the SN-Tuned model (paper Table 1)", [deactivation]))
    if run.path("results", "detector.json").exists():
        cross = CrossSuiteResult.load(run.path("results", "detector.json"))
        sections.append(
            (
                "Unsafe-output detector across suites (base model, before generation)",
                [
                    "Fitted on validation splits (training: advbench = AdvBench vs harmless; mixed = "
                    "every harmful suite with a validation split but the one scored; +alarming adds "
                    "the safe-alarming negatives), scored on each harmful test split against "
                    "the safe-alarming test split. AUROC [95% CI]; * = the suite was trained on. "
                    "If the text baseline matches the neuron features, they read style.",
                    cross.table("alarming"),
                    "False-positive rate on the safe-alarming test split at 95% true-positive rate:",
                    cross.table("alarming", value="fpr"),
                    "Target: out-of-suite AUROC >= 0.90 and FPR <= 0.10 on every harmful suite:",
                    cross.meets().reset_index(),
                    cross.plot(),
                ],
            )
        )
    timings = _read(run, "timings.csv")
    if timings is not None:
        total = timings["seconds"].sum()
        sections.append(("Time per stage (seconds)", [f"Total {total:.0f} s.", timings]))
    responses = _read(run, "responses.csv")
    if responses is not None:
        harmful = responses[responses["kind"] == "harmful"]
        sections.append(
            (
                "Responses to held-out harmful prompts (first 3 per model)",
                [harmful.groupby("model", sort=False).head(3)],
            )
        )
    return write_report(run.path("report.html"), f"safety_circuits run: {cfg.model}", sections)


def _evaluation_sections(run: Run) -> list[tuple[str, list[Block]]]:
    """The held-out suites: the ASR vs over-refusal figure, one table per suite, SN-Tune against
    the controls, then capability and KL."""
    cfg, rates, responses = run.config, _read(run, "suites.csv"), _read(run, "responses.csv")
    if rates is None or responses is None:
        return []
    per_suite = f"{cfg.eval_per_suite} prompts" if cfg.eval_per_suite else "all prompts"
    blocks: list[Block] = [
        f"Test splits of every held-out suite ({per_suite} a suite, seed {cfg.seed}), greedy, "
        f"{cfg.max_new_tokens} new tokens, judged by the {cfg.judge} judge. On a harmful suite the "
        "rate is ASR (answered), on a harmless one the share refused; [lo, hi] is the Wilson 95% interval.",
        SuiteEval(responses).plot(),
    ]
    for suite, part in rates.groupby("suite", sort=False):
        blocks += [f"<b>{suite}</b> ({part['metric'].iloc[0]})", _rate_table(part)]
    sections = [("Held-out suites", blocks)]
    comparisons = _read(run, "comparisons.csv")
    if comparisons is not None:
        shown = comparisons.assign(
            difference=comparisons.apply(lambda r: f"{r.difference:+.2f} [{r.lo:+.2f}, {r.hi:+.2f}]", axis=1)
        )
        sections.append(
            (
                "SN-Tune against each control (paired, same prompts)",
                [
                    "Rate of SN-Tune minus the control's, with a paired bootstrap 95% interval over "
                    "prompts and McNemar's exact p-value; significant when p < 0.05.",
                    shown[["suite", "a", "b", "difference", "p_value", "significant", "n"]],
                ],
            )
        )
    agreed = _read(run, "judge_agreement.csv")
    if agreed is not None:
        sections.append(
            (
                "Judges",
                [
                    "Both judges on PyRIT's 105 human-labelled responses (held out from all fitting and "
                    "choosing; the run's judge is the one that measures best here):",
                    _judge_table(),
                    "Agreement of the judges on this run's responses (raw rate, Cohen's kappa):",
                    agreed,
                ],
            )
        )
    evaluation = _read(run, "evaluation.csv")
    if evaluation is not None:
        sections.append(
            (
                "Capability and KL",
                [
                    f"Exact match on {cfg.capability} short-answer questions (Wilson 95% interval); "
                    "KL of the next-token distribution against the original on harmless test prompts.",
                    evaluation,
                ],
            )
        )
    return sections


def _judge_table() -> Block:
    try:
        return judge_table()
    except FileNotFoundError as e:  # the labelled responses ship in data wheels
        return f"(not available: {e})"


def _rate_table(rates: pd.DataFrame) -> pd.DataFrame:
    """One suite's rates as ``rate [lo, hi]`` per model, plus the random controls' mean and range."""
    table = pd.DataFrame(
        {
            "model": rates["model"],
            "rate [95% CI]": [
                f"{r:.2f} [{lo:.2f}, {hi:.2f}]"
                for r, lo, hi in zip(rates["rate"], rates["lo"], rates["hi"], strict=True)
            ],
            "k / n": [f"{k} / {n}" for k, n in zip(rates["k"], rates["n"], strict=True)],
        }
    )
    controls = rates[rates["model"].str.startswith(RANDOM)]
    if len(controls) > 1:
        spread = (
            f"{controls['rate'].mean():.2f} (range {controls['rate'].min():.2f}-{controls['rate'].max():.2f})"
        )
        table.loc[len(table)] = [f"random, mean of {len(controls)} seeds", spread, ""]
    return table


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value JSON can write."""
    return value.item() if hasattr(value, "item") else value


def _read(run: Run, name: str, folder: str = "results") -> pd.DataFrame | None:
    path = run.path(folder, name)
    return pd.read_csv(path) if path.exists() else None


def run_all(run: Run) -> Path:
    """Every stage in order (wall-clock seconds of each in ``results/timings.csv``); returns the
    report's path."""
    rows = []
    for stage in (detect, tune_models, evaluate_models, deactivate, detector):
        start = time.perf_counter()
        stage(run)
        rows.append({"stage": stage.__name__, "seconds": round(time.perf_counter() - start, 1)})
        logger.info("stage %s: %.0f s", stage.__name__, rows[-1]["seconds"])
    _write_csv(run.path("results", "timings.csv"), pd.DataFrame(rows))
    return report(run)
