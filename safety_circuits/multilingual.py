"""Safety neurons per language and how much they overlap (SN-Tune, Sec. 2.3.2 and Fig. 5).

The same rule finds safety neurons in each language's harmful prompts (:func:`language_neurons`).
:func:`language_overlap` compares every pair of languages by intersection over union
(``|A ∩ B| / |A ∪ B|``), by the overlap coefficient (``|A ∩ B| / min(|A|, |B|)``) and by the
paper's share ``|A ∩ B| / |B|``, over all neurons, per kind and per band of layers;
:func:`shared_neurons` keeps the neurons that every language has. :func:`language_suites` are
the translated held-out suites (:func:`safety_circuits.data.translated`) a tuned model is
evaluated on in every language, and :func:`rates_by_language` their rates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from safety_circuits._io import TableResult
from safety_circuits.architecture import Architecture
from safety_circuits.data import LANGUAGES, Suite, sample, translated, translated_suite
from safety_circuits.detect import DEFAULT_QUANTILE, RULE_INPUTS, rule_neurons
from safety_circuits.importance import neuron_importance
from safety_circuits.neurons import KINDS, ArchitectureMismatchError, NeuronSet, check_neurons

if TYPE_CHECKING:
    from safety_circuits.evaluate import SuiteEval
    from safety_circuits.loading import Subject

OverlapMetric = Literal["iou", "overlap_coefficient", "share_of_b"]
OVERLAP_METRICS: tuple[str, ...] = ("iou", "overlap_coefficient", "share_of_b")
ALL = "all"  # the ``kind`` and ``band`` of the rows over every kind / every layer


def language_neurons(
    subject: Subject,
    harmful: Mapping[str, Sequence[str]],
    *,
    rule: str = "safety",
    harmless: Mapping[str, Sequence[str]] | None = None,
    quantile: float = DEFAULT_QUANTILE,
    seed: int = 0,
    **importance_kwargs: Any,
) -> dict[str, NeuronSet]:
    """Safety neurons of each language (``harmful``: language -> its harmful prompts), found by one
    ``rule`` of :func:`~safety_circuits.detect.rule_neurons` the same way in every language: for
    ``"robust"`` the foundation neurons of the language's ``harmless`` prompts as plain text, for
    ``"contrastive"`` / ``"scored"`` as many of them (drawn by ``seed``) rendered as chat turns
    like the harmful ones. ``harmless`` (language -> prompts, the same languages) is needed by
    every rule but ``"safety"``; ``importance_kwargs`` go to every
    :func:`~safety_circuits.importance.neuron_importance`."""
    _check_languages(harmful, "prompts")
    if rule not in RULE_INPUTS:
        raise ValueError(f"rule must be one of {list(RULE_INPUTS)}, got {rule!r}")
    if RULE_INPUTS[rule] and (harmless is None or set(harmless) != set(harmful)):
        raise ValueError(f"the {rule!r} rule needs harmless prompts in every language of the harmful ones")
    sets = {}
    for lang, prompts in harmful.items():
        inputs = {}
        if "general" in RULE_INPUTS[rule]:
            inputs["general"] = neuron_importance(subject, harmless[lang], chat=False, **importance_kwargs)
        if "matched" in RULE_INPUTS[rule]:
            matched = sample(harmless[lang], len(prompts), seed=seed)
            inputs["matched"] = neuron_importance(subject, matched, **importance_kwargs)
        importance = neuron_importance(subject, prompts, **importance_kwargs)
        found = rule_neurons(rule, importance, quantile=quantile, **inputs)
        sets[lang] = found.with_metadata(f"{rule} ({lang})", language=lang, rule=rule, source=subject.name)
    return sets


def translated_neurons(
    subject: Subject, languages: Sequence[str], *, rule: str = "safety", **options: Any
) -> dict[str, NeuronSet]:
    """:func:`language_neurons` on the project's translations (:func:`~safety_circuits.data.translated`):
    HarmBench val in each of ``languages``, against its harmless train prompts."""
    harmful = {lang: translated(lang, "harmbench", "val") for lang in languages}
    harmless = {lang: translated(lang, "harmless", "train") for lang in languages}
    return language_neurons(subject, harmful, rule=rule, harmless=harmless, **options)


def layer_bands(n_layers: int, bands: int) -> dict[str, range]:
    """``bands`` contiguous bands of layers, as equal as they come (``"0-9"``: layers 0 to 9)."""
    if not 1 <= bands <= n_layers:
        raise ValueError(f"bands must be in [1, {n_layers}], got {bands}")
    edges = np.linspace(0, n_layers, bands + 1).round().astype(int)
    return {f"{a}-{b - 1}": range(a, b) for a, b in pairwise(edges.tolist())}


@dataclass
class LanguageOverlap(TableResult):
    """One row per ordered pair of languages, ``kind`` (a kind or ``"all"``) and ``band`` of layers
    (or ``"all"``): the sizes of both sets there, their intersection and union, ``iou``,
    ``overlap_coefficient`` and ``share_of_b`` (``|A ∩ B| / |B|``, the paper's asymmetric
    ``overlap(a, b)`` of Fig. 5); NaN where a denominator is 0."""

    frame: pd.DataFrame
    languages: list[str]
    arch: Architecture | None = None

    def matrix(self, metric: OverlapMetric = "iou", *, kind: str = ALL, band: str = ALL) -> pd.DataFrame:
        """The ``languages x languages`` matrix of ``metric`` for one kind and band."""
        if metric not in OVERLAP_METRICS:
            raise ValueError(f"metric must be one of {OVERLAP_METRICS}, got {metric!r}")
        rows = self.frame[(self.frame["kind"] == kind) & (self.frame["band"] == band)]
        if rows.empty:
            kinds, bands = sorted(set(self.frame["kind"])), list(dict.fromkeys(self.frame["band"]))
            raise ValueError(f"no rows for kind={kind!r}, band={band!r}; kinds {kinds}, bands {bands}")
        grid = rows.pivot(index="a", columns="b", values=metric)
        return grid.loc[self.languages, self.languages]

    def plot(self, metric: OverlapMetric = "iou", *, kind: str = ALL, band: str = ALL) -> go.Figure:
        """Heatmap of :meth:`matrix` (SN-Tune Fig. 5)."""
        grid = self.matrix(metric, kind=kind, band=band)
        fig = px.imshow(grid, zmin=0, zmax=1, text_auto=".2f", color_continuous_scale="Blues")
        title = f"safety neurons across languages: {metric} (kind {kind}, layers {band})"
        return fig.update_layout(title=title, xaxis_title="language", yaxis_title="language")


def language_overlap(sets: Mapping[str, NeuronSet], *, bands: int = 3) -> LanguageOverlap:
    """Overlap of every pair of ``sets`` (language -> NeuronSet of one model), overall, per kind and
    per band of :func:`layer_bands` (``bands`` of them, at most one per layer)."""
    arch = _check_sets(sets)
    languages = list(sets)
    masks = {lang: ns.masks() for lang, ns in sets.items()}  # kind -> [layer, neuron]
    spans = {ALL: range(arch.n_layers), **layer_bands(arch.n_layers, min(bands, arch.n_layers))}
    rows = []
    for a in languages:
        for b in languages:
            # per kind and layer: |A|, |B|, |A ∩ B|, |A ∪ B|
            counts = {
                kind: np.stack(
                    [
                        masks[a][kind].sum(1).numpy(),
                        masks[b][kind].sum(1).numpy(),
                        (masks[a][kind] & masks[b][kind]).sum(1).numpy(),
                        (masks[a][kind] | masks[b][kind]).sum(1).numpy(),
                    ]
                )
                for kind in KINDS
            }
            for kind in (ALL, *KINDS):
                per_layer = sum(counts.values()) if kind == ALL else counts[kind]
                for band, layers in spans.items():
                    size_a, size_b, inter, union = (int(x) for x in per_layer[:, list(layers)].sum(1))
                    rows.append(
                        {
                            "a": a,
                            "b": b,
                            "kind": kind,
                            "band": band,
                            "size_a": size_a,
                            "size_b": size_b,
                            "intersection": inter,
                            "union": union,
                            "iou": inter / union if union else float("nan"),
                            "overlap_coefficient": inter / min(size_a, size_b)
                            if min(size_a, size_b)
                            else float("nan"),
                            "share_of_b": inter / size_b if size_b else float("nan"),
                        }
                    )
    return LanguageOverlap(pd.DataFrame(rows), languages, arch)


def shared_neurons(sets: Mapping[str, NeuronSet]) -> NeuronSet:
    """The neurons every language's set has (their intersection)."""
    _check_sets(sets)
    shared = None
    for ns in sets.values():
        shared = ns if shared is None else shared & ns
    return shared.with_metadata("shared by all languages", languages=list(sets))


