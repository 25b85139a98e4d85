"""Refusal-circuit map (article: "Identifying Circuit Components"), in three steps:

1. **Where** is safety linearly readable? Per-layer probes on the residual stream
   (:func:`~safety_circuits.probing.probe_layers`); layers reaching ``probe_threshold`` accuracy.
2. **Which neurons** in those layers? Activation difference (harmful − harmless mean activation at
   the probed position; the article's finder) keeps the ``top_k`` neurons per layer and kind, or a
   given NeuronSet (e.g. SN-Tune's safety neurons) is restricted to those layers.
3. **Which components matter causally?** Activation patching
   (:func:`~safety_circuits.tracing.trace_components`) of every attention and MLP output, every
   head and every neuron group; components and neuron groups whose normalised effect reaches
   ``effect_threshold`` are kept. :attr:`RefusalCircuit.neurons` holds the kept neurons.

Layers are also labelled with the article's stages by relative depth: detection (< 0.3),
evaluation (< 0.6), decision (< 0.8), production.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from safety_circuits._io import JSONResult, Record
from safety_circuits.activations import activations_at, check_prompts
from safety_circuits.architecture import Architecture
from safety_circuits.neurons import Kind, NeuronSet, check_neurons, hook_name
from safety_circuits.probing import ProbeResult, probe_layers
from safety_circuits.tracing import Metric, TracingResult, trace_components
from safety_circuits.vocabulary import PatchAt, TraceMode

if TYPE_CHECKING:
    from safety_circuits.loading import Subject

logger = logging.getLogger(__name__)

#: The article's stages of a refusal circuit, by relative depth (upper bounds).
STAGES: tuple[tuple[str, float], ...] = (
    ("detection", 0.3),
    ("evaluation", 0.6),
    ("decision", 0.8),
    ("production", 1.0),
)


def stage_of(layer: int, n_layers: int) -> str:
    """The article's stage of a layer by relative depth.

    >>> [stage_of(layer, 10) for layer in (0, 3, 6, 8)]
    ['detection', 'evaluation', 'decision', 'production']
    """
    depth = layer / n_layers
    return next(name for name, bound in STAGES if depth < bound or bound == 1.0)


def activation_difference(
    subject: Subject,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    kinds: Sequence[Kind] = ("ffn",),
    top_k: int | None = 20,
    offset: int = -1,
    batch_size: int = 8,
    chat: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Mean activation of each neuron on harmful and harmless prompts at ``offset`` (from the end) and their
    difference; the ``top_k`` largest ``|diff|`` per layer and kind (all with ``top_k=None``).

    Columns: ``layer``, ``kind``, ``index``, ``harmful``, ``harmless``, ``diff``, ``abs_diff``.
    """
    harmful, harmless = check_prompts(harmful, what="harmful"), check_prompts(harmless, what="harmless")
    layers = list(range(subject.arch.n_layers)) if layers is None else list(layers)
    sites = [(layer, kind) for layer in layers for kind in kinds]
    names = [hook_name(layer, kind) for layer, kind in sites]
    kwargs = {"offsets": [offset], "batch_size": batch_size, "chat": chat}
    desc = "activation difference ({})" if progress else None
    a = activations_at(subject, harmful, names, desc=desc and desc.format("harmful"), **kwargs)
    b = activations_at(subject, harmless, names, desc=desc and desc.format("harmless"), **kwargs)
    frames = []
    for (layer, kind), name in zip(sites, names, strict=True):
        mean_a, mean_b = a[name][:, 0].flatten(1).mean(0), b[name][:, 0].flatten(1).mean(0)
        diff = (mean_a - mean_b).numpy()
        keep = np.argsort(-np.abs(diff), kind="stable")[: top_k or None]
        frames.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "kind": kind,
                    "index": keep,
                    "harmful": mean_a.numpy()[keep],
                    "harmless": mean_b.numpy()[keep],
                    "diff": diff[keep],
                    "abs_diff": np.abs(diff[keep]),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _neurons_of(arch: Architecture, frame: pd.DataFrame, name: str) -> NeuronSet:
    indices = {(int(l), k): g["index"].to_numpy() for (l, k), g in frame.groupby(["layer", "kind"])}
    return NeuronSet(arch, indices, name=name)


