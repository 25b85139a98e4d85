"""Plotly figures of neuron sets and experiments; every function returns a ``go.Figure``."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from safety_circuits.neurons import ATTN_KINDS, KINDS, NeuronSet, kind_size


def neurons_per_layer(neurons: NeuronSet, title: str | None = None) -> go.Figure:
    """Stacked bars: neurons per layer, coloured by kind."""
    counts = neurons.counts().reset_index().melt(id_vars="layer", var_name="kind", value_name="neurons")
    fig = px.bar(
        counts,
        x="layer",
        y="neurons",
        color="kind",
        category_orders={"kind": list(KINDS)},
        title=title or f"{neurons.name or 'neurons'} per layer ({len(neurons)} in all)",
    )
    return fig.update_layout(barmode="stack")


def attention_vs_ffn(sets: NeuronSet | Mapping[str, NeuronSet], normalise: bool = False) -> go.Figure:
    """Share of attention (q, k, v, o) vs FFN neurons (paper Fig. 3), one bar per set.

    ``normalise=True`` divides by the number of neurons of each structure in the model, so the
    bars compare densities rather than raw counts.
    """
    sets = {sets.name or "neurons": sets} if isinstance(sets, NeuronSet) else dict(sets)
    rows = []
    for name, ns in sets.items():
        total = ns.counts().sum()
        attn, ffn = float(total[list(ATTN_KINDS)].sum()), float(total["ffn"])
        if normalise:
            attn /= sum(kind_size(ns.arch, k) for k in ATTN_KINDS) * ns.arch.n_layers
            ffn /= kind_size(ns.arch, "ffn") * ns.arch.n_layers
        denom = attn + ffn or 1.0
        rows += [(name, "attention", attn / denom), (name, "ffn", ffn / denom)]
    frame = pd.DataFrame(rows, columns=["set", "structure", "share"])
    return px.bar(frame, x="set", y="share", color="structure", title="attention vs FFN", text_auto=".0%")


def overlap_heatmap(sets: Mapping[str, NeuronSet], title: str = "overlap |A∩B| / |B|") -> go.Figure:
    """Heatmap of ``overlap(A, B) = |A∩B| / |B|`` between named sets (paper Fig. 5)."""
    names = list(sets)
    grid = [[sets[a].overlap(sets[b]) for b in names] for a in names]
    fig = px.imshow(grid, x=names, y=names, zmin=0, zmax=1, text_auto=".2f", color_continuous_scale="Blues")
    return fig.update_layout(title=title, xaxis_title="B", yaxis_title="A")


def asr_curve(frame: pd.DataFrame, title: str = "ASR vs fraction of neurons deactivated") -> go.Figure:
    """Line of ASR against the fraction deactivated (from :func:`ablation.asr_vs_fraction`)."""
    fig = px.line(frame.sort_values("fraction"), x="fraction", y="asr", markers=True, title=title)
    return fig.update_layout(xaxis_tickformat=".2%", yaxis_range=[0, 1])


def layer_curve(
    frame: pd.DataFrame, title: str = "ASR when deactivating the first / last k layers"
) -> go.Figure:
    """ASR vs number of layers whose safety neurons are deactivated (from :func:`ablation.layer_sweep`)."""
    fig = px.line(frame, x="layers", y="asr", color="side", markers=True, title=title)
    return fig.update_layout(yaxis_range=[0, 1])


def table(frame: pd.DataFrame, title: str = "") -> go.Figure:
    """A plotly table (e.g. the corpus-size table of :func:`detect.corpus_size_stability`)."""
    cells = [frame[c].map(lambda v: f"{v:.4g}" if isinstance(v, float) else v) for c in frame.columns]
    fig = go.Figure(go.Table(header={"values": list(frame.columns)}, cells={"values": cells}))
    return fig.update_layout(title=title)