def language_suites(languages: Sequence[str]) -> list[Suite]:
    """The translated held-out suites of each language: HarmBench test behaviours (ASR) and the
    harmless eval half (over-refusal), ``harmbench_<lang>`` and ``harmless_<lang>``
    (:func:`~safety_circuits.data.translated_suite`); give them to
    :func:`~safety_circuits.evaluate.evaluate_suites`."""
    if isinstance(languages, str) or not languages:
        raise ValueError("languages must be a non-empty list of language codes")
    return [translated_suite(lang, dataset) for lang in languages for dataset in ("harmbench", "harmless")]


def rates_by_language(result: SuiteEval) -> pd.DataFrame:
    """The rates of :func:`language_suites` in ``result``, one row per model, language and metric
    (``asr``, ``over_refusal``): rate, its Wilson 95% interval, k and n."""
    rates = result.rates()
    parts = rates["suite"].str.rsplit("_", n=1, expand=True)
    if parts.shape[1] != 2 or not parts[1].isin(list(LANGUAGES)).all():
        raise ValueError(f"not the suites of language_suites: {sorted(set(rates['suite']))}")
    rates = rates.assign(language=parts[1]).drop(columns="suite")
    return rates[["model", "language", "metric", "rate", "lo", "hi", "k", "n"]]


def _check_languages(mapping: Mapping[str, Any], what: str) -> None:
    if not isinstance(mapping, Mapping) or not mapping:
        raise ValueError(f"{what} must be a non-empty mapping from language to its {what}")


def _check_sets(sets: Mapping[str, NeuronSet]) -> Architecture:
    _check_languages(sets, "neuron sets")
    for lang, ns in sets.items():
        check_neurons(ns, what=f"the neuron set of {lang!r}")
    first, *_ = sets
    for lang, ns in sets.items():
        if ns.arch != sets[first].arch:
            raise ArchitectureMismatchError(
                f"the neuron sets are of different models: {lang!r}'s is not of {first!r}'s model"
            )
    return sets[first].arch
