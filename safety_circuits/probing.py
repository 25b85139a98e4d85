"""Linear probes: at which layers is "harmful vs harmless" linearly readable? (article: Probing Classifiers)

For every layer, the activation at one site (default: the residual stream after the block) and
one prompt position (default: the last token, i.e. the end of the chat template, the position
the first response token is predicted from) is collected for every harmful and harmless prompt
in one batched pass per site, and a logistic regression on standardised features is
cross-validated on it (stratified k-fold). ``accuracy`` is the mean held-out accuracy over folds;
``above_chance`` is a one-sided binomial test of the pooled held-out predictions against the
majority-class rate.

:func:`probe_neurons` runs the same probe on the activations of a :class:`NeuronSet` only (for
example the safety neurons), per layer and all together.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from safety_circuits._io import TableResult, arch_from_dict, arch_to_dict
from safety_circuits.activations import activations_at, check_prompts
from safety_circuits.neurons import NeuronSet, check_neurons
from safety_circuits.sites import act_name, neuron_sites

if TYPE_CHECKING:
    from safety_circuits.architecture import Architecture
    from safety_circuits.loading import Subject

logger = logging.getLogger(__name__)

#: Activation names :func:`probe_layers` reads: one vector per position (see
#: :func:`~safety_circuits.sites.act_name`).
SITES: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_post", "z")


def site_hook(site: str, layer: int) -> str:
    """TL hook name of a short site name at a layer, e.g. ``site_hook("resid_post", 3)``.

    >>> site_hook("resid_post", 3)
    'blocks.3.hook_resid_post'
    """
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; sites are {sorted(SITES)}")
    return act_name(site, layer)


# -- the probe ------------------------------------------------------------------------------
def cross_validate(
    features: Float[np.ndarray, "n feature"],
    labels: Sequence[int],
    *,
    cv: int = 5,
    seed: int = 0,
    C: float = 1.0,
    alpha: float = 0.05,
) -> dict[str, float]:
    """Stratified k-fold accuracy of ``StandardScaler -> LogisticRegression`` on ``features``.

    Returns the mean and std of the fold accuracies, the majority-class (chance) rate, the
    p-value of a one-sided binomial test of all held-out predictions against chance, and
    ``above_chance = p_value < alpha``.
    """
    from scipy.stats import binomtest
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    y = np.asarray(labels)
    counts = np.bincount(y, minlength=2)
    if cv < 2:
        raise ValueError(f"cv must be >= 2 folds, got {cv}")
    if counts.min() < cv:
        raise ValueError(
            f"{cv}-fold cross-validation needs at least {cv} prompts of each class, got {counts}"
        )
    folds = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
    accuracies, correct = [], 0
    for train, test in folds.split(x, y):
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe.fit(x[train], y[train])
        hits = probe.predict(x[test]) == y[test]
        accuracies.append(float(hits.mean()))
        correct += int(hits.sum())
    chance = float(counts.max() / counts.sum())
    p_value = float(binomtest(correct, len(y), chance, alternative="greater").pvalue)
    return {
        "accuracy": float(np.mean(accuracies)),
        "std": float(np.std(accuracies)),
        "chance": chance,
        "p_value": p_value,
        "above_chance": p_value < alpha,
    }


@dataclass
class ProbeResult(TableResult):
    """Cross-validated probe accuracy per layer (one row per probe).

    ``frame`` columns: ``layer`` (``<NA>`` for a probe over all layers' neurons at once),
    ``features`` (what was probed), ``n_features``, ``accuracy`` (mean over folds), ``std``,
    ``chance``, ``p_value``, ``above_chance``.
    """

    frame: pd.DataFrame
    config: dict[str, Any] = field(default_factory=dict)
    arch: Architecture | None = None  # the model's (None: not made from one)

    @property
    def per_layer(self) -> pd.DataFrame:
        """The rows of single layers, sorted by layer."""
        rows = self.frame[self.frame["layer"].notna()]
        return rows.astype({"layer": int}).sort_values("layer").reset_index(drop=True)

    @property
    def best_layer(self) -> int:
        """The layer with the highest accuracy (the earliest among ties)."""
        rows = self.per_layer
        return int(rows.loc[rows["accuracy"].idxmax(), "layer"])

    def readable_layers(self, threshold: float = 0.8) -> list[int]:
        """Layers where the probe reaches ``threshold`` accuracy and beats chance."""
        rows = self.per_layer
        return rows.loc[(rows["accuracy"] >= threshold) & rows["above_chance"], "layer"].tolist()

    def plot(self, title: str | None = None, others: dict[str, ProbeResult] | None = None) -> go.Figure:
        """Accuracy per layer with ±std bands, chance as a dotted line; ``others`` adds curves
        (e.g. ``{"SN-Tuned": tuned_probes}``)."""
        curves = {self.config.get("label", "probe"): self, **(others or {})}
        fig = go.Figure()
        for name, result in curves.items():
            rows = result.per_layer
            fig.add_trace(
                go.Scatter(
                    x=rows["layer"],
                    y=rows["accuracy"],
                    error_y={"type": "data", "array": rows["std"], "visible": True},
                    mode="lines+markers",
                    name=name,
                )
            )
            for _, row in result.frame[result.frame["layer"].isna()].iterrows():
                fig.add_hline(
                    y=row["accuracy"], line_dash="dash", annotation_text=f"{name}: {row['features']}"
                )
        chance = float(self.frame["chance"].iloc[0]) if len(self.frame) else 0.5
        fig.add_hline(y=chance, line_dash="dot", line_color="grey", annotation_text="chance")
        site = self.config.get("site", "neurons")
        return fig.update_layout(
            title=title or f"probe accuracy per layer ({site}, offset {self.config.get('offset', -1)})",
            xaxis_title="layer",
            yaxis_title=f"{self.config.get('cv', '?')}-fold accuracy",
            yaxis_range=[0, 1.05],
        )

    def to_dict(self) -> dict[str, Any]:
        frame = self.frame.astype({"layer": object}).where(self.frame.notna(), None)
        return {"config": self.config, "arch": arch_to_dict(self.arch), "rows": frame.to_dict("records")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeResult:
        frame = pd.DataFrame(d["rows"]).astype({"layer": "Int64"})
        return cls(frame=frame, config=dict(d.get("config", {})), arch=arch_from_dict(d.get("arch")))

    def __repr__(self) -> str:
        if not len(self.per_layer):
            return f"ProbeResult({len(self.frame)} probes)"
        best = self.per_layer["accuracy"].max()
        return f"ProbeResult({len(self.frame)} probes, best layer {self.best_layer}: {best:.3f})"


def _labels(harmful: Sequence[str], harmless: Sequence[str]) -> np.ndarray:
    return np.r_[np.ones(len(harmful), dtype=int), np.zeros(len(harmless), dtype=int)]


def _both(subject, harmful, harmless, names, offset, batch_size, chat, progress) -> dict[str, Tensor]:
    """Activations of harmful then harmless prompts at ``names``, stacked along the prompt axis."""
    harmful = check_prompts(harmful, what="harmful")
    harmless = check_prompts(harmless, what="harmless")
    kwargs = {"offsets": [offset], "batch_size": batch_size, "chat": chat}
    a = activations_at(
        subject, harmful, names, desc="probe activations (harmful)" if progress else None, **kwargs
    )
    b = activations_at(
        subject, harmless, names, desc="probe activations (harmless)" if progress else None, **kwargs
    )
    return {n: torch.cat([a[n], b[n]])[:, 0] for n in names}


def probe_layers(
    subject: Subject,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    site: str = "resid_post",
    offset: int = -1,
    cv: int = 5,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    C: float = 1.0,
    batch_size: int = 8,
    chat: bool = True,
    progress: bool = True,
) -> ProbeResult:
    """Cross-validated linear probe (harmful = 1, harmless = 0) on ``site`` at every layer."""
    layers = subject.arch.check_layers(layers)
    names = [site_hook(site, layer) for layer in layers]
    acts = _both(subject, harmful, harmless, names, offset, batch_size, chat, progress)
    y = _labels(harmful, harmless)
    rows = []
    for layer, name in zip(layers, names, strict=True):
        x = acts[name].flatten(1).numpy()
        rows.append(
            {
                "layer": layer,
                "features": site,
                "n_features": x.shape[1],
                **cross_validate(x, y, cv=cv, seed=seed, C=C),
            }
        )
    config = {"site": site, "offset": offset, "cv": cv, "seed": seed, "C": C, "chat": chat}
    config |= {"n_harmful": len(harmful), "n_harmless": len(harmless), "label": subject.name}
    return ProbeResult(pd.DataFrame(rows).astype({"layer": "Int64"}), config, subject.arch)


def probe_neurons(
    subject: Subject,
    harmful: Sequence[str],
    harmless: Sequence[str],
    neurons: NeuronSet,
    *,
    offset: int = -1,
    cv: int = 5,
    seed: int = 0,
    C: float = 1.0,
    batch_size: int = 8,
    chat: bool = True,
    progress: bool = True,
) -> ProbeResult:
    """The probe on the activations of ``neurons`` only: one row per layer holding some of them,
    and a last row (``layer`` = ``<NA>``) with all of them together.

    A high accuracy says the set *reads* harmfulness, not that it refuses: harmful vs harmless is
    readable from almost any neuron set, and a probe's weights rank planted refusal neurons near
    chance (:mod:`safety_circuits.groundtruth`)."""
    check_neurons(neurons, subject)
    if not len(neurons):
        raise ValueError("the NeuronSet is empty: nothing to probe")
    acts = _both(subject, harmful, harmless, neurons.hooks(), offset, batch_size, chat, progress)
    per_layer: dict[int, list[np.ndarray]] = {}
    for site in neuron_sites(neurons):
        per_layer.setdefault(site.layer, []).append(site.read(acts[site.hook]).numpy())
    y = _labels(harmful, harmless)
    label = neurons.name or "neurons"
    rows = []
    for layer, parts in per_layer.items():
        x = np.concatenate(parts, axis=1)
        rows.append(
            {
                "layer": layer,
                "features": label,
                "n_features": x.shape[1],
                **cross_validate(x, y, cv=cv, seed=seed, C=C),
            }
        )
    x = np.concatenate([p for parts in per_layer.values() for p in parts], axis=1)
    rows.append(
        {
            "layer": None,
            "features": f"{label} (all layers)",
            "n_features": x.shape[1],
            **cross_validate(x, y, cv=cv, seed=seed, C=C),
        }
    )
    config = {"site": f"{label} neurons", "offset": offset, "cv": cv, "seed": seed, "C": C, "chat": chat}
    config |= {"n_harmful": len(harmful), "n_harmless": len(harmless), "label": label}
    return ProbeResult(pd.DataFrame(rows).astype({"layer": "Int64"}), config, subject.arch)
