"""The main job in a run folder: detect safety neurons -> SN-Tune -> evaluate -> deactivate -> report.

Each stage reads what the previous ones wrote under ``runs/<name>/``, so the CLI can run them one
at a time (``safety-circuits detect|tune|evaluate|ablate|report``) or all in order (``run``)::

    runs/<name>/config.json                     the RunConfig
    runs/<name>/documents.json                  the tuning documents (refusals and retain)
    runs/<name>/neurons/*.safetensors, *.csv    importance, safety / foundation / robust NeuronSets
    runs/<name>/models/sn_tune/                 the SN-Tuned model (plain HF folder + mask + record)
    runs/<name>/models/{random,full}/           controls: random neurons of equal counts, full FT
    runs/<name>/results/*.csv                   evaluation, deactivation, responses
    runs/<name>/report.html                     tables and plotly figures, self-contained

Prompt splits never cross: neurons are found on HarmBench *val*; refusal documents use HarmBench
val and the AdvBench *train* split; retain documents the harmless *train* split; everything is
evaluated on HarmBench *test*, the harmless *eval* split and the capability questions.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.express as px

from safety_circuits import ablation, data, plots
from safety_circuits._io import atomic_file
from safety_circuits.activations import Positions
from safety_circuits.detect import robust_safety_neurons, select_neurons
from safety_circuits.evaluate import attack_success_rate
from safety_circuits.importance import neuron_importance
from safety_circuits.loading import SMOLLM2, Backend, Subject, check_source, load_model
from safety_circuits.neurons import NeuronSet
from safety_circuits.report import Block, write_report
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

logger = logging.getLogger(__name__)
TUNED = "sn_tune"
CONTROLS = ("random", "full")
EVAL_BATCH = (
    192  # prompts decoded together (HF, KV cache): a decode step costs 4.3 ms a row at 64, 3.1 at 180
)


@dataclass
class RunConfig:
    """Everything a run depends on (saved as ``config.json``)."""

    model: str = SMOLLM2
    backend: Backend = "hooked"
    seed: int = 0
    # detection (HarmBench val)
    positions: Positions = "all"
    quantile: float = 0.98
    # documents
    train_harmful: int = 60  # AdvBench train prompts, on top of every HarmBench val prompt
    retain_tokens: int = 32
    retain_generated: int = 0  # templated everyday requests, on top of the harmless train split
    # tuning
    lr: float = 5e-4
    epochs: int = 1
    batch_size: int = 4
    mechanism: Mechanism = "delta"
    retain_kl: float = 3.0
    controls: bool = True
    full_lr: float = 5e-5  # the full fine-tuning control's rate (5e-4 on every weight breaks the model)
    # evaluation
    eval_harmful: int = 50
    eval_harmless: int = 50
    capability: int = 180  # all of them: 90 questions move the rate 1.1 points each
    max_new_tokens: int = 16
    random_seeds: int = 1

    def __post_init__(self) -> None:
        choices = {"backend": ("hooked", "bridge"), "positions": ("all", "user"), "mechanism": MECHANISMS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0 < self.quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {self.quantile}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown run config keys {sorted(unknown)}")
        return cls(**d)

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
        return [n for n in (TUNED, *CONTROLS) if self.path("models", n).exists()]

    # -- prompt sets (fixed by the config's seed) ---------------------------------------------
    def harmful_eval(self) -> list[str]:
        return data.sample(data.harmbench("test"), self.config.eval_harmful, seed=self.config.seed)

    def harmless_eval(self) -> list[str]:
        return data.sample(data.harmless("eval"), self.config.eval_harmless, seed=self.config.seed)

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
    """Safety neurons on HarmBench val, foundation neurons on the harmless train split (plain
    text), robust = safety − foundation; saved with the importance scores and readable tables."""
    cfg, subject = run.config, run.base
    start = time.perf_counter()
    importance = neuron_importance(subject, data.harmbench("val"), batch_size=8, positions=cfg.positions)
    seconds = time.perf_counter() - start
    importance.save(run.path("neurons", "importance.safetensors"))
    safety = select_neurons(importance, quantile=cfg.quantile).with_metadata(
        name="safety", source=subject.name, seconds=round(seconds, 1)
    )
    general = neuron_importance(subject, data.harmless("train"), batch_size=8, chat=False)
    foundation = select_neurons(general, quantile=cfg.quantile).with_metadata(name="foundation")
    sets = {"safety": safety, "foundation": foundation, "robust": robust_safety_neurons(safety, foundation)}
    for name, neurons in sets.items():
        neurons.save(run.path("neurons", f"{name}.safetensors"))
        _write_csv(run.path("neurons", f"{name}.csv"), neurons.to_frame())
    logger.info("safety neurons: %d (%.2f%%) in %.0f s", len(safety), 100 * safety.fraction_of(), seconds)
    return sets


def documents(run: Run) -> list[Document]:
    """Refusals for HarmBench val + sampled AdvBench train prompts, and retain documents: the
    harmless train prompts and templated everyday requests, answered by the original model. Kept
    in ``documents.json`` and re-made when the settings they depend on change."""
    cfg = run.config
    made_with = {
        k: getattr(cfg, k) for k in ("model", "seed", "train_harmful", "retain_tokens", "retain_generated")
    }
    path = run.path("documents.json")
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["made_with"] == made_with:
            return [Document(**d) for d in saved["documents"]]
    harmful = data.harmbench("val") + data.sample(data.advbench("train"), cfg.train_harmful, seed=cfg.seed)
    harmless = data.harmless("train") + data.harmless_generated(cfg.retain_generated, seed=cfg.seed)
    retain = retain_documents(run.base, harmless, max_new_tokens=cfg.retain_tokens, batch_size=EVAL_BATCH)
    docs = refusal_documents(harmful, seed=cfg.seed) + retain
    saved = {"made_with": made_with, "documents": [asdict(d) for d in docs]}
    _write_text(path, json.dumps(saved, indent=1))
    return docs


def tune_models(run: Run) -> pd.DataFrame:
    """SN-Tune on the safety neurons and, with ``controls``, on random neurons of the same counts
    per layer and kind, and full fine-tuning on the same documents. Saves each model."""
    cfg = run.config
    safety = run.neurons("safety")
    docs = documents(run)
    plans: list[tuple[str, NeuronSet | None, Mechanism]] = [(TUNED, safety, cfg.mechanism)]
    if cfg.controls:
        plans += [("random", safety.random_like(seed=cfg.seed), cfg.mechanism), ("full", None, "full")]
    tune_config = cfg.tune_config()
    reference = reference_states(run.base, docs, tune_config.max_length) if cfg.retain_kl else None
    rows = []
    for name, neurons, mechanism in plans:
        lr = cfg.full_lr if mechanism == "full" else cfg.lr
        result = tune(
            run.base, docs, neurons, config=tune_config, mechanism=mechanism, lr=lr, reference=reference
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
    """ASR (HarmBench test), over-refusal (harmless eval), exact-match capability and KL against
    the original, for the original and every tuned model in the run."""
    cfg = run.config
    harmful, harmless, questions = run.harmful_eval(), run.harmless_eval(), run.capability()
    reference = ablation.next_token_logprobs(run.base, harmless, batch_size=EVAL_BATCH, use="hf")
    rows, responses = [], []
    for name in ("original", *run.tuned_models()):
        subject = run.model(name)
        answers = attack_success_rate(
            subject,
            harmful,
            max_new_tokens=cfg.max_new_tokens,
            use="hf",
            batch_size=EVAL_BATCH,
            progress=False,
        )
        own = None if name == "original" else reference  # the original's KL to itself is 0
        row = ablation.measure(
            subject, None, harmless, questions, own, cfg.max_new_tokens, use="hf", batch_size=EVAL_BATCH
        )
        rows.append(
            {
                "model": name,
                "asr": answers.rate,
                "over_refusal": row["over_refusal"],
                "kl": row.get("kl", 0.0),
                "capability": row["capability"],
            }
        )
        responses.append(answers.to_frame().head(10).assign(model=name))
        logger.info("%s: %s", name, rows[-1])
    frame = pd.DataFrame(rows)
    tuning_csv = run.path("results", "tuning.csv")
    if tuning_csv.exists():
        frame = frame.merge(pd.read_csv(tuning_csv), on="model", how="left")
    _write_csv(run.path("results", "evaluation.csv"), frame)
    _write_csv(run.path("results", "responses.csv"), pd.concat(responses, ignore_index=True))
    return frame


def deactivate(run: Run) -> pd.DataFrame:
    """Table 1 on the SN-Tuned model: Origin, Deact-R and Deact-SN (the tuned safety neurons):
    ASR, over-refusal and KL against the tuned model (the paper's table is ASR only)."""
    cfg = run.config
    evaluation = _read(run, "evaluation.csv")
    origin = None
    if evaluation is not None and TUNED in set(evaluation["model"]):  # measured by `evaluate`
        row = evaluation.set_index("model").loc[TUNED]
        origin = {k: float(row[k]) for k in ("asr", "over_refusal")}
    table = ablation.deactivation_experiment(
        run.model(TUNED),
        run.neurons("safety"),
        run.harmful_eval(),
        run.harmless_eval(),
        random_seeds=cfg.random_seeds,
        max_new_tokens=cfg.max_new_tokens,
        use="hf",
        batch_size=EVAL_BATCH,
        origin=origin,
    )
    _write_csv(run.path("results", "deactivation.csv"), table)
    return table


def report(run: Run) -> Path:
    """``report.html`` from whatever the stages have written so far."""
    cfg = run.config
    sections: list[tuple[str, list[Block]]] = [
        ("Run", [pd.DataFrame([cfg.to_dict()]).T.rename(columns={0: ""})])
    ]
    if run.path("neurons", "safety.safetensors").exists():
        sets = {name: run.neurons(name) for name in ("safety", "foundation", "robust")}
        safety = sets["safety"]
        counts = (
            safety.counts()
            .sum()
            .to_frame("neurons")
            .T.assign(total=len(safety), percent_of_all=round(100 * safety.fraction_of(), 3))
        )
        sections.append(
            (
                "Safety neurons",
                [
                    f"Found on the HarmBench val behaviours, positions={cfg.positions}, quantile "
                    f"{cfg.quantile} per prompt and kind, kept when important for every prompt.",
                    counts,
                    plots.neurons_per_layer(safety),
                    plots.attention_vs_ffn(sets),
                    plots.overlap_heatmap(sets),
                ],
            )
        )
    evaluation = _read(run, "evaluation.csv")
    if evaluation is not None:
        long = evaluation.melt(id_vars="model", value_vars=["asr", "over_refusal", "capability", "kl"])
        fig = px.bar(long, x="variable", y="value", color="model", barmode="group", title="before / after")
        sections.append(
            (
                "SN-Tune: before and after",
                [
                    f"{cfg.eval_harmful} HarmBench test behaviours (ASR), {cfg.eval_harmless} harmless eval "
                    f"prompts (over-refusal, KL vs the original), {cfg.capability} capability questions "
                    f"(exact match); greedy, {cfg.max_new_tokens} new tokens.",
                    evaluation,
                    fig,
                ],
            )
        )
    deactivation = _read(run, "deactivation.csv")
    if deactivation is not None:
        sections.append(("Deactivation on the SN-Tuned model (paper Table 1)", [deactivation]))
    timings = _read(run, "timings.csv")
    if timings is not None:
        total = timings["seconds"].sum()
        sections.append(("Time per stage (seconds)", [f"Total {total:.0f} s.", timings]))
    responses = _read(run, "responses.csv")
    if responses is not None:
        sections.append(("Responses to held-out harmful prompts (first 10)", [responses]))
    return write_report(run.path("report.html"), f"safety_circuits run: {cfg.model}", sections)


def _read(run: Run, name: str) -> pd.DataFrame | None:
    path = run.path("results", name)
    return pd.read_csv(path) if path.exists() else None


def run_all(run: Run) -> Path:
    """Every stage in order (wall-clock seconds of each in ``results/timings.csv``); returns the
    report's path."""
    rows = []
    for stage in (detect, tune_models, evaluate_models, deactivate):
        start = time.perf_counter()
        stage(run)
        rows.append({"stage": stage.__name__, "seconds": round(time.perf_counter() - start, 1)})
        logger.info("stage %s: %.0f s", stage.__name__, rows[-1]["seconds"])
    _write_csv(run.path("results", "timings.csv"), pd.DataFrame(rows))
    return report(run)