@dataclass
class RefusalCircuit(JSONResult):
    """Probes, candidate neurons, patching effects, and the kept components and neurons.

    ``candidates``: activation differences of the candidate neurons (see
    :func:`activation_difference`); ``neurons``: the candidates in neuron groups whose patching
    effect reaches the threshold; ``readable_layers``: layers where the probe passes.
    ``save`` / ``load`` as JSON.
    """

    probes: ProbeResult
    tracing: TracingResult
    candidates: pd.DataFrame
    neurons: NeuronSet
    readable_layers: list[int]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def arch(self) -> Architecture:
        """The model's architecture (the neurons')."""
        return self.neurons.arch

    @property
    def n_layers(self) -> int:
        return self.neurons.arch.n_layers

    def components(self) -> pd.DataFrame:
        """Kept attention/MLP outputs and heads (``|normalized| >= effect_threshold``)."""
        frame = self.tracing.frame
        rows = frame[frame["component"].isin(["resid", "attn", "mlp", "head"])]
        return rows[rows["normalized"].abs() >= self.config["effect_threshold"]].reset_index(drop=True)

    def to_frame(self) -> pd.DataFrame:
        """One row per traced element: layer, stage, element, kind of element, patching effect,
        neuron count, probe accuracy at that layer, whether the layer is readable and the
        element kept."""
        frame = self.tracing.to_frame()
        accuracy = self.probes.per_layer.set_index("layer")["accuracy"]
        element = np.where(
            frame["head"].notna(),
            "head " + frame["head"].astype(str),
            np.where(frame["n_neurons"].notna(), frame["component"] + " neurons", frame["component"]),
        )
        out = pd.DataFrame(
            {
                "layer": frame["layer"],
                "stage": [stage_of(int(l), self.n_layers) for l in frame["layer"]],
                "element": element,
                "component": frame["component"],
                "head": frame["head"],
                "n_neurons": frame["n_neurons"],
                "effect": frame["effect"],
                "normalized": frame["normalized"],
                "probe_accuracy": frame["layer"].map(accuracy).astype(float),
                "readable": frame["layer"].isin(self.readable_layers),
                "kept": frame["normalized"].abs() >= self.config["effect_threshold"],
            }
        )
        return out.sort_values("layer", kind="stable").reset_index(drop=True)

    def summary(self) -> pd.DataFrame:
        """Per stage: layers, readable layers, kept components, heads and neurons, strongest element."""
        frame = self.to_frame()
        rows = []
        for stage, _ in STAGES:
            part = frame[frame["stage"] == stage]
            kept = part[part["kept"]]
            layers = sorted(
                {int(l) for l in part["layer"]}
                | {l for l in self.readable_layers if stage_of(l, self.n_layers) == stage}
            )
            strongest = kept.loc[kept["normalized"].abs().idxmax()] if len(kept) else None
            rows.append(
                {
                    "stage": stage,
                    "layers": f"{min(layers)}-{max(layers)}" if layers else "",
                    "readable_layers": sum(stage_of(l, self.n_layers) == stage for l in self.readable_layers),
                    "components": int(kept["component"].isin(["attn", "mlp", "resid"]).sum()),
                    "heads": int((kept["component"] == "head").sum()),
                    "neurons": int(
                        sum(
                            len(v)
                            for (l, _), v in self.neurons.indices.items()
                            if stage_of(l, self.n_layers) == stage
                        )
                    ),
                    "strongest": ""
                    if strongest is None
                    else f"L{int(strongest['layer'])} {strongest['element']}",
                    "strongest_effect": float("nan") if strongest is None else float(strongest["normalized"]),
                }
            )
        return pd.DataFrame(rows)

    def plot(self, title: str | None = None) -> go.Figure:
        """Layers on x. Top: probe accuracy, readable layers marked. Bottom: every traced element
        (attention, MLP, heads, neuron groups), coloured by normalised effect, sized by |effect|,
        kept ones outlined."""
        frame = self.to_frame()
        probes = self.probes.per_layer
        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.3, 0.7], vertical_spacing=0.05)
        fig.add_trace(
            go.Scatter(x=probes["layer"], y=probes["accuracy"], mode="lines+markers", name="probe accuracy"),
            row=1,
            col=1,
        )
        readable = probes[probes["layer"].isin(self.readable_layers)]
        fig.add_trace(
            go.Scatter(
                x=readable["layer"],
                y=readable["accuracy"],
                mode="markers",
                marker={"size": 11, "symbol": "star"},
                name="readable",
            ),
            row=1,
            col=1,
        )
        values = frame["normalized"].fillna(0.0).to_numpy(dtype=float)
        limit = float(np.abs(values).max()) or 1.0
        hover = [
            f"L{l} {e}<br>effect {v:.3g} (normalised {n:.3g})"
            + (f"<br>{int(k)} neurons" if pd.notna(k) else "")
            for l, e, v, n, k in zip(
                frame["layer"], frame["element"], frame["effect"], values, frame["n_neurons"], strict=True
            )
        ]
        fig.add_trace(
            go.Scatter(
                x=frame["layer"],
                y=frame["element"],
                mode="markers",
                marker={
                    "size": 6 + 24 * np.abs(values) / limit,
                    "color": values,
                    "colorscale": "RdBu_r",
                    "cmin": -limit,
                    "cmax": limit,
                    "colorbar": {"title": "normalised effect", "y": 0.35, "len": 0.7},
                    "line": {"width": np.where(frame["kept"], 2, 0), "color": "black"},
                },
                text=hover,
                hoverinfo="text",
                name="traced elements",
            ),
            row=2,
            col=1,
        )
        for _, bound in STAGES[:-1]:
            fig.add_vline(x=bound * self.n_layers - 0.5, line_dash="dot", line_color="grey")
        fig.update_yaxes(title_text="accuracy", range=[0, 1.05], row=1, col=1)
        fig.update_yaxes(title_text="element", row=2, col=1)
        fig.update_xaxes(title_text="layer", row=2, col=1)
        n = len(self.neurons)
        return fig.update_layout(
            title=title or f"refusal circuit: readable layers {self.readable_layers}, {n} neurons kept",
            height=600 + 8 * frame["element"].nunique(),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "probes": self.probes.to_dict(),
            "tracing": self.tracing.to_dict(),
            "candidates": self.candidates.to_dict("records"),
            "neurons": self.neurons.to_dict(),
            "readable_layers": list(self.readable_layers),
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RefusalCircuit:
        return cls(
            ProbeResult.from_dict(d["probes"]),
            TracingResult.from_dict(d["tracing"]),
            pd.DataFrame(d["candidates"]),
            NeuronSet.from_dict(d["neurons"]),
            list(d["readable_layers"]),
            dict(d["config"]),
        )

    def __repr__(self) -> str:
        return (
            f"RefusalCircuit(readable layers {self.readable_layers}, {len(self.components())} components, "
            f"{len(self.neurons)} neurons)"
        )


@dataclass
class CircuitConfig(Record):
    """Options of :func:`map_refusal_circuit`: probes (``offset`` from the end, ``cv`` folds,
    ``probe_threshold`` for a readable layer), candidates (``top_k`` per layer and kind among
    ``kinds``), tracing (the first ``n_pairs`` harmful/harmless pairs, every head with ``heads``,
    ``mode`` and ``patch_at`` as in :class:`~safety_circuits.tracing.TraceConfig`) and the circuit
    (candidate groups whose normalized effect reaches ``effect_threshold``)."""

    probe_threshold: float = 0.8
    kinds: Sequence[Kind] = ("ffn",)
    top_k: int = 20
    n_pairs: int = 8
    heads: bool = True
    effect_threshold: float = 0.1
    mode: TraceMode = "noising"
    patch_at: PatchAt = "suffix"
    offset: int = -1
    cv: int = 5
    seed: int = 0
    batch_size: int = 8
    chat: bool = True

    def __post_init__(self) -> None:
        if self.n_pairs < 1:
            raise ValueError(f"n_pairs must be >= 1, got {self.n_pairs}")


def map_refusal_circuit(
    subject: Subject,
    harmful: Sequence[str],
    harmless: Sequence[str],
    neurons: NeuronSet | None = None,
    *,
    config: CircuitConfig | None = None,
    metric: Metric | None = None,
    progress: bool = True,
    **options: Any,
) -> RefusalCircuit:
    """Probe, find candidate neurons in the readable layers, trace; see the module doc.

    ``neurons``: use these (restricted to the readable layers) instead of the activation-difference
    candidates. ``options`` set fields of ``config`` (:class:`CircuitConfig`), e.g. ``n_pairs=4``.
    """
    cfg = CircuitConfig.resolve(config, **options)
    harmful, harmless = check_prompts(harmful, what="harmful"), check_prompts(harmless, what="harmless")
    if neurons is not None:
        check_neurons(neurons, subject)
    common = {"offset": cfg.offset, "batch_size": cfg.batch_size, "chat": cfg.chat, "progress": progress}
    probes = probe_layers(subject, harmful, harmless, cv=cfg.cv, seed=cfg.seed, **common)
    readable = probes.readable_layers(cfg.probe_threshold)
    if not readable:
        readable = [probes.best_layer]
        logger.warning(
            "no layer reaches probe accuracy %.2f; using the best one (layer %d)",
            cfg.probe_threshold,
            readable[0],
        )
    if neurons is None:
        candidates = activation_difference(
            subject, harmful, harmless, layers=readable, kinds=cfg.kinds, top_k=cfg.top_k, **common
        )
    else:
        frame = activation_difference(
            subject, harmful, harmless, layers=readable, kinds=neurons.kinds(), top_k=None, **common
        )
        inside = [
            (int(l), k, int(i)) in neurons
            for l, k, i in zip(frame["layer"], frame["kind"], frame["index"], strict=True)
        ]
        candidates = frame[inside].reset_index(drop=True)
    candidate_set = _neurons_of(subject.arch, candidates, "candidates")
    n = min(cfg.n_pairs, len(harmful), len(harmless))
    tracing = trace_components(
        subject,
        harmful[:n],
        harmless[:n],
        neurons=candidate_set if len(candidate_set) else None,
        metric=metric,
        progress=progress,
        heads=cfg.heads,
        mode=cfg.mode,
        patch_at=cfg.patch_at,
        batch_size=cfg.batch_size,
        chat=cfg.chat,
    )
    groups = tracing.frame[tracing.frame["n_neurons"].notna()]
    kept_groups = groups[groups["normalized"].abs() >= cfg.effect_threshold]
    kept = {(int(l), k) for l, k in zip(kept_groups["layer"], kept_groups["component"], strict=True)}
    circuit_neurons = NeuronSet(
        subject.arch,
        {site: idx for site, idx in candidate_set.indices.items() if site in kept},
        name="refusal circuit",
        metadata={"effect_threshold": cfg.effect_threshold, "readable_layers": readable},
    )
    record = {
        "probe_threshold": cfg.probe_threshold,
        "effect_threshold": cfg.effect_threshold,
        "kinds": list(neurons.kinds() if neurons is not None else cfg.kinds),
        "top_k": None if neurons is not None else cfg.top_k,
        "n_pairs": n,
        "mode": cfg.mode,
        "patch_at": cfg.patch_at,
        "offset": cfg.offset,
        "model": subject.name,
    }
    return RefusalCircuit(probes, tracing, candidates, circuit_neurons, readable, record)
