"""Deactivation experiments (SN-Tune, Table 1, Fig. 2 and Fig. 4): safety neurons vs random ones.

Every experiment deactivates neurons, with TransformerLens hooks (``use="tl"``,
:func:`~safety_circuits.neurons.ablate`) or by zeroing their HF weight slices and decoding with HF
(``use="hf"``, :func:`~safety_circuits.neurons.ablate_hf`; faster, and the two agree to 1e-6),
and reports ASR on harmful prompts, over-refusal on harmless ones, and capability: exact-match
accuracy on the project's short-answer questions and the mean KL divergence of next-token
distributions on harmless prompts against the unmodified model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from safety_circuits._io import TableResult
from safety_circuits.activations import batches, hidden_states, lm_head, to_right_padding
from safety_circuits.data import capability_questions
from safety_circuits.evaluate import attack_success_rate, generate, over_refusal_rate
from safety_circuits.importance import Importance
from safety_circuits.neurons import NeuronSet, ablate, ablate_hf, check_neurons
from safety_circuits.stats import kl_divergence
from safety_circuits.vocabulary import Use

if TYPE_CHECKING:
    from safety_circuits.architecture import Architecture
    from safety_circuits.loading import Subject


def is_correct(response: str, answers: Sequence[str]) -> bool:
    """Exact match: an accepted answer appears in the response as a whole word or number.

    >>> is_correct("The capital of France is Paris.", ["Paris"])
    True
    >>> is_correct("It is 120.", ["12", "twelve"])
    False
    """
    text = response.lower()
    return any(re.search(rf"(?<![\w.]){re.escape(a.lower())}(?![\w]|\.\d)", text) for a in answers)


@dataclass
class CapabilityEval(TableResult):
    """Per-question responses and correctness; ``accuracy`` is the exact-match rate."""

    frame: pd.DataFrame
    arch: Architecture | None = None  # the model's (None: not made from one)

    @property
    def accuracy(self) -> float:
        return float(self.frame["correct"].mean())


def capability_accuracy(
    subject: Subject,
    questions: pd.DataFrame | None = None,
    *,
    max_new_tokens: int = 16,
    **generate_kwargs: Any,
) -> CapabilityEval:
    """Exact-match accuracy on short-answer questions (the project's set by default)."""
    questions = capability_questions() if questions is None else questions
    responses = generate(
        subject, questions["question"].tolist(), max_new_tokens=max_new_tokens, **generate_kwargs
    )
    frame = questions.assign(response=responses)
    frame["correct"] = [is_correct(r, a) for r, a in zip(frame["response"], frame["answers"], strict=True)]
    return CapabilityEval(frame, arch=subject.arch)


@torch.no_grad()
def next_token_logprobs(
    subject: Subject, prompts: Sequence[str], *, batch_size: int = 8, use: Use = "tl"
) -> list[torch.Tensor]:
    """Log-probabilities of the next token at every real position of each chat-rendered prompt
    (with ``use="hf"``, the template's shared system turn runs once per batch)."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    for batch in batches(subject, prompts, batch_size=batch_size):
        if use == "hf":
            input_ids, mask = to_right_padding(batch.input_ids, batch.attention_mask)
            logits = lm_head(subject.hf, hidden_states(subject.hf, input_ids, mask)[mask.bool()])
        else:
            logits = subject.tl(batch.input_ids, attention_mask=batch.attention_mask)
            logits = logits[batch.attention_mask.bool()]
        logp = logits.float().log_softmax(-1).split(batch.attention_mask.sum(-1).tolist())
        for row, i in enumerate(batch.order):
            out[i] = logp[row].cpu()
    return out


def mean_kl(reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> float:
    """Mean over tokens of KL(reference || other) between next-token distributions
    (:func:`~safety_circuits.stats.kl_divergence` of the prompts' log-probabilities, concatenated)."""
    return float(kl_divergence(torch.cat(list(reference)), torch.cat(list(other))))


def measure(
    subject: Subject,
    harmful: Sequence[str] | None,
    harmless: Sequence[str],
    *,
    capability: pd.DataFrame | None = None,
    reference: list[torch.Tensor] | None = None,
    max_new_tokens: int = 48,
    use: Use = "tl",
    batch_size: int = 8,
) -> dict[str, float]:
    """ASR (if ``harmful``), over-refusal, exact-match capability (if ``capability``) and KL
    against ``reference`` (next-token log-probs of the unmodified model on ``harmless``, if given)."""
    gen = {"max_new_tokens": max_new_tokens, "use": use, "batch_size": batch_size, "progress": False}
    row = {} if harmful is None else {"asr": attack_success_rate(subject, harmful, **gen).rate}
    row["over_refusal"] = over_refusal_rate(subject, harmless, **gen).rate
    if reference is not None:
        row["kl"] = mean_kl(reference, next_token_logprobs(subject, harmless, batch_size=batch_size, use=use))
    if capability is not None:
        row["capability"] = capability_accuracy(subject, capability, **{**gen, "max_new_tokens": 16}).accuracy
    return row


def deactivated(subject: Subject, neurons: NeuronSet | None, *, use: Use = "tl") -> AbstractContextManager:
    """``neurons`` switched off for the decoding ``use`` will run (TL hooks or zeroed HF slices)."""
    if neurons is None:
        return nullcontext(subject)
    return ablate_hf(subject, neurons) if use == "hf" else ablate(subject, neurons)


def zeroing_kl(
    subject: Subject,
    harmless: Sequence[str],
    sets: dict[str, NeuronSet],
    *,
    random_seeds: int = 3,
    batch_size: int = 8,
    use: Use = "tl",
) -> pd.DataFrame:
    """How specific each neuron set is: the mean KL(original || zeroed) of the next-token
    distributions on ``harmless`` prompts with the set zeroed on ``subject``, next to
    ``random_seeds`` random sets of the same counts per layer and kind. Small means specific:
    switching the set off leaves harmless behaviour alone. Rows: set, neurons, kl, random_kl
    (mean over seeds), random_kl_min, random_kl_max, kl_ratio (kl / random_kl)."""
    if random_seeds < 1:
        raise ValueError(f"random_seeds must be >= 1, got {random_seeds}")
    reference = next_token_logprobs(subject, harmless, batch_size=batch_size, use=use)

    def kl(neurons: NeuronSet) -> float:
        with deactivated(subject, neurons, use=use):
            return mean_kl(reference, next_token_logprobs(subject, harmless, batch_size=batch_size, use=use))

    rows = []
    for name, neurons in sets.items():
        check_neurons(neurons, subject)
        random = [kl(neurons.random_like(seed=seed)) for seed in range(random_seeds)]
        mine, mean = kl(neurons), sum(random) / len(random)
        rows.append(
            {
                "set": name,
                "neurons": len(neurons),
                "kl": mine,
                "random_kl": mean,
                "random_kl_min": min(random),
                "random_kl_max": max(random),
                "kl_ratio": mine / mean if mean > 0 else float("inf"),
            }
        )
    return pd.DataFrame(rows)


def deactivation_experiment(
    subject: Subject,
    harmful_eval: Sequence[str],
    harmless_eval: Sequence[str],
    neurons: NeuronSet,
    *,
    capability: pd.DataFrame | None = None,
    random_seeds: int = 3,
    max_new_tokens: int = 48,
    use: Use = "tl",
    batch_size: int = 8,
    origin: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Table 1: Origin, Deact-R (random neurons, same count per layer and kind; one row per seed)
    and Deact-SN, with ASR, over-refusal, capability (exact match) and KL vs the original.

    ``capability``: questions as from :func:`capability_questions` (``None``: skip exact match).
    ``origin``: :func:`measure`'s row for ``subject`` on the same prompts, if already known (it is
    then not measured again; its KL is 0 by definition).
    """
    check_neurons(neurons, subject)
    reference = next_token_logprobs(subject, harmless_eval, batch_size=batch_size, use=use)
    settings: list[tuple[str, int | None, NeuronSet | None]] = [("Origin", None, None)]
    settings += [("Deact-R", seed, neurons.random_like(seed=seed)) for seed in range(random_seeds)]
    settings.append(("Deact-SN", None, neurons))
    rows = []
    for setting, seed, chosen in settings:
        if chosen is None and origin is not None:
            rows.append({"setting": setting, "seed": seed, "neurons": 0, **origin, "kl": 0.0})
            continue
        with deactivated(subject, chosen, use=use):
            measured = measure(
                subject,
                harmful_eval,
                harmless_eval,
                capability=capability,
                reference=reference,
                max_new_tokens=max_new_tokens,
                use=use,
                batch_size=batch_size,
            )
        rows.append({"setting": setting, "seed": seed, "neurons": len(chosen or []), **measured})
    frame = pd.DataFrame(rows)
    order = ("setting", "seed", "neurons", "asr", "over_refusal", "kl", "capability")
    return frame[[c for c in order if c in frame]]


def _asr(
    subject: Subject, neurons: NeuronSet, prompts: Sequence[str], max_new_tokens: int, use: Use
) -> float:
    with deactivated(subject, neurons, use=use):
        return attack_success_rate(
            subject, prompts, max_new_tokens=max_new_tokens, use=use, progress=False
        ).rate


def asr_vs_fraction(
    subject: Subject,
    harmful_eval: Sequence[str],
    importance: Importance,
    *,
    quantiles: Sequence[float] = (0.999, 0.995, 0.99, 0.98, 0.95, 0.9),
    max_new_tokens: int = 48,
    use: Use = "tl",
) -> pd.DataFrame:
    """Fig. 2: ASR as more safety neurons are deactivated (looser quantile rule -> more neurons)."""
    rows = []
    for q in quantiles:
        neurons = importance.select(quantile=q)
        asr = _asr(subject, neurons, harmful_eval, max_new_tokens, use)
        rows.append({"quantile": q, "neurons": len(neurons), "fraction": neurons.fraction_of(), "asr": asr})
    return pd.DataFrame(rows)


def layer_sweep(
    subject: Subject,
    harmful_eval: Sequence[str],
    neurons: NeuronSet,
    *,
    ks: Sequence[int] | None = None,
    max_new_tokens: int = 48,
    use: Use = "tl",
) -> pd.DataFrame:
    """Fig. 4: ASR when only the safety neurons of the first k layers (``side="first"``) or of the
    last k layers (``side="last"``) are deactivated."""
    n_layers = neurons.arch.n_layers
    ks = ks or sorted({max(1, round(n_layers * f)) for f in (0.1, 0.25, 0.5, 0.75, 1.0)})
    rows = []
    for side in ("first", "last"):
        for k in ks:
            keep = range(k) if side == "first" else range(n_layers - k, n_layers)
            chosen = NeuronSet(neurons.arch, {s: i for s, i in neurons.indices.items() if s[0] in keep})
            asr = _asr(subject, chosen, harmful_eval, max_new_tokens, use)
            rows.append({"side": side, "layers": k, "neurons": len(chosen), "asr": asr})
    return pd.DataFrame(rows)
