"""Safety neurons per language and how much they overlap (SN-Tune, Sec. 2.3.2 and Fig. 5).

The same rule finds safety neurons in each language's harmful prompts (:func:`language_neurons`).
:func:`language_overlap` compares every pair of languages by intersection over union
(``|A ∩ B| / |A ∪ B|``) and by the overlap coefficient (``|A ∩ B| / min(|A|, |B|)``), over all
neurons, per kind and per band of layers; :func:`shared_neurons` keeps the neurons that every
language has.
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
from safety_circuits.detect import find_safety_neurons
from safety_circuits.neurons import KINDS, ArchitectureMismatchError, NeuronSet, check_neurons

if TYPE_CHECKING:
    from safety_circuits.loading import Subject

OverlapMetric = Literal["iou", "overlap_coefficient"]
ALL = "all"  # the ``kind`` and ``band`` of the rows over every kind / every layer


def language_neurons(
    subject: Subject, prompts: Mapping[str, Sequence[str]], **options: Any
) -> dict[str, NeuronSet]:
    """Safety neurons of each language: :func:`~safety_circuits.detect.find_safety_neurons` on its
    harmful prompts (``prompts``: language -> prompts), every language with the same ``options``."""
    _check_languages(prompts, "prompts")
    return {
        lang: find_safety_neurons(subject, texts, **options).with_metadata(f"safety ({lang})", language=lang)
        for lang, texts in prompts.items()
    }


def layer_bands(n_layers: int, bands: int) -> dict[str, range]:
    """``bands`` contiguous bands of layers, as equal as they come (``"0-9"``: layers 0 to 9)."""
    if not 1 <= bands <= n_layers:
        raise ValueError(f"bands must be in [1, {n_layers}], got {bands}")
    edges = np.linspace(0, n_layers, bands + 1).round().astype(int)
    return {f"{a}-{b - 1}": range(a, b) for a, b in pairwise(edges.tolist())}


@dataclass
class LanguageOverlap(TableResult):
    """One row per ordered pair of languages, ``kind`` (a kind or ``"all"``) and ``band`` of layers
    (or ``"all"``): the sizes of both sets there, their intersection and union, ``iou`` and
    ``overlap_coefficient`` (NaN where a set, or both, is empty)."""

    frame: pd.DataFrame
    languages: list[str]
    arch: Architecture | None = None

    def matrix(self, metric: OverlapMetric = "iou", *, kind: str = ALL, band: str = ALL) -> pd.DataFrame:
        """The ``languages x languages`` matrix of ``metric`` for one kind and band."""
        if metric not in ("iou", "overlap_coefficient"):
            raise ValueError(f"metric must be 'iou' or 'overlap_coefficient', got {metric!r}")
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
