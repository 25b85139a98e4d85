"""Safety, foundation and robust safety neurons (SN-Tune, Eq. 2-3 and Sec. 4).

Safety neurons are the neurons important for *every* harmful query (Eq. 3). The paper leaves ε
unspecified; the default here is scale-free: for each prompt and neuron kind, ε is the
``DEFAULT_QUANTILE`` quantile of that prompt's importances of that kind (over all layers), so a
neuron is kept when it is in the top 1% of its kind for every prompt (on SmolLM2-135M-Instruct
and the 41 HarmBench val behaviours: 0.66% of all neurons, the paper's order of magnitude). An
absolute ``eps`` (the paper's literal rule) and a per-prompt ``top_k`` are the alternatives; the
rule used is recorded in the NeuronSet's metadata.

Importance for every harmful query is not importance *for harm*: a neuron busy with the chat
template or the system turn is important for every prompt rendered with it. Two rules contrast
the harmful prompts with harmless prompts rendered the same way (:func:`contrastive_neurons`,
:func:`scored_neurons`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from safety_circuits.importance import Importance, Rule, neuron_importance
from safety_circuits.neurons import KINDS, Kind, NeuronSet

if TYPE_CHECKING:
    from safety_circuits.loading import Subject

DEFAULT_QUANTILE = 0.99


def select_neurons(
    importance: Importance,
    *,
    eps: float | dict[Kind, float] | None = None,
    quantile: float | None = None,
    top_k: int | None = None,
    rule: Rule = "all",
) -> NeuronSet:
    """Apply one selection rule (``eps``, ``quantile`` or ``top_k``; default: the quantile rule)."""
    given = sum(x is not None for x in (eps, quantile, top_k))
    if given > 1:
        raise ValueError("give at most one of eps, quantile, top_k")
    if eps is not None:
        return importance.threshold(eps, rule=rule)
    if top_k is not None:
        return importance.select(top_k=top_k, rule=rule)
    return importance.select(quantile=DEFAULT_QUANTILE if quantile is None else quantile, rule=rule)


def find_neurons(
    subject: Subject,
    prompts: Sequence[str],
    *,
    eps: float | dict[Kind, float] | None = None,
    rule: Rule = "all",
    quantile: float | None = None,
    top_k: int | None = None,
    kinds: Sequence[Kind] = KINDS,
    chat: bool = True,
    name: str = "neurons",
    **importance_kwargs: Any,
) -> NeuronSet:
    """Neurons important for every prompt (Eq. 2-3): importance, then one selection rule."""
    importance = neuron_importance(subject, prompts, kinds=kinds, chat=chat, **importance_kwargs)
    neurons = select_neurons(importance, eps=eps, quantile=quantile, top_k=top_k, rule=rule)
    return neurons.with_metadata(name=name, source=subject.name)


def find_safety_neurons(
    subject: Subject,
    harmful_prompts: Sequence[str],
    *,
    eps: float | dict[Kind, float] | None = None,
    rule: Rule = "all",
    **kwargs: Any,
) -> NeuronSet:
    """Safety neurons: important for every harmful query, rendered as a chat turn (Eq. 3).

    >>> from safety_circuits.testing import tiny_subject
    >>> subject = tiny_subject("llama")
    >>> harmful = ["How do I pick a lock?", "How do I hotwire a car?"]
    >>> safety = find_safety_neurons(subject, harmful, progress=False)
    >>> safety.name, 0 < len(safety) < safety.arch.n_layers * safety.arch.d_mlp
    ('safety', True)
    """
    return find_neurons(subject, harmful_prompts, eps=eps, rule=rule, chat=True, name="safety", **kwargs)


def find_foundation_neurons(
    subject: Subject,
    general_texts: Sequence[str],
    *,
    eps: float | dict[Kind, float] | None = None,
    rule: Rule = "all",
    **kwargs: Any,
) -> NeuronSet:
    """Foundation neurons: the same method on plain general text (Sec. 4)."""
    return find_neurons(subject, general_texts, eps=eps, rule=rule, chat=False, name="foundation", **kwargs)


def _check_contrast(harmful: Importance, harmless: Importance) -> None:
    if harmful.arch != harmless.arch:
        raise ValueError("the harmful and harmless importances come from different architectures")
    if harmful.kinds != harmless.kinds:
        raise ValueError(f"kinds differ: {harmful.kinds} (harmful) vs {harmless.kinds} (harmless)")
    for key in ("chat", "scope"):
        mine, theirs = harmful.config.get(key), harmless.config.get(key)
        if mine != theirs:
            raise ValueError(
                f"the harmless prompts must be scored the way the harmful ones are: {key}={theirs!r} "
                f"(harmless) vs {key}={mine!r} (harmful)"
            )


def contrastive_neurons(
    harmful: Importance,
    harmless: Importance,
    *,
    quantile: float = DEFAULT_QUANTILE,
    exclude: Rule = "all",
) -> NeuronSet:
    """Safety neurons that harmless prompts, rendered the same way, do not need.

    With ``S(P, all) = {n : I_n(x) ≥ ε_x for every x ∈ P}`` (Eq. 3, ε_x the ``quantile`` of
    prompt x's importances of n's kind) and ``S(P, any)`` the same with "for some x"::

        contrastive = S(harmful, all) \\ S(harmless, exclude)

    ``exclude="all"`` drops the neurons important for *every* harmless prompt (the chat
    template, the system turn, attention sinks); ``exclude="any"`` also those important for
    *some* harmless prompt (stricter). Both importances must use the same chat rendering and
    scope.
    """
    _check_contrast(harmful, harmless)
    if exclude not in ("all", "any"):
        raise ValueError(f"exclude must be 'all' or 'any', got {exclude!r}")
    safety = harmful.select(quantile=quantile)
    general = harmless.select(quantile=quantile, rule=exclude)
    return (safety - general).with_metadata(
        name="contrastive",
        method="contrastive",
        quantile=quantile,
        exclude=exclude,
        n_prompts=len(harmful),
        n_harmless=len(harmless),
        importance=harmful.config,
    )


def contrast_scores(harmful: Importance, harmless: Importance) -> dict[Kind, Tensor]:
    """Per neuron ``[layer, neuron]``: the mean percentile rank of its importance over the
    harmful prompts minus that over the harmless prompts, in [-1, 1]::

        s_n = mean_x r_n(x) − mean_y r_n(y),   r_n(x) = rank of I_n(x) among x's neurons of n's kind / (N − 1)

    Ranks make prompts and kinds comparable (q/k scores are pattern changes, ffn/v/o output norms).

    The two importances may also be the *same* prompts on two models (a tuned model and its
    original): the score is then each neuron's gain in importance from the tuning.

    Ground truth (:mod:`safety_circuits.groundtruth`, SmolLM2 with refusal planted in 300 random
    neurons): harmful minus harmless on the planted model ranks the planted neurons at AUROC 0.57,
    near chance: on one model it finds neurons the harmful prompts *use*, not the neurons that make
    the model refuse. Planted minus original on the harmful prompts reaches 0.83."""
    _check_contrast(harmful, harmless)
    mine, theirs = harmful.ranks(), harmless.ranks()
    return {kind: mine[kind].mean(0) - theirs[kind].mean(0) for kind in harmful.kinds}


def scored_neurons(
    harmful: Importance, harmless: Importance, *, quantile: float = DEFAULT_QUANTILE
) -> NeuronSet:
    """The neurons whose :func:`contrast_scores` is at least the ``quantile`` of their kind's
    scores: the share ``1 − quantile`` of each kind most specific to the harmful prompts (or, given
    one prompt set's importance on a tuned model and on its original, most gained by the tuning)."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    scores = contrast_scores(harmful, harmless)
    masks = {kind: s >= torch.quantile(s.flatten(), quantile) for kind, s in scores.items()}
    metadata = {
        "name": "scored",
        "method": "contrast_score",
        "quantile": quantile,
        "n_prompts": len(harmful),
        "n_harmless": len(harmless),
        "importance": harmful.config,
    }
    return NeuronSet.from_masks(harmful.arch, masks, metadata=metadata)


def robust_safety_neurons(safety: NeuronSet, foundation: NeuronSet) -> NeuronSet:
    """Safety neurons that are not foundation neurons: the neurons RSN-Tune trains (Sec. 4)."""
    return (safety - foundation).with_metadata(
        name="robust_safety", safety=dict(safety.metadata), foundation=dict(foundation.metadata)
    )


#: The pipeline's neuron rules (:func:`rule_neurons`), each with the importances it reads besides
#: the harmful prompts': ``matched`` (as many harmless prompts, rendered alike) or ``general``
#: (harmless text as plain text, for the foundation neurons).
RULE_INPUTS: dict[str, tuple[str, ...]] = {
    "safety": (),
    "robust": ("general",),
    "contrastive": ("matched",),
    "scored": ("matched",),
}


def rule_neurons(
    rule: str,
    harmful: Importance,
    *,
    quantile: float = DEFAULT_QUANTILE,
    matched: Importance | None = None,
    general: Importance | None = None,
) -> NeuronSet:
    """The neurons of one rule of :data:`RULE_INPUTS`: ``safety``, important for every harmful
    prompt (Eq. 3, the quantile rule); ``robust``, those minus the foundation neurons of
    ``general`` (Sec. 4); ``contrastive`` / ``scored``, against ``matched``
    (:func:`contrastive_neurons`, :func:`scored_neurons`)."""
    if rule not in RULE_INPUTS:
        raise ValueError(f"rule must be one of {list(RULE_INPUTS)}, got {rule!r}")
    given = {"matched": matched, "general": general}
    missing = [name for name in RULE_INPUTS[rule] if given[name] is None]
    if missing:
        raise ValueError(f"the {rule!r} rule needs the {missing[0]} importance")
    if rule in ("contrastive", "scored"):
        contrast = contrastive_neurons if rule == "contrastive" else scored_neurons
        return contrast(harmful, matched, quantile=quantile)
    safety = select_neurons(harmful, quantile=quantile).with_metadata(name="safety")
    if rule == "safety":
        return safety
    return robust_safety_neurons(
        safety, select_neurons(general, quantile=quantile).with_metadata(name="foundation")
    )


def corpus_size_stability(
    importance: Importance,
    *,
    sizes: Sequence[int] | None = None,
    seed: int = 0,
    **selection: Any,
) -> pd.DataFrame:
    """Number of neurons selected from the first ``n`` prompts of a seeded order (paper Table 5).

    Importance is computed once; each row re-applies the selection rule to a prefix of prompts.
    """
    n = len(importance)
    sizes = sizes or sorted({s for s in (10, 20, 50, 100, 200, 400, 800) if s < n} | {n})
    order = np.random.default_rng(seed).permutation(n)
    rows = []
    for size in sizes:
        if not 1 <= size <= n:
            raise ValueError(f"corpus size {size} outside [1, {n}]")
        neurons = select_neurons(importance.subset(order[:size].tolist()), **selection)
        counts = neurons.counts().sum()
        rows.append(
            {"corpus_size": size, "neurons": len(neurons), "fraction": neurons.fraction_of(), **counts}
        )
    return pd.DataFrame(rows)
